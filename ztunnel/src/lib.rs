//! `ztunnel`: Ambit's node tunnel.
//!
//! Built as a library whose [`main`] the `ztunnel` binary calls, so that the fuzz targets
//! (the `fuzzing` feature, see `fuzz/` at the repository root) reach its parsers; the
//! modules themselves stay private.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_shared::admission::flags::{AdmissionArgs, HboneServerArgs};
use ambit_shared::ca::{self, CaPaths, LocalCa, Validity};
use ambit_shared::config::source::{Source, SourceKind};
use ambit_shared::hbone::PoolConfig;
use ambit_shared::tls::CertInfo;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod admin;
mod app;
mod capture;
mod cni;
mod dns;
mod enroll;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod kubepods;
mod metrics;
mod proxy;
mod signer;

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
    /// Run the node tunnel.
    // The last occurrence of a flag wins, as wrappers that append overrides expect.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Manage the local CA used in file/dev mode.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Chained CNI plugin: holds new pods closed until ztunnel enrolls them. Reads the CNI
    /// environment and the network config on stdin (installed as `ambit-cni`, it runs
    /// without the subcommand).
    Cni,
    /// Install the CNI plugin on this node (DaemonSet init container): copy this binary to
    /// BIN_DIR/ambit-cni and chain it last into the first *.conflist in NET_DIR.
    CniInstall {
        /// The runtime's CNI binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The runtime's CNI config directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        net_dir: PathBuf,
        /// The socket ztunnel serves (`ztunnel run --cni-socket`).
        #[arg(long, default_value = cni::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run the central certificate signer (see the `signer` module docs).
    Signer(Box<SignerArgs>),
}

#[derive(clap::Args, Debug)]
struct SignerArgs {
    /// Listen address (HTTPS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// CA directory (from `ztunnel ca init`): issuer, key and bundle; re-read when it changes.
    /// With --ca-secret the signer writes it (an in-memory emptyDir in the manifests).
    #[arg(long)]
    ca_dir: PathBuf,
    /// Keep the CA in this Secret (`namespace/name`): at start it is read into --ca-dir, or
    /// created with a new root and issuer (for --trust-domain) if it does not exist; then
    /// re-read every 10 s. An existing Secret that is not a usable CA is an error, never
    /// overwritten.
    #[arg(long)]
    ca_secret: Option<signer::bootstrap::ObjectRef>,
    /// Publish the CA's `bundle.pem` in this ConfigMap (`namespace/name`), created or
    /// updated as the bundle changes; node tunnels and waypoints mount it (`--signer-ca`).
    #[arg(long, requires = "ca_secret")]
    trust_bundle_config_map: Option<signer::bootstrap::ObjectRef>,
    /// Kubernetes API server, for TokenReviews and pod lists (`http://` only for tests).
    #[arg(long, default_value = "https://kubernetes.default.svc")]
    kube_url: String,
    /// PEM roots of the API server's certificate.
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    kube_ca: PathBuf,
    /// The signer's own token for the API server (sent when the file exists).
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    kube_token_file: PathBuf,
    /// The only trust domain signed for.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Service account (`namespace/name`) of node tunnels, which may obtain the identities
    /// of pods on their node; repeatable.
    #[arg(long = "node-tunnel", default_value = "ambit-system/ztunnel")]
    node_tunnels: Vec<String>,
    /// Longest workload certificate lifetime, and the default.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
    /// DNS name in the serving certificate; repeatable.
    #[arg(long = "serving-name", default_values = ["ambit-signer.ambit-system.svc", "ambit-signer.ambit-system.svc.cluster.local", "localhost"])]
    serving_names: Vec<String>,
    /// IP address in the serving certificate; repeatable.
    #[arg(long = "serving-ip", default_value = "127.0.0.1")]
    serving_ips: Vec<std::net::IpAddr>,
    #[command(flatten)]
    admission: AdmissionArgs,
    /// Connections one source address may hold open.
    #[arg(long, default_value_t = signer::MAX_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
}

/// Where certificates come from when not from the local CA.
#[derive(clap::Args, Debug, Clone)]
struct SignerClientArgs {
    /// Obtain workload certificates from the central signer at this URL
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
}

impl SignerClientArgs {
    fn config(
        self,
        ca_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<ambit_shared::signer::client::SignerConfig>> {
        Ok(ambit_shared::signer::client::SignerConfig::from_flags(
            self.signer,
            self.signer_ca,
            ca_dir,
            self.token_file,
        )?)
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Mesh config file (YAML); re-read when it changes (`--config-source file`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the mesh config comes from.
    #[arg(long, default_value = "file")]
    config_source: SourceKind,
    /// Kubernetes API server URL, e.g. `http://10.0.0.1:8080` (`--config-source
    /// kubernetes`); default: the kubeconfig's, else the in-cluster service account's.
    #[arg(long)]
    kube_url: Option<String>,
    /// SPIFFE trust domain with `--config-source kubernetes` (a config file names its own).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Name of this node; only workloads with this `node` are served. In a DaemonSet it
    /// comes from `NODE_NAME` (the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Local CA directory (from `ztunnel ca init`); not needed with --signer.
    #[arg(long, required_unless_present = "signer")]
    ca_dir: Option<PathBuf>,
    #[command(flatten)]
    signer: SignerClientArgs,
    /// cgroup v2 directory whose processes are captured. Default: the kubelet's pod cgroup
    /// (`kubepods.slice` with the systemd driver, `kubepods` with cgroupfs) under the
    /// cgroup2 mount found in /proc/self/mountinfo; an error if there is none or several.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory where this node's maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpffs: PathBuf,
    /// Directory of named network namespaces to search for pods (besides --proc-dir).
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// The host's procfs, searched for pods' network namespaces (`<pid>/ns/net`). In a
    /// container without the host's PID namespace, mount the host's /proc (e.g. at
    /// /host/proc) and name it here.
    #[arg(long, default_value = "/proc")]
    proc_dir: PathBuf,
    /// Workload certificate lifetime, e.g. 24h, 90m.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Close pooled HBONE connections idle for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Streams per pooled HBONE connection.
    #[arg(long, default_value_t = 100)]
    pool_max_streams: usize,
    /// Cluster domain: `<service>.<namespace>.svc.<domain>` names are answered by the DNS proxy.
    #[arg(long, default_value = dns::DEFAULT_DOMAIN)]
    dns_domain: String,
    /// resolv.conf whose nameservers get the DNS queries for all other names.
    #[arg(long, default_value = dns::DEFAULT_RESOLV_CONF)]
    dns_resolv_conf: PathBuf,
    /// Prometheus metrics (`/metrics`), in the node's network namespace.
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Admin (`/config_dump`, `/logging`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Serve the CNI hook on this Unix socket (mode 0600), e.g. /var/run/ambit/cni.sock.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    #[command(flatten)]
    admission: AdmissionArgs,
    /// Connections one source address may hold open on each kind of pod listener (15001,
    /// 15006, 15008, summed over the node's pods). Default: an eighth of --accept-fds.
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    #[command(flatten)]
    hbone: HboneServerArgs,
}

/// Lifetimes of a new root and issuer.
#[derive(clap::Args, Debug)]
struct ValidityArgs {
    /// Root lifetime, e.g. 10y.
    #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
    /// Issuer lifetime, e.g. 1y (never longer than the root's).
    #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
    issuer_ttl: Duration,
}

impl ValidityArgs {
    fn validity(&self) -> Validity {
        Validity {
            root: self.root_ttl,
            issuer: self.issuer_ttl,
        }
    }
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
        #[command(flatten)]
        validity: ValidityArgs,
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
        /// Sign an identity outside the CA's trust domain (tests of peers' trust-domain
        /// checks need one); refused by default.
        #[arg(long)]
        allow_foreign_trust_domain: bool,
    },
    /// Trust-anchor rotation, step 1 of 3: stage a new root and issuer in DIR/next and add
    /// the new root to bundle.pem. Wait until every node has reloaded the bundle.
    AddRoot {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain named in the new certificates (default: the current root's).
        #[arg(long)]
        trust_domain: Option<String>,
        #[command(flatten)]
        validity: ValidityArgs,
    },
    /// Step 2 of 3: make the staged root and issuer active (the old pair is kept under
    /// DIR/retired). Nodes renew every workload certificate from the new issuer; wait until
    /// they all have.
    Activate {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Step 3 of 3: remove old roots from bundle.pem (by default every root but the active
    /// one and a staged one).
    RemoveRoot {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Remove only the root with this SHA-256 fingerprint (hex, as `ca check` prints).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Show the roots, the issuer and a staged root with their expiry; exit 1 if any
    /// expires within --warn-before.
    Check {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// How close to expiry is too close.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        warn_before: Duration,
    },
}

fn print_cert(what: &str, c: &CertInfo, now: time::OffsetDateTime) {
    let left = c.seconds_left(now);
    println!(
        "{what:<7} {}  serial {}  expires {} ({} days)  sha256 {}",
        c.common_name,
        c.serial,
        c.not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        left / 86_400,
        c.fingerprint
    );
}

/// `--node-tunnel` values as `(namespace, service account)`.
fn node_tunnels(flags: &[String]) -> anyhow::Result<std::collections::BTreeSet<(String, String)>> {
    flags
        .iter()
        .map(|nt| {
            nt.split_once('/')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
                .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
                .with_context(|| format!("--node-tunnel {nt:?}: expected namespace/name"))
        })
        .collect()
}

/// `--check-args`: the checks a subcommand makes of its arguments before it touches
/// anything (files, sockets, the kernel, the API server). What only the node can tell, such
/// as the kubepods cgroup or the files named, is not checked.
fn check_args(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            args.signer
                .clone()
                .config(args.ca_dir.as_deref())
                .context("--signer")?;
            Source::from_flags(
                args.config_source,
                args.config.clone(),
                args.kube_url.clone(),
                args.trust_domain.clone(),
                None,
            )?;
            ambit_shared::identity::validate_component("trust domain", &args.trust_domain)?;
            anyhow::ensure!(!args.node.is_empty(), "--node (NODE_NAME) is empty");
        }
        Command::Signer(args) => {
            node_tunnels(&args.node_tunnels)?;
            ambit_shared::identity::validate_component("trust domain", &args.trust_domain)?;
        }
        Command::Ca(_) | Command::Cni | Command::CniInstall { .. } => {}
    }
    Ok(())
}

/// The `ztunnel` command line: every subcommand, and the CNI plugin when run as
/// `ambit-cni`.
pub fn main() -> anyhow::Result<()> {
    // Runtimes call a CNI plugin by file name with no arguments, and read only its stdout.
    if std::env::args_os()
        .next()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n == "ambit-cni"))
        .unwrap_or(false)
    {
        std::process::exit(cni::plugin::main());
    }
    let cli = Cli::parse();
    if cli.check_args {
        check_args(&cli.command)?;
        println!("ztunnel: arguments accepted");
        return Ok(());
    }
    if matches!(cli.command, Command::Cni) {
        std::process::exit(cni::plugin::main());
    }
    // Logs to stderr, filtered by `RUST_LOG` (default `info`); `log` changes the filter.
    let log = ambit_shared::logging::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            trust_domain,
            force,
            validity,
        }) => {
            ambit_shared::identity::validate_component("trust domain", &trust_domain)?;
            let paths = ca::init_with(&dir, &trust_domain, force, validity.validity())?;
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
            allow_foreign_trust_domain,
        }) => {
            let ca = LocalCa::load(&CaPaths::new(&dir))?;
            if !allow_foreign_trust_domain {
                ca.check_own_trust_domain(&identity)
                    .context("pass --allow-foreign-trust-domain to sign it anyway")?;
            }
            let issued = ca.issue(&identity, ttl)?;
            ca::write_issued(&out, &issued)?;
            println!(
                "issued {identity} until {} into {}",
                issued.not_after,
                out.display()
            );
            Ok(())
        }
        Command::Ca(CaCommand::AddRoot {
            dir,
            trust_domain,
            validity,
        }) => {
            let root = ca::add_root(&dir, trust_domain.as_deref(), validity.validity())?;
            println!(
                "staged root {} (sha256 {}) in {} and added it to {}",
                root.common_name,
                root.fingerprint,
                CaPaths::new(&dir).next().dir.display(),
                CaPaths::new(&dir).bundle().display()
            );
            println!("next: once every node has reloaded the bundle, run `ztunnel ca activate`");
            Ok(())
        }
        Command::Ca(CaCommand::Activate { dir }) => {
            let (old, new) = ca::activate(&dir)?;
            println!(
                "issuer {} replaced by {}; nodes now renew every workload certificate",
                old.common_name, new.common_name
            );
            println!(
                "next: once every node has renewed, run `ztunnel ca remove-root` (old pair kept in {})",
                CaPaths::new(&dir).retired(&old.serial).dir.display()
            );
            Ok(())
        }
        Command::Ca(CaCommand::RemoveRoot { dir, fingerprint }) => {
            let removed = ca::remove_roots(&dir, fingerprint.as_deref())?;
            if removed.is_empty() {
                println!("nothing to remove: the bundle holds only the active (and staged) root");
            }
            for r in removed {
                println!("removed root {} (sha256 {})", r.common_name, r.fingerprint);
            }
            Ok(())
        }
        Command::Ca(CaCommand::Check { dir, warn_before }) => {
            let st = ca::status(&dir)?;
            let now = time::OffsetDateTime::now_utc();
            for r in &st.bundle {
                print_cert("root", r, now);
            }
            print_cert("issuer", &st.issuer, now);
            if let Some(s) = &st.staged_root {
                print_cert("staged", s, now);
            }
            let limit = warn_before.as_secs() as i64;
            let soon: Vec<&CertInfo> = st
                .bundle
                .iter()
                .chain([&st.issuer])
                .filter(|c| c.seconds_left(now) < limit)
                .collect();
            if soon.is_empty() {
                Ok(())
            } else {
                let names: Vec<&str> = soon.iter().map(|c| c.common_name.as_str()).collect();
                anyhow::bail!(
                    "expiring within {}: {}",
                    humantime::format_duration(warn_before),
                    names.join(", ")
                )
            }
        }
        Command::Signer(args) => {
            let args = *args;
            ambit_shared::rlimit::raise_fd_limit();
            let node_tunnels = node_tunnels(&args.node_tunnels)?;
            ambit_shared::identity::validate_component("trust domain", &args.trust_domain)?;
            let bootstrap = args.ca_secret.map(|secret| signer::bootstrap::Bootstrap {
                secret,
                config_map: args.trust_bundle_config_map,
                ca_dir: args.ca_dir.clone(),
                trust_domain: args.trust_domain.clone(),
            });
            let settings = signer::Settings {
                listen: args.listen,
                ca_dir: args.ca_dir,
                kube_ca: Some(args.kube_ca),
                kube_url: args.kube_url,
                kube_token_file: Some(args.kube_token_file),
                trust_domain: args.trust_domain,
                node_tunnels,
                max_ttl: args.max_ttl,
                serving_names: args.serving_names,
                serving_ips: args.serving_ips,
                admission: args.admission.limits(),
                max_connections_per_source: args.max_connections_per_source.max(1),
                bootstrap,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("signer")
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(signer::run(settings))
        }
        Command::Cni => Ok(()),
        Command::CniInstall {
            bin_dir,
            net_dir,
            socket,
        } => {
            let conflist = cni::install::install(&bin_dir, &net_dir, &socket)?;
            println!(
                "installed {} and chained it into {}",
                bin_dir.join(cni::install::PLUGIN_NAME).display(),
                conflist.display()
            );
            Ok(())
        }
        Command::Run(args) => {
            let args = *args;
            ambit_shared::rlimit::raise_fd_limit();
            let signer = args.signer.config(args.ca_dir.as_deref())?;
            let cgroup = match args.cgroup {
                Some(path) => path,
                None => {
                    let found = kubepods::detect().context("finding the cgroup to capture")?;
                    tracing::info!(cgroup = %found.display(), "found the kubelet's pod cgroup");
                    found
                }
            };
            let settings = app::Settings {
                source: Source::from_flags(
                    args.config_source,
                    args.config,
                    args.kube_url,
                    args.trust_domain,
                    None,
                )?,
                node: args.node,
                ca_dir: args.ca_dir.unwrap_or_default(),
                signer,
                cgroup,
                bpffs: args.bpffs,
                netns: capture::netns::NetnsSearch {
                    netns_dir: args.netns_dir,
                    proc_dir: args.proc_dir,
                },
                cert_ttl: args.cert_ttl,
                pool: PoolConfig {
                    max_streams_per_conn: args.pool_max_streams.max(1),
                    idle_timeout: args.pool_idle_timeout,
                    ..PoolConfig::default()
                },
                dns: dns::DnsSettings {
                    domain: args.dns_domain,
                    resolv_conf: args.dns_resolv_conf,
                },
                metrics_addr: args.metrics_addr,
                readiness_addr: args.readiness_addr,
                admin_addr: args.admin_addr,
                cni_socket: args.cni_socket,
                admission: args.admission.limits(),
                max_connections_per_source: args.max_connections_per_source,
                hbone: args.hbone.timeouts(),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ztunnel")
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(app::run(settings, log))
        }
    }
}
