//! Wiring: config → identity → routes → listener and upstream, plus metrics, readiness and
//! the drain on shutdown. The only module that knows them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_shared::admission::{self, Admission, ListenerLimits};
use ambit_shared::ca::CaPaths;
use ambit_shared::certs::{self, Certificates};
use ambit_shared::config::index::{self, Snapshot};
use ambit_shared::config::source::{self, Source};
use ambit_shared::drain;
use ambit_shared::hbone::{Pool, PoolConfig};
use ambit_shared::identity::Identity;
use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::admin::{self, Readiness};
#[cfg(feature = "bench-plaintext")]
use crate::listener::plaintext::{self, PlaintextListen};
use crate::listener::{self, Context, ListenerConfig, Waypoint};
use crate::metrics::Metrics;
use crate::overload::{Overload, OverloadConfig};
use crate::route::{GatewayRoutes, RouteTable};
use crate::upstream::{Upstream, UpstreamConfig};

/// Settings of `waypoint run`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the mesh config comes from.
    pub source: Source,
    /// This waypoint's name (what `ambit.dev/use-waypoint` labels name).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its service account, which its identity is derived from. `None`: the
    /// `serviceAccount` of its entry under `waypoints` in the config, else its name.
    pub service_account: Option<String>,
    /// Local CA directory (file/dev mode); unused with a central signer.
    pub ca_dir: PathBuf,
    /// The central signer; the certificate comes from the local CA when `None`.
    pub signer: Option<ambit_shared::signer::client::SignerConfig>,
    /// Certificate lifetime.
    pub cert_ttl: Duration,
    /// HBONE listener.
    pub listen: SocketAddr,
    /// Prometheus metrics listener.
    pub metrics_addr: SocketAddr,
    /// Readiness listener.
    pub readiness_addr: SocketAddr,
    /// How long open connections may take to finish on shutdown.
    pub drain_grace: Duration,
    /// Pool of HBONE connections to endpoints.
    pub pool: PoolConfig,
    /// Upstream tuning.
    pub upstream: UpstreamConfig,
    /// Listener tuning.
    pub listener: ListenerConfig,
    /// Admission control of every listener.
    pub admission: admission::Limits,
    /// Caps on HBONE streams and requests in flight.
    pub overload: OverloadConfig,
    /// Label sets per metric family before records are folded.
    pub max_metric_series: usize,
}

/// The route table for a config version: its Gateway API routes (services without routes
/// get the default route to themselves).
fn routes_for(snapshot: &Snapshot) -> Arc<dyn RouteTable> {
    Arc::new(GatewayRoutes::new(&snapshot.config))
}

/// Keeps a route-table channel in step with the snapshot channel.
fn spawn_routes(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
) -> tokio::sync::watch::Receiver<Arc<dyn RouteTable>> {
    let first = routes_for(&snapshots.borrow_and_update());
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        while snapshots.changed().await.is_ok() {
            let table = routes_for(&snapshots.borrow_and_update());
            tx.send_replace(table);
        }
    });
    rx
}

/// Listen backlog of the HBONE listener.
const HBONE_BACKLOG: i32 = 1024;

/// A started waypoint: where it listens, and the handle that drains it.
#[derive(Debug)]
pub struct Running {
    /// The HBONE listener's address.
    pub hbone_addr: SocketAddr,
    /// The metrics listener's address.
    pub metrics_addr: SocketAddr,
    /// The readiness listener's address.
    pub readiness_addr: SocketAddr,
    ready: Readiness,
    trigger: drain::DrainTrigger,
    grace: Duration,
}

impl Running {
    /// Stops accepting, reports not-ready, and waits (up to the grace period) for open
    /// connections to finish. Returns true if they all did.
    pub async fn shutdown(self) -> bool {
        self.ready.mark_draining();
        self.trigger.drain(self.grace).await
    }
}

/// Starts the waypoint on the current runtime: loads the config and the CA, issues the
/// waypoint's certificate, binds every listener (port 0 picks a free one) and starts
/// serving.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    start_inner(settings, Extra::default()).await
}

/// [`start`], plus the benchmarks' plaintext listeners (feature `bench-plaintext`).
#[cfg(feature = "bench-plaintext")]
pub async fn start_with(
    settings: Settings,
    plaintext: Vec<PlaintextListen>,
) -> anyhow::Result<Running> {
    start_inner(settings, Extra { plaintext }).await
}

/// What only some builds start.
#[derive(Debug, Default)]
struct Extra {
    /// The benchmarks' plaintext listeners.
    #[cfg(feature = "bench-plaintext")]
    plaintext: Vec<PlaintextListen>,
}

async fn start_inner(settings: Settings, extra: Extra) -> anyhow::Result<Running> {
    // Memory a burst of connections or requests took comes back once they are gone.
    ambit_shared::memory::spawn_trim(ambit_shared::memory::DEFAULT_TRIM_PERIOD);
    let mut registry = Registry::default();
    let metrics = Metrics::with_max_series(&mut registry, settings.max_metric_series);
    let overload = Overload::new(settings.overload, &mut registry);
    // Read after main raised the open-files limit: the reserve is a share of it.
    let admission = Admission::new(settings.admission, &mut registry)?;

    let reload_metrics = metrics.clone();
    let (config, config_task) =
        source::start(&settings.source, move |o| reload_metrics.config_reload(o)).await?;
    let trust_domain = config.borrow().trust_domain.clone();
    let service_account = settings.service_account.clone().unwrap_or_else(|| {
        config
            .borrow()
            .waypoint(&settings.namespace, &settings.name)
            .map(|w| w.service_account().to_string())
            .unwrap_or_else(|| settings.name.clone())
    });
    let identity = Identity::new(&trust_domain, &settings.namespace, &service_account)
        .context("deriving the waypoint's identity")?;
    if config.borrow().namespace(&settings.namespace).is_none() {
        warn!(namespace = %settings.namespace, "the waypoint's namespace is not declared in the config");
    }

    let ca_paths = CaPaths::new(&settings.ca_dir);
    let certificates = match &settings.signer {
        None => Certificates::load_local(&ca_paths, settings.cert_ttl, metrics.clone())?,
        Some(signer) => certs::connect_signer(signer, settings.cert_ttl, metrics.clone()).await,
    };
    let cert = certificates
        .certs
        .get(&identity)
        .await
        .context("issuing the waypoint's certificate")?;
    Metrics::register_expiry(&mut registry, certificates.clone());
    tokio::spawn(certs::watch_ca(
        ca_paths,
        certificates.clone(),
        metrics.clone(),
    ));
    tokio::spawn(certs::warn_expiring(certificates.clone()));

    let snapshot = index::spawn_index(config.clone());
    let routes = spawn_routes(snapshot.clone());
    tokio::spawn(config_task);
    tokio::spawn(warn_on_trust_domain_change(
        config.clone(),
        trust_domain.clone(),
    ));

    let admin_listeners = admin::Listeners::bind(settings.metrics_addr, settings.readiness_addr)?;
    let (metrics_addr, readiness_addr) = admin_listeners.local_addrs()?;
    let hbone = ambit_shared::listen::bind_tcp(settings.listen, HBONE_BACKLOG)
        .and_then(TcpListener::from_std)
        .with_context(|| format!("binding the HBONE listener on {}", settings.listen))?;
    let hbone_addr = hbone
        .local_addr()
        .context("reading the HBONE listener's address")?;
    let acceptor = listener::acceptor(cert.slot.clone(), &certificates.bundle, &trust_domain)
        .context("building the TLS server configuration")?;
    let upstream = Upstream::new(
        UpstreamConfig {
            fds: admission.fds(),
            ..settings.upstream.clone()
        },
        Pool::new(settings.pool.clone()),
        identity.clone(),
        cert,
        certificates.bundle.clone(),
        &settings.name,
    );
    upstream.destinations.metrics.register(&mut registry);
    let destinations = upstream.destinations.clone();
    let ctx = Arc::new(Context {
        waypoint: Waypoint {
            name: settings.name.clone(),
            namespace: settings.namespace.clone(),
            identity: identity.clone(),
        },
        snapshot,
        routes,
        upstream,
        metrics,
        overload,
        cfg: settings.listener.clone(),
        admission: admission.clone(),
    });
    let ready = Readiness::default();
    admin::spawn_with_outliers(
        registry,
        ready.clone(),
        admin_listeners,
        Some(destinations),
        admission.clone(),
    )?;

    let (trigger, watcher) = drain::channel();
    #[cfg(feature = "bench-plaintext")]
    for p in extra.plaintext {
        let l = plaintext::bind(p)
            .await
            .with_context(|| format!("binding the plaintext listener on {}", p.listen))?;
        let l = admission
            .gate("plaintext", ListenerLimits::default())
            .listener(l);
        tokio::spawn(plaintext::serve(l, p.target, ctx.clone(), watcher.clone()));
    }
    #[cfg(not(feature = "bench-plaintext"))]
    let Extra {} = extra;
    let hbone = admission
        .gate(listener::LISTENER, ListenerLimits::default())
        .listener(hbone);
    tokio::spawn(listener::serve(hbone, acceptor, ctx, watcher));
    ready.mark_ready();
    info!(name = %settings.name, namespace = %settings.namespace, identity = %identity,
        listen = %hbone_addr, "waypoint ready");
    Ok(Running {
        hbone_addr,
        metrics_addr,
        readiness_addr,
        ready,
        trigger,
        grace: settings.drain_grace,
    })
}

/// Runs the waypoint until SIGTERM or SIGINT, then drains.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    serve_until_signal(settings, Extra::default()).await
}

/// [`run`], plus the benchmarks' plaintext listeners (feature `bench-plaintext`).
#[cfg(feature = "bench-plaintext")]
pub async fn run_with(settings: Settings, plaintext: Vec<PlaintextListen>) -> anyhow::Result<()> {
    serve_until_signal(settings, Extra { plaintext }).await
}

async fn serve_until_signal(settings: Settings, extra: Extra) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let grace = settings.drain_grace;
    let running = start_inner(settings, extra).await?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    if running.shutdown().await {
        info!("drained; exiting");
    } else {
        warn!(?grace, "drain grace period over; closing what is left");
    }
    Ok(())
}

/// The waypoint's identity comes from the trust domain at start; a change needs a restart.
async fn warn_on_trust_domain_change(
    mut config: tokio::sync::watch::Receiver<Arc<ambit_shared::config::Config>>,
    at_start: String,
) {
    while config.changed().await.is_ok() {
        let now = config.borrow_and_update().trust_domain.clone();
        if now != at_start {
            warn!(at_start = %at_start, now = %now,
                "trust domain changed; restart the waypoint to take a certificate in the new one");
        }
    }
}
