//! `http-load`: N HTTP requests over HTTP/1.1 keep-alive (one connection per worker,
//! reopened only after an error) or h2c (one connection, `concurrency` streams), counted
//! per status, per body and per path the server saw (its `x-path` header).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::header::HOST;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpStream;

const MAX_ERRORS: usize = 5;
/// Distinct bodies and paths kept; the rest count under "other".
const MAX_KEYS: usize = 64;

pub struct Spec {
    pub to: String,
    pub requests: usize,
    pub concurrency: usize,
    pub h2c: bool,
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<String>,
    pub body_bytes: usize,
    pub pause: Duration,
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    bodies: BTreeMap<String, u64>,
    paths: BTreeMap<String, u64>,
    /// `retry-after` values seen.
    retry_after: BTreeMap<String, u64>,
    errors: Vec<String>,
    max_ms: u64,
    min_ms: Option<u64>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if map.len() >= MAX_KEYS && !map.contains_key(&key) {
        "other".to_string()
    } else {
        key
    };
    *map.entry(key).or_default() += 1;
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect_h1(
    to: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

pub async fn run(spec: Spec, limit: Duration) -> ExitCode {
    let start = Instant::now();
    let spec = Arc::new(spec);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let connections = Arc::new(AtomicU64::new(0));
    let run = async {
        let shared_h2 = if spec.h2c {
            let stream = TcpStream::connect(&spec.to)
                .await
                .map_err(|e| format!("connect {}: {e}", spec.to))?;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            connections.fetch_add(1, Ordering::AcqRel);
            Some(sender)
        } else {
            None
        };
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..spec.concurrency {
            let (spec, tally, next, connections) = (
                spec.clone(),
                tally.clone(),
                next.clone(),
                connections.clone(),
            );
            let mut sender = shared_h2.clone().map(Sender::H2);
            workers.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::AcqRel) < spec.requests {
                    if sender.is_none() {
                        match connect_h1(&spec.to).await {
                            Ok(s) => {
                                connections.fetch_add(1, Ordering::AcqRel);
                                sender = Some(Sender::H1(s));
                            }
                            Err(e) => {
                                record_error(&tally, e);
                                continue;
                            }
                        }
                    }
                    let Some(s) = sender.as_mut() else { continue };
                    let t0 = Instant::now();
                    match one(s, &spec).await {
                        Ok((status, body, path, retry_after)) => {
                            let ms = t0.elapsed().as_millis() as u64;
                            let mut t = tally.lock();
                            bump(&mut t.statuses, status.to_string());
                            bump(&mut t.bodies, body);
                            if let Some(p) = path {
                                bump(&mut t.paths, p);
                            }
                            if let Some(r) = retry_after {
                                bump(&mut t.retry_after, r);
                            }
                            t.max_ms = t.max_ms.max(ms);
                            t.min_ms = Some(t.min_ms.map_or(ms, |m| m.min(ms)));
                        }
                        Err(e) => {
                            record_error(&tally, e);
                            if matches!(sender, Some(Sender::H1(_))) {
                                sender = None;
                            }
                        }
                    }
                    if !spec.pause.is_zero() {
                        tokio::time::sleep(spec.pause).await;
                    }
                }
            }));
        }
        for w in workers {
            w.await.map_err(|e| format!("worker: {e}"))?;
        }
        Ok::<_, String>(())
    };
    let outcome = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {limit:?}")));
    let t = tally.lock();
    let mut out = json!({
        "requests": spec.requests,
        "statuses": t.statuses,
        "bodies": t.bodies,
        "paths": t.paths,
        "retry_after": t.retry_after,
        "errors": t.errors,
        "connections": connections.load(Ordering::Acquire),
        "max_ms": t.max_ms,
        "min_ms": t.min_ms,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    });
    if let Err(e) = outcome {
        out["error"] = json!(e);
    }
    println!("{out}");
    ExitCode::SUCCESS
}

fn record_error(tally: &Mutex<Tally>, e: String) {
    let mut t = tally.lock();
    *t.statuses.entry("error".into()).or_default() += 1;
    if t.errors.len() < MAX_ERRORS {
        t.errors.push(e);
    }
}

type Answer = (u16, String, Option<String>, Option<String>);

async fn one(sender: &mut Sender, spec: &Spec) -> Result<Answer, String> {
    let uri = match sender {
        Sender::H1(_) => spec.path.clone(),
        Sender::H2(_) => format!("http://{}{}", spec.host, spec.path),
    };
    let mut b = Request::builder().method(spec.method.as_str()).uri(uri);
    if matches!(sender, Sender::H1(_)) {
        b = b.header(HOST, spec.host.as_str());
    }
    for h in &spec.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?}: want name:value"))?;
        b = b.header(k.trim(), v.trim());
    }
    let body = Bytes::from(vec![b'a'; spec.body_bytes]);
    let req = b
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            s.send_request(req).await
        }
        Sender::H2(s) => s.send_request(req).await,
    }
    .map_err(|e| format!("send: {e}"))?;
    let status = resp.status().as_u16();
    let path = resp
        .headers()
        .get("x-path")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((
        status,
        String::from_utf8_lossy(&body).trim_end().to_string(),
        path,
        retry_after,
    ))
}
