//! A bound on receiving an HTTP/1 request head, counted from the head's first byte.
//!
//! hyper's own `header_read_timeout` starts as soon as hyper waits for a head, which on a
//! keep-alive connection is right after the previous response: it would cut every pooled
//! client connection that idles longer than the timeout, so the waypoint leaves it off
//! unless `--idle-timeout` is set (commit e45c53f). Without any bound, though, a client can
//! hold a partial head forever (about 30 KB each, measured). This clock starts only when a
//! byte of a new head arrives and stops when hyper hands the parsed request to the service,
//! so idle keep-alive connections are never cut by it and slow heads always are.
//!
//! How it tells head bytes from others: the [`Tracked`] service counts a request as in
//! flight from the call until its response body is finished; bytes read while none is in
//! flight belong to the next head. A connection that switched protocols (101) is no longer
//! HTTP and is never timed.
//!
//! Known gap: a partial head sent in the same segments as the previous request (pipelining)
//! is already in hyper's buffer when that request ends, so no read starts the clock; such a
//! connection costs what an idle keep-alive connection costs.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::upstream::body::BoxError;

/// What the reading side and the service side of one connection share.
#[derive(Debug, Default)]
pub struct HeadClock {
    /// Requests handed to the service so far: a change means a head was completed.
    started: AtomicU64,
    /// Requests whose response is not finished yet.
    in_flight: AtomicUsize,
    /// Set after a protocol switch: the bytes are no longer HTTP heads.
    off: AtomicBool,
    /// Set when the clock closed the connection.
    fired: AtomicBool,
}

impl HeadClock {
    /// True if the connection was closed because a head took too long.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request counted as in flight until dropped (with its response body).
#[derive(Debug)]
struct InFlight(Arc<HeadClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `io` whose reads fail with `TimedOut` once a request head has been arriving for longer
/// than `timeout`; `None` never times out. The clock is shared with [`Tracked`].
pub fn wrap<IO>(io: IO, timeout: Option<Duration>) -> (TimedHeads<IO>, Arc<HeadClock>) {
    let clock = Arc::new(HeadClock::default());
    (
        TimedHeads {
            io,
            clock: clock.clone(),
            timeout,
            armed: None,
        },
        clock,
    )
}

/// See [`wrap`].
pub struct TimedHeads<IO> {
    io: IO,
    clock: Arc<HeadClock>,
    timeout: Option<Duration>,
    /// The request count when the head's first byte arrived, and its deadline.
    armed: Option<Armed>,
}

/// A head's deadline. Most heads arrive in one read, so the timer is only created when a
/// read finds the head incomplete and has to wait.
struct Armed {
    started: u64,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for TimedHeads<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(timeout) = this.timeout else {
            return result;
        };
        let c = &this.clock;
        let started = c.started.load(Ordering::Acquire);
        let awaiting_head =
            c.in_flight.load(Ordering::Acquire) == 0 && !c.off.load(Ordering::Acquire);
        // A request began since the clock started: that head is complete.
        if this
            .armed
            .as_ref()
            .is_some_and(|a| a.started != started || !awaiting_head)
        {
            this.armed = None;
        }
        match result {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if awaiting_head && this.armed.is_none() {
                    this.armed = Some(Armed {
                        started,
                        deadline: Instant::now() + timeout,
                        timer: None,
                    });
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(armed) = this.armed.as_mut()
                    && armed
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(armed.deadline)))
                        .as_mut()
                        .poll(cx)
                        .is_ready()
                {
                    this.armed = None;
                    c.fired.store(true, Ordering::Release);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("request head not complete within {timeout:?} of its first byte"),
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TimedHeads<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A service counted by a [`HeadClock`]: each request is in flight from the call until its
/// response body is finished (or dropped).
pub struct Tracked<S> {
    inner: S,
    clock: Arc<HeadClock>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, clock: Arc<HeadClock>) -> Self {
        Tracked { inner, clock }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.clock.begin();
        let clock = self.clock.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                clock.off.store(true, Ordering::Release);
            }
            Ok(resp.map(|body| {
                UnsyncBoxBody::new(CountedBody {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
struct CountedBody {
    body: ResponseBody,
    _in_flight: InFlight,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
