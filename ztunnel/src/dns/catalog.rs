//! Which names the proxy answers itself, and with what: the services of the config, under the
//! cluster domain and in the short forms a Kubernetes search path would expand.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ambit_shared::config::Config;
use hickory_proto::rr::Name;
use parking_lot::Mutex;
use tokio::sync::watch;

/// The label between a service's namespace and the cluster domain.
const SVC: &[u8] = b"svc";

/// What the catalog says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A service: its VIPs (possibly none of the family asked for).
    Service(Arc<[IpAddr]>),
    /// A name under the cluster domain that exists only as a parent of service names (the
    /// domain itself, `svc.<domain>`, `<namespace>.svc.<domain>`): no records of its own, but
    /// not NXDOMAIN, which would tell resolvers that nothing exists below it (RFC 8020).
    Empty {
        /// The name is the cluster domain itself (its SOA is an answer, not just a hint).
        apex: bool,
    },
    /// Under the cluster domain and not a service: the proxy answers NXDOMAIN.
    NxDomain,
    /// Not a cluster name: forwarded to the node's resolver.
    Forward,
}

/// Services by namespace and name, and the declared namespaces; built once per config.
#[derive(Debug, Default)]
pub(crate) struct ServiceIndex {
    /// namespace -> name -> VIPs, all lowercase.
    services: HashMap<String, HashMap<String, Arc<[IpAddr]>>>,
    namespaces: HashSet<String>,
}

impl ServiceIndex {
    pub(crate) fn new(config: &Config) -> Self {
        let mut services: HashMap<String, HashMap<String, Arc<[IpAddr]>>> = HashMap::new();
        for s in &config.services {
            services
                .entry(s.namespace.to_ascii_lowercase())
                .or_default()
                .insert(
                    s.name.to_ascii_lowercase(),
                    s.vips.iter().copied().collect(),
                );
        }
        let namespaces = config
            .namespaces
            .iter()
            .map(|n| n.name.to_ascii_lowercase())
            .chain(services.keys().cloned())
            .collect();
        ServiceIndex {
            services,
            namespaces,
        }
    }

    fn service(&self, namespace: &[u8], name: &[u8]) -> Option<Arc<[IpAddr]>> {
        let namespace = std::str::from_utf8(namespace).ok()?;
        let name = std::str::from_utf8(name).ok()?;
        self.services.get(namespace)?.get(name).cloned()
    }

    fn has_namespace(&self, namespace: &[u8]) -> bool {
        std::str::from_utf8(namespace).is_ok_and(|ns| self.namespaces.contains(ns))
    }
}

/// The services of the config in force, indexed lazily: the index is rebuilt on the first
/// query after the config changes, and shared by every pod.
#[derive(Debug)]
pub(crate) struct Catalog {
    config: watch::Receiver<Arc<Config>>,
    /// The cluster domain's labels, lowercase, e.g. `[b"cluster", b"local"]`.
    domain: Vec<Vec<u8>>,
    cache: Mutex<Option<(Arc<Config>, Arc<ServiceIndex>)>>,
}

impl Catalog {
    pub(crate) fn new(config: watch::Receiver<Arc<Config>>, domain: &Name) -> Self {
        Catalog {
            config,
            domain: domain.to_lowercase().iter().map(<[u8]>::to_vec).collect(),
            cache: Mutex::new(None),
        }
    }

    /// The index for the config in force now.
    fn index(&self) -> Arc<ServiceIndex> {
        let config = self.config.borrow().clone();
        let mut cache = self.cache.lock();
        if let Some((built_from, index)) = cache.as_ref()
            && Arc::ptr_eq(built_from, &config)
        {
            return index.clone();
        }
        let index = Arc::new(ServiceIndex::new(&config));
        *cache = Some((config, index.clone()));
        index
    }

    /// Looks `name` up for a client in namespace `client_ns`.
    ///
    /// - `<svc>.<ns>.svc.<domain>`: the service, or NXDOMAIN; every other name under the
    ///   domain is NXDOMAIN too, except the domain's own parents of services.
    /// - Outside the domain, the short forms that the Kubernetes search path
    ///   (`<client_ns>.svc.<domain> svc.<domain> <domain>`) turns into a service name:
    ///   `<svc>` (in the client's namespace), `<svc>.<ns>` and `<svc>.<ns>.svc`. A short form
    ///   that names no service is forwarded, since `example.com` is a short form too.
    pub(crate) fn lookup(&self, name: &Name, client_ns: &str) -> Lookup {
        let lower = name.to_lowercase();
        let labels: Vec<&[u8]> = lower.iter().collect();
        lookup_labels(&self.index(), &self.domain, &labels, client_ns.as_bytes())
    }
}

fn lookup_labels(
    index: &ServiceIndex,
    domain: &[Vec<u8>],
    labels: &[&[u8]],
    client_ns: &[u8],
) -> Lookup {
    let found = |ns: &[u8], name: &[u8]| index.service(ns, name).map(Lookup::Service);
    let in_domain = labels.len() >= domain.len()
        && labels
            .iter()
            .skip(labels.len() - domain.len())
            .zip(domain)
            .all(|(l, d)| *l == d.as_slice());
    if in_domain {
        let prefix = labels
            .get(..labels.len() - domain.len())
            .unwrap_or_default();
        return match prefix {
            [] => Lookup::Empty { apex: true },
            [svc] if *svc == SVC => Lookup::Empty { apex: false },
            [ns, svc] if *svc == SVC && index.has_namespace(ns) => Lookup::Empty { apex: false },
            [name, ns, svc] if *svc == SVC => found(ns, name).unwrap_or(Lookup::NxDomain),
            _ => Lookup::NxDomain,
        };
    }
    let short = match labels {
        [name] => found(client_ns, name),
        [name, ns] => found(ns, name),
        [name, ns, svc] if *svc == SVC => found(ns, name),
        _ => None,
    };
    short.unwrap_or(Lookup::Forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ServiceIndex {
        let yaml = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }, { name: legacy }, { name: empty }]
services:
  - { name: web, namespace: shop, vips: [10.96.0.10, "fd00::10"], ports: [{ port: 80 }], selector: { app: x } }
  - { name: db, namespace: legacy, vips: [10.96.0.20], ports: [{ port: 5432 }], selector: { app: x } }
"#;
        let config = ambit_shared::config::parse_str(std::path::Path::new("t.yaml"), yaml)
            .expect("test config is valid");
        ServiceIndex::new(&config)
    }

    fn lookup(name: &str, client_ns: &str) -> Lookup {
        let domain = [b"cluster".to_vec(), b"local".to_vec()];
        let name = Name::from_ascii(name)
            .expect("test name parses")
            .to_lowercase();
        let labels: Vec<&[u8]> = name.iter().collect();
        lookup_labels(&index(), &domain, &labels, client_ns.as_bytes())
    }

    fn vips(list: &[&str]) -> Lookup {
        Lookup::Service(
            list.iter()
                .map(|v| v.parse().expect("test IP parses"))
                .collect(),
        )
    }

    #[test]
    fn full_names_resolve_and_others_under_the_domain_do_not_exist() {
        let web = vips(&["10.96.0.10", "fd00::10"]);
        assert_eq!(lookup("web.shop.svc.cluster.local.", "legacy"), web);
        assert_eq!(lookup("WEB.Shop.SVC.cluster.LOCAL.", "legacy"), web);
        assert_eq!(
            lookup("db.legacy.svc.cluster.local.", "shop"),
            vips(&["10.96.0.20"])
        );
        for missing in [
            "nope.shop.svc.cluster.local.",
            "web.legacy.svc.cluster.local.",
            // What ndots:5 makes of "web.shop" before it tries the right name.
            "web.shop.shop.svc.cluster.local.",
            "example.com.svc.cluster.local.",
            "x.web.shop.svc.cluster.local.",
            "nope.svc.cluster.local.",
            "web.shop.cluster.local.",
            "1-2-3-4.shop.pod.cluster.local.",
        ] {
            assert_eq!(lookup(missing, "shop"), Lookup::NxDomain, "{missing}");
        }
    }

    #[test]
    fn parents_of_service_names_exist_without_records() {
        assert_eq!(
            lookup("cluster.local.", "shop"),
            Lookup::Empty { apex: true }
        );
        assert_eq!(
            lookup("svc.cluster.local.", "shop"),
            Lookup::Empty { apex: false }
        );
        assert_eq!(
            lookup("shop.svc.cluster.local.", "shop"),
            Lookup::Empty { apex: false }
        );
        // A declared namespace without services exists too, an undeclared one does not.
        assert_eq!(
            lookup("empty.svc.cluster.local.", "shop"),
            Lookup::Empty { apex: false }
        );
        assert_eq!(lookup("ghost.svc.cluster.local.", "shop"), Lookup::NxDomain);
    }

    #[test]
    fn short_forms_follow_the_search_path() {
        let web = vips(&["10.96.0.10", "fd00::10"]);
        assert_eq!(lookup("web.", "shop"), web);
        assert_eq!(
            lookup("web.", "legacy"),
            Lookup::Forward,
            "no web in legacy"
        );
        assert_eq!(lookup("web.shop.", "legacy"), web);
        assert_eq!(lookup("web.shop.svc.", "legacy"), web);
        assert_eq!(lookup("db.", "legacy"), vips(&["10.96.0.20"]));
        for other in [
            "example.com.",
            "www.example.com.",
            "nope.",
            "nope.shop.",
            "web.shop.svc.example.",
            ".",
        ] {
            assert_eq!(lookup(other, "shop"), Lookup::Forward, "{other}");
        }
    }

    #[test]
    fn a_custom_domain_is_honoured() {
        let domain = [b"mesh".to_vec(), b"example".to_vec()];
        let name = Name::from_ascii("web.shop.svc.mesh.example.").expect("parses");
        let labels: Vec<&[u8]> = name.iter().collect();
        assert!(matches!(
            lookup_labels(&index(), &domain, &labels, b"shop"),
            Lookup::Service(_)
        ));
        let name = Name::from_ascii("web.shop.svc.cluster.local.").expect("parses");
        let labels: Vec<&[u8]> = name.iter().collect();
        assert_eq!(
            lookup_labels(&index(), &domain, &labels, b"shop"),
            Lookup::Forward
        );
    }

    #[test]
    fn the_index_follows_config_changes() {
        let parse = |yaml: &str| {
            Arc::new(
                ambit_shared::config::parse_str(std::path::Path::new("t.yaml"), yaml)
                    .expect("test config is valid"),
            )
        };
        let before = parse(
            "trustDomain: td\nnamespaces: [{ name: shop }]\nservices:\n  - { name: web, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80 }], selector: { app: x } }\n",
        );
        let after = parse(
            "trustDomain: td\nnamespaces: [{ name: shop }]\nservices:\n  - { name: web, namespace: shop, vips: [10.96.0.11], ports: [{ port: 80 }], selector: { app: x } }\n",
        );
        let (tx, rx) = watch::channel(before);
        let catalog = Catalog::new(rx, &Name::from_ascii("cluster.local.").expect("parses"));
        let name = Name::from_ascii("web.shop.svc.cluster.local.").expect("parses");
        assert_eq!(catalog.lookup(&name, "shop"), vips(&["10.96.0.10"]));
        tx.send_replace(after);
        assert_eq!(catalog.lookup(&name, "shop"), vips(&["10.96.0.11"]));
    }
}
