//! Checking one route and compiling it: patterns parsed, regexes built, defaults applied.
//!
//! Errors name the field relative to the route (`spec.rules[0].matches[1].path.value`) and
//! say what is wrong; the config loader prefixes `routes[i].`. The checks are those of the
//! Gateway API CRDs (types, limits, CEL rules) plus what a proxy needs to be safe, such as
//! rewrite paths that are valid URI paths. References to other objects (parent and backend
//! services) are resolved by the caller, who knows the config.

use std::collections::HashSet;
use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::filters::{Filter, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite};
use super::matching::{
    GrpcMatch, HttpMatch, Matcher, PathMatcher, RANK_EXACT, RANK_PREFIX, RANK_REGEX, Specificity,
    ValueMatcher, full_match_regex,
};
use super::{Backend, DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_BACKOFF, Retry, RouteRule, Timeouts};
use crate::config::model::{
    GatewayDuration, GrpcBackendRef, GrpcRouteFilter, GrpcRouteFilterType, GrpcRouteMatch,
    GrpcRouteSpec, HeaderMatchType, HttpBackendRef, HttpHeaderFilter, HttpHeaderMatch, HttpMethod,
    HttpPathMatch, HttpPathModifier, HttpPathModifierType, HttpRequestMirrorFilter,
    HttpRequestRedirectFilter, HttpRouteFilter, HttpRouteFilterType, HttpRouteMatch,
    HttpRouteRetry, HttpRouteRule, HttpRouteSpec, HttpRouteTimeouts, HttpUrlRewriteFilter,
    ParentReference, PathMatchType, Route, RouteKind, RouteSpec, Timestamp, is_core_group,
};
use crate::identity::validate_component;

/// Why a route could not be compiled: (field path relative to the route, reason).
pub type CompileError = (String, String);

// Limits from the Gateway API CRDs.
const MAX_PARENT_REFS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_HTTP_MATCHES: usize = 64;
const MAX_HTTP_MATCHES_PER_ROUTE: usize = 128;
const MAX_GRPC_MATCHES: usize = 8;
/// Hostnames, header and query matches, filters, backends, header actions.
const MAX_ITEMS: usize = 16;
const MAX_PATH_LEN: usize = 1024;
const MAX_NAME_LEN: usize = 256;
const MAX_HEADER_VALUE_LEN: usize = 4096;
const MAX_QUERY_VALUE_LEN: usize = 1024;
const MAX_WEIGHT: u32 = 1_000_000;

/// A route ready for routing.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) kind: RouteKind,
    pub(crate) created: Option<Timestamp>,
    /// Service parents only; other parents belong to other implementations.
    pub(crate) parents: Vec<ParentReference>,
    pub(crate) rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub(crate) matches: Vec<Matcher>,
    pub(crate) rule: RouteRule,
}

// === impl CompiledRoute ===

impl CompiledRoute {
    /// `namespace/name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `HTTPRoute` or `GRPCRoute`.
    pub fn kind(&self) -> RouteKind {
        self.kind
    }

    /// The rules, in the order written.
    pub fn rules(&self) -> impl Iterator<Item = &RouteRule> {
        self.rules.iter().map(|r| &r.rule)
    }
}

fn fail<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, CompileError> {
    Err((field.into(), reason.into()))
}

/// Checks and compiles one route.
pub fn compile(route: &Route) -> Result<CompiledRoute, CompileError> {
    let meta = &route.metadata;
    validate_component("route name", &meta.name)
        .map_err(|e| ("metadata.name".to_string(), e.to_string()))?;
    validate_component("namespace", &meta.namespace)
        .map_err(|e| ("metadata.namespace".to_string(), e.to_string()))?;
    let parents = compile_parents(route.parent_refs())?;
    check_hostnames(route.hostnames())?;
    let rules = match &route.spec {
        RouteSpec::Http(spec) => compile_http_rules(spec, &meta.namespace)?,
        RouteSpec::Grpc(spec) => compile_grpc_rules(spec, &meta.namespace)?,
    };
    Ok(CompiledRoute {
        name: route.qualified_name(),
        namespace: meta.namespace.clone(),
        kind: route.kind(),
        created: meta.creation_timestamp.clone(),
        parents,
        rules,
    })
}

fn compile_parents(refs: &[ParentReference]) -> Result<Vec<ParentReference>, CompileError> {
    const HOW: &str = "add `{group: \"\", kind: Service, name: <service>}`";
    if refs.is_empty() {
        return fail(
            "spec.parentRefs",
            format!("a route needs a parent Service: {HOW}"),
        );
    }
    if refs.len() > MAX_PARENT_REFS {
        return fail(
            "spec.parentRefs",
            format!("at most {MAX_PARENT_REFS} parents are allowed"),
        );
    }
    let mut services = Vec::new();
    for (i, p) in refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if p.group.is_none() && p.kind.as_deref() == Some("Service") {
            return fail(
                format!("{at}.group"),
                "set `group: \"\"` for a Service parent: without it the group is \
                 gateway.networking.k8s.io, which has no Service kind",
            );
        }
        if !p.is_service() {
            continue;
        }
        validate_component("service name", &p.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        if let Some(ns) = &p.namespace {
            validate_component("namespace", ns)
                .map_err(|e| (format!("{at}.namespace"), e.to_string()))?;
        }
        if p.port == Some(0) {
            return fail(format!("{at}.port"), "port 0 is not a service port");
        }
        if p.section_name
            .as_deref()
            .is_some_and(|s| !is_dns_subdomain(s))
        {
            return fail(
                format!("{at}.sectionName"),
                "must name a port of the service (lowercase letters, digits, `-` and `.`)",
            );
        }
        services.push(p.clone());
    }
    if services.is_empty() {
        return fail(
            "spec.parentRefs",
            format!("no parent is a Service; Ambit attaches routes to Services only: {HOW}"),
        );
    }
    Ok(services)
}

fn check_hostnames(hosts: &[String]) -> Result<(), CompileError> {
    if hosts.len() > MAX_ITEMS {
        return fail(
            "spec.hostnames",
            format!("at most {MAX_ITEMS} hostnames are allowed"),
        );
    }
    for (i, h) in hosts.iter().enumerate() {
        let bare = h.strip_prefix("*.").unwrap_or(h);
        if !is_precise_hostname(bare) {
            return fail(
                format!("spec.hostnames[{i}]"),
                format!(
                    "`{h}` is not a hostname (lowercase DNS labels, optionally after `*.`; no IP addresses)"
                ),
            );
        }
    }
    Ok(())
}

/// RFC 1123 subdomain: lowercase labels of letters, digits and `-`, joined by `.`.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Gateway API `PreciseHostname`: a DNS subdomain that is not an IP address.
fn is_precise_hostname(s: &str) -> bool {
    is_dns_subdomain(s) && s.parse::<IpAddr>().is_err()
}

fn check_rule_names<'a>(names: impl Iterator<Item = Option<&'a str>>) -> Result<(), CompileError> {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        let Some(name) = name else { continue };
        let at = format!("spec.rules[{i}].name");
        if !is_dns_subdomain(name) {
            return fail(
                at,
                format!(
                    "`{name}` is not a valid rule name (lowercase letters, digits, `-` and `.`)"
                ),
            );
        }
        if !seen.insert(name) {
            return fail(
                at,
                format!("rule name `{name}` is used twice in this route"),
            );
        }
    }
    Ok(())
}

// --- HTTPRoute ---

fn compile_http_rules(spec: &HttpRouteSpec, ns: &str) -> Result<Vec<CompiledRule>, CompileError> {
    if spec.rules.is_empty() {
        return fail(
            "spec.rules",
            "a route needs at least one rule; leave `rules` out for one that matches every request",
        );
    }
    if spec.rules.len() > MAX_RULES {
        return fail(
            "spec.rules",
            format!("at most {MAX_RULES} rules are allowed"),
        );
    }
    let total: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
    if total > MAX_HTTP_MATCHES_PER_ROUTE {
        return fail(
            "spec.rules",
            format!(
                "{total} matches in all; a route may have at most {MAX_HTTP_MATCHES_PER_ROUTE}"
            ),
        );
    }
    check_rule_names(spec.rules.iter().map(|r| r.name.as_deref()))?;
    spec.rules
        .iter()
        .enumerate()
        .map(|(i, r)| compile_http_rule(r, &format!("spec.rules[{i}]"), ns))
        .collect()
}

fn compile_http_rule(
    rule: &HttpRouteRule,
    at: &str,
    ns: &str,
) -> Result<CompiledRule, CompileError> {
    if rule.matches.len() > MAX_HTTP_MATCHES {
        return fail(
            format!("{at}.matches"),
            format!("at most {MAX_HTTP_MATCHES} matches are allowed per rule"),
        );
    }
    let matches = if rule.matches.is_empty() {
        vec![Matcher::Http(compile_http_match(
            &HttpRouteMatch::default(),
            at,
        )?)]
    } else {
        rule.matches
            .iter()
            .enumerate()
            .map(|(j, m)| compile_http_match(m, &format!("{at}.matches[{j}]")).map(Matcher::Http))
            .collect::<Result<_, _>>()?
    };
    // `ReplacePrefixMatch` needs exactly one match, and it must be a `PathPrefix` one
    // (an absent path, or absent matches, default to `PathPrefix` `/`).
    let sole_prefix = match rule.matches.as_slice() {
        [] => Some("/"),
        [m] => match &m.path {
            None => Some("/"),
            Some(p) if p.r#type == PathMatchType::PathPrefix => Some(p.value.as_str()),
            Some(_) => None,
        },
        _ => None,
    };
    let filters = compile_http_filters(&rule.filters, &format!("{at}.filters"), sole_prefix, ns)?;
    let redirects = filters
        .iter()
        .any(|f| matches!(f, Filter::RequestRedirect(_)));
    if redirects && !rule.backend_refs.is_empty() {
        return fail(
            format!("{at}.backendRefs"),
            "a rule with a `RequestRedirect` filter answers requests itself; remove its `backendRefs`",
        );
    }
    if rule.backend_refs.len() > MAX_ITEMS {
        return fail(
            format!("{at}.backendRefs"),
            format!("at most {MAX_ITEMS} backends are allowed"),
        );
    }
    let backends = rule
        .backend_refs
        .iter()
        .enumerate()
        .map(|(k, b)| compile_http_backend(b, &format!("{at}.backendRefs[{k}]"), ns, sole_prefix))
        .collect::<Result<_, _>>()?;
    let timeouts = compile_timeouts(rule.timeouts.as_ref(), &format!("{at}.timeouts"))?;
    let retry = rule
        .retry
        .as_ref()
        .map(|r| compile_retry(r, &format!("{at}.retry")))
        .transpose()?;
    Ok(CompiledRule {
        matches,
        rule: RouteRule {
            name: rule.name.clone(),
            filters,
            backends,
            timeouts,
            retry,
        },
    })
}

fn compile_http_match(m: &HttpRouteMatch, at: &str) -> Result<HttpMatch, CompileError> {
    let (path, rank, len) = match &m.path {
        None => (PathMatcher::Prefix(String::new()), RANK_PREFIX, 1),
        Some(p) => compile_path(p, &format!("{at}.path"))?,
    };
    let headers = compile_header_matches(&m.headers, &format!("{at}.headers"))?;
    let query = compile_query_matches(&m.query_params, &format!("{at}.queryParams"))?;
    let method = m.method.map(method_of);
    Ok(HttpMatch {
        path,
        specificity: Specificity([
            rank,
            len,
            usize::from(method.is_some()),
            headers.len(),
            query.len(),
        ]),
        method,
        headers,
        query,
    })
}

fn method_of(m: HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Connect => Method::CONNECT,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Trace => Method::TRACE,
        HttpMethod::Patch => Method::PATCH,
    }
}

fn compile_path(p: &HttpPathMatch, at: &str) -> Result<(PathMatcher, usize, usize), CompileError> {
    let v = &p.value;
    let field = format!("{at}.value");
    if v.len() > MAX_PATH_LEN {
        return fail(field, format!("longer than {MAX_PATH_LEN} characters"));
    }
    match p.r#type {
        PathMatchType::Exact => {
            check_match_path(v).map_err(|r| (field, r))?;
            Ok((PathMatcher::Exact(v.clone()), RANK_EXACT, v.len()))
        }
        PathMatchType::PathPrefix => {
            check_match_path(v).map_err(|r| (field, r))?;
            let trimmed = v.trim_end_matches('/').to_string();
            Ok((PathMatcher::Prefix(trimmed), RANK_PREFIX, v.len()))
        }
        PathMatchType::RegularExpression => {
            let r = full_match_regex(v).map_err(|r| (field, r))?;
            Ok((PathMatcher::Regex(r), RANK_REGEX, v.len()))
        }
    }
}

/// The rules the Gateway API CRD puts on `Exact` and `PathPrefix` values.
fn check_match_path(v: &str) -> Result<(), String> {
    if !v.starts_with('/') {
        return Err(format!("`{v}` must be an absolute path starting with `/`"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if v.contains(bad) {
            return Err(format!("`{v}` must not contain `{bad}`"));
        }
    }
    for bad in ["/..", "/."] {
        if v.ends_with(bad) {
            return Err(format!("`{v}` must not end with `{bad}`"));
        }
    }
    check_path_chars(v)
}

/// `^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$`, the CRD's path characters.
fn check_path_chars(v: &str) -> Result<(), String> {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(format!(
                    "`{v}` has a `%` that is not followed by two hex digits"
                ));
            }
            i += 3;
            continue;
        }
        if !(c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c)) {
            let shown = v[i..].chars().next().unwrap_or('?');
            return Err(format!(
                "`{v}` contains `{shown}`, which a path may only carry %-encoded"
            ));
        }
        i += 1;
    }
    Ok(())
}

/// Gateway API `HeaderName` (also used for query parameter names): an HTTP token.
fn check_token(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a valid {what} name"))
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    check_token("header", name)?;
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))
}

fn value_matcher(kind: HeaderMatchType, value: &str) -> Result<ValueMatcher, String> {
    match kind {
        HeaderMatchType::Exact => Ok(ValueMatcher::Exact(value.to_string())),
        HeaderMatchType::RegularExpression => full_match_regex(value).map(ValueMatcher::Regex),
    }
}

fn compile_header_matches(
    list: &[HttpHeaderMatch],
    at: &str,
) -> Result<Vec<(HeaderName, ValueMatcher)>, CompileError> {
    if list.len() > MAX_ITEMS {
        return fail(
            at,
            format!("at most {MAX_ITEMS} header matches are allowed"),
        );
    }
    let mut written = HashSet::new();
    let mut out: Vec<(HeaderName, ValueMatcher)> = Vec::new();
    for (k, h) in list.iter().enumerate() {
        let name = header_name(&h.name).map_err(|r| (format!("{at}[{k}].name"), r))?;
        if !written.insert(h.name.as_str()) {
            return fail(
                format!("{at}[{k}].name"),
                format!("header `{}` is matched twice", h.name),
            );
        }
        let field = format!("{at}[{k}].value");
        if h.value.is_empty() || h.value.len() > MAX_HEADER_VALUE_LEN {
            return fail(
                field,
                format!("must be 1 to {MAX_HEADER_VALUE_LEN} characters"),
            );
        }
        if h.r#type == HeaderMatchType::Exact && HeaderValue::from_str(&h.value).is_err() {
            return fail(field, format!("`{}` is not a valid header value", h.value));
        }
        let matcher = value_matcher(h.r#type, &h.value).map_err(|r| (field, r))?;
        // Names are case-insensitive; the spec says only the first of equivalent names counts.
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, matcher));
        }
    }
    Ok(out)
}

fn compile_query_matches(
    list: &[HttpHeaderMatch],
    at: &str,
) -> Result<Vec<(String, ValueMatcher)>, CompileError> {
    if list.len() > MAX_ITEMS {
        return fail(
            at,
            format!("at most {MAX_ITEMS} query parameter matches are allowed"),
        );
    }
    let mut out: Vec<(String, ValueMatcher)> = Vec::new();
    for (k, q) in list.iter().enumerate() {
        check_token("query parameter", &q.name).map_err(|r| (format!("{at}[{k}].name"), r))?;
        if out.iter().any(|(n, _)| *n == q.name) {
            return fail(
                format!("{at}[{k}].name"),
                format!("query parameter `{}` is matched twice", q.name),
            );
        }
        let field = format!("{at}[{k}].value");
        if q.value.is_empty() || q.value.len() > MAX_QUERY_VALUE_LEN {
            return fail(
                field,
                format!("must be 1 to {MAX_QUERY_VALUE_LEN} characters"),
            );
        }
        let matcher = value_matcher(q.r#type, &q.value).map_err(|r| (field, r))?;
        out.push((q.name.clone(), matcher));
    }
    Ok(out)
}

/// Reports a filter whose configuration field does not fit its `type`.
fn filter_fields_error<T>(
    at: &str,
    type_name: &str,
    expected: &str,
    fields: &[(&str, bool)],
) -> Result<T, CompileError> {
    match fields.iter().find(|(name, set)| *set && *name != expected) {
        Some((other, _)) => fail(
            format!("{at}.{other}"),
            format!("`{other}` does not belong in a `{type_name}` filter"),
        ),
        None => fail(
            format!("{at}.{expected}"),
            format!("a `{type_name}` filter needs `{expected}`"),
        ),
    }
}

fn http_filter_name(t: HttpRouteFilterType) -> (&'static str, &'static str) {
    match t {
        HttpRouteFilterType::RequestHeaderModifier => {
            ("RequestHeaderModifier", "requestHeaderModifier")
        }
        HttpRouteFilterType::ResponseHeaderModifier => {
            ("ResponseHeaderModifier", "responseHeaderModifier")
        }
        HttpRouteFilterType::RequestRedirect => ("RequestRedirect", "requestRedirect"),
        HttpRouteFilterType::UrlRewrite => ("URLRewrite", "urlRewrite"),
        HttpRouteFilterType::RequestMirror => ("RequestMirror", "requestMirror"),
    }
}

fn compile_http_filters(
    filters: &[HttpRouteFilter],
    at: &str,
    sole_prefix: Option<&str>,
    route_ns: &str,
) -> Result<Vec<Filter>, CompileError> {
    use HttpRouteFilterType as T;
    if filters.len() > MAX_ITEMS {
        return fail(at, format!("at most {MAX_ITEMS} filters are allowed"));
    }
    let mut seen: Vec<T> = Vec::new();
    let mut out = Vec::with_capacity(filters.len());
    for (j, f) in filters.iter().enumerate() {
        let here = format!("{at}[{j}]");
        let (type_name, field) = http_filter_name(f.r#type);
        if seen.contains(&f.r#type) {
            return fail(
                format!("{here}.type"),
                format!("only one `{type_name}` filter is allowed per rule"),
            );
        }
        let clash = match f.r#type {
            T::RequestRedirect => seen.contains(&T::UrlRewrite),
            T::UrlRewrite => seen.contains(&T::RequestRedirect),
            _ => false,
        };
        if clash {
            return fail(
                format!("{here}.type"),
                "`RequestRedirect` and `URLRewrite` cannot be used together",
            );
        }
        seen.push(f.r#type);
        let mirror_only = f.request_header_modifier.is_none()
            && f.response_header_modifier.is_none()
            && f.request_redirect.is_none()
            && f.url_rewrite.is_none();
        if let (T::RequestMirror, Some(m), true) = (f.r#type, &f.request_mirror, mirror_only) {
            out.push(compile_mirror(m, &format!("{here}.{field}"), route_ns)?);
            continue;
        }
        let filter = match (
            f.r#type,
            &f.request_header_modifier,
            &f.response_header_modifier,
            &f.request_redirect,
            &f.url_rewrite,
        ) {
            _ if f.request_mirror.is_some() || f.r#type == T::RequestMirror => {
                return filter_fields_error(
                    &here,
                    type_name,
                    field,
                    &[
                        ("requestHeaderModifier", f.request_header_modifier.is_some()),
                        (
                            "responseHeaderModifier",
                            f.response_header_modifier.is_some(),
                        ),
                        ("requestRedirect", f.request_redirect.is_some()),
                        ("urlRewrite", f.url_rewrite.is_some()),
                        ("requestMirror", f.request_mirror.is_some()),
                    ],
                );
            }
            (T::RequestHeaderModifier, Some(m), None, None, None) => {
                Filter::RequestHeaderModifier(compile_header_filter(m, &format!("{here}.{field}"))?)
            }
            (T::ResponseHeaderModifier, None, Some(m), None, None) => {
                Filter::ResponseHeaderModifier(compile_header_filter(
                    m,
                    &format!("{here}.{field}"),
                )?)
            }
            (T::RequestRedirect, None, None, Some(r), None) => Filter::RequestRedirect(
                compile_redirect(r, &format!("{here}.{field}"), sole_prefix)?,
            ),
            (T::UrlRewrite, None, None, None, Some(r)) => {
                Filter::UrlRewrite(compile_rewrite(r, &format!("{here}.{field}"), sole_prefix)?)
            }
            _ => {
                return filter_fields_error(
                    &here,
                    type_name,
                    field,
                    &[
                        ("requestHeaderModifier", f.request_header_modifier.is_some()),
                        (
                            "responseHeaderModifier",
                            f.response_header_modifier.is_some(),
                        ),
                        ("requestRedirect", f.request_redirect.is_some()),
                        ("urlRewrite", f.url_rewrite.is_some()),
                        ("requestMirror", f.request_mirror.is_some()),
                    ],
                );
            }
        };
        out.push(filter);
    }
    Ok(out)
}

fn compile_mirror(
    m: &HttpRequestMirrorFilter,
    at: &str,
    route_ns: &str,
) -> Result<Filter, CompileError> {
    let b = &m.backend_ref;
    let fields = BackendFields {
        group: b.group.as_deref(),
        kind: b.kind.as_deref(),
        name: &b.name,
        namespace: b.namespace.as_deref(),
        port: b.port,
        weight: 1,
    };
    let backend = compile_backend(fields, &format!("{at}.backendRef"), route_ns)?;
    let (numerator, denominator) = match (m.percent, m.fraction) {
        (Some(_), Some(_)) => {
            return fail(at, "set `percent` or `fraction`, not both");
        }
        (Some(p), None) if p > 100 => {
            return fail(
                format!("{at}.percent"),
                format!("{p} is not a percentage (0 to 100)"),
            );
        }
        (Some(p), None) => (p, 100),
        (None, Some(f)) if f.denominator == 0 => {
            return fail(format!("{at}.fraction.denominator"), "must be at least 1");
        }
        (None, Some(f)) if f.numerator > f.denominator => {
            return fail(
                format!("{at}.fraction.numerator"),
                format!(
                    "{} is more than the denominator {}",
                    f.numerator, f.denominator
                ),
            );
        }
        (None, Some(f)) => (f.numerator, f.denominator),
        (None, None) => (1, 1),
    };
    Ok(Filter::RequestMirror(Mirror {
        namespace: backend.namespace,
        name: backend.name,
        port: backend.port,
        numerator,
        denominator,
    }))
}

fn compile_header_filter(m: &HttpHeaderFilter, at: &str) -> Result<HeaderModifier, CompileError> {
    let mut names: HashSet<HeaderName> = HashSet::new();
    let mut claim = |name: &str, field: String| -> Result<HeaderName, CompileError> {
        let parsed = header_name(name).map_err(|r| (field.clone(), r))?;
        if !names.insert(parsed.clone()) {
            return fail(
                field,
                format!(
                    "header `{name}` already has an action in this filter; use one action per header"
                ),
            );
        }
        Ok(parsed)
    };
    let mut out = HeaderModifier::default();
    for (key, list) in [("set", &m.set), ("add", &m.add)] {
        if list.len() > MAX_ITEMS {
            return fail(
                format!("{at}.{key}"),
                format!("at most {MAX_ITEMS} headers are allowed"),
            );
        }
        for (k, h) in list.iter().enumerate() {
            let name = claim(&h.name, format!("{at}.{key}[{k}].name"))?;
            let value = HeaderValue::from_str(&h.value).map_err(|_| {
                (
                    format!("{at}.{key}[{k}].value"),
                    format!("`{}` is not a valid header value", h.value),
                )
            })?;
            if key == "set" {
                out.set.push((name, value));
            } else {
                out.add.push((name, value));
            }
        }
    }
    if m.remove.len() > MAX_ITEMS {
        return fail(
            format!("{at}.remove"),
            format!("at most {MAX_ITEMS} headers are allowed"),
        );
    }
    for (k, name) in m.remove.iter().enumerate() {
        out.remove.push(claim(name, format!("{at}.remove[{k}]"))?);
    }
    Ok(out)
}

fn compile_redirect(
    r: &HttpRequestRedirectFilter,
    at: &str,
    sole_prefix: Option<&str>,
) -> Result<Redirect, CompileError> {
    if let Some(h) = &r.hostname
        && !is_precise_hostname(h)
    {
        return fail(
            format!("{at}.hostname"),
            format!("`{h}` is not a hostname (lowercase DNS labels; no IP addresses)"),
        );
    }
    if r.port == Some(0) {
        return fail(format!("{at}.port"), "port must be between 1 and 65535");
    }
    let status = match r.status_code.unwrap_or(302) {
        301 => StatusCode::MOVED_PERMANENTLY,
        302 => StatusCode::FOUND,
        303 => StatusCode::SEE_OTHER,
        307 => StatusCode::TEMPORARY_REDIRECT,
        308 => StatusCode::PERMANENT_REDIRECT,
        other => {
            return fail(
                format!("{at}.statusCode"),
                format!("{other} is not a redirect status; use 301, 302, 303, 307 or 308"),
            );
        }
    };
    let path = r
        .path
        .as_ref()
        .map(|p| compile_path_modifier(p, &format!("{at}.path"), sole_prefix))
        .transpose()?;
    Ok(Redirect {
        scheme: r.scheme,
        hostname: r.hostname.clone(),
        path,
        port: r.port,
        status,
    })
}

fn compile_rewrite(
    r: &HttpUrlRewriteFilter,
    at: &str,
    sole_prefix: Option<&str>,
) -> Result<Rewrite, CompileError> {
    let hostname = match &r.hostname {
        None => None,
        Some(h) => {
            if !is_precise_hostname(h) {
                return fail(
                    format!("{at}.hostname"),
                    format!("`{h}` is not a hostname (lowercase DNS labels; no IP addresses)"),
                );
            }
            // A DNS name is always a valid header value.
            HeaderValue::from_str(h).ok()
        }
    };
    let path = r
        .path
        .as_ref()
        .map(|p| compile_path_modifier(p, &format!("{at}.path"), sole_prefix))
        .transpose()?;
    Ok(Rewrite { hostname, path })
}

fn compile_path_modifier(
    p: &HttpPathModifier,
    at: &str,
    sole_prefix: Option<&str>,
) -> Result<PathModifier, CompileError> {
    use HttpPathModifierType as T;
    match (p.r#type, &p.replace_full_path, &p.replace_prefix_match) {
        (T::ReplaceFullPath, Some(v), None) => {
            check_replacement(v, false).map_err(|r| (format!("{at}.replaceFullPath"), r))?;
            Ok(PathModifier::ReplaceFullPath(v.clone()))
        }
        (T::ReplacePrefixMatch, None, Some(v)) => {
            check_replacement(v, true).map_err(|r| (format!("{at}.replacePrefixMatch"), r))?;
            let Some(prefix) = sole_prefix else {
                return fail(
                    format!("{at}.type"),
                    "`ReplacePrefixMatch` needs the rule to have exactly one match, with a `PathPrefix` path",
                );
            };
            Ok(PathModifier::ReplacePrefixMatch {
                prefix: prefix.to_string(),
                replacement: v.clone(),
            })
        }
        (T::ReplaceFullPath, None, _) => fail(
            format!("{at}.replaceFullPath"),
            "a `ReplaceFullPath` modifier needs `replaceFullPath`",
        ),
        (T::ReplacePrefixMatch, _, None) => fail(
            format!("{at}.replacePrefixMatch"),
            "a `ReplacePrefixMatch` modifier needs `replacePrefixMatch`",
        ),
        (T::ReplaceFullPath, Some(_), Some(_)) => fail(
            format!("{at}.replacePrefixMatch"),
            "`replacePrefixMatch` does not belong with `type: ReplaceFullPath`",
        ),
        (T::ReplacePrefixMatch, Some(_), Some(_)) => fail(
            format!("{at}.replaceFullPath"),
            "`replaceFullPath` does not belong with `type: ReplacePrefixMatch`",
        ),
    }
}

/// A replacement path must itself be a valid absolute path (the query is kept separately).
fn check_replacement(v: &str, may_be_empty: bool) -> Result<(), String> {
    if v.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            Err("must not be empty".into())
        };
    }
    if v.len() > MAX_PATH_LEN {
        return Err(format!("longer than {MAX_PATH_LEN} characters"));
    }
    if !v.starts_with('/') {
        return Err(format!("`{v}` must be an absolute path starting with `/`"));
    }
    check_path_chars(v)
}

/// The fields `HTTPBackendRef` and `GRPCBackendRef` share.
struct BackendFields<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<u16>,
    weight: u32,
}

fn compile_backend(
    b: BackendFields<'_>,
    at: &str,
    route_ns: &str,
) -> Result<Backend, CompileError> {
    let BackendFields {
        group,
        kind,
        name,
        namespace,
        port,
        weight,
    } = b;
    if let Some(g) = group
        && !is_core_group(g)
    {
        return fail(
            format!("{at}.group"),
            format!("group `{g}` is not supported: backends are Services (`group: \"\"`)"),
        );
    }
    if let Some(k) = kind
        && k != "Service"
    {
        return fail(
            format!("{at}.kind"),
            format!("kind `{k}` is not supported: backends are Services"),
        );
    }
    validate_component("service name", name).map_err(|e| (format!("{at}.name"), e.to_string()))?;
    if let Some(ns) = namespace {
        validate_component("namespace", ns)
            .map_err(|e| (format!("{at}.namespace"), e.to_string()))?;
    }
    let port = match port {
        None => {
            return fail(
                format!("{at}.port"),
                "a Service backend needs `port` (the service port, not the target port)",
            );
        }
        Some(0) => return fail(format!("{at}.port"), "port must be between 1 and 65535"),
        Some(p) => p,
    };
    if weight > MAX_WEIGHT {
        return fail(
            format!("{at}.weight"),
            format!("{weight} is too large; weights go from 0 to {MAX_WEIGHT}"),
        );
    }
    Ok(Backend {
        namespace: namespace.unwrap_or(route_ns).to_string(),
        name: name.to_string(),
        port,
        weight,
        filters: Vec::new(),
    })
}

fn compile_http_backend(
    b: &HttpBackendRef,
    at: &str,
    route_ns: &str,
    sole_prefix: Option<&str>,
) -> Result<Backend, CompileError> {
    let fields = BackendFields {
        group: b.group.as_deref(),
        kind: b.kind.as_deref(),
        name: &b.name,
        namespace: b.namespace.as_deref(),
        port: b.port,
        weight: b.weight,
    };
    let mut backend = compile_backend(fields, at, route_ns)?;
    backend.filters =
        compile_http_filters(&b.filters, &format!("{at}.filters"), sole_prefix, route_ns)?;
    Ok(backend)
}

fn compile_timeouts(t: Option<&HttpRouteTimeouts>, at: &str) -> Result<Timeouts, CompileError> {
    let Some(t) = t else {
        return Ok(Timeouts::default());
    };
    if let (Some(request), Some(backend)) = (&t.request, &t.backend_request)
        && !request.is_zero()
        && backend.as_duration() > request.as_duration()
    {
        return fail(
            format!("{at}.backendRequest"),
            format!(
                "{backend} is longer than the request timeout {request}, which includes every try"
            ),
        );
    }
    let limit = |d: &Option<GatewayDuration>| {
        d.as_ref()
            .filter(|d| !d.is_zero())
            .map(GatewayDuration::as_duration)
    };
    Ok(Timeouts {
        request: limit(&t.request),
        backend_request: limit(&t.backend_request),
    })
}

fn compile_retry(r: &HttpRouteRetry, at: &str) -> Result<Retry, CompileError> {
    let codes = r
        .codes
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            if !(400..=599).contains(&c) {
                return fail(
                    format!("{at}.codes[{k}]"),
                    format!("{c} cannot be retried; use a status from 400 to 599"),
                );
            }
            StatusCode::from_u16(c).map_err(|e| (format!("{at}.codes[{k}]"), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(Retry {
        codes,
        attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
        backoff: r
            .backoff
            .as_ref()
            .map_or(DEFAULT_RETRY_BACKOFF, GatewayDuration::as_duration),
    })
}

// --- GRPCRoute ---

fn compile_grpc_rules(spec: &GrpcRouteSpec, ns: &str) -> Result<Vec<CompiledRule>, CompileError> {
    if spec.rules.len() > MAX_RULES {
        return fail(
            "spec.rules",
            format!("at most {MAX_RULES} rules are allowed"),
        );
    }
    check_rule_names(spec.rules.iter().map(|r| r.name.as_deref()))?;
    let mut out = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.matches.len() > MAX_GRPC_MATCHES {
            return fail(
                format!("{at}.matches"),
                format!("at most {MAX_GRPC_MATCHES} matches are allowed per rule"),
            );
        }
        let matches = if rule.matches.is_empty() {
            vec![Matcher::Grpc(compile_grpc_match(
                &GrpcRouteMatch::default(),
                &at,
            )?)]
        } else {
            rule.matches
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    compile_grpc_match(m, &format!("{at}.matches[{j}]")).map(Matcher::Grpc)
                })
                .collect::<Result<_, _>>()?
        };
        let filters = compile_grpc_filters(&rule.filters, &format!("{at}.filters"))?;
        if rule.backend_refs.len() > MAX_ITEMS {
            return fail(
                format!("{at}.backendRefs"),
                format!("at most {MAX_ITEMS} backends are allowed"),
            );
        }
        let backends = rule
            .backend_refs
            .iter()
            .enumerate()
            .map(|(k, b)| compile_grpc_backend(b, &format!("{at}.backendRefs[{k}]"), ns))
            .collect::<Result<_, _>>()?;
        out.push(CompiledRule {
            matches,
            rule: RouteRule {
                name: rule.name.clone(),
                filters,
                backends,
                timeouts: Timeouts::default(),
                retry: None,
            },
        });
    }
    Ok(out)
}

fn compile_grpc_match(m: &GrpcRouteMatch, at: &str) -> Result<GrpcMatch, CompileError> {
    let (mut service, mut method, mut service_len, mut method_len) = (None, None, 0, 0);
    if let Some(mm) = &m.method {
        let here = format!("{at}.method");
        let s = mm.service.as_deref().filter(|s| !s.is_empty());
        let me = mm.method.as_deref().filter(|s| !s.is_empty());
        if s.is_none() && me.is_none() {
            return fail(here, "set `service`, `method` or both");
        }
        if let Some(s) = s {
            service = Some(grpc_value(mm.r#type, s, GrpcMatchValue::Service, &here)?);
            service_len = s.len();
        }
        if let Some(me) = me {
            method = Some(grpc_value(mm.r#type, me, GrpcMatchValue::Method, &here)?);
            method_len = me.len();
        }
    }
    let headers = compile_header_matches(&m.headers, &format!("{at}.headers"))?;
    Ok(GrpcMatch {
        service,
        method,
        specificity: Specificity([service_len, method_len, headers.len(), 0, 0]),
        headers,
    })
}

/// Which half of a gRPC method match a value is.
#[derive(Clone, Copy)]
enum GrpcMatchValue {
    Service,
    Method,
}

fn grpc_value(
    kind: HeaderMatchType,
    value: &str,
    what: GrpcMatchValue,
    at: &str,
) -> Result<ValueMatcher, CompileError> {
    let (field, example) = match what {
        GrpcMatchValue::Service => (
            format!("{at}.service"),
            "a service like `grpc.health.v1.Health`",
        ),
        GrpcMatchValue::Method => (format!("{at}.method"), "a method like `Check`"),
    };
    if value.len() > MAX_PATH_LEN {
        return fail(field, format!("longer than {MAX_PATH_LEN} characters"));
    }
    if kind == HeaderMatchType::Exact {
        let ok = match what {
            GrpcMatchValue::Service => {
                let s = value.strip_prefix('.').unwrap_or(value);
                s.split('.').all(is_identifier)
            }
            GrpcMatchValue::Method => is_identifier(value),
        };
        if !ok {
            return fail(field, format!("`{value}` is not {example}"));
        }
    }
    value_matcher(kind, value).map_err(|r| (field, r))
}

/// `[A-Za-z_][A-Za-z_0-9]*`.
fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn compile_grpc_filters(
    filters: &[GrpcRouteFilter],
    at: &str,
) -> Result<Vec<Filter>, CompileError> {
    use GrpcRouteFilterType as T;
    if filters.len() > MAX_ITEMS {
        return fail(at, format!("at most {MAX_ITEMS} filters are allowed"));
    }
    let mut seen = Vec::new();
    let mut out = Vec::with_capacity(filters.len());
    for (j, f) in filters.iter().enumerate() {
        let here = format!("{at}[{j}]");
        let (type_name, field) = match f.r#type {
            T::RequestHeaderModifier => ("RequestHeaderModifier", "requestHeaderModifier"),
            T::ResponseHeaderModifier => ("ResponseHeaderModifier", "responseHeaderModifier"),
        };
        if seen.contains(&f.r#type) {
            return fail(
                format!("{here}.type"),
                format!("only one `{type_name}` filter is allowed per rule"),
            );
        }
        seen.push(f.r#type);
        let filter = match (
            f.r#type,
            &f.request_header_modifier,
            &f.response_header_modifier,
        ) {
            (T::RequestHeaderModifier, Some(m), None) => {
                Filter::RequestHeaderModifier(compile_header_filter(m, &format!("{here}.{field}"))?)
            }
            (T::ResponseHeaderModifier, None, Some(m)) => Filter::ResponseHeaderModifier(
                compile_header_filter(m, &format!("{here}.{field}"))?,
            ),
            _ => {
                return filter_fields_error(
                    &here,
                    type_name,
                    field,
                    &[
                        ("requestHeaderModifier", f.request_header_modifier.is_some()),
                        (
                            "responseHeaderModifier",
                            f.response_header_modifier.is_some(),
                        ),
                    ],
                );
            }
        };
        out.push(filter);
    }
    Ok(out)
}

fn compile_grpc_backend(
    b: &GrpcBackendRef,
    at: &str,
    route_ns: &str,
) -> Result<Backend, CompileError> {
    let fields = BackendFields {
        group: b.group.as_deref(),
        kind: b.kind.as_deref(),
        name: &b.name,
        namespace: b.namespace.as_deref(),
        port: b.port,
        weight: b.weight,
    };
    let mut backend = compile_backend(fields, at, route_ns)?;
    backend.filters = compile_grpc_filters(&b.filters, &format!("{at}.filters"))?;
    Ok(backend)
}
