//! HTTP inside a tunnel: serve HTTP/1.1 or HTTP/2 with hyper, and proxy each request.
//!
//! Per request: pick the route, apply its filters (a redirect answers at once), pick a
//! backend by weight, and send through [`crate::upstream`] with the route's retries and
//! timeouts. The `request` timeout bounds the whole exchange, retries and response body
//! included; `backendRequest` bounds each attempt until its response headers.
//!
//! Every request ends in exactly one record, even when the client goes away mid-response:
//! [`Record`] is a drop guard that writes the access-log line and the metrics.
//!
//! Trace context: the request's `traceparent` is kept (one is generated when it is missing
//! or invalid) and the upstream request carries a child span of it; the access log shows
//! the trace id.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambit_shared::config::index::Snapshot;
use ambit_shared::drain::DrainWatcher;
use ambit_shared::trace::{TRACEPARENT, TraceParent};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::{Downstream, upgrade};
use crate::filters::{self, Decision, Filter};
use crate::metrics::{Peers, RequestOutcome};
use crate::overload::{Permit, Resource};
use crate::route::{BackendRef, Route, RouteRequest, Target};
use crate::upstream::body::{BodyMeter, BoxError, ReplayBody, boxed};
use crate::upstream::retry::Failure;
use crate::upstream::{
    AttemptError, Endpoint, HttpVersion, Plan, ReplyGuard, SendError, strip_hop_by_hop,
};

/// What the waypoint answers with.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// HTTP/2 stream and connection receive windows towards clients.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Bound on data queued for a slow HTTP/2 client, per stream.
const H2_MAX_SEND_BUF: usize = 1024 * 1024;
/// Resets a client may provoke before the connection is closed (rapid-reset defence).
const H2_MAX_PENDING_RESETS: usize = 100;

/// Serves HTTP/1.1 (keep-alive, upgrades) on a tunnel until the client closes it or a
/// drain ends it.
///
/// On drain: a request in flight, and any that arrives, is answered with
/// `Connection: close` and the connection closes after it; a connection that stays idle for
/// [`super::ListenerConfig::drain_idle_close`] is closed. Closing only a connection that
/// has been idle a while keeps a client that sends steadily from racing our close.
pub async fn serve_http1<IO>(io: IO, down: Arc<Downstream>, drain: DrainWatcher)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let cfg = &down.ctx.cfg;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.header_read_timeout)
        // hyper refuses buffers under 8 KiB.
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(cfg.max_headers);
    let activity = Arc::new(ConnActivity::default());
    let (io, heads) = super::head_timeout::wrap(io, cfg.partial_head_timeout);
    let svc = super::head_timeout::Tracked::new(
        service(
            down.clone(),
            Version::HTTP_11,
            drain.clone(),
            Some(activity.clone()),
        ),
        heads.clone(),
    );
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let idle_close = cfg.drain_idle_close;
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.signaled() => loop {
            let wait = idle_close.saturating_sub(activity.idle_for()).max(Duration::from_millis(50));
            tokio::select! {
                r = conn.as_mut() => break r,
                () = tokio::time::sleep(wait) => {
                    if activity.idle_for() >= idle_close {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                }
            }
        },
    };
    if heads.fired() {
        down.ctx
            .admission
            .count_timeout(super::LISTENER, "header_read");
    }
    if let Err(e) = result {
        debug!(error = %e, "HTTP/1 connection ended with an error");
    }
}

/// Requests in flight on one HTTP/1 connection and when the last one ended, so a drain
/// can tell an idle connection from a busy one.
#[derive(Debug)]
struct ConnActivity {
    in_flight: AtomicUsize,
    since: parking_lot::Mutex<Instant>,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity {
            in_flight: AtomicUsize::new(0),
            since: parking_lot::Mutex::new(Instant::now()),
        }
    }
}

impl ConnActivity {
    fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(self.clone())
    }

    /// Zero while a request is in flight.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.since.lock().elapsed()
    }
}

/// Counts a request against its connection until its response head is handed to hyper.
struct ActiveRequest(Arc<ConnActivity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        *self.0.since.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves HTTP/2 (h2c prior knowledge, gRPC) on a tunnel; a drain sends GOAWAY and lets
/// open streams finish.
pub async fn serve_http2<IO>(io: IO, down: Arc<Downstream>, drain: DrainWatcher)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let cfg = &down.ctx.cfg;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_PENDING_RESETS)
        // RFC 8441 extended CONNECT (WebSocket over HTTP/2); see [`super::upgrade`].
        .enable_connect_protocol();
    let svc = service(down.clone(), Version::HTTP_2, drain.clone(), None);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}

fn service(
    down: Arc<Downstream>,
    version: Version,
    drain: DrainWatcher,
    activity: Option<Arc<ConnActivity>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ResponseBody>,
    Error = Infallible,
    Future: Send,
> {
    service_fn(move |req: Request<Incoming>| {
        let down = down.clone();
        let drain = drain.clone();
        let active = activity.as_ref().map(ConnActivity::begin);
        async move {
            let mut resp = proxy(req, down, version, &drain).await;
            if version == Version::HTTP_11
                && drain.is_draining()
                && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                // hyper closes the connection after a response that says so.
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            drop(active);
            Ok::<_, Infallible>(resp)
        }
    })
}

/// True for gRPC requests (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Proxies one request. Never fails: problems become an HTTP answer with response flags.
async fn proxy(
    req: Request<Incoming>,
    down: Arc<Downstream>,
    version: Version,
    drain: &DrainWatcher,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let (mut head, body) = req.into_parts();
    let grpc = is_grpc(&head.headers);
    let trace = head
        .headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceParent>().ok())
        .unwrap_or_else(TraceParent::generate);
    if let Ok(v) = HeaderValue::from_str(&trace.child().to_string()) {
        head.headers.insert(TRACEPARENT, v);
    }
    let snap = down.ctx.snapshot.borrow().clone();
    let routes = down.ctx.routes.borrow().clone();
    let body = ReplayBody::new(boxed(body), down.ctx.upstream.body_cap());
    let mut record = Record::new(
        &down,
        &snap,
        &head,
        version,
        grpc,
        trace,
        start,
        body.meter(),
    );
    // Shed before any other work: under overload, refusing must stay cheap.
    let overload = &down.ctx.overload;
    let admitted = match &down.admission {
        Some(tunnel) => overload.admit_same_client(Resource::Requests, tunnel),
        None => overload.admit(Resource::Requests, down.source.principal.as_ref()),
    };
    match admitted {
        Ok(permit) => record.admission = Some(permit),
        Err(shed) => {
            let mut resp = record.local(StatusCode::SERVICE_UNAVAILABLE, "OM", &shed.to_string());
            resp.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            return resp;
        }
    }
    // From here on the head is what authorization checks and what the backend gets: one
    // host, a path whose parameters are refused or allowed, and no upgrade off the list.
    let params = crate::head::path_parameters(&snap, &down.target);
    match crate::head::canonicalize(&mut head, params) {
        Ok(host) => record.authority = host,
        Err(e) => return record.local(e.status(), "DPE", &e.to_string()),
    }
    let upgrade = match upgrade::requested(&mut head, &down.ctx.cfg.upgrades) {
        Ok(kind) => kind
            .and_then(|kind| Some((kind, head.extensions.remove::<hyper::upgrade::OnUpgrade>()?))),
        Err(e) => return record.local(e.status(), "-", &e.to_string()),
    };
    let client = crate::authz::Client {
        identity: down.source.principal.as_ref(),
        ip: down.peer.ip(),
    };
    let metrics = &down.ctx.metrics;
    if let Err(d) = crate::authz::check(&snap, metrics, client, &down.target, &mut head) {
        record.authz_policy = Some(d.policy.clone());
        return record.local(d.status, "-", d.client_message());
    }

    let client_namespace = down.source.principal.as_ref().map(|p| p.namespace());
    let Some(route) = routes.select(&RouteRequest {
        target: &down.target,
        head: &head,
        grpc,
        client_namespace,
    }) else {
        return record.local(StatusCode::NOT_FOUND, "NR", "no route matched");
    };
    record.route = route.name.clone();
    if let Err(d) = crate::authz::check_route(&snap, metrics, client, &down.target, &route, &head) {
        record.authz_policy = Some(d.policy.clone());
        return record.local(d.status, "-", d.client_message());
    }
    let port = down.target.port();
    match filters::apply_request(&route.filters, &mut head, port) {
        Ok(Decision::Forward) => {}
        Ok(Decision::Redirect(r)) => return record.finish_local(filters::redirect_response(&r)),
        Err(e) => return record.local(StatusCode::BAD_REQUEST, "-", &e.to_string()),
    }
    let Some(backend) = route.pick_backend() else {
        // Gateway API: a rule whose backends are all invalid or weightless answers 500.
        return record.local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            "route has no backends",
        );
    };
    match filters::apply_request(&backend.filters, &mut head, port) {
        Ok(Decision::Forward) => {}
        Ok(Decision::Redirect(r)) => return record.finish_local(filters::redirect_response(&r)),
        Err(e) => return record.local(StatusCode::BAD_REQUEST, "-", &e.to_string()),
    }
    let Some(dest) = backend_target(&snap, &down.target, &backend.backend) else {
        return record.local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            "backend service not found",
        );
    };
    let endpoints = super::endpoints(&snap, &dest);
    record.target = dest.clone();
    if endpoints.is_empty() {
        return record.local(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
    }
    let admitted = crate::resilience::admit(
        &down.ctx,
        &snap,
        crate::resilience::RequestInfo {
            route: &route,
            backend_filters: &backend.filters,
            dest: &dest,
            source: &down.source,
            head: &head,
            body: &body,
        },
    )
    .await;
    match admitted {
        Ok(a) => a.flags.iter().for_each(|f| record.add_flag(f)),
        Err(refusal) => {
            let mut resp = record.local(refusal.status, refusal.flags, &refusal.reason);
            refusal.decorate(resp.headers_mut());
            return resp;
        }
    }
    let response_filters: Vec<Filter> = route
        .filters
        .iter()
        .chain(&backend.filters)
        .filter(|f| matches!(f, Filter::ResponseHeaderModifier(_)))
        .cloned()
        .collect();
    if let Some((kind, on_upgrade)) = upgrade {
        return open_upgrade(
            &down,
            kind,
            on_upgrade,
            &head,
            &endpoints,
            route.timeouts.request,
            drain,
            record,
        )
        .await;
    }
    send(
        &down,
        &route,
        dest,
        &endpoints,
        head,
        body,
        version,
        grpc,
        record,
        response_filters,
        start,
    )
    .await
}

/// The target a backend reference points at.
fn backend_target(snap: &Snapshot, parent: &Target, backend: &BackendRef) -> Option<Target> {
    match backend {
        BackendRef::Parent => Some(parent.clone()),
        BackendRef::Service {
            namespace,
            name,
            port,
        } => {
            let (svc, _) = snap.service(namespace, name)?;
            let p = svc.ports.iter().find(|p| p.port == *port)?;
            Some(Target::Service {
                namespace: namespace.clone(),
                name: name.clone(),
                port: *port,
                target_port: p.target_port.unwrap_or(p.port),
                port_name: p.name.as_deref().map(Into::into),
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send(
    down: &Arc<Downstream>,
    route: &Route,
    dest: Target,
    endpoints: &[Endpoint],
    head: http::request::Parts,
    body: ReplayBody,
    version: Version,
    grpc: bool,
    mut record: Record,
    response_filters: Vec<Filter>,
    start: Instant,
) -> Response<ResponseBody> {
    let key = dest.key();
    let plan = Plan {
        destination: &key,
        endpoints,
        version: if version == Version::HTTP_2 {
            HttpVersion::Http2
        } else {
            HttpVersion::Http1
        },
        retry: &route.retry,
        attempt_timeout: route.timeouts.backend_request,
        grpc,
    };
    let deadline = route
        .timeouts
        .request
        .map(|t| tokio::time::Instant::from_std(start) + t);
    let sent = down
        .ctx
        .upstream
        .send(&head, &body, &plan, &*down.ctx.metrics);
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, sent).await {
            Ok(r) => r,
            Err(_) => {
                return record.local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                );
            }
        },
        None => sent.await,
    };
    drop(body);
    match result {
        Ok(reply) => {
            record.endpoint = Some(reply.endpoint.clone());
            record.attempts = reply.attempts;
            let (mut parts, inner) = reply.response.into_parts();
            if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                // Only an allowlisted upgrade may switch protocols, and it goes through
                // [`open_upgrade`]: passing this 101 on would hand the client a connection
                // whose further requests nothing checks.
                return record.local(
                    StatusCode::BAD_GATEWAY,
                    "UPE",
                    "the endpoint switched protocols, but no allowed upgrade was asked for",
                );
            }
            strip_hop_by_hop(&mut parts.headers);
            filters::apply_response([&response_filters[..]], &mut parts.headers);
            record.status = parts.status.as_u16();
            if grpc {
                record.grpc_status = header_str(&parts.headers, "grpc-status");
            }
            if reply.attempts > 1 && parts.status.is_server_error() {
                // Retried, and still failing: the retries ran out (Envoy's URX).
                record.add_flag("URX");
            }
            // A body that is empty from the start may never be polled.
            record.complete = inner.is_end_stream();
            let body = MeteredBody {
                inner,
                record: Some(record),
                _guard: reply.guard,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            };
            Response::from_parts(parts, body.boxed_unsync())
        }
        Err(e) => failed(record, e),
    }
}

/// Opens an upgraded stream (see [`upgrade`]); the route's request timeout bounds the
/// handshake, not the stream.
#[allow(clippy::too_many_arguments)]
async fn open_upgrade(
    down: &Arc<Downstream>,
    kind: upgrade::Kind,
    on_upgrade: hyper::upgrade::OnUpgrade,
    head: &http::request::Parts,
    endpoints: &[Endpoint],
    timeout: Option<Duration>,
    drain: &DrainWatcher,
    mut record: Record,
) -> Response<ResponseBody> {
    let admission = record.admission.take();
    let opened = upgrade::open(
        down,
        kind,
        on_upgrade,
        head,
        endpoints,
        drain.clone(),
        admission,
    );
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, opened).await {
            Ok(r) => r,
            Err(_) => {
                return record.local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                );
            }
        },
        None => opened.await,
    };
    match result {
        Ok(opened) => {
            record.endpoint = Some(opened.endpoint);
            record.attempts = 1;
            record.status = opened.response.status().as_u16();
            record.complete = true;
            opened.response
        }
        Err(e) => failed(record, e),
    }
}

fn header_str(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The answer for a request that got no response, with Envoy's response flags.
fn failed(mut record: Record, e: SendError) -> Response<ResponseBody> {
    record.endpoint = e.endpoint.clone();
    record.attempts = e.attempts;
    let retried = if e.attempts > 1 { ",URX" } else { "" };
    let (status, flag) = match &e.error {
        None => (StatusCode::SERVICE_UNAVAILABLE, "UH"),
        Some(AttemptError::Overflow { .. }) => {
            let mut resp = record.local(StatusCode::SERVICE_UNAVAILABLE, "UO", &e.to_string());
            resp.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            return resp;
        }
        Some(AttemptError::Connect { .. }) => (StatusCode::SERVICE_UNAVAILABLE, "UF"),
        Some(AttemptError::Timeout { .. }) => (StatusCode::GATEWAY_TIMEOUT, "UT"),
        Some(err) => match err.failure() {
            Failure::Protocol => (StatusCode::BAD_GATEWAY, "UPE"),
            Failure::Client => (StatusCode::BAD_REQUEST, "DC"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "UR"),
        },
    };
    let flags = format!("{flag}{retried}");
    record.local(status, &flags, &e.to_string())
}

/// A response body that records the request when it ends (or is dropped), counts bytes,
/// notes the gRPC status from trailers, and enforces the request deadline.
struct MeteredBody {
    inner: Incoming,
    record: Option<Record>,
    _guard: ReplyGuard,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.record.is_some()
            && let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            if let Some(mut r) = this.record.take() {
                r.add_flag("UT");
                r.complete = true;
            }
            return Poll::Ready(Some(Err(
                "request timeout while streaming the response".into()
            )));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                if let Some(mut r) = this.record.take() {
                    r.complete = true;
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = this.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        r.response_bytes += data.len() as u64;
                    } else if let Some(t) = frame.trailers_ref() {
                        r.grpc_status = header_str(t, "grpc-status").or(r.grpc_status.take());
                    }
                }
                if this.inner.is_end_stream()
                    && let Some(mut r) = this.record.take()
                {
                    r.complete = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut r) = this.record.take() {
                    r.add_flag("UR");
                    r.complete = true;
                }
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One request's telemetry, written when dropped: the access-log line and the metrics.
struct Record {
    down: Arc<Downstream>,
    snap: Arc<Snapshot>,
    target: Target,
    method: http::Method,
    path: String,
    authority: String,
    version: Version,
    grpc: bool,
    trace: TraceParent,
    start: Instant,
    request: BodyMeter,
    route: Arc<str>,
    endpoint: Option<Endpoint>,
    attempts: u32,
    status: u16,
    grpc_status: Option<String>,
    flags: Vec<String>,
    response_bytes: u64,
    /// The response body reached its end (or the answer was local).
    complete: bool,
    /// The authorization policy that refused the request.
    authz_policy: Option<String>,
    /// The request's place under the overload caps: held exactly as long as the record
    /// (until the response body ends), or handed to an upgraded stream's task.
    admission: Option<Permit>,
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    fn new(
        down: &Arc<Downstream>,
        snap: &Arc<Snapshot>,
        head: &http::request::Parts,
        version: Version,
        grpc: bool,
        trace: TraceParent,
        start: Instant,
        request: BodyMeter,
    ) -> Self {
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header_str(&head.headers, "host"))
            .unwrap_or_default();
        Record {
            down: down.clone(),
            snap: snap.clone(),
            target: down.target.clone(),
            method: head.method.clone(),
            path: head
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            authority,
            version,
            grpc,
            trace,
            start,
            request,
            route: "-".into(),
            endpoint: None,
            attempts: 0,
            status: 0,
            grpc_status: None,
            flags: Vec::new(),
            response_bytes: 0,
            complete: false,
            authz_policy: None,
            admission: None,
        }
    }

    fn add_flag(&mut self, flag: &str) {
        if flag != "-" && !self.flags.iter().any(|f| f == flag) {
            self.flags.push(flag.to_string());
        }
    }

    /// Answers locally (no upstream response) with `status` and a one-line reason.
    fn local(mut self, status: StatusCode, flags: &str, reason: &str) -> Response<ResponseBody> {
        for f in flags.split(',') {
            self.add_flag(f);
        }
        let text = format!("waypoint: {reason}\n");
        self.response_bytes = text.len() as u64;
        let mut resp = Response::new(
            http_body_util::Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.grpc {
            // gRPC clients read the status from grpc-status; 14 is UNAVAILABLE, which
            // clients may retry, so a policy denial says PERMISSION_DENIED (7).
            let code = match status {
                StatusCode::NOT_FOUND => "12",
                StatusCode::FORBIDDEN => "7",
                _ => "14",
            };
            resp.headers_mut()
                .insert("grpc-status", HeaderValue::from_static(code));
            self.grpc_status = Some(code.into());
        }
        self.status = status.as_u16();
        self.complete = true;
        resp
    }

    /// A locally built answer (a redirect).
    fn finish_local(mut self, resp: Response<ResponseBody>) -> Response<ResponseBody> {
        self.status = resp.status().as_u16();
        self.complete = true;
        resp
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.complete {
            // The client went away (or the response broke) before the end of the body.
            self.add_flag("DC");
        }
        let flags = if self.flags.is_empty() {
            "-".to_string()
        } else {
            self.flags.join(",")
        };
        let duration = self.start.elapsed();
        let request_bytes = self.request.received();
        let down = &self.down;
        let peers = Peers {
            source: &down.source,
            target: &self.target,
            endpoint: self.endpoint.as_ref().map(|e| e.addr.ip()),
            endpoint_identity: self.endpoint.as_ref().and_then(|e| e.identity.as_ref()),
        }
        .labels(&self.snap);
        down.ctx.metrics.request(RequestOutcome {
            peers,
            protocol: if self.grpc { "grpc" } else { "http" },
            status: self.status,
            grpc_status: self.grpc_status.clone(),
            flags: flags.clone(),
            duration_ms: duration.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes: self.response_bytes,
        });
        let upstream = self
            .endpoint
            .as_ref()
            .map(|e| e.addr.to_string())
            .unwrap_or_default();
        let src_identity = down
            .source
            .principal
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        info!(target: "access",
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            protocol = ?self.version,
            request_protocol = if self.grpc { "grpc" } else { "http" },
            status = self.status,
            grpc_status = self.grpc_status.as_deref().unwrap_or(""),
            response_flags = %flags,
            route = %self.route,
            destination = %self.target.key(),
            dialled = %down.dialled,
            upstream = %upstream,
            attempts = self.attempts,
            duration_ms = duration.as_millis() as u64,
            bytes_received = request_bytes,
            bytes_sent = self.response_bytes,
            src.addr = %down.peer,
            src.forwarded_for = %down.forwarded.map(|f| f.to_string()).unwrap_or_default(),
            src.identity = %src_identity,
            src.workload = %down.source.workload.as_deref().unwrap_or(""),
            trace_id = %self.trace.trace_id(),
            authz_policy = self.authz_policy.as_deref().unwrap_or(""),
            "request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let mut h = http::HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
    }
}
