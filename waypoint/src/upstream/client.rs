//! HTTP connections to endpoints, pooled per endpoint.
//!
//! - HTTP/2 (and gRPC): one multiplexed connection per endpoint, shared by every request
//!   to it; the dial is serialized so a burst opens one connection, not one per request.
//! - HTTP/1.1: a stack of idle keep-alive connections per endpoint. A connection goes back
//!   on the stack once its response has been read to the end; one whose response was
//!   abandoned is closed by hyper and never reused. A request that hyper reports it never
//!   wrote (the idle connection had just been closed by the peer) moves to another
//!   connection without counting as a retry.
//!
//! Each connection runs over one HBONE stream to the endpoint (or plain TCP for an
//! endpoint outside the mesh). Connections idle longer than the idle timeout are dropped by
//! a reaper task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ambit_shared::identity::Identity;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tracing::debug;

use super::body::ReplayBody;
use super::{AttemptError, Io};

/// Per-stream HTTP/2 receive window towards endpoints.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Per-connection HTTP/2 receive window; larger than the stream window, as HBONE's.
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Pings keep idle HTTP/2 connections honest; a peer that stops answering is dropped.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads on an endpoint's shared HTTP/2 connection go through a buffer this large: h2's
/// codec reads into 8 KiB, so a 16 KiB response took 1.38 `recvfrom` calls on average, and
/// takes 0.23 with it (h2c benchmark). There is one such connection per endpoint, so the
/// memory is small.
const H2_READ_BUFFER: usize = 64 * 1024;
/// How long a finished HTTP/1 exchange may take to leave the connection reusable.
const H1_RETURN_WAIT: Duration = Duration::from_secs(1);

/// Connection pool tuning.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Idle connections are closed after this long. Default 60 s.
    pub idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per endpoint. Default 64.
    pub max_idle_per_endpoint: usize,
    /// Largest response head accepted from an endpoint. Default 64 KiB.
    pub max_header_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 64,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// What a pooled connection is for: the endpoint, the identity it must prove, and the
/// generation of our certificate (so renewed certificates get new connections).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Endpoint address (`ip:targetPort`).
    pub addr: SocketAddr,
    /// Endpoint identity; `None` for plain TCP.
    pub identity: Option<Identity>,
    /// Our certificate generation.
    pub generation: u64,
}

type H1Sender = http1::SendRequest<ReplayBody>;
type H2Sender = http2::SendRequest<ReplayBody>;

#[derive(Debug)]
struct Idle {
    sender: H1Sender,
    since: Instant,
}

#[derive(Debug, Default)]
struct H2Slot {
    sender: Option<H2Sender>,
    last_used: Option<Instant>,
}

/// Pooled HTTP connections to endpoints. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Clients {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: ClientConfig,
    h1: Mutex<HashMap<ConnKey, Vec<Idle>>>,
    h2: Mutex<HashMap<ConnKey, Arc<tokio::sync::Mutex<H2Slot>>>>,
}

/// Returns an HTTP/1 connection to the pool when the response is done with it. Held by
/// the response body; dropping it is the signal.
#[derive(Debug)]
pub struct Checkout {
    sender: Option<H1Sender>,
    key: ConnKey,
    pool: Weak<Inner>,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let key = self.key.clone();
        if sender.is_ready() {
            pool.put_idle(key, sender);
            return;
        }
        if sender.is_closed() {
            return;
        }
        // hyper marks the connection ready once it has processed the end of the response;
        // wait for that off the request path. An abandoned response closes it instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(H1_RETURN_WAIT, sender.ready()).await {
                    pool.put_idle(key, sender);
                }
            });
        }
    }
}

impl Inner {
    fn put_idle(&self, key: ConnKey, sender: H1Sender) {
        let mut map = self.h1.lock();
        let list = map.entry(key).or_default();
        if list.len() < self.cfg.max_idle_per_endpoint {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn take_idle(&self, key: &ConnKey) -> Option<H1Sender> {
        let mut map = self.h1.lock();
        let list = map.get_mut(key)?;
        // Most recently used first: it is the least likely to have been closed by the peer.
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < self.cfg.idle_timeout
                && idle.sender.is_ready()
                && !idle.sender.is_closed()
            {
                return Some(idle.sender);
            }
        }
        None
    }
}

impl Clients {
    /// An empty pool; starts its reaper on the current runtime.
    pub fn new(cfg: ClientConfig) -> Self {
        let inner = Arc::new(Inner {
            cfg,
            h1: Mutex::default(),
            h2: Mutex::default(),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Clients { inner }
    }

    /// Sends `req` over HTTP/1.1 on an idle connection to `key`, or a new one from
    /// `connect`.
    pub async fn send_h1<C, Fut>(
        &self,
        key: &ConnKey,
        mut req: Request<ReplayBody>,
        connect: C,
    ) -> Result<(Response<Incoming>, Checkout), AttemptError>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = Result<Box<dyn Io>, AttemptError>>,
    {
        while let Some(mut sender) = self.inner.take_idle(key) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.checkout(key, sender))),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection died while idle. Try the next one.
                    Some(r) => {
                        debug!(endpoint = %key.addr, "idle HTTP/1 connection was closed; using another");
                        req = r;
                    }
                    None => return Err(AttemptError::http(key.addr, e.into_error())),
                },
            }
        }
        let io = connect().await?;
        let (mut sender, conn) = http1::Builder::new()
            .max_buf_size(self.inner.cfg.max_header_bytes.max(8192))
            .handshake::<_, ReplayBody>(TokioIo::new(io))
            .await
            .map_err(|e| AttemptError::handshake(key.addr, e))?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(endpoint = %addr, error = %e, "HTTP/1 connection to endpoint ended with an error");
            }
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AttemptError::http(key.addr, e))?;
        Ok((resp, self.checkout(key, sender)))
    }

    fn checkout(&self, key: &ConnKey, sender: H1Sender) -> Checkout {
        Checkout {
            sender: Some(sender),
            key: key.clone(),
            pool: Arc::downgrade(&self.inner),
        }
    }

    /// Sends `req` over the endpoint's shared HTTP/2 connection, opening it with `connect`
    /// if there is none.
    pub async fn send_h2<C, Fut>(
        &self,
        key: &ConnKey,
        req: Request<ReplayBody>,
        connect: C,
    ) -> Result<Response<Incoming>, AttemptError>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = Result<Box<dyn Io>, AttemptError>>,
    {
        let slot = self.inner.h2.lock().entry(key.clone()).or_default().clone();
        let mut sender = {
            let mut slot = slot.lock().await;
            slot.last_used = Some(Instant::now());
            match &slot.sender {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    slot.sender = None;
                    let io = tokio::io::BufReader::with_capacity(H2_READ_BUFFER, connect().await?);
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .initial_stream_window_size(H2_STREAM_WINDOW)
                        .initial_connection_window_size(H2_CONNECTION_WINDOW)
                        .max_header_list_size(self.inner.cfg.max_header_bytes as u32)
                        .keep_alive_interval(H2_KEEPALIVE)
                        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                        .handshake::<_, ReplayBody>(TokioIo::new(io))
                        .await
                        .map_err(|e| AttemptError::handshake(key.addr, e))?;
                    let addr = key.addr;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(endpoint = %addr, error = %e, "HTTP/2 connection to endpoint ended with an error");
                        }
                    });
                    slot.sender = Some(sender.clone());
                    sender
                }
            }
        };
        sender
            .send_request(req)
            .await
            .map_err(|e| AttemptError::http(key.addr, e))
    }

    /// Closes the oldest idle HTTP/1 connection to any of `addrs`; true if there was one.
    /// Under a service's connection limit, idle connections to one endpoint would
    /// otherwise keep a request for another endpoint waiting.
    pub fn close_idle_among(&self, addrs: &[SocketAddr]) -> bool {
        let mut map = self.inner.h1.lock();
        let oldest = map
            .iter()
            .filter(|(k, _)| addrs.contains(&k.addr))
            .flat_map(|(k, list)| {
                list.iter()
                    .enumerate()
                    .map(move |(i, idle)| (k, i, idle.since))
            })
            .min_by_key(|(_, _, since)| *since)
            .map(|(k, i, _)| (k.clone(), i));
        let Some((key, i)) = oldest else {
            return false;
        };
        // Dropping the sender ends the connection, which gives back its slot.
        map.get_mut(&key)
            .is_some_and(|list| i < list.len() && list.drain(i..=i).next().is_some())
    }

    /// Idle HTTP/1 connections and open HTTP/2 connections (tests and admin).
    pub fn connection_counts(&self) -> (usize, usize) {
        let h1 = self.inner.h1.lock().values().map(Vec::len).sum();
        let h2 = self
            .inner
            .h2
            .lock()
            .values()
            .filter(|s| {
                s.try_lock()
                    .map(|s| s.sender.as_ref().is_some_and(|s| !s.is_closed()))
                    .unwrap_or(true)
            })
            .count();
        (h1, h2)
    }
}

async fn reap(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.cfg.idle_timeout / 2).max(Duration::from_millis(500)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let timeout = inner.cfg.idle_timeout;
        inner.h1.lock().retain(|_, list| {
            list.retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
            !list.is_empty()
        });
        inner.h2.lock().retain(|_, slot| {
            // A slot being dialled is busy, not idle.
            let Ok(mut s) = slot.try_lock() else {
                return true;
            };
            let idle = s.last_used.is_none_or(|t| t.elapsed() >= timeout);
            let closed = s.sender.as_ref().is_none_or(H2Sender::is_closed);
            if idle || closed {
                // In-flight requests keep the connection open until they finish.
                s.sender = None;
                return false;
            }
            true
        });
    }
}
