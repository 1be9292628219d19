//! `TrafficPolicy`: Ambit's resilience settings, attached to a Service or a route, and
//! how strictly request paths to a Service are read.
//!
//! Attachment follows Gateway API policy attachment ([GEP-713]): `targetRefs` name objects
//! in the policy's own namespace. Settings that guard a destination (connection pool,
//! outlier detection) attach to a Service; settings that shape requests (rate limit,
//! fault injection) attach to a Service or to an `HTTPRoute`/`GRPCRoute`, optionally one
//! named rule of it (`sectionName`).
//!
//! [GEP-713]: https://gateway-api.sigs.k8s.io/geps/gep-713/

use serde::{Deserialize, Serialize};

use super::duration::GatewayDuration;

/// The Gateway API group, which routes belong to.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// Resilience settings for the services or routes it targets; enforced by waypoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Name, unique within the namespace; shown in logs and metrics.
    pub name: String,
    /// Namespace of the policy and of everything it targets.
    pub namespace: String,
    /// What it applies to; at least one.
    pub target_refs: Vec<PolicyTargetRef>,
    /// Circuit-breaking limits per destination service (Service targets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints (Service targets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Local token-bucket rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Injected delays and aborts, for testing resilience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultInjection>,
    /// Accept request paths with parameters (`;`, or `%3B`, in a segment, as in
    /// `/cart;jsessionid=1`) to the Services it targets (Service targets only). Default
    /// false: the waypoint answers them 400, because Tomcat and Spring read `/admin;x` and
    /// `/x/..;/admin` as `/admin`, which rules written for `/admin` would otherwise miss.
    /// When true, such paths are forwarded as sent and authorization matches every
    /// segment without its parameters, as those servers do. It is decided for the Service
    /// the client dialled, before routing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_path_parameters: bool,
}

/// A policy's target, in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// `""` (or absent) for a Service; `gateway.networking.k8s.io` for routes.
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// Name of the object.
    pub name: String,
    /// For a route: the name of one rule (`rules[].name`); absent means every rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Circuit-breaking limits for one destination service, across all its endpoints.
/// An absent limit is unlimited. Overflow answers 503 with response flag `UO`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Upstream HTTP connections open to the service's endpoints at once, idle keep-alive
    /// ones included (per waypoint replica). A request that needs a new connection when
    /// the limit is reached waits, as a pending request, until one is free or the connect
    /// timeout passes (then `UO`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection because of `maxConnections`; over it, `UO` at
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight at once (until the response body ends); over it, `UO` at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight at once; a retry over it is not made, and the failure it would
    /// have retried is returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// Outlier detection: endpoints that keep failing are ejected from balancing for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures) that eject an endpoint; 0 disables.
    #[serde(default = "default_consecutive_5xx", rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    /// Consecutive 502, 503, 504 or connect failures that eject an endpoint; 0 disables.
    #[serde(default)]
    pub consecutive_gateway_errors: u32,
    /// How often ejections are decided and expired ejections lifted; default 10s.
    #[serde(default = "default_interval")]
    pub interval: GatewayDuration,
    /// Ejection time for a first ejection; the n-th ejection in a row lasts n times this.
    /// Default 30s.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: GatewayDuration,
    /// At most this percentage (0 to 100) of a service's endpoints are ejected at once;
    /// default 10, and at least one endpoint may always be ejected.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

/// A local token bucket. Requests over the limit get 429 with `retry-after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added every `interval`.
    pub requests: u32,
    /// Refill period; default 1s.
    #[serde(default = "default_rate_interval")]
    pub interval: GatewayDuration,
    /// Bucket size; default `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per source identity instead of one for the whole target.
    #[serde(default)]
    pub per_source: bool,
}

/// Fault injection: delays and aborts for a share of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjection {
    /// Hold requests before forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer requests without forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    pub fixed_delay: GatewayDuration,
    /// Share of requests delayed, 0 to 100 (fractions allowed).
    pub percentage: f64,
}

/// Injected abort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// HTTP status answered, 200 to 599.
    pub http_status: u16,
    /// Share of requests aborted, 0 to 100 (fractions allowed).
    pub percentage: f64,
}

fn default_consecutive_5xx() -> u32 {
    5
}

fn default_max_ejection_percent() -> u32 {
    10
}

fn duration(text: &str) -> GatewayDuration {
    // The literals passed here are valid Gateway API durations.
    text.parse().unwrap_or_else(|_| unreachable!("{text}"))
}

fn default_interval() -> GatewayDuration {
    duration("10s")
}

fn default_base_ejection() -> GatewayDuration {
    duration("30s")
}

fn default_rate_interval() -> GatewayDuration {
    duration("1s")
}

// === impl PolicyTargetRef ===

impl PolicyTargetRef {
    /// True for a `Service` in the core group.
    pub fn is_service(&self) -> bool {
        super::is_core_group(&self.group) && self.kind == "Service"
    }

    /// True for an `HTTPRoute` or `GRPCRoute` in the Gateway API group.
    pub fn is_route(&self) -> bool {
        self.group == GATEWAY_API_GROUP && (self.kind == "HTTPRoute" || self.kind == "GRPCRoute")
    }
}
