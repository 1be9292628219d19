//! Certificates for the pods on this node: issued on demand, renewed at half-life, renewed
//! at once when the CA switches issuer; and the CA's files, re-read when they change.
//!
//! Renewal is make-before-break: the new certificate is installed in the identity's
//! [`CertSlot`] only once issued, new handshakes pick it up, and established connections
//! keep the session they negotiated. Each renewal bumps a generation that the HBONE pool
//! keys on, so new streams move to connections with the new certificate. A failed renewal
//! backs off and keeps the valid certificate.
//!
//! [`watch_ca`] polls the local CA directory. A changed `bundle.pem` is put in force for
//! every later handshake through the [`SharedBundle`]; a changed issuer is put in force and
//! every workload certificate is renewed from it. Either is refused, keeping the last good
//! one, if it does not load, and a new issuer is refused unless the bundle trusts it.
//! [`warn_expiring`] logs, rate-limited, any certificate close to expiry.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambit_shared::ca::{CaError, CaPaths, LocalCa};
use ambit_shared::identity::Identity;
use ambit_shared::tls::{self, CertInfo, CertSlot, SharedBundle, TrustBundle, WorkloadCert};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::{CertKind, CertMetrics, Expiry, ExpirySource, RenewReason};

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
pub enum IdentityError {
    /// The CA refused or failed.
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        /// For whom.
        identity: Identity,
        /// Why.
        #[source]
        source: ambit_shared::ca::CaError,
    },
    /// The issued certificate could not be loaded into rustls.
    #[error("loading the certificate for {identity}: {source}")]
    Load {
        /// For whom.
        identity: Identity,
        /// Why.
        #[source]
        source: ambit_shared::tls::TlsError,
    },
}

/// Anything that signs workload certificates (the local CA now; a central signer later).
pub trait CertificateSource: Send + Sync + 'static {
    /// Issues a certificate for `identity` valid for `ttl`.
    fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, IdentityError>;
}

impl CertificateSource for LocalCa {
    fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let issued =
            LocalCa::issue(self, identity, ttl).map_err(|source| IdentityError::Issue {
                identity: identity.clone(),
                source,
            })?;
        WorkloadCert::from_issued(issued).map_err(|source| IdentityError::Load {
            identity: identity.clone(),
            source,
        })
    }
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
    fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let ca: &LocalCa = &self.0.load();
        CertificateSource::issue(ca, identity, ttl)
    }
}

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

/// Certificates of every identity served on this node.
#[derive(Clone)]
pub struct CertManager {
    source: Arc<dyn CertificateSource>,
    ttl: Duration,
    certs: Arc<Mutex<HashMap<Identity, Arc<IdentityCert>>>>,
    /// Bumped when the issuer changes; every renewal task wakes and renews.
    issuer_epoch: Arc<watch::Sender<u64>>,
    metrics: CertMetrics,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager issuing certificates valid for `ttl`.
    pub fn new(source: Arc<dyn CertificateSource>, ttl: Duration, metrics: CertMetrics) -> Self {
        CertManager {
            source,
            ttl,
            certs: Arc::default(),
            issuer_epoch: Arc::new(watch::Sender::new(0)),
            metrics,
        }
    }

    /// The certificate for `identity`, issuing it (and starting its renewal) on first use.
    pub fn get(&self, identity: &Identity) -> Result<Arc<IdentityCert>, IdentityError> {
        if let Some(c) = self.certs.lock().get(identity) {
            return Ok(c.clone());
        }
        // Subscribed before issuing: an issuer change from here on renews this certificate.
        let epoch = self.issuer_epoch.subscribe();
        let cert = self.source.issue(identity, self.ttl)?;
        info!(identity = %identity, not_after = %cert.not_after, "issued workload certificate");
        let entry = Arc::new(IdentityCert {
            slot: Arc::new(CertSlot::new(cert)),
            generation: AtomicU64::new(1),
        });
        let entry = self
            .certs
            .lock()
            .entry(identity.clone())
            .or_insert(entry)
            .clone();
        tokio::spawn(renew(
            self.clone(),
            identity.clone(),
            Arc::downgrade(&entry),
            epoch,
        ));
        Ok(entry)
    }

    /// Stops managing identities no longer used by any local workload.
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
            match manager.source.issue(&identity, manager.ttl) {
                Ok(new) => {
                    info!(identity = %identity, not_after = %new.not_after, reason = reason.as_str(),
                        "renewed workload certificate");
                    current.slot.replace(new);
                    current.generation.fetch_add(1, Ordering::AcqRel);
                    manager.metrics.renewal(reason, true);
                    backoff = MIN_BACKOFF;
                    break;
                }
                Err(e) => {
                    manager.metrics.renewal(reason, false);
                    warn!(identity = %identity, error = %e, retry_in = ?backoff, seconds_left = current.slot.current().seconds_left(),
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

/// Everything this node trusts and presents: its workload certificates, the issuer that
/// signs them and the trust bundle. What the admin dump and the expiry metrics read.
#[derive(Debug, Clone)]
pub struct Certificates {
    /// Workload certificates.
    pub certs: CertManager,
    /// The issuer in force.
    pub issuer: Arc<LocalIssuer>,
    /// The trust bundle in force.
    pub bundle: SharedBundle,
}

impl Certificates {
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

    /// Details of the issuer in force.
    pub fn issuer_info(&self) -> Option<CertInfo> {
        CertInfo::parse(self.issuer.current().issuer_cert()).ok()
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
}

impl ExpirySource for Certificates {
    fn expiries(&self) -> Vec<Expiry> {
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

/// Polls the CA directory and puts changed files in force (see the module docs). Runs
/// until the task is dropped.
pub async fn watch_ca(paths: CaPaths, certs: Certificates, metrics: CertMetrics) {
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
                    metrics.ca_reload("bundle", true);
                    info!(path = %paths.bundle().display(), roots = roots.len(), names = ?roots,
                        "trust bundle reloaded");
                    // An issuer refused because the old bundle did not trust it may be
                    // trusted now.
                    last_issuer = None;
                }
                Some(Err(e)) => {
                    metrics.ca_reload("bundle", false);
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
                metrics.ca_reload("issuer", false);
                error!(error = %e, "invalid issuer refused; keeping the current issuer");
                continue;
            }
        };
        if ca.issuer_cert() == certs.issuer.current().issuer_cert() {
            continue;
        }
        if let Err(e) = trusted_by(&ca, &certs.bundle.current()) {
            metrics.ca_reload("issuer", false);
            error!(error = %e, bundle = %paths.bundle().display(),
                "new issuer refused: the trust bundle does not trust it (add its root first); keeping the current issuer");
            continue;
        }
        let info = CertInfo::parse(ca.issuer_cert()).ok();
        certs.issuer.replace(ca);
        metrics.ca_reload("issuer", true);
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
        // Against the configured lifetime: not_before is back-dated for clock skew.
        let ttl = certs.certs.ttl.as_secs_f64();
        for (id, info, _) in certs.leaves() {
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
