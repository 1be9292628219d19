//! Kubernetes objects → the [`Config`] model, as pure functions (no I/O).
//!
//! Each object is translated on its own; one that cannot be used is reported as an
//! [`ObjectError`] naming its kind, namespace, name and field, and left out, so the rest of
//! the cluster still applies. The assembled [`Config`] then goes through the same
//! validation as a file ([`validate_config`]); an object that fails it is dropped and
//! reported the same way, and validation runs again without it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as KNamespace, Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::model::{
    AuthorizationPolicy, Config, EndpointRef, Namespace, PeerAuthentication, Protocol, Route,
    Service, ServicePort, TrafficPolicy, Waypoint, Workload,
};
use crate::config::validate_config;

/// The `gatewayClassName` of Gateways that are Ambit waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "ambit-waypoint";
/// Gateway annotation naming the service account of the waypoint's pods (default: the
/// Gateway's name).
pub const WAYPOINT_SERVICE_ACCOUNT_ANNOTATION: &str = "ambit.dev/service-account";
/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Every object the source watches, as last seen.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// `v1` Namespaces.
    pub namespaces: Vec<KNamespace>,
    /// `v1` Pods.
    pub pods: Vec<Pod>,
    /// `v1` Services.
    pub services: Vec<KService>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `ambit.dev/v1alpha1` AuthorizationPolicies.
    pub authorization_policies: Vec<DynamicObject>,
    /// `ambit.dev/v1alpha1` PeerAuthentications.
    pub peer_authentications: Vec<DynamicObject>,
    /// `ambit.dev/v1alpha1` TrafficPolicies.
    pub traffic_policies: Vec<DynamicObject>,
    /// `gateway.networking.k8s.io/v1` Gateways.
    pub gateways: Vec<DynamicObject>,
    /// `gateway.networking.k8s.io/v1` HTTPRoutes.
    pub http_routes: Vec<DynamicObject>,
    /// `gateway.networking.k8s.io/v1` GRPCRoutes.
    pub grpc_routes: Vec<DynamicObject>,
}

/// A Kubernetes object that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    /// Its kind, e.g. `Pod`.
    pub kind: String,
    /// Its namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The offending field, e.g. `spec.rules[0].from[0].ipBlocks[0]`; empty for the object.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{}", self.name)?;
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl ObjectError {
    fn new(kind: &str, meta: &impl Resource, field: &str, reason: impl Into<String>) -> Self {
        ObjectError {
            kind: kind.to_string(),
            namespace: meta.meta().namespace.clone().unwrap_or_default(),
            name: meta.meta().name.clone().unwrap_or_default(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Drops `metadata.managedFields`: server-side-apply bookkeeping that nothing here reads
/// and that is often larger than the object itself.
pub fn strip_managed_fields<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// A Namespace and its labels.
pub fn namespace(ns: &KNamespace) -> Namespace {
    Namespace {
        name: ns.name_any(),
        labels: ns.labels().clone(),
    }
}

/// A Pod → a workload, or `None` for a pod that does not take part: not scheduled yet,
/// without an address yet, finished (`Succeeded`/`Failed`), or on the host network (its
/// address is the node's).
pub fn pod(p: &Pod) -> Option<Workload> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    if spec.host_network == Some(true) {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    for text in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = text.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some(Workload {
        name: p.name_any(),
        namespace: p.namespace().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        ips,
        node,
        labels: p.labels().clone(),
    })
}

/// A Service and its EndpointSlices → a service.
///
/// With slices, the endpoints are explicit: ready endpoints only, as the pod's workload
/// when the slice names a pod the mesh knows (`known_pods`, same namespace), else by
/// address. Without slices, a selector Service keeps its selector. Named target ports are
/// resolved through the slices' ports of the same name. Headless (`None`) cluster IPs are
/// not VIPs.
pub fn service(
    s: &KService,
    slices: &[&EndpointSlice],
    known_pods: &BTreeSet<(String, String)>,
) -> Result<Service, ObjectError> {
    let err = |field: &str, reason: String| ObjectError::new("Service", s, field, reason);
    let namespace = s.namespace().unwrap_or_default();
    let spec = s.spec.clone().unwrap_or_default();
    let mut vips = Vec::new();
    let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
    for (i, text) in listed.chain(spec.cluster_ip.as_deref()).enumerate() {
        if text.is_empty() || text == "None" {
            continue;
        }
        let ip: IpAddr = text.parse().map_err(|_| {
            err(
                &format!("spec.clusterIPs[{i}]"),
                format!("`{text}` is not an IP address"),
            )
        })?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let at = format!("spec.ports[{i}]");
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            // SCTP has no place in the model: the port is left out, not the service.
            Some(_) => continue,
        };
        let port = u16::try_from(p.port)
            .map_err(|_| err(&format!("{at}.port"), format!("{} is not a port", p.port)))?;
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(n)) => Some(
                u16::try_from(*n)
                    .map_err(|_| err(&format!("{at}.targetPort"), format!("{n} is not a port")))?,
            ),
            Some(IntOrString::String(name)) => {
                let found = slices
                    .iter()
                    .flat_map(|sl| sl.ports.iter().flatten())
                    .find(|sp| sp.name.as_deref() == p.name.as_deref() && sp.port.is_some())
                    .and_then(|sp| sp.port)
                    .and_then(|n| u16::try_from(n).ok());
                match found {
                    Some(n) => Some(n),
                    // Not resolvable yet (no slice): leave the port out rather than guess.
                    None if slices.is_empty() => continue,
                    None => {
                        return Err(err(
                            &format!("{at}.targetPort"),
                            format!("named port `{name}` is not in the service's EndpointSlices"),
                        ));
                    }
                }
            }
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            port,
            target_port,
            protocol,
        });
    }
    let (selector, endpoints) = if slices.is_empty() {
        match spec.selector.filter(|s| !s.is_empty()) {
            Some(sel) => (Some(sel), None),
            None => (None, Some(Vec::new())),
        }
    } else {
        (None, Some(slice_endpoints(&namespace, slices, known_pods)))
    };
    Ok(Service {
        name: s.name_any(),
        namespace,
        vips,
        ports,
        selector,
        endpoints,
        labels: s.labels().clone(),
    })
}

/// Ready endpoints of `slices`, each once.
fn slice_endpoints(
    namespace: &str,
    slices: &[&EndpointSlice],
    known_pods: &BTreeSet<(String, String)>,
) -> Vec<EndpointRef> {
    let mut out: Vec<EndpointRef> = Vec::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        for ep in &slice.endpoints {
            // Kubernetes: an absent `ready` means ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .filter(|r| r.namespace.as_deref().is_none_or(|n| n == namespace))
                .and_then(|r| r.name.clone())
                .filter(|n| known_pods.contains(&(namespace.to_string(), n.clone())));
            let refs: Vec<EndpointRef> = match pod {
                Some(w) => vec![EndpointRef {
                    workload: Some(w),
                    ip: None,
                }],
                None => ep
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| EndpointRef {
                        workload: None,
                        ip: Some(ip),
                    })
                    .collect(),
            };
            for r in refs {
                if !out.contains(&r) {
                    out.push(r);
                }
            }
        }
    }
    out
}

/// The `spec` of an Ambit policy object (`ambit.dev/v1alpha1`) as model type `T`, whose
/// `name` and `namespace` come from `metadata`.
fn policy<T: DeserializeOwned>(kind: &str, obj: &DynamicObject) -> Result<T, ObjectError> {
    let mut spec = match obj.data.get("spec") {
        Some(Value::Object(m)) => m.clone(),
        None => serde_json::Map::new(),
        Some(_) => return Err(ObjectError::new(kind, obj, "spec", "must be an object")),
    };
    for key in ["name", "namespace"] {
        if spec.contains_key(key) {
            return Err(ObjectError::new(
                kind,
                obj,
                &format!("spec.{key}"),
                format!("`{key}` comes from metadata; remove it from spec"),
            ));
        }
    }
    spec.insert("name".into(), Value::String(obj.name_any()));
    if let Some(ns) = obj.namespace() {
        spec.insert("namespace".into(), Value::String(ns));
    }
    serde_path_to_error::deserialize(Value::Object(spec)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        ObjectError::new(kind, obj, &field, e.into_inner().to_string())
    })
}

/// An `AuthorizationPolicy` object → the model's policy.
pub fn authorization_policy(obj: &DynamicObject) -> Result<AuthorizationPolicy, ObjectError> {
    policy("AuthorizationPolicy", obj)
}

/// A `PeerAuthentication` object → the model's peer authentication.
pub fn peer_authentication(obj: &DynamicObject) -> Result<PeerAuthentication, ObjectError> {
    policy("PeerAuthentication", obj)
}

/// A `TrafficPolicy` object → the model's traffic policy.
pub fn traffic_policy(obj: &DynamicObject) -> Result<TrafficPolicy, ObjectError> {
    policy("TrafficPolicy", obj)
}

/// A Gateway → a waypoint, or `None` when its class is not [`WAYPOINT_GATEWAY_CLASS`].
pub fn gateway(obj: &DynamicObject) -> Option<Waypoint> {
    let class = obj
        .data
        .get("spec")
        .and_then(|s| s.get("gatewayClassName"))
        .and_then(Value::as_str)?;
    if class != WAYPOINT_GATEWAY_CLASS {
        return None;
    }
    Some(Waypoint {
        name: obj.name_any(),
        namespace: obj.namespace().unwrap_or_default(),
        service_account: obj
            .annotations()
            .get(WAYPOINT_SERVICE_ACCOUNT_ANNOTATION)
            .cloned(),
    })
}

/// An `HTTPRoute` or `GRPCRoute` object → a route (the model keeps the Gateway API shape).
pub fn route(kind: &str, obj: &DynamicObject) -> Result<Route, ObjectError> {
    let mut value = serde_json::to_value(obj)
        .map_err(|e| ObjectError::new(kind, obj, "", format!("cannot re-encode: {e}")))?;
    if let Some(m) = value.as_object_mut() {
        // The model reads `apiVersion`/`kind`; a list item may omit them.
        m.entry("apiVersion")
            .or_insert_with(|| Value::String(crate::config::model::GATEWAY_API_VERSION.into()));
        m.entry("kind")
            .or_insert_with(|| Value::String(kind.into()));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ObjectError::new(kind, obj, &field, e.into_inner().to_string())
    })
}

/// Which object each entry of a [`Config`] list came from.
#[derive(Debug, Default)]
struct Origins {
    by_list: HashMap<&'static str, Vec<(String, String, String)>>,
}

impl Origins {
    fn push(&mut self, list: &'static str, kind: &str, namespace: &str, name: &str) {
        self.by_list.entry(list).or_default().push((
            kind.to_string(),
            namespace.to_string(),
            name.to_string(),
        ));
    }
}

/// Every object → a validated [`Config`], plus the objects that were left out and why.
///
/// Objects are sorted by namespace and name first, so the same cluster state always gives
/// the same `Config`. Fails only when validation fails on something no object owns (e.g.
/// the trust domain).
pub fn snapshot(
    trust_domain: &str,
    objects: &Objects,
) -> Result<(Config, Vec<ObjectError>), ObjectError> {
    let mut errors = Vec::new();
    let mut origins = Origins::default();
    let mut config = Config {
        trust_domain: trust_domain.to_string(),
        namespaces: Vec::new(),
        workloads: Vec::new(),
        services: Vec::new(),
        authorization_policies: Vec::new(),
        peer_authentications: Vec::new(),
        waypoints: Vec::new(),
        routes: Vec::new(),
        traffic_policies: Vec::new(),
    };

    for ns in sorted(&objects.namespaces) {
        let n = namespace(ns);
        origins.push("namespaces", "Namespace", "", &n.name);
        config.namespaces.push(n);
    }
    let mut known_pods = BTreeSet::new();
    // Oldest first: when two pods claim one address, validation blames the later claim,
    // so the pod that had it first keeps it.
    let mut pods = sorted(&objects.pods);
    pods.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
    });
    for p in pods {
        if let Some(w) = pod(p) {
            known_pods.insert((w.namespace.clone(), w.name.clone()));
            origins.push("workloads", "Pod", &w.namespace, &w.name);
            config.workloads.push(w);
        }
    }
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for sl in sorted(&objects.endpoint_slices) {
        if let Some(svc) = sl.labels().get(SERVICE_NAME_LABEL) {
            slices
                .entry((sl.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(sl);
        }
    }
    for s in sorted(&objects.services) {
        let key = (s.namespace().unwrap_or_default(), s.name_any());
        let mine = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        match service(s, mine, &known_pods) {
            Ok(svc) if svc.ports.is_empty() => errors.push(ObjectError::new(
                "Service",
                s,
                "spec.ports",
                "no TCP or UDP port the mesh can use (yet)",
            )),
            Ok(svc) => {
                origins.push("services", "Service", &svc.namespace, &svc.name);
                config.services.push(svc);
            }
            Err(e) => errors.push(e),
        }
    }
    let add = |list: &'static str, kind: &str, obj: &DynamicObject, origins: &mut Origins| {
        origins.push(
            list,
            kind,
            &obj.namespace().unwrap_or_default(),
            &obj.name_any(),
        );
    };
    for o in sorted(&objects.authorization_policies) {
        match authorization_policy(o) {
            Ok(p) => {
                add(
                    "authorizationPolicies",
                    "AuthorizationPolicy",
                    o,
                    &mut origins,
                );
                config.authorization_policies.push(p);
            }
            Err(e) => errors.push(e),
        }
    }
    for o in sorted(&objects.peer_authentications) {
        match peer_authentication(o) {
            Ok(p) => {
                add("peerAuthentications", "PeerAuthentication", o, &mut origins);
                config.peer_authentications.push(p);
            }
            Err(e) => errors.push(e),
        }
    }
    for o in sorted(&objects.traffic_policies) {
        match traffic_policy(o) {
            Ok(p) => {
                add("trafficPolicies", "TrafficPolicy", o, &mut origins);
                config.traffic_policies.push(p);
            }
            Err(e) => errors.push(e),
        }
    }
    for o in sorted(&objects.gateways) {
        if let Some(w) = gateway(o) {
            add("waypoints", "Gateway", o, &mut origins);
            config.waypoints.push(w);
        }
    }
    for (kind, list) in [
        ("HTTPRoute", &objects.http_routes),
        ("GRPCRoute", &objects.grpc_routes),
    ] {
        for o in sorted(list) {
            match route(kind, o) {
                Ok(r) => {
                    add("routes", kind, o, &mut origins);
                    config.routes.push(r);
                }
                Err(e) => errors.push(e),
            }
        }
    }

    // Each round drops the one object validation points at; bounded by the object count.
    loop {
        let Err(invalid) = validate_config(&config) else {
            return Ok((config, errors));
        };
        let Some((list, index, rest)) = split_field(&invalid.field) else {
            return Err(unowned(invalid));
        };
        let Some(origin) = origins.by_list.get_mut(list).filter(|o| index < o.len()) else {
            return Err(unowned(invalid));
        };
        let (kind, namespace, name) = origin.remove(index);
        if !remove_at(&mut config, list, index) {
            return Err(unowned(invalid));
        }
        if list == "workloads" {
            // Services keep their other endpoints rather than failing over this one.
            for s in config
                .services
                .iter_mut()
                .filter(|s| s.namespace == namespace)
            {
                if let Some(eps) = s.endpoints.as_mut() {
                    eps.retain(|e| e.workload.as_deref() != Some(name.as_str()));
                }
            }
        }
        errors.push(ObjectError {
            kind,
            namespace,
            name,
            field: rest.to_string(),
            reason: invalid.reason,
        });
    }
}

fn unowned(invalid: crate::config::InvalidField) -> ObjectError {
    ObjectError {
        kind: "Config".into(),
        namespace: String::new(),
        name: String::new(),
        field: invalid.field,
        reason: invalid.reason,
    }
}

/// `workloads[3].ips[0]` → (`workloads`, 3, `ips[0]`).
fn split_field(field: &str) -> Option<(&str, usize, &str)> {
    let (list, after) = field.split_once('[')?;
    let (index, rest) = after.split_once(']')?;
    let index = index.parse().ok()?;
    Some((list, index, rest.strip_prefix('.').unwrap_or(rest)))
}

fn remove_at(c: &mut Config, list: &str, i: usize) -> bool {
    fn take<T>(v: &mut Vec<T>, i: usize) -> bool {
        if i < v.len() {
            v.remove(i);
            true
        } else {
            false
        }
    }
    match list {
        "namespaces" => take(&mut c.namespaces, i),
        "workloads" => take(&mut c.workloads, i),
        "services" => take(&mut c.services, i),
        "authorizationPolicies" => take(&mut c.authorization_policies, i),
        "peerAuthentications" => take(&mut c.peer_authentications, i),
        "waypoints" => take(&mut c.waypoints, i),
        "routes" => take(&mut c.routes, i),
        "trafficPolicies" => take(&mut c.traffic_policies, i),
        _ => false,
    }
}

fn sorted<K: Resource>(objs: &[K]) -> Vec<&K> {
    let mut v: Vec<&K> = objs.iter().collect();
    v.sort_by(|a, b| {
        (&a.meta().namespace, &a.meta().name).cmp(&(&b.meta().namespace, &b.meta().name))
    });
    v
}

#[cfg(test)]
mod tests;
