//! Routing: which rule a request matches, where it goes, and with which filters, timeouts
//! and retries.
//!
//! The listener asks a [`RouteTable`] for a [`Route`]; the table is rebuilt from each
//! config snapshot. This module owns the waypoint's internal view of a route, so the proxy
//! does not depend on how routes are configured:
//!
//! - [`DefaultRoutes`]: every request goes to its parent (the service or workload the
//!   client dialled), with the default retry policy and no timeouts. That is what a
//!   waypoint does for a service with no HTTPRoute or GRPCRoute attached.
//! - [`GatewayRoutes`]: the config's Gateway API `HTTPRoute`s and `GRPCRoute`s, selected
//!   by [`ambit_shared::route`] and translated into these types. A service without routes
//!   gets the default route; a service with routes of which none matches gets 404.
//!
//! A route that sets no retry policy gets [`RetryPolicy::default`] (the waypoint's
//! default retries); one that sets `retry` gets exactly its codes, attempts and backoff,
//! plus retries of connection failures.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ambit_shared::config::Config;
use ambit_shared::route::{self as gateway, NoRoute, Parent, Router};
use tracing::warn;

use crate::filters::Filter;
use crate::upstream::retry::RetryPolicy;

/// What the client dialled through the waypoint: the parent of any route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A service VIP and port.
    Service {
        /// Namespace.
        namespace: Arc<str>,
        /// Name.
        name: Arc<str>,
        /// The service port dialled.
        port: u16,
        /// The port on the endpoints.
        target_port: u16,
        /// The port's name, which may declare its protocol (`http`, `grpc-web`, `tcp`).
        port_name: Option<Arc<str>>,
    },
    /// A workload address, directly.
    Workload {
        /// Namespace.
        namespace: Arc<str>,
        /// Workload name.
        name: Arc<str>,
        /// The address and port dialled.
        addr: std::net::SocketAddr,
    },
}

impl Target {
    /// The port the client dialled (a redirect keeps it).
    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } => *port,
            Target::Workload { addr, .. } => addr.port(),
        }
    }

    /// `namespace/name`, naming the destination in logs and retry budgets.
    pub fn key(&self) -> Arc<str> {
        match self {
            Target::Service {
                namespace, name, ..
            }
            | Target::Workload {
                namespace, name, ..
            } => format!("{namespace}/{name}").into(),
        }
    }

    /// The protocol the port's name declares, Istio style (`http`, `http2`, `grpc`,
    /// `tcp`, ... optionally followed by `-suffix`).
    pub fn declared_protocol(&self) -> DeclaredProtocol {
        let Target::Service {
            port_name: Some(name),
            ..
        } = self
        else {
            return DeclaredProtocol::Detect;
        };
        let prefix = name.split('-').next().unwrap_or_default();
        match prefix.to_ascii_lowercase().as_str() {
            "http" | "http2" | "grpc" | "h2c" => DeclaredProtocol::Http,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => DeclaredProtocol::Tcp,
            _ => DeclaredProtocol::Detect,
        }
    }
}

/// What a port name says about the traffic on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclaredProtocol {
    /// HTTP (1.1 or 2): served by the L7 proxy.
    Http,
    /// Opaque TCP: forwarded at L4 without looking.
    Tcp,
    /// Unknown: sniff the first bytes.
    Detect,
}

/// Where a route sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendRef {
    /// The route's parent: the dialled service's endpoints, or the dialled workload.
    Parent,
    /// Another service, by name, on one of its ports.
    Service {
        /// Namespace.
        namespace: Arc<str>,
        /// Name.
        name: Arc<str>,
        /// Service port.
        port: u16,
    },
}

/// One backend of a rule, with its weight and its own filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedBackend {
    /// Where.
    pub backend: BackendRef,
    /// Relative weight; 0 takes no traffic.
    pub weight: u32,
    /// Filters applied only when this backend is chosen.
    pub filters: Vec<Filter>,
}

/// Gateway API timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included (`request`).
    pub request: Option<Duration>,
    /// Each attempt (`backendRequest`).
    pub backend_request: Option<Duration>,
}

/// The route rule a request matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `namespace/route` (or `default`), for logs.
    pub name: Arc<str>,
    /// The rule's filters, in order.
    pub filters: Vec<Filter>,
    /// Backends; empty means the request cannot be served (500, as Gateway API asks).
    pub backends: Vec<WeightedBackend>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries: the rule's, or the default policy.
    pub retry: RetryPolicy,
}

impl Route {
    /// The default route: everything to the parent, default retries, no timeouts.
    pub fn default_for_parent() -> Self {
        Route {
            name: "default".into(),
            filters: Vec::new(),
            backends: vec![WeightedBackend {
                backend: BackendRef::Parent,
                weight: 1,
                filters: Vec::new(),
            }],
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }

    /// Picks a backend by weight; `None` if no backend has weight.
    pub fn pick_backend(&self) -> Option<&WeightedBackend> {
        pick_weighted(&self.backends, fastrand::u64(..u64::MAX))
    }
}

/// Picks the backend `roll` lands on, each owning a share of the range proportional to
/// its weight.
fn pick_weighted(backends: &[WeightedBackend], roll: u64) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = roll % total;
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    None
}

/// A request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// What the client dialled.
    pub target: &'a Target,
    /// The request head.
    pub head: &'a http::request::Parts,
    /// True for gRPC (`content-type: application/grpc...`).
    pub grpc: bool,
    /// The client's namespace (from its identity): consumer routes apply only to it.
    pub client_namespace: Option<&'a str>,
}

/// Selects the route for a request. Implementations are built per config version and
/// must not block.
pub trait RouteTable: fmt::Debug + Send + Sync + 'static {
    /// The matching route, or `None` when routes are attached to the target but none
    /// matches (the client gets 404).
    fn select(&self, req: &RouteRequest<'_>) -> Option<Route>;
}

/// Every request to its parent.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultRoutes;

impl RouteTable for DefaultRoutes {
    fn select(&self, _req: &RouteRequest<'_>) -> Option<Route> {
        Some(Route::default_for_parent())
    }
}

/// The config's Gateway API routes.
#[derive(Debug, Default)]
pub struct GatewayRoutes {
    router: Router,
}

impl GatewayRoutes {
    /// Compiles the routes of `config`. Routes left out (they do not compile, or lose to
    /// a GRPCRoute on the same port) are logged.
    pub fn new(config: &Config) -> Self {
        let router = Router::new(config);
        for r in router.rejections() {
            warn!(route = %r.route, kind = ?r.kind, reason = %r.reason, "route left out");
        }
        GatewayRoutes { router }
    }
}

impl RouteTable for GatewayRoutes {
    fn select(&self, req: &RouteRequest<'_>) -> Option<Route> {
        // Routes attach to services; a workload dialled directly goes straight to it.
        let Target::Service {
            namespace,
            name,
            port,
            ..
        } = req.target
        else {
            return Some(Route::default_for_parent());
        };
        let parent = Parent {
            namespace,
            name,
            port: *port,
        };
        let request = gateway::Request::from_parts(req.head, req.client_namespace);
        match gateway::select(&self.router, parent, &request) {
            Ok(selected) => Some(translate(selected.route, selected.rule)),
            Err(NoRoute::Unrouted) => Some(Route::default_for_parent()),
            Err(NoRoute::NoMatch) => None,
        }
    }
}

/// A selected Gateway API rule in the waypoint's terms.
fn translate(route: &str, rule: &gateway::RouteRule) -> Route {
    let name = match &rule.name {
        Some(r) => format!("{route}/{r}"),
        None => route.to_string(),
    };
    Route {
        name: name.into(),
        filters: rule.filters.clone(),
        backends: rule
            .backends
            .iter()
            .map(|b| WeightedBackend {
                backend: BackendRef::Service {
                    namespace: b.namespace.as_str().into(),
                    name: b.name.as_str().into(),
                    port: b.port,
                },
                weight: b.weight,
                filters: b.filters.clone(),
            })
            .collect(),
        timeouts: Timeouts {
            request: rule.timeouts.request,
            backend_request: rule.timeouts.backend_request,
        },
        retry: match &rule.retry {
            Some(r) => RetryPolicy::with_codes(r.attempts, Some(r.backoff), r.codes.clone()),
            None => RetryPolicy::default(),
        },
    }
}

#[cfg(test)]
mod tests;
