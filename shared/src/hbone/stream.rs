//! One HTTP/2 stream as a byte pipe (`AsyncRead + AsyncWrite`), so tunnels reuse the same
//! copy code as plain TCP.
//!
//! Receive capacity is released only as the application consumes bytes, so a slow reader
//! back-pressures the sender through HTTP/2 flow control instead of buffering without bound.
//!
//! Copy loops that own whole buffers use the halves of [`H2Stream::into_halves`] instead:
//! [`SendHalf::send`] hands a `Bytes` to h2 without copying it, and [`RecvHalf::next`]
//! returns h2's received chunks as they are. That saves one copy of every byte in each
//! direction (and one allocation per outbound write) over the `AsyncRead`/`AsyncWrite` path,
//! which must copy into and out of the caller's slices.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A tunnel stream. Dropping it resets the stream if it was not shut down cleanly.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    recv_done: bool,
    // Held for its Drop: e.g. the pool's count of active streams on the connection.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("pending", &self.pending.len())
            .field("recv_done", &self.recv_done)
            .finish()
    }
}

impl H2Stream {
    /// Joins the two halves of a stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            _guard: None,
        }
    }

    /// Attaches a value dropped together with the stream.
    pub fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }

    /// Splits the stream into halves that move whole buffers (see the module docs). Bytes
    /// already read into the stream's own buffer come first out of the receiving half. The
    /// guard lives until both halves are dropped.
    pub fn into_halves(self) -> (SendHalf, RecvHalf) {
        let guard = Arc::new(self._guard);
        (
            SendHalf {
                send: self.send,
                _guard: guard.clone(),
            },
            RecvHalf {
                recv: self.recv,
                pending: self.pending,
                done: self.recv_done,
                _guard: guard,
            },
        )
    }
}

/// The sending half of an [`H2Stream`]. Dropping it without [`SendHalf::finish`] resets the
/// stream, as dropping the whole stream does.
pub struct SendHalf {
    send: SendStream<Bytes>,
    _guard: Arc<Option<Box<dyn Send + Sync>>>,
}

impl SendHalf {
    /// Queues all of `data` on the stream, waiting for flow-control capacity as needed.
    pub async fn send(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.send.reserve_capacity(data.len());
            let granted = poll_fn(|cx| self.send.poll_capacity(cx)).await;
            let n = match granted {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => n.min(data.len()),
                Some(Err(_)) | None => return Err(self.reset_error().await),
            };
            if self.send.send_data(data.split_to(n), false).is_err() {
                return Err(self.reset_error().await);
            }
        }
        Ok(())
    }

    /// Ends the stream (END_STREAM): the peer sees EOF.
    pub async fn finish(&mut self) -> io::Result<()> {
        if self.send.send_data(Bytes::new(), true).is_ok() {
            return Ok(());
        }
        match poll_fn(|cx| self.send.poll_reset(cx)).await {
            Ok(Reason::NO_ERROR) => Ok(()),
            Ok(reason) => Err(reset(reason)),
            Err(e) => Err(h2_to_io(e)),
        }
    }

    /// The stream is gone; the reset reason is the useful error.
    async fn reset_error(&mut self) -> io::Error {
        match poll_fn(|cx| self.send.poll_reset(cx)).await {
            Ok(reason) => reset(reason),
            Err(e) => h2_to_io(e),
        }
    }
}

/// The receiving half of an [`H2Stream`].
pub struct RecvHalf {
    recv: RecvStream,
    pending: Bytes,
    done: bool,
    _guard: Arc<Option<Box<dyn Send + Sync>>>,
}

impl RecvHalf {
    /// The next chunk the peer sent, or `None` once it finished sending. The chunk's
    /// flow-control window stays taken until [`RecvHalf::release`]: call it once the chunk
    /// was passed on, so a slow consumer back-pressures the peer.
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        while !self.done {
            match poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => return Ok(Some(chunk)),
                None => self.done = true,
                // A peer that ends with RST_STREAM(NO_ERROR) has finished sending.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => self.done = true,
                Some(Err(e)) => return Err(h2_to_io(e)),
            }
        }
        Ok(None)
    }

    /// Returns `n` bytes of window to the peer.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

fn reset(reason: Reason) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("stream reset: {reason}"))
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                out.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                // Returning window only now is what lets flow control push back on the peer.
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => self.pending = chunk,
                None => self.recv_done = true,
                // A peer that ends with RST_STREAM(NO_ERROR) has finished sending.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => self.recv_done = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let written = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .ok()
                    .map(|()| n)
            }
            Some(Err(_)) | None => None,
        };
        if let Some(n) = written {
            return Poll::Ready(Ok(n));
        }
        // The stream is gone; the reset reason is the useful error.
        match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("stream reset: {reason}"),
            ))),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 flushes frames from the connection task; there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.send.poll_reset(cx)) {
            // Already reset with NO_ERROR: the peer is done, so the shutdown has nothing to do.
            Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
            Ok(reason) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("stream reset: {reason}"),
            ))),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}
