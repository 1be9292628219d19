//! The simulated cluster every L4 contender shares.
//!
//! ```text
//!   node a (sources)                       node b (destinations)
//!   direct-client   ── plain TCP ───────▶  direct-server   nginx :80, iperf3 :5201
//!   ztunnel-client  ── ztunnel a ⇄ b ───▶  ztunnel-server  (namespace `mesh`, ambient)
//!   stunnel-client  ── stunnel pair ────▶  stunnel-server
//!   haproxy-client  ── haproxy pair ────▶  haproxy-server
//! ```
//!
//! One pod pair per contender, all pairs across the two nodes, so every contender crosses
//! the same veths, bridges and routing hops. Only the `mesh` namespace is ambient; the
//! others live in `plain`, which ztunnel passes through untouched. ztunnel runs on both
//! nodes throughout (as it would on a real node), which only costs the non-mesh pods a
//! no-op `cgroup/connect4` check per connect.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use harness::{Cluster, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts};

use crate::model::Kind;
use crate::tunnels::{self, Pair, Route};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The ambient namespace (ztunnel contender).
pub const MESH_NS: &str = "mesh";
/// The plain namespace (every other contender).
pub const PLAIN_NS: &str = "plain";
pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
const READY: Duration = Duration::from_secs(30);

/// The tunnel routes of the stunnel and HAProxy pairs.
pub const ROUTES: [Route; 2] = [
    Route {
        name: "http",
        local_port: 8080,
        tls_port: 8443,
        app_port: HTTP_PORT,
    },
    Route {
        name: "iperf",
        local_port: 5202,
        tls_port: 8444,
        app_port: IPERF_PORT,
    },
];

/// Benchmark-wide knobs that shape the topology.
#[derive(Debug, Clone)]
pub struct TopologyOpts {
    pub kinds: Vec<Kind>,
    /// `RUST_LOG` for ztunnel.
    pub ztunnel_log: String,
}

/// One contender's pod pair and where its client connects.
pub struct Contender {
    pub kind: Kind,
    pub client: Pod,
    /// Where HTTP clients connect (the server pod, or the local tunnel end).
    pub http: SocketAddr,
    /// Where `iperf3 -c` connects.
    pub iperf: SocketAddr,
    /// The stunnel or HAProxy processes, for those contenders.
    pub pair: Option<Pair>,
}

/// Everything the benchmark runs on. Fields drop in order: tunnel processes, apps,
/// ztunnels, then the cluster (namespaces, mounts), which also kills anything left.
pub struct Bench {
    pub contenders: Vec<Contender>,
    _apps: Vec<Proc>,
    /// ztunnel on node a (sources) and node b (destinations).
    pub ztunnels: Vec<Ztunnel>,
    pub cluster: Cluster,
}

impl Bench {
    pub fn new(opts: &TopologyOpts) -> Result<Bench> {
        let cluster = Cluster::new().context("creating the simulated cluster")?;
        let dir = cluster.dir().join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let a = cluster.add_node("a")?;
        let b = cluster.add_node("b")?;
        let mut pods = Vec::new();
        for &kind in &opts.kinds {
            let ns = if kind == Kind::Ztunnel {
                MESH_NS
            } else {
                PLAIN_NS
            };
            let client = cluster.add_pod(
                &a,
                PodSpec::new(format!("{}-client", kind.name()))
                    .namespace(ns)
                    .service_account(format!("{}-client", kind.name())),
            )?;
            let server = cluster.add_pod(
                &b,
                PodSpec::new(format!("{}-server", kind.name()))
                    .namespace(ns)
                    .service_account(format!("{}-server", kind.name())),
            )?;
            pods.push((kind, client, server));
        }
        cluster.enroll_namespace(MESH_NS)?;
        cluster.add_namespace(PLAIN_NS, Default::default())?;
        cluster.write_config()?;
        cluster.init_ca(TRUST_DOMAIN)?;

        for (_, client, server) in &pods {
            for pod in [client, server] {
                tune_pod(pod)?;
            }
        }

        let mut apps = Vec::new();
        for (_, _, server) in &pods {
            apps.push(start_nginx(server, &dir)?);
            let mut iperf = server.command("iperf3");
            iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
            apps.push(server.spawn(&mut iperf)?);
        }
        for (_, _, server) in &pods {
            server.wait_listening(HTTP_PORT, READY)?;
            server.wait_listening(IPERF_PORT, READY)?;
        }

        let zt_opts = ZtunnelOpts::default().rust_log(opts.ztunnel_log.clone());
        let ztunnels = vec![a.start_ztunnel(&zt_opts)?, b.start_ztunnel(&zt_opts)?];
        for zt in &ztunnels {
            zt.wait_ready(READY)?;
        }

        let mut contenders = Vec::new();
        for (kind, client, server) in pods {
            let pair = match kind {
                Kind::Stunnel | Kind::Haproxy | Kind::Relay => {
                    let tls = dir.join(kind.name());
                    let cc = tunnels::issue(&cluster, &client.identity(), &tls.join("client"))?;
                    let sc = tunnels::issue(&cluster, &server.identity(), &tls.join("server"))?;
                    Some(Pair::start(
                        kind, &tls, &client, &server, &cc, &sc, &ROUTES,
                    )?)
                }
                _ => None,
            };
            let (http, iperf) = match pair {
                Some(_) => (Pair::local_addr(&ROUTES[0]), Pair::local_addr(&ROUTES[1])),
                None => (
                    SocketAddr::from((server.ip(), HTTP_PORT)),
                    SocketAddr::from((server.ip(), IPERF_PORT)),
                ),
            };
            contenders.push(Contender {
                kind,
                client,
                http,
                iperf,
                pair,
            });
        }

        let bench = Bench {
            contenders,
            _apps: apps,
            ztunnels,
            cluster,
        };
        for c in &bench.contenders {
            bench.check_path(c)?;
        }
        Ok(bench)
    }

    pub fn contender(&self, kind: Kind) -> Result<&Contender> {
        self.contenders
            .iter()
            .find(|c| c.kind == kind)
            .with_context(|| format!("contender {} is not set up", kind.name()))
    }

    pub fn contender_mut(&mut self, kind: Kind) -> Result<&mut Contender> {
        self.contenders
            .iter_mut()
            .find(|c| c.kind == kind)
            .with_context(|| format!("contender {} is not set up", kind.name()))
    }

    /// The proxy processes whose CPU and memory count for `kind`: both ztunnels, or both
    /// sides of the pair; none for direct.
    pub fn proxy_pids(&self, kind: Kind) -> Result<Vec<u32>> {
        Ok(match kind {
            Kind::Direct => Vec::new(),
            Kind::Ztunnel => self
                .ztunnels
                .iter()
                .map(|z| z.pid().context("ztunnel is not running"))
                .collect::<Result<_>>()?,
            _ => self
                .contender(kind)?
                .pair
                .as_ref()
                .map(Pair::pids)
                .unwrap_or_default(),
        })
    }

    /// Restarts both ztunnels (fresh processes) and waits until they are ready.
    pub fn restart_ztunnels(&mut self) -> Result<()> {
        for zt in &mut self.ztunnels {
            zt.restart()?;
        }
        for zt in &self.ztunnels {
            zt.wait_ready(READY)?;
        }
        Ok(())
    }

    /// Proves that `c`'s traffic takes the path it claims: the server sees the client pod
    /// (direct), ztunnel's delivery address 127.0.0.6 (ztunnel), or loopback (the tunnel
    /// pairs), in nginx's `X-Peer` header.
    fn check_path(&self, c: &Contender) -> Result<()> {
        let url = format!("http://{}/", c.http);
        let out = c.client.run_ok(
            c.client
                .command("curl")
                .args(["-sS", "-m", "10", "-D", "-", "-o", "/dev/null", &url]),
            Duration::from_secs(15),
        )?;
        let peer = out
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-peer")
                    .then(|| v.trim().to_string())
            })
            .with_context(|| format!("no X-Peer in the answer to {url}: {out}"))?;
        let expected: IpAddr = match c.kind {
            Kind::Direct => c.client.ip().into(),
            Kind::Ztunnel => [127, 0, 0, 6].into(),
            _ => [127, 0, 0, 1].into(),
        };
        ensure!(
            peer == expected.to_string(),
            "{}: the server saw peer {peer}, expected {expected}: traffic does not take the \
             intended path",
            c.kind.name()
        );
        Ok(())
    }
}

/// Gives every pod the same, roomy TCP settings: the connection-rate runs open tens of
/// thousands of short connections, which must not run out of ephemeral ports.
fn tune_pod(pod: &Pod) -> Result<()> {
    let ns = pod.netns_name();
    harness::netns::sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
    harness::netns::sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// Starts nginx in `pod`: one process, no access log, a tiny fixed body, and the peer
/// address echoed in `X-Peer` (see [`Bench::check_path`]).
fn start_nginx(pod: &Pod, dir: &std::path::Path) -> Result<Proc> {
    let d = dir.join(format!("nginx-{}", pod.name()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let conf = d.join("nginx.conf");
    let temp = |what: &str| format!("    {what}_temp_path {};\n", d.join(what).display());
    let text = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\n\
         error_log {err} warn;\nworker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 16384;\n}}\n\
         http {{\n    access_log off;\n{temps}    keepalive_requests 100000000;\n    \
         keepalive_timeout 300s;\n    server {{\n        listen {port} backlog=4096;\n        \
         location / {{\n            default_type text/plain;\n            \
         add_header X-Peer $remote_addr;\n            \
         return 200 \"hello from ambit-bench\\n\";\n        }}\n    }}\n}}\n",
        pid = d.join("nginx.pid").display(),
        err = d.join("error.log").display(),
        temps = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|w| temp(w))
            .collect::<String>(),
        port = HTTP_PORT,
    );
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = pod.command("nginx");
    cmd.arg("-e")
        .arg(d.join("error.log"))
        .arg("-p")
        .arg(&d)
        .arg("-c")
        .arg(&conf);
    let proc = pod.spawn(&mut cmd)?;
    if pod.wait_listening(HTTP_PORT, READY).is_err() {
        bail!(
            "nginx did not start in {}; see {}",
            pod.name(),
            d.join("error.log").display()
        );
    }
    Ok(proc)
}
