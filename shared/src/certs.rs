//! Workload certificates for a proxy: issued on demand, renewed at half-life, renewed at
//! once when the CA switches issuer; and the local CA's files, re-read when they change.
//!
//! Renewal is make-before-break: the new certificate is installed in the identity's
//! [`CertSlot`] only once issued, new handshakes pick it up, and established connections
//! keep the session they negotiated. Each renewal bumps a generation that the HBONE pool
//! keys on ([`crate::hbone::PoolKey::cert_generation`]), so new streams move to connections
//! with the new certificate. A failed renewal backs off and keeps the valid certificate.
//!
//! [`watch_ca`] polls the local CA directory. A changed `bundle.pem` is put in force for
//! every later handshake through the [`SharedBundle`]; a changed issuer is put in force and
//! every workload certificate is renewed from it. Either is refused, keeping the last good
//! one, if it does not load, and a new issuer is refused unless the bundle trusts it.
//! [`warn_expiring`] logs, rate-limited, any certificate close to expiry.
//!
//! Certificates come from a [`CertificateSource`]: the local CA in file mode, or the
//! central signer ([`crate::signer::client::RemoteSigner`], `--signer`), which caps their
//! lifetime, keeps its issuer to itself and sends the trust bundle with every certificate.
//! [`watch_ca`] only applies to the local CA.
//!
//! The node tunnel manages one certificate per local workload identity; the waypoint
//! manages one, its own. Metrics stay with each binary: they observe renewals and reloads
//! through [`CertEvents`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::ca::{CaError, CaPaths, LocalCa};
use crate::identity::Identity;
use crate::tls::{self, CertInfo, CertSlot, SharedBundle, TrustBundle, WorkloadCert};

/// Shortest wait between renewal attempts after a failure.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between renewal attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the CA directory is checked for changes (as often as the config file).
const CA_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long to wait before re-reading an issuer whose key did not match: the certificate
/// and key are replaced one rename after the other.
const TORN_ISSUER_RETRY: Duration = Duration::from_millis(250);
/// How often certificates are checked for approaching expiry.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A leaf with less than this fraction of its lifetime left is failing to renew (renewal
/// starts at one half).
const LEAF_WARN_FRACTION: f64 = 0.2;
/// An issuer or root closer than this to expiry needs an operator.
const CA_WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// At most one warning per leaf in this interval.
const LEAF_WARN_EVERY: Duration = Duration::from_secs(60);
/// At most one warning per issuer or root in this interval.
const CA_WARN_EVERY: Duration = Duration::from_secs(3600);

/// Errors obtaining a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA refused or failed.
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        /// For whom.
        identity: Identity,
        /// Why.
        #[source]
        source: CaError,
    },
    /// The central signer refused or could not be reached.
    #[error("obtaining a certificate for {identity} from the signer: {source}")]
    Signer {
        /// For whom.
        identity: Identity,
        /// Why.
        #[source]
        source: crate::signer::client::SignerError,
    },
    /// The issued certificate could not be loaded into rustls.
    #[error("loading the certificate for {identity}: {source}")]
    Load {
        /// For whom.
        identity: Identity,
        /// Why.
        #[source]
        source: tls::TlsError,
    },
}

// === events ===

/// Why a workload certificate was renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RenewReason {
    /// Half its lifetime had passed.
    HalfLife,
    /// The CA switched to a new issuer.
    IssuerChanged,
}

impl RenewReason {
    /// `half_life` or `issuer_changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RenewReason::HalfLife => "half_life",
            RenewReason::IssuerChanged => "issuer_changed",
        }
    }
}

/// Which of the CA's files changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaFile {
    /// `bundle.pem`, the trusted roots.
    Bundle,
    /// `issuer.pem` and `issuer.key`.
    Issuer,
}

impl CaFile {
    /// `bundle` or `issuer`.
    pub fn as_str(self) -> &'static str {
        match self {
            CaFile::Bundle => "bundle",
            CaFile::Issuer => "issuer",
        }
    }
}

/// Observes renewals and CA reloads, e.g. to count them in metrics.
pub trait CertEvents: fmt::Debug + Send + Sync + 'static {
    /// A renewal was attempted.
    fn renewal(&self, reason: RenewReason, ok: bool);
    /// A changed CA file was put in force (`ok`) or refused.
    fn ca_reload(&self, file: CaFile, ok: bool);
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl CertEvents for NoEvents {
    fn renewal(&self, _reason: RenewReason, _ok: bool) {}
    fn ca_reload(&self, _file: CaFile, _ok: bool) {}
}

// === sources ===

/// What [`CertificateSource::issue`] returns.
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCert, CertError>> + Send + 'a>>;

/// Anything that signs workload certificates: the local CA (file mode) or the central
/// signer ([`crate::signer::client::RemoteSigner`]). Asynchronous because the signer is a
/// network call; the local CA answers at once.
pub trait CertificateSource: Send + Sync + 'static {
    /// Issues a certificate for `identity` valid for `ttl` (the source may cap it).
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> IssueFuture<'a>;
}

impl CertificateSource for LocalCa {
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> IssueFuture<'a> {
        Box::pin(std::future::ready(issue_local(self, identity, ttl)))
    }
}

fn issue_local(
    ca: &LocalCa,
    identity: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert, CertError> {
    let issued = LocalCa::issue(ca, identity, ttl).map_err(|source| CertError::Issue {
        identity: identity.clone(),
        source,
    })?;
    WorkloadCert::from_issued(issued).map_err(|source| CertError::Load {
        identity: identity.clone(),
        source,
    })
}

/// The local CA's issuer, replaceable while certificates are being issued.
#[derive(Debug)]
pub struct LocalIssuer(ArcSwap<LocalCa>);

impl LocalIssuer {
    /// Starts with `ca`.
    pub fn new(ca: LocalCa) -> Self {
        LocalIssuer(ArcSwap::from_pointee(ca))
    }

    /// The issuer in force.
    pub fn current(&self) -> Arc<LocalCa> {
        self.0.load_full()
    }

    /// Puts `ca` in force for every later certificate.
    pub fn replace(&self, ca: LocalCa) {
        self.0.store(Arc::new(ca));
    }
}

impl CertificateSource for LocalIssuer {
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> IssueFuture<'a> {
        let ca: &LocalCa = &self.0.load();
        Box::pin(std::future::ready(issue_local(ca, identity, ttl)))
    }
}

// === manager ===

/// One identity's certificate and its generation.
#[derive(Debug)]
pub struct IdentityCert {
    /// Current certificate, read by handshakes.
    pub slot: Arc<CertSlot>,
    generation: AtomicU64,
}

impl IdentityCert {
    /// Bumps on each renewal.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Certificates of every identity a proxy presents.
#[derive(Clone)]
pub struct CertManager {
    source: Arc<dyn CertificateSource>,
    ttl: Duration,
    certs: Arc<Mutex<HashMap<Identity, Arc<IdentityCert>>>>,
    /// Bumped when the issuer changes; every renewal task wakes and renews.
    issuer_epoch: Arc<watch::Sender<u64>>,
    events: Arc<dyn CertEvents>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager issuing certificates valid for `ttl`, reporting renewals to `events`.
    pub fn new(
        source: Arc<dyn CertificateSource>,
        ttl: Duration,
        events: Arc<dyn CertEvents>,
    ) -> Self {
        CertManager {
            source,
            ttl,
            certs: Arc::default(),
            issuer_epoch: Arc::new(watch::Sender::new(0)),
            events,
        }
    }

    /// The certificate for `identity`, issuing it (and starting its renewal on the current
    /// runtime) on first use.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<IdentityCert>, CertError> {
        if let Some(c) = self.certs.lock().get(identity) {
            return Ok(c.clone());
        }
        // Subscribed before issuing: an issuer change from here on renews this certificate.
        let epoch = self.issuer_epoch.subscribe();
        let cert = self.source.issue(identity, self.ttl).await?;
        info!(identity = %identity, not_after = %cert.not_after, "issued workload certificate");
        let entry = Arc::new(IdentityCert {
            slot: Arc::new(CertSlot::new(cert)),
            generation: AtomicU64::new(1),
        });
        // Two first uses may race while issuing: the first to finish wins and only it
        // starts a renewal task.
        match self.certs.lock().entry(identity.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => return Ok(e.get().clone()),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry.clone());
            }
        }
        tokio::spawn(renew(
            self.clone(),
            identity.clone(),
            Arc::downgrade(&entry),
            epoch,
        ));
        Ok(entry)
    }

    /// Stops managing identities no longer used.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        self.certs.lock().retain(|id, _| keep(id));
    }

    /// Renews every certificate now, from the source's current issuer.
    pub fn renew_all(&self) {
        self.issuer_epoch.send_modify(|e| *e += 1);
    }

    /// Every managed identity with its current certificate and generation, sorted.
    pub fn certificates(&self) -> Vec<(Identity, Arc<WorkloadCert>, u64)> {
        let mut out: Vec<_> = self
            .certs
            .lock()
            .iter()
            .map(|(id, c)| (id.clone(), c.slot.current(), c.generation()))
            .collect();
        out.sort_by_key(|c| c.0.to_string());
        out
    }
}

async fn renew(
    manager: CertManager,
    identity: Identity,
    entry: std::sync::Weak<IdentityCert>,
    mut issuer_epoch: watch::Receiver<u64>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(current) = entry.upgrade() else {
            return;
        };
        // Every pass starts right after an issuance, so what is left now is the lifetime
        // (not_before is back-dated for clock skew and would make short lifetimes look
        // half gone already). Renew at half-life.
        let left = current.slot.current().seconds_left().max(0) as u64;
        let wait = Duration::from_millis(left * 1000 / 2);
        drop(current);
        let reason = tokio::select! {
            _ = tokio::time::sleep(wait) => RenewReason::HalfLife,
            changed = issuer_epoch.changed() => match changed {
                Ok(()) => RenewReason::IssuerChanged,
                // The manager is gone: nothing will ask for this certificate again.
                Err(_) => return,
            },
        };
        loop {
            // Marks the epoch seen before issuing: a change after this renews again.
            issuer_epoch.borrow_and_update();
            let Some(current) = entry.upgrade() else {
                return;
            };
            match manager.source.issue(&identity, manager.ttl).await {
                Ok(new) => {
                    info!(identity = %identity, not_after = %new.not_after, reason = reason.as_str(),
                        "renewed workload certificate");
                    current.slot.replace(new);
                    current.generation.fetch_add(1, Ordering::AcqRel);
                    manager.events.renewal(reason, true);
                    backoff = MIN_BACKOFF;
                    break;
                }
                Err(e) => {
                    manager.events.renewal(reason, false);
                    warn!(identity = %identity, error = %e, retry_in = ?backoff,
                        seconds_left = current.slot.current().seconds_left(),
                        "certificate renewal failed; keeping the current certificate");
                    drop(current);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

// === the CA's files ===

/// Which certificate of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertKind {
    /// A workload certificate.
    Leaf,
    /// The intermediate that signs workload certificates.
    Issuer,
    /// A trust anchor in the bundle.
    Root,
}

impl CertKind {
    /// `leaf`, `issuer` or `root`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Leaf => "leaf",
            CertKind::Issuer => "issuer",
            CertKind::Root => "root",
        }
    }
}

/// One certificate's time left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Which certificate.
    pub kind: CertKind,
    /// The SPIFFE identity of a leaf; the common name of an issuer or root.
    pub identity: String,
    /// Seconds until it expires (negative once expired).
    pub seconds_left: i64,
}

/// Everything a proxy trusts and presents: its workload certificates, the issuer that
/// signs them and the trust bundle.
#[derive(Debug, Clone)]
pub struct Certificates {
    /// Workload certificates.
    pub certs: CertManager,
    /// The local issuer in force; `None` when certificates come from the central signer,
    /// which keeps its issuer to itself.
    pub issuer: Option<Arc<LocalIssuer>>,
    /// The trust bundle in force.
    pub bundle: SharedBundle,
}

impl Certificates {
    /// Loads the local CA in `paths` and starts a manager issuing from it, with
    /// certificates valid for `ttl`.
    pub fn load_local(
        paths: &CaPaths,
        ttl: Duration,
        events: Arc<dyn CertEvents>,
    ) -> Result<Self, LoadError> {
        let ca = LocalCa::load(paths)?;
        let bundle = SharedBundle::new(TrustBundle::load(&paths.bundle())?);
        let issuer = Arc::new(LocalIssuer::new(ca));
        Ok(Certificates {
            certs: CertManager::new(issuer.clone(), ttl, events),
            issuer: Some(issuer),
            bundle,
        })
    }

    /// Connects to the central signer (fetching its trust bundle) and starts a manager
    /// obtaining certificates from it, asking for `ttl` (the signer may cap it).
    pub async fn load_remote(
        config: &crate::signer::client::SignerConfig,
        ttl: Duration,
        events: Arc<dyn CertEvents>,
    ) -> Result<Self, crate::signer::client::SignerError> {
        let (signer, bundle) = crate::signer::client::RemoteSigner::connect(config).await?;
        let signer = Arc::new(signer);
        tokio::spawn(signer.clone().watch_bundle(events.clone()));
        Ok(Certificates {
            certs: CertManager::new(signer, ttl, events),
            issuer: None,
            bundle,
        })
    }

    /// Details of every leaf, with identity and generation.
    pub fn leaves(&self) -> Vec<(Identity, CertInfo, u64)> {
        self.certs
            .certificates()
            .into_iter()
            .filter_map(|(id, cert, generation)| {
                let leaf = cert.certified.cert.first()?;
                Some((id, CertInfo::parse(leaf).ok()?, generation))
            })
            .collect()
    }

    /// Details of the issuer in force: the local one, or with the central signer the one
    /// that signed the most recent leaf.
    pub fn issuer_info(&self) -> Option<CertInfo> {
        match &self.issuer {
            Some(issuer) => CertInfo::parse(issuer.current().issuer_cert()).ok(),
            None => self
                .certs
                .certificates()
                .into_iter()
                .filter_map(|(_, cert, _)| {
                    let issuer = CertInfo::parse(cert.certified.cert.get(1)?).ok()?;
                    Some((cert.not_after, issuer))
                })
                .max_by_key(|(not_after, _)| *not_after)
                .map(|(_, issuer)| issuer),
        }
    }

    /// Details of every root in the bundle in force.
    pub fn roots(&self) -> Vec<CertInfo> {
        self.bundle
            .current()
            .roots()
            .iter()
            .filter_map(|r| CertInfo::parse(r).ok())
            .collect()
    }

    /// Every leaf, the issuer and every root, with their time left now.
    pub fn expiries(&self) -> Vec<Expiry> {
        let now = OffsetDateTime::now_utc();
        let mut out: Vec<Expiry> = self
            .leaves()
            .into_iter()
            .map(|(id, info, _)| Expiry {
                kind: CertKind::Leaf,
                identity: id.to_string(),
                seconds_left: info.seconds_left(now),
            })
            .collect();
        out.extend(self.issuer_info().map(|info| Expiry {
            kind: CertKind::Issuer,
            identity: info.common_name.clone(),
            seconds_left: info.seconds_left(now),
        }));
        out.extend(self.roots().into_iter().map(|info| Expiry {
            kind: CertKind::Root,
            identity: info.common_name.clone(),
            seconds_left: info.seconds_left(now),
        }));
        out
    }
}

/// Connects to the central signer, retrying with backoff until it answers: a node tunnel
/// or waypoint without certificates has nothing to serve, and the signer may start after
/// it.
pub async fn connect_signer(
    config: &crate::signer::client::SignerConfig,
    ttl: Duration,
    events: Arc<dyn CertEvents>,
) -> Certificates {
    let mut backoff = MIN_BACKOFF;
    loop {
        match Certificates::load_remote(config, ttl, events.clone()).await {
            Ok(certs) => return certs,
            Err(e) => {
                warn!(signer = %config.url, error = %e, retry_in = ?backoff,
                    "cannot reach the certificate signer; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The local CA could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The issuer's files.
    #[error("loading the local CA (create one with `ztunnel ca init`): {0}")]
    Ca(#[from] CaError),
    /// The trust bundle.
    #[error("loading the trust bundle: {0}")]
    Bundle(#[from] tls::TlsError),
}

/// Polls the CA directory and puts changed files in force (see the module docs). Runs
/// until the task is dropped.
pub async fn watch_ca(paths: CaPaths, certs: Certificates, events: Arc<dyn CertEvents>) {
    let Some(local_issuer) = certs.issuer.clone() else {
        // Certificates come from the central signer, which watches its own files.
        return;
    };
    let mut last_bundle = std::fs::read(paths.bundle()).ok();
    let mut last_issuer = read_issuer(&paths);
    let mut tick = tokio::time::interval(CA_POLL_INTERVAL);
    loop {
        tick.tick().await;
        let bundle = std::fs::read(paths.bundle()).ok();
        if bundle.is_some() && bundle != last_bundle {
            last_bundle = bundle.clone();
            match bundle.map(|pem| parse_bundle(&paths.bundle(), &pem)) {
                Some(Ok(b)) => {
                    let roots: Vec<String> = b
                        .roots()
                        .iter()
                        .filter_map(|r| CertInfo::parse(r).ok().map(|i| i.common_name))
                        .collect();
                    certs.bundle.replace(b);
                    events.ca_reload(CaFile::Bundle, true);
                    info!(path = %paths.bundle().display(), roots = roots.len(), names = ?roots,
                        "trust bundle reloaded");
                    // An issuer refused because the old bundle did not trust it may be
                    // trusted now.
                    last_issuer = None;
                }
                Some(Err(e)) => {
                    events.ca_reload(CaFile::Bundle, false);
                    error!(error = %e, "invalid trust bundle refused; keeping the last good one");
                }
                None => {}
            }
        }
        let issuer = read_issuer(&paths);
        if issuer.is_none() || issuer == last_issuer {
            continue;
        }
        let loaded = match LocalCa::load(&paths) {
            Err(CaError::BadFile { .. }) => {
                // Perhaps caught between the key's rename and the certificate's.
                tokio::time::sleep(TORN_ISSUER_RETRY).await;
                last_issuer = read_issuer(&paths);
                LocalCa::load(&paths)
            }
            other => {
                last_issuer = issuer;
                other
            }
        };
        let ca = match loaded {
            Ok(ca) => ca,
            Err(e) => {
                events.ca_reload(CaFile::Issuer, false);
                error!(error = %e, "invalid issuer refused; keeping the current issuer");
                continue;
            }
        };
        if ca.issuer_cert() == local_issuer.current().issuer_cert() {
            continue;
        }
        if let Err(e) = trusted_by(&ca, &certs.bundle.current()) {
            events.ca_reload(CaFile::Issuer, false);
            error!(error = %e, bundle = %paths.bundle().display(),
                "new issuer refused: the trust bundle does not trust it (add its root first); keeping the current issuer");
            continue;
        }
        let info = CertInfo::parse(ca.issuer_cert()).ok();
        local_issuer.replace(ca);
        events.ca_reload(CaFile::Issuer, true);
        info!(issuer = %info.as_ref().map(|i| i.common_name.as_str()).unwrap_or_default(),
            serial = %info.as_ref().map(|i| i.serial.as_str()).unwrap_or_default(),
            "issuer changed; renewing every workload certificate");
        certs.certs.renew_all();
    }
}

fn read_issuer(paths: &CaPaths) -> Option<(Vec<u8>, Vec<u8>)> {
    let cert = std::fs::read(paths.issuer_cert()).ok()?;
    let key = std::fs::read(paths.issuer_key()).ok()?;
    Some((cert, key))
}

fn parse_bundle(path: &Path, pem: &[u8]) -> Result<TrustBundle, tls::TlsError> {
    TrustBundle::from_certs(path, tls::parse_certs(path, pem)?)
}

/// Proves that `bundle` trusts what `ca` signs, by verifying a throwaway certificate.
fn trusted_by(ca: &LocalCa, bundle: &TrustBundle) -> Result<(), String> {
    let probe: Identity = "spiffe://probe.invalid/ns/probe/sa/probe"
        .parse()
        .map_err(|e| format!("probe identity: {e}"))?;
    let issued = ca
        .issue(&probe, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    tls::verify_chain(bundle, &issued.chain, tls::KeyUsage::client_auth())
        .map_err(|e| e.to_string())
}

/// Logs a warning, at most once per certificate per interval, for any leaf with less than
/// 20 % of its lifetime left (its renewal is failing) and any issuer or root with less
/// than 30 days left. Runs until the task is dropped.
pub async fn warn_expiring(certs: Certificates) {
    let mut warned: HashMap<(CertKind, String), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let now = OffsetDateTime::now_utc();
        let mut due = Vec::new();
        // Against the configured lifetime (not_before is back-dated for clock skew), or the
        // leaf's own when the signer capped it shorter.
        for (id, info, _) in certs.leaves() {
            let lifetime = (info.not_after - info.not_before).as_seconds_f64();
            let ttl = certs.certs.ttl.as_secs_f64().min(lifetime);
            let left = info.seconds_left(now);
            if (left as f64) < ttl * LEAF_WARN_FRACTION {
                due.push((CertKind::Leaf, id.to_string(), info));
            }
        }
        let ca_certs = certs
            .issuer_info()
            .map(|i| (CertKind::Issuer, i))
            .into_iter()
            .chain(certs.roots().into_iter().map(|r| (CertKind::Root, r)));
        for (kind, info) in ca_certs {
            if info.seconds_left(now) < CA_WARN_BEFORE.as_secs() as i64 {
                due.push((kind, info.common_name.clone(), info));
            }
        }
        let current: Vec<(CertKind, String)> =
            due.iter().map(|(k, n, _)| (*k, n.clone())).collect();
        warned.retain(|key, _| current.contains(key));
        for (kind, name, info) in due {
            let every = match kind {
                CertKind::Leaf => LEAF_WARN_EVERY,
                _ => CA_WARN_EVERY,
            };
            let key = (kind, name.clone());
            if warned.get(&key).is_some_and(|at| at.elapsed() < every) {
                continue;
            }
            warned.insert(key, Instant::now());
            let left = info.seconds_left(now);
            let not_after = info.not_after;
            match kind {
                CertKind::Leaf => {
                    warn!(kind = kind.as_str(), identity = %name, seconds_left = left, %not_after,
                    "workload certificate close to expiry: its renewal is failing")
                }
                _ => {
                    warn!(kind = kind.as_str(), identity = %name, seconds_left = left, days_left = left / 86_400,
                    %not_after, "CA certificate close to expiry: rotate it (see `ztunnel ca add-root`)")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<(RenewReason, bool)>>);

    impl CertEvents for Recorded {
        fn renewal(&self, reason: RenewReason, ok: bool) {
            self.0.lock().push((reason, ok));
        }
        fn ca_reload(&self, _file: CaFile, _ok: bool) {}
    }

    #[tokio::test]
    async fn issues_once_and_renews_at_half_life() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = crate::ca::init(dir.path(), "cluster.local", false).expect("CA");
        let events = Arc::new(Recorded::default());
        // Certificates are back-dated for clock skew, so a short TTL still renews at
        // half of what is left at issuance.
        let certs = Certificates::load_local(&paths, Duration::from_secs(4), events.clone())
            .expect("loads");
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/waypoint"
            .parse()
            .expect("identity");
        let a = certs.certs.get(&id).await.expect("issued");
        let b = certs.certs.get(&id).await.expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.generation(), 1);
        tokio::time::timeout(Duration::from_secs(10), async {
            while a.generation() < 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("renewed within the lifetime");
        assert_eq!(
            events.0.lock().first(),
            Some(&(RenewReason::HalfLife, true))
        );
        let kinds: Vec<CertKind> = certs.expiries().iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&CertKind::Leaf) && kinds.contains(&CertKind::Root));

        certs.certs.renew_all();
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.generation() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("renewed on issuer change");
    }
}
