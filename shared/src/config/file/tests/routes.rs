//! Routes and waypoints in the config file: upstream-shaped YAML, helpers, and every
//! validation error naming its field.

use super::*;
use crate::config::model::{GatewayDuration, HttpPathModifierType, RouteKind, RouteSpec};

/// Namespaces, workloads and services the examples refer to.
const MESH: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: faces
    labels: { ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: waypoint }
  - name: fast-clients
workloads:
  - name: smiley-1
    namespace: faces
    ips: [10.2.0.2]
    node: node-a
    labels: { app: smiley }
  - name: waypoint-7d9f
    namespace: faces
    serviceAccount: waypoint
    ips: [10.2.0.9]
    node: node-a
    labels: { gateway.networking.k8s.io/gateway-name: waypoint }
services:
  - { name: smiley, namespace: faces, vips: [10.96.1.1], ports: [{ name: http, port: 80 }], selector: { app: smiley } }
  - { name: smiley2, namespace: faces, ports: [{ port: 80 }], selector: { app: smiley2 } }
  - { name: face, namespace: faces, ports: [{ port: 80 }], selector: { app: face }, labels: { ambit.dev/use-waypoint: none } }
  - { name: foo-svc, namespace: faces, ports: [{ name: grpc, port: 50051 }], selector: { app: foo } }
  - { name: bar-svc, namespace: faces, ports: [{ port: 50051 }], selector: { app: bar } }
waypoints:
  - name: waypoint
    namespace: faces
"#;

/// Upstream-shaped objects: the GAMMA docs' producer and consumer routes as `kubectl get
/// -o yaml` prints them (server-side fields and `status` included), and the Gateway API
/// docs' GRPCRoute example attached to a Service.
const UPSTREAM_ROUTES: &str = r#"routes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata:
    name: smiley-route
    namespace: faces
    uid: 5c1f3a0e-1b6e-4f0e-9b43-3f0f5c1a9d2e
    resourceVersion: "18211"
    generation: 2
    creationTimestamp: "2024-03-01T10:00:00Z"
    labels: { app: smiley }
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute"}
    managedFields:
    - manager: kubectl-client-side-apply
      operation: Update
      apiVersion: gateway.networking.k8s.io/v1
  spec:
    parentRefs:
    - name: smiley
      kind: Service
      group: core
      port: 80
    rules:
    - matches:
      - path:
          type: PathPrefix
          value: /
      - headers:
        - name: x-faces-user
          value: testuser
      backendRefs:
      - name: smiley
        port: 80
        weight: 90
      - name: smiley2
        port: 80
        weight: 10
      timeouts:
        request: 100ms
      retry:
        codes: [503]
        attempts: 2
        backoff: 50ms
    - matches:
      - path:
          type: Exact
          value: /legacy
      filters:
      - type: RequestRedirect
        requestRedirect:
          path:
            type: ReplaceFullPath
            replaceFullPath: /
          statusCode: 301
  status:
    parents:
    - parentRef: { group: "", kind: Service, name: smiley, port: 80 }
      controllerName: ambit.dev/waypoint
      conditions:
      - type: Accepted
        status: "True"
        reason: Accepted
        message: ""
        observedGeneration: 2
        lastTransitionTime: "2024-03-01T10:00:01Z"
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata:
    name: smiley-route
    namespace: fast-clients
  spec:
    parentRefs:
    - name: smiley
      namespace: faces
      kind: Service
      group: ""
      port: 80
    rules:
    - backendRefs:
      - name: smiley
        namespace: faces
        port: 80
      timeouts:
        request: 100ms
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata:
    name: foo-route
    namespace: faces
  spec:
    parentRefs:
    - { group: "", kind: Service, name: foo-svc }
    hostnames:
    - "foo.example.com"
    rules:
    - matches:
      - method:
          service: com.example.User
          method: Login
      backendRefs:
      - name: foo-svc
        port: 50051
    - matches:
      - headers:
        - type: Exact
          name: magic
          value: foo
        method:
          service: com.Example.Login
          method: Login
      backendRefs:
      - name: foo-svc
        port: 50051
    - matches:
      - method:
          service: com.example.Things
          method: DoThing
      backendRefs:
      - name: bar-svc
        port: 50051
"#;

fn mesh_with(routes: &str) -> String {
    format!("{MESH}{routes}")
}

#[test]
fn parses_upstream_routes() {
    let c = parse(&mesh_with(UPSTREAM_ROUTES)).unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<(RouteKind, String)> = c
        .routes
        .iter()
        .map(|r| (r.kind(), r.qualified_name()))
        .collect();
    assert_eq!(
        kinds,
        [
            (RouteKind::Http, "faces/smiley-route".to_string()),
            (RouteKind::Http, "fast-clients/smiley-route".to_string()),
            (RouteKind::Grpc, "faces/foo-route".to_string()),
        ]
    );
    let producer = &c.routes[0];
    assert_eq!(
        producer
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.unix_seconds()),
        Some(1_709_287_200)
    );
    assert_eq!(
        producer.metadata.labels.get("app").map(String::as_str),
        Some("smiley")
    );
    let RouteSpec::Http(spec) = &producer.spec else {
        panic!("HTTPRoute")
    };
    let rule = &spec.rules[0];
    assert_eq!(rule.backend_refs[1].weight, 10);
    assert_eq!(rule.backend_refs[0].kind, None, "defaults stay as written");
    let timeout = rule.timeouts.as_ref().and_then(|t| t.request.as_ref());
    assert_eq!(
        timeout.map(GatewayDuration::as_duration),
        Some(std::time::Duration::from_millis(100))
    );
    let redirect = spec.rules[1].filters[0]
        .request_redirect
        .as_ref()
        .expect("redirect");
    assert_eq!(
        redirect.path.as_ref().map(|p| p.r#type),
        Some(HttpPathModifierType::ReplaceFullPath)
    );
}

#[test]
fn routes_round_trip_through_serde() {
    let c = parse(&mesh_with(UPSTREAM_ROUTES)).expect("valid");
    let text = serde_yaml_ng::to_string(&c).expect("serialize");
    assert!(
        text.contains("apiVersion: gateway.networking.k8s.io/v1"),
        "{text}"
    );
    assert!(text.contains("kind: GRPCRoute"), "{text}");
    assert!(
        text.contains("request: 100ms"),
        "durations keep their text: {text}"
    );
    let again = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(again, c);
}

#[test]
fn spec_may_come_before_kind() {
    let routes = "routes:\n- spec: { parentRefs: [{ group: '', kind: Service, name: smiley }], \
                  rules: [{ backendRefs: [{ name: smiley, port: 80 }] }] }\n  \
                  metadata: { name: r, namespace: faces }\n  kind: HTTPRoute\n  \
                  apiVersion: gateway.networking.k8s.io/v1\n";
    let c = parse(&mesh_with(routes)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.routes[0].kind(), RouteKind::Http);
    // Errors inside a buffered spec still say where.
    let bad = routes.replace("backendRefs", "backendRef");
    let e = parse(&mesh_with(&bad)).expect_err("typo");
    assert_eq!(e.field, "routes[0]");
    assert!(
        e.reason.contains("spec.rules[0].backendRef") && e.reason.contains("unknown field"),
        "{e}"
    );
}

#[test]
fn waypoint_helpers() {
    let c = parse(MESH).expect("valid");
    let service = |name: &str| c.service("faces", name).expect("service");
    let w = c
        .waypoint_for_service(service("smiley"))
        .expect("namespace label");
    assert_eq!(
        (w.name.as_str(), w.service_account()),
        ("waypoint", "waypoint")
    );
    assert!(
        c.waypoint_for_service(service("face")).is_none(),
        "`none` on the service opts out"
    );
    let pods: Vec<&str> = c.waypoint_workloads(w).map(|p| p.name.as_str()).collect();
    assert_eq!(pods, ["waypoint-7d9f"]);
    assert_eq!(
        c.waypoint_identity(w).expect("identity").to_string(),
        "spiffe://cluster.local/ns/faces/sa/waypoint"
    );

    // The service's own label wins over its namespace's.
    let text = MESH
        .replace(
            "selector: { app: smiley2 }",
            "selector: { app: smiley2 }, labels: { ambit.dev/use-waypoint: special }",
        )
        .replace(
            "  - name: waypoint\n    namespace: faces\n",
            "  - name: waypoint\n    namespace: faces\n  - { name: special, namespace: faces, serviceAccount: sa-special }\n",
        );
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let w = c
        .waypoint_for_service(c.service("faces", "smiley2").expect("service"))
        .expect("service label");
    assert_eq!(
        (w.name.as_str(), w.service_account()),
        ("special", "sa-special")
    );
    assert_eq!(c.waypoint_workloads(w).count(), 0);

    // A label naming no declared waypoint, or no label anywhere: no waypoint.
    let c =
        parse(&MESH.replace("use-waypoint: waypoint", "use-waypoint: elsewhere")).expect("valid");
    assert!(
        c.waypoint_for_service(c.service("faces", "smiley").expect("service"))
            .is_none()
    );
    let c = parse(&MESH.replace(", ambit.dev/use-waypoint: waypoint", "")).expect("valid");
    assert!(
        c.waypoint_for_service(c.service("faces", "smiley").expect("service"))
            .is_none()
    );
}

/// A route list item with `spec` in flow style; `$P` is a valid Service parent and `$B` a
/// valid backend.
fn route(kind: &str, spec: &str) -> String {
    let spec = spec
        .replace("$P", "{ group: '', kind: Service, name: smiley }")
        .replace("$B", "{ name: smiley, port: 80 }");
    format!(
        "routes:\n- apiVersion: gateway.networking.k8s.io/v1\n  kind: {kind}\n  \
         metadata: {{ name: r, namespace: faces }}\n  spec: {spec}\n"
    )
}

fn http(spec: &str) -> String {
    mesh_with(&route("HTTPRoute", spec))
}

fn grpc(spec: &str) -> String {
    mesh_with(&route("GRPCRoute", spec))
}

/// Every route check, each with the field it names. Fields are relative to `routes[0]`.
#[test]
fn route_errors_name_their_field() {
    let cases: &[(&str, String, &str, &str)] = &[
        // The object.
        (
            "old apiVersion",
            http("{ parentRefs: [$P] }").replace("k8s.io/v1\n", "k8s.io/v1beta1\n"),
            "apiVersion",
            "unknown variant `gateway.networking.k8s.io/v1beta1`, expected `gateway.networking.k8s.io/v1`",
        ),
        (
            "other kind",
            mesh_with(&route("TCPRoute", "{ parentRefs: [$P] }")),
            "kind",
            "unknown variant `TCPRoute`",
        ),
        (
            "unknown top-level key",
            http("{ parentRefs: [$P] }").replace("  spec:", "  specs: {}\n  spec:"),
            "specs",
            "unknown field `specs`",
        ),
        (
            "no metadata.namespace",
            http("{ parentRefs: [$P] }").replace(", namespace: faces }", " }"),
            "metadata",
            "missing field `namespace`",
        ),
        (
            "bad name",
            http("{ parentRefs: [$P] }").replace("name: r,", "name: R_1,"),
            "metadata.name",
            "route name",
        ),
        (
            "undeclared namespace",
            http("{ parentRefs: [{ group: '', kind: Service, name: smiley, namespace: faces }], rules: [{ backendRefs: [{ name: smiley, namespace: faces, port: 80 }] }] }")
                .replace("namespace: faces }\n  spec", "namespace: nowhere }\n  spec"),
            "metadata.namespace",
            "namespace `nowhere` is not declared",
        ),
        (
            "unknown spec key",
            http("{ parentRefs: [$P], rules: [{ matchs: [] }] }"),
            "spec.rules[0].matchs",
            "unknown field `matchs`",
        ),
        // Parents.
        (
            "no parents",
            http("{ rules: [{ backendRefs: [$B] }] }"),
            "spec.parentRefs",
            "needs a parent Service",
        ),
        (
            "Service without group",
            http("{ parentRefs: [{ kind: Service, name: smiley }] }"),
            "spec.parentRefs[0].group",
            "set `group: \"\"`",
        ),
        (
            "only a Gateway parent",
            http("{ parentRefs: [{ name: my-gateway }] }"),
            "spec.parentRefs",
            "no parent is a Service",
        ),
        (
            "parent port 0",
            http("{ parentRefs: [{ group: '', kind: Service, name: smiley, port: 0 }] }"),
            "spec.parentRefs[0].port",
            "port 0",
        ),
        (
            "missing parent service",
            http("{ parentRefs: [{ group: '', kind: Service, name: frowny }] }"),
            "spec.parentRefs[0].name",
            "no service `frowny` in namespace `faces`",
        ),
        (
            "parent port not exposed",
            http("{ parentRefs: [{ group: '', kind: Service, name: smiley, port: 81 }] }"),
            "spec.parentRefs[0].port",
            "service `faces/smiley` has no port 81",
        ),
        (
            "unknown section name",
            http("{ parentRefs: [{ group: '', kind: Service, name: smiley, sectionName: grpc }] }"),
            "spec.parentRefs[0].sectionName",
            "no port named `grpc`",
        ),
        (
            "hostname is an IP",
            http("{ parentRefs: [$P], hostnames: ['10.0.0.1'] }"),
            "spec.hostnames[0]",
            "not a hostname",
        ),
        // Rules and matches.
        (
            "empty rules",
            http("{ parentRefs: [$P], rules: [] }"),
            "spec.rules",
            "at least one rule",
        ),
        (
            "duplicate rule names",
            http("{ parentRefs: [$P], rules: [{ name: a, backendRefs: [$B] }, { name: a, backendRefs: [$B] }] }"),
            "spec.rules[1].name",
            "used twice",
        ),
        (
            "relative path",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { value: api } }] }] }"),
            "spec.rules[0].matches[0].path.value",
            "must be an absolute path",
        ),
        (
            "double slash",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { type: Exact, value: /a//b } }] }] }"),
            "spec.rules[0].matches[0].path.value",
            "must not contain `//`",
        ),
        (
            "space in path",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { value: '/a b' } }] }] }"),
            "spec.rules[0].matches[0].path.value",
            "%-encoded",
        ),
        (
            "bad path regex",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { type: RegularExpression, value: '/(a' } }] }] }"),
            "spec.rules[0].matches[0].path.value",
            "not a usable regular expression",
        ),
        (
            "huge path regex",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { type: RegularExpression, value: '(\\w{100}){100}' } }] }] }"),
            "spec.rules[0].matches[0].path.value",
            "compiles to more than",
        ),
        (
            "unknown path type",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { type: Prefix, value: / } }] }] }"),
            "spec.rules[0].matches[0].path.type",
            "unknown variant `Prefix`",
        ),
        (
            "bad header name",
            http("{ parentRefs: [$P], rules: [{ matches: [{ headers: [{ name: 'x y', value: a }] }] }] }"),
            "spec.rules[0].matches[0].headers[0].name",
            "not a valid header name",
        ),
        (
            "header matched twice",
            http("{ parentRefs: [$P], rules: [{ matches: [{ headers: [{ name: a, value: b }, { name: a, value: c }] }] }] }"),
            "spec.rules[0].matches[0].headers[1].name",
            "matched twice",
        ),
        (
            "empty header value",
            http("{ parentRefs: [$P], rules: [{ matches: [{ headers: [{ name: a, value: '' }] }] }] }"),
            "spec.rules[0].matches[0].headers[0].value",
            "must be 1 to 4096 characters",
        ),
        (
            "bad header regex",
            http("{ parentRefs: [$P], rules: [{ matches: [{ headers: [{ type: RegularExpression, name: a, value: '[' }] }] }] }"),
            "spec.rules[0].matches[0].headers[0].value",
            "not a usable regular expression",
        ),
        (
            "bad query name",
            http("{ parentRefs: [$P], rules: [{ matches: [{ queryParams: [{ name: 'a=b', value: c }] }] }] }"),
            "spec.rules[0].matches[0].queryParams[0].name",
            "not a valid query parameter name",
        ),
        (
            "bad query regex",
            http("{ parentRefs: [$P], rules: [{ matches: [{ queryParams: [{ type: RegularExpression, name: a, value: '(' }] }] }] }"),
            "spec.rules[0].matches[0].queryParams[0].value",
            "not a usable regular expression",
        ),
        (
            "unknown method",
            http("{ parentRefs: [$P], rules: [{ matches: [{ method: FETCH }] }] }"),
            "spec.rules[0].matches[0].method",
            "unknown variant `FETCH`",
        ),
        // Filters.
        (
            "unsupported filter",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: CORS }] }] }"),
            "spec.rules[0].filters[0].type",
            "unknown variant `CORS`",
        ),
        (
            "mirror without its config",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestMirror }] }] }"),
            "spec.rules[0].filters[0].requestMirror",
            "needs `requestMirror`",
        ),
        (
            "mirror without a port",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow } } }] }] }"),
            "spec.rules[0].filters[0].requestMirror.backendRef.port",
            "needs `port`",
        ),
        (
            "mirror percent over 100",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 80 }, percent: 101 } }] }] }"),
            "spec.rules[0].filters[0].requestMirror.percent",
            "not a percentage",
        ),
        (
            "mirror fraction over 1",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 80 }, fraction: { numerator: 3, denominator: 2 } } }] }] }"),
            "spec.rules[0].filters[0].requestMirror.fraction.numerator",
            "more than the denominator",
        ),
        (
            "mirror with percent and fraction",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 80 }, percent: 5, fraction: { numerator: 1 } } }] }] }"),
            "spec.rules[0].filters[0].requestMirror",
            "not both",
        ),
        (
            "filter without its config",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestHeaderModifier }] }] }"),
            "spec.rules[0].filters[0].requestHeaderModifier",
            "needs `requestHeaderModifier`",
        ),
        (
            "filter with another's config",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: {}, urlRewrite: {} }] }] }"),
            "spec.rules[0].filters[0].urlRewrite",
            "does not belong in a `RequestRedirect` filter",
        ),
        (
            "repeated filter",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite, urlRewrite: {} }, { type: URLRewrite, urlRewrite: {} }] }] }"),
            "spec.rules[0].filters[1].type",
            "only one `URLRewrite` filter",
        ),
        (
            "redirect and rewrite",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: {} }, { type: URLRewrite, urlRewrite: {} }] }] }"),
            "spec.rules[0].filters[1].type",
            "cannot be used together",
        ),
        (
            "redirect with backends",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: {} }], backendRefs: [$B] }] }"),
            "spec.rules[0].backendRefs",
            "remove its `backendRefs`",
        ),
        (
            "redirect status",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 304 } }] }] }"),
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "304 is not a redirect status",
        ),
        (
            "redirect hostname",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { hostname: 'Example.com' } }] }] }"),
            "spec.rules[0].filters[0].requestRedirect.hostname",
            "not a hostname",
        ),
        (
            "redirect port",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { port: 0 } }] }] }"),
            "spec.rules[0].filters[0].requestRedirect.port",
            "between 1 and 65535",
        ),
        (
            "redirect scheme",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestRedirect, requestRedirect: { scheme: ftp } }] }] }"),
            "spec.rules[0].filters[0].requestRedirect.scheme",
            "unknown variant `ftp`",
        ),
        (
            "prefix rewrite of an exact match",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { type: Exact, value: /a } }], filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /b } } }] }] }"),
            "spec.rules[0].filters[0].urlRewrite.path.type",
            "exactly one match, with a `PathPrefix` path",
        ),
        (
            "prefix redirect with two matches",
            http("{ parentRefs: [$P], rules: [{ matches: [{ path: { value: /a } }, { path: { value: /b } }], filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /c } } }] }] }"),
            "spec.rules[0].filters[0].requestRedirect.path.type",
            "exactly one match",
        ),
        (
            "full path missing",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplaceFullPath, replacePrefixMatch: /x } } }] }] }"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "needs `replaceFullPath`",
        ),
        (
            "relative full path",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplaceFullPath, replaceFullPath: x } } }] }] }"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "must be an absolute path",
        ),
        (
            "query in a rewrite",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplaceFullPath, replaceFullPath: '/x?y=1' } } }] }] }"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "%-encoded",
        ),
        (
            "rewrite hostname",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite, urlRewrite: { hostname: 'a..b' } }] }] }"),
            "spec.rules[0].filters[0].urlRewrite.hostname",
            "not a hostname",
        ),
        (
            "two actions on one header",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: X-A, value: '1' }], remove: [x-a] } }] }] }"),
            "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
            "already has an action",
        ),
        (
            "bad header value",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { add: [{ name: x-a, value: \"a\\nb\" }] } }] }] }"),
            "spec.rules[0].filters[0].responseHeaderModifier.add[0].value",
            // Refused by the config-wide check before the route compiler sees it.
            "control character U+000A",
        ),
        (
            "bad header name in a modifier",
            http("{ parentRefs: [$P], rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: 'a:b', value: '1' }] } }] }] }"),
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            "not a valid header name",
        ),
        // Backends.
        (
            "backend group",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ group: apps, name: smiley, port: 80 }] }] }"),
            "spec.rules[0].backendRefs[0].group",
            "group `apps` is not supported",
        ),
        (
            "backend kind",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ kind: ServiceImport, name: smiley, port: 80 }] }] }"),
            "spec.rules[0].backendRefs[0].kind",
            "kind `ServiceImport` is not supported",
        ),
        (
            "backend without port",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: smiley }] }] }"),
            "spec.rules[0].backendRefs[0].port",
            "needs `port`",
        ),
        (
            "weight too large",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: smiley, port: 80, weight: 1000001 }] }] }"),
            "spec.rules[0].backendRefs[0].weight",
            "weights go from 0 to 1000000",
        ),
        (
            "negative weight",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: smiley, port: 80, weight: -1 }] }] }"),
            "spec.rules[0].backendRefs[0].weight",
            "expected u32",
        ),
        (
            "missing backend service",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: frowny, port: 80 }] }] }"),
            "spec.rules[0].backendRefs[0].name",
            "no service `frowny` in namespace `faces`",
        ),
        (
            "backend port not exposed",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: smiley, port: 8080 }] }] }"),
            "spec.rules[0].backendRefs[0].port",
            "service `faces/smiley` has no port 8080",
        ),
        (
            "backend filter",
            http("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: smiley, port: 80, filters: [{ type: RequestHeaderModifier }] }] }] }"),
            "spec.rules[0].backendRefs[0].filters[0].requestHeaderModifier",
            "needs `requestHeaderModifier`",
        ),
        // Timeouts and retries.
        (
            "bad duration",
            http("{ parentRefs: [$P], rules: [{ timeouts: { request: 1.5s } }] }"),
            "spec.rules[0].timeouts.request",
            "fractions are not allowed",
        ),
        (
            "per-try longer than the request",
            http("{ parentRefs: [$P], rules: [{ timeouts: { request: 1s, backendRequest: 2s } }] }"),
            "spec.rules[0].timeouts.backendRequest",
            "longer than the request timeout",
        ),
        (
            "retry code",
            http("{ parentRefs: [$P], rules: [{ retry: { codes: [503, 200] } }] }"),
            "spec.rules[0].retry.codes[1]",
            "200 cannot be retried",
        ),
        (
            "retry backoff",
            http("{ parentRefs: [$P], rules: [{ retry: { backoff: 1d } }] }"),
            "spec.rules[0].retry.backoff",
            "unit must be h, m, s or ms",
        ),
        // GRPCRoute.
        (
            "grpc method match without names",
            grpc("{ parentRefs: [$P], rules: [{ matches: [{ method: { type: Exact } }] }] }"),
            "spec.rules[0].matches[0].method",
            "set `service`, `method` or both",
        ),
        (
            "grpc service",
            grpc("{ parentRefs: [$P], rules: [{ matches: [{ method: { service: 'foo/bar' } }] }] }"),
            "spec.rules[0].matches[0].method.service",
            "is not a service like",
        ),
        (
            "grpc method",
            grpc("{ parentRefs: [$P], rules: [{ matches: [{ method: { method: Get-Thing } }] }] }"),
            "spec.rules[0].matches[0].method.method",
            "is not a method like",
        ),
        (
            "grpc regex",
            grpc("{ parentRefs: [$P], rules: [{ matches: [{ method: { type: RegularExpression, service: '(' } }] }] }"),
            "spec.rules[0].matches[0].method.service",
            "not a usable regular expression",
        ),
        (
            "grpc filter type",
            grpc("{ parentRefs: [$P], rules: [{ filters: [{ type: URLRewrite }] }] }"),
            "spec.rules[0].filters[0].type",
            "unknown variant `URLRewrite`",
        ),
        (
            "grpc repeated filter",
            grpc("{ parentRefs: [$P], rules: [{ filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: {} }, { type: ResponseHeaderModifier, responseHeaderModifier: {} }] }] }"),
            "spec.rules[0].filters[1].type",
            "only one `ResponseHeaderModifier`",
        ),
        (
            "grpc timeouts do not exist",
            grpc("{ parentRefs: [$P], rules: [{ timeouts: { request: 1s } }] }"),
            "spec.rules[0].timeouts",
            "unknown field `timeouts`",
        ),
        (
            "grpc backend port",
            grpc("{ parentRefs: [$P], rules: [{ backendRefs: [{ name: foo-svc, port: 80 }] }] }"),
            "spec.rules[0].backendRefs[0].port",
            "service `faces/foo-svc` has no port 80",
        ),
    ];
    for (what, text, field, reason) in cases {
        let e = parse(text).expect_err(what);
        let want = format!("routes[0].{field}");
        assert_eq!(e.field, want, "{what}: {e}");
        assert!(
            e.reason.contains(reason),
            "{what}: `{}` lacks `{reason}`",
            e.reason
        );
        assert!(e.to_string().contains(&want), "{what}: {e}");
    }
}

#[test]
fn duplicate_routes_are_refused_per_kind() {
    let one = route("HTTPRoute", "{ parentRefs: [$P] }");
    let twice = format!("{one}{}", one.trim_start_matches("routes:\n"));
    expect_error(
        &mesh_with(&twice),
        "routes[1].metadata.name",
        "HTTPRoute `faces/r` is declared twice",
    );
    // The same name as another kind is a different object.
    let grpc = route("GRPCRoute", "{ parentRefs: [$P] }");
    let both = format!("{one}{}", grpc.trim_start_matches("routes:\n"));
    assert!(parse(&mesh_with(&both)).is_ok());
}

#[test]
fn waypoint_errors_name_their_field() {
    let waypoints = "waypoints:\n  - name: waypoint\n    namespace: faces\n";
    let with = |extra: &str| MESH.replace(waypoints, &format!("{waypoints}{extra}"));
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "undeclared namespace",
            with("  - { name: w2, namespace: nowhere }\n"),
            "waypoints[1].namespace",
            "namespace `nowhere` is not declared",
        ),
        (
            "declared twice",
            with("  - { name: waypoint, namespace: faces }\n"),
            "waypoints[1].name",
            "waypoint `faces/waypoint` is declared twice",
        ),
        (
            "reserved name",
            with("  - { name: none, namespace: faces }\n"),
            "waypoints[1].name",
            "`none` is reserved",
        ),
        (
            "bad name",
            with("  - { name: Way_Point, namespace: faces }\n"),
            "waypoints[1].name",
            "waypoint name",
        ),
        (
            "bad service account",
            with("  - { name: w2, namespace: faces, serviceAccount: 'SA!' }\n"),
            "waypoints[1].serviceAccount",
            "service account",
        ),
        (
            "unknown key",
            with("  - { name: w2, namespace: faces, replicas: 2 }\n"),
            "waypoints[1].replicas",
            "unknown field `replicas`",
        ),
        (
            "waypoint pod under another service account",
            MESH.replace("    serviceAccount: waypoint\n", ""),
            "workloads[1].serviceAccount",
            "must run as the waypoint's service account `waypoint`, not `default`",
        ),
    ];
    for (what, text, field, reason) in cases {
        let e = parse(text).expect_err(what);
        assert_eq!(e.field, *field, "{what}: {e}");
        assert!(
            e.reason.contains(reason),
            "{what}: `{}` lacks `{reason}`",
            e.reason
        );
    }
}

/// The README's "Routes and waypoints" example is a valid config, and its sample error is
/// what a mistake in it really prints.
#[test]
fn readme_example_is_valid() {
    let readme = include_str!("../../../../../README.md");
    let section = readme
        .split_once("### Routes and waypoints")
        .map(|(_, rest)| rest)
        .expect("README section");
    let example = section
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(yaml, _)| yaml)
        .expect("example");
    let c = parse(example).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((c.routes.len(), c.waypoints.len()), (3, 1));
    let router = crate::route::Router::new(&c);
    assert_eq!(router.rejections(), []);

    let sample = section
        .lines()
        .find(|l| l.starts_with("invalid config"))
        .expect("sample error");
    let e = parse(&example.replace("value: /api", "value: api")).expect_err("relative path");
    assert_eq!(e.to_string(), sample);
}
