//! Ambit's configuration model and its YAML file source.
//!
//! [`model`] holds the serde types exactly as users write them (Gateway API routes in
//! their upstream Kubernetes shape); [`file`](mod@file) reads and validates a file into a
//! [`Config`], reporting the file, the field and the reason for anything wrong, after
//! [`limits`] has refused files too large or too deeply nested to parse cheaply. Everything
//! downstream works on a validated [`Config`].

pub mod file;
pub mod index;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod limits;
pub mod model;
pub mod source;
pub mod watch;

pub use file::{
    ConfigError, InvalidField, load_file, load_file_with, parse_str, parse_str_with,
    validate_config,
};
pub use limits::Limits;
pub use model::{
    Action, AuthorizationPolicy, Config, EndpointRef, GatewayDuration, Namespace, ObjectMeta,
    Operation, ParentReference, PeerAuthMode, PeerAuthentication, Protocol, Route, RouteKind,
    RouteSpec, Rule, Scope, Service, ServicePort, Source, Waypoint, Workload,
};

/// Namespace (or pod) label that opts workloads into the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod (or namespace) out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Label that sends a namespace's or service's traffic through a waypoint; its value names
/// a waypoint in the same namespace.
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// [`USE_WAYPOINT_LABEL`] value on a service that opts it out of its namespace's waypoint.
pub const USE_WAYPOINT_NONE: &str = "none";
/// Workload label naming the waypoint (Gateway) a pod belongs to, as Kubernetes sets it on
/// a Gateway's pods.
pub const WAYPOINT_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
