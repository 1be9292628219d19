//! A config indexed for the data path: built once per config version, then read by every
//! connection without scanning lists.
//!
//! [`index`] keeps a `watch` channel of [`Snapshot`]s in step with the config channel that
//! [`super::watch::watch_file`] publishes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::error;

use super::{
    Config, Service, USE_WAYPOINT_LABEL, USE_WAYPOINT_NONE, WAYPOINT_NAME_LABEL, Waypoint, Workload,
};
use crate::policy::{self, CompiledPolicy};

/// A config with the lookups the data path needs, built once per config version.
#[derive(Debug)]
pub struct Snapshot {
    /// The config it was built from.
    pub config: Arc<Config>,
    by_ip: HashMap<IpAddr, usize>,
    by_vip: HashMap<IpAddr, usize>,
    by_name: HashMap<(String, String), usize>,
    endpoints: Vec<Endpoints>,
    /// Workload address → index of the waypoint in front of it.
    fronted_by: HashMap<IpAddr, usize>,
    /// Authorization policies, compiled.
    pub policies: Vec<CompiledPolicy>,
}

impl Snapshot {
    /// Indexes `config`. Policies that fail to compile were already refused by validation;
    /// any that slip through are left out and logged.
    pub fn new(config: Arc<Config>) -> Self {
        let mut by_ip = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            for ip in &w.ips {
                by_ip.insert(*ip, i);
            }
        }
        let mut by_vip = HashMap::new();
        let mut by_name = HashMap::new();
        let mut endpoints = Vec::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            for vip in &s.vips {
                by_vip.insert(*vip, i);
            }
            by_name.insert((s.namespace.clone(), s.name.clone()), i);
            endpoints.push(service_endpoints(&config, s));
        }
        let policies = config
            .authorization_policies
            .iter()
            .filter_map(|p| match policy::compile(p) {
                Ok(c) => Some(c),
                Err((field, reason)) => {
                    error!(policy = %p.name, field, reason, "policy left out");
                    None
                }
            })
            .collect();
        let fronted_by = fronted_workloads(&config, &endpoints);
        Snapshot {
            config,
            by_ip,
            by_vip,
            by_name,
            endpoints,
            fronted_by,
            policies,
        }
    }

    /// The declared waypoint every connection to workload address `ip` must go through.
    pub fn waypoint_in_front_of(&self, ip: IpAddr) -> Option<&Waypoint> {
        self.fronted_by
            .get(&ip)
            .and_then(|i| self.config.waypoints.get(*i))
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip)
            .and_then(|i| self.config.workloads.get(*i))
    }

    /// The service behind a VIP, with its endpoints of the VIP's address family (as a
    /// Kubernetes Service of each family has its own EndpointSlices).
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<(&Service, &[IpAddr])> {
        let i = *self.by_vip.get(&ip)?;
        let eps = self.endpoints.get(i)?;
        Some((
            self.config.services.get(i)?,
            if ip.is_ipv4() { &eps.v4 } else { &eps.v6 },
        ))
    }

    /// The service `namespace/name`, with its endpoints of one family: IPv4 when it has any,
    /// else IPv6, so a dual-stack pod is one endpoint, not two.
    pub fn service(&self, namespace: &str, name: &str) -> Option<(&Service, &[IpAddr])> {
        let i = *self
            .by_name
            .get(&(namespace.to_string(), name.to_string()))?;
        let eps = self.endpoints.get(i)?;
        Some((
            self.config.services.get(i)?,
            if eps.v4.is_empty() { &eps.v6 } else { &eps.v4 },
        ))
    }

    /// The name of the waypoint a service's traffic goes through: the service's
    /// `ambit.dev/use-waypoint` label, or else its namespace's. A service label wins over
    /// the namespace's; `none` on the service opts it out. Unlike
    /// [`Config::waypoint_for_service`], the waypoint need not be declared under
    /// `waypoints`: the label is what a waypoint checks to know it serves a service.
    pub fn waypoint_of<'a>(&'a self, s: &'a Service) -> Option<&'a str> {
        s.labels
            .get(USE_WAYPOINT_LABEL)
            .or_else(|| {
                self.config
                    .namespace(&s.namespace)
                    .and_then(|n| n.labels.get(USE_WAYPOINT_LABEL))
            })
            .map(String::as_str)
            .filter(|name| !name.is_empty() && *name != USE_WAYPOINT_NONE)
    }
}

/// Istio's canonical service and revision of a workload, from its labels
/// (`service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`; and
/// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`), falling
/// back to the workload name and `latest`, as Istio does. Metric labels use them.
pub fn canonical(w: &Workload) -> (String, String) {
    let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k)).cloned();
    let service = label(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| w.name.clone());
    let revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_string());
    (service, revision)
}

/// Which workloads sit behind a declared waypoint: those in a namespace labelled
/// `ambit.dev/use-waypoint`, and the endpoints of services that use one. Waypoint pods
/// themselves never do: they are the way in.
fn fronted_workloads(config: &Config, endpoints: &[Endpoints]) -> HashMap<IpAddr, usize> {
    let index_of = |wp: &Waypoint| config.waypoints.iter().position(|w| std::ptr::eq(w, wp));
    let is_waypoint_pod = |w: &Workload| w.labels.contains_key(WAYPOINT_NAME_LABEL);
    let mut fronted = HashMap::new();
    for w in config.workloads.iter().filter(|w| !is_waypoint_pod(w)) {
        let label = config
            .namespace(&w.namespace)
            .and_then(|n| n.labels.get(USE_WAYPOINT_LABEL));
        if let Some(i) = label
            .and_then(|name| config.waypoint(&w.namespace, name))
            .and_then(index_of)
        {
            for ip in &w.ips {
                fronted.insert(*ip, i);
            }
        }
    }
    for (s, eps) in config.services.iter().zip(endpoints) {
        if let Some(i) = config.waypoint_for_service(s).and_then(index_of) {
            for ip in eps.v4.iter().chain(&eps.v6) {
                if config
                    .workload_by_ip(*ip)
                    .is_some_and(|w| !is_waypoint_pod(w))
                {
                    fronted.insert(*ip, i);
                }
            }
        }
    }
    fronted
}

/// A service's endpoint addresses, per family.
#[derive(Debug, Default)]
struct Endpoints {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
}

impl Endpoints {
    fn push(&mut self, ip: IpAddr) {
        let list = if ip.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if !list.contains(&ip) {
            list.push(ip);
        }
    }

    /// A workload counts once per family: its first address of each.
    fn push_workload(&mut self, w: &Workload) {
        for family_v4 in [true, false] {
            if let Some(ip) = w.ips.iter().find(|ip| ip.is_ipv4() == family_v4) {
                self.push(*ip);
            }
        }
    }
}

fn service_endpoints(config: &Config, s: &Service) -> Endpoints {
    let mut out = Endpoints::default();
    if let Some(selector) = &s.selector {
        for w in &config.workloads {
            if w.namespace == s.namespace
                && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            {
                out.push_workload(w);
            }
        }
    }
    for ep in s.endpoints.iter().flatten() {
        match (&ep.workload, ep.ip) {
            (Some(name), _) => {
                if let Some(w) = config
                    .workloads
                    .iter()
                    .find(|w| w.namespace == s.namespace && &w.name == name)
                {
                    out.push_workload(w);
                }
            }
            (None, Some(ip)) => out.push(ip),
            (None, None) => {}
        }
    }
    out
}

/// Keeps a [`Snapshot`] channel in step with the config channel. Returns when the config
/// sender is gone.
pub async fn index(mut config: watch::Receiver<Arc<Config>>, tx: watch::Sender<Arc<Snapshot>>) {
    while config.changed().await.is_ok() {
        let c = config.borrow_and_update().clone();
        tx.send_replace(Arc::new(Snapshot::new(c)));
    }
}

/// A snapshot channel fed from `config`: the first snapshot is built at once, later ones
/// by a task spawned on the current runtime.
pub fn spawn_index(config: watch::Receiver<Arc<Config>>) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::new(config.borrow().clone())));
    tokio::spawn(index(config, tx));
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/use-waypoint: shop-wp }
  - name: other
waypoints:
  - { name: shop-wp, namespace: shop }
  - { name: special, namespace: shop }
workloads:
  - { name: wp-1, namespace: shop, serviceAccount: shop-wp, ips: [10.1.1.9], node: a, labels: { gateway.networking.k8s.io/gateway-name: shop-wp } }
  - { name: web-1, namespace: shop, ips: [10.1.1.2], node: a, labels: { app: web, version: v2 } }
  - { name: web-2, namespace: shop, ips: [10.1.1.3], node: a, labels: { app: web } }
  - { name: db, namespace: other, ips: [10.1.2.2], node: b }
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{ port: 80, targetPort: 8080 }]
    selector: { app: web }
  - name: pinned
    namespace: shop
    vips: [10.96.0.11]
    ports: [{ port: 80 }]
    endpoints: [{ workload: web-1 }, { ip: 10.9.9.9 }]
    labels: { ambit.dev/use-waypoint: special }
  - name: db
    namespace: other
    vips: [10.96.0.12]
    ports: [{ port: 5432 }]
    selector: { app: db }
  - name: opted-out
    namespace: shop
    vips: [10.96.0.13]
    ports: [{ port: 80 }]
    selector: { app: web }
    labels: { ambit.dev/use-waypoint: none }
"#;

    fn snapshot() -> Snapshot {
        let c = super::super::parse_str(Path::new("t.yaml"), CONFIG).expect("valid config");
        Snapshot::new(Arc::new(c))
    }

    #[test]
    fn looks_up_workloads_services_and_waypoints() {
        let s = snapshot();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            s.workload_by_ip(ip("10.1.1.3")).map(|w| w.name.as_str()),
            Some("web-2")
        );
        let (web, eps) = s.service_by_vip(ip("10.96.0.10")).expect("web");
        assert_eq!(web.name, "web");
        assert_eq!(eps, &[ip("10.1.1.2"), ip("10.1.1.3")]);
        let (_, eps) = s.service("shop", "pinned").expect("pinned");
        assert_eq!(eps, &[ip("10.1.1.2"), ip("10.9.9.9")]);
        assert!(s.service("shop", "nope").is_none());

        assert_eq!(s.waypoint_of(web), Some("shop-wp"));
        let (pinned, _) = s.service("shop", "pinned").expect("pinned");
        assert_eq!(s.waypoint_of(pinned), Some("special"));
        let (db, _) = s.service("other", "db").expect("db");
        assert_eq!(s.waypoint_of(db), None);
        let (out, _) = s.service("shop", "opted-out").expect("opted-out");
        assert_eq!(s.waypoint_of(out), None);
    }

    #[test]
    fn dual_stack_services_balance_within_the_vips_family() {
        let c = super::super::parse_str(
            Path::new("t.yaml"),
            r#"
trustDomain: cluster.local
namespaces: [{ name: shop }]
workloads:
  - { name: web-1, namespace: shop, ips: [10.1.1.2, "fd00:1::2"], node: a, labels: { app: web } }
  - { name: web-2, namespace: shop, ips: ["fd00:1::3", 10.1.1.3], node: a, labels: { app: web } }
  - { name: web-3, namespace: shop, ips: ["fd00:1::4"], node: a, labels: { app: web } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.10, "fd00:96::10"], ports: [{ port: 80 }], selector: { app: web } }
"#,
        )
        .expect("valid config");
        let s = Snapshot::new(Arc::new(c));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let (_, v4) = s.service_by_vip(ip("10.96.0.10")).expect("v4 vip");
        assert_eq!(v4, &[ip("10.1.1.2"), ip("10.1.1.3")]);
        let (_, v6) = s.service_by_vip(ip("fd00:96::10")).expect("v6 vip");
        assert_eq!(v6, &[ip("fd00:1::2"), ip("fd00:1::3"), ip("fd00:1::4")]);
        assert_eq!(
            s.workload_by_ip(ip("fd00:1::3")).map(|w| w.name.as_str()),
            Some("web-2")
        );
        // By name: one family, so each dual-stack pod counts once.
        let (_, by_name) = s.service("shop", "web").expect("web");
        assert_eq!(by_name, v4);
    }

    #[test]
    fn workloads_behind_declared_waypoints() {
        let s = snapshot();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let name = |a: &str| s.waypoint_in_front_of(ip(a)).map(|w| w.name.as_str());
        // The namespace's waypoint fronts its workloads...
        assert_eq!(name("10.1.1.3"), Some("shop-wp"));
        // ...and an endpoint of a service with its own waypoint is behind that one
        // (services are indexed after namespaces).
        assert_eq!(name("10.1.1.2"), Some("special"));
        // The waypoint's own pod, other namespaces and bare endpoints are not fronted.
        assert_eq!(name("10.1.1.9"), None);
        assert_eq!(name("10.1.2.2"), None);
        assert_eq!(name("10.9.9.9"), None);
    }

    #[test]
    fn canonical_names_follow_istio() {
        let s = snapshot();
        let w1 = s
            .workload_by_ip("10.1.1.2".parse().expect("ip"))
            .expect("w");
        assert_eq!(canonical(w1), ("web".into(), "v2".into()));
        let db = s
            .workload_by_ip("10.1.2.2".parse().expect("ip"))
            .expect("w");
        assert_eq!(canonical(db), ("db".into(), "latest".into()));
    }
}
