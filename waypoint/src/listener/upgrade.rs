//! Protocol upgrades through the waypoint: HTTP/1.1 `Upgrade` and HTTP/2 extended CONNECT
//! (RFC 8441, `:protocol`), for the protocols on an allowlist only.
//!
//! **The allowlist** ([`Allowlist`], `waypoint run --upgrade-protocols`, default
//! `websocket`) is what keeps authorization meaningful: once a connection switches
//! protocols, the waypoint splices bytes and sees no further requests, so an upgrade to a
//! protocol that carries requests of its own would carry them past every rule.
//! [`requested`] decides per request, before authorization:
//! - an allowlisted protocol (compared without regard to case, ignoring a `/version`) is
//!   an upgrade, and only that protocol is offered to the endpoint;
//! - `h2c` is removed, as Envoy does: `Upgrade: h2c`, `HTTP2-Settings` and their
//!   `Connection` tokens are stripped and the request is served as plain HTTP/1.1, so a
//!   client that offered h2c gets an HTTP/1.1 answer and carries on in HTTP/1.1;
//! - any other protocol is refused with 403, as Envoy refuses upgrades it is not
//!   configured for. An extended CONNECT for a protocol not on the list is refused too.
//!
//! An endpoint's 101 must name the protocol asked for; any other switch is a 502. A 101 to
//! a request that asked for no upgrade is a 502 as well ([`super::http`]).
//!
//! The upgrade request is routed like any other (routes, filters, backend pick), then sent
//! to one endpoint over a dedicated HTTP/1.1 connection (an HBONE stream of its own, never a
//! pooled one: once upgraded, the connection belongs to this client). When the endpoint
//! answers 101, both upgraded connections are spliced by [`splice`].
//!
//! What is supported:
//! - HTTP/1.1 `Upgrade` in, HTTP/1.1 `Upgrade` out: headers pass through (minus
//!   hop-by-hop ones; `Connection: upgrade` and `Upgrade` are set again).
//! - HTTP/2 extended CONNECT in: translated to an HTTP/1.1 `Upgrade` upstream, since every
//!   WebSocket server speaks it and few accept RFC 8441. For `:protocol websocket` the
//!   waypoint adds `Sec-WebSocket-Key`/`Sec-WebSocket-Version: 13` and answers the client
//!   200 on the endpoint's 101 (the accept key belongs to the hop, not to the client).
//!
//! The route's `timeouts.request` bounds the handshake only; an upgraded stream lives until
//! either side closes it, or until [`crate::listener::ListenerConfig::idle_timeout`] when
//! one is configured. It counts as a request against the overload caps while it lives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambit_shared::drain::DrainWatcher;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::Downstream;
use super::http::ResponseBody;
use crate::overload::Permit;
use crate::upstream::{Endpoint, SendError, strip_hop_by_hop};

/// WebSocket close code "going away" (RFC 6455 §7.4.1), sent on drain.
pub const GOING_AWAY: u16 = 1001;
/// After sending our Close, how long a peer may take to answer with its own.
const CLOSE_HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
/// Splice read buffer per direction.
const BUF: usize = 16 * 1024;

/// An upgrade the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: <protocol>`.
    Http1 {
        /// The `Upgrade` header.
        protocol: String,
    },
    /// HTTP/2 CONNECT with `:protocol` (RFC 8441).
    ExtendedConnect {
        /// The `:protocol` pseudo-header.
        protocol: String,
    },
}

impl Kind {
    /// The requested protocol, as named by the client.
    pub fn protocol(&self) -> &str {
        match self {
            Kind::Http1 { protocol } | Kind::ExtendedConnect { protocol } => protocol,
        }
    }

    /// Whether the upgraded bytes are WebSocket frames.
    pub fn is_websocket(&self) -> bool {
        self.protocol()
            .split(',')
            .next()
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
    }
}

/// The upgrade protocols the waypoint splices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist(Vec<String>);

/// The default allowlist.
pub const DEFAULT_PROTOCOLS: &[&str] = &["websocket"];

/// The HTTP/2 cleartext upgrade token (RFC 7540 §3.2), which is stripped, never spliced.
const H2C: &str = "h2c";
/// The header that goes with an h2c upgrade.
const HTTP2_SETTINGS: &str = "http2-settings";

// === impl Allowlist ===

impl Allowlist {
    /// Protocol names (`websocket`); case and any `/version` are ignored. `h2c` is never
    /// allowed, whatever the list says.
    pub fn new<S: AsRef<str>>(protocols: impl IntoIterator<Item = S>) -> Self {
        Allowlist(
            protocols
                .into_iter()
                .map(|p| protocol_name(p.as_ref()).to_ascii_lowercase())
                .filter(|p| !p.is_empty() && p != H2C)
                .collect(),
        )
    }

    /// Whether `protocol` (`websocket`, `websocket/13`) may be spliced.
    pub fn allows(&self, protocol: &str) -> bool {
        let name = protocol_name(protocol);
        self.0.iter().any(|p| p.eq_ignore_ascii_case(name))
    }
}

impl Default for Allowlist {
    fn default() -> Self {
        Allowlist::new(DEFAULT_PROTOCOLS)
    }
}

/// `name` of an upgrade token `name[/version]`.
fn protocol_name(token: &str) -> &str {
    let token = token.trim();
    token.split('/').next().unwrap_or(token).trim()
}

/// An upgrade the allowlist refuses (403, as Envoy answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upgrade to {protocol:?} is not allowed")]
pub struct NotAllowed {
    /// What the client asked for.
    pub protocol: String,
}

impl NotAllowed {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        StatusCode::FORBIDDEN
    }
}

/// The upgrade `head` asks for, if any, as the allowlist lets it through; see the module
/// docs. Rewrites `head`: an h2c offer is stripped, and of several protocols offered only
/// the first allowed one is kept, so the endpoint cannot switch to another.
pub fn requested(
    head: &mut http::request::Parts,
    allow: &Allowlist,
) -> Result<Option<Kind>, NotAllowed> {
    if head.version == Version::HTTP_2 {
        if head.method != Method::CONNECT {
            return Ok(None);
        }
        let Some(p) = head.extensions.get::<hyper::ext::Protocol>() else {
            return Ok(None);
        };
        let protocol = p.as_str().to_string();
        return if allow.allows(&protocol) {
            Ok(Some(Kind::ExtendedConnect { protocol }))
        } else {
            Err(NotAllowed { protocol })
        };
    }
    let offered: Vec<String> = head
        .headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let connection_upgrade =
        connection_tokens(&head.headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if offered.is_empty() || !connection_upgrade {
        // Not an upgrade; the upstream request drops `Upgrade` as a hop-by-hop header.
        return Ok(None);
    }
    let without_h2c: Vec<&String> = offered
        .iter()
        .filter(|t| !protocol_name(t).eq_ignore_ascii_case(H2C))
        .collect();
    if let Some(first) = without_h2c.iter().find(|t| allow.allows(t)) {
        let protocol = (*first).clone();
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            head.headers.insert(UPGRADE, v);
        }
        return Ok(Some(Kind::Http1 { protocol }));
    }
    if without_h2c.is_empty() {
        strip_h2c(&mut head.headers);
        return Ok(None);
    }
    Err(NotAllowed {
        protocol: offered.join(", "),
    })
}

/// The comma-separated tokens of every `Connection` header.
fn connection_tokens(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes an h2c offer: `Upgrade`, `HTTP2-Settings`, and their `Connection` tokens.
fn strip_h2c(headers: &mut http::HeaderMap) {
    let kept: Vec<String> = connection_tokens(headers)
        .filter(|t| !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case(HTTP2_SETTINGS))
        .map(str::to_string)
        .collect();
    headers.remove(UPGRADE);
    headers.remove(HTTP2_SETTINGS);
    headers.remove(CONNECTION);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(CONNECTION, v);
    }
}

/// An upgrade answered by an endpoint.
pub struct Opened {
    /// What the client gets (101, or 200 for extended CONNECT, or the endpoint's refusal).
    pub response: Response<ResponseBody>,
    /// The endpoint that answered.
    pub endpoint: Endpoint,
}

/// Sends the upgrade request to one of `endpoints` and, when it agrees, splices the two
/// upgraded connections on a task of their own (held against the drain by `drain`, and
/// against the overload caps by `admission`).
pub async fn open(
    down: &Arc<Downstream>,
    kind: Kind,
    client: OnUpgrade,
    head: &http::request::Parts,
    endpoints: &[Endpoint],
    drain: DrainWatcher,
    admission: Option<Permit>,
) -> Result<Opened, SendError> {
    let (io, endpoint, in_flight) = down.ctx.upstream.open_stream(endpoints).await?;
    let as_send_error = |reason: String| SendError {
        error: Some(crate::upstream::AttemptError::Connect {
            addr: endpoint.addr,
            reason,
        }),
        endpoint: Some(endpoint.clone()),
        attempts: 1,
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| as_send_error(format!("HTTP handshake: {e}")))?;
    let addr = endpoint.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(endpoint = %addr, error = %e, "upgrade connection to endpoint ended with an error");
        }
    });
    let request = upstream_request(head, &kind, endpoint.addr);
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| as_send_error(format!("upgrade request: {e}")))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The endpoint said no (401, 404, 426...): the client gets its answer as is.
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = body.map_err(Into::into).boxed_unsync();
        return Ok(Opened {
            response: Response::from_parts(parts, body),
            endpoint,
        });
    }
    if !switched_to(response.headers(), &kind) {
        // RFC 9110 §7.8: the 101 names the protocol switched to. Anything but the one asked
        // for (which the allowlist let through) is a protocol nothing here has checked.
        return Err(SendError {
            error: Some(crate::upstream::AttemptError::Protocol {
                addr: endpoint.addr,
                reason: format!(
                    "answered 101 with Upgrade {:?}, but {:?} was asked for",
                    response.headers().get(UPGRADE),
                    kind.protocol()
                ),
            }),
            endpoint: Some(endpoint.clone()),
            attempts: 1,
        });
    }
    let upstream = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    let websocket = kind.is_websocket();
    let mut reply = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    match &kind {
        Kind::Http1 { protocol } => {
            let protocol = parts
                .headers
                .get(UPGRADE)
                .cloned()
                .or_else(|| HeaderValue::from_str(protocol).ok());
            strip_hop_by_hop(&mut parts.headers);
            *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *reply.headers_mut() = parts.headers;
            reply
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(p) = protocol {
                reply.headers_mut().insert(UPGRADE, p);
            }
        }
        Kind::ExtendedConnect { .. } => {
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove("sec-websocket-accept");
            *reply.status_mut() = StatusCode::OK;
            *reply.headers_mut() = parts.headers;
        }
    }
    let idle_timeout = down.ctx.cfg.idle_timeout;
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let _admission = admission;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(endpoint = %addr, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mode = if websocket {
            Mode::WebSocket
        } else {
            Mode::Raw
        };
        let outcome = splice(
            TokioIo::new(client),
            TokioIo::new(upstream),
            mode,
            drain,
            idle_timeout,
        )
        .await;
        debug!(endpoint = %addr, ?outcome, "upgraded stream ended");
    });
    Ok(Opened {
        response: reply,
        endpoint,
    })
}

/// Whether a 101's `Upgrade` header names the protocol `kind` asked for.
fn switched_to(headers: &http::HeaderMap, kind: &Kind) -> bool {
    let asked = protocol_name(kind.protocol());
    headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| protocol_name(v).eq_ignore_ascii_case(asked))
}

/// The request sent to the endpoint: always HTTP/1.1 with `Connection: upgrade`.
fn upstream_request(
    head: &http::request::Parts,
    kind: &Kind,
    endpoint: SocketAddr,
) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = head.headers.clone();
    strip_hop_by_hop(req.headers_mut());
    let path = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Ok(uri) = path.parse() {
        *req.uri_mut() = uri;
    }
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| endpoint.to_string());
    if !req.headers().contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        req.headers_mut().insert(HOST, v);
    }
    match kind {
        Kind::Http1 { protocol } => {
            *req.method_mut() = head.method.clone();
            if let Ok(v) = HeaderValue::from_str(protocol) {
                req.headers_mut().insert(UPGRADE, v);
            }
        }
        Kind::ExtendedConnect { protocol } => {
            // RFC 8441 §5: the HTTP/1.1 equivalent of extended CONNECT is a GET upgrade.
            *req.method_mut() = Method::GET;
            if let Ok(v) = HeaderValue::from_str(protocol) {
                req.headers_mut().insert(UPGRADE, v);
            }
            if kind.is_websocket() {
                let key: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
                if let Ok(v) = HeaderValue::from_str(&base64(&key)) {
                    req.headers_mut().insert("sec-websocket-key", v);
                }
                req.headers_mut()
                    .entry("sec-websocket-version")
                    .or_insert(HeaderValue::from_static("13"));
            }
        }
    }
    req.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    req
}

/// Standard base64 with padding (RFC 4648 §4), for the 16-byte WebSocket key.
fn base64(input: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(input)
}

/// How the spliced bytes are understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Opaque bytes: on drain, the stream is left to finish (or to the drain deadline).
    Raw,
    /// WebSocket frames: on drain, each side gets a Close (1001) at the next frame
    /// boundary, and the stream ends once both have answered with theirs.
    WebSocket,
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed.
    Closed,
    /// A drain closed it (WebSocket Close handshakes done or timed out).
    Drained,
    /// Nothing moved for the configured idle timeout.
    Idle,
    /// An I/O error on either side.
    Error,
}

/// Copies bytes between the client and the upstream until both are done, a drain closes a
/// WebSocket, or (when configured) the stream is idle for `idle_timeout`.
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    mode: Mode,
    drain: DrainWatcher,
    idle_timeout: Option<Duration>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let activity = Activity::new();
    let websocket = mode == Mode::WebSocket;
    let to_upstream = pump(cr, uw, Side::ToServer, websocket, &drain, &activity);
    let to_client = pump(ur, cw, Side::ToClient, websocket, &drain, &activity);
    let both = async { tokio::join!(to_upstream, to_client) };
    let idle = async {
        match idle_timeout {
            Some(t) => activity.idle(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        (a, b) = both => match (a, b) {
            (Ok(a), Ok(b)) if a || b => Outcome::Drained,
            (Ok(_), Ok(_)) => Outcome::Closed,
            _ => Outcome::Error,
        },
        () = idle => Outcome::Idle,
    }
}

/// Which way a pump copies; decides whether an injected frame is masked (RFC 6455 §5.3:
/// frames towards a server are masked, frames towards a client are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    ToServer,
    ToClient,
}

/// Time of the last byte moved, shared by both directions.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle_for = self.start.elapsed().saturating_sub(last);
            if idle_for >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle_for).await;
        }
    }
}

/// Copies `src` to `dst`. In WebSocket mode, once a drain starts, writes a Close (1001) at
/// the next frame boundary, drops what `src` sends after it, and stops when `src` answers
/// with its own Close. Returns whether a Close was injected.
async fn pump<R, W>(
    mut src: R,
    mut dst: W,
    side: Side,
    websocket: bool,
    drain: &DrainWatcher,
    activity: &Activity,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut frames = Frames::default();
    let mut out = BytesMut::new();
    let mut draining = false;
    let mut injected: Option<tokio::time::Instant> = None;
    let mut answered = false;
    loop {
        if websocket && draining && injected.is_none() && frames.at_boundary() {
            dst.write_all(&close_frame(side, GOING_AWAY)).await?;
            dst.flush().await?;
            injected = Some(tokio::time::Instant::now());
        }
        if answered {
            break;
        }
        let read = async {
            match injected {
                Some(at) => tokio::time::timeout_at(at + CLOSE_HANDSHAKE_WAIT, src.read(&mut buf))
                    .await
                    .unwrap_or(Ok(0)),
                None => src.read(&mut buf).await,
            }
        };
        let n = tokio::select! {
            r = read => r?,
            () = drain.signaled(), if websocket && !draining => {
                draining = true;
                continue;
            }
        };
        if n == 0 {
            break;
        }
        activity.touch();
        let chunk = &buf[..n];
        if !websocket {
            dst.write_all(chunk).await?;
            continue;
        }
        let mut i = 0;
        while i < chunk.len() {
            if frames.at_boundary() {
                frames.forward = injected.is_none();
            }
            let (used, opcode) = frames.step(&chunk[i..]);
            if frames.forward {
                out.extend_from_slice(&chunk[i..i + used]);
            }
            i += used;
            if opcode == Some(OPCODE_CLOSE) && injected.is_some() {
                answered = true;
            }
            if draining && injected.is_none() && frames.at_boundary() {
                out.extend_from_slice(&close_frame(side, GOING_AWAY));
                injected = Some(tokio::time::Instant::now());
            }
        }
        if !out.is_empty() {
            dst.write_all(&out).await?;
            out.clear();
        }
    }
    // Half-close: the other direction may still be finishing its closing handshake.
    let _ = dst.shutdown().await;
    Ok(injected.is_some())
}

const OPCODE_CLOSE: u8 = 0x8;

/// A Close frame with `code` and no reason; masked towards a server.
pub(crate) fn close_frame(side: Side, code: u16) -> Vec<u8> {
    let payload = code.to_be_bytes();
    match side {
        Side::ToClient => vec![0x80 | OPCODE_CLOSE, 2, payload[0], payload[1]],
        Side::ToServer => {
            let mask: [u8; 4] = std::array::from_fn(|_| fastrand::u8(..));
            vec![
                0x80 | OPCODE_CLOSE,
                0x80 | 2,
                mask[0],
                mask[1],
                mask[2],
                mask[3],
                payload[0] ^ mask[0],
                payload[1] ^ mask[1],
            ]
        }
    }
}

/// Finds WebSocket frame boundaries in a byte stream without buffering payloads: header
/// bytes are collected until the header is complete, payload bytes are only counted.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    header: Vec<u8>,
    payload_left: u64,
    /// Whether the current frame is forwarded (decided at its first byte).
    forward: bool,
}

impl Frames {
    pub(crate) fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// Consumes a prefix of `data`; returns its length and, when a header completes in it,
    /// the frame's opcode.
    pub(crate) fn step(&mut self, data: &[u8]) -> (usize, Option<u8>) {
        if self.payload_left > 0 {
            let n = (data.len() as u64).min(self.payload_left) as usize;
            self.payload_left -= n as u64;
            return (n, None);
        }
        for (i, b) in data.iter().enumerate() {
            self.header.push(*b);
            if let Some(len) = self.header_complete() {
                let opcode = self.header[0] & 0x0f;
                self.header.clear();
                self.payload_left = len;
                return (i + 1, Some(opcode));
            }
        }
        (data.len(), None)
    }

    /// The payload length once the header is complete (RFC 6455 §5.2).
    fn header_complete(&self) -> Option<u64> {
        let h = &self.header;
        if h.len() < 2 {
            return None;
        }
        let (ext, len7) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
        if h.len() < 2 + ext + mask {
            return None;
        }
        Some(match len7 {
            Some(n) => n,
            None => h[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn frames_are_found_across_reads() {
        // A masked text frame "hi", a 300-byte binary frame (16-bit length), a ping.
        let mut bytes = vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        bytes.extend([0x82, 126, 0x01, 0x2c]);
        bytes.extend(std::iter::repeat_n(7u8, 300));
        bytes.extend([0x89, 0x00]);
        let mut f = Frames::default();
        let mut opcodes = Vec::new();
        let mut boundaries = 0;
        // One byte at a time: the worst split.
        for b in &bytes {
            let (used, op) = f.step(std::slice::from_ref(b));
            assert_eq!(used, 1);
            opcodes.extend(op);
            if f.at_boundary() {
                boundaries += 1;
            }
        }
        assert_eq!(opcodes, vec![0x1, 0x2, 0x9]);
        assert_eq!(boundaries, 3);
        assert!(f.at_boundary());
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close_frame(Side::ToClient, 1001), vec![0x88, 2, 0x03, 0xe9]);
        let masked = close_frame(Side::ToServer, 1001);
        assert_eq!(masked.len(), 8);
        assert_eq!(masked[1], 0x82);
        assert_eq!(masked[6] ^ masked[2], 0x03);
        assert_eq!(masked[7] ^ masked[3], 0xe9);
    }

    fn upgrade_head(connection: &str, upgrade: &[&str]) -> http::request::Parts {
        let mut b = Request::builder()
            .uri("/chat")
            .header(CONNECTION, connection)
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA");
        for u in upgrade {
            b = b.header(UPGRADE, *u);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let allow = Allowlist::default();
        let mut head = upgrade_head("keep-alive, Upgrade", &["websocket"]);
        let kind = requested(&mut head, &allow)
            .expect("allowed")
            .expect("an upgrade");
        assert!(kind.is_websocket());
        head.headers.remove(CONNECTION);
        assert_eq!(requested(&mut head, &allow), Ok(None));
    }

    #[test]
    fn h2c_is_stripped_and_other_protocols_refused() {
        let allow = Allowlist::default();
        let mut head = upgrade_head("Upgrade, HTTP2-Settings, keep-alive", &["h2c"]);
        assert_eq!(requested(&mut head, &allow), Ok(None));
        assert!(!head.headers.contains_key(UPGRADE));
        assert!(!head.headers.contains_key("http2-settings"));
        assert_eq!(
            head.headers.get(CONNECTION).map(|v| v.as_bytes()),
            Some(&b"keep-alive"[..])
        );
        // Listing h2c with an allowed protocol: only the allowed one goes on.
        let mut head = upgrade_head("Upgrade", &["h2c, WebSocket/13"]);
        let kind = requested(&mut head, &allow).expect("allowed");
        assert_eq!(
            kind,
            Some(Kind::Http1 {
                protocol: "WebSocket/13".into()
            })
        );
        assert_eq!(
            head.headers.get(UPGRADE).map(|v| v.as_bytes()),
            Some(&b"WebSocket/13"[..])
        );
        // Not on the list: refused, also when h2c is offered alongside.
        for offer in [&["TLS/1.0"][..], &["h2c", "foo"][..]] {
            let mut head = upgrade_head("Upgrade", offer);
            assert!(requested(&mut head, &allow).is_err(), "{offer:?}");
        }
        // The list is configurable; h2c can never be put on it.
        let custom = Allowlist::new(["websocket", "foo", "H2C"]);
        let mut head = upgrade_head("Upgrade", &["foo"]);
        assert!(matches!(requested(&mut head, &custom), Ok(Some(_))));
        assert!(!custom.allows("h2c"));
        let mut head = upgrade_head("Upgrade", &["h2c"]);
        assert_eq!(requested(&mut head, &custom), Ok(None));
    }

    #[test]
    fn extended_connect_follows_the_allowlist() {
        let mut head = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("http://chat/ws")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        head.extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(matches!(
            requested(&mut head, &Allowlist::default()),
            Ok(Some(Kind::ExtendedConnect { .. }))
        ));
        head.extensions
            .insert(hyper::ext::Protocol::from_static("connect-udp"));
        assert!(requested(&mut head, &Allowlist::default()).is_err());
    }

    #[test]
    fn a_101_must_name_the_protocol_asked_for() {
        let kind = Kind::Http1 {
            protocol: "websocket".into(),
        };
        let mut h = http::HeaderMap::new();
        assert!(!switched_to(&h, &kind));
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!switched_to(&h, &kind));
        h.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(switched_to(&h, &kind));
    }

    #[tokio::test]
    async fn drain_sends_going_away_to_both_sides() {
        let (client, mut client_peer) = tokio::io::duplex(4096);
        let (upstream, mut upstream_peer) = tokio::io::duplex(4096);
        let (trigger, watcher) = ambit_shared::drain::channel();
        let task = tokio::spawn(splice(client, upstream, Mode::WebSocket, watcher, None));
        // A masked text frame from the client reaches the upstream unchanged.
        let frame = [0x81, 0x82, 9, 9, 9, 9, b'o' ^ 9, b'k' ^ 9];
        client_peer.write_all(&frame).await.expect("write");
        let mut got = [0u8; 8];
        upstream_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, frame);
        let drained = tokio::spawn(trigger.drain(Duration::from_secs(10)));
        let mut close = [0u8; 4];
        client_peer
            .read_exact(&mut close)
            .await
            .expect("client close");
        assert_eq!(close, [0x88, 2, 0x03, 0xe9]);
        let mut masked = [0u8; 8];
        upstream_peer
            .read_exact(&mut masked)
            .await
            .expect("upstream close");
        assert_eq!(masked[0], 0x88);
        // Both answer with their Close; the splice ends and the drain completes.
        client_peer
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9])
            .await
            .expect("client answer");
        upstream_peer
            .write_all(&[0x88, 2, 0x03, 0xe9])
            .await
            .expect("upstream answer");
        assert_eq!(task.await.expect("splice"), Outcome::Drained);
        assert!(drained.await.expect("drain"));
        // The peers' answers were not forwarded: each got exactly one Close, then EOF.
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty(), "client got {rest:?}");
    }
}
