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
//! Bounds: TLS handshakes time out; HBONE caps streams per connection; HTTP/1 heads and
//! HTTP/2 header lists are capped; HTTP/2 caps concurrent streams and resets; request
//! bodies are buffered only up to the retry cap.

pub mod detect;
pub mod http;
pub mod plaintext;
pub mod tcp;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::http::StatusCode;
use ambit_shared::config::Protocol;
use ambit_shared::config::index::Snapshot;
use ambit_shared::drain::DrainWatcher;
use ambit_shared::hbone::request::{BAGGAGE, RequestError, forwarded_client, parse_connect};
use ambit_shared::hbone::server::{self, Incoming};
use ambit_shared::identity::Identity;
use ambit_shared::ports;
use ambit_shared::tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use self::detect::Detected;
use crate::metrics::{Metrics, Source};
use crate::route::{DeclaredProtocol, RouteTable, Target};
use crate::upstream::{Endpoint, Upstream};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Listener tuning.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Bound on the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
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
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            handshake_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: None,
            max_concurrent_streams: 1000,
            idle_timeout: None,
            drain_idle_close: Duration::from_secs(1),
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
    /// Tuning.
    pub cfg: ListenerConfig,
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
    /// The client's address (from `forwarded`, else the TLS peer's).
    pub client: SocketAddr,
    /// The TLS peer's address, which authorization trusts (unlike `forwarded`).
    pub peer: SocketAddr,
    /// The CONNECT authority.
    pub dialled: SocketAddr,
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

/// What the CONNECT authority `dst` names, for this waypoint.
pub fn resolve(
    snap: &Snapshot,
    waypoint: &Waypoint,
    dst: SocketAddr,
) -> Result<Target, ResolveError> {
    if ports::is_reserved(dst.port()) {
        return Err(RequestError::ReservedPort(dst.port()).into());
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

/// Accepts HBONE connections until a drain starts; one task per connection.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, waypoint = %ctx.waypoint.name, "serving HBONE");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => {
                info!("draining: no longer accepting HBONE connections");
                return;
            }
        };
        match accepted {
            Ok((tcp, peer)) => {
                // A dual-stack listener shows IPv4 peers as v4-mapped IPv6; policy and logs
                // must see them as the IPv4 addresses they are.
                let peer = ambit_shared::listen::canonical(peer);
                let _ = tcp.set_nodelay(true);
                let span = info_span!("hbone", %peer);
                tokio::spawn(
                    connection(tcp, peer, acceptor.clone(), ctx.clone(), drain.clone())
                        .instrument(span),
                );
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
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
    let tls = match tokio::time::timeout(ctx.cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(error = %tls::describe_handshake_error(&e), "HBONE TLS handshake failed; connection refused");
            return;
        }
        Err(_) => {
            warn!("HBONE TLS handshake timed out; connection refused");
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
        |incoming| {
            tunnel(
                incoming,
                peer,
                peer_identity.clone(),
                ctx.clone(),
                drain.clone(),
            )
            .in_current_span()
        },
        shutdown,
    )
    .await;
    if let Err(e) = result {
        debug!(error = %e, "HBONE connection ended with an error");
    }
}

async fn tunnel(
    incoming: Incoming,
    peer: SocketAddr,
    peer_identity: Identity,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    let snap = ctx.snapshot.borrow().clone();
    let resolved = parse_connect(&incoming.request)
        .map_err(ResolveError::from)
        .and_then(|dst| resolve(&snap, &ctx.waypoint, dst).map(|t| (dst, t)));
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
    let client = forwarded_client(&incoming.request).unwrap_or(peer);
    let baggage = incoming
        .request
        .headers()
        .get(BAGGAGE)
        .and_then(|v| v.to_str().ok());
    let source = Source::new(&snap, Some(client.ip()), &peer_identity, baggage);
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
        client,
        peer,
        dialled,
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
