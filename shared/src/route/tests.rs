use std::path::Path;

use http::request::Parts;

use super::*;
use crate::config::parse_str;

mod filters;
mod precedence;
mod weights;

/// Services every test can route to: `shop/web` (ports 80 `http` and 8080 `admin`) is the
/// usual parent; `v1`..`v3` are backends; `grpc` serves gRPC on 9090.
const BASE: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }, { name: client }, { name: other }]
services:
  - { name: web, namespace: shop, ports: [{ name: http, port: 80 }, { name: admin, port: 8080 }], endpoints: [{ ip: 10.0.0.1 }] }
  - { name: v1, namespace: shop, ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.2 }] }
  - { name: v2, namespace: shop, ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.3 }] }
  - { name: v3, namespace: shop, ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.4 }] }
  - { name: grpc, namespace: shop, ports: [{ port: 9090 }, { port: 80 }], endpoints: [{ ip: 10.0.0.5 }] }
routes:
"#;

/// The parent most tests use: `shop/web:80`.
const WEB: Parent<'static> = Parent {
    namespace: "shop",
    name: "web",
    port: 80,
};

/// An `HTTPRoute` list item in `namespace`, attached to `shop/web:80`, with `rules` in
/// YAML flow style and extra `metadata` keys.
fn http_route_in(namespace: &str, name: &str, metadata: &str, rules: &str) -> String {
    format!(
        "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    \
         metadata: {{ name: {name}, namespace: {namespace}{metadata} }}\n    \
         spec: {{ parentRefs: [{{ group: '', kind: Service, name: web, namespace: shop, port: 80 }}], rules: {rules} }}\n"
    )
}

fn http_route(name: &str, rules: &str) -> String {
    http_route_in("shop", name, "", rules)
}

/// A rule in flow style: `matches` and one backend.
fn rule(matches: &str, backend: &str) -> String {
    format!("{{ matches: {matches}, backendRefs: [{{ name: {backend}, port: 80 }}] }}")
}

fn router(routes: &[String]) -> Router {
    let text = format!("{BASE}{}", routes.concat());
    let config =
        parse_str(Path::new("routes.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    let router = Router::new(&config);
    assert_eq!(router.rejections(), [], "nothing left out");
    router
}

fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

/// Routes a request to `parent` and names the first backend of the winning rule.
fn route_to(
    router: &Router,
    parent: Parent<'_>,
    p: &Parts,
    client: Option<&str>,
) -> Result<String, NoRoute> {
    let s = select(router, parent, &Request::from_parts(p, client))?;
    Ok(s.rule
        .backends
        .first()
        .map_or_else(|| "<none>".to_string(), |b| b.name.clone()))
}

fn backend_for(router: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
    route_to(router, WEB, &parts(method, uri, headers), None)
        .unwrap_or_else(|e| panic!("{method} {uri} {headers:?}: {e:?}"))
}

#[test]
fn header_path_and_method_matches_route_to_the_right_backend() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}, {}]",
            rule("[{ path: { type: PathPrefix, value: /api } }]", "v1"),
            rule("[{ headers: [{ name: x-canary, value: 'true' }] }]", "v2"),
            rule("[{ method: POST }]", "v3"),
            rule("[{ path: { type: PathPrefix, value: / } }]", "web"),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/api/items", &[]), "v1");
    assert_eq!(backend_for(&r, "GET", "/", &[("X-Canary", "true")]), "v2");
    assert_eq!(backend_for(&r, "GET", "/", &[("x-canary", "false")]), "web");
    assert_eq!(backend_for(&r, "POST", "/cart", &[]), "v3");
    assert_eq!(backend_for(&r, "GET", "/cart", &[]), "web");
    // The longer path wins over the method and the header (precedence, not list order).
    assert_eq!(
        backend_for(&r, "POST", "/api", &[("x-canary", "true")]),
        "v1"
    );
}

#[test]
fn query_params_and_regexes_match() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}, {}]",
            rule("[{ queryParams: [{ name: animal, value: whale }] }]", "v1"),
            rule(
                "[{ queryParams: [{ type: RegularExpression, name: id, value: '[0-9]+' }] }]",
                "v2"
            ),
            rule(
                "[{ headers: [{ type: RegularExpression, name: version, value: 'v[23]' }] }]",
                "v3"
            ),
            rule(
                "[{ path: { type: RegularExpression, value: '/items/[a-z]+' } }]",
                "web"
            ),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/?animal=whale", &[]), "v1");
    assert_eq!(backend_for(&r, "GET", "/?animal=dolphin&id=42", &[]), "v2");
    assert_eq!(
        backend_for(&r, "GET", "/?id=42&animal=whale", &[]),
        "v1",
        "rule order breaks the tie between one query match each"
    );
    assert_eq!(
        backend_for(&r, "GET", "/x?id=4a", &[("version", "v3")]),
        "v3"
    );
    assert_eq!(backend_for(&r, "GET", "/items/abc", &[]), "web");
    let p = parts("GET", "/items/ABC", &[]);
    assert_eq!(
        route_to(&r, WEB, &p, None),
        Err(NoRoute::NoMatch),
        "full-match regex"
    );
}

#[test]
fn no_routes_means_default_route_and_unmatched_means_404() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}]",
            rule("[{ path: { type: Exact, value: /only } }]", "v1")
        ),
    )]);
    let p = parts("GET", "/elsewhere", &[]);
    let e = route_to(&r, WEB, &p, None).expect_err("no match");
    assert_eq!(
        (e, e.status()),
        (NoRoute::NoMatch, Some(http::StatusCode::NOT_FOUND))
    );
    // Port 8080 of the same service has no route; neither has another service.
    let admin = Parent { port: 8080, ..WEB };
    assert_eq!(route_to(&r, admin, &p, None), Err(NoRoute::Unrouted));
    let v1 = Parent { name: "v1", ..WEB };
    let e = route_to(&r, v1, &p, None).expect_err("unrouted");
    assert_eq!((e, e.status()), (NoRoute::Unrouted, None));
    let d = default_route(admin);
    assert_eq!(d.backends.len(), 1);
    assert_eq!(
        (
            d.backends[0].namespace.as_str(),
            d.backends[0].name.as_str(),
            d.backends[0].port
        ),
        ("shop", "web", 8080)
    );
    assert_eq!(
        choose_backend(&d.backends, u64::MAX).map(|b| b.weight),
        Some(1)
    );
    assert!(d.filters.is_empty() && d.retry.is_none() && d.timeouts == Timeouts::default());
}

#[test]
fn omitted_rules_match_everything_and_forward_nowhere() {
    let text = format!(
        "{BASE}  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    \
         metadata: {{ name: catch, namespace: shop }}\n    \
         spec: {{ parentRefs: [{{ group: '', kind: Service, name: web }}] }}\n"
    );
    let config = parse_str(Path::new("t.yaml"), &text).expect("valid");
    let r = Router::new(&config);
    let p = parts("DELETE", "/anything?x=1", &[]);
    for port in [80, 8080] {
        let s = select(&r, Parent { port, ..WEB }, &Request::from_parts(&p, None))
            .expect("attached to every port");
        assert_eq!(choose_backend(&s.rule.backends, 7), None, "500: no backend");
    }
}

#[test]
fn parent_port_and_section_name_pick_ports() {
    let attach = |parent: &str| {
        format!(
            "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    \
             metadata: {{ name: r, namespace: shop }}\n    \
             spec: {{ parentRefs: [{parent}], rules: [{}] }}\n",
            rule("[]", "v1")
        )
    };
    let p = parts("GET", "/", &[]);
    for (parent, on_80, on_8080) in [
        ("{ group: '', kind: Service, name: web }", true, true),
        (
            "{ group: '', kind: Service, name: web, port: 8080 }",
            false,
            true,
        ),
        (
            "{ group: core, kind: Service, name: web, sectionName: http }",
            true,
            false,
        ),
        (
            "{ group: '', kind: Service, name: web, sectionName: admin, port: 8080 }",
            false,
            true,
        ),
    ] {
        let r = router(&[attach(parent)]);
        for (port, attached) in [(80, on_80), (8080, on_8080)] {
            let got = route_to(&r, Parent { port, ..WEB }, &p, None);
            assert_eq!(got.is_ok(), attached, "{parent} on port {port}: {got:?}");
        }
    }
}

#[test]
fn consumer_routes_apply_only_to_their_namespace() {
    let producer = http_route("producer", &format!("[{}]", rule("[]", "v1")));
    // Backends default to the route's namespace, so the consumer route names `shop`.
    let to_v2 = "[{ backendRefs: [{ name: v2, namespace: shop, port: 80 }] }]";
    let consumer = http_route_in("client", "consumer", "", to_v2);
    let r = router(&[producer, consumer]);
    let p = parts("GET", "/", &[]);
    assert_eq!(route_to(&r, WEB, &p, Some("client")).as_deref(), Ok("v2"));
    assert_eq!(route_to(&r, WEB, &p, Some("other")).as_deref(), Ok("v1"));
    assert_eq!(route_to(&r, WEB, &p, Some("shop")).as_deref(), Ok("v1"));
    assert_eq!(route_to(&r, WEB, &p, None).as_deref(), Ok("v1"));

    // Consumer routes alone: other clients see no route at all.
    let only = http_route_in("client", "consumer", "", to_v2);
    let r = router(&[only]);
    assert_eq!(route_to(&r, WEB, &p, Some("client")).as_deref(), Ok("v2"));
    assert_eq!(route_to(&r, WEB, &p, Some("other")), Err(NoRoute::Unrouted));
}

#[test]
fn grpc_routes_win_over_http_routes_on_the_same_port() {
    let grpc = "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: GRPCRoute\n    \
                metadata: { name: g, namespace: shop }\n    \
                spec: { parentRefs: [{ group: '', kind: Service, name: web, port: 80 }], \
                rules: [{ backendRefs: [{ name: grpc, port: 9090 }] }] }\n";
    let http = http_route("h", &format!("[{}]", rule("[]", "v1")));
    let text = format!("{BASE}{http}{grpc}");
    let config = parse_str(Path::new("t.yaml"), &text).expect("a conflict is not an error");
    let r = Router::new(&config);
    let p = parts("POST", "/pkg.Svc/Call", &[]);
    let s = select(&r, WEB, &Request::from_parts(&p, None)).expect("grpc route");
    assert_eq!((s.route, s.kind), ("shop/g", RouteKind::Grpc));
    assert_eq!(r.rejections().len(), 1);
    let rej = &r.rejections()[0];
    assert_eq!((rej.route.as_str(), rej.kind), ("shop/h", RouteKind::Http));
    assert!(
        rej.reason.contains("GRPCRoute takes precedence"),
        "{}",
        rej.reason
    );
}

#[test]
fn router_reports_routes_it_cannot_use() {
    // Built by hand (as the Kubernetes source will), bypassing file validation.
    let text = format!(
        "{BASE}{}",
        http_route("ok", &format!("[{}]", rule("[]", "v1")))
    );
    let mut config = parse_str(Path::new("t.yaml"), &text).expect("valid");
    let mut broken = config.routes[0].clone();
    broken.metadata.name = "broken".into();
    if let crate::config::RouteSpec::Http(spec) = &mut broken.spec {
        spec.parent_refs[0].name = "missing".into();
    }
    let mut bad_regex = config.routes[0].clone();
    bad_regex.metadata.name = "bad-regex".into();
    if let crate::config::RouteSpec::Http(spec) = &mut bad_regex.spec {
        spec.rules[0].matches = vec![crate::config::model::HttpRouteMatch {
            path: Some(crate::config::model::HttpPathMatch {
                r#type: crate::config::model::PathMatchType::RegularExpression,
                value: "(".into(),
            }),
            ..Default::default()
        }];
    }
    config.routes.push(broken);
    config.routes.push(bad_regex);
    let r = Router::new(&config);
    let reasons: Vec<(&str, &str)> = r
        .rejections()
        .iter()
        .map(|x| (x.route.as_str(), x.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "shop/broken");
    assert!(
        reasons[0].1.contains("`shop/missing` does not exist"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "shop/bad-regex");
    assert!(
        reasons[1].1.contains("spec.rules[0].matches[0].path.value"),
        "{reasons:?}"
    );
    let p = parts("GET", "/", &[]);
    assert_eq!(
        route_to(&r, WEB, &p, None).as_deref(),
        Ok("v1"),
        "the good route works"
    );
    assert!(r.has_routes("shop", "web") && !r.has_routes("shop", "v1"));
}

#[test]
fn timeouts_and_retries_are_compiled() {
    let r = router(&[http_route(
        "web",
        "[{ backendRefs: [{ name: v1, port: 80 }], timeouts: { request: 10s, backendRequest: 2s500ms }, \
         retry: { codes: [502, 503], attempts: 3, backoff: 100ms } }, \
         { matches: [{ path: { value: /zero } }], timeouts: { request: 0s }, retry: {} }]",
    )]);
    let p = parts("GET", "/", &[]);
    let s = select(&r, WEB, &Request::from_parts(&p, None)).expect("route");
    assert_eq!(
        s.rule.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_millis(2500)),
        }
    );
    let retry = s.rule.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.backoff, Duration::from_millis(100));
    assert!(retry.retries_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!retry.retries_status(StatusCode::INTERNAL_SERVER_ERROR));

    let p = parts("GET", "/zero", &[]);
    let s = select(&r, WEB, &Request::from_parts(&p, None)).expect("route");
    assert_eq!(
        s.rule.timeouts,
        Timeouts::default(),
        "0s disables the timeout"
    );
    let retry = s.rule.retry.as_ref().expect("retry");
    assert_eq!(
        (retry.attempts, retry.backoff, retry.codes.len()),
        (DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_BACKOFF, 0)
    );
}

#[test]
fn hostnames_are_not_used_for_matching() {
    let text = format!(
        "{BASE}  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    \
         metadata: {{ name: h, namespace: shop }}\n    \
         spec: {{ parentRefs: [{{ group: '', kind: Service, name: web }}], hostnames: [www.example.com], \
         rules: [{{ backendRefs: [{{ name: v1, port: 80 }}] }}] }}\n"
    );
    let r = Router::new(&parse_str(Path::new("t.yaml"), &text).expect("valid"));
    let p = parts("GET", "http://web.shop.svc.cluster.local/", &[]);
    assert_eq!(route_to(&r, WEB, &p, None).as_deref(), Ok("v1"));
}
