//! Sending requests to endpoints: pick an endpoint, connect over HBONE with the waypoint's
//! own identity, send, and retry what the policy and the budget allow.
//!
//! - [`balance`]: least-request power-of-two-choices per request, passive ejection.
//! - [`client`]: pooled HTTP/1.1 and HTTP/2 connections per endpoint.
//! - [`body`]: request bodies that can be replayed for a retry (bounded copy).
//! - [`retry`]: retry policy, backoff and the retry budget.
//! - [`destination`]: circuit-breaking limits per destination service, and
//!   [`outlier`] detection, which keeps failing endpoints out of balancing.
//!
//! An endpoint in the mesh is reached through HBONE: a CONNECT to `endpoint-ip:15008` with
//! `:authority` `endpoint-ip:target-port`, mutual TLS presenting the waypoint's
//! certificate and requiring the endpoint workload's identity. HBONE connections are
//! pooled by [`ambit_shared::hbone::Pool`]; each HTTP connection is one tunnel stream. An
//! endpoint outside the mesh gets plain TCP.

pub mod balance;
pub mod body;
pub mod client;
pub mod destination;
pub mod outlier;
pub mod retry;

use std::error::Error as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_shared::admission::FdBudget;
use ambit_shared::certs::IdentityCert;
use ambit_shared::hbone::{self, Pool, PoolKey};
use ambit_shared::identity::Identity;
use ambit_shared::ports;
use ambit_shared::tls::{self, SharedBundle};
use ambit_shared::trace::TraceParent;
use h2::Reason;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use self::balance::{Balancer, InFlight};
use self::body::ReplayBody;
use self::client::{Checkout, ClientConfig, Clients, ConnKey};
use self::destination::{Destination, Destinations, Limit, Permit};
use self::outlier::Outcome;
use self::retry::{Budgets, Failure, RetryPolicy};

/// Endpoints tried for one L4 connection before it fails.
pub const L4_CONNECT_ATTEMPTS: usize = 3;

/// Anything an HTTP connection can run over: a tunnel stream or a TCP connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Upstream tuning.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Bound on connecting to an endpoint (TCP, TLS, HBONE). Default 10 s.
    pub connect_timeout: Duration,
    /// Request body bytes kept for retries. Default 64 KiB.
    pub body_cap: usize,
    /// HTTP connection pool.
    pub clients: ClientConfig,
    /// Where sockets to endpoints may go in the descriptor table: never into the reserve
    /// kept for the waypoint's own work (reading its config and certificates). Default:
    /// no limit.
    pub fds: FdBudget,
    /// Connections per destination service where no `TrafficPolicy` sets
    /// `maxConnections`. Default [`destination::DEFAULT_MAX_CONNECTIONS`]; `None` is
    /// unlimited.
    pub default_max_connections: Option<u32>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(10),
            body_cap: body::DEFAULT_CAP,
            clients: ClientConfig::default(),
            fds: FdBudget::unlimited(),
            default_max_connections: Some(destination::DEFAULT_MAX_CONNECTIONS),
        }
    }
}

/// An endpoint of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:targetPort`.
    pub addr: SocketAddr,
    /// The identity it must prove over HBONE; `None` for an endpoint outside the mesh,
    /// reached over plain TCP.
    pub identity: Option<Identity>,
}

/// The HTTP version spoken to endpoints (the client's, as Istio does for detected HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c inside the tunnel).
    Http2,
}

/// How to send one request.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Names the destination's retry budget (`namespace/name`).
    pub destination: &'a Arc<str>,
    /// Candidate endpoints.
    pub endpoints: &'a [Endpoint],
    /// Version to speak.
    pub version: HttpVersion,
    /// Retries.
    pub retry: &'a RetryPolicy,
    /// Per-attempt timeout (`backendRequest`), until response headers.
    pub attempt_timeout: Option<Duration>,
    /// gRPC: a trailers-only `grpc-status: 14` counts as unavailable.
    pub grpc: bool,
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No connection could be made.
    #[error("connecting to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {addr} failed ({}): {source}", .failure.as_str())]
    Http {
        /// The endpoint.
        addr: SocketAddr,
        /// How it is classified for retries.
        failure: Failure,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The attempt timed out before response headers arrived.
    #[error("{addr} sent no response headers within {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The attempt timeout.
        timeout: Duration,
    },
    /// A circuit-breaking limit of the destination service was reached (flag `UO`).
    #[error("upstream overflow: the destination's {} limit is reached", .limit.as_str())]
    Overflow {
        /// Which limit.
        limit: Limit,
    },
    /// The endpoint answered something the waypoint must not pass on (a protocol switch
    /// nobody asked for): 502, flag `UPE`.
    #[error("{addr} broke the protocol: {reason}")]
    Protocol {
        /// The endpoint.
        addr: SocketAddr,
        /// What it did.
        reason: String,
    },
}

impl AttemptError {
    fn connect(addr: SocketAddr, reason: impl std::fmt::Display) -> Self {
        AttemptError::Connect {
            addr,
            reason: reason.to_string(),
        }
    }

    /// A failed HTTP handshake over a fresh tunnel: nothing was sent, so it is a connect
    /// failure.
    fn handshake(addr: SocketAddr, e: hyper::Error) -> Self {
        AttemptError::connect(addr, format!("HTTP handshake: {e}"))
    }

    fn http(addr: SocketAddr, source: hyper::Error) -> Self {
        AttemptError::Http {
            addr,
            failure: classify(&source),
            source,
        }
    }

    /// The retry class.
    pub fn failure(&self) -> Failure {
        match self {
            AttemptError::Connect { .. } => Failure::Connect,
            AttemptError::Http { failure, .. } => *failure,
            AttemptError::Timeout { .. } => Failure::Timeout,
            AttemptError::Overflow { .. } => Failure::Overflow,
            AttemptError::Protocol { .. } => Failure::Protocol,
        }
    }
}

/// hyper's error in retry terms.
fn classify(e: &hyper::Error) -> Failure {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(Reason::REFUSED_STREAM) => Failure::RefusedStream,
                Some(
                    Reason::PROTOCOL_ERROR | Reason::FRAME_SIZE_ERROR | Reason::COMPRESSION_ERROR,
                ) if !h2.is_remote() => Failure::Protocol,
                _ => Failure::Reset,
            };
        }
        source = s.source();
    }
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        Failure::Protocol
    } else if e.is_user() || e.is_body_write_aborted() {
        Failure::Client
    } else {
        Failure::Reset
    }
}

/// A response from an endpoint, and what must live as long as its body.
#[derive(Debug)]
pub struct Reply {
    /// The response.
    pub response: Response<Incoming>,
    /// The endpoint that answered.
    pub endpoint: Endpoint,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// Keeps the endpoint's in-flight count and the HTTP/1 connection until the body ends.
    pub guard: ReplyGuard,
}

/// Dropped when the response body is done. The request's circuit-breaker permit goes
/// last, after the connection is back in the pool, so a pending request it wakes finds
/// the connection idle.
#[derive(Debug)]
pub struct ReplyGuard {
    _in_flight: InFlight,
    _checkout: Option<Checkout>,
    _request: Permit,
}

/// A request that got no usable response.
#[derive(Debug)]
pub struct SendError {
    /// The last attempt's error; `None` when there was no endpoint to try.
    pub error: Option<AttemptError>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<Endpoint>,
    /// Attempts made.
    pub attempts: u32,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            None => write!(f, "no endpoints"),
            Some(e) if self.attempts > 1 => write!(f, "{e} (after {} attempts)", self.attempts),
            Some(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Observes retries (for metrics).
pub trait RetryObserver: Send + Sync {
    /// A retry of `failure` was made (`admitted`) or refused by the budget.
    fn retry(&self, destination: &str, failure: Failure, admitted: bool);
}

/// Sends requests to endpoints.
#[derive(Debug)]
pub struct Upstream {
    cfg: UpstreamConfig,
    pool: Pool,
    clients: Clients,
    /// Endpoint load and health.
    pub balancer: Balancer,
    /// Circuit breakers and outlier detection per destination service.
    pub destinations: Arc<Destinations>,
    /// Rate limits and mirrors.
    pub resilience: crate::resilience::Resilience,
    budgets: Budgets,
    identity: Identity,
    cert: Arc<IdentityCert>,
    bundle: SharedBundle,
    /// Baggage the waypoint sends on its tunnels.
    baggage: String,
}

impl Upstream {
    /// Sends as `identity` with `cert`, trusting `bundle`, pooling tunnels in `pool`.
    /// Starts background reapers on the current runtime.
    pub fn new(
        cfg: UpstreamConfig,
        pool: Pool,
        identity: Identity,
        cert: Arc<IdentityCert>,
        bundle: SharedBundle,
        waypoint_name: &str,
    ) -> Self {
        let baggage = format!(
            "k8s.namespace.name={},k8s.deployment.name={waypoint_name}",
            identity.namespace()
        );
        let destinations = Arc::new(Destinations::with_default_max_connections(
            cfg.default_max_connections,
        ));
        Upstream {
            clients: Clients::new(cfg.clients.clone()),
            cfg,
            pool,
            balancer: Balancer::default(),
            destinations,
            resilience: Default::default(),
            budgets: Budgets::default(),
            identity,
            cert,
            bundle,
            baggage,
        }
    }

    /// Request body bytes kept for retries.
    pub fn body_cap(&self) -> usize {
        self.cfg.body_cap
    }

    /// Sends `head` with `body` per `plan`, retrying as the policy and budget allow. A
    /// final retryable status (say a 503 after the last retry) is returned as a reply.
    pub async fn send(
        &self,
        head: &http::request::Parts,
        body: &ReplayBody,
        plan: &Plan<'_>,
        observer: &dyn RetryObserver,
    ) -> Result<Reply, SendError> {
        let dest = self.destinations.get(plan.destination);
        let request_permit = match dest.admit_request() {
            Ok(p) => p,
            Err(limit) => {
                return Err(SendError {
                    error: Some(AttemptError::Overflow { limit }),
                    endpoint: None,
                    attempts: 0,
                });
            }
        };
        let budget = self.budgets.get(plan.destination);
        budget.record_request();
        // Outlier detection's ejections apply to the whole request, retries included.
        let eligible = dest.eligible(plan.endpoints, |e| e.addr);
        let addrs: Vec<SocketAddr> = eligible.iter().map(|e| e.addr).collect();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempts = 0u32;
        // Held while a retry is in flight; the budget counts concurrent retries.
        let mut _permit = None;
        let mut _retry_slot = None;
        // Set while the request waits for a connection under `max_connections`.
        let mut pending_since: Option<tokio::time::Instant> = None;
        loop {
            attempts += 1;
            let Some(endpoint) = self
                .balancer
                .pick(&addrs, &tried)
                .and_then(|i| eligible.get(i).copied())
            else {
                return Err(SendError {
                    error: None,
                    endpoint: None,
                    attempts: attempts - 1,
                });
            };
            let Some(attempt_body) = body.replay() else {
                // Only reachable after a failed attempt consumed the body; the loop checks
                // replayability before retrying, so this is belt and braces.
                return Err(SendError {
                    error: None,
                    endpoint: Some(endpoint.clone()),
                    attempts,
                });
            };
            let request = upstream_request(head, attempt_body, plan.version);
            let in_flight = self.balancer.start(endpoint.addr);
            let attempt = self.attempt(endpoint, request, plan.version, &dest);
            let outcome = match plan.attempt_timeout {
                Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
                    Err(AttemptError::Timeout {
                        addr: endpoint.addr,
                        timeout: t,
                    })
                }),
                None => attempt.await,
            };
            if let Err(AttemptError::Overflow {
                limit: Limit::Connections,
            }) = &outcome
            {
                // No connection slot: wait as a pending request, then pick again. Nothing
                // was sent, so it is not an attempt.
                attempts -= 1;
                drop(in_flight);
                let since = *pending_since.get_or_insert_with(tokio::time::Instant::now);
                let gave_up = since.elapsed() >= self.cfg.connect_timeout;
                let waited = if gave_up {
                    dest.connections_exhausted();
                    Err(Limit::Connections)
                } else {
                    let all: Vec<SocketAddr> = plan.endpoints.iter().map(|e| e.addr).collect();
                    self.clients.close_idle_among(&all);
                    dest.wait_pending().await
                };
                if let Err(limit) = waited {
                    return Err(SendError {
                        error: Some(AttemptError::Overflow { limit }),
                        endpoint: None,
                        attempts,
                    });
                }
                continue;
            }
            tried.push(endpoint.addr);
            let failure = match &outcome {
                Ok((resp, _)) => response_failure(resp, plan.grpc),
                Err(e) => Some(e.failure()),
            };
            match &outcome {
                Ok((resp, _)) => {
                    dest.observe(
                        endpoint.addr,
                        Outcome::Status(resp.status()),
                        plan.endpoints.len(),
                    );
                }
                Err(e) if e.failure() != Failure::Client => {
                    dest.observe(endpoint.addr, Outcome::LocalFailure, plan.endpoints.len());
                }
                Err(_) => {}
            }
            if let Err(e) = &outcome {
                if e.failure() == Failure::Connect {
                    let ejected_for = self.balancer.connect_failed(endpoint.addr);
                    warn!(destination = %plan.destination, endpoint = %endpoint.addr, error = %e, ?ejected_for,
                        "endpoint unreachable; ejected");
                } else {
                    debug!(destination = %plan.destination, endpoint = %endpoint.addr, error = %e, "attempt failed");
                }
            } else {
                self.balancer.connected(endpoint.addr);
            }
            let retry = failure.filter(|f| {
                attempts <= plan.retry.retries && plan.retry.retries_on(*f) && body.is_replayable()
            });
            if let Some(f) = retry {
                // The circuit breaker's retry limit, then the budget; either refusal returns
                // this attempt's failure.
                let slot = dest.admit_retry();
                match slot.as_ref().and_then(|_| budget.try_retry()) {
                    Some(permit) => {
                        observer.retry(plan.destination, f, true);
                        _permit = Some(permit);
                        _retry_slot = slot;
                        drop(outcome);
                        drop(in_flight);
                        tokio::time::sleep(plan.retry.backoff(attempts)).await;
                        continue;
                    }
                    None if slot.is_none() => {
                        debug!(destination = %plan.destination, failure = f.as_str(),
                            "circuit breaker: max retries in flight; not retrying");
                    }
                    None => {
                        observer.retry(plan.destination, f, false);
                        debug!(destination = %plan.destination, failure = f.as_str(),
                            "retry budget exhausted; not retrying");
                    }
                }
            }
            return match outcome {
                Ok((response, checkout)) => Ok(Reply {
                    response,
                    endpoint: endpoint.clone(),
                    attempts,
                    guard: ReplyGuard {
                        _in_flight: in_flight,
                        _checkout: checkout,
                        _request: request_permit,
                    },
                }),
                Err(e) => Err(SendError {
                    error: Some(e),
                    endpoint: Some(endpoint.clone()),
                    attempts,
                }),
            };
        }
    }

    /// Opens a byte stream to one of `endpoints`, for traffic forwarded at L4: connect
    /// failures move on to another endpoint (and eject the failed one), up to
    /// [`L4_CONNECT_ATTEMPTS`] endpoints. The stream counts against the endpoint's load
    /// while the returned guard lives.
    pub async fn open_stream(
        &self,
        endpoints: &[Endpoint],
    ) -> Result<(Box<dyn Io>, Endpoint, InFlight), SendError> {
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let mut tried = Vec::new();
        let mut last = None;
        while tried.len() < L4_CONNECT_ATTEMPTS {
            let Some(endpoint) = self
                .balancer
                .pick(&addrs, &tried)
                .and_then(|i| endpoints.get(i))
            else {
                break;
            };
            if tried.contains(&endpoint.addr) {
                break;
            }
            tried.push(endpoint.addr);
            let in_flight = self.balancer.start(endpoint.addr);
            match self.connect(endpoint).await {
                Ok(io) => {
                    self.balancer.connected(endpoint.addr);
                    return Ok((io, endpoint.clone(), in_flight));
                }
                Err(e) => {
                    let ejected_for = self.balancer.connect_failed(endpoint.addr);
                    warn!(endpoint = %endpoint.addr, error = %e, ?ejected_for, "endpoint unreachable; ejected");
                    last = Some((e, endpoint.clone()));
                }
            }
        }
        let attempts = tried.len() as u32;
        Err(match last {
            Some((e, endpoint)) => SendError {
                error: Some(e),
                endpoint: Some(endpoint),
                attempts,
            },
            None => SendError {
                error: None,
                endpoint: None,
                attempts,
            },
        })
    }

    async fn attempt(
        &self,
        endpoint: &Endpoint,
        request: Request<ReplayBody>,
        version: HttpVersion,
        dest: &Arc<Destination>,
    ) -> Result<(Response<Incoming>, Option<Checkout>), AttemptError> {
        let key = ConnKey {
            addr: endpoint.addr,
            identity: endpoint.identity.clone(),
            generation: self.cert.generation(),
        };
        let connect = || self.connect_counted(endpoint, dest);
        match version {
            HttpVersion::Http2 => self
                .clients
                .send_h2(&key, request, connect)
                .await
                .map(|r| (r, None)),
            HttpVersion::Http1 => self
                .clients
                .send_h1(&key, request, connect)
                .await
                .map(|(r, c)| (r, Some(c))),
        }
    }

    /// [`Upstream::connect`] within the destination's `max_connections`: the stream holds
    /// a connection slot until it closes.
    async fn connect_counted(
        &self,
        endpoint: &Endpoint,
        dest: &Arc<Destination>,
    ) -> Result<Box<dyn Io>, AttemptError> {
        let slot = dest.try_connection().ok_or(AttemptError::Overflow {
            limit: Limit::Connections,
        })?;
        let io = self.connect(endpoint).await?;
        Ok(Box::new(CountedIo { io, _slot: slot }))
    }

    /// Opens a byte stream to `endpoint`: an HBONE tunnel when it is in the mesh, plain
    /// TCP otherwise.
    async fn connect(&self, endpoint: &Endpoint) -> Result<Box<dyn Io>, AttemptError> {
        let addr = endpoint.addr;
        let Some(dst) = endpoint.identity.clone() else {
            let tcp = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| AttemptError::connect(addr, "timed out"))?
                .map_err(|e| AttemptError::connect(addr, e))?;
            self.cfg
                .fds
                .check_opened(&tcp)
                .map_err(|e| AttemptError::connect(addr, e))?;
            let _ = tcp.set_nodelay(true);
            return Ok(Box::new(tcp));
        };
        let hbone_addr = SocketAddr::new(addr.ip(), ports::HBONE);
        let key = PoolKey {
            src: self.identity.clone(),
            dst: dst.clone(),
            addr: hbone_addr,
            cert_generation: self.cert.generation(),
        };
        let request = connect_request(addr, &self.baggage);
        let cert = self.cert.clone();
        let bundle = self.bundle.clone();
        let timeout = self.cfg.connect_timeout;
        let fds = self.cfg.fds;
        let dial = move || async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(hbone_addr))
                .await
                .map_err(|_| hbone::Error::Timeout(hbone_addr))?
                .and_then(|tcp| fds.check_opened(&tcp).map(|()| tcp).map_err(Into::into))
                .map_err(|source| hbone::Error::Connect {
                    addr: hbone_addr,
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let config = tls::client_config(cert.slot.current().certified.clone(), &bundle, dst)?;
            TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(hbone_addr.ip().into()), tcp)
                .await
                .map_err(|source| hbone::Error::Tls {
                    addr: hbone_addr,
                    source,
                })
        };
        let stream = self
            .pool
            .open(key, request, dial)
            .await
            .map_err(|e| AttemptError::connect(addr, format!("HBONE via {hbone_addr}: {e}")))?;
        Ok(Box::new(stream))
    }
}

/// A connection that holds a `max_connections` slot while open.
struct CountedIo {
    io: Box<dyn Io>,
    _slot: Permit,
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The CONNECT for a tunnel to `dst`. No `forwarded` header: an HTTP connection in the
/// tunnel carries many clients' requests, so there is no single client to name.
fn connect_request(dst: SocketAddr, baggage: &str) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.version_mut() = Version::HTTP_2;
    // A SocketAddr is always a valid authority.
    if let Ok(uri) = dst.to_string().parse() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(baggage) {
        headers.insert(hbone::request::BAGGAGE, v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&TraceParent::generate().to_string()) {
        headers.insert(hbone::request::TRACEPARENT, v);
    }
    req
}

/// Whether a response is one the retry policy may act on.
fn response_failure(resp: &Response<Incoming>, grpc: bool) -> Option<Failure> {
    let status = resp.status();
    if grpc
        && status == StatusCode::OK
        && resp
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"14")
    {
        return Some(Failure::GrpcUnavailable);
    }
    (status.is_server_error() || status.is_client_error()).then_some(Failure::Status(status))
}

/// The request as sent to an endpoint: hop-by-hop headers removed; for HTTP/1 an
/// origin-form target and a `Host` header, for HTTP/2 an absolute URI (`:scheme`,
/// `:authority`).
pub fn upstream_request(
    head: &http::request::Parts,
    body: ReplayBody,
    version: HttpVersion,
) -> Request<ReplayBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    strip_hop_by_hop(req.headers_mut());
    // hyper answers the client's `Expect: 100-continue` when the body is first read; the
    // endpoint gets the body without waiting.
    req.headers_mut().remove(http::header::EXPECT);
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let path = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match version {
        HttpVersion::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Ok(uri) = path.parse() {
                *req.uri_mut() = uri;
            }
            if let Some(a) = &authority
                && !req.headers().contains_key(http::header::HOST)
                && let Ok(v) = http::HeaderValue::from_str(a)
            {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        HttpVersion::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            let scheme = head.uri.scheme_str().unwrap_or("http");
            let authority = authority.unwrap_or_else(|| "localhost".to_string());
            if let Ok(uri) = format!("{scheme}://{authority}{path}").parse() {
                *req.uri_mut() = uri;
            } else if let Ok(uri) = path.parse() {
                *req.uri_mut() = uri;
            }
            // HTTP/2 carries the host in `:authority`.
            req.headers_mut().remove(http::header::HOST);
        }
    }
    req
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), which must not be forwarded
/// and are illegal in HTTP/2. `te: trailers` survives: gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    let named: Vec<http::HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, http::HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests;
