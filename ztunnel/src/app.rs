//! Wiring: config → identity → capture → proxy. The only module that knows them all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_ebpf::{Capture, CaptureConfig};
use ambit_shared::ca::{CaPaths, LocalCa};
use ambit_shared::hbone::{Pool, PoolConfig};
use ambit_shared::tls::TrustBundle;
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::enroll::Enroller;
use crate::identity::CertManager;
use crate::proxy::ProxyContext;
use crate::state::{self, Snapshot};

/// How often pods whose namespace was not found yet are looked for again.
const PENDING_RETRY: Duration = Duration::from_secs(1);
/// How often running pods' namespaces are checked for replacement.
const NETNS_CHECK: Duration = Duration::from_secs(5);

/// Settings of `ztunnel run`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Config file.
    pub config: PathBuf,
    /// This node's name; only its workloads are served.
    pub node: String,
    /// Local CA directory (file/dev mode).
    pub ca_dir: PathBuf,
    /// cgroup v2 directory the connect programs attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for this node's pins.
    pub bpffs: PathBuf,
    /// Where named network namespaces live.
    pub netns_dir: PathBuf,
    /// Workload certificate lifetime.
    pub cert_ttl: Duration,
    /// HBONE pool tuning.
    pub pool: PoolConfig,
}

/// Runs the node tunnel until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let tx = state::load_initial(&settings.config)?;
    let mut rx = tx.subscribe();
    let trust_domain = rx.borrow().trust_domain.clone();
    let ca_paths = CaPaths::new(&settings.ca_dir);
    let ca = LocalCa::load(&ca_paths)
        .context("loading the local CA (create one with `ztunnel ca init`)")?;
    let bundle = TrustBundle::load(&ca_paths.bundle()).context("loading the trust bundle")?;
    let certs = CertManager::new(Arc::new(ca), settings.cert_ttl);

    let capture = Capture::load_or_adopt(&CaptureConfig {
        pin_dir: settings.bpffs.clone(),
        cgroup: settings.cgroup.clone(),
    })
    .context("loading eBPF capture programs")?;
    let (snapshot_tx, snapshot) = tokio::sync::watch::channel(Arc::new(Snapshot::new(rx.borrow().clone())));
    tokio::spawn(state::index(rx.clone(), snapshot_tx));
    let ctx = Arc::new(ProxyContext {
        snapshot,
        balancer: Default::default(),
        config: rx.clone(),
        pool: Pool::new(settings.pool.clone()),
        bundle,
        trust_domain,
    });
    let mut enroller = Enroller::new(
        settings.node.clone(),
        settings.netns_dir.clone(),
        capture,
        certs,
        ctx,
    );

    tokio::spawn(state::watch_file(settings.config.clone(), tx));
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let config = rx.borrow_and_update().clone();
    let mut outcome = enroller.reconcile(&config);
    info!(node = %settings.node, pending = outcome.pending, "ztunnel ready");
    let mut netns_check = tokio::time::interval(NETNS_CHECK);
    netns_check.tick().await;
    loop {
        let retry = outcome.pending > 0;
        tokio::select! {
            _ = netns_check.tick() => enroller.drop_replaced_pods(),
            changed = rx.changed() => {
                if changed.is_err() { break; }
            }
            _ = tokio::time::sleep(PENDING_RETRY), if retry => {}
            _ = term.recv() => { info!("SIGTERM: exiting; capture stays pinned and fails closed until restart"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; capture stays pinned and fails closed until restart"); break; }
        }
        let config = rx.borrow_and_update().clone();
        outcome = enroller.reconcile(&config);
    }
    Ok(())
}
