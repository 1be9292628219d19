//! The DNS proxy: answers service names from the config inside enrolled pods, and forwards
//! every other name to the node's resolver.
//!
//! Each enrolled pod gets a UDP socket and a TCP listener on `127.0.0.1:15053` in its network
//! namespace ([`crate::capture::dns`]); the eBPF programs send the pod's queries to port 53
//! there and make the answers look as if the server the pod asked had sent them. Which pod
//! asked is known from which pod's socket got the query, so short names resolve relative to
//! that pod's namespace.
//!
//! Answered here, authoritatively, with a TTL of 5 s (so config changes show within seconds):
//! - `<service>.<namespace>.svc.<domain>` (`domain` is `cluster.local` unless set): A and
//!   AAAA records for the service's VIPs;
//! - the short forms the Kubernetes search path `<ns>.svc.<domain> svc.<domain> <domain>`
//!   expands to a service: `<service>` (in the pod's own namespace), `<service>.<namespace>`
//!   and `<service>.<namespace>.svc`, so they resolve even for clients that send them as they
//!   are (no search list, or `dig` without `+search`);
//! - every other name under the domain: NXDOMAIN, with the domain's SOA so resolvers cache it
//!   briefly. Names that exist only as parents of services (`svc.<domain>`, a declared
//!   `<namespace>.svc.<domain>`, the domain) are empty rather than NXDOMAIN, since NXDOMAIN
//!   would deny everything below them (RFC 8020).
//!
//! Everything else goes to the servers in ztunnel's own `resolv.conf` (see [`forward`]):
//! in Kubernetes, the node's or ztunnel pod's resolver; in the simulated cluster, the node
//! namespace's. Answers from there come back unchanged except for the message ID.
//!
//! Nothing from the network can panic the proxy or grow its memory without bound: queries are
//! at most 4 KiB, answers are bounded by the transport, and each pod has a fixed number of
//! forwarded queries in flight and TCP connections open (see [`server`]).

pub(crate) mod catalog;
mod forward;
pub(crate) mod message;
mod resolv_conf;
mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambit_shared::admission::Gate;
use ambit_shared::config::Config;
use hickory_proto::rr::Name;
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::capture::dns::DnsListeners;
use crate::proxy::Pod;

use catalog::Catalog;
use forward::{Forwarder, Timeouts};
use message::Zone;
use server::PodDns;

/// The default cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// The default resolver configuration forwarded queries follow.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Forwarded queries in flight on the whole node; each pod also has its own, smaller cap.
pub(crate) const NODE_MAX_IN_FLIGHT: usize = 4096;

/// Settings of the DNS proxy.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The cluster domain whose names are answered here, e.g. `cluster.local`.
    pub domain: String,
    /// The `resolv.conf` whose `nameserver`s get every other query: ztunnel's own (the
    /// node's), `/etc/resolv.conf` by default.
    pub resolv_conf: PathBuf,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            domain: DEFAULT_DOMAIN.to_string(),
            resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF),
        }
    }
}

/// Why the DNS proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The cluster domain is not a valid DNS name.
    #[error("invalid DNS domain {domain:?}: {reason}")]
    Domain {
        /// As given.
        domain: String,
        /// What is wrong.
        reason: String,
    },
}

/// The node's DNS proxy: what every pod's DNS servers share.
#[derive(Debug)]
pub struct DnsProxy {
    catalog: Catalog,
    zone: Zone,
    forwarder: Forwarder,
    in_flight: Arc<Semaphore>,
}

impl DnsProxy {
    /// Sets the proxy up: `config` is the config in force (its services are the names answered
    /// here). The resolv.conf is read once, now; if it is missing or names no server, the
    /// proxy still answers cluster names and answers SERVFAIL for the rest, and says so.
    pub fn new(
        settings: &DnsSettings,
        config: watch::Receiver<Arc<Config>>,
    ) -> Result<Self, DnsError> {
        let upstreams = read_upstreams(&settings.resolv_conf);
        let proxy = Self::with_upstreams(&settings.domain, config, upstreams, Timeouts::default())?;
        info!(domain = %proxy.zone.name(), resolv_conf = %settings.resolv_conf.display(),
            upstreams = ?proxy.upstreams(), "DNS proxy configured");
        Ok(proxy)
    }

    /// [`DnsProxy::new`] with the upstreams (and timeouts) given rather than read.
    pub(crate) fn with_upstreams(
        domain: &str,
        config: watch::Receiver<Arc<Config>>,
        upstreams: Vec<SocketAddr>,
        timeouts: Timeouts,
    ) -> Result<Self, DnsError> {
        let zone = Zone::new(parse_domain(domain)?).map_err(|reason| DnsError::Domain {
            domain: domain.to_string(),
            reason,
        })?;
        Ok(DnsProxy {
            catalog: Catalog::new(config, zone.name()),
            zone,
            forwarder: Forwarder::new(upstreams, timeouts),
            in_flight: Arc::new(Semaphore::new(NODE_MAX_IN_FLIGHT)),
        })
    }

    /// Serves one pod's DNS on its sockets until the returned future is dropped (abort the task
    /// to stop; forwarded queries already in flight finish on their own tasks).
    /// TCP connections are admitted through `gate`.
    pub async fn serve(self: Arc<Self>, listeners: DnsListeners, pod: Arc<Pod>, gate: Gate) {
        let pod = Arc::new(PodDns::new(self, pod.namespace.clone(), pod.workload()));
        let serving = [listeners.v4, listeners.v6]
            .into_iter()
            .flatten()
            .map(|sockets| {
                let pod = pod.clone();
                let gate = gate.clone();
                async move {
                    tokio::join!(
                        server::serve_udp(sockets.udp, pod.clone()),
                        server::serve_tcp(gate.listener(sockets.tcp), pod),
                    );
                }
            });
        futures_util::future::join_all(serving).await;
    }

    /// The servers forwarded queries go to.
    pub fn upstreams(&self) -> &[SocketAddr] {
        self.forwarder.upstreams()
    }
}

/// `cluster.local`, `cluster.local.` or `Cluster.Local` → `cluster.local.`.
fn parse_domain(domain: &str) -> Result<Name, DnsError> {
    let err = |reason: String| DnsError::Domain {
        domain: domain.to_string(),
        reason,
    };
    let trimmed = domain.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(err("empty (the root cannot be the cluster domain)".into()));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| err(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

fn read_upstreams(path: &Path) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            warn!(path = %path.display(), error = %e,
                "cannot read resolv.conf; DNS names outside the cluster will get SERVFAIL");
            return Vec::new();
        }
    };
    let (servers, skipped) = resolv_conf::nameservers(&text);
    for line in skipped {
        warn!(path = %path.display(), nameserver = %line, "nameserver not used");
    }
    if servers.is_empty() {
        warn!(path = %path.display(),
            "resolv.conf names no nameserver; DNS names outside the cluster will get SERVFAIL");
    }
    servers
}
