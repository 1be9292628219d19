//! Filters: header modifiers, redirects and rewrites, alone and through routing.

use http::header::{HOST, HeaderName, HeaderValue};

use super::*;
use crate::config::model::RedirectScheme;

/// The `ReplacePrefixMatch` table from the Gateway API's `HTTPPathModifier`, row by row.
#[test]
fn replace_prefix_match_table() {
    for (path, prefix, replacement, want) in [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ] {
        assert_eq!(
            replace_prefix(path, prefix, replacement).as_deref(),
            Some(want),
            "{path} with {prefix} -> {replacement:?}"
        );
    }
}

#[test]
fn replace_prefix_respects_segment_boundaries() {
    assert_eq!(replace_prefix("/foobar", "/foo", "/xyz"), None);
    assert_eq!(replace_prefix("/other", "/foo", "/xyz"), None);
    assert_eq!(
        replace_prefix("/a/b", "/", "/root").as_deref(),
        Some("/root/a/b")
    );
    // A path the prefix does not match is left alone rather than mangled.
    let m = PathModifier::ReplacePrefixMatch {
        prefix: "/foo".into(),
        replacement: "/xyz".into(),
    };
    assert_eq!(m.apply("/elsewhere"), "/elsewhere");
}

fn header_modifier(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderModifier {
    let pair = |(n, v): &(&str, &str)| {
        (
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        )
    };
    HeaderModifier {
        set: set.iter().map(pair).collect(),
        add: add.iter().map(pair).collect(),
        remove: remove
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).expect("name"))
            .collect(),
    }
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect()
}

/// The `HTTPHeaderFilter` examples: set overwrites, add appends, remove removes.
#[test]
fn header_modifier_set_add_remove() {
    let mut p = parts(
        "GET",
        "/",
        &[
            ("my-header", "foo"),
            ("my-header", "again"),
            ("appended", "foo"),
            ("my-header1", "foo"),
            ("my-header2", "bar"),
            ("my-header3", "baz"),
        ],
    );
    header_modifier(
        &[("My-Header", "bar")],
        &[("appended", "bar,baz"), ("fresh", "1")],
        &["my-header1", "MY-HEADER3"],
    )
    .apply(&mut p.headers);
    assert_eq!(values(&p.headers, "my-header"), ["bar"]);
    assert_eq!(values(&p.headers, "appended"), ["foo", "bar,baz"]);
    assert_eq!(values(&p.headers, "fresh"), ["1"]);
    assert_eq!(values(&p.headers, "my-header1"), Vec::<String>::new());
    assert_eq!(values(&p.headers, "my-header2"), ["bar"]);
    assert_eq!(values(&p.headers, "my-header3"), Vec::<String>::new());
}

fn redirect(
    scheme: Option<RedirectScheme>,
    hostname: Option<&str>,
    path: Option<PathModifier>,
    port: Option<u16>,
) -> Redirect {
    Redirect {
        scheme,
        hostname: hostname.map(str::to_string),
        path,
        port,
        status: StatusCode::FOUND,
    }
}

fn location(r: &Redirect, uri: &str, host: Option<&str>, listener_port: u16) -> String {
    let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
    let p = parts("GET", uri, &headers);
    let got = r.location(&p, listener_port).expect("redirect");
    got.location.to_str().expect("ascii").to_string()
}

/// The port rules of `HTTPRequestRedirectFilter.port`, and the conformance cases of
/// `MeshHTTPRouteRedirectPort` and friends.
#[test]
fn redirect_location_ports_and_schemes() {
    let plain = redirect(None, None, None, None);
    assert_eq!(
        location(&plain, "/a?b=c", Some("echo"), 80),
        "http://echo/a?b=c"
    );
    assert_eq!(
        location(&plain, "/a", Some("echo:8080"), 8080),
        "http://echo:8080/a"
    );
    let port = redirect(None, None, None, Some(8083));
    assert_eq!(
        location(&port, "/port", Some("echo"), 80),
        "http://echo:8083/port"
    );
    let host_port = redirect(None, Some("example.org"), None, Some(8083));
    assert_eq!(
        location(&host_port, "/port-and-host", Some("echo"), 80),
        "http://example.org:8083/port-and-host"
    );
    // A scheme without a port uses the scheme's well-known port, which is then left out.
    let https = redirect(Some(RedirectScheme::Https), None, None, None);
    assert_eq!(
        location(&https, "/s", Some("echo:8080"), 8080),
        "https://echo/s"
    );
    let http = redirect(Some(RedirectScheme::Http), None, None, None);
    assert_eq!(location(&http, "/s", Some("echo"), 8080), "http://echo/s");
    let https_port = redirect(Some(RedirectScheme::Https), None, None, Some(8443));
    assert_eq!(
        location(&https_port, "/s", Some("echo"), 80),
        "https://echo:8443/s"
    );
    let https_443 = redirect(Some(RedirectScheme::Https), None, None, Some(443));
    assert_eq!(
        location(&https_443, "/s", Some("echo"), 80),
        "https://echo/s"
    );
    // HTTP/2 requests carry the host in the URI authority; IPv6 keeps its brackets.
    assert_eq!(
        location(&plain, "http://[fd00::1]:9000/x", None, 9000),
        "http://[fd00::1]:9000/x"
    );
    assert_eq!(
        location(&plain, "https://web.shop:443/x", None, 443),
        "https://web.shop/x"
    );
}

#[test]
fn redirect_paths() {
    let full = redirect(
        None,
        None,
        Some(PathModifier::ReplaceFullPath("/new".into())),
        None,
    );
    assert_eq!(
        location(&full, "/old/deep?q=1", Some("h"), 80),
        "http://h/new?q=1"
    );
    let prefix = redirect(
        None,
        None,
        Some(PathModifier::ReplacePrefixMatch {
            prefix: "/original-prefix".into(),
            replacement: "/replacement-prefix".into(),
        }),
        None,
    );
    assert_eq!(
        location(&prefix, "/original-prefix/lemon", Some("h"), 80),
        "http://h/replacement-prefix/lemon"
    );
}

#[test]
fn redirect_without_a_host_is_a_client_error() {
    let p = parts("GET", "/x", &[]);
    let r = redirect(None, None, None, None);
    assert_eq!(r.location(&p, 80), Err(FilterError::MissingHost));
    let with_host = redirect(None, Some("example.org"), None, None);
    assert!(
        with_host.location(&p, 80).is_ok(),
        "the filter's hostname suffices"
    );
}

#[test]
fn rewrite_host_and_path() {
    let rw = Rewrite {
        hostname: Some(HeaderValue::from_static("backend.shop")),
        path: Some(PathModifier::ReplacePrefixMatch {
            prefix: "/prefix/one".into(),
            replacement: "/one".into(),
        }),
    };
    let mut p = parts("GET", "/prefix/one/two?x=1", &[("host", "web.shop:80")]);
    rw.apply(&mut p).expect("rewrite");
    assert_eq!(p.uri.to_string(), "/one/two?x=1");
    assert_eq!(p.headers.get(HOST).expect("host"), "backend.shop");
    // An absolute (HTTP/2-style) URI gets the new authority too.
    let mut p = parts("GET", "http://web.shop:80/prefix/one", &[]);
    rw.apply(&mut p).expect("rewrite");
    assert_eq!(p.uri.to_string(), "http://backend.shop/one");
    assert_eq!(p.headers.get(HOST).expect("host"), "backend.shop");
}

/// The conformance cases of `MeshHTTPRouteRewritePath`, through routing and filters.
#[test]
fn rewrite_path_conformance_cases() {
    let rewrite_prefix = |prefix: &str, to: &str| {
        format!(
            "{{ matches: [{{ path: {{ type: PathPrefix, value: {prefix} }} }}], \
             filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplacePrefixMatch, replacePrefixMatch: '{to}' }} }} }}], \
             backendRefs: [{{ name: v1, port: 80 }}] }}"
        )
    };
    let rules = format!(
        "[{}, {}, {{ matches: [{{ path: {{ type: PathPrefix, value: /full/one }} }}], \
         filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplaceFullPath, replaceFullPath: /one }} }} }}], \
         backendRefs: [{{ name: v1, port: 80 }}] }}, \
         {{ matches: [{{ path: {{ type: PathPrefix, value: /full/rewrite-path-and-modify-headers }} }}], \
         filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplaceFullPath, replaceFullPath: /test }} }} }}, \
         {{ type: RequestHeaderModifier, requestHeaderModifier: {{ set: [{{ name: X-Header-Set, value: set-overwrites-values }}], \
         add: [{{ name: X-Header-Add, value: header-val-1 }}, {{ name: X-Header-Add-Append, value: header-val-2 }}], \
         remove: [X-Header-Remove] }} }}], \
         backendRefs: [{{ name: v1, port: 80 }}] }}]",
        rewrite_prefix("/prefix/one", "/one"),
        rewrite_prefix("/strip-prefix", "/"),
    );
    let r = router(&[http_route("rewrite", &rules)]);
    let forward = |uri: &str, headers: &[(&str, &str)]| {
        let mut p = parts("GET", uri, headers);
        let rule = select(&r, WEB, &Request::from_parts(&p, None))
            .expect("route")
            .rule;
        let outcome = apply_request_filters(&rule.filters, &mut p, 80).expect("filters");
        assert_eq!(outcome, RequestOutcome::Forward);
        p
    };
    assert_eq!(forward("/prefix/one/two", &[]).uri.path(), "/one/two");
    assert_eq!(forward("/strip-prefix/three", &[]).uri.path(), "/three");
    assert_eq!(forward("/strip-prefix", &[]).uri.path(), "/");
    assert_eq!(forward("/full/one/two", &[]).uri.path(), "/one");
    let p = forward(
        "/full/rewrite-path-and-modify-headers/test",
        &[
            ("X-Header-Remove", "remove-val"),
            ("X-Header-Add-Append", "append-val-1"),
            ("X-Header-Set", "set-val"),
        ],
    );
    assert_eq!(p.uri.path(), "/test");
    assert_eq!(values(&p.headers, "x-header-add"), ["header-val-1"]);
    assert_eq!(
        values(&p.headers, "x-header-add-append"),
        ["append-val-1", "header-val-2"]
    );
    assert_eq!(
        values(&p.headers, "x-header-set"),
        ["set-overwrites-values"]
    );
    assert!(p.headers.get("x-header-remove").is_none());
}

/// Redirects through routing: status, the rule's prefix, and the parent port.
#[test]
fn redirect_through_routing() {
    let rules = "[{ matches: [{ path: { type: PathPrefix, value: /original-prefix } }], \
        filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplacePrefixMatch, \
        replacePrefixMatch: /replacement-prefix }, statusCode: 301 } }] }, \
        { matches: [{ path: { type: Exact, value: /scheme } }], \
        filters: [{ type: RequestRedirect, requestRedirect: { scheme: https, hostname: example.org } }] }]";
    let r = router(&[http_route("redirect", rules)]);
    let run = |uri: &str| {
        let mut p = parts("GET", uri, &[("host", "web.shop")]);
        let rule = select(&r, WEB, &Request::from_parts(&p, None))
            .expect("route")
            .rule;
        assert!(rule.backends.is_empty());
        match apply_request_filters(&rule.filters, &mut p, 80).expect("filters") {
            RequestOutcome::Redirect(r) => {
                (r.status, r.location.to_str().expect("ascii").to_string())
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        run("/original-prefix/lemon?x=1"),
        (
            StatusCode::MOVED_PERMANENTLY,
            "http://web.shop/replacement-prefix/lemon?x=1".to_string()
        )
    );
    assert_eq!(
        run("/scheme"),
        (StatusCode::FOUND, "https://example.org/scheme".to_string())
    );
}

#[test]
fn response_filters_and_backend_filters() {
    let r = router(&[http_route(
        "web",
        "[{ filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { set: [{ name: x-route, value: web }] } }], \
         backendRefs: [{ name: v1, port: 80, filters: [{ type: RequestHeaderModifier, \
         requestHeaderModifier: { add: [{ name: x-backend, value: v1 }] } }] }] }]",
    )]);
    let mut p = parts("GET", "/", &[]);
    let rule = select(&r, WEB, &Request::from_parts(&p, None))
        .expect("route")
        .rule;
    let backend = choose_backend(&rule.backends, 0).expect("backend");
    assert_eq!(
        apply_request_filters(&rule.filters, &mut p, 80),
        Ok(RequestOutcome::Forward)
    );
    assert_eq!(
        apply_request_filters(&backend.filters, &mut p, 80),
        Ok(RequestOutcome::Forward)
    );
    assert_eq!(values(&p.headers, "x-backend"), ["v1"]);
    let mut response = HeaderMap::new();
    response.insert("x-route", HeaderValue::from_static("upstream"));
    apply_response_filters(&rule.filters, &mut response);
    apply_response_filters(&backend.filters, &mut response);
    assert_eq!(values(&response, "x-route"), ["web"]);
}

#[test]
fn request_mirror_compiles_with_its_share_and_leaves_the_request_alone() {
    let r = router(&[http_route(
        "web",
        "[{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 8080 }, \
         fraction: { numerator: 1, denominator: 4 } } }], backendRefs: [{ name: v1, port: 80, \
         filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: audit, namespace: ops, port: 80 }, percent: 5 } }] }] }]",
    )]);
    let mut p = parts("GET", "/a", &[("host", "web")]);
    let rule = select(&r, WEB, &Request::from_parts(&p, None))
        .expect("route")
        .rule;
    let shadow = Mirror {
        namespace: "shop".into(),
        name: "shadow".into(),
        port: 8080,
        numerator: 1,
        denominator: 4,
    };
    assert_eq!(rule.filters, [Filter::RequestMirror(shadow.clone())]);
    assert!(shadow.selects(0) && !shadow.selects(1) && !shadow.selects(3));
    let backend = choose_backend(&rule.backends, 0).expect("backend");
    assert_eq!(
        backend.filters,
        [Filter::RequestMirror(Mirror {
            namespace: "ops".into(),
            name: "audit".into(),
            port: 80,
            numerator: 5,
            denominator: 100,
        })]
    );
    let before = p.headers.clone();
    assert_eq!(
        apply_request_filters(&rule.filters, &mut p, 80),
        Ok(RequestOutcome::Forward)
    );
    assert_eq!(p.headers, before);
}
