//! In-process tests: real hyper servers on loopback as endpoints outside the mesh (plain
//! TCP), so the retry loop, balancing and pooling run end to end without namespaces.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;
use crate::upstream::retry::RetryPolicy;

#[derive(Default)]
struct Recorded(parking_lot::Mutex<Vec<(Failure, bool)>>);

impl RetryObserver for Recorded {
    fn retry(&self, _destination: &str, failure: Failure, admitted: bool) {
        self.0.lock().push((failure, admitted));
    }
}

/// An HTTP server answering `name` with `status`, `fail_first` times 503 first. Counts
/// requests and connections.
struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

async fn server(name: &'static str, fail_first: usize, h2: bool) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (r, c) = (requests.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let echo = body.unwrap_or_default();
                        let mut resp =
                            Response::new(Full::new(Bytes::from(format!("{name}:{}", echo.len()))));
                        if n < fail_first {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let io = TokioIo::new(tcp);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    Server {
        addr,
        requests,
        connections,
    }
}

async fn upstream() -> (Upstream, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths =
        ambit_shared::ca::init(dir.path(), "cluster.local", false).expect("CA for the test");
    let certs = ambit_shared::certs::Certificates::load_local(
        &paths,
        Duration::from_secs(3600),
        Arc::new(ambit_shared::certs::NoEvents),
    )
    .expect("CA loads");
    let id: Identity = "spiffe://cluster.local/ns/shop/sa/waypoint"
        .parse()
        .expect("identity");
    let cert = certs.certs.get(&id).await.expect("certificate");
    let up = Upstream::new(
        UpstreamConfig {
            connect_timeout: Duration::from_secs(2),
            ..UpstreamConfig::default()
        },
        Pool::new(Default::default()),
        id,
        cert,
        certs.bundle.clone(),
        "waypoint",
    );
    (up, dir)
}

fn plain(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        identity: None,
    }
}

fn head(uri: &str, host: &str) -> http::request::Parts {
    Request::post(uri)
        .header(http::header::HOST, host)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

async fn body_text(reply: Reply) -> String {
    let bytes = reply
        .response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn default_retry_moves_a_503_to_another_endpoint() {
    let (up, _ca) = upstream().await;
    let bad = server("bad", usize::MAX, false).await;
    let good = server("good", 0, false).await;
    let endpoints = [plain(bad.addr), plain(good.addr)];
    let dest: Arc<str> = "shop/web".into();
    let policy = RetryPolicy::default();
    let plan = Plan {
        destination: &dest,
        endpoints: &endpoints,
        version: HttpVersion::Http1,
        retry: &policy,
        attempt_timeout: None,
        grpc: false,
    };
    let observer = Recorded::default();
    for _ in 0..20 {
        let body = ReplayBody::new(body::boxed(Full::new(Bytes::from_static(b"payload"))), 1024);
        let reply = up
            .send(&head("/x", "web"), &body, &plan, &observer)
            .await
            .expect("a reply");
        assert_eq!(reply.response.status(), StatusCode::OK);
        assert!(reply.attempts <= 2);
        // The retry replayed the whole body.
        assert_eq!(body_text(reply).await, "good:7");
    }
    assert!(
        bad.requests.load(Ordering::SeqCst) > 0,
        "P2C never tried bad"
    );
    assert!(
        observer
            .0
            .lock()
            .iter()
            .all(|(f, ok)| *f == Failure::Status(StatusCode::SERVICE_UNAVAILABLE) && *ok)
    );
    // Keep-alive: sequential requests reused connections.
    assert!(good.connections.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn retries_stop_after_the_policy_and_return_the_last_answer() {
    let (up, _ca) = upstream().await;
    let bad = server("bad", usize::MAX, false).await;
    let endpoints = [plain(bad.addr)];
    let dest: Arc<str> = "shop/web".into();
    let policy = RetryPolicy::default();
    let plan = Plan {
        destination: &dest,
        endpoints: &endpoints,
        version: HttpVersion::Http1,
        retry: &policy,
        attempt_timeout: None,
        grpc: false,
    };
    let body = ReplayBody::empty();
    let reply = up
        .send(&head("/", "web"), &body, &plan, &Recorded::default())
        .await
        .expect("a reply");
    assert_eq!(reply.response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.attempts, 3, "one try plus the two default retries");
    drop(reply);
    assert_eq!(bad.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn connect_failures_are_retried_elsewhere_and_ejected() {
    let (up, _ca) = upstream().await;
    // A port nothing listens on: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let good = server("good", 0, true).await;
    let endpoints = [plain(dead), plain(good.addr)];
    let dest: Arc<str> = "shop/web".into();
    let policy = RetryPolicy::default();
    let plan = Plan {
        destination: &dest,
        endpoints: &endpoints,
        version: HttpVersion::Http2,
        retry: &policy,
        attempt_timeout: None,
        grpc: false,
    };
    let observer = Recorded::default();
    for _ in 0..10 {
        let reply = up
            .send(&head("/", "web"), &ReplayBody::empty(), &plan, &observer)
            .await
            .expect("a reply");
        assert_eq!(reply.response.status(), StatusCode::OK);
    }
    // The dead endpoint failed at most once: then it was ejected.
    let connect_retries = observer
        .0
        .lock()
        .iter()
        .filter(|(f, _)| *f == Failure::Connect)
        .count();
    assert!(connect_retries <= 1, "{connect_retries}");
    // HTTP/2: every request shared one connection.
    assert_eq!(good.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_over_the_cap_are_not_retried() {
    let (up, _ca) = upstream().await;
    let flaky = server("flaky", 1, false).await;
    let endpoints = [plain(flaky.addr)];
    let dest: Arc<str> = "shop/web".into();
    let policy = RetryPolicy::default();
    let plan = Plan {
        destination: &dest,
        endpoints: &endpoints,
        version: HttpVersion::Http1,
        retry: &policy,
        attempt_timeout: None,
        grpc: false,
    };
    let body = ReplayBody::new(body::boxed(Full::new(Bytes::from(vec![b'x'; 2048]))), 1024);
    let reply = up
        .send(&head("/", "web"), &body, &plan, &Recorded::default())
        .await
        .expect("a reply");
    assert_eq!(reply.response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.attempts, 1);
}

#[tokio::test]
async fn attempt_timeouts_fail_the_attempt() {
    let (up, _ca) = upstream().await;
    // Accepts but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let endpoints = [plain(addr)];
    let dest: Arc<str> = "shop/slow".into();
    let policy = RetryPolicy::none();
    let plan = Plan {
        destination: &dest,
        endpoints: &endpoints,
        version: HttpVersion::Http1,
        retry: &policy,
        attempt_timeout: Some(Duration::from_millis(100)),
        grpc: false,
    };
    let err = up
        .send(
            &head("/", "slow"),
            &ReplayBody::empty(),
            &plan,
            &Recorded::default(),
        )
        .await
        .expect_err("times out");
    assert!(
        matches!(err.error, Some(AttemptError::Timeout { .. })),
        "{err}"
    );
    let none = up
        .send(
            &head("/", "slow"),
            &ReplayBody::empty(),
            &Plan {
                endpoints: &[],
                ..plan
            },
            &Recorded::default(),
        )
        .await
        .expect_err("no endpoints");
    assert!(none.error.is_none());
}

#[test]
fn requests_are_rewritten_per_version() {
    let mut h = head("/a?b=1", "web.shop:80");
    h.headers
        .insert("connection", "keep-alive, x-hop".parse().expect("value"));
    h.headers.insert("x-hop", "1".parse().expect("value"));
    h.headers
        .insert("keep-alive", "timeout=5".parse().expect("value"));
    h.headers
        .insert("te", "trailers, deflate".parse().expect("value"));
    h.headers.insert("x-keep", "1".parse().expect("value"));
    let r1 = upstream_request(&h, ReplayBody::empty(), HttpVersion::Http1);
    assert_eq!(r1.uri().to_string(), "/a?b=1");
    assert_eq!(r1.version(), Version::HTTP_11);
    assert_eq!(r1.headers().get("host").expect("host"), "web.shop:80");
    for gone in ["connection", "x-hop", "keep-alive"] {
        assert!(r1.headers().get(gone).is_none(), "{gone}");
    }
    assert_eq!(r1.headers().get("te").expect("te"), "trailers");
    assert_eq!(r1.headers().get("x-keep").expect("kept"), "1");
    let r2 = upstream_request(&h, ReplayBody::empty(), HttpVersion::Http2);
    assert_eq!(r2.uri().to_string(), "http://web.shop:80/a?b=1");
    assert!(r2.headers().get("host").is_none());

    // An HTTP/2 request (absolute URI, no Host) to HTTP/1.
    let h2 = Request::get("http://api.shop/v1")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    let r = upstream_request(&h2, ReplayBody::empty(), HttpVersion::Http1);
    assert_eq!(r.uri().to_string(), "/v1");
    assert_eq!(r.headers().get("host").expect("host"), "api.shop");
}
