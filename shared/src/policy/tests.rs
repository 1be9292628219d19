use std::collections::BTreeMap;

use super::*;
use crate::config::model::Rule;

fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: "api-1".into(),
        namespace: ns.into(),
        service_account: "api".into(),
        ips: vec!["10.0.2.2".parse().expect("ip")],
        node: "b".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn policy(yaml: &str) -> CompiledPolicy {
    let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("policy yaml");
    compile(&p).expect("compiles")
}

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

fn decide(
    policies: &[CompiledPolicy],
    src: Option<&Identity>,
    src_ip: &str,
    port: u16,
) -> Decision {
    let w = workload("shop", &[("app", "api")]);
    let conn = Conn {
        src_identity: src,
        src: src_ip.parse().expect("ip"),
        dst: SocketAddr::new("10.0.2.2".parse().expect("ip"), port),
        dst_workload: &w,
        request: None,
    };
    evaluate(&conn, policies, false).0
}

fn denied_by(d: &Decision) -> Option<&str> {
    match d {
        Decision::Deny { policy, .. } => Some(policy.as_deref().unwrap_or("<no allow matched>")),
        Decision::Allow => None,
    }
}

/// (name, policies, source identity, source IP, port, the policy expected to deny).
type Case<'a> = (
    &'a str,
    Vec<&'a CompiledPolicy>,
    Option<&'a Identity>,
    &'a str,
    u16,
    Option<&'a str>,
);

#[test]
fn table() {
    let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let batch = id("spiffe://cluster.local/ns/jobs/sa/batch");
    let allow_frontend = policy(
        "{name: allow-frontend, namespace: shop, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]}]}",
    );
    let deny_jobs =
        policy("{name: deny-jobs, action: DENY, rules: [{from: [{namespaces: [jobs]}]}]}");
    let deny_port =
        policy("{name: no-admin, namespace: shop, action: DENY, rules: [{to: [{ports: [9090]}]}]}");
    let allow_cidr = policy(
        "{name: office, namespace: shop, action: ALLOW, rules: [{from: [{ipBlocks: ['192.168.0.0/16']}]}]}",
    );
    let deny_not_shop = policy(
        "{name: only-shop, namespace: shop, action: DENY, rules: [{from: [{notNamespaces: [shop]}]}]}",
    );
    let allow_other_app =
        policy("{name: other, namespace: shop, selector: {app: web}, action: ALLOW, rules: [{}]}");
    let allow_prefix = policy(
        "{name: any-shop, namespace: shop, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/*']}], to: [{notPorts: [22]}]}]}",
    );
    let allow_nothing = policy("{name: closed, namespace: shop, action: ALLOW}");
    let deny_dry = policy("{name: dry, namespace: shop, action: DENY, dryRun: true, rules: [{}]}");
    let deny_sa = policy(
        "{name: no-batch, action: DENY, rules: [{from: [{serviceAccounts: ['jobs/batch']}]}]}",
    );
    let deny_plain_except = policy(
        "{name: mtls-only, namespace: shop, action: DENY, rules: [{from: [{notPrincipals: ['*']}]}]}",
    );

    let cases: Vec<Case<'_>> = vec![
        (
            "no policies allow",
            vec![],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "allow matches principal",
            vec![&allow_frontend],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "allow misses other principal",
            vec![&allow_frontend],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "allow misses plaintext",
            vec![&allow_frontend],
            None,
            "10.0.3.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "deny namespace wins over allow",
            vec![&allow_frontend, &deny_jobs],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("deny-jobs"),
        ),
        (
            "deny port",
            vec![&deny_port],
            Some(&frontend),
            "10.0.1.2",
            9090,
            Some("shop/no-admin"),
        ),
        (
            "deny port other port passes",
            vec![&deny_port],
            Some(&frontend),
            "10.0.1.2",
            8080,
            None,
        ),
        (
            "allow cidr matches plaintext",
            vec![&allow_cidr],
            None,
            "192.168.7.7",
            80,
            None,
        ),
        (
            "allow cidr misses",
            vec![&allow_cidr],
            None,
            "10.9.9.9",
            80,
            Some("<no allow matched>"),
        ),
        (
            "notNamespaces denies outsider",
            vec![&deny_not_shop],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("shop/only-shop"),
        ),
        (
            "notNamespaces spares insider",
            vec![&deny_not_shop],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "notNamespaces denies plaintext",
            vec![&deny_not_shop],
            None,
            "10.0.1.9",
            80,
            Some("shop/only-shop"),
        ),
        (
            "selector for other app does not apply",
            vec![&allow_other_app],
            Some(&batch),
            "10.0.3.2",
            80,
            None,
        ),
        (
            "prefix principal with notPorts",
            vec![&allow_prefix],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "prefix principal notPorts excludes 22",
            vec![&allow_prefix],
            Some(&frontend),
            "10.0.1.2",
            22,
            Some("<no allow matched>"),
        ),
        (
            "allow without rules matches nothing",
            vec![&allow_nothing],
            Some(&frontend),
            "10.0.1.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "dry-run deny never enforces",
            vec![&deny_dry],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "service account deny",
            vec![&deny_sa],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("no-batch"),
        ),
        (
            "notPrincipals * denies plaintext",
            vec![&deny_plain_except],
            None,
            "10.0.1.9",
            80,
            Some("shop/mtls-only"),
        ),
        (
            "notPrincipals * spares mTLS",
            vec![&deny_plain_except],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
    ];
    for (name, ps, src, ip, port, want) in cases {
        let ps: Vec<CompiledPolicy> = ps.into_iter().cloned().collect();
        let got = decide(&ps, src, ip, port);
        assert_eq!(denied_by(&got), want, "case `{name}`: {got:?}");
    }
}

#[test]
fn l7_policy_fails_closed_without_waypoint_and_reports_dry_run_and_audit() {
    let w = workload("shop", &[]);
    let conn = Conn {
        src_identity: None,
        src: "10.0.1.2".parse().expect("ip"),
        dst: "10.0.2.2:80".parse().expect("addr"),
        dst_workload: &w,
        request: None,
    };
    let l7 = policy(
        "{name: paths, namespace: shop, action: ALLOW, rules: [{to: [{paths: ['/v1/*'], methods: [GET]}]}]}",
    );
    let (d, _) = evaluate(&conn, std::slice::from_ref(&l7), false);
    match d {
        Decision::Deny { policy, reason } => {
            assert_eq!(policy.as_deref(), Some("shop/paths"));
            assert!(
                reason.contains("L7 attributes (methods, paths)") && reason.contains("no waypoint"),
                "{reason}"
            );
        }
        Decision::Allow => panic!("L7 policy must fail closed"),
    }
    let audit = policy("{name: watch, action: AUDIT, rules: [{}]}");
    let dry = policy("{name: dry, action: DENY, dryRun: true, rules: [{}]}");
    let (d, notes) = evaluate(&conn, &[audit, dry], false);
    assert_eq!(d, Decision::Allow);
    assert_eq!(notes.audited, ["watch"]);
    assert_eq!(notes.dry_run, [("dry".to_string(), Action::Deny)]);
}

#[test]
fn compile_errors_name_the_field() {
    let bad = |yaml: &str| {
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("yaml");
        compile(&p).expect_err("must not compile")
    };
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{from: [{ipBlocks: ['10.0.0.0/33']}]}]}").0,
        "rules[0].from[0].ipBlocks[0]"
    );
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{}, {from: [{principals: ['a*b*']}]}]}").0,
        "rules[1].from[0].principals[0]"
    );
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{from: [{serviceAccounts: ['batch']}]}]}").0,
        "rules[0].from[0].serviceAccounts[0]"
    );
    let _ = (BTreeMap::<String, String>::new(), Rule::default());
}

#[test]
fn principals_must_be_spiffe_ids_or_patterns_one_could_match() {
    let compile_principal = |p: &str| {
        let yaml =
            format!("{{name: x, action: DENY, rules: [{{from: [{{notPrincipals: ['{p}']}}]}}]}}");
        let policy: AuthorizationPolicy = serde_yaml_ng::from_str(&yaml).expect("yaml");
        compile(&policy).map(|_| ())
    };
    for good in [
        "*",
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/*",
        "spiffe://cluster.local/ns/shop/sa/*",
        "spiffe://cluster.local/*",
        "spiffe://*",
        "*/sa/batch",
        "*/ns/shop/sa/web",
        "*.local/ns/shop/sa/web",
        "*-api",
    ] {
        compile_principal(good).unwrap_or_else(|e| panic!("{good}: {e:?}"));
    }
    for bad in [
        // Istio's form, without the scheme: it would never match.
        "cluster.local/ns/shop/sa/web",
        "cluster.local/ns/shop/*",
        "spiffe://cluster.local/ns/shop",
        "spiffe://cluster.local/ns/Shop/sa/web",
        "spiffe://cluster.local/namespace/shop/*",
        "spiffe://cluster.local/ns/shop/sa/web/extra",
        "*/sa/Batch",
        "*/x/y/z/a/b/c/d",
        "*/sa/web-",
        "web",
    ] {
        let (field, reason) = compile_principal(bad).expect_err(bad);
        assert_eq!(field, "rules[0].from[0].notPrincipals[0]", "{bad}");
        assert!(reason.contains("SPIFFE"), "{bad}: {reason}");
    }
    let (_, reason) = compile_principal("cluster.local/ns/shop/sa/web").expect_err("istio form");
    assert!(
        reason.contains("did you mean `spiffe://cluster.local/ns/shop/sa/web`"),
        "{reason}"
    );
}

// === L7 ===

#[test]
fn path_normalization() {
    use super::path::{Form, normalize};
    let cases: &[(&str, &str, &str)] = &[
        // (raw, for matching, for forwarding)
        ("/v1/items", "/v1/items", "/v1/items"),
        ("/v1/items?x=1&y=/..", "/v1/items", "/v1/items"),
        ("/", "/", "/"),
        ("/v1/", "/v1/", "/v1/"),
        ("/v1/../admin", "/admin", "/admin"),
        ("/v1/./items", "/v1/items", "/v1/items"),
        ("/v1/items/..", "/v1/", "/v1/"),
        ("/../../etc", "/etc", "/etc"),
        ("/..", "/", "/"),
        ("//admin", "/admin", "/admin"),
        ("/v1//items///x", "/v1/items/x", "/v1/items/x"),
        ("/v1/%2e%2e/admin", "/admin", "/admin"),
        ("/v1/%2E./admin", "/admin", "/admin"),
        ("/%61dmin", "/admin", "/admin"),
        ("/a%2fb", "/a/b", "/a%2Fb"),
        ("/v1%2F..%2Fadmin", "/admin", "/v1%2F..%2Fadmin"),
        ("/v1\\..\\admin", "/admin", "/v1\\..\\admin"),
        ("/v1/%5c../admin", "/admin", "/v1/%5C../admin"),
        ("/a%20b", "/a%20b", "/a%20b"),
        // A stray `%` is encoded, so it can't form an escape with what follows.
        ("/a%zzb", "/a%25zzb", "/a%25zzb"),
        ("/a%", "/a%25", "/a%25"),
        ("/é/../x", "/x", "/x"),
        ("*", "*", "*"),
        // Case is kept: rules are case-sensitive, as Istio's are.
        ("/ADMIN", "/ADMIN", "/ADMIN"),
        // One decoding pass: `%2561` is `%61`, never `a`.
        ("/%2561dmin", "/%2561dmin", "/%2561dmin"),
        // Path parameters: removed per segment for matching (as Tomcat and Spring map
        // them), forwarded as sent. The waypoint refuses them unless a policy allows them.
        ("/admin;x", "/admin", "/admin;x"),
        ("/admin;/x", "/admin/x", "/admin;/x"),
        ("/x/..;/admin", "/admin", "/x/..;/admin"),
        ("/x/.;y/admin", "/x/admin", "/x/.;y/admin"),
        ("/admin%3bx", "/admin", "/admin%3Bx"),
        (
            "/v1;jsessionid=1/items",
            "/v1/items",
            "/v1;jsessionid=1/items",
        ),
        ("/;x/admin", "/admin", "/;x/admin"),
    ];
    for (raw, matching, forward) in cases {
        assert_eq!(
            normalize(raw, Form::Match),
            *matching,
            "match form of {raw}"
        );
        assert_eq!(
            normalize(raw, Form::Forward),
            *forward,
            "forward form of {raw}"
        );
    }
    // Already-normal paths are borrowed, not copied.
    assert!(matches!(
        normalize("/v1/items/", Form::Match),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn path_parameters_are_found_in_any_spelling() {
    use super::path::has_parameters;
    for p in ["/admin;x", "/x/..;/admin", "/a%3Bb", "/a%3bb", ";"] {
        assert!(has_parameters(p), "{p}");
    }
    for p in ["/admin", "/a?x=1;y=2", "/a%3", "/a%33b", "/a#;"] {
        assert!(!has_parameters(p), "{p}");
    }
}

#[test]
fn host_drops_the_port() {
    use super::path::host_of;
    assert_eq!(host_of("api.shop:8080"), "api.shop");
    assert_eq!(host_of("api.shop"), "api.shop");
    assert_eq!(host_of("[::1]:80"), "[::1]");
    assert_eq!(host_of("[::1]"), "[::1]");
    assert_eq!(host_of("10.0.0.1:80"), "10.0.0.1");
    assert_eq!(host_of(""), "");
}

/// One request, decided at a waypoint against `policies`.
fn decide_request(
    policies: &[&CompiledPolicy],
    method: &str,
    raw_path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Decision {
    let w = workload("shop", &[("app", "api")]);
    let src = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    let path = super::path::normalize(raw_path, super::path::Form::Match);
    let req = Request {
        method,
        path: &path,
        host: super::path::host_of(host),
        headers: &map,
    };
    let conn = Conn {
        src_identity: Some(&src),
        src: "10.0.1.2".parse().expect("ip"),
        dst: "10.0.2.2:8080".parse().expect("addr"),
        dst_workload: &w,
        request: Some(&req),
    };
    let ps: Vec<CompiledPolicy> = policies.iter().map(|p| (*p).clone()).collect();
    evaluate(&conn, &ps, true).0
}

#[test]
fn l7_matchers_and_their_negations() {
    let get_v1 = policy(
        "{name: get-v1, namespace: shop, action: ALLOW, rules: [{to: [{methods: [GET], paths: ['/v1/*']}]}]}",
    );
    let not_post = policy(
        "{name: no-post, namespace: shop, action: DENY, rules: [{to: [{notMethods: [GET, HEAD]}]}]}",
    );
    let json_only = policy(
        "{name: json, namespace: shop, action: ALLOW, rules: [{to: [{paths: ['*.json']}]}]}",
    );
    let exact = policy(
        "{name: exact, namespace: shop, action: ALLOW, rules: [{to: [{paths: ['/healthz']}]}]}",
    );
    let any_path =
        policy("{name: any, namespace: shop, action: ALLOW, rules: [{to: [{paths: ['*']}]}]}");
    let not_admin = policy(
        "{name: not-admin, namespace: shop, action: ALLOW, rules: [{to: [{notPaths: ['/admin/*', '/admin']}]}]}",
    );
    let deny_admin = policy(
        "{name: deny-admin, namespace: shop, action: DENY, rules: [{to: [{paths: ['/admin', '/admin/*']}]}]}",
    );
    let hosts = policy(
        "{name: hosts, namespace: shop, action: ALLOW, rules: [{to: [{hosts: ['api.shop', '*.example.com']}]}]}",
    );
    let not_hosts = policy(
        "{name: not-hosts, namespace: shop, action: DENY, rules: [{to: [{notHosts: ['api.shop']}]}]}",
    );
    let tenant = policy(
        "{name: tenant, namespace: shop, action: ALLOW, rules: [{when: [{key: 'request.headers[X-Tenant]', values: [acme, 'beta-*']}]}]}",
    );
    let not_tenant = policy(
        "{name: not-evil, namespace: shop, action: DENY, rules: [{when: [{key: 'request.headers[x-tenant]', notValues: [acme]}]}]}",
    );
    let present = policy(
        "{name: present, namespace: shop, action: ALLOW, rules: [{when: [{key: 'request.headers[x-token]'}]}]}",
    );

    type L7Case<'a> = (
        &'a str,
        Vec<&'a CompiledPolicy>,
        &'a str,
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<&'a str>,
    );
    let no = "<no allow matched>";
    let cases: Vec<L7Case<'_>> = vec![
        (
            "GET /v1/items allowed",
            vec![&get_v1],
            "GET",
            "/v1/items",
            "api",
            vec![],
            None,
        ),
        (
            "GET /admin not allowed",
            vec![&get_v1],
            "GET",
            "/admin",
            "api",
            vec![],
            Some(no),
        ),
        (
            "POST /v1 not allowed",
            vec![&get_v1],
            "POST",
            "/v1/items",
            "api",
            vec![],
            Some(no),
        ),
        (
            "methods are case-sensitive",
            vec![&get_v1],
            "get",
            "/v1/items",
            "api",
            vec![],
            Some(no),
        ),
        (
            "prefix needs the slash",
            vec![&get_v1],
            "GET",
            "/v1",
            "api",
            vec![],
            Some(no),
        ),
        (
            "dot segments cannot escape /v1",
            vec![&get_v1],
            "GET",
            "/v1/../admin",
            "api",
            vec![],
            Some(no),
        ),
        (
            "encoded dots cannot escape /v1",
            vec![&get_v1],
            "GET",
            "/v1/%2e%2e/admin",
            "api",
            vec![],
            Some(no),
        ),
        (
            "query is ignored",
            vec![&get_v1],
            "GET",
            "/v1/a?b=/admin",
            "api",
            vec![],
            None,
        ),
        (
            "notMethods denies POST",
            vec![&not_post],
            "POST",
            "/",
            "api",
            vec![],
            Some("shop/no-post"),
        ),
        (
            "notMethods spares HEAD",
            vec![&not_post],
            "HEAD",
            "/",
            "api",
            vec![],
            None,
        ),
        (
            "suffix matches",
            vec![&json_only],
            "GET",
            "/a/b.json",
            "api",
            vec![],
            None,
        ),
        (
            "suffix misses",
            vec![&json_only],
            "GET",
            "/a/b.jsonp",
            "api",
            vec![],
            Some(no),
        ),
        (
            "exact matches",
            vec![&exact],
            "GET",
            "/healthz",
            "api",
            vec![],
            None,
        ),
        (
            "exact misses a longer path",
            vec![&exact],
            "GET",
            "/healthz/x",
            "api",
            vec![],
            Some(no),
        ),
        (
            "* matches any path",
            vec![&any_path],
            "DELETE",
            "/x/y",
            "api",
            vec![],
            None,
        ),
        (
            "notPaths excludes /admin/x",
            vec![&not_admin],
            "GET",
            "/admin/x",
            "api",
            vec![],
            Some(no),
        ),
        (
            "notPaths excludes //admin",
            vec![&not_admin],
            "GET",
            "//admin",
            "api",
            vec![],
            Some(no),
        ),
        (
            "notPaths lets /v1 in",
            vec![&not_admin],
            "GET",
            "/v1",
            "api",
            vec![],
            None,
        ),
        (
            "deny wins over allow",
            vec![&any_path, &deny_admin],
            "GET",
            "/admin/users",
            "api",
            vec![],
            Some("shop/deny-admin"),
        ),
        (
            "deny sees through dot segments",
            vec![&any_path, &deny_admin],
            "GET",
            "/v1/../admin",
            "api",
            vec![],
            Some("shop/deny-admin"),
        ),
        (
            "deny sees through encoded slashes",
            vec![&any_path, &deny_admin],
            "GET",
            "/admin%2Fusers",
            "api",
            vec![],
            Some("shop/deny-admin"),
        ),
        (
            "host without port, any case",
            vec![&hosts],
            "GET",
            "/",
            "API.Shop:8080",
            vec![],
            None,
        ),
        (
            "host suffix",
            vec![&hosts],
            "GET",
            "/",
            "www.Example.com",
            vec![],
            None,
        ),
        (
            "other host",
            vec![&hosts],
            "GET",
            "/",
            "evil.shop",
            vec![],
            Some(no),
        ),
        (
            "notHosts denies other hosts",
            vec![&not_hosts],
            "GET",
            "/",
            "evil.shop",
            vec![],
            Some("shop/not-hosts"),
        ),
        (
            "notHosts spares api.shop",
            vec![&not_hosts],
            "GET",
            "/",
            "api.shop:80",
            vec![],
            None,
        ),
        (
            "header value matches",
            vec![&tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "acme")],
            None,
        ),
        (
            "header prefix matches",
            vec![&tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "beta-1")],
            None,
        ),
        (
            "header value misses",
            vec![&tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "evil")],
            Some(no),
        ),
        (
            "absent header misses",
            vec![&tenant],
            "GET",
            "/",
            "api",
            vec![],
            Some(no),
        ),
        (
            "repeated header values are joined",
            vec![&tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "acme"), ("x-tenant", "evil")],
            Some(no),
        ),
        (
            "notValues denies others",
            vec![&not_tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "evil")],
            Some("shop/not-evil"),
        ),
        (
            "notValues spares acme",
            vec![&not_tenant],
            "GET",
            "/",
            "api",
            vec![("x-tenant", "acme")],
            None,
        ),
        (
            "notValues needs the header",
            vec![&not_tenant],
            "GET",
            "/",
            "api",
            vec![],
            None,
        ),
        (
            "presence condition holds",
            vec![&present],
            "GET",
            "/",
            "api",
            vec![("x-token", "")],
            None,
        ),
        (
            "presence condition misses",
            vec![&present],
            "GET",
            "/",
            "api",
            vec![],
            Some(no),
        ),
    ];
    for (name, ps, method, path, host, headers, want) in cases {
        let got = decide_request(&ps, method, path, host, &headers);
        assert_eq!(denied_by(&got), want, "case `{name}`: {got:?}");
    }
}

#[test]
fn tcp_through_a_waypoint_follows_istio_for_http_only_fields() {
    let w = workload("shop", &[]);
    let src = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let conn = Conn {
        src_identity: Some(&src),
        src: "10.0.1.2".parse().expect("ip"),
        dst: "10.0.2.2:9090".parse().expect("addr"),
        dst_workload: &w,
        request: None,
    };
    // An ALLOW rule with HTTP fields never matches TCP...
    let allow_get =
        policy("{name: get, namespace: shop, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}");
    let (d, _) = evaluate(&conn, std::slice::from_ref(&allow_get), true);
    assert_eq!(denied_by(&d), Some("<no allow matched>"));
    // ...a DENY rule with HTTP fields matches on its L4 fields...
    let deny_9090_post = policy(
        "{name: no-post, namespace: shop, action: DENY, rules: [{to: [{ports: [9090], methods: [POST]}]}]}",
    );
    let (d, _) = evaluate(&conn, std::slice::from_ref(&deny_9090_post), true);
    assert_eq!(denied_by(&d), Some("shop/no-post"));
    // ...and only on them.
    let deny_8080_post = policy(
        "{name: no-post-8080, namespace: shop, action: DENY, rules: [{to: [{ports: [8080], methods: [POST]}]}]}",
    );
    let (d, _) = evaluate(&conn, std::slice::from_ref(&deny_8080_post), true);
    assert_eq!(d, Decision::Allow);
    let deny_when = policy(
        "{name: hdr, namespace: shop, action: DENY, rules: [{when: [{key: 'request.headers[x-a]', values: [b]}]}]}",
    );
    let (d, _) = evaluate(&conn, std::slice::from_ref(&deny_when), true);
    assert_eq!(denied_by(&d), Some("shop/hdr"));
    // At a node tunnel without a waypoint, an L7 AUDIT is skipped, never a denial.
    let audit_l7 = policy(
        "{name: watch-get, namespace: shop, action: AUDIT, rules: [{to: [{methods: [GET]}]}]}",
    );
    let (d, notes) = evaluate(&conn, std::slice::from_ref(&audit_l7), false);
    assert_eq!(d, Decision::Allow);
    assert!(notes.audited.is_empty());
}

#[test]
fn every_endpoint_must_allow() {
    let v1 = workload("shop", &[("app", "api"), ("version", "v1")]);
    let v2 = workload("shop", &[("app", "api"), ("version", "v2")]);
    let src = id("spiffe://cluster.local/ns/jobs/sa/batch");
    let conn = Conn {
        src_identity: Some(&src),
        src: "10.0.3.2".parse().expect("ip"),
        dst: "10.0.2.2:8080".parse().expect("addr"),
        dst_workload: &v1,
        request: None,
    };
    let deny_v2 = policy(
        "{name: no-batch-v2, namespace: shop, selector: {version: v2}, action: DENY, rules: [{from: [{namespaces: [jobs]}]}]}",
    );
    let audit = policy("{name: watch, namespace: shop, action: AUDIT, rules: [{}]}");
    let ps = [audit, deny_v2];
    let a: SocketAddr = "10.0.2.2:8080".parse().expect("addr");
    let b: SocketAddr = "10.0.2.3:8080".parse().expect("addr");
    let (d, notes) = evaluate_endpoints(&conn, &[(a, &v1)], &ps, true);
    assert_eq!(d, Decision::Allow);
    assert_eq!(notes.audited, ["shop/watch"]);
    let (d, notes) = evaluate_endpoints(&conn, &[(a, &v1), (b, &v2), (a, &v1)], &ps, true);
    assert_eq!(denied_by(&d), Some("shop/no-batch-v2"));
    assert_eq!(notes.audited, ["shop/watch"], "audits are not repeated");
    assert_eq!(evaluate_endpoints(&conn, &[], &ps, true).0, Decision::Allow);
}

#[test]
fn dry_run_allow_that_misses_reports_a_would_be_denial() {
    let w = workload("shop", &[]);
    let src = id("spiffe://cluster.local/ns/jobs/sa/batch");
    let conn = Conn {
        src_identity: Some(&src),
        src: "10.0.3.2".parse().expect("ip"),
        dst: "10.0.2.2:8080".parse().expect("addr"),
        dst_workload: &w,
        request: None,
    };
    let dry_allow = policy(
        "{name: only-shop, namespace: shop, action: ALLOW, dryRun: true, rules: [{from: [{namespaces: [shop]}]}]}",
    );
    let (d, notes) = evaluate(&conn, &[dry_allow], true);
    assert_eq!(d, Decision::Allow);
    assert_eq!(
        notes.dry_run,
        [("shop/only-shop".to_string(), Action::Deny)]
    );
}

#[test]
fn l7_compile_errors_name_the_field() {
    let bad = |yaml: &str| {
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("yaml");
        compile(&p).expect_err("must not compile")
    };
    let (field, reason) =
        bad("{name: x, action: DENY, rules: [{when: [{key: 'source.ip', values: [a]}]}]}");
    assert_eq!(field, "rules[0].when[0].key");
    assert!(reason.contains("request.headers[<name>]"), "{reason}");
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{}, {when: [{key: 'request.headers[a b]'}]}]}").0,
        "rules[1].when[0].key"
    );
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{when: [{key: 'request.headers[x]', notValues: ['a*b*']}]}]}").0,
        "rules[0].when[0].notValues[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{methods: [get]}]}]}").0,
        "rules[0].to[0].methods[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{notMethods: ['G*']}]}]}").0,
        "rules[0].to[0].notMethods[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{paths: [v1/items]}]}]}").0,
        "rules[0].to[0].paths[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{notPaths: ['/a?b=c']}]}]}").0,
        "rules[0].to[0].notPaths[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{notHosts: ['*a*']}]}]}").0,
        "rules[0].to[0].notHosts[0]"
    );
    assert_eq!(
        bad("{name: x, action: ALLOW, rules: [{to: [{notPorts: [0]}]}]}").0,
        "rules[0].to[0].notPorts[0]"
    );
}

#[test]
fn config_validation_refuses_unknown_when_keys_with_the_field_path() {
    let yaml = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }]
authorizationPolicies:
  - { name: ok, namespace: shop, action: ALLOW, rules: [{}] }
  - name: typo
    namespace: shop
    action: DENY
    rules:
      - when: [{ key: 'request.headers[x-a]', values: [b] }]
      - when: [{ key: 'request.header[x-a]', values: [b] }]
"#;
    let err = crate::config::parse_str(std::path::Path::new("mesh.yaml"), yaml)
        .expect_err("unknown key refused");
    assert_eq!(err.field, "authorizationPolicies[1].rules[1].when[0].key");
    assert!(err.reason.contains("request.header[x-a]"), "{err}");
    assert!(err.to_string().contains("mesh.yaml"), "{err}");
}

/// Found by the `path` fuzz target: a `..` after an encoded slash or a backslash removed
/// a different segment in the forwarded form than in the matched one, so `/x%2Fy/../admin`
/// was authorised as `/x/admin` and forwarded as `/admin`, past a DENY on `/admin`.
#[test]
fn forwarded_paths_are_the_authorised_ones_after_dot_segments() {
    use path::{Form, normalize};
    for raw in [
        "/x%2Fy/../admin",
        "/x%2fy/../admin",
        "/x\\y/../admin",
        "/x%5Cy/../admin",
    ] {
        assert_eq!(normalize(raw, Form::Match), "/x/admin", "{raw}");
        assert_eq!(normalize(raw, Form::Forward), "/x/admin", "{raw}");
    }
    // Without dot segments, encoded slashes are still forwarded as sent.
    assert_eq!(normalize("/files/a%2Fb", Form::Forward), "/files/a%2Fb");
    assert_eq!(
        normalize("/files/a%2Fb/./c", Form::Forward),
        "/files/a%2Fb/c"
    );
}

/// Found by the `path` fuzz target: a stray `%` joined the next characters into a new
/// escape, so normalizing twice differed from once, and a backend decoding the forwarded
/// `/%61dmin` saw `/admin`, which was matched as `/%61dmin`.
#[test]
fn a_stray_percent_is_encoded_so_no_escape_appears_from_pieces() {
    use path::{Form, normalize};
    for form in [Form::Match, Form::Forward] {
        assert_eq!(normalize("/%%361dmin", form), "/%2561dmin");
        assert_eq!(normalize("/%3%30", form), "/%2530");
        assert_eq!(normalize("/100%", form), "/100%25");
        assert_eq!(normalize("/a%+1", form), "/a%25+1");
        let once = normalize("/%%361dmin", form).into_owned();
        assert_eq!(normalize(&once, form), once);
    }
}
