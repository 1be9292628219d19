//! Pooled HBONE client connections.
//!
//! Connections are keyed by (source identity, destination identity, destination address,
//! source certificate generation) and carry at most `max_streams_per_conn` streams. Putting
//! the certificate generation in the key is what makes renewal make-before-break: new
//! streams go to connections that present the new certificate while old connections
//! finish their streams and are reaped once idle.
//!
//! Dials for one key are serialized, so a burst of new streams to a fresh destination
//! shares connections instead of opening one TLS connection per stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{Error, H2Stream, settings};
use crate::identity::Identity;

/// Pool tuning.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened. Default 100.
    pub max_streams_per_conn: usize,
    /// A connection with no streams for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Bound on TCP connect plus TLS and HTTP/2 handshakes. Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What a pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity presented by this side.
    pub src: Identity,
    /// Identity the peer must prove.
    pub dst: Identity,
    /// The peer's HBONE address.
    pub addr: SocketAddr,
    /// Generation of the source certificate; bumps on every renewal.
    pub cert_generation: u64,
}

/// A pool of HBONE client connections. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: PoolConfig,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    dial_locks: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

impl Conn {
    /// True once the peer sent GOAWAY (or the connection failed): h2 refuses new streams
    /// from then on. Checked without waiting: with no stream pending on this handle,
    /// `poll_ready` only reports the connection's state.
    fn going_away(&self) -> bool {
        let mut send = self.send.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }
}

/// Counts a stream against its connection for as long as the stream lives.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock() = Instant::now();
        }
    }
}

impl Pool {
    /// Creates a pool and starts its reaper on the current tokio runtime.
    pub fn new(cfg: PoolConfig) -> Self {
        let inner = Arc::new(Inner {
            cfg,
            conns: Mutex::new(HashMap::new()),
            dial_locks: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// Number of open connections (for tests and admin).
    pub fn connection_count(&self) -> usize {
        self.inner.conns.lock().values().map(Vec::len).sum()
    }

    /// Opens a CONNECT stream for `key`, reusing a pooled connection when one has room and
    /// calling `dial` (TCP + TLS) otherwise.
    pub async fn open<D, Fut, IO>(
        &self,
        key: PoolKey,
        req: Request<()>,
        dial: D,
    ) -> Result<H2Stream, Error>
    where
        D: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, Error>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut dial = Some(dial);
        // One retry, only when a reused connection failed before the stream opened: that
        // connection was dead (peer restarted, pod IP reused) and nothing was sent on it.
        for attempt in 0..2 {
            let (conn, reused) = match self.checkout(&key) {
                Some(c) => (c, true),
                None => {
                    let lock = self.dial_lock(&key);
                    let _serialized = lock.lock().await;
                    match self.checkout(&key) {
                        Some(c) => (c, true),
                        None => match dial.take() {
                            Some(d) => (self.dial(&key, d).await?, false),
                            None => return Err(Error::Timeout(key.addr)),
                        },
                    }
                }
            };
            let guard = StreamGuard(conn.clone());
            match send(&conn, clone_request(&req)).await {
                Ok(stream) => return Ok(stream.with_guard(Box::new(guard))),
                Err(Error::H2(e)) if reused && attempt == 0 && !e.is_reset() => {
                    debug!(conn = conn.id, error = %e, "pooled HBONE connection failed, retrying on a new one");
                    conn.closed.store(true, Ordering::Release);
                }
                Err(e) => {
                    if matches!(e, Error::H2(_)) {
                        conn.closed.store(true, Ordering::Release);
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::Timeout(key.addr))
    }

    fn checkout(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let max = self.inner.cfg.max_streams_per_conn;
        let conns = self.inner.conns.lock();
        conns.get(key)?.iter().find_map(|c| {
            if c.closed.load(Ordering::Acquire) {
                return None;
            }
            if c.going_away() {
                // The peer is draining (GOAWAY): its open streams finish, new ones go to
                // a fresh connection, which a draining peer refuses, so the caller moves
                // on to another replica.
                debug!(
                    conn = c.id,
                    "pooled HBONE connection received GOAWAY; not reused"
                );
                c.closed.store(true, Ordering::Release);
                return None;
            }
            c.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()
                .map(|_| c.clone())
        })
    }

    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .dial_locks
            .lock()
            .entry(key.clone())
            .or_default()
            .clone()
    }

    async fn dial<D, Fut, IO>(&self, key: &PoolKey, dial: D) -> Result<Arc<Conn>, Error>
    where
        D: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, Error>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.inner.cfg.connect_timeout;
        let handshake = async {
            let io = dial().await?;
            let (send, connection) = h2::client::Builder::new()
                .initial_window_size(settings::STREAM_WINDOW)
                .initial_connection_window_size(settings::CONNECTION_WINDOW)
                .max_frame_size(settings::MAX_FRAME_SIZE)
                .max_header_list_size(settings::MAX_HEADER_LIST_SIZE)
                .max_send_buffer_size(settings::MAX_SEND_BUFFER)
                .handshake::<_, Bytes>(io)
                .await?;
            Ok::<_, Error>((send, connection))
        };
        let (send, connection) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| Error::Timeout(key.addr))??;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_by_task = closed.clone();
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(conn = id, %addr, error = %e, "HBONE connection ended with error");
            }
            closed_by_task.store(true, Ordering::Release);
        });
        // Counted as active from birth: the caller is about to open a stream on it.
        let conn = Arc::new(Conn {
            id,
            send,
            active: AtomicUsize::new(1),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        self.inner
            .conns
            .lock()
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        debug!(conn = id, %addr, src = %key.src, dst = %key.dst, "opened HBONE connection");
        Ok(conn)
    }
}

fn clone_request(req: &Request<()>) -> Request<()> {
    let mut out = Request::new(());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    out
}

async fn send(conn: &Conn, req: Request<()>) -> Result<H2Stream, Error> {
    let mut sender = conn.send.clone().ready().await?;
    let (response, send_stream) = sender.send_request(req, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(Error::Status(response.status()));
    }
    Ok(H2Stream::new(send_stream, response.into_body()))
}

async fn reap(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.cfg.idle_timeout / 4).max(Duration::from_millis(250)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let idle_timeout = inner.cfg.idle_timeout;
        let mut conns = inner.conns.lock();
        conns.retain(|_, list| {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().elapsed() >= idle_timeout;
                let keep = !c.closed.load(Ordering::Acquire) && !idle;
                if !keep {
                    debug!(conn = c.id, idle, "reaping HBONE connection");
                }
                keep
            });
            !list.is_empty()
        });
        inner
            .dial_locks
            .lock()
            .retain(|k, lock| conns.contains_key(k) || Arc::strong_count(lock) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::server;

    fn key() -> PoolKey {
        PoolKey {
            src: Identity::new("td", "ns", "a").expect("identity"),
            dst: Identity::new("td", "ns", "b").expect("identity"),
            addr: SocketAddr::from(([127, 0, 0, 1], 15008)),
            cert_generation: 0,
        }
    }

    fn connect() -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = "10.0.0.1:80".parse().expect("authority");
        req
    }

    /// A dial to an in-memory HBONE server that accepts every stream and sends GOAWAY once
    /// `shutdown` fires.
    fn serve(shutdown: tokio::sync::oneshot::Receiver<()>) -> tokio::io::DuplexStream {
        let (client, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(server::serve_with_shutdown(
            server_io,
            server::Timeouts::default(),
            |incoming| async move {
                if let Ok(mut s) = incoming.accept() {
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut [0u8; 1]).await;
                }
            },
            async move {
                let _ = shutdown.await;
            },
        ));
        client
    }

    #[tokio::test]
    async fn a_connection_that_received_goaway_gets_no_new_streams() {
        let pool = Pool::new(PoolConfig::default());
        let dials = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let counted = dials.clone();
        let first = pool
            .open(key(), connect(), move || async move {
                counted.fetch_add(1, Ordering::AcqRel);
                Ok::<_, Error>(serve(stopped))
            })
            .await
            .expect("first stream");
        drop(first);
        // Reused while the peer is not draining.
        let second = pool
            .open(key(), connect(), || async {
                Err::<tokio::io::DuplexStream, _>(Error::Timeout(key().addr))
            })
            .await
            .expect("reused connection");
        drop(second);
        assert_eq!(dials.load(Ordering::Acquire), 1);

        stop.send(()).expect("server running");
        // Give the client's connection task time to read the GOAWAY.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_keep, fresh) = tokio::sync::oneshot::channel();
        let counted = dials.clone();
        let third = pool
            .open(key(), connect(), move || async move {
                counted.fetch_add(1, Ordering::AcqRel);
                Ok::<_, Error>(serve(fresh))
            })
            .await
            .expect("stream on a new connection");
        assert_eq!(
            dials.load(Ordering::Acquire),
            2,
            "the GOAWAY'd connection was reused"
        );
        drop(third);
    }
}
