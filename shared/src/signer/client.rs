//! [`RemoteSigner`]: workload certificates from the central signer.
//!
//! The key pair is generated here and never leaves the process; the signer sees a PKCS#10
//! request and the caller's projected token, which is re-read from its file on every
//! request because kubelet rotates it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, StatusCode};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

use super::csr::{self, CsrError};
use super::http::{Endpoint, HttpError, client_config_with_roots};
use super::{
    BUNDLE_PATH, BundleResponse, CERTIFICATES_PATH, ErrorBody, IssueRequest, IssueResponse,
    MAX_BODY,
};
use crate::ca::IssuedCert;
use crate::certs::{CertError, CertificateSource, IssueFuture};
use crate::identity::Identity;
use crate::tls::{self, CertInfo, SharedBundle, TrustBundle, WorkloadCert};

/// How long one request to the signer may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the trust bundle is re-fetched between certificates, so a root added or
/// removed at the signer (a rotation step) reaches every proxy within this time.
pub const BUNDLE_POLL: Duration = Duration::from_secs(10);

/// Why the signer gave no certificate.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The token file is missing or empty.
    #[error("reading the service-account token {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The signer's CA bundle file is unusable.
    #[error("the signer's CA bundle: {0}")]
    SignerCa(#[from] tls::TlsError),
    /// Building the request failed.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The signer could not be reached.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The signer said no.
    #[error("the signer refused ({status}): {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The signer's reason.
        reason: String,
    },
    /// The answer is not a usable certificate for the request.
    #[error("unusable answer from the signer: {0}")]
    BadResponse(String),
}

/// How to reach the signer.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// `https://host:port`.
    pub url: String,
    /// PEM roots that vouch for the signer's serving certificate.
    pub signer_ca: PathBuf,
    /// The projected service-account token (audience `ambit-signer`).
    pub token_file: PathBuf,
}

/// `--signer` was given without roots to verify the signer with.
#[derive(Debug, thiserror::Error)]
#[error("--signer needs --signer-ca (or --ca-dir holding bundle.pem)")]
pub struct NoSignerRoots;

impl SignerConfig {
    /// The signer the flags name, if any: `--signer URL`, verified with `--signer-ca`, else
    /// with `<ca-dir>/bundle.pem`.
    pub fn from_flags(
        url: Option<String>,
        signer_ca: Option<PathBuf>,
        ca_dir: Option<&std::path::Path>,
        token_file: PathBuf,
    ) -> Result<Option<SignerConfig>, NoSignerRoots> {
        let Some(url) = url else {
            return Ok(None);
        };
        let signer_ca = match (signer_ca, ca_dir) {
            (Some(p), _) => p,
            (None, Some(dir)) => crate::ca::CaPaths::new(dir).bundle(),
            (None, None) => return Err(NoSignerRoots),
        };
        Ok(Some(SignerConfig {
            url,
            signer_ca,
            token_file,
        }))
    }
}

/// A [`CertificateSource`] that asks the central signer.
#[derive(Debug)]
pub struct RemoteSigner {
    endpoint: Endpoint,
    token_file: PathBuf,
    bundle: SharedBundle,
}

impl RemoteSigner {
    /// Fetches the trust bundle from the signer and returns a source whose answers keep
    /// that bundle current (every issued certificate comes with the roots in force).
    pub async fn connect(
        config: &SignerConfig,
    ) -> Result<(RemoteSigner, SharedBundle), SignerError> {
        let pem = std::fs::read(&config.signer_ca).map_err(|e| tls::TlsError::File {
            path: config.signer_ca.clone(),
            reason: e.to_string(),
        })?;
        let roots = tls::parse_certs(&config.signer_ca, &pem)?;
        let endpoint = Endpoint::new(
            &config.url,
            Some(client_config_with_roots(&roots)?),
            REQUEST_TIMEOUT,
            MAX_BODY,
        )?;
        let roots = fetch_bundle(&endpoint).await?;
        info!(signer = %config.url, roots = roots.roots().len(), "trust bundle fetched from the signer");
        let bundle = SharedBundle::new(roots);
        Ok((
            RemoteSigner {
                endpoint,
                token_file: config.token_file.clone(),
                bundle: bundle.clone(),
            },
            bundle,
        ))
    }

    /// Asks for a certificate for `identity`.
    pub async fn request(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, SignerError> {
        let token = read_token(&self.token_file).await?;
        let (key, csr_pem) = csr::build(identity)?;
        let body = serde_json::to_vec(&IssueRequest {
            identity: identity.to_string(),
            csr: csr_pem,
            ttl_seconds: Some(ttl.as_secs()),
        })
        .map_err(|e| SignerError::BadResponse(e.to_string()))?;
        let (status, body) = self
            .endpoint
            .send(Method::POST, CERTIFICATES_PATH, Some(&token), Some(body))
            .await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        let answer: IssueResponse =
            serde_json::from_slice(&body).map_err(|e| SignerError::BadResponse(e.to_string()))?;
        let chain = parse_pems(&answer.cert_chain)?;
        let leaf = chain
            .first()
            .ok_or_else(|| SignerError::BadResponse("empty certificate chain".into()))?;
        let got =
            tls::identity_of_cert(leaf).map_err(|e| SignerError::BadResponse(e.to_string()))?;
        if &got != identity {
            return Err(SignerError::BadResponse(format!(
                "certificate for {got}, asked for {identity}"
            )));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| SignerError::BadResponse(e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(SignerError::BadResponse(
                "the certificate is not for the requested key".into(),
            ));
        }
        let roots = parse_bundle(&answer.roots)?;
        tls::verify_chain(&roots, &chain, tls::KeyUsage::client_auth()).map_err(|e| {
            SignerError::BadResponse(format!("chain does not reach the roots sent with it: {e}"))
        })?;
        self.put_in_force(roots);
        let info = CertInfo::parse(leaf).map_err(|e| SignerError::BadResponse(e.to_string()))?;
        let issued = IssuedCert {
            identity: identity.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: info.not_before,
            not_after: info.not_after,
        };
        WorkloadCert::from_issued(issued).map_err(|e| SignerError::BadResponse(e.to_string()))
    }
}

impl RemoteSigner {
    /// Re-fetches the trust bundle every [`BUNDLE_POLL`] and puts a changed one in force;
    /// a failed fetch keeps the current one. Runs until the task is dropped.
    pub async fn watch_bundle(
        self: std::sync::Arc<Self>,
        events: std::sync::Arc<dyn crate::certs::CertEvents>,
    ) {
        let mut tick = tokio::time::interval(BUNDLE_POLL);
        tick.tick().await;
        loop {
            tick.tick().await;
            match fetch_bundle(&self.endpoint).await {
                Ok(roots) => {
                    if self.put_in_force(roots) {
                        events.ca_reload(crate::certs::CaFile::Bundle, true);
                    }
                }
                Err(e) => {
                    warn!(signer = %self.endpoint.url(), error = %e, "fetching the trust bundle failed; keeping the current one");
                }
            }
        }
    }

    /// Replaces the bundle if `roots` differ; true if it did.
    fn put_in_force(&self, roots: TrustBundle) -> bool {
        if roots.roots() == self.bundle.current().roots() {
            return false;
        }
        info!(
            roots = roots.roots().len(),
            "trust bundle changed at the signer; new bundle in force"
        );
        self.bundle.replace(roots);
        true
    }
}

async fn fetch_bundle(endpoint: &Endpoint) -> Result<TrustBundle, SignerError> {
    let (status, body) = endpoint.send(Method::GET, BUNDLE_PATH, None, None).await?;
    if status != StatusCode::OK {
        return Err(refusal(status, &body));
    }
    let answer: BundleResponse = serde_json::from_slice(&body)
        .map_err(|e| SignerError::BadResponse(format!("bundle: {e}")))?;
    parse_bundle(&answer.roots)
}

impl CertificateSource for RemoteSigner {
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> IssueFuture<'a> {
        Box::pin(async move {
            self.request(identity, ttl)
                .await
                .map_err(|source| CertError::Signer {
                    identity: identity.clone(),
                    source,
                })
        })
    }
}

async fn read_token(path: &Path) -> Result<String, SignerError> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| SignerError::Token {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(SignerError::Token {
            path: path.to_path_buf(),
            reason: "empty".into(),
        });
    }
    Ok(token.to_string())
}

fn refusal(status: StatusCode, body: &[u8]) -> SignerError {
    let reason = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    SignerError::Refused {
        status: status.as_u16(),
        reason,
    }
}

fn parse_pems(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, SignerError> {
    let mut out = Vec::new();
    for p in pems {
        out.extend(
            tls::parse_certs(Path::new("<signer answer>"), p.as_bytes())
                .map_err(|e| SignerError::BadResponse(e.to_string()))?,
        );
    }
    Ok(out)
}

fn parse_bundle(pems: &[String]) -> Result<TrustBundle, SignerError> {
    let roots = parse_pems(pems)?;
    if roots.is_empty() {
        return Err(SignerError::BadResponse("no roots".into()));
    }
    TrustBundle::from_certs(Path::new("<signer answer>"), roots)
        .map_err(|e| SignerError::BadResponse(e.to_string()))
}
