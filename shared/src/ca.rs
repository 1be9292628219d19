//! The local certificate authority for file/dev mode and VMs.
//!
//! `init` writes a self-signed root and an issuer signed by it. The issuer signs short-lived
//! workload certificates; the root only ever appears in the trust bundle, so it can stay
//! offline. The bundle file may hold several roots, which is how an anchor is rotated.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::identity::Identity;

/// Root certificate validity.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issuer certificate validity; the issuer is rotated far more often than the root.
const ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Back-dating of leaf certificates, so small clock skew between nodes never makes a fresh
/// certificate "not yet valid".
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// What went wrong with the local CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file holds no usable PEM of the expected kind.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// `init` refuses to overwrite an existing CA.
    #[error(
        "{0} already holds a CA; pass --force to replace it (every workload certificate will change)"
    )]
    Exists(PathBuf),
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files of a local CA directory.
#[derive(Debug, Clone)]
pub struct CaPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl CaPaths {
    /// Paths inside `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaPaths { dir: dir.into() }
    }
    /// Root certificate (PEM).
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root.pem")
    }
    /// Root private key (PEM, PKCS#8).
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }
    /// Issuer certificate (PEM).
    pub fn issuer_cert(&self) -> PathBuf {
        self.dir.join("issuer.pem")
    }
    /// Issuer private key (PEM, PKCS#8).
    pub fn issuer_key(&self) -> PathBuf {
        self.dir.join("issuer.key")
    }
    /// Trust bundle: every root that workloads accept (PEM, one or more certificates).
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
}

/// Creates a root and an issuer in `dir` for `trust_domain`.
pub fn init(dir: &Path, trust_domain: &str, force: bool) -> Result<CaPaths, CaError> {
    let paths = CaPaths::new(dir);
    if !force && paths.issuer_key().exists() {
        return Err(CaError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let now = OffsetDateTime::now_utc();
    // A per-CA tag in the names: two CAs for one trust domain must not share subject names,
    // or verifiers would match a foreign chain by name and report a bad signature instead
    // of an unknown issuer.
    let tag = ca_tag();
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut root_params = ca_params(&format!("Ambit root CA {tag} ({trust_domain})"), 1);
    root_params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    root_params.not_after = now + ROOT_VALIDITY;
    let root_cert = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);

    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut issuer_params = ca_params(&format!("Ambit issuer {tag} ({trust_domain})"), 0);
    issuer_params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    issuer_params.not_after = now + ISSUER_VALIDITY;
    let issuer_cert = issuer_params.signed_by(&issuer_key, &root_issuer)?;

    write_file(&paths.root_cert(), root_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.root_key(),
        root_issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&paths.issuer_cert(), issuer_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.issuer_key(),
        issuer_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&paths.bundle(), root_cert.pem().as_bytes(), 0o644)?;
    Ok(paths)
}

fn ca_tag() -> String {
    let mut bytes = [0u8; 4];
    if crate::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ca_params(common_name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ambit");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Write-then-rename so a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// A freshly issued workload certificate.
#[derive(Debug)]
pub struct IssuedCert {
    /// The identity in the URI SAN.
    pub identity: Identity,
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// An issuer loaded from a CA directory, ready to sign workload certificates.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: CertificateDer<'static>,
    issuer_not_after: OffsetDateTime,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads the issuer certificate and key from a CA directory.
    pub fn load(paths: &CaPaths) -> Result<Self, CaError> {
        let cert_path = paths.issuer_cert();
        let key_path = paths.issuer_key();
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadFile {
            path: key_path.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let issuer_der = crate::tls::parse_certs(&cert_path, cert_pem.as_bytes())
            .map_err(|e| CaError::BadFile {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::BadFile {
                path: cert_path.clone(),
                reason: "no certificate in file".into(),
            })?;
        let issuer_not_after =
            crate::tls::not_after(&issuer_der).map_err(|e| CaError::BadFile {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key).map_err(|e| CaError::BadFile {
            path: cert_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        Ok(LocalCa {
            issuer,
            issuer_der,
            issuer_not_after,
        })
    }

    /// When the issuer itself expires.
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }

    /// Issues a leaf certificate for `identity`, valid for `ttl` (capped at the issuer's expiry).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // SPIFFE X.509-SVIDs carry the identity in the URI SAN; the subject stays empty-ish.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ambit");
        params.distinguished_name = dn;
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|_| CaError::Generate(rcgen::Error::CouldNotParseCertificate))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = (now + ttl).min(self.issuer_not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }
}

/// Writes an issued certificate as `cert.pem` (leaf then issuer) and `key.pem` into `dir`.
pub fn write_issued(dir: &Path, cert: &IssuedCert) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut chain = String::new();
    for der in &cert.chain {
        chain.push_str(&pem_block("CERTIFICATE", der.as_ref()));
    }
    write_file(&dir.join("cert.pem"), chain.as_bytes(), 0o644)?;
    write_file(
        &dir.join("key.pem"),
        pem_block("PRIVATE KEY", cert.key.secret_der()).as_bytes(),
        0o600,
    )
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaf_with_spiffe_san_that_chains_to_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = init(dir.path(), "cluster.local", false).expect("init");
        assert!(matches!(
            init(dir.path(), "cluster.local", false),
            Err(CaError::Exists(_))
        ));
        let ca = LocalCa::load(&paths).expect("load");
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
        let leaf = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        assert_eq!(leaf.chain.len(), 2);
        assert_eq!(
            crate::tls::identity_of_cert(&leaf.chain[0]).expect("san"),
            id
        );
        let lifetime = leaf.not_after - leaf.not_before;
        assert_eq!(lifetime.whole_seconds(), 3600 + 60);

        let bundle = crate::tls::TrustBundle::load(&paths.bundle()).expect("bundle");
        crate::tls::verify_chain(&bundle, &leaf.chain, webpki::KeyUsage::server_auth())
            .expect("chains to root");

        let other = tempfile::tempdir().expect("tempdir");
        let other_bundle = crate::tls::TrustBundle::load(
            &init(other.path(), "cluster.local", false)
                .expect("init")
                .bundle(),
        )
        .expect("bundle");
        assert!(
            crate::tls::verify_chain(&other_bundle, &leaf.chain, webpki::KeyUsage::server_auth())
                .is_err()
        );
    }

    #[test]
    fn write_issued_produces_pem_rustls_can_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::load(&init(dir.path(), "td", false).expect("init")).expect("load");
        let leaf = ca
            .issue(
                &"spiffe://td/ns/a/sa/b".parse().expect("id"),
                Duration::from_secs(60),
            )
            .expect("issue");
        write_issued(&dir.path().join("leaf"), &leaf).expect("write");
        let pem = fs::read(dir.path().join("leaf/cert.pem")).expect("read");
        let certs =
            crate::tls::parse_certs(&dir.path().join("leaf/cert.pem"), &pem).expect("parse");
        assert_eq!(certs, leaf.chain);
    }
}
