//! One test per precedence rule and example in the Gateway API spec text
//! (`HTTPRouteRule.matches`, `GRPCRouteRule.matches`, `HTTPPathMatch`, `HTTPRouteMatch`).
//! Routes are listed so that file order alone would pick the wrong answer.

use super::*;

const TS_OLD: &str = ", creationTimestamp: '2020-09-08T01:02:03Z'";
const TS_NEW: &str = ", creationTimestamp: '2020-09-08T01:02:04Z'";

fn selected(r: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> (String, usize) {
    let p = parts(method, uri, headers);
    let s = select(r, WEB, &Request::from_parts(&p, None))
        .unwrap_or_else(|e| panic!("{method} {uri}: {e:?}"));
    (s.route.to_string(), s.rule_index)
}

/// "Exact" path match comes first, even against a longer prefix.
#[test]
fn exact_path_beats_any_prefix() {
    let r = router(&[
        http_route(
            "prefix",
            &format!("[{}]", rule("[{ path: { value: /foo/bar/ } }]", "v1")),
        ),
        http_route(
            "exact",
            &format!(
                "[{}]",
                rule("[{ path: { type: Exact, value: /foo/bar } }]", "v2")
            ),
        ),
    ]);
    assert_eq!(backend_for(&r, "GET", "/foo/bar", &[]), "v2");
    assert_eq!(
        backend_for(&r, "GET", "/foo/bar/", &[]),
        "v1",
        "exact is exact"
    );
}

/// "Prefix" path match with the largest number of characters.
#[test]
fn longest_prefix_wins() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}]",
            rule("[{ path: { value: / } }]", "web"),
            rule("[{ path: { value: /foo } }]", "v1"),
            rule("[{ path: { value: /foo/bar } }]", "v2"),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/foo/bar/baz", &[]), "v2");
    assert_eq!(backend_for(&r, "GET", "/foo/bar", &[]), "v2");
    assert_eq!(
        backend_for(&r, "GET", "/foo/barn", &[]),
        "v1",
        "segment-wise"
    );
    assert_eq!(backend_for(&r, "GET", "/foo", &[]), "v1");
    assert_eq!(backend_for(&r, "GET", "/food", &[]), "web");
}

/// The `HTTPPathMatch` examples: `Exact` `/abc` matches only `/abc`; `PathPrefix` `/abc`
/// matches `/abc`, `/abc/` and `/abc/def` but not `/abcd`; a trailing `/` is ignored.
#[test]
fn path_match_type_examples() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}]",
            rule("[{ path: { type: Exact, value: /abc } }]", "v1"),
            rule("[{ path: { type: PathPrefix, value: /xyz/ } }]", "v2"),
        ),
    )]);
    let p = |path: &str| route_to(&r, WEB, &parts("GET", path, &[]), None);
    assert_eq!(p("/abc").as_deref(), Ok("v1"));
    for miss in ["/abc/", "/Abc", "/abcd"] {
        assert_eq!(p(miss), Err(NoRoute::NoMatch), "{miss}");
    }
    for hit in ["/xyz", "/xyz/", "/xyz/def"] {
        assert_eq!(p(hit).as_deref(), Ok("v2"), "{hit}");
    }
    assert_eq!(p("/xyzd"), Err(NoRoute::NoMatch));
}

/// Method match comes after the path: a longer prefix beats a method match, and a method
/// match beats any number of header matches.
#[test]
fn method_ranks_after_path_and_before_headers() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}]",
            rule(
                "[{ headers: [{ name: a, value: '1' }, { name: b, value: '2' }] }]",
                "v1"
            ),
            rule("[{ method: GET }]", "v2"),
            rule("[{ path: { value: /api } }]", "v3"),
        ),
    )]);
    let both = [("a", "1"), ("b", "2")];
    assert_eq!(backend_for(&r, "GET", "/", &both), "v2");
    assert_eq!(backend_for(&r, "POST", "/", &both), "v1");
    assert_eq!(backend_for(&r, "GET", "/api", &both), "v3");
}

/// Largest number of header matches.
#[test]
fn most_header_matches_win() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}]",
            rule("[{ headers: [{ name: env, value: prod }] }]", "v1"),
            rule(
                "[{ headers: [{ name: env, value: prod }, { name: tier, value: gold }] }]",
                "v2"
            ),
        ),
    )]);
    assert_eq!(
        backend_for(&r, "GET", "/", &[("env", "prod"), ("tier", "gold")]),
        "v2"
    );
    assert_eq!(
        backend_for(&r, "GET", "/", &[("env", "prod"), ("tier", "tin")]),
        "v1"
    );
}

/// Largest number of query param matches, after header matches.
#[test]
fn most_query_param_matches_win_after_headers() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}]",
            rule("[{ queryParams: [{ name: a, value: '1' }] }]", "v1"),
            rule(
                "[{ queryParams: [{ name: a, value: '1' }, { name: b, value: '2' }] }]",
                "v2"
            ),
            rule("[{ headers: [{ name: h, value: x }] }]", "v3"),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/?a=1&b=2", &[]), "v2");
    assert_eq!(backend_for(&r, "GET", "/?a=1&b=3", &[]), "v1");
    assert_eq!(backend_for(&r, "GET", "/?a=1&b=2", &[("h", "x")]), "v3");
}

/// Across routes, ties go to the oldest route by creation timestamp (the spec's example:
/// 01:02:03 wins over 01:02:04), even when its name sorts later.
#[test]
fn oldest_route_wins_a_tie() {
    let same = |backend| format!("[{}]", rule("[{ path: { value: /x } }]", backend));
    let r = router(&[
        http_route_in("shop", "a-newer", TS_NEW, &same("v1")),
        http_route_in("shop", "b-older", TS_OLD, &same("v2")),
    ]);
    assert_eq!(
        selected(&r, "GET", "/x", &[]),
        ("shop/b-older".to_string(), 0)
    );
    // A route without a timestamp counts as newest.
    let r = router(&[
        http_route_in("shop", "a-unknown", "", &same("v1")),
        http_route_in("shop", "b-older", TS_NEW, &same("v2")),
    ]);
    assert_eq!(selected(&r, "GET", "/x", &[]).0, "shop/b-older");
}

/// Then the route first in alphabetical order by `{namespace}/{name}` (`foo/bar` before
/// `foo/baz` in the spec's example).
#[test]
fn alphabetical_order_breaks_a_tie_of_age() {
    let same = |backend| format!("[{}]", rule("[{ path: { value: /x } }]", backend));
    let r = router(&[
        http_route_in("shop", "baz", TS_OLD, &same("v1")),
        http_route_in("shop", "bar", TS_OLD, &same("v2")),
    ]);
    assert_eq!(selected(&r, "GET", "/x", &[]).0, "shop/bar");
    let r = router(&[
        http_route("baz", &same("v1")),
        http_route("bar", &same("v2")),
    ]);
    assert_eq!(selected(&r, "GET", "/x", &[]).0, "shop/bar");
}

/// Within a route, the first matching rule in list order wins a tie.
#[test]
fn first_rule_wins_within_a_route() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}]",
            rule("[{ path: { value: /y } }]", "v3"),
            rule("[{ path: { value: /x } }]", "v1"),
            rule("[{ path: { value: /x } }]", "v2"),
        ),
    )]);
    assert_eq!(selected(&r, "GET", "/x", &[]), ("shop/web".to_string(), 1));
    assert_eq!(backend_for(&r, "GET", "/x", &[]), "v1");
}

/// Specificity is compared across all routes before age: a newer, more specific route wins.
#[test]
fn specificity_beats_age() {
    let r = router(&[
        http_route_in(
            "shop",
            "old",
            TS_OLD,
            &format!("[{}]", rule("[{ path: { value: /a } }]", "v1")),
        ),
        http_route_in(
            "shop",
            "new",
            TS_NEW,
            &format!("[{}]", rule("[{ path: { value: /a/b } }]", "v2")),
        ),
    ]);
    assert_eq!(backend_for(&r, "GET", "/a/b", &[]), "v2");
    assert_eq!(backend_for(&r, "GET", "/a/c", &[]), "v1");
}

/// The `HTTPRouteRule.matches` example: a rule matches when any match does, and a match
/// when all its conditions do.
#[test]
fn matches_are_ored_and_conditions_anded() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}]",
            rule(
                "[{ path: { value: /foo }, headers: [{ name: version, value: v2 }] }, \
                 { path: { value: /v2/foo } }]",
                "v2"
            )
        ),
    )]);
    let p = |path: &str, headers: &[(&str, &str)]| {
        route_to(&r, WEB, &parts("GET", path, headers), None)
    };
    assert_eq!(p("/foo", &[("version", "v2")]).as_deref(), Ok("v2"));
    assert_eq!(p("/v2/foo", &[]).as_deref(), Ok("v2"));
    assert_eq!(p("/foo", &[]), Err(NoRoute::NoMatch));
    assert_eq!(p("/foo", &[("version", "v1")]), Err(NoRoute::NoMatch));
}

/// Only the first of several header matches with an equivalent (case-insensitive) name
/// counts, and names match case-insensitively.
#[test]
fn equivalent_header_names_count_once() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}]",
            rule(
                "[{ headers: [{ name: Env, value: prod }, { name: env, value: other }] }]",
                "v1"
            ),
            rule("[{ headers: [{ name: tier, value: gold }] }]", "v2"),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/", &[("ENV", "prod")]), "v1");
    // One header match each: the first rule wins the tie, so the second `env` was ignored.
    assert_eq!(
        backend_for(&r, "GET", "/", &[("env", "prod"), ("tier", "gold")]),
        "v1"
    );
}

/// Ambit's choice for regular expressions, which the spec leaves open: they rank below
/// every `PathPrefix`, longer patterns first (as Istio).
#[test]
fn regexes_rank_below_prefixes() {
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}, {}]",
            rule(
                "[{ path: { type: RegularExpression, value: '/.*' } }]",
                "v1"
            ),
            rule(
                "[{ path: { type: RegularExpression, value: '/api/.*' } }]",
                "v2"
            ),
            rule("[{ path: { value: / } }]", "v3"),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/api/x", &[]), "v3");
    let r = router(&[http_route(
        "web",
        &format!(
            "[{}, {}]",
            rule(
                "[{ path: { type: RegularExpression, value: '/.*' } }]",
                "v1"
            ),
            rule(
                "[{ path: { type: RegularExpression, value: '/api/.*' } }]",
                "v2"
            ),
        ),
    )]);
    assert_eq!(backend_for(&r, "GET", "/api/x", &[]), "v2");
    assert_eq!(backend_for(&r, "GET", "/other", &[]), "v1");
}

// --- GRPCRoute ---

fn grpc_route(name: &str, metadata: &str, rules: &str) -> String {
    format!(
        "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: GRPCRoute\n    \
         metadata: {{ name: {name}, namespace: shop{metadata} }}\n    \
         spec: {{ parentRefs: [{{ group: '', kind: Service, name: web, port: 80 }}], rules: {rules} }}\n"
    )
}

fn grpc_rule(matches: &str, backend: &str) -> String {
    format!("{{ matches: {matches}, backendRefs: [{{ name: {backend}, port: 80 }}] }}")
}

fn grpc_call(r: &Router, path: &str, headers: &[(&str, &str)]) -> Result<String, NoRoute> {
    let mut h = vec![("content-type", "application/grpc")];
    h.extend_from_slice(headers);
    route_to(r, WEB, &parts("POST", path, &h), None)
}

/// Characters in a matching service, then in a matching method, then header matches.
#[test]
fn grpc_precedence_service_then_method_then_headers() {
    let r = router(&[grpc_route(
        "g",
        "",
        &format!(
            "[{}, {}, {}, {}, {}]",
            grpc_rule("[{ method: { method: Check } }]", "v1"),
            grpc_rule("[{ method: { service: grpc.health.v1.Health } }]", "v2"),
            grpc_rule(
                "[{ method: { service: grpc.health.v1.Health, method: Check } }]",
                "v3"
            ),
            grpc_rule(
                "[{ method: { service: grpc.health.v1.Health, method: Watch }, \
                 headers: [{ name: x, value: '1' }] }]",
                "web"
            ),
            grpc_rule(
                "[{ headers: [{ name: x, value: '1' }, { name: y, value: '2' }] }]",
                "grpc"
            ),
        ),
    )]);
    let h = [("x", "1"), ("y", "2")];
    assert_eq!(
        grpc_call(&r, "/grpc.health.v1.Health/Check", &h).as_deref(),
        Ok("v3")
    );
    assert_eq!(
        grpc_call(&r, "/grpc.health.v1.Health/Watch", &h).as_deref(),
        Ok("web")
    );
    assert_eq!(
        grpc_call(&r, "/grpc.health.v1.Health/Watch", &[]).as_deref(),
        Ok("v2")
    );
    assert_eq!(grpc_call(&r, "/other.Svc/Check", &h).as_deref(), Ok("v1"));
    assert_eq!(grpc_call(&r, "/other.Svc/List", &h).as_deref(), Ok("grpc"));
    assert_eq!(grpc_call(&r, "/other.Svc/List", &[]), Err(NoRoute::NoMatch));
}

/// A longer service name wins over a shorter one, whatever the methods.
#[test]
fn grpc_longer_service_wins() {
    let r = router(&[grpc_route(
        "g",
        "",
        &format!(
            "[{}, {}]",
            grpc_rule(
                "[{ method: { type: RegularExpression, service: 'foo\\..*', method: Get } }]",
                "v1"
            ),
            grpc_rule("[{ method: { service: foo.bar.v2 } }]", "v2"),
        ),
    )]);
    assert_eq!(grpc_call(&r, "/foo.bar.v2/Get", &[]).as_deref(), Ok("v2"));
    assert_eq!(grpc_call(&r, "/foo.baz/Get", &[]).as_deref(), Ok("v1"));
}

/// The `GRPCRouteRule.matches` example: service `foo.bar` with header `version: 2`, or
/// service `foo.bar.v2`.
#[test]
fn grpc_matches_example() {
    let r = router(&[grpc_route(
        "g",
        "",
        &format!(
            "[{}]",
            grpc_rule(
                "[{ method: { service: foo.bar }, headers: [{ name: version, value: '2' }] }, \
                 { method: { service: foo.bar.v2 } }]",
                "v2"
            )
        ),
    )]);
    assert_eq!(
        grpc_call(&r, "/foo.bar/Get", &[("version", "2")]).as_deref(),
        Ok("v2")
    );
    assert_eq!(grpc_call(&r, "/foo.bar.v2/Get", &[]).as_deref(), Ok("v2"));
    assert_eq!(grpc_call(&r, "/foo.bar/Get", &[]), Err(NoRoute::NoMatch));
    assert_eq!(
        grpc_call(&r, "/foo.bar.v3/Get", &[("version", "2")]),
        Err(NoRoute::NoMatch)
    );
}

/// gRPC ties: the oldest route, then alphabetical order, then the first rule.
#[test]
fn grpc_ties_go_to_oldest_then_name_then_rule() {
    let same = |backend| format!("[{}]", grpc_rule("[{ method: { service: a.B } }]", backend));
    let r = router(&[
        grpc_route("a", TS_NEW, &same("v1")),
        grpc_route("b", TS_OLD, &same("v2")),
    ]);
    assert_eq!(grpc_call(&r, "/a.B/M", &[]).as_deref(), Ok("v2"));
    let r = router(&[
        grpc_route("b", "", &same("v1")),
        grpc_route("a", "", &same("v2")),
    ]);
    assert_eq!(grpc_call(&r, "/a.B/M", &[]).as_deref(), Ok("v2"));
    let r = router(&[grpc_route(
        "a",
        "",
        &format!(
            "[{}, {}]",
            grpc_rule("[{ method: { service: a.B } }]", "v1"),
            grpc_rule("[{ method: { service: a.B } }]", "v2")
        ),
    )]);
    assert_eq!(grpc_call(&r, "/a.B/M", &[]).as_deref(), Ok("v1"));
}

/// A rule without matches matches every call, including non-gRPC paths.
#[test]
fn grpc_rule_without_matches_matches_everything() {
    let r = router(&[grpc_route("g", "", &format!("[{}]", grpc_rule("[]", "v1")))]);
    assert_eq!(grpc_call(&r, "/any.Svc/Any", &[]).as_deref(), Ok("v1"));
    assert_eq!(grpc_call(&r, "/not-grpc", &[]).as_deref(), Ok("v1"));
}
