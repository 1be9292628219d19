//! A response body made of given frames (data and trailers), for the test servers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Yields its frames in order, then ends.
pub struct Frames(VecDeque<Frame<Bytes>>);

impl Frames {
    /// One data frame.
    pub fn full(data: Bytes) -> Frames {
        Frames::new(vec![Frame::data(data)])
    }

    /// These frames, in order.
    pub fn new(frames: Vec<Frame<Bytes>>) -> Frames {
        Frames(frames.into())
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Exact when there are only data frames, so HTTP/1.1 gets a content-length.
        if self.0.iter().all(Frame::is_data) {
            let len: usize = self
                .0
                .iter()
                .filter_map(Frame::data_ref)
                .map(Bytes::len)
                .sum();
            SizeHint::with_exact(len as u64)
        } else {
            SizeHint::default()
        }
    }
}
