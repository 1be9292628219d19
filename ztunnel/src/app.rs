//! Wiring: config → identity → capture → proxy, plus metrics and the admin endpoints. The
//! only module that knows them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_ebpf::{Capture, CaptureConfig};
use ambit_shared::admission::{self, Admission};
use ambit_shared::ca::CaPaths;
use ambit_shared::certs::{self, Certificates};
use ambit_shared::config::index::{self, Snapshot};
use ambit_shared::config::source::{self, Source};
use ambit_shared::hbone::{Pool, PoolConfig, server};
use ambit_shared::logging::FilterHandle;
use ambit_shared::signer::client::SignerConfig;
use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::admin::{self, Readiness};
use crate::capture::netns::NetnsSearch;
use crate::dns::{DnsProxy, DnsSettings};
use crate::enroll::Enroller;
use crate::metrics::{self, CaptureMetrics, CertMetrics, ConfigReloads, Traffic};
use crate::proxy::{Gates, ProxyContext};

/// How often pods whose namespace was not found yet are looked for again.
const PENDING_RETRY: Duration = Duration::from_secs(1);
/// How often running pods' namespaces are checked for replacement.
const NETNS_CHECK: Duration = Duration::from_secs(5);

/// Settings of `ztunnel run`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the config comes from.
    pub source: Source,
    /// This node's name; only its workloads are served.
    pub node: String,
    /// Local CA directory (file/dev mode); unused with a central signer.
    pub ca_dir: PathBuf,
    /// The central signer; certificates come from the local CA when `None`.
    pub signer: Option<SignerConfig>,
    /// cgroup v2 directory the connect programs attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for this node's pins.
    pub bpffs: PathBuf,
    /// Where pod network namespaces are looked for.
    pub netns: NetnsSearch,
    /// Workload certificate lifetime.
    pub cert_ttl: Duration,
    /// HBONE pool tuning.
    pub pool: PoolConfig,
    /// DNS proxy settings.
    pub dns: DnsSettings,
    /// Prometheus metrics listener (in the node's network namespace).
    pub metrics_addr: SocketAddr,
    /// Readiness listener.
    pub readiness_addr: SocketAddr,
    /// Admin listener; keep it on loopback.
    pub admin_addr: SocketAddr,
    /// Unix socket of the CNI hook (`ztunnel cni`); `None`: no hook.
    pub cni_socket: Option<PathBuf>,
    /// Admission control for every listener.
    pub admission: admission::Limits,
    /// Connections one source address may hold on each kind of per-pod listener; `None`:
    /// an eighth of the descriptors accepted connections may use.
    pub max_connections_per_source: Option<usize>,
    /// Time bounds of inbound HBONE connections.
    pub hbone: server::Timeouts,
}

/// Runs the node tunnel until SIGTERM or SIGINT. `log` changes the log filter at run time
/// (admin `/logging`).
pub async fn run(settings: Settings, log: FilterHandle) -> anyhow::Result<()> {
    // Memory a flood of connections took comes back once they are gone.
    ambit_shared::memory::spawn_trim(ambit_shared::memory::DEFAULT_TRIM_PERIOD);
    let mut registry = Registry::default();
    // Read after main raised the open-files limit: the reserve is a share of it.
    let admission = Admission::new(settings.admission, &mut registry)?;
    let per_source = settings
        .max_connections_per_source
        .unwrap_or(usize::try_from(admission.fds().accept_below() / 8).unwrap_or(usize::MAX));
    let istio = registry.sub_registry_with_prefix("istio");
    let traffic = Traffic::new(istio);
    metrics::register_build(istio);
    let ambit = registry.sub_registry_with_prefix("ambit");
    let reloads = ConfigReloads::new(ambit);
    let cert_metrics = CertMetrics::new(ambit);
    let capture_metrics = CaptureMetrics::new(ambit);

    let (mut rx, config_task) =
        source::start(&settings.source, move |outcome| reloads.record(outcome)).await?;
    let trust_domain = rx.borrow().trust_domain.clone();
    let ca_paths = CaPaths::new(&settings.ca_dir);
    let certificates = match &settings.signer {
        None => {
            Certificates::load_local(&ca_paths, settings.cert_ttl, Arc::new(cert_metrics.clone()))?
        }
        Some(signer) => {
            certs::connect_signer(signer, settings.cert_ttl, Arc::new(cert_metrics.clone())).await
        }
    };
    let certs = certificates.certs.clone();
    let bundle = certificates.bundle.clone();
    metrics::register_expiry(ambit, Arc::new(certificates.clone()));
    let listeners = admin::Listeners::bind(
        settings.metrics_addr,
        settings.readiness_addr,
        settings.admin_addr,
    )?;

    let capture = Capture::load_or_adopt(&CaptureConfig {
        pin_dir: settings.bpffs.clone(),
        cgroup: settings.cgroup.clone(),
    })
    .context("loading eBPF capture programs")?;
    let (snapshot_tx, snapshot) =
        tokio::sync::watch::channel(Arc::new(Snapshot::new(rx.borrow().clone())));
    tokio::spawn(index::index(rx.clone(), snapshot_tx));
    let ctx = Arc::new(ProxyContext {
        snapshot,
        balancer: Default::default(),
        pool: Pool::new(settings.pool.clone()),
        bundle,
        trust_domain,
        metrics: traffic.clone(),
        gates: Gates::new(&admission, Some(per_source)),
        admission: admission.clone(),
        hbone_timeouts: settings.hbone,
    });
    let ready = Readiness::default();
    admin::spawn(
        admin::State {
            node: settings.node.clone(),
            registry,
            traffic,
            ready: ready.clone(),
            config: rx.clone(),
            certs: certificates.clone(),
            log,
        },
        listeners,
        admission,
    )?;
    tokio::spawn(certs::watch_ca(
        ca_paths,
        certificates.clone(),
        Arc::new(cert_metrics),
    ));
    tokio::spawn(certs::warn_expiring(certificates));
    let dns = DnsProxy::new(&settings.dns, rx.clone()).context("setting up the DNS proxy")?;
    let mut enroller = Enroller::new(
        settings.node.clone(),
        settings.netns.clone(),
        capture,
        certs,
        ctx,
        Arc::new(dns),
        capture_metrics,
    );

    tokio::spawn(config_task);
    // Bound before the first reconcile: an ADD that arrives early waits in the queue.
    let mut cni_rx = match &settings.cni_socket {
        Some(path) => {
            let listener = crate::cni::server::bind(path)?;
            info!(socket = %path.display(), "serving the CNI hook");
            Some(crate::cni::server::spawn(listener))
        }
        None => None,
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let config = rx.borrow_and_update().clone();
    let mut outcome = enroller.reconcile(&config).await;
    ready.mark_ready();
    info!(node = %settings.node, pending = outcome.pending, "ztunnel ready");
    let mut netns_check = tokio::time::interval(NETNS_CHECK);
    netns_check.tick().await;
    loop {
        let retry = outcome.pending > 0 || outcome.held > 0;
        tokio::select! {
            Some((req, reply)) = async { cni_rx.as_mut()?.recv().await }, if cni_rx.is_some() => {
                let config = rx.borrow().clone();
                let _ = reply.send(enroller.cni(&req, &config));
                continue;
            }
            _ = netns_check.tick() => enroller.drop_replaced_pods().await,
            changed = rx.changed() => {
                if changed.is_err() { break; }
            }
            _ = tokio::time::sleep(PENDING_RETRY), if retry => {}
            _ = term.recv() => { info!("SIGTERM: exiting; capture stays pinned and fails closed until restart"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; capture stays pinned and fails closed until restart"); break; }
        }
        let config = rx.borrow_and_update().clone();
        outcome = enroller.reconcile(&config).await;
    }
    Ok(())
}
