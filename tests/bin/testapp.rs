//! `ambit-testapp`: the workloads that end-to-end tests run inside pods.
//!
//! Servers print `listening on <addr>` once bound, so the harness can wait
//! for them instead of sleeping:
//! - `echo --listen ADDR`: TCP echo, any number of concurrent connections.
//! - `http --listen ADDR --name NAME [--fail-rate F]`: HTTP/1.1 and h2c
//!   (prior knowledge); every request gets 200, body `hello from NAME\n` and
//!   header `x-peer: <client ip:port>`, so tests see which source address the
//!   app observed. With `--fail-rate`, that fraction of requests (at random)
//!   gets 503 and body `NAME unavailable\n` instead.
//!   `--delay-ms N` waits N ms before each answer. With `--hold-file F`, requests to
//!   `/hold…` print `holding PATH` and wait until F exists. `--fail-status S` answers failures
//!   with S instead of 503. `GET /__served` answers (without being counted) how many
//!   other requests the server has answered, so tests can count at the server side. The header `x-path` echoes the path
//!   the server saw, `x-host` every `Host` value it received (joined with ` | `), and
//!   `x-target` the request-target. Requests with `content-type: application/grpc` are answered as
//!   gRPC (see [`grpc`]): `/ambit.test.Echo/Unary` answers one message, the server's
//!   name; `/ambit.test.Echo/ServerStream` answers as many as the request message says.
//! - `sink --listen ADDR`: reads to EOF, replies `<bytes> <sha256hex>\n`.
//!
//! Clients print one JSON object on stdout and bound every step with
//! `--timeout-secs`:
//! - `send --to ADDR --bytes N [--seed S] [--marker STR]`: streams N
//!   deterministic pseudo-random bytes to a sink (the marker overwrites the
//!   start of every 64 KiB block, for packet-capture searches) and checks
//!   the sink's count and hash. Exit 1 on mismatch or error.
//! - `fanout --to ADDR --conns N --bytes-per-conn M`: N concurrent
//!   connections to an echo server, each verifying its M bytes come back.
//!   Exit 1 if any failed.
//! - `connect --to ADDR [--send STR]`: one attempt, classified as
//!   ok/refused/reset/timeout/eof/unreachable/error. Always exit 0.
//! - `http-load --to ADDR --requests N [--concurrency C] [--h2c] ...`: N requests,
//!   counted per status and per body (`statuses`, `bodies`, `errors`, `connections`).
//! - `ws-echo`, `ws`: WebSocket echo server and client (see [`ws`]).
//! - `flood --to ADDR --conns N [--sources IPS] [--send STR]`: opens and holds many
//!   connections like a flood, and counts what the server closed (see [`flood`]).
//! - `h2c --listen ADDR --name NAME`: an HTTP/1.1 server that honours `Upgrade: h2c`
//!   and prints every upgrade and request it serves (see [`h2c`]).
//! - `steady-load`, `hold`: paced load that survives drains, and many idle connections
//!   (see [`steady`]).
//! - `grpc --to ADDR --calls N --method unary|stream [--stream-messages M]`: real gRPC
//!   over h2c; counts per server name and per `grpc-status`.

#[path = "testapp_flood.rs"]
mod flood;
#[path = "testapp_frames.rs"]
mod frames;
#[path = "testapp_grpc.rs"]
mod grpc;
#[path = "testapp_h2c.rs"]
mod h2c;
#[path = "testapp_load.rs"]
mod load;
#[path = "testapp_steady.rs"]
mod steady;
#[path = "testapp_ws.rs"]
mod ws;

use std::convert::Infallible;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant as TokioInstant, timeout, timeout_at};

/// Size of the blocks `send` generates; the marker starts every block.
const BLOCK: usize = 64 * 1024;
/// How many error messages `fanout` reports.
const MAX_ERRORS: usize = 5;
/// The most `connect` keeps of what it receives.
const MAX_RECEIVED: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "ambit-testapp",
    about = "Test workloads for Ambit's simulated cluster"
)]
struct Cli {
    /// Parse the arguments, then exit 0 without doing anything (the manifest tests run
    /// every container's command line through it).
    #[arg(long, global = true, hide = true)]
    check_args: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// HTTP/1.1 and h2c server answering `hello from NAME`.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Fraction of requests (0 to 1) answered with 503, at random.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Wait this long before answering each request.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// The status of failed requests (`--fail-rate`).
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Requests whose path starts with `/hold` wait until this file exists, so
        /// tests can keep requests in flight for as long as they need, without timing.
        #[arg(long)]
        hold_file: Option<std::path::PathBuf>,
    },
    /// Many HTTP requests (HTTP/1.1 keep-alive or h2c), counted by status and body.
    HttpLoad {
        #[arg(long)]
        to: String,
        #[arg(long)]
        requests: usize,
        /// Requests in flight at once (HTTP/1.1: one keep-alive connection each; h2c:
        /// streams on one connection).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long)]
        h2c: bool,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "example")]
        host: String,
        /// `name:value`, repeatable.
        #[arg(long)]
        header: Vec<String>,
        /// Send a request body of this many bytes.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Pause between requests, per worker.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// gRPC calls to `/ambit.test.Echo/Unary` or `/ambit.test.Echo/ServerStream`.
    Grpc {
        #[arg(long)]
        to: String,
        #[arg(long)]
        calls: usize,
        /// `unary` or `stream`.
        #[arg(long, default_value = "unary")]
        method: String,
        #[arg(long, default_value_t = 3)]
        stream_messages: u32,
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        #[arg(long, default_value = "echo")]
        host: String,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Reads to EOF, replies `<bytes> <sha256hex>`.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Streams deterministic bytes to a sink and checks its reply.
    Send {
        #[arg(long)]
        to: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        marker: Option<String>,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Concurrent echo round trips.
    Fanout {
        #[arg(long)]
        to: String,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        bytes_per_conn: usize,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// One connection attempt, classified.
    Connect {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
        #[arg(long)]
        send: Option<String>,
        /// Keep the write side open after sending (no half-close), so the connection
        /// stays up until the peer or the deadline ends it.
        #[arg(long)]
        hold: bool,
    },
    /// HTTP/1.1 server that honours `Upgrade: h2c`, printing what it serves.
    H2c {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// WebSocket echo server.
    WsEcho(ws::EchoArgs),
    /// WebSocket client: echoes N messages, optionally waits for the server's Close.
    Ws(ws::ClientArgs),
    /// Paced HTTP load for a duration, reconnecting when the server closes.
    SteadyLoad(steady::LoadArgs),
    /// Holds N h2c connections open until a file appears.
    Hold(steady::HoldArgs),
    /// Opens and holds many TCP connections (idle or with partial data), like a flood.
    Flood(flood::FloodArgs),
}

/// xorshift64*: fast, deterministic, and good enough to defeat any
/// compression or dedup along the path. Not for cryptography.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Prng {
        // The all-zero state is a fixed point of xorshift.
        Prng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_args {
        println!("ambit-testapp: arguments accepted");
        return ExitCode::SUCCESS;
    }
    raise_nofile_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambit-testapp: building the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Echo { listen } => serve(listen, echo).await,
            Cmd::Http {
                listen,
                name,
                fail_rate,
                delay_ms,
                fail_status,
                hold_file,
            } => serve_http(listen, name, fail_rate, delay_ms, fail_status, hold_file).await,
            Cmd::HttpLoad {
                to,
                requests,
                concurrency,
                h2c,
                method,
                path,
                host,
                header,
                body_bytes,
                pause_ms,
                timeout_secs,
            } => {
                let spec = load::Spec {
                    to,
                    requests,
                    concurrency: concurrency.max(1),
                    h2c,
                    method,
                    path,
                    host,
                    headers: header,
                    body_bytes,
                    pause: Duration::from_millis(pause_ms),
                };
                load::run(spec, secs(timeout_secs)).await
            }
            Cmd::Grpc {
                to,
                calls,
                method,
                stream_messages,
                concurrency,
                host,
                timeout_secs,
            } => {
                grpc::client(
                    &to,
                    calls,
                    &method,
                    stream_messages,
                    concurrency.max(1),
                    &host,
                    secs(timeout_secs),
                )
                .await
            }
            Cmd::Sink { listen } => serve(listen, sink).await,
            Cmd::Send {
                to,
                bytes,
                seed,
                marker,
                timeout_secs,
            } => send(&to, bytes, seed, marker.as_deref(), secs(timeout_secs)).await,
            Cmd::Fanout {
                to,
                conns,
                bytes_per_conn,
                timeout_secs,
                seed,
            } => fanout(&to, conns, bytes_per_conn, seed, secs(timeout_secs)).await,
            Cmd::Connect {
                to,
                timeout_secs,
                send,
                hold,
            } => connect(&to, secs(timeout_secs), send.as_deref(), hold).await,
            Cmd::H2c { listen, name } => h2c::serve(listen, name).await,
            Cmd::WsEcho(args) => ws::echo_server(args).await,
            Cmd::Ws(args) => ws::client(args).await,
            Cmd::SteadyLoad(args) => steady::load(args).await,
            Cmd::Hold(args) => steady::hold(args).await,
            Cmd::Flood(args) => flood::run(args).await,
        }
    })
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Fanout and echo tests open thousands of sockets; the default soft limit
/// (often 1024) would fail them for reasons unrelated to the mesh.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn bind(listen: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(listen).await {
        Ok(l) => {
            let addr = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| listen.to_string());
            println!("listening on {addr}");
            Some(l)
        }
        Err(e) => {
            eprintln!("ambit-testapp: binding {listen}: {e}");
            None
        }
    }
}

/// Accepts forever, one task per connection. An accept error (e.g. EMFILE)
/// never ends the loop; a short pause keeps it from spinning.
async fn serve<F, Fut>(listen: SocketAddr, handler: F) -> ExitCode
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(listener) = bind(listen).await else {
        return ExitCode::from(2);
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handler(stream, peer));
            }
            Err(e) => {
                eprintln!("ambit-testapp: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(stream: TcpStream, _peer: SocketAddr) {
    let (mut r, mut w) = stream.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn sink(mut stream: TcpStream, peer: SocketAddr) {
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; BLOCK];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) => {
                eprintln!("ambit-testapp: sink read from {peer}: {e}");
                return;
            }
        }
    }
    let reply = format!("{total} {}\n", hex(&hasher.finalize()));
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn serve_http(
    listen: SocketAddr,
    name: String,
    fail_rate: f64,
    delay_ms: u64,
    fail_status: u16,
    hold_file: Option<std::path::PathBuf>,
) -> ExitCode {
    let fail_status =
        hyper::StatusCode::from_u16(fail_status).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let Some(listener) = bind(listen).await else {
        return ExitCode::from(2);
    };
    let body = Bytes::from(format!("hello from {name}\n"));
    let unavailable = Bytes::from(format!("{name} unavailable\n"));
    // Seeded per process: each server fails its own random share of requests.
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    let prng = std::sync::Arc::new(parking_lot::Mutex::new(Prng::new(seed)));
    loop {
        let (stream, peer) = match listener.accept().await {
            // A server on `[::]` takes both families and sees IPv4 peers v4-mapped; report
            // them as the IPv4 addresses they are.
            Ok((stream, peer)) => (
                stream,
                SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            ),
            Err(e) => {
                eprintln!("ambit-testapp: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (body, unavailable, prng) = (body.clone(), unavailable.clone(), prng.clone());
        let name = name.clone();
        let served = served.clone();
        let hold_file = hold_file.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                if grpc::is_grpc(&req) {
                    let name = name.clone();
                    return Box::pin(
                        async move { Ok::<_, Infallible>(grpc::serve(req, &name).await) },
                    )
                        as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>;
                }
                if req.uri().path() == "/__served" {
                    let n = served.load(std::sync::atomic::Ordering::Acquire);
                    let resp = Response::new(frames::Frames::full(Bytes::from(format!("{n}\n"))));
                    return Box::pin(async move { Ok::<_, Infallible>(resp) });
                }
                served.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                // next_u64 / 2^64 is uniform in [0, 1).
                let roll = prng.lock().next_u64() as f64 / 18_446_744_073_709_551_616.0;
                let fail = roll < fail_rate;
                let mut resp = Response::new(frames::Frames::full(if fail {
                    unavailable.clone()
                } else {
                    body.clone()
                }));
                if fail {
                    *resp.status_mut() = fail_status;
                }
                let headers = resp.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                // A SocketAddr's text is always a valid header value.
                if let Ok(v) = HeaderValue::try_from(peer.to_string()) {
                    headers.insert(HeaderName::from_static("x-peer"), v);
                }
                // Echo the path the server saw, so tests can check rewrites.
                if let Ok(v) = HeaderValue::try_from(req.uri().path()) {
                    headers.insert(HeaderName::from_static("x-path"), v);
                }
                // And every Host it got, and the request-target, so tests can check that
                // what was authorized is what arrived.
                let hosts: Vec<&str> = req
                    .headers()
                    .get_all(hyper::header::HOST)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("<not UTF-8>"))
                    .collect();
                if let Ok(v) = HeaderValue::try_from(hosts.join(" | ")) {
                    headers.insert(HeaderName::from_static("x-host"), v);
                }
                if let Ok(v) = HeaderValue::try_from(req.uri().to_string()) {
                    headers.insert(HeaderName::from_static("x-target"), v);
                }
                let hold = hold_file
                    .clone()
                    .filter(|_| req.uri().path().starts_with("/hold"));
                Box::pin(async move {
                    if let Some(file) = hold {
                        println!("holding {}", req.uri().path());
                        while !file.exists() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    // Drain the request body so the client can finish sending.
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    if delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    }
                    Ok::<_, Infallible>(resp)
                })
            });
            // HTTP/1.1, or HTTP/2 when the client opens with the h2 preface (h2c).
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("ambit-testapp: http connection from {peer}: {e}");
            }
        });
    }
}

async fn send(to: &str, bytes: u64, seed: u64, marker: Option<&str>, limit: Duration) -> ExitCode {
    let start = Instant::now();
    let mut hasher = Sha256::new();
    let result = timeout(limit, async {
        let mut stream = TcpStream::connect(to)
            .await
            .map_err(|e| format!("connect {to}: {e}"))?;
        let mut prng = Prng::new(seed);
        let mut block = vec![0u8; BLOCK];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(BLOCK as u64)).unwrap_or(BLOCK);
            let chunk = &mut block[..n];
            prng.fill(chunk);
            if let Some(m) = marker {
                let m = &m.as_bytes()[..m.len().min(n)];
                chunk[..m.len()].copy_from_slice(m);
            }
            hasher.update(&*chunk);
            stream
                .write_all(chunk)
                .await
                .map_err(|e| format!("write after {} bytes: {e}", bytes - left))?;
            left -= n as u64;
        }
        stream
            .shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("reading reply: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&reply).trim_end().to_string())
    })
    .await
    .unwrap_or_else(|_| Err(format!("timed out after {limit:?}")));
    let sha = hex(&hasher.finalize());
    let (reply, error) = match result {
        Ok(r) => (r, None),
        Err(e) => (String::new(), Some(e)),
    };
    let matched = error.is_none() && reply == format!("{bytes} {sha}");
    let mut out = json!({
        "bytes": bytes,
        "sha256": sha,
        "reply": reply,
        "match": matched,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    });
    if let Some(e) = error {
        out["error"] = json!(e);
    }
    println!("{out}");
    if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn fanout(to: &str, conns: usize, per_conn: usize, seed: u64, limit: Duration) -> ExitCode {
    let start = Instant::now();
    let deadline = TokioInstant::now() + limit;
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let to = to.to_string();
        let seed = seed.wrapping_add(i as u64);
        tasks.push(tokio::spawn(async move {
            timeout_at(deadline, round_trip(&to, per_conn, seed))
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()))
                .map_err(|e| format!("conn {i}: {e}"))
        }));
    }
    let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| Err(format!("task failed: {e}")));
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < MAX_ERRORS {
                    errors.push(e);
                }
            }
        }
    }
    let out = json!({
        "ok": ok,
        "failed": failed,
        "errors": errors,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    });
    println!("{out}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Writes `len` random bytes and reads them back concurrently (writing all
/// first could deadlock once both directions' buffers fill).
async fn round_trip(to: &str, len: usize, seed: u64) -> Result<(), String> {
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut data = vec![0u8; len];
    Prng::new(seed).fill(&mut data);
    let (mut r, mut w) = stream.into_split();
    let writer = async {
        w.write_all(&data)
            .await
            .map_err(|e| format!("write: {e}"))?;
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))
    };
    let reader = async {
        let mut back = vec![0u8; len];
        r.read_exact(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(back)
    };
    let (wrote, back) = tokio::join!(writer, reader);
    wrote?;
    let back = back?;
    match back.iter().zip(&data).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!("echo differs at byte {i}")),
    }
}

async fn connect(to: &str, limit: Duration, send: Option<&str>, hold: bool) -> ExitCode {
    let start = Instant::now();
    let deadline = TokioInstant::now() + limit;
    let mut received = Vec::new();
    let (result, error) = match timeout_at(deadline, TcpStream::connect(to)).await {
        Err(_) => (
            "timeout",
            Some(format!("connect did not complete within {limit:?}")),
        ),
        Ok(Err(e)) => (classify(&e), Some(e.to_string())),
        Ok(Ok(mut stream)) => match send {
            // Without a payload, a completed handshake is the answer. (With
            // the mesh capturing, the local listener always completes it; use
            // --send to learn whether the far end is reachable.)
            None => ("ok", None),
            Some(payload) => exchange(&mut stream, payload, hold, deadline, &mut received).await,
        },
    };
    let mut out = json!({
        "result": result,
        "received": String::from_utf8_lossy(&received),
        "elapsed_ms": start.elapsed().as_millis() as u64,
    });
    if let Some(e) = error {
        out["error"] = json!(e);
    }
    println!("{out}");
    ExitCode::SUCCESS
}

/// Sends `payload`, half-closes unless `hold` (so an echo or sink server
/// finishes and closes), then reads until EOF, an error or the deadline.
async fn exchange(
    stream: &mut TcpStream,
    payload: &str,
    hold: bool,
    deadline: TokioInstant,
    received: &mut Vec<u8>,
) -> (&'static str, Option<String>) {
    let io = async {
        stream.write_all(payload.as_bytes()).await?;
        if !hold {
            stream.shutdown().await?;
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let keep = n.min(MAX_RECEIVED.saturating_sub(received.len()));
            received.extend_from_slice(&buf[..keep]);
        }
    };
    match timeout_at(deadline, io).await {
        Err(_) => ("timeout", Some("no EOF before the deadline".into())),
        Ok(Err(e)) => (classify(&e), Some(e.to_string())),
        Ok(Ok(())) if received.is_empty() => ("eof", None),
        Ok(Ok(())) => ("ok", None),
    }
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        ErrorKind::TimedOut => "timeout",
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
        _ => "error",
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prng_is_deterministic_and_fills_odd_lengths() {
        let (mut a, mut b) = (vec![0u8; 13], vec![0u8; 13]);
        Prng::new(7).fill(&mut a);
        Prng::new(7).fill(&mut b);
        assert_eq!(a, b);
        Prng::new(8).fill(&mut b);
        assert_ne!(a, b);
        let mut z = [0u8; 8];
        Prng::new(0).fill(&mut z);
        assert_ne!(z, [0u8; 8]);
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
