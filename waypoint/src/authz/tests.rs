use std::path::Path;
use std::sync::Arc;

use ambit_shared::config::parse_str;
use prometheus_client::registry::Registry;

use super::*;

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: waypoint }
waypoints:
  - { name: waypoint, namespace: shop }
workloads:
  - { name: api-1, namespace: shop, serviceAccount: api, ips: [10.1.1.2], node: a, labels: { app: api, version: v1 } }
  - { name: api-2, namespace: shop, serviceAccount: api, ips: [10.1.1.3], node: a, labels: { app: api, version: v2 } }
services:
  - { name: api, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80, targetPort: 8080 }], selector: { app: api } }
  - { name: front, namespace: shop, vips: [10.96.0.11], ports: [{ port: 80 }], selector: { app: front } }
authorizationPolicies:
  - { name: v1-only, namespace: shop, action: ALLOW, rules: [{ to: [{ paths: ['/v1/*'] }] }] }
  - { name: no-post-on-v2, namespace: shop, selector: { version: v2 }, action: DENY, rules: [{ to: [{ methods: [POST] }] }] }
"#;

fn snapshot() -> Snapshot {
    Snapshot::new(Arc::new(
        parse_str(Path::new("t.yaml"), CONFIG).expect("valid config"),
    ))
}

fn service() -> Target {
    Target::Service {
        namespace: "shop".into(),
        name: "api".into(),
        port: 80,
        target_port: 8080,
        port_name: None,
    }
}

fn head(method: &str, target: &str) -> Parts {
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "api.shop")
        .body(())
        .expect("request")
        .into_parts();
    parts
}

fn client(id: &Identity) -> Client<'_> {
    Client {
        identity: Some(id),
        ip: "10.1.2.2".parse().expect("ip"),
    }
}

#[test]
fn requests_are_checked_against_every_endpoint_then_normalized() {
    let snap = snapshot();
    let metrics = Metrics::new(&mut Registry::default());
    let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
    let target = service();

    let mut ok = head("GET", "/v1/./x//items?q=/..");
    assert_eq!(
        check(&snap, &metrics, client(&id), &target, &mut ok),
        Ok(())
    );
    assert_eq!(
        ok.uri.path_and_query().map(|p| p.as_str()),
        Some("/v1/x/items?q=/..")
    );

    let mut admin = head("GET", "/v1/../admin");
    let d = check(&snap, &metrics, client(&id), &target, &mut admin).expect_err("denied");
    assert_eq!(d.status, StatusCode::FORBIDDEN);
    assert_eq!(d.policy, "shop/v1-only");
    // A denied request is not rewritten: it goes nowhere.
    assert_eq!(admin.uri.path(), "/v1/../admin");

    // api-2 refuses POSTs, so the service does, whichever endpoint would be picked.
    let mut post = head("POST", "/v1/items");
    let d = check(&snap, &metrics, client(&id), &target, &mut post).expect_err("denied");
    assert_eq!(d.policy, "shop/no-post-on-v2");
    // Dialling api-1 directly, the v2 policy does not apply.
    let api1 = Target::Workload {
        namespace: "shop".into(),
        name: "api-1".into(),
        addr: "10.1.1.2:8080".parse().expect("addr"),
    };
    assert_eq!(
        check(&snap, &metrics, client(&id), &api1, &mut post),
        Ok(())
    );
}

#[test]
fn tcp_connections_apply_istio_rules_for_http_fields() {
    let snap = snapshot();
    let metrics = Metrics::new(&mut Registry::default());
    let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
    // The only ALLOW needs a path, which TCP has none of: refused.
    let d = authorize_connection(&snap, &metrics, client(&id), &service()).expect_err("denied");
    assert_eq!(d.policy, "shop/v1-only");
}

#[test]
fn a_route_to_another_service_is_checked_against_its_endpoints() {
    use crate::route::{BackendRef, Route, WeightedBackend};

    let snap = snapshot();
    let metrics = Metrics::new(&mut Registry::default());
    let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
    // `front` has no endpoints of its own: dialling it checks nothing...
    let front = Target::Service {
        namespace: "shop".into(),
        name: "front".into(),
        port: 80,
        target_port: 80,
        port_name: None,
    };
    let mut admin = head("GET", "/admin");
    assert_eq!(
        check(&snap, &metrics, client(&id), &front, &mut admin),
        Ok(())
    );
    // ...but a route sending it on to `api` meets api's policies.
    let mut route = Route::default_for_parent();
    assert_eq!(
        check_route(&snap, &metrics, client(&id), &front, &route, &admin),
        Ok(())
    );
    route.backends = vec![WeightedBackend {
        backend: BackendRef::Service {
            namespace: "shop".into(),
            name: "api".into(),
            port: 80,
        },
        weight: 1,
        filters: Vec::new(),
    }];
    let d = check_route(&snap, &metrics, client(&id), &front, &route, &admin).expect_err("denied");
    assert_eq!(d.policy, "shop/v1-only");
    let ok = head("GET", "/v1/items");
    assert_eq!(
        check_route(&snap, &metrics, client(&id), &front, &route, &ok),
        Ok(())
    );
}
