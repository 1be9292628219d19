//! Serving HBONE on one accepted (already TLS-terminated) connection.
//!
//! Each CONNECT stream is handed to a caller-supplied handler on its own task; the handler
//! decides the status and, on 200, gets the stream as an [`H2Stream`].

use std::future::Future;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
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

/// Serves HTTP/2 on `io` until the peer closes it, spawning `handle` per stream.
pub async fn serve<IO, H, Fut>(io: IO, handle: H) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with_shutdown(io, handle, std::future::pending()).await
}

/// Like [`serve`], and once `shutdown` completes, shuts down gracefully: sends GOAWAY so
/// the peer opens no new streams, lets the open ones finish, then returns.
pub async fn serve_with_shutdown<IO, H, Fut, S>(
    io: IO,
    handle: H,
    shutdown: S,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings::STREAM_WINDOW)
        .initial_connection_window_size(settings::CONNECTION_WINDOW)
        .max_frame_size(settings::MAX_FRAME_SIZE)
        .max_header_list_size(settings::MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(settings::SERVER_MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(settings::MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io)
        .await?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut shutting_down = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
        let (parts, recv) = request.into_parts();
        let incoming = Incoming {
            request: Request::from_parts(parts, ()),
            recv,
            respond,
        };
        tokio::spawn(handle(incoming).in_current_span());
    }
    Ok(())
}
