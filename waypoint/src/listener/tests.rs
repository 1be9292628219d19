use std::path::Path;

use super::*;

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: shop-waypoint }
  - name: other
    labels: { ambit.dev/dataplane-mode: ambient }
workloads:
  - { name: web-1, namespace: shop, serviceAccount: web, ips: [10.1.1.2], node: a, labels: { app: web } }
  - { name: web-2, namespace: shop, serviceAccount: web, ips: [10.1.1.3], node: a, labels: { app: web } }
  - { name: legacy, namespace: shop, ips: [10.1.1.4], node: a, labels: { app: web, ambit.dev/dataplane-mode: none } }
  - { name: db, namespace: other, ips: [10.1.2.2], node: b, labels: { app: db } }
  - { name: wp-1, namespace: shop, serviceAccount: shop-waypoint, ips: [10.1.1.8], node: a, labels: { gateway.networking.k8s.io/gateway-name: shop-waypoint, ambit.dev/dataplane-mode: none } }
  - { name: wp-2, namespace: shop, serviceAccount: shop-waypoint, ips: [10.1.1.9], node: b, labels: { gateway.networking.k8s.io/gateway-name: shop-waypoint, ambit.dev/dataplane-mode: none } }
waypoints:
  - { name: shop-waypoint, namespace: shop }
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{ name: http, port: 80, targetPort: 8080 }, { name: dns, port: 53, protocol: UDP }]
    selector: { app: web }
  - name: elsewhere
    namespace: shop
    vips: [10.96.0.11]
    ports: [{ port: 80 }]
    selector: { app: web }
    labels: { ambit.dev/use-waypoint: another }
  - name: db
    namespace: other
    vips: [10.96.0.12]
    ports: [{ port: 5432 }]
    selector: { app: db }
"#;

fn snapshot() -> Snapshot {
    let c = ambit_shared::config::parse_str(Path::new("t.yaml"), CONFIG).expect("config");
    Snapshot::new(Arc::new(c))
}

fn waypoint() -> Waypoint {
    Waypoint {
        name: "shop-waypoint".into(),
        namespace: "shop".into(),
        identity: "spiffe://cluster.local/ns/shop/sa/shop-waypoint"
            .parse()
            .expect("identity"),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

#[test]
fn resolves_served_services_and_local_workloads() {
    let snap = snapshot();
    let wp = waypoint();
    let t = resolve(&snap, &wp, addr("10.96.0.10:80"), None).expect("served service");
    assert_eq!(
        t,
        Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
            port: 80,
            target_port: 8080,
            port_name: Some("http".into()),
        }
    );
    let eps = endpoints(&snap, &t);
    assert_eq!(eps.len(), 3);
    assert_eq!(eps[0].addr, addr("10.1.1.2:8080"));
    assert_eq!(
        eps[0].identity.as_ref().map(ToString::to_string).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    // An endpoint outside the mesh is reached in plaintext.
    assert_eq!(eps[2].identity, None);

    let w = resolve(&snap, &wp, addr("10.1.1.3:9090"), None).expect("local workload");
    assert_eq!(
        w,
        Target::Workload {
            namespace: "shop".into(),
            name: "web-2".into(),
            addr: addr("10.1.1.3:9090"),
        }
    );
    assert_eq!(endpoints(&snap, &w).len(), 1);
}

#[test]
fn refuses_what_this_waypoint_does_not_serve() {
    let snap = snapshot();
    let wp = waypoint();
    let cases = [
        ("10.96.0.11:80", "not served by waypoint"),
        ("10.96.0.12:5432", "not served by waypoint"),
        ("10.96.0.10:81", "has no TCP port 81"),
        ("10.96.0.10:53", "has no TCP port 53"),
        ("10.1.2.2:5432", "neither a service VIP nor a workload"),
        ("10.9.9.9:80", "neither a service VIP nor a workload"),
        ("10.1.1.2:15008", "belongs to the proxy itself"),
    ];
    for (dst, reason) in cases {
        let err = resolve(&snap, &wp, addr(dst), None).expect_err(dst);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{dst}");
        assert!(err.to_string().contains(reason), "{dst}: {err}");
    }
}

#[test]
fn refuses_a_connect_to_the_waypoint_itself() {
    let snap = snapshot();
    let wp = waypoint();
    let local = Some("10.1.1.8".parse().expect("ip"));
    for dst in ["10.1.1.8:8080", "10.1.1.9:8080"] {
        let err = resolve(&snap, &wp, addr(dst), local).expect_err(dst);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{dst}");
    }
    // Where it was reached counts even when the config does not list it.
    let err = resolve(
        &snap,
        &wp,
        addr("10.1.1.3:80"),
        Some("10.1.1.3".parse().expect("ip")),
    )
    .expect_err("own address");
    assert!(matches!(err, ResolveError::OwnAddress { .. }), "{err}");
}
