//! The configuration model, as written in YAML (camelCase keys, unknown keys rejected).
//!
//! Gateway API routes ([`route`]) keep their upstream Kubernetes shape, with [`meta`] for
//! their `metadata` and [`duration`] for Gateway API durations.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NONE, WAYPOINT_NAME_LABEL,
};
use crate::identity::{Identity, IdentityError};

pub mod duration;
pub mod meta;
pub mod route;
pub mod traffic;

pub use duration::{DurationError, GatewayDuration};
pub use meta::{ObjectMeta, Timestamp, TimestampError};
pub use route::{
    GATEWAY_API_VERSION, GrpcBackendRef, GrpcMethodMatch, GrpcRouteFilter, GrpcRouteFilterType,
    GrpcRouteMatch, GrpcRouteRule, GrpcRouteSpec, HeaderMatchType, HttpBackendRef, HttpHeader,
    HttpHeaderFilter, HttpHeaderMatch, HttpMethod, HttpPathMatch, HttpPathModifier,
    HttpPathModifierType, HttpQueryParamMatch, HttpRequestMirrorFilter, HttpRequestRedirectFilter,
    HttpRouteFilter, HttpRouteFilterType, HttpRouteMatch, HttpRouteRetry, HttpRouteRule,
    HttpRouteSpec, HttpRouteTimeouts, HttpUrlRewriteFilter, MirrorBackendRef, MirrorFraction,
    ParentReference, PathMatchType, RedirectScheme, Route, RouteKind, RouteSpec, is_core_group,
};
pub use traffic::{
    ConnectionPool, FaultAbort, FaultDelay, FaultInjection, GATEWAY_API_GROUP, OutlierDetection,
    PolicyTargetRef, RateLimit, TrafficPolicy,
};

/// The whole configuration: what the mesh knows about namespaces, workloads and services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Namespaces and their labels. A workload's namespace must be listed here.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// Workloads (pods or VMs).
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services: virtual IPs in front of workloads.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Authorization policies: enforced by the destination's node tunnel (L4), or, for
    /// workloads behind a waypoint, by the waypoint (L4 and L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Whether plaintext is accepted (PERMISSIVE) or refused (STRICT), per scope.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Waypoint proxies: per-namespace L7 proxies that services opt into with
    /// `ambit.dev/use-waypoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<Waypoint>,
    /// Gateway API `HTTPRoute` and `GRPCRoute` objects attached to services, applied by
    /// the services' waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Resilience settings (circuit breaking, outlier detection, rate limits, faults) for
    /// services and routes, enforced by waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic_policies: Vec<TrafficPolicy>,
}

/// A waypoint: the L7 proxy of a namespace.
///
/// Its pods are the workloads in `namespace` labelled
/// `gateway.networking.k8s.io/gateway-name: <name>` ([`WAYPOINT_NAME_LABEL`]), as Kubernetes
/// labels the pods of a Gateway's deployment. They run as `serviceAccount`, which gives the
/// waypoint its identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Waypoint {
    /// Name, unique within the namespace; the value services and namespaces put in
    /// `ambit.dev/use-waypoint`.
    pub name: String,
    /// Namespace the waypoint serves and runs in.
    pub namespace: String,
    /// Service account of the waypoint's pods; default: the waypoint's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A namespace and its labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Labels, e.g. `ambit.dev/dataplane-mode: ambient`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A workload: a pod, or a VM that joined the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Workload name, unique within its namespace.
    pub name: String,
    /// Namespace it runs in.
    pub namespace: String,
    /// Service account; the identity is derived from it.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Addresses of the workload; at least one, unique across the mesh.
    pub ips: Vec<IpAddr>,
    /// Node the workload runs on; its node tunnel serves it.
    pub node: String,
    /// Labels, matched by service selectors; `ambit.dev/dataplane-mode: none` opts out.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_service_account() -> String {
    "default".to_string()
}

/// A service: virtual IPs and ports in front of a set of endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name, unique within its namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual IPs.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Ports the service exposes.
    pub ports: Vec<ServicePort>,
    /// Label selector picking workloads in the same namespace. Exclusive with `endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Explicit endpoints. Exclusive with `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointRef>>,
    /// Labels, e.g. `ambit.dev/use-waypoint`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Optional port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port on the VIP.
    pub port: u16,
    /// Port on the endpoints; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// An explicit service endpoint: a workload by name (same namespace) or a bare IP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointRef {
    /// Name of a workload in the service's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// A bare address outside the mesh's workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

/// Where a policy applies: the whole mesh, a namespace, or selected workloads in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every workload (no `namespace`).
    Mesh,
    /// Every workload in the policy's namespace (no `selector`).
    Namespace,
    /// Workloads in the policy's namespace whose labels match the selector.
    Workload,
}

/// An authorization policy. Its L7 fields (methods, paths, hosts, `when`) need a waypoint
/// in front of the workloads it selects; without one, such a policy fails closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Policy name, unique within its namespace (or the mesh); shown in logs.
    pub name: String,
    /// Namespace the policy applies to; absent for a mesh-wide policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels of the destination workloads it applies to (needs `namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// What a match does.
    pub action: Action,
    /// Evaluate and log, but never enforce.
    #[serde(default)]
    pub dry_run: bool,
    /// The policy matches when any rule matches. An empty list matches nothing; a rule
    /// `{}` matches everything.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Connections must match one ALLOW policy, when any applies.
    Allow,
    /// A matching connection is refused.
    Deny,
    /// A matching connection is logged; the verdict is unchanged.
    Audit,
}

/// One rule: every non-empty part must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources; any may match. Empty means any source.
    #[serde(default)]
    pub from: Vec<Source>,
    /// Destinations; any may match. Empty means any destination.
    #[serde(default)]
    pub to: Vec<Operation>,
    /// L7 conditions; all must hold. Only a waypoint can check these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// An L7 condition on a request attribute (Istio's `when`).
///
/// `key` is `request.headers[<name>]` (header names are case-insensitive). The condition
/// holds when the value matches one of `values` (if set) and none of `notValues`. Values
/// may start or end with `*`, as in paths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute, e.g. `request.headers[x-tenant]`.
    pub key: String,
    /// Accepted values; empty means any value, as long as the attribute is present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Refused values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// Conditions on the source; all set fields must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE identities; `*` may start or end a pattern.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Source namespaces (from the peer identity).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Source service accounts as `namespace/name`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Source addresses, as CIDRs or single IPs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

/// Conditions on the destination; all set fields must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Negated `ports`.
    #[serde(default)]
    pub not_ports: Vec<u16>,
    /// Destination addresses, as CIDRs or single IPs.
    #[serde(default)]
    pub destination_ips: Vec<String>,
    /// Negated `destinationIps`.
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    /// L7: HTTP methods. Only a waypoint can check these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// L7: negated `methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// L7: HTTP paths: exact (`/healthz`), prefix (`/v1/*`), suffix (`*.json`) or any
    /// (`*`). Only a waypoint can check these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// L7: negated `paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// L7: HTTP hosts (`:authority` without port), with the same `*` patterns as paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// L7: negated `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

/// Peer authentication: does a workload accept plaintext?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// Name, shown in logs.
    pub name: String,
    /// Namespace; absent for mesh-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels of the workloads it applies to (needs `namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// The mode.
    pub mode: PeerAuthMode,
}

/// Whether plaintext inbound is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerAuthMode {
    /// mTLS and plaintext are both accepted (the default).
    #[default]
    Permissive,
    /// Only mTLS (HBONE) is accepted.
    Strict,
}

/// Scope of a policy with an optional namespace and selector.
pub fn scope_of(namespace: Option<&str>, selector: Option<&BTreeMap<String, String>>) -> Scope {
    match (namespace, selector) {
        (None, _) => Scope::Mesh,
        (Some(_), None) => Scope::Namespace,
        (Some(_), Some(_)) => Scope::Workload,
    }
}

/// True if a policy with this namespace and selector applies to workload `w`.
pub fn applies_to(
    namespace: Option<&str>,
    selector: Option<&BTreeMap<String, String>>,
    w: &Workload,
) -> bool {
    match namespace {
        None => true,
        Some(ns) if ns != w.namespace => false,
        Some(_) => selector.is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))),
    }
}

// === impl Operation ===

impl Operation {
    /// The L7 fields this operation sets, which an L4 proxy cannot evaluate.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.methods.is_empty() {
            out.push("methods");
        }
        if !self.paths.is_empty() {
            out.push("paths");
        }
        if !self.hosts.is_empty() {
            out.push("hosts");
        }
        if !self.not_methods.is_empty() {
            out.push("notMethods");
        }
        if !self.not_paths.is_empty() {
            out.push("notPaths");
        }
        if !self.not_hosts.is_empty() {
            out.push("notHosts");
        }
        out
    }
}

// === impl Config ===

impl Config {
    /// The namespace called `name`, if declared.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    /// The peer-authentication mode for `w`: the most specific policy wins (workload,
    /// then namespace, then mesh); PERMISSIVE when none applies.
    pub fn peer_auth_mode(&self, w: &Workload) -> (PeerAuthMode, Option<&PeerAuthentication>) {
        self.peer_authentications
            .iter()
            .filter(|p| applies_to(p.namespace.as_deref(), p.selector.as_ref(), w))
            .max_by_key(|p| scope_of(p.namespace.as_deref(), p.selector.as_ref()))
            .map(|p| (p.mode, Some(p)))
            .unwrap_or((PeerAuthMode::Permissive, None))
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.ips.contains(&ip))
    }

    /// True if the workload is in the mesh: its namespace carries
    /// `ambit.dev/dataplane-mode=ambient` and the workload does not opt out.
    pub fn is_enrolled(&self, w: &Workload) -> bool {
        let ns_ambient = self
            .namespace(&w.namespace)
            .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT);
        let opted_out = w
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == DATAPLANE_MODE_NONE);
        ns_ambient && !opted_out
    }

    /// The SPIFFE identity of a workload. Always `Ok` for a config that passed
    /// validation; the `Result` guards configs built by hand.
    pub fn identity_of(&self, w: &Workload) -> Result<Identity, IdentityError> {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
    }

    /// The service `namespace/name`, if declared.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// The waypoint `namespace/name`, if declared.
    pub fn waypoint(&self, namespace: &str, name: &str) -> Option<&Waypoint> {
        self.waypoints
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The waypoint that traffic to `s` goes through, if any.
    ///
    /// The service's `ambit.dev/use-waypoint` label decides first, then its namespace's.
    /// The value names a waypoint in the service's namespace; `none` on the service opts it
    /// out of its namespace's waypoint.
    pub fn waypoint_for_service(&self, s: &Service) -> Option<&Waypoint> {
        let label = s.labels.get(USE_WAYPOINT_LABEL).or_else(|| {
            self.namespace(&s.namespace)
                .and_then(|n| n.labels.get(USE_WAYPOINT_LABEL))
        })?;
        if label == USE_WAYPOINT_NONE {
            return None;
        }
        self.waypoint(&s.namespace, label)
    }

    /// The pods of waypoint `w`: the workloads in its namespace labelled
    /// `gateway.networking.k8s.io/gateway-name: <w.name>`.
    pub fn waypoint_workloads<'a>(&'a self, w: &'a Waypoint) -> impl Iterator<Item = &'a Workload> {
        self.workloads.iter().filter(move |p| {
            p.namespace == w.namespace
                && p.labels
                    .get(WAYPOINT_NAME_LABEL)
                    .is_some_and(|n| *n == w.name)
        })
    }

    /// The SPIFFE identity waypoint `w` runs as. Always `Ok` for a config that passed
    /// validation.
    pub fn waypoint_identity(&self, w: &Waypoint) -> Result<Identity, IdentityError> {
        Identity::new(&self.trust_domain, &w.namespace, w.service_account())
    }
}

// === impl Waypoint ===

impl Waypoint {
    /// The service account of the waypoint's pods: `serviceAccount`, else its name.
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }
}
