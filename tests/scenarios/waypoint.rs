//! The waypoint, end to end on a simulated cluster: real `waypoint` and `ztunnel`
//! processes, real HBONE both ways.
//!
//! Topology: node `a` runs `shop/web-1`, `shop/web-2` and the waypoint pod
//! `shop/waypoint` (service account `waypoint`, not captured); node `b` runs `shop/web-3`,
//! the probe pod `shop/client` (not captured) and `shop/app` (captured). Each `web-N`
//! serves HTTP on 8080 (`hello from web-N`) and again on 8081, where `web-1` answers 503
//! half the time; `web-2` also runs a TCP echo on 9000. Three services, all labelled
//! `ambit.dev/use-waypoint: waypoint`: `web` (VIP port 80 → 8080), `flaky` (80 → 8081) and
//! `echo` (9000). The config declares the waypoint, so the backends' ztunnels accept their
//! traffic only from the waypoint's identity.
//!
//! The probe pod plays a source ztunnel: `ambit-hbone-probe` opens HBONE to the waypoint
//! with a `shop/client` certificate from `ztunnel ca issue` and speaks HTTP inside.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use harness::config::{DATAPLANE_MODE, NONE};
use harness::ztunnel::{field, field_str, message};
use harness::{Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts};
use serde_json::Value;

const TRUST_DOMAIN: &str = "cluster.local";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const LONG: Duration = Duration::from_secs(30);
const PROBE_TIME: Duration = Duration::from_secs(90);
/// Requests per run.
const N: u64 = 300;

/// Fields drop in declaration order: processes first, the cluster last.
struct World {
    _apps: Vec<Proc>,
    waypoint: Proc,
    _zt: (Ztunnel, Ztunnel),
    client: Pod,
    app: Pod,
    wp: Pod,
    cert: (PathBuf, PathBuf),
    /// VIPs of `web`, `flaky` and `echo`.
    vips: [String; 3],
    _nodes: (Node, Node),
    cluster: Cluster,
}

fn world() -> Result<World> {
    let cluster = Cluster::new()?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let mut webs = Vec::new();
    for (i, node) in [(1, &a), (2, &a), (3, &b)] {
        webs.push(
            cluster.add_pod(
                node,
                PodSpec::new(format!("web-{i}"))
                    .namespace("shop")
                    .service_account("web")
                    .label("app", "web"),
            )?,
        );
    }
    let wp = cluster.add_pod(
        &a,
        PodSpec::new("waypoint")
            .namespace("shop")
            .service_account("waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint")
            .label(DATAPLANE_MODE, NONE),
    )?;
    let client = cluster.add_pod(
        &b,
        PodSpec::new("client")
            .namespace("shop")
            .service_account("client")
            .label(DATAPLANE_MODE, NONE),
    )?;
    let app = cluster.add_pod(
        &b,
        PodSpec::new("app").namespace("shop").service_account("app"),
    )?;
    cluster.enroll_namespace("shop")?;
    let s = cluster.slot();
    let vips = [
        format!("10.{s}.250.10"),
        format!("10.{s}.250.11"),
        format!("10.{s}.250.12"),
    ];
    let services = format!(
        r#"
- name: web
  namespace: shop
  vips: [{web}]
  ports: [{{ name: http, port: 80, targetPort: 8080 }}]
  selector: {{ app: web }}
  labels: {{ ambit.dev/use-waypoint: waypoint }}
- name: flaky
  namespace: shop
  vips: [{flaky}]
  ports: [{{ name: http, port: 80, targetPort: 8081 }}]
  selector: {{ app: web }}
  labels: {{ ambit.dev/use-waypoint: waypoint }}
- name: echo
  namespace: shop
  vips: [{echo}]
  ports: [{{ port: 9000 }}]
  endpoints: [{{ workload: web-2 }}]
  labels: {{ ambit.dev/use-waypoint: waypoint }}
"#,
        web = vips[0],
        flaky = vips[1],
        echo = vips[2],
    );
    cluster.edit_config(|c| -> Result<()> {
        c.services = serde_yaml_ng::from_str(&services).context("services YAML")?;
        c.extra.insert(
            "waypoints".into(),
            serde_yaml_ng::from_str(
                "[{ name: waypoint, namespace: shop, serviceAccount: waypoint }]",
            )
            .context("waypoints YAML")?,
        );
        Ok(())
    })?;
    cluster.init_ca(TRUST_DOMAIN)?;
    cluster.write_config()?;

    let mut apps = Vec::new();
    for web in &webs {
        let name = web.name();
        apps.push(web.spawn_testapp(&["http", "--listen", "0.0.0.0:8080", "--name", name])?);
        let fail_rate = if name == "web-1" { "0.5" } else { "0" };
        apps.push(web.spawn_testapp(&[
            "http",
            "--listen",
            "0.0.0.0:8081",
            "--name",
            name,
            "--fail-rate",
            fail_rate,
        ])?);
    }
    apps.push(webs[1].spawn_testapp(&["echo", "--listen", "0.0.0.0:9000"])?);
    let zt_a = a.start_ztunnel(&ZtunnelOpts::default())?;
    let zt_b = b.start_ztunnel(&ZtunnelOpts::default())?;
    zt_a.wait_ready(LONG)?;
    zt_b.wait_ready(LONG)?;

    let mut cmd = wp.command(harness::bin_path("waypoint")?);
    cmd.arg("run")
        .arg("--config")
        .arg(cluster.config_path())
        .args(["--name", "waypoint", "--namespace", "shop"])
        .arg("--ca-dir")
        .arg(cluster.ca_dir())
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let waypoint = wp.spawn(&mut cmd)?;
    waypoint
        .log()
        .wait_for(0, LONG, |l| {
            l.json.as_ref().and_then(message) == Some("waypoint ready")
        })
        .with_context(|| format!("waypoint did not start:\n{}", waypoint.log().tail(30)))?;
    let cert = cluster.issue_cert(CLIENT_ID)?;
    Ok(World {
        _apps: apps,
        waypoint,
        _zt: (zt_a, zt_b),
        client,
        app,
        wp,
        cert,
        vips,
        _nodes: (a, b),
        cluster,
    })
}

impl World {
    /// Runs `ambit-hbone-probe` from the client pod to the waypoint, with CONNECT
    /// authority `target`, and parses what it prints.
    fn probe(&self, target: &str, extra: &[&str]) -> Result<Value> {
        let mut cmd = self.client.command(harness::bin_path("ambit-hbone-probe")?);
        cmd.args(["--to", &format!("{}:15008", self.wp.ip())])
            .args(["--server-identity", WAYPOINT_ID])
            .arg("--cert")
            .arg(&self.cert.0)
            .arg("--key")
            .arg(&self.cert.1)
            .arg("--bundle")
            .arg(self.cluster.ca_dir().join("bundle.pem"))
            .args(["--target", target, "--timeout-secs", "80"])
            .args(extra);
        let out = self.client.run_ok(&mut cmd, PROBE_TIME)?;
        let v: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out}"))?;
        if let Some(e) = v.get("error") {
            bail!(
                "probe to {target} failed: {e}\nwaypoint log:\n{}",
                self.waypoint.log().tail(20)
            );
        }
        Ok(v)
    }

    fn metrics(&self) -> Result<String> {
        let url = format!("http://{}:15020/metrics", self.wp.ip());
        self.client
            .run_ok(
                self.client.command("curl").args(["-sS", "-m", "10", &url]),
                Duration::from_secs(15),
            )
            .context("scraping the waypoint")
    }

    /// The waypoint's access-log lines so far.
    fn access_lines(&self) -> Vec<Value> {
        self.waypoint
            .log()
            .lines()
            .into_iter()
            .filter_map(|l| l.json)
            .filter(|v| v.get("target").and_then(Value::as_str) == Some("access"))
            .collect()
    }
}

fn count(v: &Value, section: &str, key: &str) -> u64 {
    v.get(section)
        .and_then(|s| s.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Every `web-N` got at least a fifth of `total`: requests were balanced one by one.
fn check_spread(v: &Value, total: u64, what: &str) -> Result<()> {
    let per: BTreeMap<&str, u64> = ["web-1", "web-2", "web-3"]
        .into_iter()
        .map(|n| (n, count(v, "bodies", &format!("hello from {n}"))))
        .collect();
    ensure!(
        per.values().sum::<u64>() == total && per.values().all(|c| c * 5 >= total),
        "{what}: responses per endpoint {per:?} (want {total} spread over all three): {v}"
    );
    Ok(())
}

/// Sum of the `istio_requests_total` series whose labels contain every `want`.
fn requests_total(metrics: &str, want: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn waypoint_balances_retries_forwards_and_reports() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let w = world()?;
    let n = N.to_string();
    let web = format!("{}:80", w.vips[0]);

    // HTTP/1.1: one tunnel, one keep-alive connection, N requests spread over all three
    // endpoints, reached over HBONE with the waypoint's identity.
    let h1 = w.probe(
        &web,
        &["--http1", &n, "--host", "web.shop", "--path", "/h1"],
    )?;
    eprintln!("HTTP/1.1 keep-alive: {h1}");
    ensure!(count(&h1, "statuses", "200") == N, "HTTP/1.1: {h1}");
    check_spread(&h1, N, "HTTP/1.1 keep-alive")?;

    // h2c: one connection, 10 requests in flight at a time, balanced per request.
    let h2 = w.probe(
        &web,
        &["--h2c", &n, "--concurrency", "10", "--host", "web.shop"],
    )?;
    eprintln!("h2c: {h2}");
    ensure!(count(&h2, "statuses", "200") == N, "h2c: {h2}");
    check_spread(&h2, N, "h2c")?;

    // web-1 fails half its requests on 8081; the default retry (2 retries, another
    // endpoint first) hides it.
    let flaky_n = 400u64;
    let flaky = w.probe(
        &format!("{}:80", w.vips[1]),
        &["--http1", &flaky_n.to_string(), "--host", "flaky.shop"],
    )?;
    let flaky_ok = count(&flaky, "statuses", "200");
    eprintln!("flaky (web-1 at 50 % 503): {flaky}");
    ensure!(
        flaky_ok * 100 >= flaky_n * 99,
        "with retries only {flaky_ok} of {flaky_n} succeeded: {flaky}"
    );
    ensure!(
        count(&flaky, "bodies", "hello from web-1") > 0,
        "web-1 never answered successfully, so it was never tried: {flaky}"
    );

    // Not HTTP: forwarded at L4.
    let echo = w.probe(&format!("{}:9000", w.vips[2]), &["--send", "ping\n"])?;
    ensure!(
        echo.get("status").and_then(Value::as_u64) == Some(200)
            && echo.get("received").and_then(Value::as_str) == Some("ping\n"),
        "L4 echo through the waypoint: {echo}"
    );

    // A destination this waypoint does not serve: 400.
    let s = w.cluster.slot();
    let stranger = w.probe(&format!("10.{s}.250.99:80"), &["--send", "x"])?;
    ensure!(
        stranger.get("status").and_then(Value::as_u64) == Some(400),
        "unknown VIP: {stranger}"
    );

    // Metrics match what was sent.
    let metrics = w.metrics()?;
    let web_ok = requests_total(
        &metrics,
        &[
            r#"reporter="waypoint""#,
            r#"destination_service="web.shop.svc.cluster.local""#,
            r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#,
            r#"destination_principal="spiffe://cluster.local/ns/shop/sa/web""#,
            r#"response_code="200""#,
        ],
    );
    ensure!(
        web_ok == 2 * N,
        "istio_requests_total for web: {web_ok}, want {}",
        2 * N
    );
    for i in 1..=3 {
        let per = requests_total(
            &metrics,
            &[
                r#"destination_service="web.shop.svc.cluster.local""#,
                &format!(r#"destination_workload="web-{i}""#),
            ],
        );
        ensure!(per > 0, "no requests recorded for web-{i}");
    }
    let flaky_recorded = requests_total(
        &metrics,
        &[
            r#"destination_service="flaky.shop.svc.cluster.local""#,
            r#"response_code="200""#,
        ],
    );
    ensure!(
        flaky_recorded == flaky_ok,
        "flaky: {flaky_recorded} recorded, {flaky_ok} seen"
    );
    let retries: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("ambit_waypoint_retries_total{")
                && l.contains(r#"destination="shop/flaky""#)
                && l.contains(r#"result="admitted""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    eprintln!("retries admitted for shop/flaky: {retries}");
    ensure!(retries > 0, "no retries recorded:\n{metrics}");
    ensure!(
        metrics.contains("istio_tcp_connections_closed_total{"),
        "no L4 metrics"
    );

    // One access-log line per request, with the trace id and the endpoint.
    let access = w.access_lines();
    let web_lines: Vec<&Value> = access
        .iter()
        .filter(|v| field_str(v, "destination") == "shop/web")
        .collect();
    ensure!(
        web_lines.len() as u64 == 2 * N,
        "{} access lines for shop/web, want {}",
        web_lines.len(),
        2 * N
    );
    let line = web_lines[0];
    ensure!(field_str(line, "src.identity") == CLIENT_ID, "{line}");
    ensure!(field_str(line, "trace_id").len() == 32, "{line}");
    ensure!(field_str(line, "upstream").ends_with(":8080"), "{line}");
    ensure!(
        field(line, "status").and_then(Value::as_u64) == Some(200),
        "{line}"
    );

    // The whole path: a captured app calls the service VIP; its ztunnel tunnels to the
    // waypoint with the app's identity; the waypoint sends on to a backend.
    let out = w.app.run_ok(
        w.app
            .command("curl")
            .args(["-sS", "-m", "10", &format!("http://{web}/through-ztunnel")]),
        Duration::from_secs(15),
    )?;
    ensure!(
        out.starts_with("hello from web-"),
        "curl via ztunnel: {out:?}"
    );
    let via = w
        .waypoint
        .log()
        .wait_for(0, LONG, |l| {
            l.json
                .as_ref()
                .is_some_and(|v| field_str(v, "path") == "/through-ztunnel")
        })
        .context("the waypoint never saw the app's request")?;
    let via = via.json.unwrap_or_default();
    ensure!(
        field_str(&via, "src.identity") == "spiffe://cluster.local/ns/shop/sa/app",
        "the waypoint saw {via}"
    );
    Ok(())
}
