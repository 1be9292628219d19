//! Acceptance tests for the waypoint, through the full path: a plain client (curl or
//! `ambit-testapp`) in an enrolled pod calls a service VIP; its node's ztunnel captures the
//! connection and tunnels it to the waypoint pod; the waypoint routes each request and opens
//! HBONE to the backend pods through their ztunnels.
//!
//! Topology (one cluster per test, built by [`world`]; the tests run one at a time):
//!
//! ```text
//! node a: shop/waypoint (not captured), shop/web-1 (version v1), shop/web-3 (version v3)
//! node b: shop/web-2 (version v2), shop/client (enrolled), legacy/outsider (not enrolled)
//! ```
//!
//! Every `web-N` runs `ambit-testapp http` (answering `hello from web-N`, and gRPC) on:
//! 8080 (healthy), 8081 (web-1 fails 50 % with 503, the others never), 8082 (answers after
//! 2 s) and 8083 (always 503). Namespace `shop` carries `ambit.dev/use-waypoint: waypoint`,
//! so all its services go through the waypoint:
//!
//! | service | VIP port → target | endpoints | route |
//! |---|---|---|---|
//! | `reviews` | 80 → 8080 | all | HTTPRoute: matches → `reviews-v2`, `/slow` → `slow` (500 ms), else 90/10 |
//! | `reviews-v1`, `reviews-v2` | 80 → 8080 | web-1, web-2 | – |
//! | `slow` | 80 → 8082 | web-1 | – |
//! | `flaky` | 80 → 8081 | all | HTTPRoute with `retry: {attempts: 3, codes: [503]}` |
//! | `flaky-default` | 80 → 8081 | all | none: the default retry |
//! | `down` | 80 → 8083 | all | HTTPRoute with `retry: {attempts: 2, codes: [503], backoff: 500ms}` |
//! | `grpc` | 9090 → 8080 | all | GRPCRoute on `ambit.test.Echo` |
//!
//! The waypoint runs with `--retry-buffer-bytes 1024`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use harness::config::{DATAPLANE_MODE, NONE, USE_WAYPOINT};
use harness::ztunnel::{field, field_str, message};
use harness::{Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts};
use serde_json::Value;

const TRUST_DOMAIN: &str = "cluster.local";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const LONG: Duration = Duration::from_secs(30);
const RUN: Duration = Duration::from_secs(120);
/// Request-body bytes the waypoint keeps for a retry (`--retry-buffer-bytes`).
const RETRY_BUFFER: usize = 1024;
/// The `slow` backend's delay and the route's `backendRequest` timeout.
const SLOW_DELAY_MS: u64 = 2000;
const BACKEND_TIMEOUT_MS: u64 = 500;
/// The `down` route's retries and backoff (see the outage test for the bound).
const DOWN_RETRIES: u64 = 2;
const DOWN_BACKOFF_MS: u64 = 500;

/// One cluster at a time: they are heavy for a 2-core machine, and the timing assertions
/// should not measure contention between tests.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fields drop in declaration order: processes first, the cluster last.
struct World {
    _apps: Vec<Proc>,
    waypoint: Proc,
    zt: (Ztunnel, Ztunnel),
    client: Pod,
    outsider: Pod,
    wp: Pod,
    webs: Vec<Pod>,
    /// Service name → VIP.
    vips: BTreeMap<&'static str, String>,
    _nodes: (Node, Node),
    cluster: Cluster,
}

const SERVICES: [&str; 7] = [
    "reviews",
    "slow",
    "flaky",
    "flaky-default",
    "down",
    "grpc",
    "reviews-v1",
];

fn services_yaml(vips: &BTreeMap<&'static str, String>) -> String {
    let vip = |n: &str| vips[n].clone();
    format!(
        r#"
- {{ name: reviews, namespace: shop, vips: [{reviews}], ports: [{{ name: http, port: 80, targetPort: 8080 }}], selector: {{ app: web }} }}
- {{ name: reviews-v1, namespace: shop, vips: [{v1}], ports: [{{ port: 80, targetPort: 8080 }}], selector: {{ app: web, version: v1 }} }}
- {{ name: reviews-v2, namespace: shop, ports: [{{ port: 80, targetPort: 8080 }}], selector: {{ app: web, version: v2 }} }}
- {{ name: slow, namespace: shop, vips: [{slow}], ports: [{{ port: 80, targetPort: 8082 }}], selector: {{ app: web, version: v1 }} }}
- {{ name: flaky, namespace: shop, vips: [{flaky}], ports: [{{ port: 80, targetPort: 8081 }}], selector: {{ app: web }} }}
- {{ name: flaky-default, namespace: shop, vips: [{flaky_default}], ports: [{{ port: 80, targetPort: 8081 }}], selector: {{ app: web }} }}
- {{ name: down, namespace: shop, vips: [{down}], ports: [{{ port: 80, targetPort: 8083 }}], selector: {{ app: web }} }}
- {{ name: grpc, namespace: shop, vips: [{grpc}], ports: [{{ name: grpc, port: 9090, targetPort: 8080 }}], selector: {{ app: web }} }}
"#,
        reviews = vip("reviews"),
        v1 = vip("reviews-v1"),
        slow = vip("slow"),
        flaky = vip("flaky"),
        flaky_default = vip("flaky-default"),
        down = vip("down"),
        grpc = vip("grpc"),
    )
}

/// The Gateway API routes, with the `reviews` default rule split `v1`/`v2`.
fn routes_yaml(v1: u32, v2: u32) -> String {
    format!(
        r#"
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {{ name: reviews, namespace: shop }}
  spec:
    parentRefs: [{{ group: "", kind: Service, name: reviews, port: 80 }}]
    rules:
      - matches: [{{ headers: [{{ name: x-canary, value: "true" }}] }}]
        backendRefs: [{{ name: reviews-v2, port: 80 }}]
      - matches: [{{ path: {{ type: PathPrefix, value: /v2 }} }}]
        filters:
          - type: URLRewrite
            urlRewrite: {{ path: {{ type: ReplacePrefixMatch, replacePrefixMatch: / }} }}
        backendRefs: [{{ name: reviews-v2, port: 80 }}]
      - matches: [{{ method: POST }}]
        backendRefs: [{{ name: reviews-v2, port: 80 }}]
      - matches: [{{ path: {{ type: PathPrefix, value: /slow }} }}]
        backendRefs: [{{ name: slow, port: 80 }}]
        timeouts: {{ backendRequest: {BACKEND_TIMEOUT_MS}ms }}
      - backendRefs:
          - {{ name: reviews-v1, port: 80, weight: {v1} }}
          - {{ name: reviews-v2, port: 80, weight: {v2} }}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {{ name: flaky, namespace: shop }}
  spec:
    parentRefs: [{{ group: "", kind: Service, name: flaky }}]
    rules:
      - backendRefs: [{{ name: flaky, port: 80 }}]
        retry: {{ attempts: 3, codes: [503] }}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {{ name: down, namespace: shop }}
  spec:
    parentRefs: [{{ group: "", kind: Service, name: down }}]
    rules:
      - backendRefs: [{{ name: down, port: 80 }}]
        retry: {{ attempts: {DOWN_RETRIES}, codes: [503], backoff: {DOWN_BACKOFF_MS}ms }}
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata: {{ name: grpc, namespace: shop }}
  spec:
    parentRefs: [{{ group: "", kind: Service, name: grpc }}]
    rules:
      - matches: [{{ method: {{ service: ambit.test.Echo }} }}]
        backendRefs: [{{ name: grpc, port: 9090 }}]
"#
    )
}

fn set_routes(cluster: &Cluster, v1: u32, v2: u32) -> Result<()> {
    let routes = serde_yaml_ng::from_str(&routes_yaml(v1, v2)).context("routes YAML")?;
    cluster.edit_config(|c| {
        c.extra.insert("routes".into(), routes);
    });
    Ok(())
}

fn world() -> Result<World> {
    let cluster = Cluster::new()?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let mut webs = Vec::new();
    for (i, node) in [(1, &a), (2, &b), (3, &a)] {
        webs.push(
            cluster.add_pod(
                node,
                PodSpec::new(format!("web-{i}"))
                    .namespace("shop")
                    .service_account("web")
                    .label("app", "web")
                    .label("version", format!("v{i}")),
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
            .service_account("client"),
    )?;
    let outsider = cluster.add_pod(&b, PodSpec::new("outsider").namespace("legacy"))?;
    cluster.enroll_namespace("shop")?;
    cluster.set_namespace_label("shop", USE_WAYPOINT, Some("waypoint"))?;
    let s = cluster.slot();
    let vips: BTreeMap<&'static str, String> = SERVICES
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, format!("10.{s}.250.{}", 10 + i)))
        .collect();
    let services = services_yaml(&vips);
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
    set_routes(&cluster, 90, 10)?;
    cluster.init_ca(TRUST_DOMAIN)?;
    cluster.write_config()?;

    let mut apps = Vec::new();
    let delay = SLOW_DELAY_MS.to_string();
    for web in &webs {
        let name = web.name();
        let flaky = if name == "web-1" { "0.5" } else { "0" };
        for extra in [
            vec!["--listen", "0.0.0.0:8080"],
            vec!["--listen", "0.0.0.0:8081", "--fail-rate", flaky],
            vec!["--listen", "0.0.0.0:8082", "--delay-ms", &delay],
            vec!["--listen", "0.0.0.0:8083", "--fail-rate", "1"],
        ] {
            let mut args = vec!["http", "--name", name];
            args.extend(extra);
            apps.push(web.spawn_testapp(&args)?);
        }
    }
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
        .args(["--retry-buffer-bytes", &RETRY_BUFFER.to_string()])
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
    Ok(World {
        _apps: apps,
        waypoint,
        zt: (zt_a, zt_b),
        client,
        outsider,
        wp,
        webs,
        vips,
        _nodes: (a, b),
        cluster,
    })
}

/// Takes the serial lock (surviving a poisoned one) and builds the world.
fn setup() -> Result<(std::sync::MutexGuard<'static, ()>, World)> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Ok((guard, world()?))
}

impl World {
    fn vip(&self, service: &str, port: u16) -> String {
        format!("{}:{port}", self.vips[service])
    }

    /// `ambit-testapp http-load` from the client pod (through its ztunnel).
    fn load(&self, to: &str, args: &[&str]) -> Result<Value> {
        load_from(&self.client, to, args)
    }

    /// `ambit-testapp grpc` from the client pod.
    fn grpc(&self, to: &str, args: &[&str]) -> Result<Value> {
        let mut all = vec!["grpc", "--to", to, "--host", "grpc.shop"];
        all.extend_from_slice(args);
        let v = self.client.run_testapp(&all, RUN)?;
        if v.get("error").is_some() {
            bail!("grpc client failed: {v}\n{}", self.waypoint.log().tail(20));
        }
        Ok(v)
    }

    /// The waypoint's metrics, scraped from inside its pod.
    fn metrics(&self) -> Result<String> {
        self.wp
            .run_ok(
                self.wp
                    .command("curl")
                    .args(["-sS", "-m", "10", "http://127.0.0.1:15020/metrics"]),
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

    /// Access-log lines for requests to `destination` (`shop/<service>`).
    fn access_for(&self, destination: &str) -> Vec<Value> {
        self.access_lines()
            .into_iter()
            .filter(|v| field_str(v, "destination") == destination)
            .collect()
    }
}

fn load_from(pod: &Pod, to: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["http-load", "--to", to];
    all.extend_from_slice(args);
    let v = pod.run_testapp(&all, RUN)?;
    if v.get("error").is_some() {
        bail!("http-load to {to} failed: {v}");
    }
    Ok(v)
}

fn count(v: &Value, section: &str, key: &str) -> u64 {
    v.get(section)
        .and_then(|s| s.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn field_u64(v: &Value, key: &str) -> u64 {
    field(v, key).and_then(Value::as_u64).unwrap_or(0)
}

/// Sum of the series of `metric` whose labels contain every `want`.
fn metric_sum(metrics: &str, metric: &str, want: &[&str]) -> u64 {
    let prefix = format!("{metric}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The two-sided 99.9 % binomial acceptance interval for `n` trials at `p`
/// (normal approximation, z = 3.29): (2000, 0.1) → 156..=244, (2000, 0.5) → 927..=1073.
fn binomial_bounds(n: u64, p: f64) -> (u64, u64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let z = 3.290_5;
    (
        (mean - z * sd).ceil() as u64,
        (mean + z * sd).floor() as u64,
    )
}

/// Every request ended in 200, and none failed.
fn all_ok(v: &Value, n: u64, what: &str) -> Result<()> {
    ensure!(
        count(v, "statuses", "200") == n,
        "{what}: want {n} × 200, got {v}"
    );
    Ok(())
}

// === 1. weighted split and hot reload ===

#[test]
fn weighted_split_and_hot_reload() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let reviews = w.vip("reviews", 80);
    let n: u64 = 2000;

    // 90/10 over HTTP/1.1 keep-alive, 8 connections.
    let split = w.load(
        &reviews,
        &[
            "--requests",
            "2000",
            "--concurrency",
            "8",
            "--host",
            "reviews.shop",
        ],
    )?;
    all_ok(&split, n, "90/10 split")?;
    let v2 = count(&split, "bodies", "hello from web-2");
    let v1 = count(&split, "bodies", "hello from web-1");
    let (lo, hi) = binomial_bounds(n, 0.1);
    eprintln!("90/10: v1 {v1}, v2 {v2} (want v2 in {lo}..={hi}); {split}");
    ensure!((156, 244) == (lo, hi), "bounds {lo}..={hi}");
    ensure!(v1 + v2 == n, "responses from other backends: {split}");
    ensure!(
        (lo..=hi).contains(&v2),
        "v2 got {v2} of {n}, want {lo}..={hi}"
    );

    // Change to 50/50 while a request stream runs across the reload.
    let cursor = w.waypoint.log().len();
    let during = std::thread::scope(|s| -> Result<Value> {
        let stream = s.spawn(|| {
            load_from(
                &w.client,
                &reviews,
                &[
                    "--requests",
                    "600",
                    "--concurrency",
                    "4",
                    "--pause-ms",
                    "10",
                    "--host",
                    "reviews.shop",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        set_routes(&w.cluster, 50, 50)?;
        w.cluster.write_config()?;
        w.waypoint
            .log()
            .wait_for(cursor, LONG, |l| {
                l.json.as_ref().and_then(message) == Some("config reloaded")
            })
            .context("the waypoint never logged \"config reloaded\"")?;
        let reloaded_while_running = !stream.is_finished();
        let v = stream
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        ensure!(
            reloaded_while_running,
            "the request stream ended before the reload; make it longer: {v}"
        );
        Ok(v)
    })?;
    eprintln!("requests across the reload: {during}");
    all_ok(&during, 600, "requests in flight across the reload")?;

    let split = w.load(
        &reviews,
        &[
            "--requests",
            "2000",
            "--concurrency",
            "8",
            "--host",
            "reviews.shop",
        ],
    )?;
    all_ok(&split, n, "50/50 split")?;
    let v2 = count(&split, "bodies", "hello from web-2");
    let (lo, hi) = binomial_bounds(n, 0.5);
    eprintln!("50/50: v2 {v2} (want {lo}..={hi}); {split}");
    ensure!(
        (lo..=hi).contains(&v2),
        "after reload v2 got {v2} of {n}, want {lo}..={hi}"
    );
    Ok(())
}

// === 2. matching ===

#[test]
fn header_path_and_method_matches_route_to_v2() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let reviews = w.vip("reviews", 80);
    let n = 50u64;
    let ns = n.to_string();
    let base = ["--requests", ns.as_str(), "--host", "reviews.shop"];

    let mut args = base.to_vec();
    args.extend(["--header", "x-canary: true"]);
    let canary = w.load(&reviews, &args)?;
    eprintln!("x-canary: true → {canary}");
    ensure!(
        count(&canary, "bodies", "hello from web-2") == n,
        "header match: {canary}"
    );

    let mut args = base.to_vec();
    args.extend(["--path", "/v2/ratings"]);
    let path = w.load(&reviews, &args)?;
    eprintln!("/v2/ratings → {path}");
    ensure!(
        count(&path, "bodies", "hello from web-2") == n,
        "path match: {path}"
    );
    ensure!(
        count(&path, "paths", "/ratings") == n,
        "URLRewrite ReplacePrefixMatch /: backend should see /ratings: {path}"
    );

    let mut args = base.to_vec();
    args.extend(["--method", "POST", "--body-bytes", "100"]);
    let post = w.load(&reviews, &args)?;
    eprintln!("POST → {post}");
    ensure!(
        count(&post, "bodies", "hello from web-2") == n,
        "method match: {post}"
    );

    // Control: a GET without the header on another path takes the 90/10 split, so web-1
    // answers most.
    let mut args = base.to_vec();
    args.extend(["--path", "/v2x"]);
    let other = w.load(&reviews, &args)?;
    eprintln!("/v2x (no match, split) → {other}");
    all_ok(&other, n, "unmatched")?;
    ensure!(
        count(&other, "bodies", "hello from web-1") >= n / 2,
        "/v2x must not match PathPrefix /v2: {other}"
    );
    ensure!(
        count(&other, "paths", "/v2x") == n,
        "unrewritten path: {other}"
    );
    Ok(())
}

// === 3. timeouts ===

#[test]
fn backend_request_timeout_answers_504() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let reviews = w.vip("reviews", 80);
    let mut code_and_time = Vec::new();
    for i in 0..3 {
        let url = format!("http://{reviews}/slow/{i}");
        let out = w.client.run_ok(
            w.client.command("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-m",
                "10",
                "-H",
                "host: reviews.shop",
                "-w",
                "%{http_code} %{time_total}",
                &url,
            ]),
            Duration::from_secs(15),
        )?;
        let (code, secs) = out.trim().split_once(' ').context("curl -w output")?;
        let secs: f64 = secs.parse().context("time_total")?;
        code_and_time.push((code.to_string(), secs));
    }
    eprintln!(
        "backendRequest {BACKEND_TIMEOUT_MS}ms against a {SLOW_DELAY_MS}ms backend: {code_and_time:?}"
    );
    for (code, secs) in &code_and_time {
        ensure!(code == "504", "want 504, got {code} ({code_and_time:?})");
        ensure!(
            *secs >= BACKEND_TIMEOUT_MS as f64 / 1000.0 * 0.9 && *secs < 3.0,
            "504 after {secs}s; want about {BACKEND_TIMEOUT_MS} ms (< 3 s)"
        );
    }
    let lines = w.access_for("shop/slow");
    ensure!(
        lines.len() == 3 && lines.iter().all(|l| field_u64(l, "status") == 504),
        "access log for shop/slow: {lines:?}"
    );
    Ok(())
}

// === 4. retries, the body cap and the retry budget ===

#[test]
fn retries_body_cap_and_budget() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let n = 400u64;
    let ns = n.to_string();

    // web-1 answers 503 half the time on `flaky` and `flaky-default`.
    for (service, what) in [
        ("flaky", "route retry {attempts: 3, codes: [503]}"),
        ("flaky-default", "default retry"),
    ] {
        let v = w.load(
            &w.vip(service, 80),
            &[
                "--requests",
                &ns,
                "--concurrency",
                "3",
                "--host",
                "flaky.shop",
            ],
        )?;
        let ok = count(&v, "statuses", "200");
        let metrics = w.metrics()?;
        let retries = metric_sum(
            &metrics,
            "ambit_waypoint_retries_total",
            &[
                &format!(r#"destination="shop/{service}""#),
                r#"result="admitted""#,
            ],
        );
        eprintln!("{service} ({what}): {ok}/{n} succeeded, {retries} retries: {v}");
        let failed: Vec<String> = w
            .access_for(&format!("shop/{service}"))
            .iter()
            .filter(|l| field_u64(l, "status") != 200)
            .map(|l| {
                format!(
                    "{} attempts={} flags={} upstream={}",
                    field_u64(l, "status"),
                    field_u64(l, "attempts"),
                    field_str(l, "response_flags"),
                    field_str(l, "upstream")
                )
            })
            .collect();
        let retry_lines: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("ambit_waypoint_retries_total{")
                    && l.contains(&format!(r#"destination="shop/{service}""#))
            })
            .collect();
        eprintln!("{service}: failed {failed:?}\n{retry_lines:#?}");
        ensure!(
            ok * 100 >= n * 99,
            "{what}: only {ok} of {n} succeeded: {v}"
        );
        ensure!(retries > 0, "{what}: no retries recorded");
        ensure!(
            count(&v, "bodies", "hello from web-1") > 0,
            "{what}: web-1 never answered, so it was never tried: {v}"
        );
    }

    // Request bodies: under the cap a POST is retried; over it (the body was sent and no
    // copy kept) it is attempted once. `down` always answers 503.
    let down = w.vip("down", 80);
    let small = (RETRY_BUFFER / 2).to_string();
    let big = (RETRY_BUFFER * 4).to_string();
    for (bytes, want_attempts) in [(small.as_str(), 1 + DOWN_RETRIES), (big.as_str(), 1)] {
        let cursor = w.access_for("shop/down").len();
        let v = w.load(
            &down,
            &[
                "--requests",
                "1",
                "--method",
                "POST",
                "--body-bytes",
                bytes,
                "--host",
                "down.shop",
            ],
        )?;
        ensure!(count(&v, "statuses", "503") == 1, "POST to down: {v}");
        let lines = w.access_for("shop/down");
        let line = lines.get(cursor).context("no access line for the POST")?;
        let attempts = field_u64(line, "attempts");
        eprintln!("POST with a {bytes}-byte body (buffer {RETRY_BUFFER}): {attempts} attempts");
        ensure!(
            attempts == want_attempts,
            "POST with {bytes} bytes: {attempts} attempts, want {want_attempts}: {line}"
        );
    }

    // Total outage: every endpoint of `down` answers 503. Without a budget, R requests
    // would make R × (1 + DOWN_RETRIES) attempts. The budget admits a retry only while
    // (a) retries in the last 10 s stay within 20 % of the requests, or (b) fewer than 3
    // retries are in flight. A request holds its retry permit until it ends, at least one
    // backoff (b = 500 ms), so (b) admits at most 3 retries per b. Hence, for a run of
    // T < 9 s (nothing leaves the window), the bound asserted is
    //     attempts ≤ R + ⌊0.2 R⌋ + 3 × (⌈T / b⌉ + 1).
    let before = w.metrics()?;
    let dest = r#"destination="shop/down""#;
    let admitted_before = metric_sum(
        &before,
        "ambit_waypoint_retries_total",
        &[dest, r#"result="admitted""#],
    );
    let lines_before = w.access_for("shop/down").len();
    let r = 300u64;
    let start = Instant::now();
    let v = w.load(
        &down,
        &[
            "--requests",
            &r.to_string(),
            "--concurrency",
            "30",
            "--h2c",
            "--host",
            "down.shop",
        ],
    )?;
    let elapsed = start.elapsed();
    ensure!(count(&v, "statuses", "503") == r, "outage: {v}");
    let after = w.metrics()?;
    let admitted = metric_sum(
        &after,
        "ambit_waypoint_retries_total",
        &[dest, r#"result="admitted""#],
    ) - admitted_before;
    let refused = metric_sum(&after, "ambit_waypoint_retries_total", &[dest])
        - metric_sum(&before, "ambit_waypoint_retries_total", &[dest])
        - admitted;
    let lines = w.access_for("shop/down");
    let logged_attempts: u64 = lines[lines_before..]
        .iter()
        .map(|l| field_u64(l, "attempts"))
        .sum();
    let t_over_b = elapsed.as_millis().div_ceil(u128::from(DOWN_BACKOFF_MS)) as u64;
    let bound = r + r / 5 + 3 * (t_over_b + 1);
    eprintln!(
        "outage: {r} requests in {elapsed:?}, {logged_attempts} upstream attempts \
         ({admitted} retries admitted, {refused} refused); bound {bound}, unbudgeted {}",
        r * (1 + DOWN_RETRIES)
    );
    ensure!(
        elapsed < Duration::from_secs(9),
        "outage run took {elapsed:?}"
    );
    ensure!(
        logged_attempts == r + admitted,
        "access log attempts {logged_attempts} != {r} + {admitted} admitted retries"
    );
    ensure!(
        logged_attempts <= bound,
        "{logged_attempts} attempts > bound {bound}"
    );
    ensure!(refused > 0, "the budget refused no retry");
    Ok(())
}

// === 5. gRPC ===

#[test]
fn grpc_unary_and_server_streaming_spread_over_endpoints() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let grpc = w.vip("grpc", 9090);
    let calls = 1500u64;
    let cs = calls.to_string();
    for (method, extra) in [("unary", None), ("stream", Some("5"))] {
        let mut args = vec![
            "--calls",
            cs.as_str(),
            "--method",
            method,
            "--concurrency",
            "10",
        ];
        if let Some(m) = extra {
            args.extend(["--stream-messages", m]);
        }
        let v = w.grpc(&grpc, &args)?;
        eprintln!("gRPC {method}: {v}");
        ensure!(count(&v, "statuses", "0") == calls, "gRPC {method}: {v}");
        ensure!(
            count(&v, "short_streams", "") == 0 && v["short_streams"] == 0,
            "{v}"
        );
        let want_msgs = calls * extra.map_or(1, |m| m.parse().unwrap_or(1));
        ensure!(v["messages"].as_u64() == Some(want_msgs), "messages: {v}");
        // ±15 % of an even third.
        let third = calls as f64 / 3.0;
        for web in ["web-1", "web-2", "web-3"] {
            let got = count(&v, "servers", web) as f64;
            ensure!(
                (got - third).abs() <= 0.15 * third,
                "gRPC {method}: {web} served {got}, want {third:.0} ± 15 %: {v}"
            );
        }
    }
    let lines = w.access_for("shop/grpc");
    ensure!(
        lines.len() as u64 == 2 * calls
            && lines
                .iter()
                .all(|l| field_str(l, "grpc_status") == "0"
                    && field_str(l, "route").contains("grpc")),
        "access log: {} lines for shop/grpc, e.g. {:?}",
        lines.len(),
        lines.first()
    );
    Ok(())
}

// === 6. protocols ===

#[test]
fn http1_keepalive_h2c_and_grpc_through_the_full_path() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let v1 = w.vip("reviews-v1", 80);
    let urls: Vec<String> = (0..5)
        .map(|i| format!("http://{v1}/keepalive/{i}"))
        .collect();

    // HTTP/1.1: five URLs on one curl, one connection.
    let mut cmd = w.client.command("curl");
    cmd.args([
        "-sS",
        "-m",
        "20",
        "--http1.1",
        "-w",
        "[%{http_code} %{num_connects}]\n",
    ]);
    cmd.args(&urls);
    let out = w.client.run_ok(&mut cmd, Duration::from_secs(25))?;
    eprintln!("curl HTTP/1.1 keep-alive:\n{out}");
    let marks: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('[').map(|(_, m)| m.trim_end_matches(']')))
        .collect();
    ensure!(marks.len() == 5, "curl output: {out}");
    ensure!(
        marks.iter().all(|m| m.starts_with("200 ")),
        "statuses: {marks:?}"
    );
    let connects: u64 = marks
        .iter()
        .filter_map(|m| m.split(' ').nth(1)?.parse::<u64>().ok())
        .sum();
    ensure!(
        connects == 1,
        "curl opened {connects} connections for 5 URLs: {marks:?}"
    );
    ensure!(out.matches("hello from web-1").count() == 5, "{out}");
    let h1 = w
        .access_for("shop/reviews-v1")
        .into_iter()
        .filter(|l| field_str(l, "path").starts_with("/keepalive/"))
        .collect::<Vec<_>>();
    ensure!(
        h1.len() == 5
            && h1.iter().all(|l| field_str(l, "protocol") == "HTTP/1.1")
            && h1
                .iter()
                .all(|l| field_str(l, "src.addr") == field_str(&h1[0], "src.addr")),
        "waypoint access log (one client connection, HTTP/1.1): {h1:?}"
    );

    // h2c, prior knowledge: h2load multiplexes several requests on one connection. (curl
    // 7.88 cannot reuse a prior-knowledge connection for a second URL even against a plain
    // hyper server, so it is not used here.)
    let mut cmd = w.client.command("h2load");
    cmd.args([
        "-n",
        "3",
        "-c",
        "1",
        "-m",
        "1",
        &format!("http://{v1}/h2c/0"),
    ]);
    let out = w
        .client
        .run_ok(&mut cmd, Duration::from_secs(25))
        .with_context(|| format!("waypoint log:\n{}", w.waypoint.log().tail(20)))?;
    eprintln!("h2load h2c:\n{out}");
    ensure!(
        out.contains("Application protocol: h2c"),
        "h2load did not speak h2c: {out}"
    );
    ensure!(
        out.contains("3 succeeded, 0 failed, 0 errored"),
        "h2c: {out}"
    );
    ensure!(out.contains("status codes: 3 2xx"), "h2c: {out}");
    let h2 = w
        .access_for("shop/reviews-v1")
        .into_iter()
        .filter(|l| field_str(l, "path").starts_with("/h2c/"))
        .collect::<Vec<_>>();
    ensure!(
        h2.len() == 3 && h2.iter().all(|l| field_str(l, "protocol") == "HTTP/2.0"),
        "waypoint access log for h2c: {h2:?}"
    );

    // gRPC (unary and streaming).
    let grpc = w.vip("grpc", 9090);
    for method in ["unary", "stream"] {
        let v = w.grpc(&grpc, &["--calls", "20", "--method", method])?;
        ensure!(count(&v, "statuses", "0") == 20, "gRPC {method}: {v}");
    }
    Ok(())
}

// === 7. no bypass ===

#[test]
fn direct_access_to_a_waypoint_fronted_pod_is_refused() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let web1 = &w.webs[0];
    let direct = format!("{}:8080", web1.ip());

    // Sanity: the same pod answers through the waypoint.
    let via = w.load(&w.vip("reviews-v1", 80), &["--requests", "1"])?;
    all_ok(&via, 1, "through the waypoint")?;

    // (a) Plaintext from a pod outside the mesh, straight to the pod IP: ztunnel's 15006
    // resets it.
    let v = w.outsider.run_testapp(
        &[
            "connect",
            "--to",
            &direct,
            "--send",
            "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ],
        Duration::from_secs(15),
    )?;
    eprintln!("plaintext from legacy/outsider to {direct}: {v}");
    let received = v["received"].as_str().unwrap_or_default();
    ensure!(
        !received.contains("hello from") && v["result"] != "ok",
        "plaintext reached the app directly: {v}"
    );

    // (b) HBONE with a valid certificate straight to the pod's ztunnel: 401.
    let cert = w.cluster.issue_cert(CLIENT_ID)?;
    let cursor = w.zt.0.log_cursor();
    let mut cmd = w.outsider.command(harness::bin_path("ambit-hbone-probe")?);
    cmd.args(["--to", &format!("{}:15008", web1.ip())])
        .args(["--server-identity", WEB_ID])
        .arg("--cert")
        .arg(&cert.0)
        .arg("--key")
        .arg(&cert.1)
        .arg("--bundle")
        .arg(w.cluster.ca_dir().join("bundle.pem"))
        .args(["--target", &direct, "--send", "GET / HTTP/1.1\r\n\r\n"]);
    let out = w.outsider.run_ok(&mut cmd, Duration::from_secs(20))?;
    eprintln!("HBONE straight to web-1's ztunnel: {out}");
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("probe: {out}"))?;
    ensure!(v["status"].as_u64() == Some(401), "want 401: {v}");
    w.zt.0
        .wait_for_log_since(cursor, Duration::from_secs(10), |l| {
            serde_json::to_string(l).is_ok_and(|s| s.contains("bypass refused"))
        })
        .with_context(|| {
            format!(
                "node a's ztunnel never logged \"bypass refused\":\n{}",
                w.zt.0.tail(20)
            )
        })?;
    Ok(())
}

// === 8. metrics ===

#[test]
fn request_metrics_match_what_was_sent() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (_serial, w) = setup()?;
    let reviews = w.vip("reviews", 80);
    let ok_n = 120u64;
    let slow_n = 3u64;
    let v = w.load(
        &reviews,
        &[
            "--requests",
            &ok_n.to_string(),
            "--concurrency",
            "4",
            "--host",
            "reviews.shop",
        ],
    )?;
    all_ok(&v, ok_n, "GETs")?;
    let slow = w.load(
        &reviews,
        &[
            "--requests",
            &slow_n.to_string(),
            "--concurrency",
            "3",
            "--path",
            "/slow",
            "--host",
            "reviews.shop",
        ],
    )?;
    ensure!(count(&slow, "statuses", "504") == slow_n, "slow: {slow}");
    let grpc_n = 30u64;
    let g = w.grpc(&w.vip("grpc", 9090), &["--calls", &grpc_n.to_string()])?;
    ensure!(count(&g, "statuses", "0") == grpc_n, "{g}");

    let metrics = w.metrics()?;
    let base = [
        r#"reporter="waypoint""#,
        r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#,
        r#"source_workload="client""#,
    ];
    let get = |extra: &[&str]| {
        let mut want = base.to_vec();
        want.extend_from_slice(extra);
        metric_sum(&metrics, "istio_requests_total", &want)
    };
    // The split's requests are reported against the backend the route picked.
    let v1_200 = get(&[
        r#"destination_service="reviews-v1.shop.svc.cluster.local""#,
        r#"destination_workload="web-1""#,
        r#"response_code="200""#,
    ]);
    let v2_200 = get(&[
        r#"destination_service="reviews-v2.shop.svc.cluster.local""#,
        r#"destination_workload="web-2""#,
        r#"response_code="200""#,
    ]);
    let split_200 = v1_200 + v2_200;
    let timeouts = get(&[r#"response_code="504""#]);
    let grpc_ok = get(&[
        r#"destination_service="grpc.shop.svc.cluster.local""#,
        r#"response_code="200""#,
        r#"grpc_response_status="0""#,
    ]);
    let total = get(&[]);
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        eprintln!("{l}");
    }
    eprintln!(
        "istio_requests_total: reviews 200 = {split_200} (web-1 {v1_200}, web-2 {v2_200}), \
         504 = {timeouts}, grpc OK = {grpc_ok}, all = {total}"
    );
    ensure!(
        split_200 == ok_n,
        "200s for reviews: {split_200}, sent {ok_n}"
    );
    ensure!(
        v1_200 == count(&v, "bodies", "hello from web-1")
            && v2_200 == count(&v, "bodies", "hello from web-2"),
        "per-workload 200s {v1_200}/{v2_200} vs responses {v}"
    );
    ensure!(timeouts == slow_n, "504s: {timeouts}, sent {slow_n}");
    ensure!(grpc_ok == grpc_n, "gRPC OK: {grpc_ok}, sent {grpc_n}");
    ensure!(
        total == ok_n + slow_n + grpc_n,
        "all requests: {total}, sent {}",
        ok_n + slow_n + grpc_n
    );
    Ok(())
}
