//! Route filters as pure functions on request parts and response headers.
//!
//! The waypoint applies a rule's filters in the order written, then those of the chosen
//! backend. A redirect ends processing with a response; the other filters edit the request
//! (or, for `ResponseHeaderModifier`, the response) in place.

use std::borrow::Cow;

use http::StatusCode;
use http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Uri};

use crate::config::model::RedirectScheme;

/// One compiled filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Change request headers before forwarding.
    RequestHeaderModifier(HeaderModifier),
    /// Change response headers before answering.
    ResponseHeaderModifier(HeaderModifier),
    /// Answer with a redirect instead of forwarding.
    RequestRedirect(Redirect),
    /// Change the host and path before forwarding.
    UrlRewrite(Rewrite),
    /// Send a copy of a share of requests elsewhere; the proxy carries it out, the
    /// request itself is unchanged.
    RequestMirror(Mirror),
}

/// A compiled `RequestMirror`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The mirror Service's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service port.
    pub port: u16,
    /// Share mirrored: `numerator / denominator`, `numerator <= denominator`,
    /// `denominator >= 1`.
    pub numerator: u32,
    /// See `numerator`.
    pub denominator: u32,
}

impl Mirror {
    /// Whether a request with uniform `roll` in `0..denominator` is mirrored.
    pub fn selects(&self, roll: u32) -> bool {
        roll < self.numerator
    }
}

/// Header changes; each header name has at most one action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Replace every value of the header with this one.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append this value to the header.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Remove the header.
    pub remove: Vec<HeaderName>,
}

/// A redirect: the `Location` is built from the request, overridden by these fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`; `None` keeps the request's.
    pub scheme: Option<RedirectScheme>,
    /// Host; `None` keeps the request's.
    pub hostname: Option<String>,
    /// Path change; `None` keeps the request's path.
    pub path: Option<PathModifier>,
    /// Port; `None` derives it (see [`Redirect::location`]).
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status: StatusCode,
}

/// A URL rewrite applied before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// New `Host` (and `:authority`).
    pub hostname: Option<HeaderValue>,
    /// Path change.
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    /// Replace the whole path (the query is kept).
    ReplaceFullPath(String),
    /// Replace the part of the path that the rule's `PathPrefix` match matched.
    ReplacePrefixMatch {
        /// The rule's `PathPrefix` value.
        prefix: String,
        /// What replaces it.
        replacement: String,
    },
}

/// What the request filters decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Forward the (possibly changed) request.
    Forward,
    /// Answer with this redirect and forward nothing.
    Redirect(Redirection),
}

/// A redirect response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirection {
    /// The status code.
    pub status: StatusCode,
    /// The `Location` header.
    pub location: HeaderValue,
}

/// A request the filters cannot process; the client is at fault (answer 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A redirect keeps the request's host, but the request has none.
    #[error("the request has no host to redirect to")]
    MissingHost,
    /// The rewritten request is not a valid HTTP request.
    #[error("the rewritten {what} is invalid: {value}")]
    Invalid {
        /// `Location`, path or authority.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

// === impl HeaderModifier ===

impl HeaderModifier {
    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

// === impl PathModifier ===

impl PathModifier {
    /// The new path for `path`. A `ReplacePrefixMatch` whose prefix does not match `path`
    /// (which routing never produces) leaves the path unchanged.
    pub fn apply<'p>(&self, path: &'p str) -> Cow<'p, str> {
        match self {
            PathModifier::ReplaceFullPath(p) => Cow::Owned(p.clone()),
            PathModifier::ReplacePrefixMatch {
                prefix,
                replacement,
            } => replace_prefix(path, prefix, replacement)
                .map(Cow::Owned)
                .unwrap_or(Cow::Borrowed(path)),
        }
    }
}

/// `ReplacePrefixMatch`: replaces the path elements matched by `prefix` with
/// `replacement`, as the table in the Gateway API's `HTTPPathModifier` specifies.
/// Trailing slashes on both sides are ignored, and an empty result becomes `/`:
///
/// | path | prefix | replacement | result |
/// |---|---|---|---|
/// | `/foo/bar` | `/foo` | `/xyz` | `/xyz/bar` |
/// | `/foo/bar` | `/foo/` | `/xyz/` | `/xyz/bar` |
/// | `/foo/` | `/foo` | `/xyz` | `/xyz/` |
/// | `/foo/bar` | `/foo` | (empty) | `/bar` |
/// | `/foo` | `/foo` | `/` | `/` |
///
/// Returns `None` if `prefix` does not match `path` at a segment boundary.
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let mut out = replacement.trim_end_matches('/').to_string();
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

// === impl Redirect ===

impl Redirect {
    /// Builds the redirect for a request that arrived on `listener_port` (in the mesh: the
    /// service port the client called).
    ///
    /// - Scheme: the filter's, else the request's (`http` when the request has none).
    /// - Host: the filter's, else the request's (`:authority` or `Host`), without its port.
    /// - Port: the filter's; else the scheme's well-known port (80, 443) when the filter
    ///   sets a scheme; else `listener_port`. It is left out when it is the scheme's
    ///   well-known port.
    /// - Path: changed by the filter's path modifier; the query is kept.
    pub fn location(&self, parts: &Parts, listener_port: u16) -> Result<Redirection, FilterError> {
        let scheme = match self.scheme {
            Some(s) => s.as_str(),
            None => parts.uri.scheme_str().unwrap_or("http"),
        };
        let host = match &self.hostname {
            Some(h) => h.clone(),
            None => request_host(parts).ok_or(FilterError::MissingHost)?,
        };
        let port = match (self.port, self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) => s.well_known_port(),
            (None, None) => listener_port,
        };
        let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
        let path = parts.uri.path();
        let path = match &self.path {
            Some(m) => m.apply(path),
            None => Cow::Borrowed(path),
        };
        let mut location = format!("{scheme}://{host}");
        if !default_port {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(q) = parts.uri.query() {
            location.push('?');
            location.push_str(q);
        }
        let location =
            HeaderValue::try_from(location.as_str()).map_err(|_| FilterError::Invalid {
                what: "Location",
                value: location.clone(),
            })?;
        Ok(Redirection {
            status: self.status,
            location,
        })
    }
}

/// The request's host without the port: from the URI authority (HTTP/2 `:authority`,
/// absolute-form HTTP/1), else the `Host` header. IPv6 literals keep their brackets.
fn request_host(parts: &Parts) -> Option<String> {
    let authority = match parts.uri.authority() {
        Some(a) => a.clone(),
        None => {
            let host = parts.headers.get(HOST)?.to_str().ok()?;
            host.parse::<Authority>().ok()?
        }
    };
    let host = authority.host();
    (!host.is_empty()).then(|| host.to_string())
}

// === impl Rewrite ===

impl Rewrite {
    /// Rewrites the request in place: the `Host` header (and the URI authority, if the
    /// request has one) becomes `hostname`; the path changes as the modifier says, keeping
    /// the query.
    pub fn apply(&self, parts: &mut Parts) -> Result<(), FilterError> {
        if self.hostname.is_none() && self.path.is_none() {
            return Ok(());
        }
        let mut uri = parts.uri.clone().into_parts();
        if let Some(host) = &self.hostname {
            parts.headers.insert(HOST, host.clone());
            if uri.authority.is_some() {
                let authority =
                    Authority::try_from(host.as_bytes()).map_err(|_| FilterError::Invalid {
                        what: "authority",
                        value: String::from_utf8_lossy(host.as_bytes()).into_owned(),
                    })?;
                uri.authority = Some(authority);
            }
        }
        if let Some(modifier) = &self.path {
            let path = modifier.apply(parts.uri.path());
            let path_and_query = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.into_owned(),
            };
            uri.path_and_query = Some(PathAndQuery::try_from(path_and_query.as_str()).map_err(
                |_| FilterError::Invalid {
                    what: "path",
                    value: path_and_query.clone(),
                },
            )?);
        }
        parts.uri = Uri::from_parts(uri).map_err(|e| FilterError::Invalid {
            what: "URI",
            value: e.to_string(),
        })?;
        Ok(())
    }
}

/// Applies the request-side `filters` in order. Returns at the first redirect; otherwise
/// the request has been changed in place and should be forwarded.
pub fn apply_request_filters(
    filters: &[Filter],
    parts: &mut Parts,
    listener_port: u16,
) -> Result<RequestOutcome, FilterError> {
    for f in filters {
        match f {
            Filter::RequestHeaderModifier(m) => m.apply(&mut parts.headers),
            Filter::UrlRewrite(r) => r.apply(parts)?,
            Filter::RequestRedirect(r) => {
                return r
                    .location(parts, listener_port)
                    .map(RequestOutcome::Redirect);
            }
            Filter::ResponseHeaderModifier(_) | Filter::RequestMirror(_) => {}
        }
    }
    Ok(RequestOutcome::Forward)
}

/// Applies the response-side `filters` (`ResponseHeaderModifier`) to response headers.
pub fn apply_response_filters(filters: &[Filter], headers: &mut HeaderMap) {
    for f in filters {
        if let Filter::ResponseHeaderModifier(m) = f {
            m.apply(headers);
        }
    }
}
