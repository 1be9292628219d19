//! The configuration model, as written in YAML (camelCase keys, unknown keys rejected).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};
use crate::identity::{Identity, IdentityError};

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
    /// Reserved for authorization policies; must be empty in this version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<serde_yaml_ng::Value>,
    /// Reserved for waypoint proxies; must be empty in this version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<serde_yaml_ng::Value>,
    /// Reserved for Gateway API routes; must be empty in this version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<serde_yaml_ng::Value>,
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

// === impl Config ===

impl Config {
    /// The namespace called `name`, if declared.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
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
}
