//! Compiled request matchers and their precedence keys.
//!
//! Regular expressions use the RE2-like syntax of the `regex` crate and must match the whole
//! path, value or name (they are anchored), which is what Envoy-based meshes do too.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::cmp::Ordering;

use http::Method;
use http::header::{HeaderMap, HeaderName};
use regex::bytes::{Regex, RegexBuilder};

use super::{REGEX_SIZE_LIMIT, Request};

/// How one string is compared.
#[derive(Debug, Clone)]
pub(crate) enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

/// How the path is compared.
#[derive(Debug, Clone)]
pub(crate) enum PathMatcher {
    Exact(String),
    /// The prefix without its trailing `/`; empty for `/`, which matches every path.
    Prefix(String),
    Regex(Regex),
}

/// One `HTTPRoute` match: every condition must hold.
#[derive(Debug, Clone)]
pub(crate) struct HttpMatch {
    pub(crate) path: PathMatcher,
    pub(crate) method: Option<Method>,
    pub(crate) headers: Vec<(HeaderName, ValueMatcher)>,
    pub(crate) query: Vec<(String, ValueMatcher)>,
    pub(crate) specificity: Specificity,
}

/// One `GRPCRoute` match: every condition must hold.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMatch {
    pub(crate) service: Option<ValueMatcher>,
    pub(crate) method: Option<ValueMatcher>,
    pub(crate) headers: Vec<(HeaderName, ValueMatcher)>,
    pub(crate) specificity: Specificity,
}

/// A match of either kind.
#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Http(HttpMatch),
    Grpc(GrpcMatch),
}

/// How specific a match is; greater wins. Compared field by field, in the order the
/// Gateway API lists its precedence criteria:
/// - HTTPRoute: path kind (`Exact` > `PathPrefix` > `RegularExpression`), characters in
///   the path value, method present, header matches, query parameter matches;
/// - GRPCRoute: characters in the service, characters in the method, header matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Specificity(pub(crate) [usize; 5]);

/// Path kinds ranked for precedence. The spec orders `Exact` before `PathPrefix` and
/// leaves regular expressions to the implementation; like Istio, they rank last.
pub(crate) const RANK_EXACT: usize = 2;
pub(crate) const RANK_PREFIX: usize = 1;
pub(crate) const RANK_REGEX: usize = 0;

/// The request as the matchers see it, with the query and gRPC method parsed on demand.
pub(crate) struct RequestView<'a> {
    req: &'a Request<'a>,
    query: OnceCell<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    grpc: OnceCell<Option<(&'a str, &'a str)>>,
}

// === impl ValueMatcher ===

impl ValueMatcher {
    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(e) => e.as_bytes() == value,
            ValueMatcher::Regex(r) => r.is_match(value),
        }
    }
}

/// Compiles `pattern` so that it must match the whole input, with a bounded program size.
pub(crate) fn full_match_regex(pattern: &str) -> Result<Regex, String> {
    let anchored = format!(r"\A(?:{pattern})\z");
    RegexBuilder::new(&anchored)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|_| {
            // Report the error against the pattern as written, not our anchored copy.
            let detail = match RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Err(regex::Error::CompiledTooBig(_)) => {
                    format!("it compiles to more than {REGEX_SIZE_LIMIT} bytes")
                }
                Err(e) => e.to_string(),
                Ok(_) => "it cannot be anchored to the whole input".to_string(),
            };
            format!("`{pattern}` is not a usable regular expression: {detail}")
        })
}

// === impl PathMatcher ===

impl PathMatcher {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(e) => e == path,
            PathMatcher::Prefix(p) => prefix_matches(p, path),
            PathMatcher::Regex(r) => r.is_match(path.as_bytes()),
        }
    }
}

/// `PathPrefix` semantics: `prefix` (without its trailing `/`) must be followed by the end
/// of the path or a `/`, so `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

// === impl Matcher ===

impl Matcher {
    pub(crate) fn specificity(&self) -> Specificity {
        match self {
            Matcher::Http(m) => m.specificity,
            Matcher::Grpc(m) => m.specificity,
        }
    }

    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            Matcher::Http(m) => m.matches(req),
            Matcher::Grpc(m) => m.matches(req),
        }
    }
}

impl HttpMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path.matches(req.req.path)
            && self.method.as_ref().is_none_or(|m| m == req.req.method)
            && headers_match(&self.headers, req.req.headers)
            && self.query.iter().all(|(name, m)| {
                req.query_param(name)
                    .is_some_and(|v| m.matches(v.as_bytes()))
            })
    }
}

impl GrpcMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let method_ok = match (&self.service, &self.method) {
            (None, None) => true,
            (service, method) => req.grpc_method().is_some_and(|(s, m)| {
                service.as_ref().is_none_or(|x| x.matches(s.as_bytes()))
                    && method.as_ref().is_none_or(|x| x.matches(m.as_bytes()))
            }),
        };
        method_ok && headers_match(&self.headers, req.req.headers)
    }
}

fn headers_match(matchers: &[(HeaderName, ValueMatcher)], headers: &HeaderMap) -> bool {
    matchers
        .iter()
        .all(|(name, m)| header_value(headers, name).is_some_and(|v| m.matches(&v)))
}

/// A header's value; repeated headers are joined with `,` as RFC 9110 §5.3 allows.
fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(joined))
}

// === impl RequestView ===

impl<'a> RequestView<'a> {
    pub(crate) fn new(req: &'a Request<'a>) -> Self {
        RequestView {
            req,
            query: OnceCell::new(),
            grpc: OnceCell::new(),
        }
    }

    /// The first value of query parameter `name`, percent-decoded.
    fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .get_or_init(|| parse_query(self.req.query.unwrap_or("")))
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    fn grpc_method(&self) -> Option<(&'a str, &'a str)> {
        *self.grpc.get_or_init(|| grpc_method(self.req.path))
    }
}

/// Splits a gRPC `:path` (`/package.Service/Method`) into service and method.
pub fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// Splits a query string into percent-decoded `(name, value)` pairs, in order. `+` is kept
/// as is: it means a space only in HTML forms, not in URIs.
pub(crate) fn parse_query(query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits are at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Orders candidates by precedence: most specific first, then (across routes) the oldest
/// route, then `namespace/name` alphabetically, then rule and match order.
pub(crate) fn precedence(a: &Ranked<'_>, b: &Ranked<'_>) -> Ordering {
    b.specificity
        .cmp(&a.specificity)
        .then_with(|| match (a.created, b.created) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| a.name.cmp(b.name))
        .then_with(|| a.position.cmp(&b.position))
}

/// What [`precedence`] compares.
pub(crate) struct Ranked<'a> {
    pub(crate) specificity: Specificity,
    pub(crate) created: Option<&'a crate::config::model::Timestamp>,
    pub(crate) name: &'a str,
    /// (rule index, match index) within the route.
    pub(crate) position: (usize, usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_wise() {
        for (prefix, path, want) in [
            ("/abc", "/abc", true),
            ("/abc", "/abc/", true),
            ("/abc", "/abc/def", true),
            ("/abc", "/abcd", false),
            ("/abc", "/ab", false),
            ("", "/anything", true),
            ("", "/", true),
        ] {
            assert_eq!(prefix_matches(prefix, path), want, "{prefix} vs {path}");
        }
    }

    #[test]
    fn query_is_split_and_decoded() {
        let q = parse_query("a=1&b=x%20y&&c&a=2&d=%zz&e=caf%C3%A9&f=1+2");
        let pairs: Vec<(&str, &str)> = q.iter().map(|(n, v)| (n.as_ref(), v.as_ref())).collect();
        assert_eq!(
            pairs,
            [
                ("a", "1"),
                ("b", "x y"),
                ("c", ""),
                ("a", "2"),
                ("d", "%zz"),
                ("e", "café"),
                ("f", "1+2")
            ]
        );
    }

    #[test]
    fn grpc_paths() {
        assert_eq!(
            grpc_method("/grpc.health.v1.Health/Check"),
            Some(("grpc.health.v1.Health", "Check"))
        );
        for bad in ["", "/", "/svc", "/svc/", "//m", "/a/b/c", "svc/m"] {
            assert_eq!(grpc_method(bad), None, "{bad}");
        }
    }

    #[test]
    fn regexes_match_whole_input_and_are_bounded() {
        let r = full_match_regex("/v[0-9]+").expect("compiles");
        assert!(r.is_match(b"/v12"));
        assert!(!r.is_match(b"/v12/x"), "anchored at the end");
        assert!(!r.is_match(b"/x/v12"), "anchored at the start");
        let alt = full_match_regex("a|b").expect("compiles");
        assert!(!alt.is_match(b"ab"), "alternation stays inside the anchors");
        let e = full_match_regex("(").expect_err("unbalanced");
        assert!(e.contains("not a usable regular expression"), "{e}");
        let e = full_match_regex("(a{1000}){1000}").expect_err("too big");
        assert!(e.contains("more than"), "{e}");
    }
}
