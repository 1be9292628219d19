//! In-process end-to-end test of the waypoint: the real app (config file, local CA,
//! certificates, HBONE listener, routing, retries, metrics) on loopback, driven by an HBONE
//! client with a client workload's certificate, in front of plain HTTP backends on
//! 127.0.0.x (endpoints outside the mesh, so no node tunnel is needed). The namespace
//! scenario `tests/scenarios/waypoint.rs` covers HBONE to in-mesh endpoints.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_shared::ca::{CaPaths, LocalCa};
use ambit_shared::hbone::{self, H2Stream};
use ambit_shared::identity::Identity;
use ambit_shared::tls::{self, TrustBundle, WorkloadCert};
use ambit_waypoint::app::{self, Running, Settings};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// A response body with trailers, as gRPC sends.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

type BackendBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// An HTTP/1.1 + h2c backend at `addr` answering `hello from NAME`; with `flaky`, every
/// other request gets 503. Echoes the `traceparent` it received in `x-traceparent`.
async fn backend(addr: SocketAddr, name: &'static str, flaky: bool) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        let tp = req.headers().get("traceparent").cloned();
                        let version = req.headers().get("x-version").cloned();
                        let path = req.uri().path().to_string();
                        if path.starts_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        if path.starts_with("/linger") {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        let _ = req.into_body().collect().await;
                        let text = Bytes::from(format!("hello from {name}\n"));
                        let body: BackendBody = if grpc {
                            let mut t = HeaderMap::new();
                            t.insert("grpc-status", "0".parse().expect("value"));
                            WithTrailers {
                                data: Some(text),
                                trailers: Some(t),
                            }
                            .boxed_unsync()
                        } else {
                            Full::new(text).boxed_unsync()
                        };
                        let mut resp = Response::new(body);
                        if flaky && n.is_multiple_of(2) {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        if let Some(tp) = tp {
                            resp.headers_mut().insert("x-traceparent", tp);
                        }
                        if let Some(v) = version {
                            resp.headers_mut().insert("x-version", v);
                        }
                        if let Ok(v) = path.parse() {
                            resp.headers_mut().insert("x-path", v);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    served
}

/// A TCP echo server.
async fn echo(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind echo");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// A free port on 127.0.0.1 (also free on the other loopback addresses, in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct Harness {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    running: Option<Running>,
    served: BTreeMap<&'static str, Arc<AtomicUsize>>,
}

fn config(web: u16, echo: u16) -> String {
    format!(
        r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: {{ ambit.dev/use-waypoint: waypoint }}
workloads:
  - {{ name: client-1, namespace: shop, serviceAccount: client, ips: [10.0.0.99], node: a }}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{{ name: http, port: 80, targetPort: {web} }}]
    endpoints: [{{ ip: 127.0.0.2 }}, {{ ip: 127.0.0.3 }}, {{ ip: 127.0.0.4 }}]
  - name: flaky
    namespace: shop
    vips: [10.96.0.11]
    ports: [{{ port: 80, targetPort: {web} }}]
    endpoints: [{{ ip: 127.0.0.5 }}, {{ ip: 127.0.0.6 }}, {{ ip: 127.0.0.7 }}]
  - name: echo
    namespace: shop
    vips: [10.96.0.12]
    ports: [{{ port: 9000, targetPort: {echo} }}]
    endpoints: [{{ ip: 127.0.0.8 }}]
  - name: elsewhere
    namespace: shop
    vips: [10.96.0.13]
    ports: [{{ port: 80, targetPort: {web} }}]
    endpoints: [{{ ip: 127.0.0.2 }}]
    labels: {{ ambit.dev/use-waypoint: another }}
  - name: web-v2
    namespace: shop
    ports: [{{ port: 80, targetPort: {web} }}]
    endpoints: [{{ ip: 127.0.0.9 }}]
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: web, namespace: shop }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: web, port: 80 }}]
      rules:
        - matches: [{{ path: {{ type: PathPrefix, value: /v2 }} }}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {{ set: [{{ name: x-version, value: "2" }}] }}
            - type: ResponseHeaderModifier
              responseHeaderModifier: {{ add: [{{ name: x-routed, value: v2 }}] }}
            - type: URLRewrite
              urlRewrite: {{ path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /api }} }}
          backendRefs: [{{ name: web-v2, port: 80 }}]
        - matches: [{{ path: {{ type: Exact, value: /old }} }}]
          filters:
            - type: RequestRedirect
              requestRedirect: {{ path: {{ type: ReplaceFullPath, replaceFullPath: /new }}, statusCode: 301 }}
        - matches: [{{ path: {{ type: PathPrefix, value: /slow }} }}]
          timeouts: {{ request: 200ms }}
          backendRefs: [{{ name: web, port: 80 }}]
        - backendRefs: [{{ name: web, port: 80 }}]
"#
    )
}

async fn harness() -> Harness {
    harness_with(Default::default()).await
}

async fn harness_with(listener: ambit_waypoint::listener::ListenerConfig) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ambit_shared::ca::init(&ca, "cluster.local", false).expect("CA");
    let web_port = free_port();
    let echo_port = free_port();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, config(web_port, echo_port)).expect("write config");
    let mut served = BTreeMap::new();
    for (i, name, flaky) in [
        (2u8, "web-1", false),
        (3, "web-2", false),
        (4, "web-3", false),
        (5, "flaky-bad", true),
        (6, "flaky-ok-1", false),
        (7, "flaky-ok-2", false),
        (9, "web-v2", false),
    ] {
        let addr = SocketAddr::from(([127, 0, 0, i], web_port));
        served.insert(name, backend(addr, name, flaky).await);
    }
    echo(SocketAddr::from(([127, 0, 0, 8], echo_port))).await;
    let any = "127.0.0.1:0".parse().expect("addr");
    let running = app::start(Settings {
        source: ambit_shared::config::source::Source::File(path),
        name: "waypoint".into(),
        namespace: "shop".into(),
        service_account: None,
        ca_dir: ca.clone(),
        signer: None,
        cert_ttl: Duration::from_secs(3600),
        listen: any,
        metrics_addr: any,
        readiness_addr: any,
        drain_grace: Duration::from_secs(2),
        pool: Default::default(),
        upstream: Default::default(),
        listener,
        admission: Default::default(),
        overload: Default::default(),
        max_metric_series: ambit_waypoint::metrics::DEFAULT_MAX_SERIES,
    })
    .await
    .expect("waypoint starts");
    Harness {
        _dir: dir,
        ca,
        running: Some(running),
        served,
    }
}

impl Harness {
    fn waypoint(&self) -> SocketAddr {
        self.running.as_ref().expect("running").hbone_addr
    }

    /// Opens an HBONE tunnel to `authority` as the client workload; the CONNECT status and
    /// the stream.
    async fn tunnel(&self, authority: &str) -> (StatusCode, Option<H2Stream>) {
        let paths = CaPaths::new(&self.ca);
        let ca = LocalCa::load(&paths).expect("CA loads");
        let client: Identity = CLIENT_ID.parse().expect("identity");
        let cert =
            WorkloadCert::from_issued(ca.issue(&client, Duration::from_secs(600)).expect("issues"))
                .expect("loads");
        let bundle = TrustBundle::load(&paths.bundle()).expect("bundle");
        let config = tls::client_config(
            cert.certified.clone(),
            &bundle,
            WAYPOINT_ID.parse().expect("identity"),
        )
        .expect("client config");
        let tcp = TcpStream::connect(self.waypoint()).await.expect("connect");
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(self.waypoint().ip().into()), tcp)
            .await
            .expect("mutual TLS with the waypoint's identity");
        let (h2, conn) = h2::client::handshake(tls).await.expect("h2");
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.expect("ready");
        let dst: SocketAddr = authority.parse().expect("authority");
        let req = hbone::connect_request(
            dst,
            "10.0.0.99:40000".parse().expect("addr"),
            // Claims another pod: metric labels must not take it (see the metrics check).
            Some("k8s.namespace.name=shop,k8s.pod.name=evil-0,service.name=evil"),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let (resp, send) = h2.send_request(req, false).expect("sends");
        let resp = resp.await.expect("answer");
        let status = resp.status();
        let stream = (status == StatusCode::OK).then(|| H2Stream::new(send, resp.into_body()));
        (status, stream)
    }

    async fn metrics(&self) -> String {
        let addr = self.running.as_ref().expect("running").metrics_addr;
        let tcp = TcpStream::connect(addr).await.expect("connect metrics");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/metrics")
            .header("host", "waypoint")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("metrics answer");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// Sum of `istio_requests_total` series whose labels contain every `want`.
fn requests_total(metrics: &str, want: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn spread_ok(counts: &BTreeMap<String, usize>, names: &[&str], total: usize) -> bool {
    names.iter().all(|n| {
        let c = counts.get(*n).copied().unwrap_or(0);
        c * 5 >= total && c * 2 <= total
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_http1_h2c_grpc_and_tcp_with_retries_and_metrics() {
    let mut h = harness().await;
    const N: usize = 300;

    // HTTP/1.1 keep-alive: one tunnel, one connection, many requests, spread over the
    // three endpoints (per request, not per connection).
    let (status, stream) = h.tunnel("10.96.0.10:80").await;
    assert_eq!(status, StatusCode::OK);
    let stream = stream.expect("tunnel");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 in the tunnel");
    tokio::spawn(conn);
    let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..N {
        let mut req = Request::get(format!("/hello/{i}")).header("host", "web.shop");
        if i == 0 {
            req = req.header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
        }
        send.ready().await.expect("connection still open");
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        let tp = resp
            .headers()
            .get("x-traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if i == 0 {
            // The trace continues; the waypoint's hop has its own span.
            assert!(
                tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{tp}"
            );
            assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
        } else {
            assert_eq!(tp.len(), 55, "a traceparent is generated: {tp:?}");
        }
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let name = String::from_utf8_lossy(&body)
            .trim()
            .replace("hello from ", "");
        *bodies.entry(name).or_default() += 1;
    }
    assert!(
        spread_ok(&bodies, &["web-1", "web-2", "web-3"], N),
        "HTTP/1 spread {bodies:?}"
    );

    // h2c with prior knowledge, 10 requests in flight at a time on one connection.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let (send2, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(stream.expect("tunnel")),
    )
    .await
    .expect("h2c in the tunnel");
    tokio::spawn(conn);
    let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..N / 10 {
        let mut batch = Vec::new();
        for _ in 0..10 {
            let mut send2 = send2.clone();
            batch.push(tokio::spawn(async move {
                let req = Request::get("http://web.shop/h2")
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let resp = send2.send_request(req).await.expect("response");
                assert_eq!(resp.status(), StatusCode::OK);
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                String::from_utf8_lossy(&body)
                    .trim()
                    .replace("hello from ", "")
            }));
        }
        for b in batch {
            *bodies.entry(b.await.expect("task")).or_default() += 1;
        }
    }
    assert!(
        spread_ok(&bodies, &["web-1", "web-2", "web-3"], N),
        "h2c spread {bodies:?}"
    );

    // gRPC (HTTP/2 with trailers): the status is read from the trailers.
    let mut send3 = send2.clone();
    let req = Request::post("http://web.shop/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request");
    let resp = send3.send_request(req).await.expect("gRPC response");
    let collected = resp.into_body().collect().await.expect("body");
    assert_eq!(
        collected.trailers().and_then(|t| t.get("grpc-status")),
        Some(&"0".parse().expect("value"))
    );

    // HTTPRoute: a prefix rule to another service, with header filters and a rewrite; a
    // redirect; a request timeout.
    let get = |path: &'static str| {
        Request::get(format!("http://web.shop{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let mut s = send2.clone();
    let resp = s
        .send_request(get("/v2/items?id=3"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("x-version").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert_eq!(
        resp.headers().get("x-routed").map(|v| v.as_bytes()),
        Some(&b"v2"[..])
    );
    assert_eq!(
        resp.headers().get("x-path").map(|v| v.as_bytes()),
        Some(&b"/api/items"[..])
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"hello from web-v2\n");
    let resp = s.send_request(get("/old?x=1")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        resp.headers().get("location").map(|v| v.as_bytes()),
        Some(&b"http://web.shop/new?x=1"[..])
    );
    let started = std::time::Instant::now();
    let resp = s.send_request(get("/slow")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // One flaky endpoint of three (every other answer a 503): the default retry hides it.
    let (_, stream) = h.tunnel("10.96.0.11:80").await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream.expect("tunnel")))
            .await
            .expect("HTTP/1");
    tokio::spawn(conn);
    let mut ok = 0;
    for _ in 0..N {
        let req = Request::post("/order")
            .header("host", "flaky.shop")
            .body(Full::new(Bytes::from_static(b"{\"item\":1}")))
            .expect("request");
        send.ready().await.expect("connection still open");
        let resp = send.send_request(req).await.expect("response");
        if resp.status() == StatusCode::OK {
            ok += 1;
        }
        let _ = resp.into_body().collect().await;
    }
    assert!(ok * 100 >= N * 99, "{ok} of {N} succeeded");
    assert!(
        h.served["flaky-bad"].load(Ordering::SeqCst) > 10,
        "the flaky endpoint got traffic"
    );

    // Not HTTP: forwarded at L4.
    let (status, stream) = h.tunnel("10.96.0.12:9000").await;
    assert_eq!(status, StatusCode::OK);
    let mut stream = stream.expect("tunnel");
    stream.write_all(b"ping\n").await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"ping\n");

    // Not ours: 400.
    assert_eq!(h.tunnel("10.96.0.13:80").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.tunnel("10.96.0.10:81").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.tunnel("10.9.9.9:80").await.0, StatusCode::BAD_REQUEST);

    // Metrics match what was sent.
    let text = h.metrics().await;
    let web = [
        r#"reporter="waypoint""#,
        r#"destination_service="web.shop.svc.cluster.local""#,
        r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#,
        r#"source_workload="client-1""#,
        r#"response_code="200""#,
    ];
    assert_eq!(
        requests_total(&text, &web),
        (2 * N + 1) as u64,
        "web requests; metrics:\n{text}"
    );
    // The source workload came from the config (`forwarded` names client-1's address and
    // the proven identity is client-1's); the tunnel's baggage claim was ignored.
    assert!(!text.contains("evil"), "baggage reached a label:\n{text}");
    assert_eq!(
        requests_total(
            &text,
            &[r#"request_protocol="grpc""#, r#"grpc_response_status="0""#]
        ),
        1
    );
    assert_eq!(
        requests_total(
            &text,
            &[
                r#"destination_service="flaky.shop.svc.cluster.local""#,
                r#"response_code="200""#
            ]
        ),
        ok as u64
    );
    let retries: u64 = text
        .lines()
        .filter(|l| l.starts_with("ambit_waypoint_retries_total{") && l.contains("shop/flaky"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(retries > 0, "retries recorded:\n{text}");
    assert!(text.contains("istio_tcp_connections_closed_total{"));
    for name in ["web-1", "web-2", "web-3"] {
        assert!(h.served[name].load(Ordering::SeqCst) > 0);
    }

    let running = h.running.take().expect("running");
    assert!(running.shutdown().await, "drained within the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_http_errors_and_the_waypoint_keeps_serving() {
    let h = harness().await;
    // A request head over the limit: 431, not unbounded buffering.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let mut stream = stream.expect("tunnel");
    let big = "x".repeat(100 * 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: web.shop\r\nx-big: {big}\r\n\r\n");
    // The waypoint may stop reading once the limit is hit; a failed write is fine.
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // Garbage after a method: 400.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let mut stream = stream.expect("tunnel");
    stream
        .write_all(b"GET \x00\x01\x02 HTTP/9\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // A bogus HTTP/2 preface followed by garbage: the connection fails, nothing else does.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let mut stream = stream.expect("tunnel");
    let mut junk = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    junk.extend_from_slice(&[0xff; 64]);
    let _ = stream.write_all(&junk).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;

    // Still serving.
    let (status, stream) = h.tunnel("10.96.0.10:80").await;
    assert_eq!(status, StatusCode::OK);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream.expect("tunnel")))
            .await
            .expect("HTTP/1");
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "web.shop")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_requests_in_flight_finish_and_refuses_new_tunnels() {
    let mut h = harness().await;
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream.expect("tunnel")))
            .await
            .expect("HTTP/1");
    tokio::spawn(conn);
    let req = Request::get("/linger")
        .header("host", "web.shop")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let in_flight = tokio::spawn(async move {
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        status
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waypoint = h.waypoint();
    let running = h.running.take().expect("running");
    let drained = tokio::spawn(running.shutdown());
    assert_eq!(in_flight.await.expect("task"), StatusCode::OK);
    assert!(
        drained.await.expect("task"),
        "drained within the grace period"
    );
    assert!(
        TcpStream::connect(waypoint).await.is_err(),
        "the listener is closed after the drain"
    );
}

/// A request head must be complete within the partial-head timeout of its first byte, but
/// a keep-alive connection may idle between requests for longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_time_out_but_idle_keep_alive_connections_stay() {
    let h = harness_with(ambit_waypoint::listener::ListenerConfig {
        partial_head_timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    // A head that never ends: closed.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let mut stream = stream.expect("tunnel");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web.shop\r\nx-slow: ")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a partial head was held past the timeout");

    // A keep-alive connection idle for three timeouts between two requests: both served.
    let (_, stream) = h.tunnel("10.96.0.10:80").await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream.expect("tunnel")))
            .await
            .expect("HTTP/1");
    tokio::spawn(conn);
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let req = Request::get("/")
            .header("host", "web.shop")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send
            .send_request(req)
            .await
            .expect("response on the kept connection");
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = resp.into_body().collect().await.expect("body");
    }
    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains(r#"ambit_admission_timeouts_total{listener="hbone",phase="header_read"} 1"#),
        "{metrics}"
    );
}
