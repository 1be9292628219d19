//! Captured outbound connections (15001): tunnel to enrolled destinations over HBONE,
//! pass everything else through in plaintext.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_shared::config::index::Snapshot;
use ambit_shared::config::{Protocol, Service, Waypoint};
use ambit_shared::copy;
use ambit_shared::hbone::{self, H2Stream, PoolKey};
use ambit_shared::ports;
use ambit_shared::tls;
use ambit_shared::trace::TraceParent;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info_span, warn};

use super::balance::Lease;
use super::{AccessLog, Pod, ProxyContext};
use crate::capture::{self, connect_in};

/// Handles one captured connection from `pod`.
pub async fn handle(stream: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    // sk_lookup hands us the SYN unchanged, so the original destination is our local address.
    let dst = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "captured connection closed before it could be read");
            return;
        }
    };
    let span = info_span!("outbound", src = %peer, dst = %dst, pod = %pod.workload());
    async move {
        let mut log = AccessLog::new(&ctx, "outbound", peer, dst);
        log.source(Some(pod.identity.clone()), Some(pod.workload()));
        // The kernel programs refuse link-local destinations at connect(); this is the
        // backstop should one arrive anyway. It cannot be tunnelled, and sending it in
        // plaintext could reach an enrolled pod on the same link around the mesh.
        if capture::addrs::is_link_local(dst.ip()) {
            return refuse(
                &stream,
                &mut log,
                format!("link-local destination {dst} is outside the mesh"),
            );
        }
        if pod.is_self_call(dst) {
            let port = dst.port();
            return refuse(
                &stream,
                &mut log,
                format!("refused call to ztunnel's own port {port}"),
            );
        }
        let snapshot = ctx.snapshot.borrow().clone();
        // Each connection is routed once: to a waypoint (which picks the backend), to a
        // service endpoint, or to the address dialled.
        let upstream = match snapshot.service_by_vip(dst.ip()) {
            Some((svc, endpoints)) => match snapshot.config.waypoint_for_service(svc) {
                Some(wp) => {
                    log.service(format!("{}/{}", svc.namespace, svc.name));
                    via_waypoint(peer, dst, wp, &snapshot, &pod, &ctx, &mut log).await
                }
                None => {
                    to_service(peer, dst, svc, endpoints, &snapshot, &pod, &ctx, &mut log).await
                }
            },
            None => match snapshot.waypoint_in_front_of(dst.ip()) {
                Some(wp) => via_waypoint(peer, dst, wp, &snapshot, &pod, &ctx, &mut log).await,
                None => to_address(peer, dst, &snapshot, &pod, &ctx, &mut log)
                    .await
                    .map(|io| (io, None)),
            },
        };
        let (upstream, _lease) = match upstream {
            Ok(u) => u,
            Err(e) => return refuse(&stream, &mut log, e),
        };
        log.established();
        let c = &log.counters;
        let copied = match upstream.into_tunnel() {
            Ok(tunnel) => copy::tunnel(stream, tunnel, &c.a_to_b, &c.b_to_a).await,
            Err(tcp) => copy::bidirectional(stream, tcp, c).await,
        };
        if let Err(e) = copied.or_else(ignore_close) {
            log.fail(e);
        }
    }
    .instrument(span)
    .await
}

/// Connect attempts on distinct endpoints before a service connection fails.
const MAX_SERVICE_ATTEMPTS: usize = 3;

/// Anything we can copy bytes to and from: a tunnel stream or a plain TCP connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {
    /// The HBONE stream, if this is one: it is copied without the slice copies.
    fn into_tunnel(self: Box<Self>) -> Result<H2Stream, Box<dyn Io>>;
}

impl Io for H2Stream {
    fn into_tunnel(self: Box<Self>) -> Result<H2Stream, Box<dyn Io>> {
        Ok(*self)
    }
}

impl Io for tokio::net::TcpStream {
    fn into_tunnel(self: Box<Self>) -> Result<H2Stream, Box<dyn Io>> {
        Err(self)
    }
}

/// Connects to a single address: HBONE to an enrolled workload, plaintext otherwise.
async fn to_address(
    peer: SocketAddr,
    dst: SocketAddr,
    snapshot: &Snapshot,
    pod: &Arc<Pod>,
    ctx: &ProxyContext,
    log: &mut AccessLog,
) -> Result<Box<dyn Io>, String> {
    match snapshot
        .workload_by_ip(dst.ip())
        .filter(|w| snapshot.config.is_enrolled(w))
    {
        Some(w) => {
            let dst_identity = snapshot.config.identity_of(w).map_err(|e| e.to_string())?;
            let hbone_addr = SocketAddr::new(dst.ip(), ports::HBONE);
            log.destination(
                Some(dst_identity.clone()),
                Some(format!("{}/{}", w.namespace, w.name)),
                Some(hbone_addr),
            );
            let tunnel = open_tunnel(peer, dst, hbone_addr, dst_identity, pod, ctx)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(tunnel))
        }
        None => {
            log.destination(None, None, None);
            let tcp = connect_in(&pod.netns, dst, None, &ctx.admission.fds())
                .await
                .map_err(|e| format!("connect {dst}: {e}"))?;
            Ok(Box::new(tcp))
        }
    }
}

/// Connects to one of a service's endpoints, retrying connect failures on others.
#[allow(clippy::too_many_arguments)]
async fn to_service(
    peer: SocketAddr,
    vip: SocketAddr,
    svc: &Service,
    endpoints: &[IpAddr],
    snapshot: &Snapshot,
    pod: &Arc<Pod>,
    ctx: &ProxyContext,
    log: &mut AccessLog,
) -> Result<(Box<dyn Io>, Option<Lease>), String> {
    let name = format!("{}/{}", svc.namespace, svc.name);
    log.service(name.clone());
    let port = svc
        .ports
        .iter()
        .find(|p| p.port == vip.port() && p.protocol == Protocol::Tcp)
        .ok_or_else(|| format!("service {name} has no TCP port {}", vip.port()))?;
    let target_port = port.target_port.unwrap_or(port.port);
    if endpoints.is_empty() {
        return Err(format!("service {name} has no endpoints"));
    }
    let mut attempts = Attempts::new(ctx, format!("service {name}"), endpoints);
    while let Some(ip) = attempts.next() {
        let dst = SocketAddr::new(ip, target_port);
        match to_address(peer, dst, snapshot, pod, ctx, log).await {
            Ok(io) => return Ok(attempts.connected(ip, io)),
            Err(e) => attempts.failed(ip, format!("{dst}: {e}")),
        }
    }
    Err(attempts.exhausted())
}

/// Tunnels to one of a waypoint's replicas, with the address the client dialled as the
/// CONNECT authority, so the waypoint (not us) picks the backend.
async fn via_waypoint(
    peer: SocketAddr,
    dst: SocketAddr,
    wp: &Waypoint,
    snapshot: &Snapshot,
    pod: &Arc<Pod>,
    ctx: &ProxyContext,
    log: &mut AccessLog,
) -> Result<(Box<dyn Io>, Option<Lease>), String> {
    let name = format!("{}/{}", wp.namespace, wp.name);
    let identity = snapshot
        .config
        .waypoint_identity(wp)
        .map_err(|e| e.to_string())?;
    // Each replica by its address of the destination's family: the pod reached the
    // destination over that family, so it can reach the waypoint over it too. A replica
    // without one is dialled on its other family.
    let replicas: Vec<(IpAddr, String)> = snapshot
        .config
        .waypoint_workloads(wp)
        .filter_map(|w| {
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or(w.ips.first())?;
            Some((*ip, format!("{}/{}", w.namespace, w.name)))
        })
        .collect();
    if replicas.is_empty() {
        return Err(format!("waypoint {name} has no replicas"));
    }
    let ips: Vec<IpAddr> = replicas.iter().map(|(ip, _)| *ip).collect();
    let mut attempts = Attempts::new(ctx, format!("waypoint {name}"), &ips);
    while let Some(ip) = attempts.next() {
        let hbone_addr = SocketAddr::new(ip, ports::HBONE);
        let replica = replicas
            .iter()
            .find(|(r, _)| *r == ip)
            .map(|(_, n)| n.clone());
        log.destination(Some(identity.clone()), replica, Some(hbone_addr));
        match open_tunnel(peer, dst, hbone_addr, identity.clone(), pod, ctx).await {
            Ok(tunnel) => return Ok(attempts.connected(ip, Box::new(tunnel))),
            Err(e) => attempts.failed(ip, format!("{hbone_addr}: {e}")),
        }
    }
    Err(attempts.exhausted())
}

/// Up to [`MAX_SERVICE_ATTEMPTS`] distinct candidates, picked by the balancer. A candidate
/// that fails is ejected; the one that connects is leased for the connection's life.
struct Attempts<'a> {
    ctx: &'a ProxyContext,
    /// Names the target in logs and errors, e.g. `service shop/api`.
    what: String,
    candidates: &'a [IpAddr],
    tried: Vec<IpAddr>,
    last_error: String,
}

impl<'a> Attempts<'a> {
    fn new(ctx: &'a ProxyContext, what: String, candidates: &'a [IpAddr]) -> Self {
        Attempts {
            ctx,
            what,
            candidates,
            tried: Vec::new(),
            last_error: String::new(),
        }
    }

    fn next(&mut self) -> Option<IpAddr> {
        if self.tried.len() >= MAX_SERVICE_ATTEMPTS {
            return None;
        }
        let ip = self.ctx.balancer.pick(self.candidates, &self.tried)?;
        self.tried.push(ip);
        Some(ip)
    }

    fn connected(&self, ip: IpAddr, io: Box<dyn Io>) -> (Box<dyn Io>, Option<Lease>) {
        self.ctx.balancer.succeeded(ip);
        (io, Some(self.ctx.balancer.lease(ip)))
    }

    fn failed(&mut self, ip: IpAddr, error: String) {
        let ejected_for = self.ctx.balancer.failed(ip);
        warn!(target_name = %self.what, error = %error, ?ejected_for, "endpoint failed; ejected, trying another");
        self.last_error = error;
    }

    fn exhausted(self) -> String {
        format!(
            "{}: {} attempt(s) failed, last {}",
            self.what,
            self.tried.len(),
            self.last_error
        )
    }
}

/// Fails a connection we could not serve: the app gets a reset, as it would from a host
/// that refused it, rather than a clean close it might mistake for an empty answer.
fn refuse(stream: &TcpStream, log: &mut AccessLog, error: impl std::fmt::Display) {
    warn!(error = %error, "outbound connection failed");
    let _ = stream.set_zero_linger();
    log.fail(error);
}

async fn open_tunnel(
    peer: SocketAddr,
    dst: SocketAddr,
    hbone_addr: SocketAddr,
    dst_identity: ambit_shared::identity::Identity,
    pod: &Arc<Pod>,
    ctx: &ProxyContext,
) -> Result<H2Stream, hbone::Error> {
    let key = PoolKey {
        src: pod.identity.clone(),
        dst: dst_identity.clone(),
        addr: hbone_addr,
        cert_generation: pod.cert.generation(),
    };
    let baggage = format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        pod.namespace, pod.name
    );
    let request = hbone::connect_request(
        dst,
        peer,
        Some(&baggage),
        &TraceParent::generate().to_string(),
    );
    let dial_pod = pod.clone();
    let bundle = ctx.bundle.clone();
    let fds = ctx.admission.fds();
    let dial = move || async move {
        let tcp = connect_in(&dial_pod.netns, hbone_addr, None, &fds)
            .await
            .map_err(|source| hbone::Error::Connect {
                addr: hbone_addr,
                source,
            })?;
        let cert = dial_pod.cert.slot.current().certified.clone();
        let config = tls::client_config(cert, &bundle, dst_identity)?;
        TlsConnector::from(Arc::new(config))
            .connect(
                ServerName::IpAddress(hbone_addr.ip().into()),
                tls::buffered(tcp),
            )
            .await
            .map_err(|source| hbone::Error::Tls {
                addr: hbone_addr,
                source,
            })
    };
    ctx.pool.open(key, request, dial).await
}

/// A peer closing abruptly after the exchange is how many apps end connections.
pub(crate) fn ignore_close(e: std::io::Error) -> std::io::Result<()> {
    if copy::is_closed(&e) { Ok(()) } else { Err(e) }
}
