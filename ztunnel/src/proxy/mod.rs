//! The L4 proxy: per-pod listeners for captured outbound traffic, inbound HBONE and inbound
//! plaintext, plus the access log they share.

pub mod balance;
pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use ambit_shared::admission::{Admission, Gate, Listener, ListenerLimits};
use ambit_shared::certs::IdentityCert;
use ambit_shared::config::PeerAuthMode;
use ambit_shared::config::index::Snapshot;
use ambit_shared::copy::Counters;
use ambit_shared::hbone::Pool;
use ambit_shared::hbone::server;
use ambit_shared::identity::Identity;
use ambit_shared::policy::{self, Decision};
use ambit_shared::ports;
use ambit_shared::tls::SharedBundle;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::capture::Netns;
use crate::metrics::{
    ConnectionFacts, ConnectionMeter, Reporter, ResponseFlags, Traffic, TrafficLabels,
};

/// What every proxy task needs, shared by all pods on the node.
#[derive(Debug)]
pub struct ProxyContext {
    /// The current config, indexed for the data path.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Endpoint load and health for service load balancing.
    pub balancer: balance::Balancer,
    /// Pooled HBONE connections.
    pub pool: Pool,
    /// Roots we trust; replaced when the CA's bundle changes, read at every handshake.
    pub bundle: SharedBundle,
    /// Our trust domain.
    pub trust_domain: String,
    /// Istio's TCP metrics, recorded by [`AccessLog`].
    pub metrics: Arc<Traffic>,
    /// Admission control shared by every listener of the node.
    pub admission: Admission,
    /// The per-pod listeners' gates, one per kind, shared by every pod of the node.
    pub gates: Gates,
    /// Time bounds of inbound HBONE connections.
    pub hbone_timeouts: server::Timeouts,
}

/// One admission gate per kind of per-pod listener: bounds (per source, in total) apply to
/// the kind across all pods, since all pods share the node's descriptors.
#[derive(Debug, Clone)]
pub struct Gates {
    /// 15001.
    pub outbound: Gate,
    /// 15006.
    pub inbound_plaintext: Gate,
    /// 15008.
    pub hbone: Gate,
    /// 15053 over TCP.
    pub dns: Gate,
}

impl Gates {
    /// The gates, with `per_source` connections at most from one address on each kind.
    pub fn new(admission: &Admission, per_source: Option<usize>) -> Self {
        let limits = ListenerLimits {
            max_connections: None,
            max_per_source: per_source,
        };
        Gates {
            outbound: admission.gate("outbound", limits),
            inbound_plaintext: admission.gate("inbound_plaintext", limits),
            hbone: admission.gate(inbound::LISTENER, limits),
            // Each pod's DNS server bounds its own TCP connections (32).
            dns: admission.gate("dns_tcp", ListenerLimits::default()),
        }
    }
}

/// An enrolled pod on this node, as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    /// Workload name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE identity.
    pub identity: Identity,
    /// Every address it has (IPv4, IPv6, link-local), the primary one first.
    pub addrs: Vec<IpAddr>,
    /// Its network namespace.
    pub netns: Arc<Netns>,
    /// Its certificate.
    pub cert: Arc<IdentityCert>,
}

impl Pod {
    /// `namespace/name`, as logs show it.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A connection that reached a capture listener addressed to loopback, the pod itself, or
    /// one of the proxy's ports was never captured: the app called ztunnel directly.
    pub fn is_self_call(&self, dst: SocketAddr) -> bool {
        dst.ip().is_loopback() || self.has_addr(dst.ip()) || ports::is_reserved(dst.port())
    }

    /// Whether `ip` is one of the pod's addresses.
    pub fn has_addr(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip.to_canonical())
    }

    /// The address that names the pod in logs.
    pub fn primary(&self) -> Option<IpAddr> {
        self.addrs.first().copied()
    }
}

/// Runs an accept loop until the task is aborted; one task per connection. Admission
/// control decides what is accepted; an accept error never ends the loop.
pub async fn accept_loop<F, Fut>(mut listener: Listener, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let conn = listener.accept().await;
        let task = handle(conn.stream, conn.peer);
        let permit = conn.permit;
        tokio::spawn(async move {
            task.await;
            drop(permit);
        });
    }
}

/// Why an inbound connection is refused, or `Ok` to let it in. Pure: logs nothing.
///
/// - A workload behind a waypoint accepts only that waypoint's identity, and nothing
///   more is checked here: the waypoint enforced the policies (L4 and L7) with the
///   client's identity.
/// - Any other workload gets peer authentication and L4 policy, with the TLS peer's
///   identity; a policy with L7 fields fails closed, since nothing could enforce them.
pub fn decide(
    snap: &Snapshot,
    src_identity: Option<&Identity>,
    src: IpAddr,
    dst: SocketAddr,
) -> Result<policy::Notes, String> {
    if crate::capture::addrs::is_link_local(dst.ip()) {
        return Err(format!(
            "{} is link-local: outside the mesh (no workload has it in the config)",
            dst.ip()
        ));
    }
    let Some(w) = snap.workload_by_ip(dst.ip()) else {
        return Err(format!(
            "{} is no longer a workload in the config",
            dst.ip()
        ));
    };
    // A workload behind a waypoint is reached only through it: anything else is a bypass.
    if let Some(wp) = snap.waypoint_in_front_of(dst.ip()) {
        let expected = snap
            .config
            .waypoint_identity(wp)
            .map_err(|e| e.to_string())?;
        if src_identity != Some(&expected) {
            return Err(format!(
                "{} is behind waypoint {}/{}: only {expected} may connect (bypass refused)",
                dst.ip(),
                wp.namespace,
                wp.name
            ));
        }
        // Policies for a waypoint-fronted workload are enforced by the waypoint, per
        // request, with the client's identity (the TLS peer of the tunnel it received).
        // Here the peer is the waypoint itself, so evaluating them again would judge the
        // waypoint's identity instead of the client's, and could not see L7 attributes.
        return Ok(policy::Notes::default());
    }
    if src_identity.is_none() {
        let (mode, source) = snap.config.peer_auth_mode(w);
        if mode == PeerAuthMode::Strict {
            let name = source.map(|p| p.name.as_str()).unwrap_or_default();
            return Err(format!(
                "plaintext refused by STRICT peer authentication {name}"
            ));
        }
    }
    let conn = policy::Conn {
        src_identity,
        src,
        dst,
        dst_workload: w,
        request: None,
    };
    // No waypoint fronts this workload: L7 policies cannot be enforced and fail closed.
    match policy::evaluate(&conn, &snap.policies, false) {
        (Decision::Allow, notes) => Ok(notes),
        (Decision::Deny { reason, .. }, _) => Err(reason),
    }
}

/// [`decide`], logging audits, dry-run verdicts and denials.
pub fn authorize(
    snap: &Snapshot,
    src_identity: Option<&Identity>,
    src: IpAddr,
    dst: SocketAddr,
) -> Result<(), String> {
    match decide(snap, src_identity, src, dst) {
        Ok(notes) => {
            for p in notes.audited {
                info!(policy = %p, src = %src, dst = %dst, "AUDIT policy matched");
            }
            for (p, action) in notes.dry_run {
                info!(policy = %p, would = ?action, src = %src, dst = %dst, "dry-run policy matched; not enforced");
            }
            Ok(())
        }
        Err(reason) => {
            warn!(%src, %dst, src_identity = %src_identity.map(ToString::to_string).unwrap_or_default(), reason = %reason,
                "connection denied");
            Err(reason)
        }
    }
}

/// Resolves when a config change means an open connection is no longer allowed, with the
/// reason. Never resolves otherwise.
pub async fn revoked(
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    src_identity: Option<Identity>,
    src: IpAddr,
    dst: SocketAddr,
) -> String {
    loop {
        if snapshot.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let snap = snapshot.borrow_and_update().clone();
        if let Err(reason) = decide(&snap, src_identity.as_ref(), src, dst) {
            warn!(%src, %dst, reason = %reason, "policy changed: closing an open connection that is now denied");
            return reason;
        }
    }
}

/// One access-log line and one set of TCP metrics per connection, written when the
/// connection ends (or its task is cancelled), so no connection goes unlogged or uncounted.
///
/// The metrics count the connection as opened at [`AccessLog::established`], with the
/// labels known then, and meter its bytes until it ends; a connection that never got that
/// far counts as opened and closed when the log drops, with response flags saying why.
#[derive(Debug)]
pub struct AccessLog {
    ctx: Arc<ProxyContext>,
    meter: Option<ConnectionMeter>,
    denied: bool,
    direction: &'static str,
    protocol: &'static str,
    src_addr: SocketAddr,
    src_identity: Option<Identity>,
    src_workload: Option<String>,
    dst_addr: SocketAddr,
    dst_hbone: Option<SocketAddr>,
    dst_identity: Option<Identity>,
    dst_workload: Option<String>,
    dst_service: Option<String>,
    start: Instant,
    /// Bytes client→server (`a_to_b`) and server→client (`b_to_a`).
    pub counters: Arc<Counters>,
    error: Option<String>,
}

impl AccessLog {
    /// Starts a log entry; `direction` is `outbound` (we report as the source) or
    /// `inbound` (as the destination).
    pub fn new(
        ctx: &Arc<ProxyContext>,
        direction: &'static str,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
    ) -> Self {
        AccessLog {
            ctx: ctx.clone(),
            meter: None,
            denied: false,
            direction,
            protocol: "TCP",
            src_addr,
            src_identity: None,
            src_workload: None,
            dst_addr,
            dst_hbone: None,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            start: Instant::now(),
            counters: Arc::default(),
            error: None,
        }
    }

    /// Source identity and workload.
    pub fn source(&mut self, identity: Option<Identity>, workload: Option<String>) {
        self.src_identity = identity;
        self.src_workload = workload;
    }

    /// Destination identity, workload and HBONE address (which makes the protocol HBONE).
    pub fn destination(
        &mut self,
        identity: Option<Identity>,
        workload: Option<String>,
        hbone: Option<SocketAddr>,
    ) {
        self.dst_identity = identity;
        self.dst_workload = workload;
        if hbone.is_some() {
            self.protocol = "HBONE";
        }
        self.dst_hbone = hbone;
    }

    /// The service whose VIP the client dialled.
    pub fn service(&mut self, name: String) {
        self.dst_service = Some(name);
    }

    /// Marks the connection as received over HBONE (inbound side).
    pub fn via_hbone(&mut self) {
        self.protocol = "HBONE";
    }

    /// Records why the connection failed.
    pub fn fail(&mut self, error: impl std::fmt::Display) {
        self.error = Some(error.to_string());
    }

    /// Records that policy refused or closed the connection.
    pub fn deny(&mut self, error: impl std::fmt::Display) {
        self.denied = true;
        self.fail(error);
    }

    /// Marks the connection as set up: both ends are connected and bytes are about to
    /// flow. Counts it as opened, with the labels known now, and starts metering its bytes.
    pub fn established(&mut self) {
        if self.meter.is_none() {
            self.meter = Some(self.open_meter());
        }
    }

    fn open_meter(&self) -> ConnectionMeter {
        let snapshot = self.ctx.snapshot.borrow().clone();
        let facts = ConnectionFacts {
            reporter: if self.direction == "outbound" {
                Reporter::Source
            } else {
                Reporter::Destination
            },
            src: self.src_addr,
            src_identity: self.src_identity.as_ref(),
            dst: self.dst_addr,
            endpoint: self.dst_hbone.map(|a| a.ip()),
            dst_identity: self.dst_identity.as_ref(),
            mtls: self.protocol == "HBONE",
        };
        self.ctx
            .metrics
            .open(TrafficLabels::new(&snapshot, &facts), self.counters.clone())
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let established = self.meter.is_some();
        let mut meter = match self.meter.take() {
            Some(m) => m,
            None => self.open_meter(),
        };
        meter.set_flags(if self.denied {
            ResponseFlags::Deny
        } else if self.error.is_some() && !established {
            ResponseFlags::ConnectFailure
        } else {
            ResponseFlags::None
        });
        drop(meter);
        let (sent, received) = self.counters.get();
        let opt = |v: &Option<Identity>| v.as_ref().map(ToString::to_string).unwrap_or_default();
        info!(
            target: "access",
            direction = self.direction,
            protocol = self.protocol,
            src.addr = %self.src_addr,
            src.identity = %opt(&self.src_identity),
            src.workload = self.src_workload.as_deref().unwrap_or_default(),
            dst.addr = %self.dst_addr,
            dst.hbone_addr = %self.dst_hbone.map(|a| a.to_string()).unwrap_or_default(),
            dst.identity = %opt(&self.dst_identity),
            dst.workload = self.dst_workload.as_deref().unwrap_or_default(),
            dst.service = self.dst_service.as_deref().unwrap_or_default(),
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            error = self.error.as_deref().unwrap_or_default(),
            "connection complete"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ambit_shared::config::parse_str;

    use super::*;

    const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: waypoint }
  - name: data
    labels: { ambit.dev/dataplane-mode: ambient }
waypoints:
  - { name: waypoint, namespace: shop }
workloads:
  - { name: waypoint-1, namespace: shop, serviceAccount: waypoint, ips: [10.1.1.9], node: a, labels: { gateway.networking.k8s.io/gateway-name: waypoint } }
  - { name: api-1, namespace: shop, serviceAccount: api, ips: [10.1.1.2], node: a }
  - { name: db-1, namespace: data, serviceAccount: db, ips: [10.1.2.2], node: a }
authorizationPolicies:
  - { name: a-gets-v1, namespace: shop, action: ALLOW, rules: [{ from: [{ principals: ['spiffe://cluster.local/ns/shop/sa/client-a'] }], to: [{ methods: [GET], paths: ['/v1/*'] }] }] }
  - { name: reads-only, namespace: data, action: ALLOW, rules: [{ to: [{ methods: [GET] }] }] }
"#;

    #[test]
    fn fronted_workloads_accept_their_waypoint_and_leave_policy_to_it() {
        let snap = Snapshot::new(Arc::new(
            parse_str(Path::new("t.yaml"), CONFIG).expect("valid config"),
        ));
        let id = |s: &str| s.parse::<Identity>().expect("identity");
        let waypoint = id("spiffe://cluster.local/ns/shop/sa/waypoint");
        let client = id("spiffe://cluster.local/ns/shop/sa/client-a");
        let src: IpAddr = "10.1.1.9".parse().expect("ip");
        let api: SocketAddr = "10.1.1.2:8080".parse().expect("addr");
        let db: SocketAddr = "10.1.2.2:5432".parse().expect("addr");

        // From the waypoint: in, although the policy names the client and L7 fields.
        assert_eq!(
            decide(&snap, Some(&waypoint), src, api),
            Ok(policy::Notes::default())
        );
        // From the client itself: a bypass, refused whatever the policy says.
        let err = decide(&snap, Some(&client), src, api).expect_err("bypass");
        assert!(err.contains("bypass refused"), "{err}");
        // No waypoint in front of db: its L7 policy fails closed, even for the waypoint.
        for who in [&client, &waypoint] {
            let err = decide(&snap, Some(who), src, db).expect_err("fail closed");
            assert!(err.contains("no waypoint to enforce them"), "{err}");
        }
    }
}
