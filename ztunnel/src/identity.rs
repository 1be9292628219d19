//! Workload certificates for the pods on this node: issued on demand, renewed at half-life.
//!
//! Renewal is make-before-break: the new certificate is installed in the identity's
//! [`CertSlot`] only once issued, new handshakes pick it up, and established connections
//! keep the session they negotiated. Each renewal bumps a generation that the HBONE pool
//! keys on, so new streams move to connections with the new certificate. A failed renewal
//! backs off and keeps the valid certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambit_shared::ca::LocalCa;
use ambit_shared::identity::Identity;
use ambit_shared::tls::{CertSlot, WorkloadCert};
use parking_lot::Mutex;
use tracing::{info, warn};

/// Shortest wait between renewal attempts after a failure.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between renewal attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
    pub fn new(source: Arc<dyn CertificateSource>, ttl: Duration) -> Self {
        CertManager {
            source,
            ttl,
            certs: Arc::default(),
        }
    }

    /// The certificate for `identity`, issuing it (and starting its renewal) on first use.
    pub fn get(&self, identity: &Identity) -> Result<Arc<IdentityCert>, IdentityError> {
        if let Some(c) = self.certs.lock().get(identity) {
            return Ok(c.clone());
        }
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
        ));
        Ok(entry)
    }

    /// Stops managing identities no longer used by any local workload.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        self.certs.lock().retain(|id, _| keep(id));
    }
}

async fn renew(manager: CertManager, identity: Identity, entry: std::sync::Weak<IdentityCert>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(current) = entry.upgrade() else {
            return;
        };
        let cert = current.slot.current();
        let lifetime = (cert.not_after - cert.not_before).whole_seconds().max(0) as u64;
        let left = cert.seconds_left().max(0) as u64;
        // Renew at half-life: sleep until half the lifetime is left.
        let wait = Duration::from_secs(left.saturating_sub(lifetime / 2));
        drop(current);
        tokio::time::sleep(wait).await;
        loop {
            let Some(current) = entry.upgrade() else {
                return;
            };
            match manager.source.issue(&identity, manager.ttl) {
                Ok(new) => {
                    info!(identity = %identity, not_after = %new.not_after, "renewed workload certificate");
                    current.slot.replace(new);
                    current.generation.fetch_add(1, Ordering::AcqRel);
                    backoff = MIN_BACKOFF;
                    break;
                }
                Err(e) => {
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
