//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, and SPIFFE identity checks.
//!
//! - The client accepts a server only if its chain reaches a root in the trust bundle and
//!   its URI SAN is exactly the identity expected for the destination.
//! - The server demands a client certificate that chains to the bundle and whose URI SAN is
//!   in the server's trust domain.
//!
//! Both fail the handshake (with a TLS alert) rather than letting the application layer
//! discover a wrong peer later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::ca::IssuedCert;
use crate::identity::Identity;

/// What a verified chain must be good for (client or server authentication).
pub use webpki::KeyUsage;

/// ALPN protocol for HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Bytes fetched from the socket per `read` under TLS. rustls asks its transport for at
/// most 4 KiB at a time, so without a buffer below it every full 16 KiB record costs five
/// `read` system calls; with it, one call usually brings several records.
pub const TRANSPORT_READ_BUFFER: usize = 64 * 1024;

pub mod accept;

/// `io` with a [`TRANSPORT_READ_BUFFER`] read buffer, to run TLS over (writes pass
/// straight through, vectored writes included). For connections we open; accepted ones
/// get their buffer only after the handshake ([`accept`]).
pub fn buffered<IO: tokio::io::AsyncRead>(io: IO) -> tokio::io::BufReader<IO> {
    tokio::io::BufReader::with_capacity(TRANSPORT_READ_BUFFER, io)
}

/// TLS setup errors (not handshake failures, which rustls reports itself).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// The certificate has no SPIFFE URI SAN, or more than one.
    #[error("certificate carries no single SPIFFE identity: {0}")]
    NoIdentity(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The trust bundle could not be turned into a client verifier.
    #[error("trust bundle unusable for client verification: {0}")]
    Verifier(String),
}

/// The crypto provider used everywhere (ring: quick to build, no C toolchain beyond cc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM buffer.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = pem;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The end of a certificate's validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<OffsetDateTime, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(x509.validity().not_after.to_datetime())
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of_cert(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .ok_or_else(|| TlsError::NoIdentity("no subjectAltName extension".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::identity::IdentityError| TlsError::NoIdentity(e.to_string())),
        [] => Err(TlsError::NoIdentity("no spiffe:// URI SAN".into())),
        _ => Err(TlsError::NoIdentity(format!(
            "{} spiffe:// URI SANs",
            uris.len()
        ))),
    }
}

// === TrustBundle ===

/// The roots a workload trusts. May hold several, so an anchor can rotate without downtime.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<rustls::RootCertStore>,
    /// Built once per bundle rather than per handshake.
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl TrustBundle {
    /// Loads a PEM bundle.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_certs(path, parse_certs(path, &pem)?)
    }

    /// Builds a bundle from DER roots; `path` is only used in errors.
    pub fn from_certs(path: &Path, roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(|e| TlsError::File {
                path: path.to_path_buf(),
                reason: format!("unusable root: {e}"),
            })?;
        }
        let store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(TrustBundle {
            roots,
            store,
            client_verifier,
        })
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

/// A trust bundle that can be replaced while it is in use, for trust-anchor rotation.
///
/// Verifiers built from it read the roots in force at each handshake, so a root added to
/// the bundle is trusted by the next handshake and a removed one is not, without
/// rebuilding any TLS configuration. Established sessions are unaffected. Cheap to clone;
/// clones share the slot.
#[derive(Debug, Clone)]
pub struct SharedBundle(Arc<ArcSwap<TrustBundle>>);

impl SharedBundle {
    /// A slot holding `bundle`.
    pub fn new(bundle: TrustBundle) -> Self {
        SharedBundle(Arc::new(ArcSwap::from_pointee(bundle)))
    }

    /// The bundle in force.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.0.load_full()
    }

    /// Puts `bundle` in force for every later handshake.
    pub fn replace(&self, bundle: TrustBundle) {
        self.0.store(Arc::new(bundle));
    }
}

impl From<TrustBundle> for SharedBundle {
    fn from(bundle: TrustBundle) -> Self {
        SharedBundle::new(bundle)
    }
}

/// A fixed bundle: nothing else holds the slot, so it never changes.
impl From<&TrustBundle> for SharedBundle {
    fn from(bundle: &TrustBundle) -> Self {
        SharedBundle::new(bundle.clone())
    }
}

impl From<&SharedBundle> for SharedBundle {
    fn from(bundle: &SharedBundle) -> Self {
        bundle.clone()
    }
}

// === certificate details ===

/// What operators need to know about a certificate: who it is, who signed it, and when it
/// expires. For admin dumps, metrics and the `ca` commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name, e.g. `O=Ambit, CN=Ambit root CA 1a2b3c4d (cluster.local)`.
    pub subject: String,
    /// The subject's common name, or the whole subject when it has none.
    pub common_name: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER encoding, lowercase hex: what `ca remove-root --fingerprint` takes.
    pub fingerprint: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Parses `cert`.
    pub fn parse(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
        use sha2::Digest as _;
        let (_, x509) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let subject = x509.subject().to_string();
        let common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| subject.clone());
        Ok(CertInfo {
            common_name,
            subject,
            issuer: x509.issuer().to_string(),
            serial: hex(x509.raw_serial()),
            fingerprint: hex(&sha2::Sha256::digest(cert.as_ref())),
            not_before: x509.validity().not_before.to_datetime(),
            not_after: x509.validity().not_after.to_datetime(),
        })
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub fn seconds_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_seconds()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies that `chain` (leaf first) reaches a root of `bundle` for the given usage.
pub fn verify_chain(
    bundle: &TrustBundle,
    chain: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    verify_leaf(bundle, leaf, intermediates, UnixTime::now(), usage)
}

fn verify_leaf(
    bundle: &TrustBundle,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(pki_error)?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect();
    cert.verify_for_usage(
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        &bundle.store.roots,
        &intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let err = match e {
        BadDer | BadDerTime => CertificateError::BadEncoding,
        CertExpired { .. } => CertificateError::Expired,
        CertNotValidYet { .. } => CertificateError::NotValidYet,
        UnknownIssuer => CertificateError::UnknownIssuer,
        InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(err)
}

// === WorkloadCert ===

/// A workload's certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity the certificate carries.
    pub identity: Identity,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// What rustls presents.
    pub certified: Arc<CertifiedKey>,
}

impl WorkloadCert {
    /// Wraps a freshly issued certificate.
    pub fn from_issued(issued: IssuedCert) -> Result<Self, TlsError> {
        let key = provider().key_provider.load_private_key(issued.key)?;
        Ok(WorkloadCert {
            identity: issued.identity,
            not_before: issued.not_before,
            not_after: issued.not_after,
            certified: Arc::new(CertifiedKey::new(issued.chain, key)),
        })
    }

    /// Seconds of validity left (negative when expired).
    pub fn seconds_left(&self) -> i64 {
        (self.not_after - OffsetDateTime::now_utc()).whole_seconds()
    }
}

/// The current certificate of one workload, swapped atomically on renewal.
///
/// Handshakes read it; established sessions keep whatever they negotiated, which is what
/// makes renewal make-before-break.
#[derive(Debug)]
pub struct CertSlot(ArcSwap<WorkloadCert>);

impl CertSlot {
    /// A slot holding `cert`.
    pub fn new(cert: WorkloadCert) -> Self {
        CertSlot(ArcSwap::from_pointee(cert))
    }
    /// The current certificate.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.0.load_full()
    }
    /// Installs a renewed certificate for new handshakes.
    pub fn replace(&self, cert: WorkloadCert) {
        self.0.store(Arc::new(cert));
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }
}

/// Presents one fixed certificate as a TLS client.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

// === client ===

/// Builds a client config that presents `cert` and accepts only a server whose chain
/// reaches `bundle` (the roots in force at handshake time, for a [`SharedBundle`]) and
/// whose identity is exactly `expected`.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    bundle: impl Into<SharedBundle>,
    expected: Identity,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.into(),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A server is who we expected, under our roots.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: SharedBundle,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_leaf(
            &self.bundle.current(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let got =
            identity_of_cert(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if got != self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.clone(),
                    got,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Describes a failed TLS handshake for logs: rustls wraps our verifier's errors in
/// `Other(OtherError(..))`, whose default rendering is a Debug dump.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return format!("invalid peer certificate: {}", other.0);
    }
    e.to_string()
}

/// The peer proved a valid certificate, but for another workload.
#[derive(Debug, thiserror::Error)]
#[error("server identity mismatch: expected {expected}, got {got}")]
pub struct IdentityMismatch {
    /// Who we meant to reach.
    pub expected: Identity,
    /// Who answered.
    pub got: Identity,
}

// === server ===

/// Builds a server config that presents the certificate in `slot` and requires a client
/// certificate chaining to `bundle` (the roots in force at handshake time, for a
/// [`SharedBundle`]) with an identity in `trust_domain`.
pub fn server_config(
    slot: Arc<CertSlot>,
    bundle: impl Into<SharedBundle>,
    trust_domain: &str,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(TrustDomainClientVerifier {
        bundle: bundle.into(),
        trust_domain: trust_domain.to_string(),
        provider: provider.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client is under our roots and in our trust domain.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    bundle: SharedBundle,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would only list our roots' names to anyone who connects; workloads know
        // which certificate to send.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of_cert(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(rustls::Error::General(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The identity a peer proved during the handshake (its leaf's SPIFFE URI SAN).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::NoIdentity("peer presented no certificate".into()))?;
    identity_of_cert(leaf)
}

/// Loads a certificate chain (leaf first) and its private key from PEM files, as written by
/// `ztunnel ca issue`.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| TlsError::File {
        path: cert_path.into(),
        reason: e.to_string(),
    })?;
    let chain = parse_certs(cert_path, &cert_pem)?;
    let key_pem = std::fs::read(key_path).map_err(|e| TlsError::File {
        path: key_path.into(),
        reason: e.to_string(),
    })?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::File {
            path: key_path.into(),
            reason: format!("bad PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::File {
            path: key_path.into(),
            reason: "no PRIVATE KEY block found".into(),
        })?;
    let key = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

#[cfg(test)]
mod tests;
