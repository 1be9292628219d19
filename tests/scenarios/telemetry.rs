//! Telemetry and certificate lifecycle, end to end: Istio's TCP metrics counted against the
//! traffic actually sent, readiness, the admin dump and run-time log level, expiry metrics
//! and warnings, and certificate rotation (short-lived leaves, then a full trust-anchor
//! rotation) under continuous load without losing a connection.
//!
//! Topology (every test): node `a` runs `shop/client` and `shop/web`; node `b` runs
//! `shop/api` and `legacy/plain`. `shop` is ambient, `legacy` is not. `api` runs a sink on
//! 9000 (`ambit-testapp sink`) and an echo server on 9001; `web` and `api` serve HTTP on
//! 8080; `plain` serves HTTP on 8080.
//!
//! Metrics are scraped from inside each node's network namespace with curl (15020 on the
//! node's address, which proves it listens beyond loopback); the admin endpoint on
//! 127.0.0.1:15000.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use harness::ztunnel::{field, field_str, message};
use harness::{Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts, wait_for};
use serde_json::Value;

const TRUST_DOMAIN: &str = "cluster.local";
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// Fields drop in declaration order: processes first, the cluster (netns, mounts) last.
struct Mesh {
    _apps: Vec<Proc>,
    zt_a: Ztunnel,
    zt_b: Ztunnel,
    client: Pod,
    web: Pod,
    api: Pod,
    plain: Pod,
    a: Node,
    b: Node,
    cluster: Cluster,
}

/// Builds the topology, starts the apps and ztunnel on both nodes. `ca_args` are extra
/// arguments for `ztunnel ca init` (the CA is re-created with them).
fn mesh(opts: &ZtunnelOpts, ca_args: &[&str]) -> Result<Mesh> {
    let cluster = Cluster::new()?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client = cluster.add_pod(
        &a,
        PodSpec::new("client")
            .namespace("shop")
            .service_account("client")
            .label("app", "client"),
    )?;
    let web = cluster.add_pod(
        &a,
        PodSpec::new("web").namespace("shop").service_account("web"),
    )?;
    let api = cluster.add_pod(
        &b,
        PodSpec::new("api")
            .namespace("shop")
            .service_account("api")
            .label("app", "api")
            .label("version", "v1"),
    )?;
    let plain = cluster.add_pod(&b, PodSpec::new("plain").namespace("legacy"))?;
    cluster.enroll_namespace("shop")?;
    cluster.add_namespace("legacy", Default::default())?;
    cluster.write_config()?;
    cluster.init_ca(TRUST_DOMAIN)?;
    if !ca_args.is_empty() {
        let dir = cluster.ca_dir().display().to_string();
        let mut args = vec!["ca", "init", "--force", "--dir", &dir];
        args.extend(["--trust-domain", TRUST_DOMAIN]);
        args.extend(ca_args);
        harness::ztunnel::cli(&args)?;
    }
    let mut apps = Vec::new();
    for pod in [&web, &api, &plain] {
        apps.push(pod.spawn_testapp(&[
            "http",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            pod.name(),
        ])?);
    }
    apps.push(api.spawn_testapp(&["sink", "--listen", "0.0.0.0:9000"])?);
    apps.push(api.spawn_testapp(&["echo", "--listen", "0.0.0.0:9001"])?);
    apps.push(web.spawn_testapp(&["echo", "--listen", "0.0.0.0:9001"])?);
    let zt_a = a.start_ztunnel(opts)?;
    let zt_b = b.start_ztunnel(opts)?;
    zt_a.wait_ready(LONG)?;
    zt_b.wait_ready(LONG)?;
    Ok(Mesh {
        _apps: apps,
        zt_a,
        zt_b,
        client,
        web,
        api,
        plain,
        a,
        b,
        cluster,
    })
}

/// `curl` in the node's netns; returns (status, body).
fn curl(node: &Node, args: &[&str], url: &str) -> Result<(u16, String)> {
    let out = node.run(
        node.command("curl")
            .args(["-sS", "-m", "5", "-w", "\n%{http_code}"])
            .args(args)
            .arg(url),
        SHORT,
    )?;
    ensure!(
        out.status.success(),
        "curl {url} on node {} failed: {}",
        node.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse().context("status")?, body.to_string()))
}

// === metrics ===

/// One scrape: every sample, by name and labels.
#[derive(Debug)]
struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Metrics {
    /// Scrapes node's 15020 on the node's own address.
    fn scrape(node: &Node) -> Result<Metrics> {
        let url = format!("http://{}:15020/metrics", node.ip());
        let (status, text) = curl(node, &[], &url)?;
        ensure!(status == 200, "{url}: {status} {text}");
        Metrics::parse(&text)
    }

    fn parse(text: &str) -> Result<Metrics> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').context("sample without value")?;
            let value: f64 = value.parse().with_context(|| format!("value in {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').unwrap_or(rest))?),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Ok(Metrics {
            samples,
            text: text.to_string(),
        })
    }

    /// The sum of `name` over every series whose labels include all of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The label sets of `name` that include all of `want`.
    fn series(&self, name: &str, want: &[(&str, &str)]) -> Vec<&BTreeMap<String, String>> {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, _)| l)
            .collect()
    }
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without value")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.context("unterminated label value")?;
        out.insert(key.trim_start_matches(',').to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(out)
}

/// Scrapes until `check` passes on a scrape (connections are counted as closed a moment
/// after the client sees the end), and returns that scrape.
fn scrape_until(node: &Node, what: &str, check: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let mut last = None;
    let found = wait_for(SHORT, || match Metrics::scrape(node) {
        Ok(m) if check(&m) => Some(m),
        Ok(m) => {
            last = Some(m);
            None
        }
        Err(_) => None,
    });
    found.with_context(|| {
        let text = last.map(|m| m.text).unwrap_or_default();
        let relevant: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp") || l.starts_with("ambit_"))
            .collect();
        format!(
            "metrics on {} never showed {what}; last scrape:\n{}",
            node.name(),
            relevant.join("\n")
        )
    })
}

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";

#[test]
fn tcp_metrics_count_the_connections_and_bytes_actually_sent() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default(), &[])?;
    for node in [&m.a, &m.b] {
        let (status, body) = curl(
            node,
            &[],
            &format!("http://{}:15021/healthz/ready", node.ip()),
        )?;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
    }

    // 1. One connection, exactly N bytes up; the sink answers `<N> <sha256>\n`.
    const N: u64 = 1_234_567;
    let sent = m.client.run_testapp(
        &[
            "send",
            "--to",
            &format!("{}:9000", m.api.ip()),
            "--bytes",
            &N.to_string(),
        ],
        LONG,
    )?;
    assert_eq!(sent["match"], Value::Bool(true), "{sent}");
    let reply = sent["reply"].as_str().context("reply")?.len() as f64 + 1.0;
    let mesh_source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_canonical_service", "client"),
        ("source_app", "client"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "api"),
        ("destination_workload_namespace", "shop"),
        ("destination_canonical_service", "api"),
        ("destination_canonical_revision", "v1"),
        ("destination_version", "v1"),
        ("destination_principal", API_ID),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let mut mesh_destination = mesh_source;
    mesh_destination[0] = ("reporter", "destination");
    let expect = |node: &Node, labels: &[(&str, &str)], conns: f64, up: f64, down: f64| {
        let m = scrape_until(node, &format!("{conns} closed connections"), |m| {
            m.sum(CLOSED, labels) >= conns
        })?;
        let got = (
            m.sum(OPENED, labels),
            m.sum(CLOSED, labels),
            m.sum(RECEIVED, labels),
            m.sum(SENT, labels),
        );
        ensure!(
            got == (conns, conns, up, down),
            "{}: (opened, closed, received, sent) = {got:?}, want {:?}; series: {:#?}",
            node.name(),
            (conns, conns, up, down),
            m.series(OPENED, &[("source_workload", "client")])
        );
        Ok(m)
    };
    let nf = N as f64;
    let scraped = expect(&m.a, &mesh_source, 1.0, nf, reply)?;
    // Istio's label names, all of them, on every series.
    let labels = scraped.series(OPENED, &mesh_source)[0];
    for name in [
        "source_canonical_revision",
        "source_version",
        "source_cluster",
        "destination_service_namespace",
        "destination_service_name",
        "destination_app",
        "destination_cluster",
    ] {
        assert!(labels.contains_key(name), "{name} missing: {labels:?}");
    }
    expect(&m.b, &mesh_destination, 1.0, nf, reply)?;

    // 2. Twenty more connections of 5000 bytes each way, to the echo server.
    let fan = m.client.run_testapp(
        &[
            "fanout",
            "--to",
            &format!("{}:9001", m.api.ip()),
            "--conns",
            "20",
            "--bytes-per-conn",
            "5000",
        ],
        LONG,
    )?;
    assert_eq!(fan["ok"].as_u64(), Some(20), "{fan}");
    let (up, down) = (nf + 100_000.0, reply + 100_000.0);
    expect(&m.a, &mesh_source, 21.0, up, down)?;
    expect(&m.b, &mesh_destination, 21.0, up, down)?;

    // 3. An open connection's bytes show before it closes, and its close is counted when
    // the client goes away.
    let mut cmd = m.client.command("bash");
    cmd.args([
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{}/9001; printf hello >&3; head -c 5 <&3; echo; sleep 60",
            m.api.ip()
        ),
    ]);
    let open = m.client.spawn(&mut cmd)?;
    open.wait_for_line(SHORT, |l| l == "hello")?;
    let live = scrape_until(&m.a, "the open connection", |s| {
        s.sum(OPENED, &mesh_source) == 22.0
    })?;
    assert_eq!(live.sum(CLOSED, &mesh_source), 21.0);
    assert_eq!(live.sum(RECEIVED, &mesh_source), up + 5.0);
    assert_eq!(live.sum(SENT, &mesh_source), down + 5.0);
    drop(open);
    expect(&m.a, &mesh_source, 22.0, up + 5.0, down + 5.0)?;

    // 4. Passthrough to a pod outside the mesh: no mTLS, so no source principal.
    let (status, body) = curl_from(&m.client, &format!("http://{}:8080/", m.plain.ip()))?;
    assert_eq!((status, body.as_str()), (200, "hello from plain\n"));
    let passthrough = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", "unknown"),
        ("destination_workload", "plain"),
        ("destination_workload_namespace", "legacy"),
        ("connection_security_policy", "unknown"),
    ];
    let s = scrape_until(&m.a, "the passthrough connection", |s| {
        s.sum(CLOSED, &passthrough) == 1.0
    })?;
    assert_eq!(s.sum(OPENED, &passthrough), 1.0);
    assert!(s.sum(RECEIVED, &passthrough) > 0.0 && s.sum(SENT, &passthrough) > 0.0);

    // 5. Plaintext into the mesh (15006 on api's node): reported by the destination only.
    let fan = m.plain.run_testapp(
        &[
            "fanout",
            "--to",
            &format!("{}:9001", m.api.ip()),
            "--conns",
            "3",
            "--bytes-per-conn",
            "700",
        ],
        LONG,
    )?;
    assert_eq!(fan["ok"].as_u64(), Some(3), "{fan}");
    let plaintext_in = [
        ("reporter", "destination"),
        ("source_workload", "plain"),
        ("source_principal", "unknown"),
        ("destination_workload", "api"),
        ("connection_security_policy", "unknown"),
    ];
    let s = scrape_until(&m.b, "the plaintext inbound connections", |s| {
        s.sum(CLOSED, &plaintext_in) == 3.0
    })?;
    assert_eq!(s.sum(RECEIVED, &plaintext_in), 2100.0);
    assert_eq!(s.sum(SENT, &plaintext_in), 2100.0);

    // 6. Config reloads: a refused file and an applied one.
    let path = m.cluster.config_path();
    let good = std::fs::read_to_string(&path)?;
    let before = Metrics::scrape(&m.a)?;
    let count = |s: &Metrics, r: &str| s.sum("ambit_config_reloads_total", &[("result", r)]);
    std::fs::write(
        &path,
        good.replacen(&m.web.ip().to_string(), "10.1.2.300", 1),
    )?;
    scrape_until(&m.a, "a refused reload", |s| {
        count(s, "failure") == count(&before, "failure") + 1.0
    })?;
    m.cluster.write_config()?;
    let s = scrape_until(&m.a, "an applied reload", |s| {
        count(s, "success") == count(&before, "success") + 1.0
    })?;
    assert_eq!(count(&s, "failure"), count(&before, "failure") + 1.0);
    Ok(())
}

/// `curl` from a pod; returns (status, body).
fn curl_from(pod: &Pod, url: &str) -> Result<(u16, String)> {
    let out = pod.run_ok(
        pod.command("curl")
            .args(["-sS", "-m", "10", "-w", "\n%{http_code}", url]),
        SHORT,
    )?;
    let (body, code) = out.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse().context("status")?, body.to_string()))
}

#[test]
fn admin_dumps_certificates_changes_log_level_and_expiry_is_surfaced() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    // An issuer that expires in 20 days: inside the 30-day warning window.
    let m = mesh(&ZtunnelOpts::default(), &["--issuer-ttl", "20d"])?;
    let admin = "http://127.0.0.1:15000";

    // Readiness on loopback too; admin only on loopback.
    let (status, _) = curl(&m.a, &[], "http://127.0.0.1:15021/healthz/ready")?;
    assert_eq!(status, 200);
    let out = m.a.run(
        m.a.command("curl")
            .args(["-sS", "-m", "3"])
            .arg(format!("http://{}:15000/config_dump", m.a.ip())),
        SHORT,
    )?;
    assert!(!out.status.success(), "admin answered on the node address");

    // config_dump: the config, certificates with expiry, issuer and bundle.
    let (status, body) = curl(&m.a, &[], &format!("{admin}/config_dump"))?;
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).context("config_dump is JSON")?;
    assert_eq!(dump["node"], "a");
    assert_eq!(dump["ready"], true);
    let workloads: Vec<&str> = dump["workloads"]
        .as_array()
        .context("workloads")?
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    for w in ["client", "web", "api", "plain"] {
        assert!(workloads.contains(&w), "{w} not in {workloads:?}");
    }
    for key in ["services", "authorizationPolicies", "peerAuthentications"] {
        assert!(dump[key].is_array(), "{key} missing: {dump}");
    }
    let certs = dump["certificates"].as_array().context("certificates")?;
    let mut identities: Vec<&str> = certs
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    identities.sort();
    assert_eq!(
        identities,
        [CLIENT_ID, "spiffe://cluster.local/ns/shop/sa/web"]
    );
    for c in certs {
        let left = c["secondsToExpiry"].as_i64().context("secondsToExpiry")?;
        assert!((86_000..=86_460).contains(&left), "{c}");
        assert!(c["serial"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert!(
            c["notAfter"].as_str().is_some_and(|s| s.contains('T')),
            "{c}"
        );
        assert!(c["notBefore"].is_string(), "{c}");
        assert_eq!(c["issuer"], dump["issuer"]["subject"], "{c}");
    }
    let issuer_left = dump["issuer"]["secondsToExpiry"]
        .as_i64()
        .context("issuer")?;
    assert!((19 * 86_400..=20 * 86_400).contains(&issuer_left), "{dump}");
    let roots = dump["trustBundle"].as_array().context("trustBundle")?;
    assert_eq!(roots.len(), 1);
    assert!(roots[0]["secondsToExpiry"].as_i64().unwrap_or(0) > 9 * 365 * 86_400);
    assert_eq!(roots[0]["subject"], dump["issuer"]["issuer"]);

    // The same expiry, as metrics.
    let s = Metrics::scrape(&m.a)?;
    let leaf = s.sum(
        "ambit_certificate_expiry_seconds",
        &[("kind", "leaf"), ("identity", CLIENT_ID)],
    );
    assert!((86_000.0..=86_460.0).contains(&leaf), "leaf expiry {leaf}");
    let issuer = s.series("ambit_certificate_expiry_seconds", &[("kind", "issuer")]);
    assert_eq!(issuer.len(), 1, "{}", s.text);
    let issuer = s.sum("ambit_certificate_expiry_seconds", &[("kind", "issuer")]);
    assert!((19.0 * 86_400.0..=20.0 * 86_400.0).contains(&issuer));
    assert!(
        s.sum("ambit_certificate_expiry_seconds", &[("kind", "root")]) > 9.0 * 365.0 * 86_400.0
    );
    assert_eq!(s.sum("ambit_trust_bundle_roots", &[]), 1.0);
    assert!(s.text.contains("istio_build{component=\"ztunnel\""));

    // A warning, long before the issuer expires; none for the root.
    let warning = m.zt_a.wait_for_log(SHORT, |v| {
        message(v).is_some_and(|m| m.starts_with("CA certificate close to expiry"))
    })?;
    assert_eq!(field_str(&warning, "kind"), "issuer");
    assert_eq!(warning["level"], "WARN");
    assert!(
        !m.zt_a.logs().iter().any(
            |v| message(v).is_some_and(|m| m.contains("close to expiry"))
                && field_str(v, "kind") != "issuer"
        ),
        "a warning for something else than the issuer"
    );

    // Log level at run time: no debug lines at `info`; they appear after switching.
    let is_debug = |v: &Value| v["level"] == "DEBUG";
    let (_, filter) = curl(&m.b, &[], &format!("{admin}/logging"))?;
    assert_eq!(filter.trim(), "info");
    assert_eq!(http_get(&m.client, &m.api)?, 200);
    let cursor = m.zt_b.log_cursor();
    assert_eq!(http_get(&m.client, &m.api)?, 200);
    m.zt_b.wait_for_log_since(cursor, SHORT, |v| {
        v["target"] == "access" && field_str(v, "direction") == "inbound"
    })?;
    assert!(
        !m.zt_b.logs().iter().any(is_debug),
        "debug line logged at level info"
    );
    let (status, now) = curl(
        &m.b,
        &["-X", "POST"],
        &format!("{admin}/logging?level=debug"),
    )?;
    assert_eq!((status, now.trim()), (200, "debug"));
    let cursor = m.zt_b.log_cursor();
    assert_eq!(http_get(&m.client, &m.api)?, 200);
    m.zt_b.wait_for_log_since(cursor, SHORT, is_debug)?;
    let (status, _) = curl(
        &m.b,
        &["-X", "POST"],
        &format!("{admin}/logging?level=not%20a%20filter%3D%3D"),
    )?;
    assert_eq!(status, 400);
    let (status, now) = curl(
        &m.b,
        &["-X", "POST"],
        &format!("{admin}/logging?level=info"),
    )?;
    assert_eq!((status, now.trim()), (200, "info"));
    let _ = (&m.web, &m.plain);
    Ok(())
}

/// `curl` from `from` to `to:8080`; returns the status.
fn http_get(from: &Pod, to: &Pod) -> Result<u16> {
    Ok(curl_from(from, &format!("http://{}:8080/", to.ip()))?.0)
}

// === rotation under load ===

/// Continuous traffic from the client, in threads, until stopped: rounds of short echo
/// connections (to api across nodes and web on the same node), large transfers to the
/// sink, and long-lived conversations started on demand. Every loop is bounded in count
/// and time.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

/// What one load thread saw.
#[derive(Debug, Default)]
struct Tally {
    kind: &'static str,
    runs: u64,
    connections: u64,
    failed: u64,
    errors: Vec<String>,
}

/// Hard bound on any load thread, whatever the test does.
const LOAD_MAX: Duration = Duration::from_secs(240);
const FANOUT_CONNS: u64 = 25;

impl Load {
    fn start(m: &Mesh) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + LOAD_MAX;
        let mut threads = Vec::new();
        let targets = [
            format!("{}:9001", m.api.ip()),
            format!("{}:9001", m.web.ip()),
        ];
        let (client, stop_fan) = (m.client.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut t = Tally {
                kind: "fanout",
                ..Tally::default()
            };
            let conns = FANOUT_CONNS.to_string();
            while !stop_fan.load(Ordering::Relaxed) && Instant::now() < deadline && t.runs < 5_000 {
                let to = &targets[(t.runs % 2) as usize];
                let args = [
                    "fanout",
                    "--to",
                    to,
                    "--conns",
                    &conns,
                    "--bytes-per-conn",
                    "4096",
                    "--timeout-secs",
                    "30",
                ];
                t.runs += 1;
                match client.run_testapp(&args, LONG) {
                    Ok(r) => {
                        t.connections += r["ok"].as_u64().unwrap_or(0);
                        let failed = r["failed"].as_u64().unwrap_or(FANOUT_CONNS);
                        if failed > 0 || r["ok"].as_u64() != Some(FANOUT_CONNS) {
                            t.failed += failed.max(1);
                            t.errors.push(format!("fanout to {to}: {r}"));
                        }
                    }
                    Err(e) => {
                        t.failed += FANOUT_CONNS;
                        t.errors.push(format!("fanout to {to}: {e:#}"));
                    }
                }
            }
            t
        }));
        let (client, stop_send, sink) = (
            m.client.clone(),
            stop.clone(),
            format!("{}:9000", m.api.ip()),
        );
        threads.push(std::thread::spawn(move || {
            let mut t = Tally {
                kind: "send",
                ..Tally::default()
            };
            while !stop_send.load(Ordering::Relaxed) && Instant::now() < deadline && t.runs < 1_000
            {
                t.runs += 1;
                let args = [
                    "send",
                    "--to",
                    &sink,
                    "--bytes",
                    "16777216",
                    "--seed",
                    &t.runs.to_string(),
                    "--timeout-secs",
                    "60",
                ];
                match client.run_testapp(&args, Duration::from_secs(70)) {
                    Ok(r) if r["match"] == Value::Bool(true) => t.connections += 1,
                    Ok(r) => {
                        t.failed += 1;
                        t.errors.push(format!("send: {r}"));
                    }
                    Err(e) => {
                        t.failed += 1;
                        t.errors.push(format!("send: {e:#}"));
                    }
                }
            }
            t
        }));
        Load { stop, threads }
    }

    /// Stops the load and returns every thread's tally.
    fn finish(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Tally {
                    kind: "panicked",
                    failed: 1,
                    errors: vec!["load thread panicked".into()],
                    ..Tally::default()
                })
            })
            .collect()
    }
}

/// A long-lived conversation with api's echo server through the mesh: one line a second
/// for `secs` seconds, each echoed back, over a single connection.
fn conversation(client: &Pod, api: &Pod, secs: u32) -> Result<Proc> {
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/9001 || exit 1; echo open; \
         for i in $(seq 1 {secs}); do echo \"line $i\" >&3; \
         IFS= read -r -t 10 l <&3 || {{ echo \"FAIL no echo for line $i\"; exit 1; }}; \
         [ \"$l\" = \"line $i\" ] || {{ echo \"FAIL got $l\"; exit 1; }}; sleep 1; done; echo DONE",
        ip = api.ip()
    );
    let mut cmd = client.command("bash");
    cmd.args(["-c", &script]);
    let proc = client.spawn(&mut cmd)?;
    proc.wait_for_line(SHORT, |l| l == "open")?;
    Ok(proc)
}

/// Waits for a conversation to end and checks it echoed every line.
fn finished(conv: &mut Proc, secs: u64) -> Result<()> {
    let status = conv.wait(Duration::from_secs(secs))?;
    let out = conv.output_text();
    ensure!(
        status.success() && out.contains("DONE"),
        "long-lived connection broke ({status}): {out}"
    );
    Ok(())
}

fn renewals(zt: &Ztunnel, identity: &str, reason: &str, since: usize) -> usize {
    zt.logs()
        .iter()
        .skip(since)
        .filter(|v| {
            message(v) == Some("renewed workload certificate")
                && field_str(v, "identity") == identity
                && field_str(v, "reason") == reason
        })
        .count()
}

fn report(phase: &str, tallies: &[Tally]) -> Result<u64> {
    let total: u64 = tallies.iter().map(|t| t.connections).sum();
    for t in tallies {
        eprintln!(
            "{phase}: {}: {} runs, {} connections ok, {} failed",
            t.kind, t.runs, t.connections, t.failed
        );
    }
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    ensure!(
        tallies.iter().all(|t| t.failed == 0),
        "{phase}: connections failed: {failures:#?}"
    );
    Ok(total)
}

/// Waits until `zt` logs `msg` with `roots` roots after `cursor`.
fn wait_bundle(zt: &Ztunnel, cursor: usize, roots: u64) -> Result<()> {
    zt.wait_for_log_since(cursor, SHORT, |v| {
        message(v) == Some("trust bundle reloaded")
            && field(v, "roots").and_then(Value::as_u64) == Some(roots)
    })
    .map(|_| ())
}

/// The issuer subject of every workload certificate on `node`, and the bundle's subjects.
fn dumped_issuers(node: &Node) -> Result<(Vec<String>, Vec<String>)> {
    let (status, body) = curl(node, &[], "http://127.0.0.1:15000/config_dump")?;
    ensure!(status == 200, "config_dump: {status}");
    let dump: Value = serde_json::from_str(&body)?;
    let strings = |key: &str, field: &str| -> Vec<String> {
        dump[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c[field].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((
        strings("certificates", "issuer"),
        strings("trustBundle", "subject"),
    ))
}

#[test]
fn certificates_and_the_trust_anchor_rotate_under_load_without_losing_a_connection() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default().cert_ttl("20s"), &[])?;
    let ca = m.cluster.ca_dir().display().to_string();

    // Phase 1: 90 s of traffic while 20 s leaves renew at half-life (every ~10 s).
    let start_a = m.zt_a.log_cursor();
    let start_b = m.zt_b.log_cursor();
    let load = Load::start(&m);
    let mut long = conversation(&m.client, &m.api, 80)?;
    std::thread::sleep(Duration::from_secs(90));
    let tallies = load.finish();
    finished(&mut long, 30)?;
    let total = report("short-lived certificates", &tallies)?;
    ensure!(total >= 1_000, "only {total} connections in 90 s");
    let client_renewals = renewals(&m.zt_a, CLIENT_ID, "half_life", start_a);
    let api_renewals = renewals(&m.zt_b, API_ID, "half_life", start_b);
    // One renewal per identity every ~10 s: about nine in 90 s, not a storm.
    ensure!(
        (6..=15).contains(&client_renewals) && (6..=15).contains(&api_renewals),
        "renewals under load: client {client_renewals}, api {api_renewals}, want about 9 each"
    );
    eprintln!(
        "short-lived certificates: {total} connections, renewals: client {client_renewals}, api {api_renewals}"
    );

    // Phase 2: the full trust-anchor rotation, under the same traffic, with one connection
    // open across all of it.
    let (old_issuers, old_roots) = dumped_issuers(&m.a)?;
    let load = Load::start(&m);
    let mut long = conversation(&m.client, &m.api, 45)?;
    std::thread::sleep(Duration::from_secs(3));

    // 1. Add the new root: every node trusts both.
    let (ca_cursor, cb_cursor) = (m.zt_a.log_cursor(), m.zt_b.log_cursor());
    harness::ztunnel::cli(&["ca", "add-root", "--dir", &ca])?;
    wait_bundle(&m.zt_a, ca_cursor, 2)?;
    wait_bundle(&m.zt_b, cb_cursor, 2)?;
    std::thread::sleep(Duration::from_secs(3));

    // 2. Switch the issuer: every node renews every certificate from it.
    let (ca_cursor, cb_cursor) = (m.zt_a.log_cursor(), m.zt_b.log_cursor());
    harness::ztunnel::cli(&["ca", "activate", "--dir", &ca])?;
    for (zt, cursor, ids) in [
        (
            &m.zt_a,
            ca_cursor,
            vec![CLIENT_ID, "spiffe://cluster.local/ns/shop/sa/web"],
        ),
        (&m.zt_b, cb_cursor, vec![API_ID]),
    ] {
        for id in ids {
            zt.wait_for_log_since(cursor, SHORT, |v| {
                message(v) == Some("renewed workload certificate")
                    && field_str(v, "identity") == id
                    && field_str(v, "reason") == "issuer_changed"
            })?;
        }
    }
    let (issuers, roots) = dumped_issuers(&m.a)?;
    ensure!(roots.len() == 2, "bundle mid-rotation: {roots:?}");
    ensure!(
        issuers.iter().all(|i| !old_issuers.contains(i)),
        "certificates still from the old issuer: {issuers:?} (old {old_issuers:?})"
    );
    std::thread::sleep(Duration::from_secs(5));

    // 3. Remove the old root.
    let (ca_cursor, cb_cursor) = (m.zt_a.log_cursor(), m.zt_b.log_cursor());
    harness::ztunnel::cli(&["ca", "remove-root", "--dir", &ca])?;
    wait_bundle(&m.zt_a, ca_cursor, 1)?;
    wait_bundle(&m.zt_b, cb_cursor, 1)?;
    // Keep the traffic going across more renewals on the new anchor alone.
    std::thread::sleep(Duration::from_secs(15));
    let tallies = load.finish();
    finished(&mut long, 45)?;
    let total = report("trust-anchor rotation", &tallies)?;
    ensure!(total >= 200, "only {total} connections during the rotation");

    let (_, roots) = dumped_issuers(&m.b)?;
    ensure!(
        roots.len() == 1 && !old_roots.contains(&roots[0]),
        "bundle after rotation: {roots:?} (old {old_roots:?})"
    );
    for node in [&m.a, &m.b] {
        let s = Metrics::scrape(node)?;
        assert_eq!(s.sum("ambit_trust_bundle_roots", &[]), 1.0);
        assert_eq!(
            s.sum("ambit_ca_reloads_total", &[("result", "failure")]),
            0.0,
            "{}",
            s.text
        );
        assert!(
            s.sum(
                "ambit_certificate_renewals_total",
                &[("reason", "issuer_changed"), ("result", "success")]
            ) >= 1.0
        );
    }
    // New connections on the new anchor alone work; nothing logged a failed handshake, and
    // leaves renewing on time never looked close to expiry.
    assert_eq!(http_get(&m.client, &m.api)?, 200);
    for zt in [&m.zt_a, &m.zt_b] {
        let bad: Vec<Value> = zt
            .logs()
            .into_iter()
            .filter(|v| {
                message(v).is_some_and(|m| {
                    m.contains("handshake failed")
                        || m.contains("close to expiry")
                        || m.contains("renewal failed")
                })
            })
            .collect();
        ensure!(bad.is_empty(), "unexpected warnings: {bad:#?}");
    }
    eprintln!("trust-anchor rotation: {total} connections, none lost");
    Ok(())
}
