//! Protocol detection on a tunnel: HTTP/2 with prior knowledge (the connection preface),
//! HTTP/1.x (a request line), or anything else, which is forwarded at L4.
//!
//! Detection reads at most [`PEEK_LIMIT`] bytes, then hands them back through [`Rewind`]
//! so the chosen protocol sees the stream from its first byte. A client that sends nothing
//! (a server-speaks-first protocol such as SMTP or MySQL) is detected as TCP when the
//! timeout passes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token recognised in an HTTP/1 request line.
const MAX_METHOD: usize = 20;
/// Bytes read at most before deciding.
pub const PEEK_LIMIT: usize = H2_PREFACE.len();

/// What a tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.0 or 1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), including gRPC.
    Http2,
    /// Anything else.
    Tcp,
}

/// Classifies the first bytes of a stream; `None` while more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    if prefix.len() >= H2_PREFACE.len() && prefix.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(prefix) {
        return None;
    }
    // An HTTP/1 request line starts with a method token (RFC 9110 §9: case-sensitive,
    // registered methods are upper case) and a space.
    let is_method_char = |b: &u8| b.is_ascii_uppercase() || *b == b'-' || *b == b'_';
    match prefix.iter().position(|b| !is_method_char(b)) {
        Some(0) => Some(Detected::Tcp),
        Some(i) if prefix[i] == b' ' && i <= MAX_METHOD => Some(Detected::Http1),
        Some(_) => Some(Detected::Tcp),
        None if prefix.len() > MAX_METHOD => Some(Detected::Tcp),
        None => None,
    }
}

/// Reads the start of `io` until its protocol is clear, the stream ends, or `timeout`
/// passes; returns the protocol and the stream rewound to its first byte.
pub async fn detect<IO>(mut io: IO, timeout: Duration) -> io::Result<(Detected, Rewind<IO>)>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(PEEK_LIMIT);
    let deadline = tokio::time::Instant::now() + timeout;
    let detected = loop {
        if let Some(d) = classify(&buf) {
            break d;
        }
        if buf.len() >= PEEK_LIMIT {
            break Detected::Tcp;
        }
        let mut chunk = [0u8; PEEK_LIMIT];
        let want = PEEK_LIMIT - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Err(_) => break Detected::Tcp,
            Ok(Ok(0)) => break classify(&buf).unwrap_or(Detected::Tcp),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Rewind::new(buf.freeze(), io)))
}

/// A stream with bytes already read put back in front.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// `inner`, to be read after `prefix`.
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Rewind { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Passed through so that h2 and hyper write a frame header and its payload in one
    // writev instead of two sends (measured: 4 sends per 16 KiB h2c response without it).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI /x HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"ping\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Tcp));
        assert_eq!(classify(b"GET\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b" GET"), Some(Detected::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn detects_and_rewinds() {
        let cases: [(&[u8], Detected); 3] = [
            (b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n", Detected::Http1),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00",
                Detected::Http2,
            ),
            (b"hello, tcp", Detected::Tcp),
        ];
        for (input, want) in cases {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(input).await.expect("write");
            let (got, mut rewound) = detect(server, Duration::from_secs(5))
                .await
                .expect("detects");
            assert_eq!(got, want);
            drop(client);
            let mut all = Vec::new();
            rewound.read_to_end(&mut all).await.expect("reads");
            assert_eq!(all, input, "every byte comes back, in order");
        }
    }

    #[tokio::test]
    async fn silent_or_short_clients_are_tcp() {
        let (_client, server) = tokio::io::duplex(64);
        let (got, _) = detect(server, Duration::from_millis(50))
            .await
            .expect("detects");
        assert_eq!(got, Detected::Tcp);

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.expect("write");
        drop(client);
        let (got, mut rewound) = detect(server, Duration::from_secs(5))
            .await
            .expect("detects");
        assert_eq!(got, Detected::Tcp);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.expect("reads");
        assert_eq!(all, b"GE");
    }
}
