//! L7 authorization at the waypoint, end to end: curl in an enrolled pod calls a service
//! VIP; its ztunnel tunnels to the waypoint with the client's certificate; the waypoint
//! checks the request against the policies of the service's workloads with that
//! identity, then forwards over HBONE to the workload's ztunnel, which accepts only the
//! waypoint.
//!
//! Topology (one cluster for the whole table; policies change through config reloads):
//!
//! ```text
//! node a: shop/waypoint (not captured), shop/api-1 (app: api; HTTP on 8080 and 8081)
//! node b: shop/client-a (sa client-a), shop/client-b (sa client-b), jobs/batch (sa batch),
//!         legacy/outsider (not enrolled)
//! ```
//!
//! Namespace `shop` carries `ambit.dev/use-waypoint: waypoint`. Service `api` maps port
//! 80 → 8080 and 81 → 8081 (HTTP), and 82 → 9090 (`tcp-echo`: forwarded at L4). Service
//! `gateway` has no endpoints of its own: an HTTPRoute
//! sends its requests on to `api`, whose policies must still apply.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use harness::config::{DATAPLANE_MODE, NONE, USE_WAYPOINT};
use harness::ztunnel::{field_str, message};
use harness::{Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts};
use serde_json::Value;

const TRUST_DOMAIN: &str = "cluster.local";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";
const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/client-a";
const LONG: Duration = Duration::from_secs(30);
const CURL: Duration = Duration::from_secs(20);

/// One cluster at a time: they are heavy for a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fields drop in declaration order: processes first, the cluster last.
struct World {
    _apps: Vec<Proc>,
    waypoint: Proc,
    zt: (Ztunnel, Ztunnel),
    a: Pod,
    b: Pod,
    batch: Pod,
    outsider: Pod,
    wp: Pod,
    api: Pod,
    vip: String,
    gateway_vip: String,
    _nodes: (Node, Node),
    cluster: Cluster,
}

fn world() -> Result<World> {
    let cluster = Cluster::new()?;
    let na = cluster.add_node("a")?;
    let nb = cluster.add_node("b")?;
    let api = cluster.add_pod(
        &na,
        PodSpec::new("api-1")
            .namespace("shop")
            .service_account("api")
            .label("app", "api"),
    )?;
    let wp = cluster.add_pod(
        &na,
        PodSpec::new("waypoint")
            .namespace("shop")
            .service_account("waypoint")
            .label("gateway.networking.k8s.io/gateway-name", "waypoint")
            .label(DATAPLANE_MODE, NONE),
    )?;
    let a = cluster.add_pod(
        &nb,
        PodSpec::new("client-a")
            .namespace("shop")
            .service_account("client-a"),
    )?;
    let b = cluster.add_pod(
        &nb,
        PodSpec::new("client-b")
            .namespace("shop")
            .service_account("client-b"),
    )?;
    let batch = cluster.add_pod(
        &nb,
        PodSpec::new("batch")
            .namespace("jobs")
            .service_account("batch"),
    )?;
    let outsider = cluster.add_pod(&nb, PodSpec::new("outsider").namespace("legacy"))?;
    cluster.enroll_namespace("shop")?;
    cluster.enroll_namespace("jobs")?;
    cluster.set_namespace_label("shop", USE_WAYPOINT, Some("waypoint"))?;
    let vip = format!("10.{}.250.10", cluster.slot());
    let gateway_vip = format!("10.{}.250.11", cluster.slot());
    let services = format!(
        "[{{ name: api, namespace: shop, vips: [{vip}], ports: [{{ name: http, port: 80, targetPort: 8080 }}, {{ name: http-admin, port: 81, targetPort: 8081 }}, {{ name: tcp-echo, port: 82, targetPort: 9090 }}], selector: {{ app: api }} }},
          {{ name: gateway, namespace: shop, vips: [{gateway_vip}], ports: [{{ name: http, port: 80 }}], selector: {{ app: gateway }} }}]"
    );
    let routes = "[{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: gateway, namespace: shop}, spec: {parentRefs: [{group: '', kind: Service, name: gateway}], rules: [{backendRefs: [{name: api, port: 80}]}]}}]";
    cluster.edit_config(|c| -> Result<()> {
        c.services = serde_yaml_ng::from_str(&services).context("services YAML")?;
        c.extra.insert(
            "waypoints".into(),
            serde_yaml_ng::from_str(
                "[{ name: waypoint, namespace: shop, serviceAccount: waypoint }]",
            )
            .context("waypoints YAML")?,
        );
        c.extra.insert(
            "routes".into(),
            serde_yaml_ng::from_str(routes).context("routes YAML")?,
        );
        Ok(())
    })?;
    cluster.init_ca(TRUST_DOMAIN)?;
    cluster.write_config()?;

    let mut apps = Vec::new();
    for port in ["8080", "8081"] {
        let listen = format!("0.0.0.0:{port}");
        apps.push(api.spawn_testapp(&["http", "--name", "api-1", "--listen", &listen])?);
    }
    apps.push(api.spawn_testapp(&["echo", "--listen", "0.0.0.0:9090"])?);
    let zt_a = na.start_ztunnel(&ZtunnelOpts::default())?;
    let zt_b = nb.start_ztunnel(&ZtunnelOpts::default())?;
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
    Ok(World {
        _apps: apps,
        waypoint,
        zt: (zt_a, zt_b),
        a,
        b,
        batch,
        outsider,
        wp,
        api,
        vip,
        gateway_vip,
        _nodes: (na, nb),
        cluster,
    })
}

/// Who sends a request.
#[derive(Debug, Clone, Copy)]
enum Sender {
    /// `shop/client-a`.
    A,
    /// `shop/client-b`: same namespace, another service account.
    B,
    /// `jobs/batch`: another namespace.
    Batch,
}

/// One row: a request and what must come of it.
struct Case {
    name: &'static str,
    from: Sender,
    method: &'static str,
    /// Service port: 80 (→ 8080) or 81 (→ 8081).
    port: u16,
    /// Sent to the `gateway` service (an HTTPRoute sends it on to `api`), not `api`.
    via_gateway: bool,
    /// Sent as is (`curl --path-as-is`).
    path: &'static str,
    headers: &'static [&'static str],
    /// 200 or 403.
    want: u16,
    /// For a 403: the `authz_policy` the access log must show.
    policy: &'static str,
    /// A line the waypoint must log for this request: (message, policy).
    logs: Option<(&'static str, &'static str)>,
    /// For a 200: the path the backend must have seen.
    backend_path: Option<&'static str>,
}

const fn case(
    name: &'static str,
    from: Sender,
    method: &'static str,
    path: &'static str,
    want: u16,
    policy: &'static str,
) -> Case {
    Case {
        name,
        from,
        method,
        port: 80,
        via_gateway: false,
        path,
        headers: &[],
        want,
        policy,
        logs: None,
        backend_path: None,
    }
}

/// A set of policies, then the requests sent while it is in force.
struct Group {
    policies: &'static str,
    cases: Vec<Case>,
}

const ALLOW_A_GET_V1: &str = "shop/a-may-get-v1";

fn table() -> Vec<Group> {
    use Sender::{A, B, Batch};
    vec![
        Group {
            policies: "[{name: a-may-get-v1, namespace: shop, selector: {app: api}, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/client-a']}], to: [{methods: [GET], paths: ['/v1/*']}]}]}]",
            cases: vec![
                case("A GET /v1/items", A, "GET", "/v1/items", 200, ""),
                case("A GET /admin", A, "GET", "/admin", 403, ALLOW_A_GET_V1),
                case(
                    "A POST /v1/items (only GET allowed)",
                    A,
                    "POST",
                    "/v1/items",
                    403,
                    ALLOW_A_GET_V1,
                ),
                case(
                    "B GET /v1/items (other service account)",
                    B,
                    "GET",
                    "/v1/items",
                    403,
                    ALLOW_A_GET_V1,
                ),
                case(
                    "A GET /v1/../admin is /admin",
                    A,
                    "GET",
                    "/v1/../admin",
                    403,
                    ALLOW_A_GET_V1,
                ),
                case(
                    "A GET /v1/%2e%2e/admin is /admin",
                    A,
                    "GET",
                    "/v1/%2e%2e/admin",
                    403,
                    ALLOW_A_GET_V1,
                ),
                Case {
                    via_gateway: true,
                    ..case(
                        "A GET /v1/items via a route from `gateway`",
                        A,
                        "GET",
                        "/v1/items",
                        200,
                        "",
                    )
                },
                Case {
                    via_gateway: true,
                    ..case(
                        "B GET /v1/items via a route from `gateway`",
                        B,
                        "GET",
                        "/v1/items",
                        403,
                        ALLOW_A_GET_V1,
                    )
                },
                Case {
                    backend_path: Some("/v1/items"),
                    ..case(
                        "A GET /v1/x/../items is forwarded normalized",
                        A,
                        "GET",
                        "/v1/x/..//items",
                        200,
                        "",
                    )
                },
            ],
        },
        Group {
            policies: "[{name: shop-only, namespace: shop, action: ALLOW, rules: [{from: [{namespaces: [shop]}]}]}, {name: no-admin, namespace: shop, action: DENY, rules: [{to: [{paths: ['/admin', '/admin/*']}]}]}]",
            cases: vec![
                case(
                    "B GET /v1/items (namespace matches)",
                    B,
                    "GET",
                    "/v1/items",
                    200,
                    "",
                ),
                case(
                    "batch GET /v1/items (other namespace)",
                    Batch,
                    "GET",
                    "/v1/items",
                    403,
                    "shop/shop-only",
                ),
                case(
                    "A GET /admin/users: DENY overrides ALLOW",
                    A,
                    "GET",
                    "/admin/users",
                    403,
                    "shop/no-admin",
                ),
                case(
                    "A GET /v1/../admin: DENY sees through ..",
                    A,
                    "GET",
                    "/v1/../admin",
                    403,
                    "shop/no-admin",
                ),
                case(
                    "A GET //admin: DENY sees through //",
                    A,
                    "GET",
                    "//admin",
                    403,
                    "shop/no-admin",
                ),
            ],
        },
        Group {
            policies: "[{name: tenant-acme, namespace: shop, action: ALLOW, rules: [{to: [{hosts: ['api.shop'], notPaths: ['/private/*']}], when: [{key: 'request.headers[x-tenant]', values: [acme]}]}]}]",
            cases: vec![
                Case {
                    headers: &["host: api.shop", "x-tenant: acme"],
                    ..case("A GET /v1 with x-tenant acme", A, "GET", "/v1", 200, "")
                },
                Case {
                    headers: &["host: API.shop:80", "x-tenant: acme"],
                    ..case(
                        "host matches without port and case",
                        B,
                        "GET",
                        "/v1",
                        200,
                        "",
                    )
                },
                Case {
                    headers: &["host: api.shop", "x-tenant: evil"],
                    ..case("x-tenant evil", A, "GET", "/v1", 403, "shop/tenant-acme")
                },
                Case {
                    headers: &["host: api.shop"],
                    ..case("no x-tenant", A, "GET", "/v1", 403, "shop/tenant-acme")
                },
                Case {
                    headers: &["host: api.shop", "x-tenant: acme"],
                    ..case(
                        "notPaths /private/*",
                        A,
                        "GET",
                        "/private/key",
                        403,
                        "shop/tenant-acme",
                    )
                },
                Case {
                    headers: &["host: other.shop", "x-tenant: acme"],
                    ..case("other host", A, "GET", "/v1", 403, "shop/tenant-acme")
                },
            ],
        },
        Group {
            policies: "[{name: no-admin-port, namespace: shop, action: DENY, rules: [{to: [{ports: [8081]}]}]}, {name: watch-a, namespace: shop, action: AUDIT, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/client-a']}]}]}, {name: would-deny-b, namespace: shop, action: DENY, dryRun: true, rules: [{from: [{serviceAccounts: ['shop/client-b']}]}]}]",
            cases: vec![
                Case {
                    port: 81,
                    ..case(
                        "A to port 81 (target 8081)",
                        A,
                        "GET",
                        "/",
                        403,
                        "shop/no-admin-port",
                    )
                },
                Case {
                    logs: Some(("AUDIT policy matched", "shop/watch-a")),
                    ..case(
                        "A to port 80: allowed and audited",
                        A,
                        "GET",
                        "/v1",
                        200,
                        "",
                    )
                },
                Case {
                    logs: Some(("dry-run policy matched; not enforced", "shop/would-deny-b")),
                    ..case("B: dry-run DENY logs, allows", B, "GET", "/v1", 200, "")
                },
            ],
        },
        Group {
            policies: "[{name: not-b, namespace: shop, action: DENY, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/client-b']}], to: [{notMethods: [GET]}]}]}]",
            cases: vec![
                case(
                    "B DELETE (principal and notMethods)",
                    B,
                    "DELETE",
                    "/v1/items",
                    403,
                    "shop/not-b",
                ),
                case("B GET", B, "GET", "/v1/items", 200, ""),
                case("A DELETE", A, "DELETE", "/v1/items", 200, ""),
            ],
        },
    ]
}

impl World {
    fn pod(&self, from: Sender) -> &Pod {
        match from {
            Sender::A => &self.a,
            Sender::B => &self.b,
            Sender::Batch => &self.batch,
        }
    }

    /// Replaces the policies and waits until the waypoint has reloaded them.
    fn apply(&self, policies: &str) -> Result<()> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(policies).with_context(|| format!("YAML: {policies}"))?;
        let cursor = self.waypoint.log().len();
        self.cluster.edit_config(|c| {
            c.extra.insert("authorizationPolicies".into(), value);
        });
        self.cluster.write_config()?;
        self.waypoint
            .log()
            .wait_for(cursor, LONG, |l| {
                l.json.as_ref().and_then(message) == Some("config reloaded")
            })
            .with_context(|| {
                format!("waypoint did not reload:\n{}", self.waypoint.log().tail(20))
            })?;
        Ok(())
    }

    /// Sends one request with curl to the service; returns the status and the path the
    /// backend saw.
    fn send(&self, c: &Case) -> Result<(u16, String)> {
        let vip = if c.via_gateway {
            &self.gateway_vip
        } else {
            &self.vip
        };
        self.send_to(c, &format!("{vip}:{}", c.port))
    }

    fn send_to(&self, c: &Case, addr: &str) -> Result<(u16, String)> {
        let pod = self.pod(c.from);
        let url = format!("http://{addr}{}", c.path);
        let mut cmd = pod.command("curl");
        cmd.args(["-sS", "--path-as-is", "-m", "10", "-o", "/dev/null"])
            .args(["-D", "-", "-w", "\nstatus=%{http_code}\n", "-X", c.method]);
        for h in c.headers {
            cmd.args(["-H", h]);
        }
        let out = pod.run_ok(cmd.arg(&url), CURL)?;
        let status = out
            .lines()
            .find_map(|l| l.strip_prefix("status="))
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("curl output: {out}"))?;
        let seen = out
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-path")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        Ok((status, seen))
    }

    /// Checks one row; Err describes what differed.
    fn check(&self, c: &Case) -> Result<()> {
        let cursor = self.waypoint.log().len();
        let (status, seen) = self.send(c)?;
        ensure!(status == c.want, "status {status}, want {}", c.want);
        let access = self
            .waypoint
            .log()
            .wait_for(cursor, LONG, |l| {
                l.json.as_ref().is_some_and(|v| {
                    v.get("target").and_then(Value::as_str) == Some("access")
                        && field_str(v, "path") == c.path
                })
            })
            .context("no access-log line for the request")?;
        let v = access.json.unwrap_or_default();
        let logged = field_str(&v, "authz_policy");
        ensure!(
            harness::ztunnel::field(&v, "status").and_then(Value::as_u64) == Some(c.want.into()),
            "access log status differs: {v}"
        );
        ensure!(
            logged == c.policy,
            "access log authz_policy `{logged}`, want `{}`: {v}",
            c.policy
        );
        if let Some((msg, policy)) = c.logs {
            self.waypoint
                .log()
                .wait_for(cursor, LONG, |l| {
                    l.json.as_ref().is_some_and(|v| {
                        message(v) == Some(msg) && field_str(v, "policy") == policy
                    })
                })
                .with_context(|| format!("no `{msg}` line for {policy}"))?;
        }
        if let Some(p) = c.backend_path {
            ensure!(seen == p, "backend saw path `{seen}`, want `{p}`");
        }
        Ok(())
    }

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
}

/// The value of `metric{policy="<policy>"}`, 0 when absent.
fn denied_count(metrics: &str, policy: &str) -> u64 {
    let want = format!("ambit_waypoint_authz_denied_total{{policy=\"{policy}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn waypoint_enforces_l7_policies_with_the_client_identity() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = world()?;
    let zt_a_start = w.zt.0.log_cursor();
    let groups = table();
    let rows: usize = groups.iter().map(|g| g.cases.len()).sum();
    ensure!(rows >= 12, "the table has {rows} rows");
    let mut failures = Vec::new();
    let mut want_denied: BTreeMap<&str, u64> = BTreeMap::new();
    for g in &groups {
        w.apply(g.policies)?;
        for c in &g.cases {
            match w.check(c) {
                Ok(()) => eprintln!("ok   {}", c.name),
                Err(e) => {
                    eprintln!("FAIL {}: {e:#}", c.name);
                    failures.push(format!("{}: {e:#}", c.name));
                }
            }
            if c.want == 403 {
                *want_denied.entry(c.policy).or_default() += 1;
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {rows} rows failed:\n{}\nwaypoint log:\n{}",
            failures.len(),
            failures.join("\n"),
            w.waypoint.log().tail(40)
        );
    }

    // Every denial was counted under its policy.
    let metrics = w.metrics()?;
    for (policy, n) in &want_denied {
        let got = denied_count(&metrics, policy);
        ensure!(
            got == *n,
            "ambit_waypoint_authz_denied_total{{policy=\"{policy}\"}} = {got}, want {n}"
        );
    }
    eprintln!("denials by policy: {want_denied:?}");

    // The destination ztunnel let every forwarded request in: none was denied there,
    // although the policies named client principals and L7 fields, and the peer it saw
    // was the waypoint.
    let denied_at_ztunnel: Vec<Value> =
        w.zt.0
            .output()
            .into_iter()
            .skip(zt_a_start)
            .filter_map(|l| l.json)
            .filter(|v| message(v) == Some("connection denied"))
            .collect();
    ensure!(
        denied_at_ztunnel.is_empty(),
        "node a's ztunnel denied forwarded traffic: {denied_at_ztunnel:?}"
    );
    Ok(())
}

#[test]
fn a_direct_connection_that_bypasses_the_waypoint_is_refused() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = world()?;
    // A policy that would allow A, so only the bypass rule can refuse it.
    w.apply(table().first().map(|g| g.policies).unwrap_or_default())?;
    let through = case("A GET /v1/items", Sender::A, "GET", "/v1/items", 200, "");
    w.check(&through).context("through the waypoint")?;

    // A's plain connection to the pod address is captured by A's ztunnel and steered
    // through the waypoint, which authorizes it like any other request.
    let direct = format!("{}:8080", w.api.ip());
    let cursor = w.waypoint.log().len();
    let admin = case(
        "A GET /admin at the pod IP",
        Sender::A,
        "GET",
        "/admin",
        403,
        "",
    );
    let (status, _) = w.send_to(&admin, &direct)?;
    ensure!(status == 403, "A to {direct}/admin: {status}, want 403");
    w.waypoint
        .log()
        .wait_for(cursor, LONG, |l| {
            l.json.as_ref().is_some_and(|v| {
                field_str(v, "dialled") == direct && field_str(v, "authz_policy") == ALLOW_A_GET_V1
            })
        })
        .context("the waypoint did not log the request to the pod address")?;

    // HBONE with A's own certificate straight to api-1's ztunnel, from a pod whose
    // traffic is not captured, as a stolen key or a misconfigured tunnel would: 401,
    // logged as a bypass, although A's policy allows it.
    let cert = w.cluster.issue_cert(A_ID)?;
    let cursor = w.zt.0.log_cursor();
    let mut cmd = w.outsider.command(harness::bin_path("ambit-hbone-probe")?);
    cmd.args(["--to", &format!("{}:15008", w.api.ip())])
        .args(["--server-identity", API_ID])
        .arg("--cert")
        .arg(&cert.0)
        .arg("--key")
        .arg(&cert.1)
        .arg("--bundle")
        .arg(w.cluster.ca_dir().join("bundle.pem"))
        .args([
            "--target",
            &direct,
            "--send",
            "GET /v1/items HTTP/1.1\r\n\r\n",
        ]);
    let out = w.outsider.run_ok(&mut cmd, Duration::from_secs(20))?;
    eprintln!("HBONE with client-a's certificate straight to api-1's ztunnel: {out}");
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

#[test]
fn tcp_follows_istio_rules_for_http_fields_and_grpc_denials_say_permission_denied() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = world()?;
    let echo = format!("{}:82", w.vip);
    let echoes = |from: Sender| -> Result<bool> {
        let r = w.pod(from).run_testapp(
            &[
                "connect",
                "--to",
                &echo,
                "--timeout-secs",
                "3",
                "--send",
                "ping",
            ],
            CURL,
        )?;
        eprintln!("{from:?} -> {echo}: {r}");
        Ok(r["received"] == "ping")
    };
    let denied_lines = |cursor: usize, policy: &str| {
        w.waypoint
            .log()
            .wait_for(cursor, LONG, |l| {
                l.json.as_ref().is_some_and(|v| {
                    message(v) == Some("denied by authorization policy")
                        && field_str(v, "policy") == policy
                        && field_str(v, "request").starts_with("tcp ")
                })
            })
            .with_context(|| format!("no TCP denial logged for {policy}"))
    };

    // Pure L4 policy: A's connection passes, B's is refused.
    w.apply("[{name: a-only, namespace: shop, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/client-a']}], to: [{ports: [9090]}]}]}]")?;
    ensure!(echoes(Sender::A)?, "A's TCP connection must pass");
    let cursor = w.waypoint.log().len();
    ensure!(!echoes(Sender::B)?, "B's TCP connection must be refused");
    denied_lines(cursor, "shop/a-only")?;

    // A DENY with an HTTP-only field matches TCP on its other fields: refused.
    w.apply("[{name: no-post-9090, namespace: shop, action: DENY, rules: [{to: [{ports: [9090], methods: [POST]}]}]}]")?;
    let cursor = w.waypoint.log().len();
    ensure!(!echoes(Sender::A)?, "the DENY must refuse TCP on port 9090");
    denied_lines(cursor, "shop/no-post-9090")?;

    // An ALLOW whose only rule needs HTTP never matches TCP: refused too.
    w.apply(
        "[{name: get-only, namespace: shop, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}]",
    )?;
    let cursor = w.waypoint.log().len();
    ensure!(!echoes(Sender::A)?, "an HTTP-only ALLOW must not admit TCP");
    denied_lines(cursor, "shop/get-only")?;
    let metrics = w.metrics()?;
    for p in ["shop/a-only", "shop/no-post-9090", "shop/get-only"] {
        ensure!(denied_count(&metrics, p) == 1, "{p}: {metrics}");
    }

    // gRPC: a denied call answers grpc-status 7 (PERMISSION_DENIED, which clients do not
    // retry, unlike UNAVAILABLE); another method of the same service passes.
    w.apply("[{name: no-unary, namespace: shop, action: DENY, rules: [{to: [{paths: ['/ambit.test.Echo/Unary']}]}]}]")?;
    let to = format!("{}:80", w.vip);
    let url = format!("http://{to}/ambit.test.Echo/Unary");
    for _ in 0..4 {
        let out = w.a.run_ok(
            w.a.command("curl")
                .args([
                    "-sS",
                    "-m",
                    "10",
                    "--http2-prior-knowledge",
                    "-o",
                    "/dev/null",
                ])
                .args([
                    "-D",
                    "-",
                    "-X",
                    "POST",
                    "-H",
                    "content-type: application/grpc",
                ])
                .args(["-H", "te: trailers", "--data-binary", "", &url]),
            CURL,
        )?;
        let head = out.to_ascii_lowercase();
        ensure!(
            head.starts_with("http/2 403") && head.contains("grpc-status: 7"),
            "denied gRPC call: {out}"
        );
    }
    let v = w.a.run_testapp(
        &[
            "grpc", "--to", &to, "--host", "api.shop", "--calls", "4", "--method", "stream",
        ],
        CURL,
    )?;
    eprintln!("gRPC stream: {v}");
    ensure!(v["statuses"]["0"].as_u64() == Some(4), "gRPC stream: {v}");
    ensure!(denied_count(&w.metrics()?, "shop/no-unary") == 4);
    Ok(())
}
