//! The waypoint's own HTTP endpoints, on a single-threaded runtime of their own so a busy
//! data plane never starves them:
//!
//! | listener | default | paths |
//! |---|---|---|
//! | metrics | `0.0.0.0:15020` | `/metrics` (also `/stats/prometheus`): Prometheus text |
//! | readiness | `0.0.0.0:15021` | `/healthz/ready`: 200 once serving, 503 before and while draining |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::metrics;

/// A client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept so the loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

// The default, 0, is "starting".
const READY: u8 = 1;
const DRAINING: u8 = 2;

/// Whether the waypoint should get traffic: not before it serves, not while it drains.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

impl Readiness {
    /// Serving.
    pub fn mark_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    /// Shutting down: load balancers should stop sending new connections.
    pub fn mark_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    fn state(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// The two listeners, bound before anything else starts so a taken port fails startup
/// with a clear error.
#[derive(Debug)]
pub struct Listeners {
    metrics: std::net::TcpListener,
    readiness: std::net::TcpListener,
}

impl Listeners {
    /// Binds the metrics and readiness addresses.
    pub fn bind(metrics: SocketAddr, readiness: SocketAddr) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &str| {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the {what} listener on {addr}"))?;
            l.set_nonblocking(true)
                .with_context(|| format!("making the {what} listener non-blocking"))?;
            Ok::<_, anyhow::Error>(l)
        };
        Ok(Listeners {
            metrics: bind(metrics, "metrics")?,
            readiness: bind(readiness, "readiness")?,
        })
    }

    /// The bound (metrics, readiness) addresses.
    pub fn local_addrs(&self) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        Ok((
            self.metrics
                .local_addr()
                .context("reading the metrics listener's address")?,
            self.readiness
                .local_addr()
                .context("reading the readiness listener's address")?,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Readiness,
}

struct State {
    registry: Registry,
    ready: Readiness,
}

/// Serves the endpoints on a thread with its own runtime, for the life of the process.
pub fn spawn(registry: Registry, ready: Readiness, listeners: Listeners) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the admin runtime")?;
    let state = Arc::new(State { registry, ready });
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let serve = |l: std::net::TcpListener, e| {
                    let state = state.clone();
                    async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => serve(l, e, state).await,
                            Err(err) => warn!(endpoint = ?e, error = %err, "cannot serve"),
                        }
                    }
                };
                tokio::join!(
                    serve(listeners.metrics, Endpoint::Metrics),
                    serve(listeners.readiness, Endpoint::Readiness),
                );
            })
        })
        .context("starting the admin thread")?;
    Ok(())
}

async fn serve(listener: TcpListener, endpoint: Endpoint, state: Arc<State>) {
    if let Ok(addr) = listener.local_addr() {
        info!(endpoint = ?endpoint, %addr, "serving");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(endpoint = ?endpoint, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(endpoint, &state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn route(endpoint: Endpoint, state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (endpoint, req.method(), path) {
        (Endpoint::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            match metrics::encode(&state.registry) {
                Ok(body) => respond(StatusCode::OK, metrics::CONTENT_TYPE, body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => match state.ready.state() {
            READY => text(StatusCode::OK, "ready\n".into()),
            DRAINING => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
            _ => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        },
        (Endpoint::Metrics, _, "/metrics" | "/stats/prometheus")
        | (Endpoint::Readiness, _, "/healthz/ready") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} not allowed on {path}\n", req.method()),
        ),
        _ => text(StatusCode::NOT_FOUND, format!("no {path} here\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
