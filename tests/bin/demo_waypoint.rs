//! Step 7 of the demo: a namespace with a waypoint, a 90/10 canary split and header-based
//! routing, configured with a Gateway API HTTPRoute.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use harness::config::{DATAPLANE_MODE, NONE, USE_WAYPOINT};
use harness::ztunnel::{field, field_str, message};
use harness::{Pod, PodSpec, Proc};
use serde_json::Value;

use super::{Demo, HTTP_PORT, SHORT, TRUST_DOMAIN, checkpoint};

/// Requests for the split; with p = 0.1 the two-sided 99.9 % binomial bound for the canary
/// is 20 ± 14.
const SPLIT_REQUESTS: usize = 200;
const CANARY_BOUND: std::ops::RangeInclusive<usize> = 6..=34;
const HEADER_REQUESTS: usize = 20;
/// Shop's frontend may read reviews, but not its admin pages; applies to the reviews pods,
/// which sit behind the waypoint, so the waypoint enforces it per request.
const POLICY: &str = "
- name: reviews-readers
  namespace: store
  selector: {app: reviews}
  action: ALLOW
  rules:
    - from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]
      to: [{methods: [GET], notPaths: ['/admin/*']}]
";

impl Demo<'_, '_> {
    pub(super) fn waypoint(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading(
            "7. L7 with a waypoint: a 90/10 canary, header-based routing and L7 authorization",
        );
        let nodes = self.cluster.nodes();
        let (a, b) = (
            nodes.first().context("node-a")?,
            nodes.get(1).context("node-b")?,
        );
        let reviews = |version: &str| {
            self.cluster.add_pod(
                b,
                PodSpec::new(format!("reviews-{version}"))
                    .namespace("store")
                    .service_account("reviews")
                    .label("app", "reviews")
                    .label("version", version),
            )
        };
        let v1 = reviews("v1")?;
        let v2 = reviews("v2")?;
        let wp = self.cluster.add_pod(
            a,
            PodSpec::new("waypoint")
                .namespace("store")
                .service_account("waypoint")
                .label("gateway.networking.k8s.io/gateway-name", "waypoint")
                .label(DATAPLANE_MODE, NONE),
        )?;
        let vip = format!("10.{}.250.20", self.cluster.slot());
        self.cluster.enroll_namespace("store")?;
        self.cluster
            .set_namespace_label("store", USE_WAYPOINT, Some("waypoint"))?;
        let services = format!(
            "- {{name: reviews, namespace: store, vips: ['{vip}'], ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}], selector: {{app: reviews}}}}\n\
             - {{name: reviews-v1, namespace: store, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}], selector: {{version: v1}}}}\n\
             - {{name: reviews-v2, namespace: store, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}], selector: {{version: v2}}}}\n"
        );
        let route = "
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: reviews, namespace: store}
  spec:
    parentRefs: [{group: '', kind: Service, name: reviews, port: 80}]
    rules:
      - matches: [{headers: [{name: x-canary, value: 'true'}]}]
        backendRefs: [{name: reviews-v2, port: 80}]
      - backendRefs:
          - {name: reviews-v1, port: 80, weight: 90}
          - {name: reviews-v2, port: 80, weight: 10}
";
        self.cluster.edit_config(|c| -> Result<()> {
            let mut more: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(&services)?;
            c.services.append(&mut more);
            c.extra.insert(
                "waypoints".into(),
                serde_yaml_ng::from_str("[{name: waypoint, namespace: store}]")?,
            );
            c.extra
                .insert("routes".into(), serde_yaml_ng::from_str(route)?);
            c.extra.insert(
                "authorizationPolicies".into(),
                serde_yaml_ng::from_str(POLICY)?,
            );
            Ok(())
        })?;
        let cursors = (self.m.zt_a.log_cursor(), self.m.zt_b.log_cursor());
        self.cluster.write_config()?;
        self.m.zt_b.wait_for_log_since(cursors.1, SHORT, |v| {
            message(v) == Some("pod enrolled") && field_str(v, "pod") == "store/reviews-v2"
        })?;
        self.m
            .zt_a
            .wait_for_log_since(cursors.0, SHORT, |v| message(v) == Some("config reloaded"))?;
        for p in [&v1, &v2] {
            self.m.extra.push(p.spawn_testapp(&[
                "http",
                "--listen",
                "0.0.0.0:8080",
                "--name",
                p.name(),
            ])?);
        }
        let waypoint = start_waypoint(&wp, self.cluster)?;
        ui.out(format!(
            "namespace store is ambient and labelled ambit.dev/use-waypoint=waypoint; the waypoint runs in pod store/waypoint ({}) as {}",
            wp.ip(),
            ui.cyan(&format!("spiffe://{TRUST_DOMAIN}/ns/store/sa/waypoint"))
        ));
        ui.out(format!(
            "service reviews ({vip}:80) has an HTTPRoute: x-canary: true → reviews-v2, otherwise reviews-v1 90 / reviews-v2 10"
        ));
        checkpoint()?;

        // The canary split: one keep-alive connection, routed per request.
        let url = format!("http://{vip}/");
        ui.command(
            &format!("curl -s {url} …×{SPLIT_REQUESTS}"),
            "from shop/frontend, one keep-alive connection",
        );
        let bodies = curl_many(&self.m.frontend, &url, SPLIT_REQUESTS, None)?;
        let count = |name: &str| {
            bodies
                .iter()
                .filter(|b| b.as_str() == format!("hello from {name}"))
                .count()
        };
        let (n1, n2) = (count("reviews-v1"), count("reviews-v2"));
        ui.out(format!(
            "reviews-v1 answered {n1}, reviews-v2 answered {n2} of {SPLIT_REQUESTS}"
        ));
        self.report.expect(
            format!("the waypoint split {SPLIT_REQUESTS} requests about 90/10 (canary within the 99.9 % binomial bound {CANARY_BOUND:?})"),
            n1 + n2 == SPLIT_REQUESTS && CANARY_BOUND.contains(&n2),
            || format!("v1 {n1}, v2 {n2}, other {}", SPLIT_REQUESTS - n1 - n2),
        );

        // Header-based routing.
        ui.command(
            &format!("curl -s -H 'x-canary: true' {url} …×{HEADER_REQUESTS}"),
            "from shop/frontend",
        );
        let bodies = curl_many(
            &self.m.frontend,
            &url,
            HEADER_REQUESTS,
            Some("x-canary: true"),
        )?;
        let to_v2 = bodies
            .iter()
            .filter(|b| b.as_str() == "hello from reviews-v2")
            .count();
        ui.out(format!("reviews-v2 answered {to_v2} of {HEADER_REQUESTS}"));
        self.report.expect(
            "requests with x-canary: true all went to reviews-v2",
            to_v2 == HEADER_REQUESTS,
            || format!("only {to_v2} of {HEADER_REQUESTS}"),
        );

        // L7 authorization, enforced by the waypoint with the client's identity.
        ui.out(
            "policy reviews-readers (store): shop/frontend may GET anything on reviews except /admin/*",
        );
        let admin = format!("http://{vip}/admin/stats");
        ui.command(&format!("curl -s {admin}"), "from shop/frontend");
        let denied = curl_many(&self.m.frontend, &admin, 1, None)?;
        let denied = denied.first().map(String::as_str).unwrap_or_default();
        ui.out(format!("answer: {denied:?}"));
        let is_denial = |v: &Value| {
            v["target"] == "access"
                && field_str(v, "path") == "/admin/stats"
                && field(v, "status").and_then(Value::as_u64) == Some(403)
        };
        let logged = waypoint.wait_for_line(SHORT, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| is_denial(&v))
        });
        let policy = logged
            .ok()
            .and_then(|l| serde_json::from_str::<Value>(&l).ok())
            .map(|v| field_str(&v, "authz_policy").to_string())
            .unwrap_or_default();
        ui.out(format!(
            "the waypoint logged 403 with authz_policy={policy:?}"
        ));
        self.report.expect(
            "L7 authorization: GET /admin/stats refused by the waypoint with 403, naming the policy",
            denied.contains("RBAC: access denied") && policy.ends_with("/reviews-readers"),
            || format!("answer {denied:?}, logged policy {policy:?}"),
        );

        // What the hops logged.
        let outbound = self.m.zt_a.wait_for_log(SHORT, |v| {
            v["target"] == "access" && field_str(v, "dst.service") == "store/reviews"
        })?;
        ui.out(ui.dim("node-a's ztunnel sent the connection to the waypoint, not to a backend:"));
        ui.out(format!("  {}", super::render(&ui, &outbound)));
        let request = waypoint
            .log()
            .lines()
            .into_iter()
            .filter_map(|l| l.json)
            .find(|v| v["target"] == "access" && field_str(v, "route") == "store/reviews")
            .context("no access-log line from the waypoint")?;
        ui.out(ui.dim("the waypoint logged each request, with its route and trace id:"));
        ui.out(format!(
            "  {} {} -> {} via route {} from {}: {} in {} ms, trace {}",
            field_str(&request, "method"),
            field_str(&request, "path"),
            field_str(&request, "upstream"),
            field_str(&request, "route"),
            field_str(&request, "src.identity"),
            field(&request, "status")
                .and_then(Value::as_u64)
                .unwrap_or_default(),
            field(&request, "duration_ms")
                .and_then(Value::as_u64)
                .unwrap_or_default(),
            field_str(&request, "trace_id"),
        ));
        self.report.expect(
            "the waypoint saw the client's own identity (the source ztunnel tunnels with the pod's certificate)",
            field_str(&request, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
            || format!("it saw {}", field_str(&request, "src.identity")),
        );
        ui.explain(
            "routing happened once, in the waypoint: the source ztunnel only chose a waypoint replica, and \
             the destination ztunnels accept store's pods' traffic only from the waypoint's identity",
        );
        self.m.extra.push(waypoint);
        Ok(())
    }
}

fn start_waypoint(pod: &Pod, cluster: &harness::Cluster) -> Result<Proc> {
    let mut cmd = pod.command(harness::bin_path("waypoint")?);
    cmd.arg("run")
        .arg("--config")
        .arg(cluster.config_path())
        .args([
            "--name",
            "waypoint",
            "--namespace",
            "store",
            "--log-format",
            "json",
        ])
        .arg("--ca-dir")
        .arg(cluster.ca_dir())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let proc = pod.spawn(&mut cmd)?;
    proc.log()
        .wait_for(0, Duration::from_secs(30), |l| {
            l.json.as_ref().and_then(message) == Some("waypoint ready")
        })
        .with_context(|| format!("the waypoint did not start:\n{}", proc.log().tail(20)))?;
    Ok(proc)
}

/// `n` requests on one keep-alive connection; returns the bodies, trimmed.
fn curl_many(from: &Pod, url: &str, n: usize, header: Option<&str>) -> Result<Vec<String>> {
    checkpoint()?;
    let mut cmd = from.command("curl");
    cmd.args(["-sS", "-m", "30"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    for _ in 0..n {
        cmd.arg(url);
    }
    let out = from.run(&mut cmd, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}
