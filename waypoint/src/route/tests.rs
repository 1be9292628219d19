use std::time::Duration;

use super::*;

fn backend(name: &str, weight: u32) -> WeightedBackend {
    WeightedBackend {
        backend: BackendRef::Service {
            namespace: "shop".into(),
            name: name.into(),
            port: 80,
        },
        weight,
        filters: Vec::new(),
    }
}

fn name(b: &WeightedBackend) -> &str {
    match &b.backend {
        BackendRef::Service { name, .. } => name,
        BackendRef::Parent => "parent",
    }
}

#[test]
fn weights_split_the_range() {
    let backends = [backend("a", 1), backend("zero", 0), backend("b", 3)];
    assert_eq!(pick_weighted(&backends, 0).map(name), Some("a"));
    assert_eq!(pick_weighted(&backends, 1).map(name), Some("b"));
    assert_eq!(pick_weighted(&backends, 3).map(name), Some("b"));
    assert_eq!(pick_weighted(&backends, 4).map(name), Some("a"));
    assert!(pick_weighted(&[backend("z", 0)], 5).is_none());
    assert!(pick_weighted(&[], 5).is_none());
    let route = Route {
        backends: backends.to_vec(),
        ..Route::default_for_parent()
    };
    let b_share = (0..4000)
        .filter(|_| route.pick_backend().map(name) == Some("b"))
        .count();
    assert!((2700..=3300).contains(&b_share), "{b_share} of 4000");
}

#[test]
fn default_route_goes_to_the_parent_with_default_retries() {
    let target = Target::Workload {
        namespace: "shop".into(),
        name: "web-1".into(),
        addr: "10.0.0.1:80".parse().expect("addr"),
    };
    let head = http::Request::get("/")
        .body(())
        .expect("req")
        .into_parts()
        .0;
    let route = DefaultRoutes
        .select(&RouteRequest {
            target: &target,
            head: &head,
            grpc: false,
            client_namespace: Some("shop"),
        })
        .expect("always a route");
    assert_eq!(route.backends[0].backend, BackendRef::Parent);
    assert_eq!(route.retry, RetryPolicy::default());
    assert_eq!(route.timeouts, Timeouts::default());
    assert_eq!(&*target.key(), "shop/web-1");
}

#[test]
fn port_names_declare_protocols() {
    let svc = |port_name: Option<&str>| Target::Service {
        namespace: "shop".into(),
        name: "web".into(),
        port: 80,
        target_port: 8080,
        port_name: port_name.map(Into::into),
    };
    assert_eq!(
        svc(Some("http")).declared_protocol(),
        DeclaredProtocol::Http
    );
    assert_eq!(
        svc(Some("grpc-api")).declared_protocol(),
        DeclaredProtocol::Http
    );
    assert_eq!(
        svc(Some("tcp-db")).declared_protocol(),
        DeclaredProtocol::Tcp
    );
    assert_eq!(
        svc(Some("web")).declared_protocol(),
        DeclaredProtocol::Detect
    );
    assert_eq!(svc(None).declared_protocol(), DeclaredProtocol::Detect);
}

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }, { name: ops }]
services:
  - { name: web, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.1 }] }
  - { name: web-v2, namespace: shop, ports: [{ port: 80, targetPort: 8080 }], endpoints: [{ ip: 10.0.0.2 }] }
  - { name: plain, namespace: shop, vips: [10.96.0.11], ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.3 }] }
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web, namespace: shop }
    spec:
      parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
      rules:
        - name: v2
          matches: [{ path: { type: PathPrefix, value: /v2 } }]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: { set: [{ name: x-version, value: "2" }] }
          backendRefs: [{ name: web-v2, port: 80, weight: 3 }, { name: web, port: 80, weight: 1 }]
          timeouts: { request: 2s, backendRequest: 500ms }
          retry: { codes: [502], attempts: 4, backoff: 10ms }
        - matches: [{ path: { type: Exact, value: /only } }]
          backendRefs: [{ name: web, port: 80 }]
"#;

fn service(name: &str) -> Target {
    Target::Service {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        target_port: 80,
        port_name: None,
    }
}

fn select(table: &GatewayRoutes, target: &Target, path: &str) -> Option<Route> {
    let head = http::Request::get(path)
        .header("host", "web.shop")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    table.select(&RouteRequest {
        target,
        head: &head,
        grpc: false,
        client_namespace: Some("shop"),
    })
}

#[test]
fn gateway_routes_translate_rules() {
    let config = ambit_shared::config::parse_str(std::path::Path::new("t.yaml"), CONFIG)
        .expect("valid config");
    let table = GatewayRoutes::new(&config);

    let route = select(&table, &service("web"), "/v2/cart").expect("matches");
    assert_eq!(&*route.name, "shop/web/v2");
    assert_eq!(route.backends.len(), 2);
    assert_eq!(
        route.backends[0].backend,
        BackendRef::Service {
            namespace: "shop".into(),
            name: "web-v2".into(),
            port: 80
        }
    );
    assert_eq!(route.backends[0].weight, 3);
    assert_eq!(route.filters.len(), 1);
    assert_eq!(
        route.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(2)),
            backend_request: Some(Duration::from_millis(500)),
        }
    );
    assert_eq!(route.retry.retries, 4);
    assert_eq!(route.retry.backoff, Duration::from_millis(10));
    assert!(
        route
            .retry
            .retries_on(crate::upstream::retry::Failure::Status(
                http::StatusCode::BAD_GATEWAY
            ))
    );
    assert!(
        route
            .retry
            .retries_on(crate::upstream::retry::Failure::Connect)
    );

    // A rule without `retry` gets the default policy.
    let only = select(&table, &service("web"), "/only").expect("matches");
    assert_eq!(only.retry, RetryPolicy::default());

    // Routes attached but none matching: 404 (no route).
    assert!(select(&table, &service("web"), "/other").is_none());
    // No routes attached: the default route to the parent.
    let plain = select(&table, &service("plain"), "/x").expect("default");
    assert_eq!(plain, Route::default_for_parent());
    // A workload dialled directly: no routes apply.
    let workload = Target::Workload {
        namespace: "shop".into(),
        name: "web-1".into(),
        addr: "10.0.0.1:80".parse().expect("addr"),
    };
    assert_eq!(
        select(&table, &workload, "/v2"),
        Some(Route::default_for_parent())
    );
}
