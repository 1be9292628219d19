use http::header::HOST;
use http::{HeaderName, HeaderValue, StatusCode};

use super::*;

fn parts(uri: &str, host: Option<&str>) -> http::request::Parts {
    let mut b = http::Request::get(uri);
    if let Some(h) = host {
        b = b.header(HOST, h);
    }
    b.body(()).expect("valid request").into_parts().0
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("valid header value")
}

fn hn(s: &'static str) -> HeaderName {
    HeaderName::from_static(s)
}

fn set(name: &'static str, value: &str) -> HeaderModifier {
    HeaderModifier {
        set: vec![(hn(name), hv(value))],
        ..Default::default()
    }
}

#[test]
fn rule_then_backend_filters_apply_in_order() {
    let mut p = parts("/shop/cart?id=7", Some("web.shop"));
    let rule = [
        Filter::RequestHeaderModifier(set("x-stage", "rule")),
        Filter::UrlRewrite(Rewrite {
            hostname: Some(hv("cart.shop")),
            path: Some(PathModifier::ReplacePrefixMatch {
                prefix: "/shop".into(),
                replacement: "/v2".into(),
            }),
        }),
        Filter::ResponseHeaderModifier(set("x-from", "rule")),
    ];
    let backend = [
        Filter::RequestHeaderModifier(HeaderModifier {
            add: vec![(hn("x-stage"), hv("backend"))],
            remove: vec![hn("x-drop")],
            ..Default::default()
        }),
        Filter::ResponseHeaderModifier(set("x-from", "backend")),
    ];
    p.headers.insert("x-drop", hv("1"));
    assert_eq!(apply_request(&rule, &mut p, 80), Ok(Decision::Forward));
    assert_eq!(apply_request(&backend, &mut p, 80), Ok(Decision::Forward));
    assert_eq!(p.uri.to_string(), "/v2/cart?id=7");
    assert_eq!(p.headers.get(HOST), Some(&hv("cart.shop")));
    let stages: Vec<_> = p.headers.get_all("x-stage").iter().collect();
    assert_eq!(stages, vec![&hv("rule"), &hv("backend")]);
    assert!(p.headers.get("x-drop").is_none());
    // Response filters never touch the request.
    assert!(p.headers.get("x-from").is_none());

    let mut h = HeaderMap::new();
    apply_response([&rule[..], &backend[..]], &mut h);
    assert_eq!(
        h.get("x-from"),
        Some(&hv("backend")),
        "the backend's runs last"
    );
}

#[test]
fn a_redirect_ends_processing() {
    let mut p = parts("/old/page?x=1", Some("web.shop"));
    let filters = [
        Filter::RequestRedirect(Redirect {
            scheme: None,
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch {
                prefix: "/old".into(),
                replacement: "/new".into(),
            }),
            port: None,
            status: StatusCode::MOVED_PERMANENTLY,
        }),
        Filter::RequestHeaderModifier(set("x-after", "1")),
    ];
    let Ok(Decision::Redirect(r)) = apply_request(&filters, &mut p, 8080) else {
        panic!("expected a redirect");
    };
    assert_eq!(r.location, hv("http://web.shop:8080/new/page?x=1"));
    assert!(
        p.headers.get("x-after").is_none(),
        "filters after it do not run"
    );
    let resp: Response<()> = redirect_response(&r);
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers().get(LOCATION), Some(&r.location));
}

#[test]
fn invalid_requests_are_errors_not_panics() {
    // A redirect that keeps the host of a request without one.
    let mut p = parts("/x", None);
    let redirect = Filter::RequestRedirect(Redirect {
        scheme: None,
        hostname: None,
        path: None,
        port: None,
        status: StatusCode::FOUND,
    });
    assert_eq!(
        apply_request(&[redirect], &mut p, 80),
        Err(FilterError::MissingHost)
    );
    let bad_path = Filter::UrlRewrite(Rewrite {
        hostname: None,
        path: Some(PathModifier::ReplaceFullPath("/a b".into())),
    });
    assert!(apply_request(&[bad_path], &mut p, 80).is_err());
}
