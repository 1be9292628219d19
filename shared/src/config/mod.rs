//! Ambit's configuration model and its YAML file source.
//!
//! [`model`] holds the serde types exactly as users write them; [`file`] reads and
//! validates a file into a [`Config`], reporting the file, the field and the reason for
//! anything wrong. Everything downstream works on a validated [`Config`].

pub mod file;
pub mod model;

pub use file::{ConfigError, load_file, parse_str};
pub use model::{
    Action, AuthorizationPolicy, Config, EndpointRef, Namespace, Operation, PeerAuthMode, PeerAuthentication,
    Protocol, Rule, Scope, Service, ServicePort, Source, Workload,
};

/// Namespace (or pod) label that opts workloads into the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod (or namespace) out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Label that sends a namespace's or service's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
