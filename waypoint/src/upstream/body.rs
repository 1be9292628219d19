//! Request bodies that can be sent again.
//!
//! A [`ReplayBody`] streams the client's body to the upstream as it arrives (so a
//! streaming gRPC call is never held back) while keeping a copy of what passed through, up
//! to a cap. A retry gets a fresh [`ReplayBody`] that replays the copy and then continues
//! with the rest of the client's body. Once more than the cap has passed through, the copy
//! is dropped and the request can no longer be retried: memory per request stays bounded
//! by the cap, whatever the client sends.
//!
//! A body never polled (the attempt failed before sending it, e.g. on connect) is always
//! replayable. Only the newest attempt may read; an older one (still held by a connection
//! that is shutting down) gets an error instead of stealing data.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

/// Default cap on the copy kept for retries.
pub const DEFAULT_CAP: usize = 64 * 1024;

/// Errors of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client body of any kind (hyper's `Incoming` in the proxy, in-memory in tests).
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Boxes a body for [`ReplayBody::new`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt as _;
    body.map_err(Into::into).boxed_unsync()
}

/// Errors reading a [`ReplayBody`].
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the client's body failed.
    #[error("reading the request body: {0}")]
    Source(#[source] BoxError),
    /// A newer attempt owns the body.
    #[error("request body taken over by a retry")]
    Superseded,
}

/// A request body that keeps a bounded copy for retries. The client's body is boxed, so
/// tests can use in-memory bodies.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    attempt: u64,
    /// Chunks of the copy this attempt has already sent.
    replayed: usize,
    trailers_sent: bool,
}

#[derive(Debug)]
struct Shared {
    source: Option<BoxBody>,
    chunks: Vec<Bytes>,
    buffered: usize,
    cap: usize,
    /// More than `cap` passed through (or reading failed): no more replays.
    overflow: bool,
    source_done: bool,
    trailers: Option<HeaderMap>,
    current_attempt: u64,
    /// Bytes read from the client in total.
    received: u64,
}

impl ReplayBody {
    /// Wraps `source`, keeping up to `cap` bytes for replays.
    pub fn new(source: BoxBody, cap: usize) -> Self {
        Self::from_source(Some(source), cap)
    }

    fn from_source(source: Option<BoxBody>, cap: usize) -> Self {
        let source_done = source.is_none();
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source,
                chunks: Vec::new(),
                buffered: 0,
                cap,
                overflow: false,
                source_done,
                trailers: None,
                current_attempt: 0,
                received: 0,
            })),
            attempt: 0,
            replayed: 0,
            trailers_sent: false,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::from_source(None, 0)
    }

    /// A body for the next attempt, replaying from the start; `None` once the request can
    /// no longer be replayed. The previous attempt's body stops yielding data.
    pub fn replay(&self) -> Option<Self> {
        let mut s = self.shared.lock();
        if s.overflow {
            return None;
        }
        s.current_attempt += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            attempt: s.current_attempt,
            replayed: 0,
            trailers_sent: false,
        })
    }

    /// True while a retry could still send the whole body.
    pub fn is_replayable(&self) -> bool {
        !self.shared.lock().overflow
    }

    /// Bytes read from the client so far, over all attempts.
    pub fn received(&self) -> u64 {
        self.shared.lock().received
    }

    /// A handle that reads [`ReplayBody::received`] after the body has been moved away.
    pub fn meter(&self) -> BodyMeter {
        BodyMeter(self.shared.clone())
    }

    /// A handle on the buffered copy, for a mirror; it never reads from the client.
    pub fn copy_handle(&self) -> BodyCopy {
        BodyCopy(self.shared.clone())
    }

    /// A body of `chunks`, already complete (a mirror's copy).
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        let body = ReplayBody::empty();
        {
            let mut s = body.shared.lock();
            s.buffered = chunks.iter().map(Bytes::len).sum();
            s.cap = s.buffered;
            s.chunks = chunks;
        }
        body
    }
}

/// Reads the copy a [`ReplayBody`] keeps, without taking part in sending it.
#[derive(Debug, Clone)]
pub struct BodyCopy(Arc<Mutex<Shared>>);

/// What a [`BodyCopy`] holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyState {
    /// The whole body (possibly empty).
    Complete(Vec<Bytes>),
    /// The client is still sending it.
    Pending,
    /// Too large for the copy, broken, or with trailers: no copy can be made.
    Unavailable,
}

impl BodyCopy {
    /// The copy's state.
    pub fn state(&self) -> CopyState {
        let s = self.0.lock();
        if s.overflow || s.trailers.is_some() {
            return CopyState::Unavailable;
        }
        let empty_source = s.source.as_ref().is_some_and(|b| b.is_end_stream());
        if s.source_done || (empty_source && s.chunks.is_empty()) {
            CopyState::Complete(s.chunks.clone())
        } else {
            CopyState::Pending
        }
    }
}

/// Reads how many bytes a [`ReplayBody`] received.
#[derive(Debug)]
pub struct BodyMeter(Arc<Mutex<Shared>>);

impl BodyMeter {
    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.0.lock().received
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let s = &mut *guard;
        if s.current_attempt != this.attempt {
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        if let Some(chunk) = s.chunks.get(this.replayed) {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.source_done {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            s.source_done = true;
            return Poll::Ready(None);
        };
        // Polling under the lock is fine: it is synchronous, and only the current attempt
        // gets here.
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.source_done = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.overflow = true;
                s.chunks.clear();
                Poll::Ready(Some(Err(BodyError::Source(e))))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    s.received += data.len() as u64;
                    if !s.overflow {
                        if s.buffered + data.len() > s.cap {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            s.buffered = 0;
                        } else {
                            s.buffered += data.len();
                            s.chunks.push(data.clone());
                            this.replayed = s.chunks.len();
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        s.source_done = true;
                        s.source = None;
                        s.trailers = Some(trailers.clone());
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // Neither data nor trailers: nothing to forward; ask again.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        s.current_attempt == self.attempt
            && s.source_done
            && self.replayed >= s.chunks.len()
            && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock();
        let pending: u64 = s
            .chunks
            .iter()
            .skip(self.replayed)
            .map(|c| c.len() as u64)
            .sum();
        match &s.source {
            Some(src) if !s.source_done => {
                let h = src.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + pending);
                if let Some(upper) = h.upper() {
                    out.set_upper(upper + pending);
                }
                out
            }
            _ => SizeHint::with_exact(pending),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// A body of given frames, for chunked bodies with trailers.
    #[derive(Debug)]
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }
    }

    async fn collect(body: ReplayBody) -> Result<(Bytes, Option<HeaderMap>), BodyError> {
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn small_bodies_replay_in_full() {
        let body = ReplayBody::new(boxed(Full::new(Bytes::from_static(b"hello"))), 16);
        let retry = body.replay().expect("untouched body is replayable");
        // The first attempt was superseded before reading anything.
        let (bytes, _) = collect(retry).await.expect("reads");
        assert_eq!(&bytes[..], b"hello");

        let body = ReplayBody::new(boxed(Full::new(Bytes::from_static(b"hello"))), 16);
        let first = body.replay().expect("replayable");
        assert_eq!(&collect(first).await.expect("reads").0[..], b"hello");
        let second = body.replay().expect("still replayable");
        assert_eq!(second.size_hint().exact(), Some(5));
        assert_eq!(&collect(second).await.expect("replays").0[..], b"hello");
        assert_eq!(body.received(), 5);
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_not_replayable() {
        let body = ReplayBody::new(boxed(Full::new(Bytes::from(vec![7u8; 100]))), 64);
        let first = body.replay().expect("replayable before reading");
        assert_eq!(collect(first).await.expect("streams through").0.len(), 100);
        assert!(!body.is_replayable());
        assert!(body.replay().is_none());
        assert_eq!(body.received(), 100);
    }

    #[tokio::test]
    async fn superseded_attempts_stop_reading() {
        let body = ReplayBody::new(boxed(Full::new(Bytes::from_static(b"abc"))), 16);
        let mut old = body.replay().expect("replayable");
        let new = body.replay().expect("replayable");
        assert!(matches!(
            old.frame().await,
            Some(Err(BodyError::Superseded))
        ));
        assert_eq!(&collect(new).await.expect("reads").0[..], b"abc");
    }

    #[tokio::test]
    async fn empty_bodies_end_at_once() {
        let body: ReplayBody = ReplayBody::empty();
        assert!(body.is_end_stream());
        let (bytes, trailers) = collect(body).await.expect("reads");
        assert!(bytes.is_empty() && trailers.is_none());
    }

    #[tokio::test]
    async fn chunks_and_trailers_replay_while_the_source_streams() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = Frames(
            [
                Frame::data(Bytes::from_static(b"ab")),
                Frame::data(Bytes::from_static(b"cd")),
                Frame::trailers(trailers.clone()),
            ]
            .into(),
        );
        let body = ReplayBody::new(boxed(frames), 16);
        let mut first = body.replay().expect("replayable");
        // The first attempt reads one chunk, then fails; the retry replays it and reads on.
        let chunk = first.frame().await.expect("frame").expect("ok");
        assert_eq!(chunk.into_data().expect("data"), Bytes::from_static(b"ab"));
        let second = body.replay().expect("still under the cap");
        let (bytes, got) = collect(second).await.expect("reads");
        assert_eq!(&bytes[..], b"abcd");
        assert_eq!(got, Some(trailers.clone()));
        let third = body.replay().expect("replayable");
        let (bytes, got) = collect(third).await.expect("replays");
        assert_eq!(&bytes[..], b"abcd");
        assert_eq!(got, Some(trailers));
    }
}
