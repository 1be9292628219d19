//! The central certificate signer's protocol, and its client.
//!
//! In a cluster the node tunnels and waypoints do not hold the issuer key: they generate
//! their key pairs locally, send a PKCS#10 request to the signer (`ztunnel signer`) with
//! their projected service-account token, and get back a short-lived leaf, its chain and
//! the trust bundle. The signer authenticates the token with the Kubernetes TokenReview API
//! and decides which identities the caller may hold.
//!
//! Protocol (HTTP/1.1 over TLS, JSON bodies, at most [`MAX_BODY`] bytes each way):
//!
//! - `POST /v1/certificates` with `Authorization: Bearer <token>` and an [`IssueRequest`]:
//!   `200` with an [`IssueResponse`]; otherwise an [`ErrorBody`] with `400` (malformed
//!   request or CSR, or CSR names that are not exactly the requested identity), `401`
//!   (missing, unknown or forged token), `403` (identity not allowed for this caller),
//!   `413` (body too large), `429` (too many requests in flight), `503` (the API server
//!   could not be asked).
//! - `GET /v1/bundle`: `200` with a [`BundleResponse`] (roots are public; no token needed).
//! - `GET /healthz`: `200` once serving.
//!
//! - [`csr`]: building a request (client) and checking one against an identity (signer).
//! - [`http`]: the small HTTP/1.1 client both sides use (signer → API server, proxy → signer).
//! - [`client`]: [`client::RemoteSigner`], a [`crate::certs::CertificateSource`].

use serde::{Deserialize, Serialize};

pub mod client;
pub mod csr;
pub mod http;

/// Largest request or response body, either way.
pub const MAX_BODY: usize = 64 * 1024;
/// Path of the issuing endpoint.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Path of the trust bundle endpoint.
pub const BUNDLE_PATH: &str = "/v1/bundle";
/// Audience the projected token must be minted for.
pub const AUDIENCE: &str = "ambit-signer";
/// Where kubelet projects the token by default.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/ambit/token";

/// `POST /v1/certificates` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueRequest {
    /// The SPIFFE identity wanted, e.g. `spiffe://cluster.local/ns/shop/sa/web`.
    pub identity: String,
    /// PKCS#10 request, PEM; its only SAN must be `identity` as a URI.
    pub csr: String,
    /// Wanted lifetime; the signer caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `POST /v1/certificates` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueResponse {
    /// PEM certificates, leaf first, then the issuer.
    pub cert_chain: Vec<String>,
    /// PEM roots every workload trusts.
    pub roots: Vec<String>,
    /// Expiry of the leaf, RFC 3339 (informational: the certificate says it too).
    pub not_after: String,
}

/// `GET /v1/bundle` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleResponse {
    /// PEM roots.
    pub roots: Vec<String>,
}

/// Every refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Why, for the caller's logs.
    pub error: String,
}

/// One DER certificate as PEM.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
