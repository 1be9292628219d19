//! `h2c --listen ADDR --name NAME`: an HTTP/1.1 server that honours `Upgrade: h2c` (RFC
//! 7540 §3.2), as some application servers do, so tests can check that nothing upgrades a
//! connection through the waypoint.
//!
//! - A plain HTTP/1.1 request gets 200, body `hello from NAME\n`, header `x-path`; the
//!   server prints `http1 request: METHOD PATH`.
//! - A request with `Connection: Upgrade` and `Upgrade: h2c` gets `101 Switching
//!   Protocols`, with or without `HTTP2-Settings` (RFC 7540 wants it, but servers differ,
//!   and a proxy that forwards the upgrade would drop it when `Connection` names it; an
//!   attacker just sends it unnamed). The server prints
//!   `h2c upgrade: METHOD PATH`, answers that request on stream 1 (body `upgraded\n`) and
//!   serves HTTP/2 on the connection from then on, printing `h2c request: METHOD PATH` for
//!   each request and answering 200 with body `h2c hello from NAME PATH\n`.
//!
//! Tests read the printed lines: any `h2c upgrade:` line means an upgraded connection
//! reached the server.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;

/// Serves until killed.
pub async fn serve(listen: SocketAddr, name: String) -> ExitCode {
    let Some(listener) = super::bind(listen).await else {
        return ExitCode::from(2);
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("ambit-testapp: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, name.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                eprintln!("ambit-testapp: h2c connection from {peer}: {e}");
            }
        });
    }
}

type Body = Full<Bytes>;

fn wants_h2c(req: &Request<Incoming>) -> bool {
    let connection = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
    connection && upgrade
}

async fn answer(mut req: Request<Incoming>, name: String) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if !wants_h2c(&req) {
        println!("http1 request: {method} {path}");
        let mut resp = Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
        if let Ok(v) = http::HeaderValue::from_str(&path) {
            resp.headers_mut().insert("x-path", v);
        }
        return Ok(resp);
    }
    println!("h2c upgrade: {method} {path}");
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve_h2(TokioIo::new(upgraded), name).await,
            Err(e) => eprintln!("ambit-testapp: h2c upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, http::HeaderValue::from_static("Upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, http::HeaderValue::from_static("h2c"));
    Ok(resp)
}

/// HTTP/2 on an upgraded connection. The h2 crate knows nothing of the upgrade, so the
/// answer to the upgrading request (stream 1, RFC 7540 §3.2) is written into the byte
/// stream right after h2's own connection preface.
async fn serve_h2<IO>(io: IO, name: String)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let io = StreamOneAnswer::new(io, stream_one_answer());
    let mut conn = match h2::server::handshake(io).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ambit-testapp: h2c handshake: {e}");
            return;
        }
    };
    while let Some(accepted) = conn.accept().await {
        let Ok((req, mut respond)) = accepted else {
            break;
        };
        let path = req.uri().path().to_string();
        println!("h2c request: {} {path}", req.method());
        let resp = http::Response::new(());
        if let Ok(mut send) = respond.send_response(resp, false) {
            let body = Bytes::from(format!("h2c hello from {name} {path}\n"));
            let _ = send.send_data(body, true);
        }
    }
}

/// HEADERS (`:status: 200`, END_HEADERS) and DATA (`upgraded\n`, END_STREAM) on stream 1.
fn stream_one_answer() -> Bytes {
    fn frame(out: &mut BytesMut, kind: u8, flags: u8, payload: &[u8]) {
        let len = payload.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut out = BytesMut::new();
    // HPACK: indexed `:status: 200` (static table entry 8).
    frame(&mut out, 0x1, 0x4, &[0x88]);
    frame(&mut out, 0x0, 0x1, b"upgraded\n");
    out.freeze()
}

/// Writes `inject` into the outgoing bytes right after the first HTTP/2 frame (the
/// server's SETTINGS); passes everything else through.
struct StreamOneAnswer<IO> {
    inner: IO,
    /// Bytes of the first frame seen so far, and its header.
    seen: usize,
    header: [u8; FRAME_HEADER],
    inject: Bytes,
}

impl<IO> StreamOneAnswer<IO> {
    fn new(inner: IO, inject: Bytes) -> Self {
        StreamOneAnswer {
            inner,
            seen: 0,
            header: [0; FRAME_HEADER],
            inject,
        }
    }

    /// Bytes left in the first frame; `None` once it has passed.
    fn first_frame_left(&self) -> Option<usize> {
        if self.seen < FRAME_HEADER {
            return Some(FRAME_HEADER - self.seen);
        }
        let len = usize::from(self.header[0]) << 16
            | usize::from(self.header[1]) << 8
            | usize::from(self.header[2]);
        let total = FRAME_HEADER + len;
        (self.seen < total).then(|| total - self.seen)
    }
}

impl<IO: AsyncWrite + Unpin> StreamOneAnswer<IO> {
    /// Writes what is left of the injected bytes once the first frame has passed.
    fn poll_inject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.first_frame_left().is_none() && !self.inject.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.inject))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.inject.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for StreamOneAnswer<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StreamOneAnswer<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_inject(cx))?;
        let Some(left) = this.first_frame_left() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        let chunk = &buf[..buf.len().min(left)];
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, chunk))?;
        for (i, b) in chunk[..n].iter().enumerate() {
            if let Some(slot) = this.header.get_mut(this.seen + i) {
                *slot = *b;
            }
        }
        this.seen += n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_inject(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_inject(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
