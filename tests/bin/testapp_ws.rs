//! WebSocket (RFC 6455) test workloads with hand-rolled framing, enough for echo tests:
//! - `ws-echo --listen ADDR`: answers the opening handshake and echoes every data frame;
//!   answers a Close with the same code (and prints `close <code>`), then closes.
//! - `ws --to ADDR --messages N [--await-close-secs S]`: opens a WebSocket, sends N binary
//!   messages of varying sizes and checks each echo byte for byte; then, with
//!   `--await-close-secs`, waits for the server's Close, answers it, and reports the code
//!   and whether the connection then ended cleanly (EOF) or was reset. `--pause-secs`
//!   idles the connection halfway; `--h2` opens it with HTTP/2 extended CONNECT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

#[derive(clap::Args)]
pub struct EchoArgs {
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    to: String,
    #[arg(long, default_value = "example")]
    host: String,
    #[arg(long, default_value = "/ws")]
    path: String,
    #[arg(long)]
    messages: usize,
    /// After the messages, wait this long for the server's Close.
    #[arg(long)]
    await_close_secs: Option<u64>,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Halfway through the messages, stay silent this long (idle-timeout tests).
    #[arg(long, default_value_t = 0)]
    pause_secs: u64,
    /// Open the WebSocket with HTTP/2 extended CONNECT (RFC 8441) over h2c instead of an
    /// HTTP/1.1 upgrade.
    #[arg(long)]
    h2: bool,
}

/// Anything a WebSocket runs over: a TCP connection or an upgraded HTTP/2 stream.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The echo server; runs until killed.
pub async fn echo_server(args: EchoArgs) -> ExitCode {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    println!("listening on {}", args.listen);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = echo_conn(stream).await {
                eprintln!("ws-echo: {e}");
            }
        });
    }
}

async fn echo_conn(mut stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let head = read_head(&mut stream).await?;
    let key = header(&head, "sec-websocket-key").ok_or("no Sec-WebSocket-Key")?;
    let upgrade = header(&head, "upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        stream
            .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    stream
        .write_all(resp.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let Some((opcode, payload)) = read_frame(&mut stream).await? else {
            return Ok(());
        };
        match opcode {
            OP_CLOSE => {
                // Tests read this to see what reached the server.
                eprintln!(
                    "close {}",
                    close_code(&payload).map_or("none".into(), |c| c.to_string())
                );
                write_frame(&mut stream, OP_CLOSE, &payload, false).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            OP_PING => write_frame(&mut stream, OP_PONG, &payload, false).await?,
            OP_PONG => {}
            op => write_frame(&mut stream, op, &payload, false).await?,
        }
    }
}

/// The client; prints one JSON object.
pub async fn client(args: ClientArgs) -> ExitCode {
    let limit = Duration::from_secs(args.timeout_secs);
    let mut report = json!({ "messages": args.messages });
    let outcome = tokio::time::timeout(limit, run_client(&args, &mut report)).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report["error"] = json!(e),
        Err(_) => report["error"] = json!(format!("timed out after {limit:?}")),
    }
    println!("{report}");
    ExitCode::SUCCESS
}

async fn run_client(args: &ClientArgs, report: &mut serde_json::Value) -> Result<(), String> {
    let mut stream = if args.h2 {
        open_h2(args).await?
    } else {
        open_h1(args).await?
    };
    let mut echoed = 0usize;
    let mut mismatched = 0usize;
    let mut bytes = 0u64;
    let mut seed = 0x5eed_u64;
    for i in 0..args.messages {
        if i == args.messages / 2 && args.pause_secs > 0 {
            eprintln!("pausing {}s", args.pause_secs);
            tokio::time::sleep(Duration::from_secs(args.pause_secs)).await;
        }
        // Sizes from 1 byte to ~70 KiB, crossing the 7-bit and 16-bit length forms.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = match i % 100 {
            0 => 70_000,
            1..=9 => 126 + (seed >> 40) as usize % 4000,
            _ => 1 + (seed >> 40) as usize % 125,
        };
        let mut msg = vec![0u8; size];
        fill(&mut msg, seed ^ i as u64);
        write_frame(&mut stream, OP_BINARY, &msg, true).await?;
        let (op, payload) = read_frame(&mut stream)
            .await?
            .ok_or_else(|| format!("connection ended after {echoed} echoes"))?;
        if op == OP_CLOSE {
            return Err(format!(
                "server closed after {echoed} echoes: {:?}",
                close_code(&payload)
            ));
        }
        if op == OP_BINARY && payload == msg {
            echoed += 1;
            bytes += size as u64;
        } else {
            mismatched += 1;
        }
    }
    report["echoed"] = json!(echoed);
    report["mismatched"] = json!(mismatched);
    report["bytes"] = json!(bytes);
    eprintln!("echoed {echoed}");
    let Some(wait) = args.await_close_secs else {
        write_frame(&mut stream, OP_CLOSE, &1000u16.to_be_bytes(), true).await?;
        return Ok(());
    };
    let frame = tokio::time::timeout(Duration::from_secs(wait), read_frame(&mut stream)).await;
    let (op, payload) = match frame {
        Err(_) => return Err(format!("no Close within {wait}s")),
        Ok(Err(e)) => return Err(format!("waiting for Close: {e}")),
        Ok(Ok(None)) => return Err("connection ended without a Close".into()),
        Ok(Ok(Some(f))) => f,
    };
    if op != OP_CLOSE {
        return Err(format!("expected Close, got opcode {op}"));
    }
    report["close_code"] = json!(close_code(&payload));
    write_frame(
        &mut stream,
        OP_CLOSE,
        &payload[..payload.len().min(2)],
        true,
    )
    .await?;
    // The server closes the TCP connection after the closing handshake (RFC 6455 §7.1.1).
    let mut rest = [0u8; 1024];
    let end = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest)).await;
    report["close_clean"] = json!(matches!(end, Ok(Ok(0))));
    report["close_end"] = json!(match end {
        Ok(Ok(0)) => "eof".to_string(),
        Ok(Ok(n)) => format!("{n} more bytes"),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "still open".to_string(),
    });
    Ok(())
}

/// The RFC 6455 opening handshake over a new TCP connection.
async fn open_h1(args: &ClientArgs) -> Result<Box<dyn Io>, String> {
    let mut stream = TcpStream::connect(&args.to)
        .await
        .map_err(|e| format!("connect {}: {e}", args.to))?;
    let _ = stream.set_nodelay(true);
    let mut key_bytes = [0u8; 16];
    fill(&mut key_bytes, std::process::id() as u64);
    let key = base64(&key_bytes);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        args.path, args.host
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("handshake write: {e}"))?;
    let head = read_head(&mut stream).await?;
    let status = head.lines().next().unwrap_or_default().to_string();
    if !status.contains(" 101 ") {
        return Err(format!("handshake: {status}"));
    }
    let accept = header(&head, "sec-websocket-accept").unwrap_or_default();
    if accept != accept_key(&key) {
        return Err(format!("bad Sec-WebSocket-Accept {accept:?}"));
    }
    Ok(Box::new(stream))
}

/// RFC 8441: a CONNECT with `:protocol websocket` on an h2c connection; 200 opens it.
async fn open_h2(args: &ClientArgs) -> Result<Box<dyn Io>, String> {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = TcpStream::connect(&args.to)
        .await
        .map_err(|e| format!("connect {}: {e}", args.to))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let uri = format!("http://{}{}", args.host, args.path);
    // The server's SETTINGS (which enable extended CONNECT) may not have arrived yet; h2
    // refuses to send such a request until they have, without sending anything.
    let mut last = String::new();
    for _ in 0..100 {
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(&uri)
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        match send.send_request(req).await {
            Ok(mut resp) => {
                if resp.status() != hyper::StatusCode::OK {
                    return Err(format!("extended CONNECT: status {}", resp.status()));
                }
                let up = hyper::upgrade::on(&mut resp)
                    .await
                    .map_err(|e| format!("upgrade: {e}"))?;
                return Ok(Box::new(TokioIo::new(up)));
            }
            Err(e) if !send.is_closed() => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("extended CONNECT: {e}")),
        }
    }
    Err(format!("extended CONNECT never allowed: {last}"))
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Reads an HTTP head (up to the blank line) byte by byte, so nothing after it is consumed.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err("HTTP head too large".into());
        }
        let n = s
            .read(&mut b)
            .await
            .map_err(|e| format!("read head: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed in the HTTP head: {:?}",
                String::from_utf8_lossy(&head)
            ));
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// One frame (a whole message: the tests never fragment); `None` on a clean EOF first.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<(u8, Vec<u8>)>, String> {
    let mut h = [0u8; 2];
    match s.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read frame: {e}")),
    }
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > MAX_PAYLOAD {
        return Err(format!("frame of {len} bytes"));
    }
    let mut mask = [0u8; 4];
    if masked {
        s.read_exact(&mut mask).await.map_err(|e| e.to_string())?;
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| format!("read payload: {e}"))?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some((opcode, payload)))
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    opcode: u8,
    payload: &[u8],
    mask: bool,
) -> Result<(), String> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    if mask {
        let mut key = [0u8; 4];
        fill(&mut key, payload.len() as u64 ^ 0xa5a5);
        out.extend(key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    s.write_all(&out)
        .await
        .map_err(|e| format!("write frame: {e}"))
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn accept_key(key: &str) -> String {
    use sha1::Digest;
    base64(&sha1::Sha1::digest(format!("{key}{GUID}").as_bytes()))
}

fn base64(input: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
