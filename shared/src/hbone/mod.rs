//! HBONE: TCP tunnelled in HTTP/2 CONNECT streams over mutual TLS, wire-compatible with
//! Istio's.
//!
//! - [`request`]: building and checking CONNECT requests, and the status each failure earns.
//! - [`stream`]: an HTTP/2 stream as `AsyncRead + AsyncWrite`.
//! - [`pool`]: pooled client connections keyed by source identity, destination identity
//!   and address.
//! - [`server`]: serving CONNECT streams on one accepted connection.

pub mod pool;
pub mod request;
pub mod server;
pub mod stream;

pub use pool::{Pool, PoolConfig, PoolKey};
pub use request::{RequestError, connect_request, parse_connect};
pub use stream::H2Stream;

/// HTTP/2 flow-control and framing settings shared by both ends.
///
/// The connection window is four times the stream window: with them equal, one stalled
/// stream can consume the whole connection window and deadlock every other stream on it.
pub mod settings {
    /// Per-stream receive window.
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    /// Per-connection receive window; must exceed [`STREAM_WINDOW`].
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    /// Largest DATA frame we accept.
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
    /// Header block limit; CONNECT requests are tiny, so anything larger is hostile.
    pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
    /// Streams a server accepts on one connection; bounds a hostile client's footprint.
    pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 512;
    /// Per-stream send buffer, bounding memory held for a slow reader.
    pub const MAX_SEND_BUFFER: usize = 1024 * 1024;

    const _: () = assert!(CONNECTION_WINDOW > STREAM_WINDOW);
}

/// Who is at fault when a tunnel fails, so errors map to statuses, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer sent something wrong.
    Downstream,
    /// The destination could not be reached or failed.
    Upstream,
    /// A local problem (e.g. no certificate yet).
    Internal,
}

/// Errors of the HBONE client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect to the peer's HBONE port failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The HBONE address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS handshake with the peer failed (includes identity mismatch).
    #[error("TLS handshake with {addr}: {}", crate::tls::describe_handshake_error(.source))]
    Tls {
        /// The HBONE address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP/2 protocol failure.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT with a non-200 status.
    #[error("peer refused the tunnel with status {0}")]
    Status(http::StatusCode),
    /// Building the TLS client failed.
    #[error(transparent)]
    TlsConfig(#[from] crate::tls::TlsError),
    /// The connect did not finish in time.
    #[error("timed out connecting to {0}")]
    Timeout(std::net::SocketAddr),
}

impl Error {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::TlsConfig(_) => Fault::Internal,
            _ => Fault::Upstream,
        }
    }
}
