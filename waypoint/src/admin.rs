//! The waypoint's own HTTP endpoints, on a single-threaded runtime of their own so a busy
//! data plane never starves them:
//!
//! | listener | default | paths |
//! |---|---|---|
//! | metrics | `0.0.0.0:15020` | `/metrics` (also `/stats/prometheus`): Prometheus text; `/outliers`: endpoints ejected by outlier detection, as JSON |
//! | readiness | `0.0.0.0:15021` | `/healthz/ready`: 200 once serving, 503 before and while draining |

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use ambit_shared::admin::{self, Body};
use ambit_shared::admission::Admission;
use anyhow::Context as _;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;

use crate::upstream::destination::Destinations;

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
        Ok(Listeners {
            metrics: admin::bind(metrics, "metrics")?,
            readiness: admin::bind(readiness, "readiness")?,
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
    destinations: Option<Arc<Destinations>>,
}

/// Serves the endpoints on a thread with its own runtime, for the life of the process.
pub fn spawn(
    registry: Registry,
    ready: Readiness,
    listeners: Listeners,
    admission: Admission,
) -> anyhow::Result<()> {
    spawn_with_outliers(registry, ready, listeners, None, admission)
}

/// [`spawn`], also serving `/outliers` from `destinations`.
pub fn spawn_with_outliers(
    registry: Registry,
    ready: Readiness,
    listeners: Listeners,
    destinations: Option<Arc<Destinations>>,
    admission: Admission,
) -> anyhow::Result<()> {
    let state = Arc::new(State {
        registry,
        ready,
        destinations,
    });
    let route = Arc::new(move |e: Endpoint, req: &Request<Incoming>| route(e, &state, req));
    admin::spawn_thread(move || async move {
        tokio::join!(
            admin::serve(
                listeners.metrics,
                &admission,
                "metrics",
                Endpoint::Metrics,
                route.clone()
            ),
            admin::serve(
                listeners.readiness,
                &admission,
                "readiness",
                Endpoint::Readiness,
                route
            ),
        );
    })?;
    Ok(())
}

fn route(endpoint: Endpoint, state: &State, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match (endpoint, req.method(), path) {
        (Endpoint::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            admin::metrics(&state.registry)
        }
        (Endpoint::Metrics, &Method::GET, "/outliers") => outliers(state),
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => match state.ready.state() {
            READY => admin::text(StatusCode::OK, "ready\n".into()),
            DRAINING => admin::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
            _ => admin::text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        },
        (Endpoint::Metrics, _, "/metrics" | "/stats/prometheus")
        | (Endpoint::Readiness, _, "/healthz/ready") => admin::text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} not allowed on {path}\n", req.method()),
        ),
        _ => admin::text(StatusCode::NOT_FOUND, format!("no {path} here\n")),
    }
}

/// `{"destinations":[{"destination":"ns/name","ejected":[{"endpoint":"ip:port",
/// "remaining_ms":N,"ejections":N}]}]}` for every destination with outlier detection.
/// Names and addresses need no JSON escaping: names are validated DNS labels.
fn outliers(state: &State) -> Response<Body> {
    let list: Vec<String> = state
        .destinations
        .as_ref()
        .map(|d| d.ejections())
        .unwrap_or_default()
        .into_iter()
        .map(|(dest, ejections)| {
            let ejected: Vec<String> = ejections
                .iter()
                .map(|e| {
                    format!(
                        r#"{{"endpoint":"{}","remaining_ms":{},"ejections":{}}}"#,
                        e.addr,
                        e.remaining.as_millis(),
                        e.times
                    )
                })
                .collect();
            format!(
                r#"{{"destination":"{dest}","ejected":[{}]}}"#,
                ejected.join(",")
            )
        })
        .collect();
    admin::respond(
        StatusCode::OK,
        "application/json",
        format!("{{\"destinations\":[{}]}}\n", list.join(",")),
    )
}
