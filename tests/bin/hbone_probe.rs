//! `ambit-hbone-probe`: sends one hand-made HBONE request and prints the status, so tests
//! can check how ztunnel answers malformed and misdirected tunnels.
//!
//! It speaks real mutual TLS with a certificate from `ztunnel ca issue`, and checks the
//! server's identity like a ztunnel would.
//!
//! With `--http1 N` or `--h2c N` it speaks HTTP inside the accepted tunnel, as a client
//! behind a source ztunnel would through a waypoint: N HTTP/1.1 requests one after another
//! on one keep-alive connection, or N HTTP/2 (prior knowledge) requests on one connection,
//! `--concurrency` at a time. It then prints the count of each status and of each response
//! body (`statuses`, `bodies`) and the first errors.
//!
//! With `--tunnels N` it opens N tunnels instead (CONNECTs on one HBONE connection,
//! `--concurrency` at a time), each carrying the `--baggage` template with `{i}` replaced by
//! the tunnel's number, and sends one HTTP/1.1 request (`Connection: close`) through each;
//! it prints the count of each HTTP status (`statuses`) and of each CONNECT status
//! (`connect_statuses`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_shared::hbone::H2Stream;
use ambit_shared::identity::Identity;
use ambit_shared::tls;
use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
struct Args {
    /// HBONE address (ip:15008).
    #[arg(long)]
    to: SocketAddr,
    /// Identity the server must prove.
    #[arg(long)]
    server_identity: Identity,
    /// Client certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Client key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle (PEM).
    #[arg(long)]
    bundle: PathBuf,
    /// HTTP method.
    #[arg(long, default_value = "CONNECT")]
    method: String,
    /// Request target: an authority for CONNECT, a URI otherwise.
    #[arg(long)]
    target: String,
    /// Bytes to send through an accepted tunnel (then read the reply until EOF).
    #[arg(long)]
    send: Option<String>,
    /// Send this many HTTP/1.1 requests through the tunnel, on one keep-alive connection.
    #[arg(long, conflicts_with_all = ["send", "h2c"])]
    http1: Option<usize>,
    /// Send this many HTTP/2 requests (h2c, prior knowledge) through the tunnel.
    #[arg(long, conflicts_with = "send")]
    h2c: Option<usize>,
    /// HTTP/2 requests (or, with --tunnels, tunnels) in flight at once.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Open this many tunnels to --target, one HTTP/1.1 request in each.
    #[arg(long, conflicts_with_all = ["send", "http1", "h2c"])]
    tunnels: Option<usize>,
    /// `baggage` of each tunnel (with --tunnels); `{i}` becomes the tunnel's number.
    #[arg(long)]
    baggage: Option<String>,
    /// A `forwarded: for="ADDR"` header on the CONNECT: the client address a source
    /// ztunnel would claim.
    #[arg(long)]
    forwarded: Option<SocketAddr>,
    /// Path of the HTTP requests.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host of the HTTP requests.
    #[arg(long, default_value = "example")]
    host: String,
    /// Overall time limit.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

/// The most error messages an HTTP run reports.
const MAX_ERRORS: usize = 5;

/// What an HTTP run saw.
#[derive(Default)]
struct Tally {
    statuses: std::collections::BTreeMap<String, u64>,
    bodies: std::collections::BTreeMap<String, u64>,
    /// CONNECT statuses, with --tunnels.
    connects: std::collections::BTreeMap<String, u64>,
    errors: Vec<String>,
}

impl Tally {
    fn response(&mut self, status: u16, body: &[u8]) {
        *self.statuses.entry(status.to_string()).or_default() += 1;
        let body = String::from_utf8_lossy(body).trim_end().to_string();
        *self.bodies.entry(body).or_default() += 1;
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        *self.statuses.entry("error".into()).or_default() += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e.to_string());
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = Duration::from_secs(args.timeout_secs);
    let result = tokio::time::timeout(limit, probe(&args))
        .await
        .context("probe timed out")?;
    match result {
        Ok((status, Outcome::Bytes(received))) => println!(
            "{}",
            serde_json::json!({ "status": status, "received": received })
        ),
        Ok((status, Outcome::Http(t))) => println!(
            "{}",
            serde_json::json!({
                "status": status,
                "statuses": t.statuses,
                "bodies": t.bodies,
                "connect_statuses": t.connects,
                "errors": t.errors,
            })
        ),
        Err(e) => println!("{}", serde_json::json!({ "error": format!("{e:#}") })),
    }
    Ok(())
}

/// What came back through the tunnel.
enum Outcome {
    /// Raw bytes (`--send`).
    Bytes(String),
    /// HTTP responses (`--http1`, `--h2c`).
    Http(Tally),
}

async fn probe(args: &Args) -> anyhow::Result<(u16, Outcome)> {
    let cert = tls::load_certified_key(&args.cert, &args.key)?;
    let bundle = tls::TrustBundle::load(&args.bundle)?;
    let config = tls::client_config(cert, &bundle, args.server_identity.clone())?;
    let tcp = TcpStream::connect(args.to).await.context("TCP connect")?;
    let io = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(args.to.ip().into()), tcp)
        .await
        .context("TLS handshake")?;
    let (client, connection) = h2::client::handshake(io)
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    if let Some(n) = args.tunnels {
        let tally = many_tunnels(client, n, args).await?;
        return Ok((200, Outcome::Http(tally)));
    }
    let mut request = http::Request::builder()
        .method(args.method.as_str())
        .uri(args.target.as_str());
    if let Some(f) = args.forwarded {
        request = request.header("forwarded", format!("for=\"{f}\""));
    }
    let request = request.body(())?;
    let (response, mut send) = client.send_request(request, false)?;
    let response = response.await?;
    let status = response.status().as_u16();
    if status == 200 && (args.http1.is_some() || args.h2c.is_some()) {
        let tunnel = ambit_shared::hbone::H2Stream::new(send, response.into_body());
        let tally = match (args.http1, args.h2c) {
            (Some(n), _) => http1(tunnel, n, args).await?,
            (None, Some(n)) => h2c(tunnel, n, args).await?,
            (None, None) => Tally::default(),
        };
        return Ok((status, Outcome::Http(tally)));
    }
    let mut received = Vec::new();
    if status == 200 {
        if let Some(data) = &args.send {
            send.send_data(Bytes::copy_from_slice(data.as_bytes()), true)?;
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
        }
    }
    Ok((
        status,
        Outcome::Bytes(String::from_utf8_lossy(&received).into_owned()),
    ))
}

fn request(args: &Args, absolute: bool) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    let uri = if absolute {
        format!("http://{}{}", args.host, args.path)
    } else {
        args.path.clone()
    };
    let mut b = http::Request::get(uri);
    if !absolute {
        b = b.header(http::header::HOST, args.host.as_str());
    }
    Ok(b.body(Empty::new())?)
}

/// `n` requests, one after another, on one HTTP/1.1 keep-alive connection.
async fn http1(tunnel: H2Stream, n: usize, args: &Args) -> anyhow::Result<Tally> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .context("HTTP/1.1 handshake in the tunnel")?;
    tokio::spawn(conn);
    let mut tally = Tally::default();
    for _ in 0..n {
        if let Err(e) = sender.ready().await {
            // The keep-alive connection is gone: every request left fails.
            tally.error(format!("connection closed: {e}"));
            break;
        }
        match sender.send_request(request(args, false)?).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(b) => tally.response(status, &b.to_bytes()),
                    Err(e) => tally.error(format!("body: {e}")),
                }
            }
            Err(e) => tally.error(e),
        }
    }
    Ok(tally)
}

/// `n` requests on one HTTP/2 connection, `--concurrency` in flight at once.
async fn h2c(tunnel: H2Stream, n: usize, args: &Args) -> anyhow::Result<Tally> {
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tunnel),
    )
    .await
    .context("HTTP/2 handshake in the tunnel")?;
    tokio::spawn(conn);
    let mut tally = Tally::default();
    let mut left = n;
    while left > 0 {
        let batch = left.min(args.concurrency.max(1));
        left -= batch;
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let mut sender = sender.clone();
            let req = request(args, true)?;
            tasks.push(tokio::spawn(async move {
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?
                    .to_bytes();
                Ok::<_, String>((status, body))
            }));
        }
        for t in tasks {
            match t.await {
                Ok(Ok((status, body))) => tally.response(status, &body),
                Ok(Err(e)) => tally.error(e),
                Err(e) => tally.error(format!("task: {e}")),
            }
        }
    }
    Ok(tally)
}

/// `n` tunnels, `--concurrency` at a time, each with its own `baggage` and one HTTP/1.1
/// request.
async fn many_tunnels(
    client: h2::client::SendRequest<Bytes>,
    n: usize,
    args: &Args,
) -> anyhow::Result<Tally> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tally = Tally::default();
    let raw = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.path, args.host
    );
    let mut next = 0;
    while next < n {
        let batch = (n - next).min(args.concurrency.max(1));
        let mut tasks = Vec::with_capacity(batch);
        for i in next..next + batch {
            let mut client = client.clone();
            let mut request = http::Request::builder()
                .method("CONNECT")
                .uri(args.target.as_str());
            if let Some(b) = &args.baggage {
                request = request.header("baggage", b.replace("{i}", &i.to_string()));
            }
            let request = request.body(())?;
            let raw = raw.clone();
            tasks.push(tokio::spawn(async move {
                client = client.ready().await.map_err(|e| format!("ready: {e}"))?;
                let (response, send) = client
                    .send_request(request, false)
                    .map_err(|e| format!("CONNECT: {e}"))?;
                let response = response.await.map_err(|e| format!("CONNECT: {e}"))?;
                let connect = response.status().as_u16();
                if connect != 200 {
                    return Ok::<_, String>((connect, None));
                }
                let mut tunnel = H2Stream::new(send, response.into_body());
                tunnel
                    .write_all(raw.as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let mut answer = Vec::new();
                tunnel
                    .read_to_end(&mut answer)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                let text = String::from_utf8_lossy(&answer);
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| format!("no status line in {:?}", text.lines().next()))?;
                Ok((connect, Some(status)))
            }));
        }
        next += batch;
        for t in tasks {
            match t.await {
                Ok(Ok((connect, status))) => {
                    *tally.connects.entry(connect.to_string()).or_default() += 1;
                    if let Some(s) = status {
                        *tally.statuses.entry(s.to_string()).or_default() += 1;
                    }
                }
                Ok(Err(e)) => tally.error(e),
                Err(e) => tally.error(format!("task: {e}")),
            }
        }
    }
    Ok(tally)
}
