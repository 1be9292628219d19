use std::path::Path;
use std::sync::Arc;

use super::*;

fn head(version: Version, target: &str, hosts: &[&str]) -> Parts {
    let mut b = http::Request::builder().version(version).uri(target);
    for h in hosts {
        b = b.header(HOST, *h);
    }
    b.body(()).expect("request").into_parts().0
}

fn canonical(version: Version, target: &str, hosts: &[&str]) -> Result<String, HeadError> {
    canonicalize(&mut head(version, target, hosts), PathParameters::Refuse)
}

#[test]
fn one_valid_host_is_required() {
    use Version as V;
    let ok = |v, t, h: &[&str], want: &str| {
        assert_eq!(canonical(v, t, h).as_deref(), Ok(want), "{t} {h:?}");
    };
    ok(V::HTTP_11, "/", &["web"], "web");
    ok(V::HTTP_11, "/", &["Web.Shop:8080"], "Web.Shop:8080");
    ok(V::HTTP_11, "/", &["evil.example."], "evil.example");
    ok(V::HTTP_11, "/", &["evil.example.:80"], "evil.example:80");
    ok(V::HTTP_11, "/", &["10.0.0.1:080"], "10.0.0.1:80");
    ok(V::HTTP_11, "/", &["[::1]:80"], "[::1]:80");
    ok(V::HTTP_11, "/", &["my_svc.ns"], "my_svc.ns");
    // Absolute form: the target's authority wins over `Host`.
    ok(V::HTTP_11, "http://api.shop/v1", &["web"], "api.shop");
    ok(V::HTTP_10, "http://api.shop/v1", &[], "api.shop");
    // HTTP/2: `:authority`, or `host` alone, or both when they agree.
    ok(V::HTTP_2, "http://api.shop/v1", &[], "api.shop");
    ok(V::HTTP_2, "/v1", &["api.shop"], "api.shop");
    ok(V::HTTP_2, "http://api.shop./v1", &["API.shop"], "api.shop");

    let err = |v, t, h: &[&str], want: HeadError| {
        assert_eq!(canonical(v, t, h), Err(want), "{t} {h:?}");
    };
    err(V::HTTP_11, "/", &[], HeadError::MissingHost);
    err(V::HTTP_11, "http://api.shop/", &[], HeadError::MissingHost);
    err(V::HTTP_10, "/", &[], HeadError::MissingHost);
    err(V::HTTP_2, "/", &[], HeadError::MissingHost);
    err(
        V::HTTP_11,
        "/",
        &["web", "evil.example"],
        HeadError::RepeatedHost { count: 2 },
    );
    err(
        V::HTTP_11,
        "/",
        &["web", "web"],
        HeadError::RepeatedHost { count: 2 },
    );
    err(
        V::HTTP_2,
        "http://web/",
        &["evil.example"],
        HeadError::ConflictingHost {
            authority: "web".into(),
            host: "evil.example".into(),
        },
    );
    for bad in [
        "web, evil.example",
        "web,evil.example",
        "evil.example..",
        ".evil.example",
        "user@web",
        "web:",
        "web:0",
        "web:65536",
        "web:80:80",
        "we%62",
        "web evil",
        "",
        "1.2.3",
        "01.2.3.4",
        "[::1",
        "[zz]:80",
        "[::1]80",
    ] {
        let got = canonical(V::HTTP_11, "/", &[bad]);
        assert!(
            matches!(got, Err(HeadError::InvalidHost { .. })),
            "{bad:?}: {got:?}"
        );
    }
    // An invalid `Host` is refused even when an absolute target overrides it.
    assert!(matches!(
        canonical(V::HTTP_11, "http://web/", &["a b"]),
        Err(HeadError::InvalidHost { .. })
    ));
}

#[test]
fn the_head_is_rewritten_to_the_one_host() {
    let mut h = head(
        Version::HTTP_11,
        "http://api.shop./v1?q=1",
        &["evil.example"],
    );
    let host = canonicalize(&mut h, PathParameters::Refuse).expect("valid");
    assert_eq!(host, "api.shop");
    let hosts: Vec<_> = h.headers.get_all(HOST).iter().collect();
    assert_eq!(hosts, vec!["api.shop"]);
    assert_eq!(h.uri.to_string(), "http://api.shop/v1?q=1");

    let mut h = head(Version::HTTP_11, "/v1", &["evil.example."]);
    canonicalize(&mut h, PathParameters::Refuse).expect("valid");
    assert_eq!(
        h.headers.get(HOST).map(|v| v.as_bytes()),
        Some(&b"evil.example"[..])
    );
    assert_eq!(h.uri.to_string(), "/v1");
}

#[test]
fn path_parameters_are_refused_unless_allowed() {
    for p in ["/admin;x", "/admin;/x", "/x/..;/admin", "/a%3Bb"] {
        let got = canonicalize(
            &mut head(Version::HTTP_11, p, &["web"]),
            PathParameters::Refuse,
        );
        assert!(
            matches!(got, Err(HeadError::PathParameters { .. })),
            "{p}: {got:?}"
        );
        assert!(
            canonicalize(
                &mut head(Version::HTTP_11, p, &["web"]),
                PathParameters::Allow
            )
            .is_ok()
        );
    }
    // A `;` in the query is not a path parameter.
    assert!(
        canonicalize(
            &mut head(Version::HTTP_11, "/a?x=1;y=2", &["web"]),
            PathParameters::Refuse
        )
        .is_ok()
    );
}

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }]
workloads:
  - { name: web-1, namespace: shop, ips: [10.1.1.2], node: a, labels: { app: web } }
  - { name: api-1, namespace: shop, ips: [10.1.1.3], node: a, labels: { app: api } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80 }], selector: { app: web } }
  - { name: api, namespace: shop, vips: [10.96.0.11], ports: [{ port: 80 }], selector: { app: api } }
trafficPolicies:
  - { name: legacy-sessions, namespace: shop, targetRefs: [{ kind: Service, name: web }], allowPathParameters: true }
"#;

#[test]
fn a_traffic_policy_on_the_service_allows_path_parameters() {
    let config = ambit_shared::config::parse_str(Path::new("t.yaml"), CONFIG).expect("config");
    let snap = Snapshot::new(Arc::new(config));
    let service = |name: &str| Target::Service {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        target_port: 80,
        port_name: None,
    };
    let workload = |name: &str, ip: &str| Target::Workload {
        namespace: "shop".into(),
        name: name.into(),
        addr: format!("{ip}:80").parse().expect("addr"),
    };
    assert_eq!(
        path_parameters(&snap, &service("web")),
        PathParameters::Allow
    );
    assert_eq!(
        path_parameters(&snap, &service("api")),
        PathParameters::Refuse
    );
    assert_eq!(
        path_parameters(&snap, &workload("web-1", "10.1.1.2")),
        PathParameters::Allow
    );
    assert_eq!(
        path_parameters(&snap, &workload("api-1", "10.1.1.3")),
        PathParameters::Refuse
    );
}
