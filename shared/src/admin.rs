//! The plumbing of a proxy's own HTTP endpoints (metrics, readiness, admin): listeners
//! bound up front, a thread with its own single-threaded runtime, and an HTTP/1 accept
//! loop. Each proxy supplies the routes.
//!
//! A separate runtime means a busy data plane never starves these endpoints and they
//! never take its threads.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::admission::{Accepted, Admission, ListenerLimits};
use crate::telemetry;

/// A client must send its request headers within this time (hyper counts keep-alive idle
/// time against it too, which suits these endpoints: scrapers reconnect).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// What one endpoint holds at once: scrapers and probes open one or two connections each.
pub const LIMITS: ListenerLimits = ListenerLimits {
    max_connections: Some(256),
    max_per_source: Some(64),
};

/// A response with its whole body.
pub type Body = Full<Bytes>;

/// Errors setting up the endpoints.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound.
    #[error("binding the {what} listener on {addr}")]
    Bind {
        /// Which listener.
        what: String,
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be made non-blocking.
    #[error("making the {what} listener non-blocking")]
    NonBlocking {
        /// Which listener.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime could not be built.
    #[error("building the admin runtime")]
    Runtime(#[source] std::io::Error),
    /// The thread could not be started.
    #[error("starting the admin thread")]
    Thread(#[source] std::io::Error),
}

/// Binds `addr` for the `what` listener, non-blocking, ready for [`serve`]. Binding before
/// anything else starts makes a taken port fail startup with a clear error.
///
/// `[::]:port` listens on both families (see [`crate::listen`]).
pub fn bind(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener, AdminError> {
    crate::listen::bind_tcp(addr, ADMIN_BACKLOG).map_err(|source| AdminError::Bind {
        what: what.to_string(),
        addr,
        source,
    })
}

/// Listen backlog of the admin listeners: scrapes and probes, a few at a time.
const ADMIN_BACKLOG: i32 = 128;

/// Runs the future `make` returns on a thread named `admin` with its own current-thread
/// runtime, for the life of the process.
pub fn spawn_thread<F, Fut>(make: F) -> Result<(), AdminError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AdminError::Runtime)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(make()))
        .map_err(AdminError::Thread)?;
    Ok(())
}

/// Serves HTTP/1 on `listener` (from [`bind`]), answering each request with `route`.
/// `endpoint` names the listener in logs, `name` in the admission metrics. Admission
/// control ([`LIMITS`]) decides what is accepted; an accept error never ends the loop.
pub async fn serve<E, R>(
    listener: std::net::TcpListener,
    admission: &Admission,
    name: &'static str,
    endpoint: E,
    route: Arc<R>,
) where
    E: fmt::Debug + Copy + Send + 'static,
    R: Fn(E, &Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(err) => {
            warn!(endpoint = ?endpoint, error = %err, "cannot serve");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(endpoint = ?endpoint, %addr, "serving");
    }
    let mut listener = admission.gate(name, LIMITS).listener(listener);
    loop {
        let Accepted {
            stream,
            peer,
            permit,
        } = listener.accept().await;
        let route = route.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = route(endpoint, &req);
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

/// Every metric in `registry`, in the text format Prometheus scrapes (500 if it cannot be
/// encoded).
pub fn metrics(registry: &Registry) -> Response<Body> {
    match telemetry::encode(registry) {
        Ok(body) => respond(StatusCode::OK, telemetry::CONTENT_TYPE, body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        ),
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

/// A response of `content_type`.
pub fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
