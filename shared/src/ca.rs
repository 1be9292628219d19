//! The local certificate authority for file/dev mode and VMs.
//!
//! `init` writes a self-signed root and an issuer signed by it. The issuer signs short-lived
//! workload certificates; the root only ever appears in the trust bundle, so it can stay
//! offline. The bundle file may hold several roots, which is how an anchor is rotated with
//! zero downtime, in three steps that each wait for every node to catch up:
//!
//! 1. [`add_root`] stages a new root and issuer in `next/` and appends the new root to the
//!    bundle. Nodes re-read the bundle and trust both roots.
//! 2. [`activate`] moves the staged pair into place (the old one goes to `retired/`). Nodes
//!    see the new issuer and re-issue every workload certificate from it; peers still on
//!    old certificates are trusted through the old root.
//! 3. [`remove_roots`] drops the old root from the bundle once every node has re-issued.
//!
//! Every file is replaced by write-then-rename, so a reader never sees half of one; the
//! issuer certificate and key are two files, so [`LocalCa::load`] checks that they match.

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
use crate::tls::CertInfo;

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
    /// A rotation step was asked for out of order, or would break trust.
    #[error("{0}")]
    Rotation(String),
    /// An identity outside the CA's trust domain: peers of the mesh would refuse the
    /// certificate, and one trusting several domains would take it as another domain's.
    #[error("{identity} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The identity asked for.
        identity: String,
        /// The trust domain the issuer was made for.
        trust_domain: String,
    },
    /// The issuer's name does not say which trust domain it serves (not made by `ca init`).
    #[error(
        "{0}: the issuer's common name names no trust domain, so identities can't be checked against it"
    )]
    UnknownTrustDomain(PathBuf),
}

/// How long a new root and issuer stay valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Root lifetime. Default 10 years.
    pub root: Duration,
    /// Issuer lifetime. Default 1 year; the issuer is rotated far more often than the root.
    pub issuer: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            root: ROOT_VALIDITY,
            issuer: ISSUER_VALIDITY,
        }
    }
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
    /// Where [`add_root`] stages the next root and issuer until [`activate`].
    pub fn next(&self) -> CaPaths {
        CaPaths::new(self.dir.join("next"))
    }
    /// Where [`activate`] keeps the pair it replaced (keys included, for an emergency roll
    /// back), named after the old issuer's serial.
    pub fn retired(&self, name: &str) -> CaPaths {
        CaPaths::new(self.dir.join("retired").join(name))
    }
}

/// A root and the issuer it signed, as PEM.
struct Pair {
    root_cert: String,
    root_key: String,
    issuer_cert: String,
    issuer_key: String,
}

impl Pair {
    fn generate(trust_domain: &str, validity: Validity) -> Result<Pair, CaError> {
        let now = OffsetDateTime::now_utc();
        // A per-CA tag in the names: two CAs for one trust domain must not share subject
        // names, or verifiers would match a foreign chain by name and report a bad signature
        // instead of an unknown issuer. The same holds for the old and new root of a rotation.
        let tag = ca_tag();
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut root_params = ca_params(&format!("Ambit root CA {tag} ({trust_domain})"), 1);
        root_params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        root_params.not_after = now + validity.root;
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, root_key);

        let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut issuer_params = ca_params(&format!("Ambit issuer {tag} ({trust_domain})"), 0);
        issuer_params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        // An issuer never outlives the root that vouches for it.
        issuer_params.not_after = now + validity.issuer.min(validity.root);
        let issuer_cert = issuer_params.signed_by(&issuer_key, &root_issuer)?;
        Ok(Pair {
            root_cert: root_cert.pem(),
            root_key: root_issuer.key().serialize_pem(),
            issuer_cert: issuer_cert.pem(),
            issuer_key: issuer_key.serialize_pem(),
        })
    }

    /// Writes the four files; the key before its certificate, so a reader that sees the new
    /// certificate finds its key already in place.
    fn write(&self, paths: &CaPaths) -> Result<(), CaError> {
        fs::create_dir_all(&paths.dir).map_err(|source| CaError::Io {
            path: paths.dir.clone(),
            source,
        })?;
        write_file(&paths.root_key(), self.root_key.as_bytes(), 0o600)?;
        write_file(&paths.root_cert(), self.root_cert.as_bytes(), 0o644)?;
        write_file(&paths.issuer_key(), self.issuer_key.as_bytes(), 0o600)?;
        write_file(&paths.issuer_cert(), self.issuer_cert.as_bytes(), 0o644)
    }

    fn read(paths: &CaPaths) -> Result<Pair, CaError> {
        Ok(Pair {
            root_cert: read_to_string(&paths.root_cert())?,
            root_key: read_to_string(&paths.root_key())?,
            issuer_cert: read_to_string(&paths.issuer_cert())?,
            issuer_key: read_to_string(&paths.issuer_key())?,
        })
    }
}

/// Creates a root and an issuer in `dir` for `trust_domain`, with the default lifetimes.
pub fn init(dir: &Path, trust_domain: &str, force: bool) -> Result<CaPaths, CaError> {
    init_with(dir, trust_domain, force, Validity::default())
}

/// Creates a root and an issuer in `dir` for `trust_domain`, valid for `validity`.
pub fn init_with(
    dir: &Path,
    trust_domain: &str,
    force: bool,
    validity: Validity,
) -> Result<CaPaths, CaError> {
    let paths = CaPaths::new(dir);
    if !force && paths.issuer_key().exists() {
        return Err(CaError::Exists(dir.to_path_buf()));
    }
    let pair = Pair::generate(trust_domain, validity)?;
    pair.write(&paths)?;
    write_file(&paths.bundle(), pair.root_cert.as_bytes(), 0o644)?;
    Ok(paths)
}

/// What a CA directory holds, for `ca status` and rotation checks.
#[derive(Debug, Clone)]
pub struct Status {
    /// Every root in the bundle, in file order.
    pub bundle: Vec<CertInfo>,
    /// The root that signed the active issuer (`root.pem`).
    pub root: CertInfo,
    /// The active issuer.
    pub issuer: CertInfo,
    /// The root staged by [`add_root`], if any.
    pub staged_root: Option<CertInfo>,
}

/// Reads the state of the CA in `dir`.
pub fn status(dir: &Path) -> Result<Status, CaError> {
    let paths = CaPaths::new(dir);
    let next = paths.next();
    Ok(Status {
        bundle: read_certs(&paths.bundle())?
            .iter()
            .map(|c| info(&paths.bundle(), c))
            .collect::<Result<_, _>>()?,
        root: first_cert_info(&paths.root_cert())?,
        issuer: first_cert_info(&paths.issuer_cert())?,
        staged_root: if next.issuer_key().exists() {
            Some(first_cert_info(&next.root_cert())?)
        } else {
            None
        },
    })
}

/// Rotation step 1: stages a new root and issuer in `next/` and appends the new root to the
/// bundle. `trust_domain` only names the certificates; by default it is taken from the
/// current root's name. Returns the new root.
pub fn add_root(
    dir: &Path,
    trust_domain: Option<&str>,
    validity: Validity,
) -> Result<CertInfo, CaError> {
    let paths = CaPaths::new(dir);
    let current = first_cert_info(&paths.root_cert())?;
    let next = paths.next();
    if next.issuer_key().exists() {
        return Err(CaError::Rotation(format!(
            "a new root is already staged in {}; run `ztunnel ca activate` (or delete that \
             directory) before adding another",
            next.dir.display()
        )));
    }
    let trust_domain = match trust_domain {
        Some(td) => td.to_string(),
        None => trust_domain_of(&current.common_name)
            .unwrap_or("unknown")
            .to_string(),
    };
    let pair = Pair::generate(&trust_domain, validity)?;
    pair.write(&next)?;
    let mut bundle = read_to_string(&paths.bundle())?;
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&pair.root_cert);
    write_file(&paths.bundle(), bundle.as_bytes(), 0o644)?;
    first_cert_info(&next.root_cert())
}

/// Rotation step 2: makes the root and issuer staged by [`add_root`] the active ones, and
/// keeps the replaced pair under `retired/`. Refuses unless the staged root is already in
/// the bundle, since nodes would otherwise reject every certificate the new issuer signs.
/// Returns (old issuer, new issuer).
pub fn activate(dir: &Path) -> Result<(CertInfo, CertInfo), CaError> {
    let paths = CaPaths::new(dir);
    let next = paths.next();
    if !next.issuer_key().exists() {
        return Err(CaError::Rotation(format!(
            "nothing staged in {}: run `ztunnel ca add-root` first",
            next.dir.display()
        )));
    }
    let staged = Pair::read(&next)?;
    let staged_root = first_cert(&next.root_cert(), staged.root_cert.as_bytes())?;
    if !read_certs(&paths.bundle())?.contains(&staged_root) {
        return Err(CaError::Rotation(format!(
            "the staged root is not in {}; run `ztunnel ca add-root` again",
            paths.bundle().display()
        )));
    }
    // Loading proves the staged issuer and key match before anything is replaced.
    LocalCa::load(&next)?;
    let old = Pair::read(&paths)?;
    let old_issuer = first_cert_info(&paths.issuer_cert())?;
    old.write(&paths.retired(&old_issuer.serial))?;
    staged.write(&paths)?;
    fs::remove_dir_all(&next.dir).map_err(|source| CaError::Io {
        path: next.dir.clone(),
        source,
    })?;
    Ok((old_issuer, first_cert_info(&paths.issuer_cert())?))
}

/// Rotation step 3: removes roots from the bundle. With `fingerprint` (SHA-256, hex), just
/// that root; otherwise every root but the active one and a staged one. Refuses to remove
/// the root of the active or staged issuer. Returns the removed roots.
pub fn remove_roots(dir: &Path, fingerprint: Option<&str>) -> Result<Vec<CertInfo>, CaError> {
    let paths = CaPaths::new(dir);
    let bundle_path = paths.bundle();
    let mut keep = vec![first_cert(
        &paths.root_cert(),
        read_to_string(&paths.root_cert())?.as_bytes(),
    )?];
    let next = paths.next();
    if next.issuer_key().exists() {
        keep.push(first_cert(
            &next.root_cert(),
            read_to_string(&next.root_cert())?.as_bytes(),
        )?);
    }
    let roots = read_certs(&bundle_path)?;
    let wanted = fingerprint.map(|f| f.trim().to_ascii_lowercase().replace(':', ""));
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    for root in roots {
        let root_info = info(&bundle_path, &root)?;
        let selected = match &wanted {
            Some(f) => root_info.fingerprint == *f,
            None => !keep.contains(&root),
        };
        if selected && keep.contains(&root) {
            return Err(CaError::Rotation(format!(
                "refusing to remove {}: it signs the active or staged issuer",
                root_info.common_name
            )));
        }
        if selected {
            removed.push(root_info);
        } else {
            kept.push(root);
        }
    }
    if let (Some(f), true) = (&wanted, removed.is_empty()) {
        return Err(CaError::Rotation(format!(
            "no root with fingerprint {f} in {}",
            bundle_path.display()
        )));
    }
    if !removed.is_empty() {
        let pem: String = kept.iter().map(|c| pem_block("CERTIFICATE", c)).collect();
        write_file(&bundle_path, pem.as_bytes(), 0o644)?;
    }
    Ok(removed)
}

/// `Ambit root CA 1a2b3c4d (cluster.local)` → `cluster.local`.
fn trust_domain_of(common_name: &str) -> Option<&str> {
    common_name.rsplit_once('(')?.1.strip_suffix(')')
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read_to_string(path)?;
    crate::tls::parse_certs(path, pem.as_bytes()).map_err(|e| CaError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn first_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    crate::tls::parse_certs(path, pem)
        .map_err(|e| CaError::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .into_iter()
        .next()
        .ok_or_else(|| CaError::BadFile {
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        })
}

fn first_cert_info(path: &Path) -> Result<CertInfo, CaError> {
    let cert = first_cert(path, read_to_string(path)?.as_bytes())?;
    info(path, &cert)
}

fn info(path: &Path, cert: &CertificateDer<'_>) -> Result<CertInfo, CaError> {
    CertInfo::parse(cert).map_err(|e| CaError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
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
    /// The trust domain in the issuer's common name (`Ambit issuer … (<domain>)`).
    trust_domain: Option<String>,
    issuer_path: PathBuf,
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
        // The certificate and key are separate files, replaced one after the other during
        // a rotation; signing with a key the certificate does not name would make every
        // workload certificate unverifiable.
        let (_, x509) =
            x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| CaError::BadFile {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::BadFile {
                path: key_path.clone(),
                reason: format!("does not hold the key of {}", cert_path.display()),
            });
        }
        let trust_domain = x509
            .subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok())
            .and_then(trust_domain_of)
            .map(str::to_string);
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key).map_err(|e| CaError::BadFile {
            path: cert_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        Ok(LocalCa {
            issuer,
            issuer_der,
            issuer_not_after,
            trust_domain,
            issuer_path: cert_path,
        })
    }

    /// The trust domain the issuer was made for, when its name says so (every CA made by
    /// [`init`] or [`add_root`] does).
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// Refuses `identity` unless it is in the issuer's trust domain (`ztunnel ca issue`
    /// checks this before signing).
    pub fn check_own_trust_domain(&self, identity: &Identity) -> Result<(), CaError> {
        match self.trust_domain() {
            Some(td) if td == identity.trust_domain() => Ok(()),
            Some(td) => Err(CaError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: td.to_string(),
            }),
            None => Err(CaError::UnknownTrustDomain(self.issuer_path.clone())),
        }
    }

    /// When the issuer itself expires.
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }

    /// The issuer's certificate, which every issued chain ends with.
    pub fn issuer_cert(&self) -> &CertificateDer<'static> {
        &self.issuer_der
    }

    /// Issues a leaf certificate for `identity`, valid for `ttl` (capped at the issuer's expiry).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(identity, ttl)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }

    /// Signs a leaf for `identity` over the public key of a certificate signing request
    /// whose private key stays with the requester (the central signer's path). Nothing of
    /// the request but its key is used: the names, usages and lifetime are the issuer's,
    /// exactly as [`LocalCa::issue`] sets them. The caller checks the request's names.
    pub fn sign_request(
        &self,
        request: &rcgen::CertificateSigningRequestParams,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<SignedCert, CaError> {
        let params = self.leaf_params(identity, ttl)?;
        let signing = rcgen::CertificateSigningRequestParams {
            params,
            public_key: request.public_key.clone(),
        };
        let cert = signing.signed_by(&self.issuer)?;
        Ok(SignedCert {
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            not_before: signing.params.not_before,
            not_after: signing.params.not_after,
        })
    }

    /// Issues a TLS server certificate for DNS names and IP addresses (the central signer's
    /// own serving certificate), valid for `ttl` (capped at the issuer's expiry).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ambit");
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        for name in dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|_| CaError::Generate(rcgen::Error::CouldNotParseCertificate))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = (now + ttl).min(self.issuer_not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone(), self.issuer_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<CertificateParams, CaError> {
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
        Ok(params)
    }
}

/// A leaf signed over a requester's public key: no private key here.
#[derive(Debug)]
pub struct SignedCert {
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
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
    fn only_identities_of_the_cas_own_trust_domain_pass_the_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            LocalCa::load(&init(dir.path(), "td.example", false).expect("init")).expect("load");
        assert_eq!(ca.trust_domain(), Some("td.example"));
        let own: Identity = "spiffe://td.example/ns/a/sa/b".parse().expect("id");
        ca.check_own_trust_domain(&own).expect("own trust domain");
        let foreign: Identity = "spiffe://evil.example/ns/a/sa/b".parse().expect("id");
        assert!(matches!(
            ca.check_own_trust_domain(&foreign),
            Err(CaError::ForeignTrustDomain { trust_domain, .. }) if trust_domain == "td.example"
        ));
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

    #[test]
    fn three_step_rotation_keeps_old_and_new_leaves_verifiable_until_the_old_root_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = init(dir.path(), "cluster.local", false).expect("init");
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let usage = || webpki::KeyUsage::server_auth();
        let bundle = || crate::tls::TrustBundle::load(&paths.bundle()).expect("bundle");
        let old_leaf = LocalCa::load(&paths)
            .expect("load")
            .issue(&id, Duration::from_secs(600))
            .expect("issue");

        assert!(matches!(activate(dir.path()), Err(CaError::Rotation(_))));
        let new_root = add_root(dir.path(), None, Validity::default()).expect("add-root");
        assert!(
            new_root.common_name.ends_with("(cluster.local)"),
            "{new_root:?}"
        );
        assert!(matches!(
            add_root(dir.path(), None, Validity::default()),
            Err(CaError::Rotation(_))
        ));
        assert_eq!(bundle().roots().len(), 2);
        let st = status(dir.path()).expect("status");
        assert_eq!(st.staged_root.as_ref(), Some(&new_root));
        // The active issuer did not change yet.
        assert_eq!(
            LocalCa::load(&paths).expect("load").issuer_cert(),
            &old_leaf.chain[1]
        );

        let (old_issuer, new_issuer) = activate(dir.path()).expect("activate");
        assert_ne!(old_issuer.serial, new_issuer.serial);
        assert_eq!(new_issuer.issuer, new_root.subject);
        assert!(paths.retired(&old_issuer.serial).issuer_key().exists());
        assert!(!paths.next().dir.exists());
        let new_leaf = LocalCa::load(&paths)
            .expect("load")
            .issue(&id, Duration::from_secs(600))
            .expect("issue");
        crate::tls::verify_chain(&bundle(), &old_leaf.chain, usage()).expect("old leaf");
        crate::tls::verify_chain(&bundle(), &new_leaf.chain, usage()).expect("new leaf");

        let removed = remove_roots(dir.path(), None).expect("remove");
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].subject, old_issuer.issuer);
        assert_eq!(bundle().roots().len(), 1);
        assert!(crate::tls::verify_chain(&bundle(), &old_leaf.chain, usage()).is_err());
        crate::tls::verify_chain(&bundle(), &new_leaf.chain, usage()).expect("new leaf");
        assert!(remove_roots(dir.path(), None).expect("remove").is_empty());
        assert!(matches!(
            remove_roots(dir.path(), Some(&new_root.fingerprint)),
            Err(CaError::Rotation(_))
        ));
    }

    #[test]
    fn an_issuer_key_that_does_not_match_its_certificate_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let pa = init(a.path(), "td", false).expect("init");
        let pb = init(b.path(), "td", false).expect("init");
        fs::copy(pb.issuer_key(), pa.issuer_key()).expect("copy");
        let err = LocalCa::load(&pa).expect_err("mismatched key");
        assert!(err.to_string().contains("does not hold the key"), "{err}");
    }

    #[test]
    fn shorter_validity_is_honoured_and_an_issuer_never_outlives_its_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(86_400);
        init_with(
            dir.path(),
            "td",
            false,
            Validity {
                root: 10 * day,
                issuer: 20 * day,
            },
        )
        .expect("init");
        let st = status(dir.path()).expect("status");
        let now = OffsetDateTime::now_utc();
        assert!((st.root.seconds_left(now) - 10 * 86_400).abs() < 120);
        assert!(st.issuer.not_after <= st.root.not_after);
    }
}
