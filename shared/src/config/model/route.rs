//! Gateway API `HTTPRoute` and `GRPCRoute` (v1), in the upstream Kubernetes YAML shape.
//!
//! A route is written exactly as for Kubernetes (`apiVersion`, `kind`, `metadata`, `spec`)
//! so the same object works in the file and, later, in the cluster. `metadata` tolerates
//! Kubernetes' own keys; `spec` rejects unknown keys; `status` is accepted and ignored.
//! Field names, defaults and limits follow `sigs.k8s.io/gateway-api/apis/v1`. The types
//! here mirror what users write; [`crate::route`] checks and compiles them.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration::GatewayDuration;
use super::meta::ObjectMeta;

/// The only `apiVersion` accepted for routes.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// An `HTTPRoute` or `GRPCRoute` object.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Name, namespace, labels and age.
    pub metadata: ObjectMeta,
    /// The route itself; its variant is the object's `kind`.
    pub spec: RouteSpec,
}

/// The `spec` of a route, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteSpec {
    /// `kind: HTTPRoute`.
    Http(HttpRouteSpec),
    /// `kind: GRPCRoute`.
    Grpc(GrpcRouteSpec),
}

/// The kind of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RouteKind {
    /// `HTTPRoute`.
    #[serde(rename = "HTTPRoute")]
    Http,
    /// `GRPCRoute`.
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

/// `spec` of an `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The Services (and ports) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Accepted and checked, but not used for matching: GAMMA (GEP-1294) says meshes
    /// SHOULD NOT infer anything from them. Match a `Host` header instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules; omitted means one rule matching every request (and forwarding nowhere).
    #[serde(default = "default_http_rules")]
    pub rules: Vec<HttpRouteRule>,
}

fn default_http_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule::default()]
}

/// One rule of an `HTTPRoute`: matches, then filters, then backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Optional rule name, unique within the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule applies when any match does; none means a `PathPrefix` match on `/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Where matching requests go, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Request and per-try timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (GEP-1731).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
}

/// Conditions that must all hold for a request to match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path condition; absent means `PathPrefix` `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    /// Header conditions, all required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
    /// Query parameter conditions, all required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpQueryParamMatch>,
    /// Method condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// How `value` is compared; default `PathPrefix`.
    #[serde(default)]
    pub r#type: PathMatchType,
    /// The path, prefix or regular expression; default `/`.
    #[serde(default = "default_path")]
    pub value: String,
}

fn default_path() -> String {
    "/".to_string()
}

/// How a path is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path, case-sensitively.
    Exact,
    /// Whole path segments: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
    #[default]
    PathPrefix,
    /// A regular expression (RE2 syntax) matching the whole path.
    RegularExpression,
}

/// A header condition. The name is case-insensitive; only the first of several
/// conditions on the same name counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderMatch {
    /// How `value` is compared; default `Exact`.
    #[serde(default)]
    pub r#type: HeaderMatchType,
    /// Header name.
    pub name: String,
    /// Value, or a regular expression matching the whole value.
    pub value: String,
}

/// A query parameter condition: same shape as a header condition, but the name is
/// compared exactly.
pub type HttpQueryParamMatch = HttpHeaderMatch;

/// How a header, query parameter or gRPC name is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderMatchType {
    /// Equal, case-sensitively.
    #[default]
    Exact,
    /// A regular expression (RE2 syntax) matching the whole value.
    RegularExpression,
}

/// An HTTP method, as Gateway API lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// One filter: `type` names it and the field of the same name configures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// Which filter.
    pub r#type: HttpRouteFilterType,
    /// For `RequestHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    /// For `ResponseHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HttpHeaderFilter>,
    /// For `RequestRedirect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<HttpRequestRedirectFilter>,
    /// For `URLRewrite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<HttpUrlRewriteFilter>,
    /// For `RequestMirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<HttpRequestMirrorFilter>,
}

/// The HTTP filters Ambit implements. (`CORS`, `ExternalAuth` and `ExtensionRef` are
/// refused rather than ignored.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    /// Set, add or remove request headers.
    RequestHeaderModifier,
    /// Set, add or remove response headers.
    ResponseHeaderModifier,
    /// Answer with a redirect.
    RequestRedirect,
    /// Rewrite the host and path before forwarding.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    /// Send a copy of (a share of) requests to another backend; its answer is discarded.
    RequestMirror,
}

/// Header changes. One action per header name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderFilter {
    /// Replace the header's values with this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    /// Append this value to the header's values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Name (case-insensitive).
    pub name: String,
    /// Value.
    pub value: String,
}

/// `RequestRedirect`: answer with a `Location` built from the request and these fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestRedirectFilter {
    /// `http` or `https`; default: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RedirectScheme>,
    /// Host; default: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path change; default: the request's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathModifier>,
    /// Port; default: the scheme's well-known port if `scheme` is set, else the port the
    /// request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

/// Redirect scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    /// `http` (well-known port 80).
    Http,
    /// `https` (well-known port 443).
    Https,
}

/// A path change for a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathModifier {
    /// Which change.
    pub r#type: HttpPathModifierType,
    /// For `ReplaceFullPath`: the new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`: what replaces the matched `PathPrefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// Kinds of path change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpPathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the part matched by the rule's single `PathPrefix` match.
    ReplacePrefixMatch,
}

/// `URLRewrite`: change the host and path before forwarding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpUrlRewriteFilter {
    /// New `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathModifier>,
}

/// `RequestMirror` (Gateway API v1.2 shape): copies of requests go to `backendRef`, whose
/// answers are discarded. At most one of `percent` and `fraction`; neither mirrors every
/// request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestMirrorFilter {
    /// The Service (and port) receiving the copies.
    pub backend_ref: MirrorBackendRef,
    /// Share of requests mirrored, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Share of requests mirrored, `numerator / denominator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<MirrorFraction>,
}

/// The Service a mirror sends to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorBackendRef {
    /// API group: `""` (or `core`) for a Service, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind: `Service`, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Namespace; default: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A share as a fraction; `denominator` defaults to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorFraction {
    /// Requests mirrored per `denominator`.
    pub numerator: u32,
    /// At least 1, and at least `numerator`.
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

/// A backend of an `HTTPRoute` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    /// API group: `""` (or `core`) for a Service, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind: `Service`, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Namespace; default: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port (not target port); required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Share of requests, relative to the other backends; default 1, 0 to 1,000,000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Filters applied only when this backend is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

fn default_weight() -> u32 {
    1
}

/// Timeouts (GEP-1742). `0s` disables one; unset means no timeout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<GatewayDuration>,
    /// Each try to a backend; at most `request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<GatewayDuration>,
}

/// Retries (GEP-1731). Connection failures are always retried when this is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    /// Response status codes (400 to 599) that are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first try; default [`crate::route::DEFAULT_RETRY_ATTEMPTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Least wait between tries; default [`crate::route::DEFAULT_RETRY_BACKOFF`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<GatewayDuration>,
}

/// `spec` of a `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// The Services (and ports) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Accepted and checked, but not used for matching (see [`HttpRouteSpec::hostnames`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One rule of a `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Optional rule name, unique within the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule applies when any match does; none matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<GrpcRouteFilter>,
    /// Where matching requests go, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<GrpcBackendRef>,
}

/// Conditions that must all hold for a gRPC request to match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service and method condition; absent matches every call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) conditions, all required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
}

/// A condition on the gRPC service and method, from `:path` `/<service>/<method>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// How they are compared; default `Exact`.
    #[serde(default)]
    pub r#type: HeaderMatchType,
    /// Fully qualified service, e.g. `grpc.health.v1.Health`; absent matches any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method, e.g. `Check`; absent matches any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// One gRPC filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteFilter {
    /// Which filter.
    pub r#type: GrpcRouteFilterType,
    /// For `RequestHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    /// For `ResponseHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HttpHeaderFilter>,
}

/// The gRPC filters Ambit implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrpcRouteFilterType {
    /// Set, add or remove request metadata.
    RequestHeaderModifier,
    /// Set, add or remove response metadata.
    ResponseHeaderModifier,
}

/// A backend of a `GRPCRoute` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcBackendRef {
    /// API group: `""` (or `core`) for a Service, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind: `Service`, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Namespace; default: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Share of requests; default 1, 0 to 1,000,000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Filters applied only when this backend is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<GrpcRouteFilter>,
}

/// What a route attaches to. For the mesh that is a Service: `group: ""` (the core
/// group; `core` is accepted too) and `kind: Service`. Other parents (a `Gateway`, the
/// default kind) belong to other implementations and are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// API group; default `gateway.networking.k8s.io`, so a Service needs `group: ""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; default `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace; default: the route's. Another namespace makes a consumer route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the parent.
    pub name: String,
    /// For a Service: the name of the port to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// For a Service: the port to attach to; absent means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

// === impl Route ===

impl Route {
    /// `HTTPRoute` or `GRPCRoute`.
    pub fn kind(&self) -> RouteKind {
        match self.spec {
            RouteSpec::Http(_) => RouteKind::Http,
            RouteSpec::Grpc(_) => RouteKind::Grpc,
        }
    }

    /// `namespace/name`, as shown in logs and used to break precedence ties.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// The parents the route asks to attach to.
    pub fn parent_refs(&self) -> &[ParentReference] {
        match &self.spec {
            RouteSpec::Http(s) => &s.parent_refs,
            RouteSpec::Grpc(s) => &s.parent_refs,
        }
    }

    /// The route's `hostnames` (not used for matching in the mesh).
    pub fn hostnames(&self) -> &[String] {
        match &self.spec {
            RouteSpec::Http(s) => &s.hostnames,
            RouteSpec::Grpc(s) => &s.hostnames,
        }
    }
}

// === impl RedirectScheme ===

impl RedirectScheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectScheme::Http => "http",
            RedirectScheme::Https => "https",
        }
    }

    /// 80 or 443.
    pub fn well_known_port(self) -> u16 {
        match self {
            RedirectScheme::Http => 80,
            RedirectScheme::Https => 443,
        }
    }
}

// === impl ParentReference ===

impl ParentReference {
    /// True if this names a Service (`group: ""` or `core`, `kind: Service`).
    pub fn is_service(&self) -> bool {
        is_core_group(self.group.as_deref().unwrap_or("gateway.networking.k8s.io"))
            && self.kind.as_deref().unwrap_or("Gateway") == "Service"
    }

    /// The namespace of the parent, given the route's.
    pub fn namespace_or<'a>(&'a self, route_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(route_namespace)
    }
}

/// True for the Kubernetes core API group: `""`, or `core` as GAMMA's own examples write it.
pub fn is_core_group(group: &str) -> bool {
    group.is_empty() || group == "core"
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        })
    }
}

// The kind selects the type of `spec`, so `Route` is (de)serialized by hand. Keys are read
// in order and `spec` is deserialized in place once `kind` is known, which keeps the
// precise field path in errors (`routes[0].spec.rules[1].matches`). Kubernetes writes
// `kind` before `spec`, and so does any sorted output; a `spec` that comes first is
// buffered and decoded at the end, with its inner path in the message.

#[derive(Deserialize)]
enum ApiVersion {
    #[serde(rename = "gateway.networking.k8s.io/v1")]
    V1,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum RouteField {
    ApiVersion,
    Kind,
    Metadata,
    Spec,
    Status,
}

struct RouteVisitor;

impl<'de> Visitor<'de> for RouteVisitor {
    type Value = Route;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an HTTPRoute or GRPCRoute object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Route, A::Error> {
        let mut api_version = None;
        let mut kind: Option<RouteKind> = None;
        let mut metadata: Option<ObjectMeta> = None;
        let mut spec: Option<RouteSpec> = None;
        let mut early_spec: Option<serde_yaml_ng::Value> = None;
        while let Some(key) = map.next_key::<RouteField>()? {
            match key {
                RouteField::ApiVersion => {
                    let ApiVersion::V1 = map.next_value()?;
                    api_version = Some(());
                }
                RouteField::Kind => kind = Some(map.next_value()?),
                RouteField::Metadata => metadata = Some(map.next_value()?),
                RouteField::Spec => match kind {
                    Some(RouteKind::Http) => spec = Some(RouteSpec::Http(map.next_value()?)),
                    Some(RouteKind::Grpc) => spec = Some(RouteSpec::Grpc(map.next_value()?)),
                    None => early_spec = Some(map.next_value()?),
                },
                RouteField::Status => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?;
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;
        let spec = match (spec, early_spec) {
            (Some(spec), _) => spec,
            (None, Some(value)) => decode_spec(kind, value)?,
            (None, None) => return Err(de::Error::missing_field("spec")),
        };
        Ok(Route { metadata, spec })
    }
}

fn decode_spec<E: de::Error>(kind: RouteKind, value: serde_yaml_ng::Value) -> Result<RouteSpec, E> {
    let spec = match kind {
        RouteKind::Http => serde_path_to_error::deserialize(value).map(RouteSpec::Http),
        RouteKind::Grpc => serde_path_to_error::deserialize(value).map(RouteSpec::Grpc),
    };
    spec.map_err(|e| E::custom(format!("spec.{}: {}", e.path(), e.inner())))
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RouteVisitor)
    }
}

impl Serialize for Route {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Route", 4)?;
        st.serialize_field("apiVersion", GATEWAY_API_VERSION)?;
        st.serialize_field("kind", &self.kind())?;
        st.serialize_field("metadata", &self.metadata)?;
        match &self.spec {
            RouteSpec::Http(spec) => st.serialize_field("spec", spec)?,
            RouteSpec::Grpc(spec) => st.serialize_field("spec", spec)?,
        }
        st.end()
    }
}
