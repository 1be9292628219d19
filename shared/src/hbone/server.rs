//! Serving HBONE on one accepted (already TLS-terminated) connection.
//!
//! Each CONNECT stream is handed to a caller-supplied handler on its own task; the handler
//! decides the status and, on 200, gets the stream as an [`H2Stream`].
//!
//! Bounds in time ([`Timeouts`]): the client's preface must arrive within
//! [`Timeouts::preface`]; a PING every [`Timeouts::keepalive_interval`] must be answered
//! within [`Timeouts::keepalive_timeout`] (a peer that vanished without a FIN, or stopped
//! reading, is closed); and a connection that carries no stream for [`Timeouts::idle`] is
//! closed with GOAWAY.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{Instrument, debug};

use super::{H2Stream, settings};

/// A CONNECT stream waiting for its answer.
pub struct Incoming {
    /// The request (headers only; the body is the tunnel).
    pub request: Request<()>,
    recv: h2::RecvStream,
    respond: h2::server::SendResponse<Bytes>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Accepts the tunnel with 200 and returns the byte stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self
            .respond
            .send_response(response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.recv))
    }

    /// Refuses the tunnel with `status` (ends the stream).
    pub fn refuse(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(response(status), true) {
            debug!(error = %e, "peer went away before the refusal");
        }
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Default time from the end of the TLS handshake to the client's HTTP/2 preface. A
/// client sends it with its first flight; a connection that does not is not a client.
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval between keepalive PINGs.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a peer has to answer a keepalive PING before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may carry no stream before it is closed with GOAWAY. Twice the
/// client pool's own idle timeout (60 s), so our clients always close first and never race
/// a GOAWAY with a new stream.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What bounds a connection in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the call to the client's preface and SETTINGS. Default
    /// [`DEFAULT_PREFACE_TIMEOUT`].
    pub preface: Duration,
    /// Between PINGs. Default [`DEFAULT_KEEPALIVE_INTERVAL`].
    pub keepalive_interval: Duration,
    /// For the PING's answer; without one the peer is gone (or hostile) and the connection
    /// is closed. Default [`DEFAULT_KEEPALIVE_TIMEOUT`].
    pub keepalive_timeout: Duration,
    /// With no stream for this long the connection is closed gracefully (GOAWAY). `None`:
    /// never. Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            preface: DEFAULT_PREFACE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// How a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed it (or sent GOAWAY and finished its streams).
    ByPeer,
    /// It carried no stream for [`Timeouts::idle`].
    Idle,
    /// The shutdown future fired and the open streams finished.
    Drained,
}

/// Why a connection was closed on the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// An HTTP/2 protocol or I/O error.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The client sent no HTTP/2 preface in time.
    #[error("no HTTP/2 preface within {0:?}")]
    PrefaceTimeout(Duration),
    /// The peer did not answer a PING in time.
    #[error("no answer to a keepalive PING within {0:?}")]
    KeepaliveTimeout(Duration),
}

impl ServeError {
    /// The phase that timed out, for metrics (`preface`, `keepalive`); `None` for errors.
    pub fn timeout_phase(&self) -> Option<&'static str> {
        match self {
            ServeError::PrefaceTimeout(_) => Some("preface"),
            ServeError::KeepaliveTimeout(_) => Some("keepalive"),
            ServeError::H2(_) => None,
        }
    }
}

/// Serves HTTP/2 on `io` until the peer closes it, spawning `handle` per stream.
pub async fn serve<IO, H, Fut>(io: IO, timeouts: Timeouts, handle: H) -> Result<Closed, ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with_shutdown(io, timeouts, handle, std::future::pending()).await
}

/// Like [`serve`], and once `shutdown` completes, shuts down gracefully: sends GOAWAY so
/// the peer opens no new streams, lets the open ones finish, then returns.
pub async fn serve_with_shutdown<IO, H, Fut, S>(
    io: IO,
    timeouts: Timeouts,
    handle: H,
    shutdown: S,
) -> Result<Closed, ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings::STREAM_WINDOW)
        .initial_connection_window_size(settings::CONNECTION_WINDOW)
        .max_frame_size(settings::MAX_FRAME_SIZE)
        .max_header_list_size(settings::MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(settings::SERVER_MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(settings::MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(timeouts.preface, handshake).await {
        Ok(conn) => conn?,
        Err(_) => return Err(ServeError::PrefaceTimeout(timeouts.preface)),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let mut ended = Closed::ByPeer;
    let mut keepalive = Keepalive::new(conn.ping_pong(), &timeouts);
    let timer = tokio::time::sleep_until(keepalive.next_deadline());
    let mut timer = std::pin::pin!(timer);
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut shutdown, if ended != Closed::Drained => {
                ended = Closed::Drained;
                conn.graceful_shutdown();
                continue;
            }
            pong = keepalive.pong(), if keepalive.awaiting() => {
                if let Err(e) = pong {
                    debug!(error = %e, "keepalive PING failed; no more PINGs on this connection");
                }
                timer.as_mut().reset(keepalive.next_deadline());
                continue;
            }
            () = &mut timer => {
                match keepalive.on_timer(conn.has_streams())? {
                    Tick::Continue => {}
                    Tick::Idle if ended == Closed::ByPeer => {
                        debug!(idle = ?timeouts.idle, "no stream for the idle timeout; closing with GOAWAY");
                        ended = Closed::Idle;
                        conn.graceful_shutdown();
                    }
                    Tick::Idle => {}
                }
                timer.as_mut().reset(keepalive.next_deadline());
                continue;
            }
        };
        let Some(next) = next else { break };
        let (request, respond) = match next {
            Ok(r) => r,
            // A peer that closes its end after our GOAWAY, without waiting for our PING
            // to be answered, ends a connection we were closing anyway.
            Err(e) if ended != Closed::ByPeer => {
                debug!(error = %e, "connection closed during its shutdown");
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let (parts, recv) = request.into_parts();
        let incoming = Incoming {
            request: Request::from_parts(parts, ()),
            recv,
            respond,
        };
        tokio::spawn(handle(incoming).in_current_span());
    }
    Ok(ended)
}

/// What the connection's timer says.
enum Tick {
    Continue,
    /// No stream for the idle timeout.
    Idle,
}

/// Keepalive PINGs and the idle clock of one connection.
struct Keepalive {
    pinger: Option<h2::PingPong>,
    interval: Duration,
    answer_within: Duration,
    idle: Option<Duration>,
    next_ping: Instant,
    /// When the PING in flight must have been answered.
    pong_due: Option<Instant>,
    /// Since when the connection has carried no stream (as last seen).
    idle_since: Option<Instant>,
}

impl Keepalive {
    fn new(pinger: Option<h2::PingPong>, t: &Timeouts) -> Self {
        let now = Instant::now();
        Keepalive {
            pinger,
            interval: t.keepalive_interval,
            answer_within: t.keepalive_timeout,
            idle: t.idle,
            next_ping: now + t.keepalive_interval,
            pong_due: None,
            idle_since: Some(now),
        }
    }

    fn awaiting(&self) -> bool {
        self.pong_due.is_some() && self.pinger.is_some()
    }

    async fn pong(&mut self) -> Result<(), h2::Error> {
        let result = match self.pinger.as_mut() {
            Some(p) => std::future::poll_fn(|cx| p.poll_pong(cx)).await.map(|_| ()),
            None => Ok(()),
        };
        self.pong_due = None;
        self.next_ping = Instant::now() + self.interval;
        if result.is_err() {
            self.pinger = None;
        }
        result
    }

    fn next_deadline(&self) -> Instant {
        let ping = self.pong_due.unwrap_or(self.next_ping);
        match (self.idle, self.idle_since) {
            (Some(idle), Some(since)) => ping.min(since + idle),
            _ => ping,
        }
    }

    fn on_timer(&mut self, has_streams: bool) -> Result<Tick, ServeError> {
        let now = Instant::now();
        if self.pong_due.is_some_and(|due| now >= due) {
            return Err(ServeError::KeepaliveTimeout(self.answer_within));
        }
        if self.pong_due.is_none()
            && now >= self.next_ping
            && let Some(p) = self.pinger.as_mut()
        {
            match p.send_ping(h2::Ping::opaque()) {
                Ok(()) => self.pong_due = Some(now + self.answer_within),
                Err(e) => {
                    debug!(error = %e, "keepalive PING not sent");
                    self.next_ping = now + self.interval;
                }
            }
        }
        if has_streams {
            self.idle_since = None;
            return Ok(Tick::Continue);
        }
        // Streams are only looked at here, so a connection that just lost its last stream
        // is seen idle at the next tick (at most a keepalive interval late).
        let since = *self.idle_since.get_or_insert(now);
        match self.idle {
            Some(idle) if now >= since + idle => {
                // Once: the GOAWAY is sent and the connection winds down on its own.
                self.idle = None;
                Ok(Tick::Idle)
            }
            _ => Ok(Tick::Continue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept_all() -> impl Fn(Incoming) -> std::future::Ready<()> {
        |incoming: Incoming| {
            if let Ok(s) = incoming.accept() {
                // Hold the stream open for a while: the test decides when it ends.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    drop(s);
                });
            }
            std::future::ready(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_preface_is_closed() {
        let (_client, server_io) = tokio::io::duplex(1024);
        let end = serve(server_io, Timeouts::default(), accept_all()).await;
        assert!(
            matches!(end, Err(ServeError::PrefaceTimeout(d)) if d == DEFAULT_PREFACE_TIMEOUT),
            "{end:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_closed() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server_io, Timeouts::default(), accept_all()));
        // The client's connection task is never polled after the handshake, so no PING
        // is ever answered: a peer that froze, or vanished without a FIN.
        let (_send, _conn) = h2::client::handshake(client_io)
            .await
            .expect("client handshake");
        let started = Instant::now();
        let end = server.await.expect("server task");
        assert!(
            matches!(end, Err(ServeError::KeepaliveTimeout(_))),
            "{end:?}"
        );
        assert_eq!(
            started.elapsed().as_secs(),
            (DEFAULT_KEEPALIVE_INTERVAL + DEFAULT_KEEPALIVE_TIMEOUT).as_secs()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_streams_is_closed_when_idle_but_not_while_a_stream_lives() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server_io, Timeouts::default(), accept_all()));
        let (send, conn) = h2::client::handshake(client_io)
            .await
            .expect("client handshake");
        let client = tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let mut req = Request::new(());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = "10.0.0.1:80".parse().expect("authority");
        let (resp, _body) = send.send_request(req, false).expect("stream");
        let resp = resp.await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        // The stream lives 600 s: far past the idle timeout, the connection stays.
        tokio::time::sleep(DEFAULT_IDLE_TIMEOUT * 3).await;
        assert!(!server.is_finished(), "closed while a stream was open");
        // Once the stream is over, the idle clock runs and GOAWAY ends the connection.
        let started = Instant::now();
        drop(send);
        let end = server.await.expect("server task");
        assert!(matches!(end, Ok(Closed::Idle)), "{end:?}");
        assert!(
            started.elapsed()
                <= Duration::from_secs(600) + DEFAULT_IDLE_TIMEOUT + DEFAULT_KEEPALIVE_INTERVAL
        );
        client.abort();
    }
}
