//! A minimal real gRPC server and client over h2c: `content-type: application/grpc`,
//! 5-byte length-prefixed messages (flag byte, big-endian length), and `grpc-status` /
//! `grpc-message` trailers. Messages are raw bytes, not protobuf: the framing and the
//! trailers are what a proxy has to carry.
//!
//! Service `ambit.test.Echo`:
//! - `Unary`: answers one message, the server's name;
//! - `ServerStream`: the request message is a count M (ASCII); answers M messages, each the
//!   server's name;
//! - anything else: trailers-only `grpc-status: 12` (UNIMPLEMENTED).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::Response;
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpStream;

use crate::frames::Frames;

pub const UNARY: &str = "/ambit.test.Echo/Unary";
pub const SERVER_STREAM: &str = "/ambit.test.Echo/ServerStream";
/// Bound on the messages one `ServerStream` call answers.
const MAX_STREAM: u32 = 10_000;
const MAX_ERRORS: usize = 5;

/// True for gRPC requests.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// One length-prefixed message (uncompressed).
pub fn encode(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    b.put_slice(msg);
    b.freeze()
}

/// Splits length-prefixed messages; `None` if the framing is broken.
pub fn decode(mut buf: &[u8]) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 5 || buf[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let rest = &buf[5..];
        if rest.len() < len {
            return None;
        }
        out.push(Bytes::copy_from_slice(&rest[..len]));
        buf = &rest[len..];
    }
    Some(out)
}

fn trailers(status: u32, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    if let Ok(v) = HeaderValue::from_str(message) {
        t.insert("grpc-message", v);
    }
    t
}

/// Answers one gRPC call as server `name`.
pub async fn serve(req: Request<Incoming>, name: &str) -> Response<Frames> {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.map(|c| c.to_bytes());
    let msgs = body.ok().as_deref().and_then(decode);
    let mut frames = Vec::new();
    match (path.as_str(), msgs) {
        (_, None) => frames.push(Frame::trailers(trailers(13, "bad request framing"))),
        (UNARY, Some(_)) => {
            frames.push(Frame::data(encode(name.as_bytes())));
            frames.push(Frame::trailers(trailers(0, "")));
        }
        (SERVER_STREAM, Some(msgs)) => {
            let n = msgs
                .first()
                .and_then(|m| std::str::from_utf8(m).ok()?.trim().parse::<u32>().ok())
                .unwrap_or(1)
                .min(MAX_STREAM);
            for _ in 0..n {
                frames.push(Frame::data(encode(name.as_bytes())));
            }
            frames.push(Frame::trailers(trailers(0, "")));
        }
        (_, Some(_)) => {
            // Trailers-only: the status goes in the headers.
            let mut resp = Response::new(Frames::new(Vec::new()));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            resp.headers_mut().extend(trailers(12, "unknown method"));
            return resp;
        }
    }
    let mut resp = Response::new(Frames::new(frames));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

#[derive(Default)]
struct Tally {
    servers: BTreeMap<String, u64>,
    statuses: BTreeMap<String, u64>,
    messages: u64,
    short_streams: u64,
    errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, e: String) {
        *self.statuses.entry("error".into()).or_default() += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

/// Runs `calls` calls, `concurrency` at a time on one h2c connection, and prints the
/// counts as JSON. Exit 0 when every call ended with `grpc-status: 0`.
pub async fn client(
    to: &str,
    calls: usize,
    method: &str,
    stream_messages: u32,
    concurrency: usize,
    host: &str,
    limit: Duration,
) -> ExitCode {
    let start = Instant::now();
    let (path, request_msg, want) = match method {
        "unary" => (UNARY, Bytes::from_static(b"ping"), 1),
        "stream" => (
            SERVER_STREAM,
            Bytes::from(stream_messages.to_string()),
            stream_messages,
        ),
        other => {
            eprintln!("ambit-testapp grpc: unknown --method {other} (unary or stream)");
            return ExitCode::from(2);
        }
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let run = async {
        let stream = TcpStream::connect(to)
            .await
            .map_err(|e| format!("connect {to}: {e}"))?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (mut sender, next, tally) = (sender.clone(), next.clone(), tally.clone());
            let uri = format!("http://{host}{path}");
            let msg = request_msg.clone();
            workers.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::AcqRel) < calls {
                    let r = call(&mut sender, &uri, &msg).await;
                    let mut t = tally.lock();
                    match r {
                        Ok((status, msgs)) => {
                            *t.statuses.entry(status.clone()).or_default() += 1;
                            t.messages += msgs.len() as u64;
                            if status == "0" {
                                if msgs.len() as u32 != want {
                                    t.short_streams += 1;
                                }
                                if let Some(first) = msgs.first() {
                                    let name = String::from_utf8_lossy(first).to_string();
                                    *t.servers.entry(name).or_default() += 1;
                                }
                            }
                        }
                        Err(e) => t.error(e),
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
    let ok = t.statuses.get("0").copied().unwrap_or(0);
    let mut out = json!({
        "calls": calls,
        "servers": t.servers,
        "statuses": t.statuses,
        "messages": t.messages,
        "short_streams": t.short_streams,
        "errors": t.errors,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    });
    if let Err(e) = outcome {
        out["error"] = json!(e);
    }
    println!("{out}");
    if ok as usize == calls && t.short_streams == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One call: the `grpc-status` (from trailers, or the headers of a trailers-only answer)
/// and the messages.
async fn call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &str,
    msg: &Bytes,
) -> Result<(String, Vec<Bytes>), String> {
    let req = Request::post(uri)
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(encode(msg)))
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let head_status = resp.headers().get("grpc-status").cloned();
    let mut body = resp.into_body();
    let mut data = BytesMut::new();
    let mut status = head_status;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    status = t.get("grpc-status").cloned().or(status);
                }
            }
        }
    }
    let status = status
        .and_then(|v| v.to_str().ok().map(str::to_string))
        .ok_or("no grpc-status")?;
    let msgs = decode(&data).ok_or("broken message framing")?;
    Ok((status, msgs))
}
