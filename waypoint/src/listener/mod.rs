//! The HBONE listener (15008): mutual TLS, CONNECT, then HTTP or TCP inside the tunnel.
//!
//! - The TLS peer is the source workload: its ztunnel tunnels with the workload's
//!   certificate. The server requires a client certificate from the trust domain.
//! - The CONNECT `:authority` names what the client dialled: a service `VIP:port` this
//!   waypoint serves (the service's or its namespace's `ambit.dev/use-waypoint` label
//!   names it), or a workload `IP:port` in the waypoint's namespace. Anything else gets
//!   400.
//! - Inside the tunnel, [`detect`] tells HTTP/1, HTTP/2 (h2c, gRPC) and other TCP apart;
//!   [`http`] proxies HTTP requests, [`tcp`] forwards the rest at L4.
//!
//! Bounds: connections go through [`ambit_shared::admission`] (descriptor reserve,
//! handshakes in flight per process and per source, handshake timeout); HBONE connections
//! need their preface in time, answer keepalive PINGs and close when idle without a stream;
//! HBONE caps streams per connection; HTTP/1 heads must arrive within
//! [`ListenerConfig::partial_head_timeout`] of their first byte; HTTP/1 heads and HTTP/2
//! header lists are capped; HTTP/2 caps concurrent streams and resets; request bodies are
//! buffered only up to the retry cap; [`crate::overload`] caps HBONE streams and requests
//! in flight, globally and per client identity.
//!
//! A CONNECT to the waypoint's own address (the address it was reached on, or any replica
//! of this waypoint in the config) is refused with 400: it would loop through the
//! waypoint again, doubling every cost a client can impose.
//!
//! Access logs name the client by what is proven: `src.addr` is the TLS peer's address and
//! `src.identity` its certificate's identity. The `forwarded` header of the CONNECT is what
//! the source ztunnel *claims* the client's address is; it is logged as
//! `src.forwarded_for`, and authorization never uses it.

pub mod detect;
pub mod head_timeout;
pub mod http;
#[cfg(feature = "bench-plaintext")]
pub mod plaintext;
pub mod tcp;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use ::http::StatusCode;
use ambit_shared::admission::{Admission, HandshakeError, Listener};
use ambit_shared::config::Protocol;
use ambit_shared::config::index::Snapshot;
use ambit_shared::drain::DrainWatcher;
use ambit_shared::hbone::request::{RequestError, forwarded_client, parse_connect};
use ambit_shared::hbone::server::{self, Incoming};
use ambit_shared::identity::Identity;
use ambit_shared::ports;
use ambit_shared::tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use self::detect::Detected;
use self::upgrade::Allowlist;
use crate::metrics::{Metrics, Source};
use crate::overload::{Overload, Permit, Resource};
use crate::route::{DeclaredProtocol, RouteTable, Target};
use crate::upstream::{Endpoint, Upstream};

/// The HBONE listener's name in metrics and logs.
pub const LISTENER: &str = "hbone";
/// Default bound on receiving an HTTP/1 request head once its first byte has arrived.
pub const DEFAULT_PARTIAL_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Listener tuning.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// How long to wait for a client's first bytes before treating the tunnel as TCP.
    /// Default 1 s.
    pub detect_timeout: Duration,
    /// Largest HTTP/1 request head, and HTTP/2 header list. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most headers in an HTTP/1 request. Default 100.
    pub max_headers: usize,
    /// A client must send a request head within this. hyper also counts the idle time
    /// between requests on an HTTP/1.1 keep-alive connection against it, so it is the
    /// HTTP/1.1 idle timeout too. Default `None`: a pooled client connection is never cut
    /// under its owner (who would then race our close with its next request); peers are
    /// authenticated mesh workloads, and each idle connection costs only its buffers.
    pub header_read_timeout: Option<Duration>,
    /// An HTTP/1 request head must be complete within this of its first byte; the
    /// connection is closed otherwise. Unlike hyper's header-read timeout it never counts
    /// the idle time between requests, so keep-alive connections are not cut by it.
    /// Default [`DEFAULT_PARTIAL_HEAD_TIMEOUT`]; `None`: never.
    pub partial_head_timeout: Option<Duration>,
    /// Time bounds of HBONE connections (preface, keepalive, idle without streams).
    pub hbone: server::Timeouts,
    /// Concurrent HTTP/2 streams per client connection. Default 1000.
    pub max_concurrent_streams: u32,
    /// An upgraded stream (WebSocket, extended CONNECT) that moves no bytes either way for
    /// this long is closed. Default `None`: long-lived streams live as long as their peers
    /// keep them open.
    pub idle_timeout: Option<Duration>,
    /// During a drain, an HTTP/1.1 connection idle this long is closed; requests that
    /// arrive before that get `Connection: close` on their response. Default 1 s: long
    /// enough that a client sending steadily is told by a response rather than racing a
    /// close.
    pub drain_idle_close: Duration,
    /// Upgrade protocols spliced; see [`upgrade`]. Default: `websocket`.
    pub upgrades: Allowlist,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            detect_timeout: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: None,
            partial_head_timeout: Some(DEFAULT_PARTIAL_HEAD_TIMEOUT),
            hbone: server::Timeouts::default(),
            max_concurrent_streams: 1000,
            idle_timeout: None,
            drain_idle_close: Duration::from_secs(1),
            upgrades: Allowlist::default(),
        }
    }
}

/// Who this waypoint is.
#[derive(Debug, Clone)]
pub struct Waypoint {
    /// Its name, as `ambit.dev/use-waypoint` labels name it.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its identity (the waypoint's service account).
    pub identity: Identity,
}

/// What every tunnel needs.
#[derive(Debug)]
pub struct Context {
    /// Who we are.
    pub waypoint: Waypoint,
    /// The config in force, indexed.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The routes in force.
    pub routes: watch::Receiver<Arc<dyn RouteTable>>,
    /// Endpoints, connections, retries.
    pub upstream: Upstream,
    /// Telemetry.
    pub metrics: Arc<Metrics>,
    /// Caps on streams and requests in flight.
    pub overload: Arc<Overload>,
    /// Tuning.
    pub cfg: ListenerConfig,
    /// Admission control shared by the waypoint's listeners.
    pub admission: Admission,
}

/// One accepted tunnel: who sent it and what it dialled.
#[derive(Debug)]
pub struct Downstream {
    /// Shared state.
    pub ctx: Arc<Context>,
    /// The service or workload dialled.
    pub target: Target,
    /// The client, as metrics see it.
    pub source: Source,
    /// The TLS peer's address: what authorization uses and access logs show (`src.addr`).
    pub peer: SocketAddr,
    /// The client address the CONNECT's `forwarded` header claims; unverified, logged as
    /// `src.forwarded_for` only.
    pub forwarded: Option<SocketAddr>,
    /// The CONNECT authority.
    pub dialled: SocketAddr,
    /// This tunnel's place under the HBONE stream caps, given back when the tunnel and
    /// its requests are done.
    pub admission: Option<Permit>,
}

/// Why a CONNECT is refused; every case is the client's mistake (400).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not a CONNECT to `ip:port`.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A service that uses another waypoint, or none.
    #[error(
        "service {service} is not served by waypoint {waypoint} (its use-waypoint is {uses:?})"
    )]
    NotServedHere {
        /// `namespace/name`.
        service: String,
        /// This waypoint.
        waypoint: String,
        /// What the labels name, if anything.
        uses: Option<String>,
    },
    /// A service port that does not exist.
    #[error("service {service} has no TCP port {port}")]
    NoSuchPort {
        /// `namespace/name`.
        service: String,
        /// The port dialled.
        port: u16,
    },
    /// The waypoint itself: the address it was reached on, or a replica of it.
    #[error("{addr} is this waypoint's own address")]
    OwnAddress {
        /// The authority.
        addr: SocketAddr,
    },
    /// Neither a service VIP nor a workload of our namespace.
    #[error("{addr} is neither a service VIP nor a workload in namespace {namespace}")]
    UnknownDestination {
        /// The authority.
        addr: SocketAddr,
        /// Our namespace.
        namespace: String,
    },
}

impl ResolveError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ResolveError::Request(e) => e.status(),
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// What the CONNECT authority `dst` names, for this waypoint, which was reached on
/// `local` (the accepted connection's local address).
pub fn resolve(
    snap: &Snapshot,
    waypoint: &Waypoint,
    dst: SocketAddr,
    local: Option<IpAddr>,
) -> Result<Target, ResolveError> {
    if ports::is_reserved(dst.port()) {
        return Err(RequestError::ReservedPort(dst.port()).into());
    }
    if is_own_address(snap, waypoint, dst.ip(), local) {
        return Err(ResolveError::OwnAddress { addr: dst });
    }
    if let Some((svc, _)) = snap.service_by_vip(dst.ip()) {
        let key = format!("{}/{}", svc.namespace, svc.name);
        let uses = snap.waypoint_of(svc);
        if svc.namespace != waypoint.namespace || uses != Some(waypoint.name.as_str()) {
            return Err(ResolveError::NotServedHere {
                service: key,
                waypoint: format!("{}/{}", waypoint.namespace, waypoint.name),
                uses: uses.map(str::to_string),
            });
        }
        let port = svc
            .ports
            .iter()
            .find(|p| p.port == dst.port() && p.protocol == Protocol::Tcp)
            .ok_or(ResolveError::NoSuchPort {
                service: key,
                port: dst.port(),
            })?;
        return Ok(Target::Service {
            namespace: svc.namespace.as_str().into(),
            name: svc.name.as_str().into(),
            port: port.port,
            target_port: port.target_port.unwrap_or(port.port),
            port_name: port.name.as_deref().map(Into::into),
        });
    }
    match snap.workload_by_ip(dst.ip()) {
        Some(w) if w.namespace == waypoint.namespace => Ok(Target::Workload {
            namespace: w.namespace.as_str().into(),
            name: w.name.as_str().into(),
            addr: dst,
        }),
        _ => Err(ResolveError::UnknownDestination {
            addr: dst,
            namespace: waypoint.namespace.clone(),
        }),
    }
}

/// Whether `ip` is this waypoint: where it was reached, or a workload that is one of its
/// replicas (labelled with its name, or running as its identity). Other addresses need a
/// workload or service in the config to be served at all.
fn is_own_address(snap: &Snapshot, waypoint: &Waypoint, ip: IpAddr, local: Option<IpAddr>) -> bool {
    if Some(ip) == local {
        return true;
    }
    let Some(w) = snap.workload_by_ip(ip) else {
        return false;
    };
    let replica = snap
        .config
        .waypoint(&waypoint.namespace, &waypoint.name)
        .is_some_and(|wp| {
            snap.config
                .waypoint_workloads(wp)
                .any(|r| std::ptr::eq(r, w))
        });
    replica || snap.config.identity_of(w).ok().as_ref() == Some(&waypoint.identity)
}

/// The endpoints of a target: a service's on its target port, or the workload itself.
pub fn endpoints(snap: &Snapshot, target: &Target) -> Vec<Endpoint> {
    match target {
        Target::Service {
            namespace,
            name,
            target_port,
            ..
        } => snap
            .service(namespace, name)
            .map(|(_, ips)| {
                ips.iter()
                    .map(|ip| endpoint(snap, SocketAddr::new(*ip, *target_port)))
                    .collect()
            })
            .unwrap_or_default(),
        Target::Workload { addr, .. } => vec![endpoint(snap, *addr)],
    }
}

/// An endpoint at `addr`: over HBONE with its workload's identity when it is in the mesh.
pub fn endpoint(snap: &Snapshot, addr: SocketAddr) -> Endpoint {
    let identity = snap
        .workload_by_ip(addr.ip())
        .filter(|w| snap.config.is_enrolled(w))
        .and_then(|w| snap.config.identity_of(w).ok());
    Endpoint { addr, identity }
}

/// Accepts HBONE connections until a drain starts; one task per connection. Admission
/// control decides what is accepted; an accept error never ends the loop.
pub async fn serve(
    mut listener: Listener,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, waypoint = %ctx.waypoint.name, "serving HBONE");
    }
    loop {
        let conn = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => {
                info!("draining: no longer accepting HBONE connections");
                return;
            }
        };
        let span = info_span!("hbone", peer = %conn.peer);
        let task = connection(
            conn.stream,
            conn.peer,
            acceptor.clone(),
            ctx.clone(),
            drain.clone(),
        );
        let permit = conn.permit;
        tokio::spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Builds the TLS acceptor: our certificate (read at every handshake, so renewals apply),
/// client certificates from `trust_domain` required.
pub fn acceptor(
    cert: Arc<ambit_shared::tls::CertSlot>,
    bundle: &ambit_shared::tls::SharedBundle,
    trust_domain: &str,
) -> Result<TlsAcceptor, tls::TlsError> {
    let config = tls::server_config(cert, bundle, trust_domain)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    // The address the client reached us on: a CONNECT to it would loop back here. (As
    // IPv4 when a dual-stack listener shows it v4-mapped, like the peer.)
    let local = tcp
        .local_addr()
        .ok()
        .map(|a| ambit_shared::listen::canonical(a).ip());
    let tls = match ctx
        .admission
        .tls_handshake(LISTENER, &acceptor, tcp, peer.ip())
        .await
    {
        Ok(tls) => tls,
        // Counted in the admission metrics; logging each would let a flood of idle
        // connections flood the log too.
        Err(
            e @ (HandshakeError::Shed(_) | HandshakeError::Timeout(_) | HandshakeError::Closed),
        ) => {
            debug!(error = %e, "HBONE connection closed before its handshake");
            return;
        }
        Err(e) => {
            warn!(error = %e, "HBONE TLS handshake failed; connection refused");
            return;
        }
    };
    let peer_identity = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(id) => id,
        Err(e) => {
            warn!(error = %e, "HBONE peer has no usable identity; connection refused");
            return;
        }
    };
    debug!(peer_identity = %peer_identity, "HBONE connection established");
    let shutdown = {
        let drain = drain.clone();
        async move { drain.signaled().await }
    };
    let result = server::serve_with_shutdown(
        tls,
        ctx.cfg.hbone,
        |incoming| {
            tunnel(
                incoming,
                peer,
                local,
                peer_identity.clone(),
                ctx.clone(),
                drain.clone(),
            )
            .in_current_span()
        },
        shutdown,
    )
    .await;
    match result {
        Ok(closed) => debug!(?closed, "HBONE connection closed"),
        Err(e) => {
            if let Some(phase) = e.timeout_phase() {
                ctx.admission.count_timeout(LISTENER, phase);
            }
            debug!(error = %e, "HBONE connection ended with an error");
        }
    }
}

async fn tunnel(
    incoming: Incoming,
    peer: SocketAddr,
    local: Option<IpAddr>,
    peer_identity: Identity,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    // Shed first: a refused tunnel should cost as little as possible.
    let admission = match ctx
        .overload
        .admit(Resource::HboneStreams, Some(&peer_identity))
    {
        Ok(p) => p,
        Err(shed) => {
            warn!(status = 503, error = %shed, src.identity = %peer_identity,
                "HBONE request refused: overloaded");
            incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let snap = ctx.snapshot.borrow().clone();
    let resolved = parse_connect(&incoming.request)
        .map_err(ResolveError::from)
        .and_then(|dst| resolve(&snap, &ctx.waypoint, dst, local).map(|t| (dst, t)));
    let (dialled, target) = match resolved {
        Ok(r) => r,
        Err(e) => {
            warn!(status = e.status().as_u16(), error = %e, src.identity = %peer_identity,
                authority = ?incoming.request.uri().authority().map(|a| a.as_str()),
                "HBONE request refused");
            incoming.refuse(e.status());
            return;
        }
    };
    // The tunnel's `baggage` is not read: metric labels come from the config only.
    let forwarded = forwarded_client(&incoming.request);
    let source = Source::new(&snap, &peer_identity, peer.ip(), forwarded.map(|f| f.ip()));
    let stream = match incoming.accept() {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    let down = Arc::new(Downstream {
        ctx: ctx.clone(),
        target,
        source,
        peer,
        forwarded,
        dialled,
        admission: Some(admission),
    });
    serve_stream(stream, down, drain).await;
}

/// Serves one accepted byte stream (an HBONE tunnel, or a plaintext connection) for
/// `down`: as TCP when the service declares it, otherwise as what its first bytes show.
async fn serve_stream<IO>(io: IO, down: Arc<Downstream>, drain: DrainWatcher)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if down.target.declared_protocol() == DeclaredProtocol::Tcp {
        return tcp::forward(detect::Rewind::new(bytes::Bytes::new(), io), down).await;
    }
    let (detected, io) = match detect::detect(io, down.ctx.cfg.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "stream failed before its protocol was known");
            return;
        }
    };
    match detected {
        Detected::Http1 => http::serve_http1(io, down, drain).await,
        Detected::Http2 => http::serve_http2(io, down, drain).await,
        Detected::Tcp => tcp::forward(io, down).await,
    }
}

#[cfg(test)]
mod tests;
