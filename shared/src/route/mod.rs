//! L7 routing: Gateway API `HTTPRoute` and `GRPCRoute` compiled per Service port, and a pure
//! [`select`] from a request to a route rule.
//!
//! Build a [`Router`] once per config, then for each request call [`select`] with the
//! parent (the Service and port the client called) and a view of the request. The result
//! is the winning rule: its filters, weighted backends, timeouts and retry policy. Pick a
//! backend with [`choose_backend`] and apply filters with [`apply_request_filters`] and
//! [`apply_response_filters`]. Nothing here does I/O or draws random numbers.
//!
//! # Semantics
//! - **Attachment** (GAMMA, GEP-1294). A route attaches to a Service through a `parentRefs`
//!   entry with `group: ""` and `kind: Service`, on one port (`port` or `sectionName`) or
//!   on all of them. A route in the Service's namespace is a *producer* route and applies
//!   to every client; a route in another namespace is a *consumer* route and applies only
//!   to clients in that namespace. A client whose namespace has consumer routes for the
//!   port uses those only; other clients use the producer routes.
//! - **Kinds.** If both `GRPCRoute`s and `HTTPRoute`s attach to one Service port, the
//!   `GRPCRoute`s win and the `HTTPRoute`s are ignored there ([`Router::rejections`]).
//! - **No routes, no match.** With no route attached, the request goes to the parent
//!   Service as if there were no routes ([`NoRoute::Unrouted`], [`default_route`]). With
//!   routes attached but none matching, it is rejected with 404 ([`NoRoute::NoMatch`]).
//! - **Precedence.** Across all rules of the applicable routes, the most specific match
//!   wins. `HTTPRoute`: an `Exact` path, then the longest `PathPrefix`, then (Ambit's
//!   choice, as Istio's) the longest `RegularExpression`; then a method match; then the
//!   most header matches; then the most query parameter matches. `GRPCRoute`: the most
//!   characters in the service, then in the method, then the most header matches. Ties go
//!   to the oldest route (`metadata.creationTimestamp`; routes without one count as
//!   newest), then to the first by `namespace/name`, then to the first rule and match.
//! - **Hostnames** are checked but not used: GEP-1294 says meshes should not infer
//!   anything from them. Match the `Host` header instead.
//! - **Regular expressions** use the `regex` crate's syntax (close to RE2) and must match
//!   the whole path, value or name.
//! - **Query parameters** are percent-decoded; a repeated parameter matches on its first
//!   value. Repeated headers are joined with `,`.
//!
//! # Example
//! ```
//! use std::path::Path;
//! use ambit_shared::config::parse_str;
//! use ambit_shared::route::{Parent, Request, Router, choose_backend, select};
//!
//! let config = parse_str(Path::new("example.yaml"), r#"
//! trustDomain: cluster.local
//! namespaces: [{ name: shop }]
//! services:
//!   - { name: web, namespace: shop, ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.1 }] }
//!   - { name: web-v2, namespace: shop, ports: [{ port: 80 }], endpoints: [{ ip: 10.0.0.2 }] }
//! routes:
//!   - apiVersion: gateway.networking.k8s.io/v1
//!     kind: HTTPRoute
//!     metadata: { name: web, namespace: shop }
//!     spec:
//!       parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
//!       rules:
//!         - matches: [{ path: { type: PathPrefix, value: /v2 } }]
//!           backendRefs: [{ name: web-v2, port: 80 }]
//!         - backendRefs: [{ name: web, port: 80 }]
//! "#).expect("valid config");
//! let router = Router::new(&config);
//!
//! let req = http::Request::get("http://web.shop/v2/cart").body(()).expect("request");
//! let (parts, _) = req.into_parts();
//! let parent = Parent { namespace: "shop", name: "web", port: 80 };
//! let selected = select(&router, parent, &Request::from_parts(&parts, None)).expect("a route");
//! assert_eq!(selected.route, "shop/web");
//! let backend = choose_backend(&selected.rule.backends, 42).expect("a backend");
//! assert_eq!(backend.name, "web-v2");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use http::request::Parts;
use http::{Method, StatusCode};

use crate::config::model::{Config, ParentReference, RouteKind, Service};

mod backend;
mod compile;
mod filters;
mod matching;

pub use backend::choose_backend;
pub use compile::{CompileError, CompiledRoute, compile};
pub use filters::{
    Filter, FilterError, HeaderModifier, Mirror, PathModifier, Redirect, Redirection,
    RequestOutcome, Rewrite, apply_request_filters, apply_response_filters, replace_prefix,
};
pub use matching::grpc_method;

use matching::{Ranked, RequestView, precedence};

/// Retries after the first try when a route's `retry` leaves out `attempts` (Istio's default).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Least wait between tries when a route's `retry` leaves out `backoff` (Envoy's default).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// Largest compiled size of one regular expression, so a route cannot make the proxy
/// spend unbounded memory or time on matching.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The Service and port a request was sent to: the parent whose routes apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parent<'a> {
    /// Service namespace.
    pub namespace: &'a str,
    /// Service name.
    pub name: &'a str,
    /// Service port the client called.
    pub port: u16,
}

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path without the query, as the proxy will forward it (normalize first, if at all).
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The client's namespace (from its identity): consumer routes apply only to it.
    pub client_namespace: Option<&'a str>,
}

/// The rule a request matched, or the default route: what to do with the request.
///
/// A rule with no backend of positive weight (and no redirect) must fail the request with
/// 500 (HTTP) or `UNAVAILABLE` (gRPC); [`choose_backend`] returns `None` for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// The rule's name, if it has one.
    pub name: Option<String>,
    /// Filters, in order.
    pub filters: Vec<Filter>,
    /// Backends and their weights.
    pub backends: Vec<Backend>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retry policy; `None`: no retries.
    pub retry: Option<Retry>,
}

/// A backend Service port and its share of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Weight relative to the rule's other backends; 0 is never chosen.
    pub weight: u32,
    /// Filters applied, after the rule's, only when this backend is chosen.
    pub filters: Vec<Filter>,
}

/// Timeouts; `None` means no limit (the field was unset or `0s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries and backoff included.
    pub request: Option<Duration>,
    /// Each try to a backend.
    pub backend_request: Option<Duration>,
}

/// A retry policy (GEP-1731).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Response codes that are retried. Connection failures are always retried.
    pub codes: Vec<StatusCode>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Least wait before each retry.
    pub backoff: Duration,
}

/// The outcome of routing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected<'r> {
    /// The route, as `namespace/name`.
    pub route: &'r str,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    /// Index of the matched rule in the route.
    pub rule_index: usize,
    /// The matched rule.
    pub rule: &'r RouteRule,
}

/// Why no route was selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No route attaches to this parent (for this client): send the request to the parent
    /// Service itself, with [`default_route`].
    Unrouted,
    /// Routes attach to this parent but none matches: reject the request with 404.
    NoMatch,
}

/// A route (or one of its attachments) that the router left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `namespace/name`.
    pub route: String,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    /// Why, in words an operator can act on.
    pub reason: String,
}

/// The compiled routes of a config, indexed by parent Service port.
#[derive(Debug, Default)]
pub struct Router {
    /// Service namespace → service name → port → routes.
    services: HashMap<String, HashMap<String, BTreeMap<u16, PortRoutes>>>,
    rejections: Vec<Rejection>,
}

/// The routes of one Service port.
#[derive(Debug, Default)]
struct PortRoutes {
    /// Routes in the Service's namespace.
    producer: Option<Table>,
    /// Routes in other namespaces, by namespace.
    consumers: BTreeMap<String, Table>,
}

/// Every match of a group of routes, most specific first.
#[derive(Debug)]
struct Table {
    candidates: Vec<Candidate>,
}

#[derive(Debug)]
struct Candidate {
    route: Arc<CompiledRoute>,
    rule: usize,
    matcher: usize,
}

// === impl Request ===

impl<'a> Request<'a> {
    /// The routing view of a request's head.
    pub fn from_parts(parts: &'a Parts, client_namespace: Option<&'a str>) -> Self {
        Request {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            client_namespace,
        }
    }
}

// === impl NoRoute ===

impl NoRoute {
    /// The status to answer with: 404 for [`NoRoute::NoMatch`]; `None` (forward with
    /// [`default_route`]) for [`NoRoute::Unrouted`].
    pub fn status(self) -> Option<StatusCode> {
        match self {
            NoRoute::Unrouted => None,
            NoRoute::NoMatch => Some(StatusCode::NOT_FOUND),
        }
    }
}

// === impl Retry ===

impl Retry {
    /// True if a response with `status` should be retried.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        self.codes.contains(&status)
    }
}

/// The route used when no route attaches to `parent`: everything goes to the parent
/// Service itself, on the same port, with no filters, timeouts or retries.
pub fn default_route(parent: Parent<'_>) -> RouteRule {
    RouteRule {
        name: None,
        filters: Vec::new(),
        backends: vec![Backend {
            namespace: parent.namespace.to_string(),
            name: parent.name.to_string(),
            port: parent.port,
            weight: 1,
            filters: Vec::new(),
        }],
        timeouts: Timeouts::default(),
        retry: None,
    }
}

/// Routes a request sent to `parent`: the most specific matching rule of the routes that
/// apply to this client (see the [module docs](self) for the rules).
pub fn select<'r>(
    router: &'r Router,
    parent: Parent<'_>,
    req: &Request<'_>,
) -> Result<Selected<'r>, NoRoute> {
    let routes = router
        .services
        .get(parent.namespace)
        .and_then(|names| names.get(parent.name))
        .and_then(|ports| ports.get(&parent.port))
        .ok_or(NoRoute::Unrouted)?;
    let table = req
        .client_namespace
        .and_then(|ns| routes.consumers.get(ns))
        .or(routes.producer.as_ref())
        .ok_or(NoRoute::Unrouted)?;
    let view = RequestView::new(req);
    for c in &table.candidates {
        let Some(rule) = c.route.rules.get(c.rule) else {
            continue;
        };
        if rule
            .matches
            .get(c.matcher)
            .is_some_and(|m| m.matches(&view))
        {
            return Ok(Selected {
                route: &c.route.name,
                kind: c.route.kind,
                rule_index: c.rule,
                rule: &rule.rule,
            });
        }
    }
    Err(NoRoute::NoMatch)
}

/// The ports of `service` that parent reference `p` attaches to, or the field of `p` that
/// is wrong and why.
pub fn attached_ports(
    service: &Service,
    p: &ParentReference,
) -> Result<Vec<u16>, (&'static str, String)> {
    let id = format!("{}/{}", service.namespace, service.name);
    let named = |n: &str| {
        service
            .ports
            .iter()
            .find(|sp| sp.name.as_deref() == Some(n))
    };
    match (p.port, p.section_name.as_deref()) {
        (None, None) => {
            let mut ports: Vec<u16> = service.ports.iter().map(|sp| sp.port).collect();
            ports.sort_unstable();
            ports.dedup();
            Ok(ports)
        }
        (Some(port), None) => {
            if service.ports.iter().any(|sp| sp.port == port) {
                Ok(vec![port])
            } else {
                Err(("port", format!("service `{id}` has no port {port}")))
            }
        }
        (port, Some(name)) => match (named(name), port) {
            (None, _) => Err((
                "sectionName",
                format!("service `{id}` has no port named `{name}`"),
            )),
            (Some(sp), Some(port)) if sp.port != port => Err((
                "port",
                format!("port `{name}` of service `{id}` is {}, not {port}", sp.port),
            )),
            (Some(sp), _) => Ok(vec![sp.port]),
        },
    }
}

// === impl Router ===

impl Router {
    /// Compiles the routes of `config` and attaches them to their parent Service ports.
    ///
    /// Never fails: a route that does not compile, or a parent that does not resolve, is
    /// left out and reported in [`Router::rejections`], as Kubernetes would report it in
    /// the route's status. (A config loaded from a file has been validated, so nothing is
    /// left out of it but `HTTPRoute`s that lose to `GRPCRoute`s.)
    pub fn new(config: &Config) -> Router {
        let mut rejections = Vec::new();
        // (service namespace, service name, port, route namespace) → routes.
        let mut groups: BTreeMap<(String, String, u16, String), Vec<Arc<CompiledRoute>>> =
            BTreeMap::new();
        for route in &config.routes {
            let compiled = match compile(route) {
                Ok(c) => Arc::new(c),
                Err((field, reason)) => {
                    rejections.push(Rejection {
                        route: route.qualified_name(),
                        kind: route.kind(),
                        reason: format!("field `{field}`: {reason}"),
                    });
                    continue;
                }
            };
            for p in &compiled.parents {
                let svc_ns = p.namespace_or(&compiled.namespace);
                let Some(service) = config.service(svc_ns, &p.name) else {
                    rejections.push(Rejection {
                        route: compiled.name.clone(),
                        kind: compiled.kind,
                        reason: format!("parent service `{svc_ns}/{}` does not exist", p.name),
                    });
                    continue;
                };
                let ports = match attached_ports(service, p) {
                    Ok(ports) => ports,
                    Err((_, reason)) => {
                        rejections.push(Rejection {
                            route: compiled.name.clone(),
                            kind: compiled.kind,
                            reason,
                        });
                        continue;
                    }
                };
                for port in ports {
                    let key = (
                        svc_ns.to_string(),
                        p.name.clone(),
                        port,
                        compiled.namespace.clone(),
                    );
                    let group = groups.entry(key).or_default();
                    if !group.iter().any(|r| Arc::ptr_eq(r, &compiled)) {
                        group.push(compiled.clone());
                    }
                }
            }
        }
        let mut services: HashMap<String, HashMap<String, BTreeMap<u16, PortRoutes>>> =
            HashMap::new();
        for ((svc_ns, svc_name, port, route_ns), mut routes) in groups {
            if routes.iter().any(|r| r.kind == RouteKind::Grpc) {
                routes.retain(|r| {
                    let keep = r.kind == RouteKind::Grpc;
                    if !keep {
                        rejections.push(Rejection {
                            route: r.name.clone(),
                            kind: r.kind,
                            reason: format!(
                                "ignored on service `{svc_ns}/{svc_name}` port {port}: a GRPCRoute \
                                 attaches there too, and GRPCRoute takes precedence (GEP-1294)"
                            ),
                        });
                    }
                    keep
                });
            }
            let table = Table::new(routes);
            let port_routes = services
                .entry(svc_ns.clone())
                .or_default()
                .entry(svc_name)
                .or_default()
                .entry(port)
                .or_default();
            if route_ns == svc_ns {
                port_routes.producer = Some(table);
            } else {
                port_routes.consumers.insert(route_ns, table);
            }
        }
        Router {
            services,
            rejections,
        }
    }

    /// Routes (or attachments of routes) left out, and why.
    pub fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// True if any route attaches to some port of service `namespace/name`.
    pub fn has_routes(&self, namespace: &str, name: &str) -> bool {
        self.services
            .get(namespace)
            .is_some_and(|names| names.contains_key(name))
    }
}

// === impl Table ===

impl Table {
    fn new(routes: Vec<Arc<CompiledRoute>>) -> Table {
        let mut candidates = Vec::new();
        for route in routes {
            for (r, rule) in route.rules.iter().enumerate() {
                for m in 0..rule.matches.len() {
                    candidates.push(Candidate {
                        route: route.clone(),
                        rule: r,
                        matcher: m,
                    });
                }
            }
        }
        candidates.sort_by(|a, b| precedence(&a.ranked(), &b.ranked()));
        Table { candidates }
    }
}

impl Candidate {
    fn ranked(&self) -> Ranked<'_> {
        let specificity = self
            .route
            .rules
            .get(self.rule)
            .and_then(|r| r.matches.get(self.matcher))
            .map(|m| m.specificity())
            .unwrap_or(matching::Specificity([0; 5]));
        Ranked {
            specificity,
            created: self.route.created.as_ref(),
            name: &self.route.name,
            position: (self.rule, self.matcher),
        }
    }
}

#[cfg(test)]
mod tests;
