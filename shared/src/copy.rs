//! Copying bytes both ways between two streams, counting as it goes.
//!
//! Both directions run to completion independently (join, not try_join): when one side
//! finishes sending, the other side's write half is shut down (a TCP half-close), and the
//! reverse direction keeps flowing. Counters live outside the future, so they are right even
//! when the copy is cancelled or fails.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hbone::H2Stream;

/// Buffers start small so idle connections cost little, and grow for bulk transfers.
const INITIAL_BUFFER: usize = 1024;
/// Roughly one TLS record's payload: the size most reads return once data flows.
const MEDIUM_BUFFER: usize = 16 * 1024;
/// For bulk transfers, fewer larger reads and writes.
const LARGE_BUFFER: usize = 256 * 1024;
const GROW_TO_MEDIUM_AFTER: u64 = 128 * 1024;
const GROW_TO_LARGE_AFTER: u64 = 10 * 1024 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// From `a` to `b`.
    pub a_to_b: AtomicU64,
    /// From `b` to `a`.
    pub b_to_a: AtomicU64,
}

impl Counters {
    /// (a→b, b→a) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.a_to_b.load(Ordering::Relaxed),
            self.b_to_a.load(Ordering::Relaxed),
        )
    }
}

/// Copies `a` ⇄ `b` until both directions finish. Returns the first error, if any; a reset
/// after the data was delivered is reported but loses nothing.
pub async fn bidirectional<A, B>(a: A, b: B, counters: &Counters) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let forward = one_way(&mut a_read, &mut b_write, &counters.a_to_b);
    let backward = one_way(&mut b_read, &mut a_write, &counters.b_to_a);
    let (f, b) = tokio::join!(forward, backward);
    f.and(b)
}

async fn one_way<R, W>(from: &mut R, to: &mut W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut total = 0u64;
    let result = loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            break Err(e);
        }
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if total >= GROW_TO_LARGE_AFTER && buf.len() < LARGE_BUFFER {
            buf.resize(LARGE_BUFFER, 0);
        } else if total >= GROW_TO_MEDIUM_AFTER && buf.len() < MEDIUM_BUFFER {
            buf.resize(MEDIUM_BUFFER, 0);
        }
    };
    // Pass the end (or the failure) on, so the other side sees EOF instead of hanging.
    let shutdown = to.shutdown().await;
    result.and(shutdown.or_else(|e| if is_closed(&e) { Ok(()) } else { Err(e) }))
}

/// Copies `stream` ⇄ `tunnel` like [`bidirectional`], moving whole buffers in and out of
/// the HBONE stream instead of copying through slices: reads from `stream` land in a
/// buffer that is handed to h2 as it is, and the chunks h2 received are written to `stream`
/// as they are. `to_tunnel` and `from_tunnel` count the bytes each way.
pub async fn tunnel<S>(
    stream: S,
    tunnel: H2Stream,
    to_tunnel: &AtomicU64,
    from_tunnel: &AtomicU64,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (mut s_read, mut s_write) = tokio::io::split(stream);
    let (mut send, mut recv) = tunnel.into_halves();
    let up = async {
        let mut buf = BytesMut::with_capacity(INITIAL_BUFFER);
        let mut size = INITIAL_BUFFER;
        let mut total = 0u64;
        let result = loop {
            // Reuses the allocation once h2 has written out the previous chunks.
            buf.reserve(size);
            let n = match s_read.read_buf(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if let Err(e) = send.send(buf.split().freeze()).await {
                break Err(e);
            }
            total += n as u64;
            to_tunnel.fetch_add(n as u64, Ordering::Relaxed);
            size = grown(size, total);
        };
        let finish = send.finish().await;
        result.and(finish.or_else(|e| if is_closed(&e) { Ok(()) } else { Err(e) }))
    };
    let down = async {
        let result = loop {
            let chunk = match recv.next().await {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            if let Err(e) = s_write.write_all(&chunk).await {
                break Err(e);
            }
            recv.release(chunk.len());
            from_tunnel.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        };
        let shutdown = s_write.shutdown().await;
        result.and(shutdown.or_else(|e| if is_closed(&e) { Ok(()) } else { Err(e) }))
    };
    let (u, d) = tokio::join!(up, down);
    u.and(d)
}

/// The buffer size after `total` bytes: small for idle connections, large for bulk.
fn grown(size: usize, total: u64) -> usize {
    if total >= GROW_TO_LARGE_AFTER {
        LARGE_BUFFER
    } else if total >= GROW_TO_MEDIUM_AFTER {
        size.max(MEDIUM_BUFFER)
    } else {
        size
    }
}

/// Errors that just mean the peer already went away.
pub fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (client, proxy_a) = duplex(7);
        let (proxy_b, server) = duplex(13);
        let counters = Counters::default();
        let proxy = bidirectional(proxy_a, proxy_b, &counters);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let client_task = async move {
            let (mut r, mut w) = tokio::io::split(client);
            let writer = async {
                w.write_all(&data).await.expect("client write");
                w.shutdown().await.expect("client shutdown");
            };
            let mut back = Vec::new();
            let reader = r.read_to_end(&mut back);
            let (_, read) = tokio::join!(writer, reader);
            read.expect("client read");
            back
        };
        let server_task = async move {
            // Echo everything, then close: exercises both half-closes.
            let (mut r, mut w) = tokio::io::split(server);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("server read");
            w.write_all(&got).await.expect("server write");
            w.shutdown().await.expect("server shutdown");
            got.len()
        };
        let (p, back, n) = tokio::join!(proxy, client_task, server_task);
        p.expect("proxy");
        assert_eq!(n, expected.len());
        assert_eq!(back, expected);
        assert_eq!(
            counters.get(),
            (expected.len() as u64, expected.len() as u64)
        );
    }

    /// An HBONE-like stream over an in-memory connection: the far end echoes everything
    /// through the `AsyncRead`/`AsyncWrite` path, the near end is copied with [`tunnel`].
    #[tokio::test]
    async fn tunnel_moves_whole_buffers_both_ways_with_half_close_and_counts() {
        let (c_io, s_io) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s_io).await.expect("server handshake");
            let (req, mut respond) = conn
                .accept()
                .await
                .expect("a stream")
                .expect("a valid stream");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("response sent");
            let stream = H2Stream::new(send, req.into_body());
            let (mut r, mut w) = tokio::io::split(stream);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("server read");
            w.write_all(&got).await.expect("server write");
            w.shutdown().await.expect("server shutdown");
            got.len()
        });
        let (mut client, conn) = h2::client::handshake(c_io).await.expect("client handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("127.0.0.1:80")
            .body(())
            .expect("request");
        let (resp, send) = client.send_request(req, false).expect("request sent");
        let resp = resp.await.expect("response");
        let h2 = H2Stream::new(send, resp.into_body());

        let (app, proxy_side) = duplex(1024);
        let counters = Counters::default();
        let proxy = tunnel(proxy_side, h2, &counters.a_to_b, &counters.b_to_a);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let app_task = async move {
            let (mut r, mut w) = tokio::io::split(app);
            let writer = async {
                w.write_all(&data).await.expect("app write");
                w.shutdown().await.expect("app shutdown");
            };
            let mut back = Vec::new();
            let (_, read) = tokio::join!(writer, r.read_to_end(&mut back));
            read.expect("app read");
            back
        };
        let (p, back) = tokio::join!(proxy, app_task);
        p.expect("proxy");
        assert_eq!(server.await.expect("server task"), expected.len());
        assert_eq!(back, expected);
        assert_eq!(
            counters.get(),
            (expected.len() as u64, expected.len() as u64)
        );
    }
}
