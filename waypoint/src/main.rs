//! `waypoint`: Ambit's per-namespace L7 proxy.
//!
//! It accepts HBONE on 15008 from source ztunnels, serves the HTTP/1.1, HTTP/2 and gRPC
//! inside with Gateway API routing, retries and per-request load balancing, forwards other
//! TCP at L4, and sends on over HBONE with its own identity. This file only parses the
//! command line; [`ambit_waypoint::app`] does the wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_shared::admission::flags::{AdmissionArgs, HboneServerArgs};
use ambit_shared::config::source::{Source, SourceKind};
use ambit_shared::hbone::PoolConfig;
#[cfg(feature = "bench-plaintext")]
use ambit_waypoint::listener::plaintext::PlaintextListen;
use ambit_waypoint::listener::upgrade::Allowlist;
use ambit_waypoint::overload::{self, OverloadConfig};
use ambit_waypoint::{app, listener, metrics, upstream};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// `--version`: says when the build has the benchmarks' plaintext listener, which trusts
/// source addresses and must never ship (`tests/bench/run.sh` checks for it).
const LONG_VERSION: &str = if cfg!(feature = "bench-plaintext") {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (features: bench-plaintext; benchmarks only)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser, Debug)]
#[command(
    name = "waypoint",
    version,
    long_version = LONG_VERSION,
    about = "Ambit waypoint: per-namespace L7 proxy (HBONE in and out, HTTP routing, retries)"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "AMBIT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Parse and check the arguments, then exit 0 without doing anything (the manifest
    /// tests run every container's command line through it).
    #[arg(long, global = true, hide = true)]
    check_args: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the waypoint.
    // The last occurrence of a flag wins, as wrappers that append overrides expect.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Mesh config file (YAML, the same as ztunnel's); re-read when it changes
    /// (`--config-source file`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the mesh config comes from. From Kubernetes, only the waypoint's own
    /// namespace is watched.
    #[arg(long, default_value = "file")]
    config_source: SourceKind,
    /// Kubernetes API server URL, e.g. `http://10.0.0.1:8080` (`--config-source
    /// kubernetes`); default: the kubeconfig's, else the in-cluster service account's.
    #[arg(long)]
    kube_url: Option<String>,
    /// SPIFFE trust domain with `--config-source kubernetes` (a config file names its own).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// This waypoint's name, as `ambit.dev/use-waypoint` labels name it.
    #[arg(long)]
    name: String,
    /// The namespace it serves (and runs in).
    #[arg(long)]
    namespace: String,
    /// Its service account (the identity's `sa`). Default: the `serviceAccount` of its
    /// entry under `waypoints` in the config, else the name.
    #[arg(long)]
    service_account: Option<String>,
    /// Local CA directory (from `ztunnel ca init`); not needed with --signer.
    #[arg(long, required_unless_present = "signer")]
    ca_dir: Option<PathBuf>,
    /// Obtain the certificate from the central signer at this URL
    /// (e.g. https://ambit-signer.ambit-system.svc:15012) instead of the local CA.
    #[arg(long)]
    signer: Option<String>,
    /// PEM roots that vouch for the signer's serving certificate (default
    /// `<ca-dir>/bundle.pem`).
    #[arg(long)]
    signer_ca: Option<PathBuf>,
    /// Projected service-account token (audience `ambit-signer`), re-read for each request.
    #[arg(long, default_value = ambit_shared::signer::DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    /// Certificate lifetime, e.g. 24h; renewed at half-life.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// HBONE listener; `[::]` is every address of both families.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// On SIGTERM, how long open connections may take to finish before the waypoint exits
    /// anyway. WebSockets are told to close (1001) at once; HTTP/2 clients get GOAWAY.
    #[arg(long, alias = "drain-grace", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Close an upgraded stream (WebSocket, extended CONNECT) that moves no bytes for this
    /// long, and an HTTP/1.1 keep-alive connection idle this long between requests, e.g.
    /// 1h. Default: never.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Bound on connecting to an endpoint (TCP, TLS and HBONE).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Request body bytes kept so a request can be retried; larger bodies are streamed
    /// and not retried once sent.
    #[arg(long, default_value_t = 64 * 1024)]
    retry_buffer_bytes: usize,
    /// Largest request head (HTTP/1) or header list (HTTP/2), in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per client connection.
    #[arg(long, default_value_t = 1000)]
    max_concurrent_streams: u32,
    /// Wait this long for a client's first bytes before forwarding the tunnel as TCP.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    protocol_detect_timeout: Duration,
    /// Close pooled connections to endpoints idle for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Streams per pooled HBONE connection to an endpoint's node.
    #[arg(long, default_value_t = 100)]
    pool_max_streams: usize,
    /// Upgrade protocols spliced through (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT),
    /// comma-separated. `h2c` is never spliced: its offer is stripped and the request
    /// served as HTTP/1.1. Other protocols get 403.
    #[arg(long, value_delimiter = ',', default_value = "websocket")]
    upgrade_protocols: Vec<String>,
    /// HBONE streams (tunnels) open at once, all clients together; over it, 503.
    #[arg(long, default_value_t = overload::DEFAULT_MAX_HBONE_STREAMS)]
    max_hbone_streams: usize,
    /// HBONE streams open at once per client identity. Default: a quarter of
    /// --max-hbone-streams.
    #[arg(long)]
    max_hbone_streams_per_identity: Option<usize>,
    /// HTTP requests (and upgraded streams) in flight at once, all clients together; over
    /// it, 503 with response flag OM.
    #[arg(long, default_value_t = overload::DEFAULT_MAX_REQUESTS)]
    max_requests: usize,
    /// Requests in flight at once per client identity. Default: a quarter of
    /// --max-requests.
    #[arg(long)]
    max_requests_per_identity: Option<usize>,
    /// Upstream connections per destination service when no TrafficPolicy sets
    /// `connectionPool.maxConnections`; 0 is unlimited.
    #[arg(long, default_value_t = upstream::destination::DEFAULT_MAX_CONNECTIONS)]
    max_connections_per_destination: u32,
    /// Label sets per metric family (Istio's request and TCP metrics); records beyond
    /// are counted in a folded series.
    #[arg(long, default_value_t = metrics::DEFAULT_MAX_SERIES)]
    max_metric_series: usize,
    /// Benchmarks only (repeatable): `LISTEN=VIP:PORT` serves plaintext HTTP on LISTEN as
    /// if tunnelled to the service VIP:PORT, trusting the source address as the identity.
    /// Only in builds with the `bench-plaintext` feature, which release builds leave out.
    #[cfg(feature = "bench-plaintext")]
    #[arg(long, value_name = "LISTEN=TARGET", hide = true)]
    plaintext_listen: Vec<PlaintextListen>,
    /// Close an HTTP/1 connection whose request head is not complete this long after its
    /// first byte (idle keep-alive connections are not affected); 0 never does.
    #[arg(long, default_value_t = humantime::Duration::from(listener::DEFAULT_PARTIAL_HEAD_TIMEOUT))]
    header_read_timeout: humantime::Duration,
    #[command(flatten)]
    admission: AdmissionArgs,
    #[command(flatten)]
    hbone: HboneServerArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let check_only = cli.check_args;
    let Command::Run(args) = cli.command;
    // Everything below up to the settings only reads the arguments: `--check-args` stops
    // once they are built.
    let signer = ambit_shared::signer::client::SignerConfig::from_flags(
        args.signer,
        args.signer_ca.clone(),
        args.ca_dir.as_deref(),
        args.token_file,
    )?;
    #[cfg(feature = "bench-plaintext")]
    let plaintext = args.plaintext_listen.clone();
    let max_hbone_streams = args.max_hbone_streams.max(1);
    let max_requests = args.max_requests.max(1);
    let settings = app::Settings {
        signer,
        service_account: args.service_account,
        source: Source::from_flags(
            args.config_source,
            args.config,
            args.kube_url,
            args.trust_domain,
            Some(args.namespace.clone()),
        )?,
        name: args.name,
        namespace: args.namespace,
        ca_dir: args.ca_dir.unwrap_or_default(),
        cert_ttl: args.cert_ttl,
        listen: args.listen,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
        drain_grace: args.drain_timeout,
        pool: PoolConfig {
            max_streams_per_conn: args.pool_max_streams.max(1),
            idle_timeout: args.pool_idle_timeout,
            connect_timeout: args.connect_timeout,
        },
        upstream: upstream::UpstreamConfig {
            connect_timeout: args.connect_timeout,
            body_cap: args.retry_buffer_bytes,
            clients: upstream::client::ClientConfig {
                idle_timeout: args.pool_idle_timeout,
                max_header_bytes: args.max_header_bytes,
                ..Default::default()
            },
            default_max_connections: Some(args.max_connections_per_destination).filter(|n| *n > 0),
            // Set by the app from the admission control's descriptor budget.
            ..Default::default()
        },
        listener: listener::ListenerConfig {
            detect_timeout: args.protocol_detect_timeout,
            max_header_bytes: args.max_header_bytes,
            max_concurrent_streams: args.max_concurrent_streams.max(1),
            idle_timeout: args.idle_timeout,
            header_read_timeout: args.idle_timeout,
            partial_head_timeout: Some(Duration::from(args.header_read_timeout))
                .filter(|d| !d.is_zero()),
            hbone: args.hbone.timeouts(),
            upgrades: Allowlist::new(&args.upgrade_protocols),
            ..Default::default()
        },
        admission: args.admission.limits(),
        overload: OverloadConfig {
            max_hbone_streams,
            max_hbone_streams_per_identity: args
                .max_hbone_streams_per_identity
                .unwrap_or(max_hbone_streams / overload::PER_IDENTITY_SHARE)
                .max(1),
            max_requests,
            max_requests_per_identity: args
                .max_requests_per_identity
                .unwrap_or(max_requests / overload::PER_IDENTITY_SHARE)
                .max(1),
        },
        max_metric_series: args.max_metric_series.max(1),
    };
    ambit_shared::identity::validate_component("namespace", &settings.namespace)?;
    if check_only {
        println!("waypoint: arguments accepted");
        return Ok(());
    }
    // Logs to stderr, filtered by `RUST_LOG` (default `info`).
    ambit_shared::logging::init(matches!(cli.log_format, LogFormat::Json));
    ambit_shared::rlimit::raise_fd_limit();
    // On one core (a CPU limit of 1, or an affinity of one CPU) the current-thread scheduler
    // serves better than a one-worker multi-thread one: it runs woken tasks in turn, so an
    // HTTP/2 connection's task runs after all the streams that queued frames on it and
    // writes them in one go, where the multi-thread scheduler's LIFO slot runs it right
    // after the first stream and writes once per frame.
    let one_core = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
    let mut builder = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = builder
        .enable_all()
        .thread_name("waypoint")
        .build()
        .context("starting the tokio runtime")?;
    #[cfg(feature = "bench-plaintext")]
    return runtime.block_on(app::run_with(settings, plaintext));
    #[cfg(not(feature = "bench-plaintext"))]
    runtime.block_on(app::run(settings))
}
