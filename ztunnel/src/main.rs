//! `ztunnel`: Ambit's node tunnel.

use std::path::PathBuf;
use std::time::Duration;

use ambit_shared::ca::{self, CaPaths, LocalCa};
use ambit_shared::hbone::PoolConfig;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod app;
mod capture;
mod enroll;
mod identity;
mod proxy;
mod state;

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel",
    version,
    about = "Ambit node tunnel: eBPF capture, HBONE mTLS, L4 proxy"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "AMBIT_LOG_FORMAT")]
    log_format: LogFormat,
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
    /// Run the node tunnel.
    // The last occurrence of a flag wins, as wrappers that append overrides expect.
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Manage the local CA used in file/dev mode.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Mesh config file (YAML); re-read when it changes.
    #[arg(long)]
    config: PathBuf,
    /// Name of this node; only workloads with this `node` are served.
    #[arg(long)]
    node: String,
    /// Local CA directory (from `ztunnel ca init`).
    #[arg(long)]
    ca_dir: PathBuf,
    /// cgroup v2 directory whose processes are captured (kubepods on a real node).
    #[arg(long)]
    cgroup: PathBuf,
    /// bpffs directory where this node's maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpffs: PathBuf,
    /// Directory of named network namespaces to search for pods (besides /proc).
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// Workload certificate lifetime, e.g. 24h, 90m.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Close pooled HBONE connections idle for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Streams per pooled HBONE connection.
    #[arg(long, default_value_t = 100)]
    pool_max_streams: usize,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a root and an issuer.
    Init {
        /// Directory to write root.pem, root.key, issuer.pem, issuer.key, bundle.pem.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate (for VMs and tests): writes cert.pem and key.pem.
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE identity, e.g. spiffe://cluster.local/ns/shop/sa/web.
        #[arg(long)]
        identity: ambit_shared::identity::Identity,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            trust_domain,
            force,
        }) => {
            ambit_shared::identity::validate_component("trust domain", &trust_domain)?;
            let paths = ca::init(&dir, &trust_domain, force)?;
            println!(
                "created CA for trust domain {trust_domain} in {}",
                paths.dir.display()
            );
            Ok(())
        }
        Command::Ca(CaCommand::Issue {
            dir,
            identity,
            out,
            ttl,
        }) => {
            let ca = LocalCa::load(&CaPaths::new(&dir))?;
            let issued = ca.issue(&identity, ttl)?;
            ca::write_issued(&out, &issued)?;
            println!(
                "issued {identity} until {} into {}",
                issued.not_after,
                out.display()
            );
            Ok(())
        }
        Command::Run(args) => {
            let settings = app::Settings {
                config: args.config,
                node: args.node,
                ca_dir: args.ca_dir,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                netns_dir: args.netns_dir,
                cert_ttl: args.cert_ttl,
                pool: PoolConfig {
                    max_streams_per_conn: args.pool_max_streams.max(1),
                    idle_timeout: args.pool_idle_timeout,
                    ..PoolConfig::default()
                },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ztunnel")
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(app::run(settings))
        }
    }
}
