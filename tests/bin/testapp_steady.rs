//! Clients for drain and scale tests:
//! - `steady-load --to ADDR --rps R --duration-secs D [--concurrency C] [--h2c]`: paced
//!   requests (R per second in total, spread over C workers, each with its own HTTP/1.1
//!   keep-alive or h2c connection) for D seconds. A worker whose connection was closed
//!   (`Connection: close`, GOAWAY) opens a new one; a request the client library reports as
//!   never written is sent again on the new connection (as browsers and hyper-util do).
//!   Everything else counts as a failure: a non-200 status, or a request that was sent and
//!   got no response.
//! - `hold --to ADDR --conns N --until-file PATH`: opens N h2c connections, makes one
//!   request on each, prints `holding N` on stderr, waits until PATH exists, then makes one
//!   more request on each and reports how many connections were still usable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper::client::conn::{http1, http2};
use hyper::header::HOST;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpStream;

const MAX_ERRORS: usize = 10;
/// Sends of one request that the client library reports as never written.
const MAX_RESENDS: usize = 5;

#[derive(clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    to: String,
    #[arg(long)]
    rps: u64,
    #[arg(long)]
    duration_secs: u64,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long)]
    h2c: bool,
    #[arg(long, default_value = "example")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
}

#[derive(clap::Args)]
pub struct HoldArgs {
    #[arg(long)]
    to: String,
    #[arg(long)]
    conns: usize,
    #[arg(long, default_value = "example")]
    host: String,
    #[arg(long)]
    until_file: PathBuf,
    /// Connections opened at once.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    failed: u64,
    statuses: BTreeMap<String, u64>,
    errors: Vec<String>,
    connections: u64,
    resent: u64,
    connect_errors: u64,
}

impl Tally {
    fn error(&mut self, e: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }
}

async fn connect(to: &str, h2c: bool) -> Result<Conn, String> {
    let tcp = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if h2c {
        let (s, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H2(s))
    } else {
        let (s, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H1(s))
    }
}

fn request(h2: bool, host: &str, path: &str) -> Request<Empty<Bytes>> {
    let mut b = Request::builder();
    b = if h2 {
        b.uri(format!("http://{host}{path}"))
    } else {
        b.uri(path).header(HOST, host)
    };
    b.body(Empty::new()).unwrap_or_default()
}

/// What happened to one request.
enum Sent {
    Status(u16),
    /// Never written: safe to send again on another connection.
    Unsent,
    /// Written, and no response.
    Failed(String),
}

async fn send(conn: &mut Conn, host: &str, path: &str) -> Sent {
    let resp = match conn {
        Conn::H1(s) => {
            if s.ready().await.is_err() {
                return Sent::Unsent;
            }
            match s.try_send_request(request(false, host, path)).await {
                Ok(r) => r,
                Err(mut e) => {
                    if e.take_message().is_some() {
                        return Sent::Unsent;
                    }
                    return Sent::Failed(format!("send: {}", e.into_error()));
                }
            }
        }
        Conn::H2(s) => {
            if s.ready().await.is_err() {
                return Sent::Unsent;
            }
            match s.try_send_request(request(true, host, path)).await {
                Ok(r) => r,
                Err(mut e) => {
                    if e.take_message().is_some() {
                        return Sent::Unsent;
                    }
                    return Sent::Failed(format!("send: {}", e.into_error()));
                }
            }
        }
    };
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(_) => Sent::Status(status),
        Err(e) => Sent::Failed(format!("body: {e}")),
    }
}

pub async fn load(args: LoadArgs) -> ExitCode {
    let start = Instant::now();
    let args = Arc::new(args);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers = args.concurrency.max(1);
    let period = Duration::from_secs_f64(workers as f64 / args.rps.max(1) as f64);
    let end = tokio::time::Instant::now() + Duration::from_secs(args.duration_secs);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (args, tally) = (args.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            // Stagger the workers over one period.
            tokio::time::sleep(period.mul_f64(w as f64 / workers as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut conn: Option<Conn> = None;
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= end {
                    break;
                }
                tally.lock().sent += 1;
                let mut outcome = Sent::Unsent;
                for _ in 0..MAX_RESENDS {
                    if conn.as_ref().is_none_or(Conn::is_closed) {
                        match connect(&args.to, args.h2c).await {
                            Ok(c) => {
                                tally.lock().connections += 1;
                                conn = Some(c);
                            }
                            Err(e) => {
                                {
                                    let mut t = tally.lock();
                                    t.connect_errors += 1;
                                    t.error(e);
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    outcome = send(c, &args.host, &args.path).await;
                    if let Sent::Unsent = outcome {
                        tally.lock().resent += 1;
                        conn = None;
                        continue;
                    }
                    break;
                }
                let mut t = tally.lock();
                match outcome {
                    Sent::Status(s) => {
                        *t.statuses.entry(s.to_string()).or_default() += 1;
                        if s == 200 {
                            t.ok += 1;
                        } else {
                            t.failed += 1;
                        }
                    }
                    Sent::Unsent => {
                        t.failed += 1;
                        t.error("never sent after retries".into());
                    }
                    Sent::Failed(e) => {
                        t.failed += 1;
                        t.error(e);
                        conn = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = tally.lock();
    println!(
        "{}",
        json!({
            "sent": t.sent, "ok": t.ok, "failed": t.failed, "statuses": t.statuses,
            "errors": t.errors, "connections": t.connections, "resent": t.resent,
            "connect_errors": t.connect_errors,
            "elapsed_ms": start.elapsed().as_millis() as u64,
        })
    );
    ExitCode::SUCCESS
}

pub async fn hold(args: HoldArgs) -> ExitCode {
    let start = Instant::now();
    let limit = Duration::from_secs(args.timeout_secs);
    let mut report = json!({ "conns": args.conns });
    let run = async {
        let mut held: Vec<Conn> = Vec::with_capacity(args.conns);
        let mut errors: Vec<String> = Vec::new();
        let mut first_ok = 0u64;
        while held.len() + errors.len() < args.conns {
            let n = args.batch.min(args.conns - held.len() - errors.len());
            let batch = (0..n).map(|_| async {
                let mut c = connect(&args.to, true).await?;
                match send(&mut c, &args.host, "/").await {
                    Sent::Status(200) => Ok(c),
                    Sent::Status(s) => Err(format!("status {s}")),
                    Sent::Unsent => Err("unsent".to_string()),
                    Sent::Failed(e) => Err(e),
                }
            });
            for r in futures_join_all(batch).await {
                match r {
                    Ok(c) => {
                        first_ok += 1;
                        held.push(c);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        eprintln!("holding {}", held.len());
        while !args.until_file.exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let still_open = held.iter().filter(|c| !c.is_closed()).count();
        let mut second_ok = 0u64;
        for chunk in held.chunks_mut(args.batch.max(1)) {
            let batch = chunk.iter_mut().map(|c| send(c, &args.host, "/"));
            for r in futures_join_all(batch).await {
                match r {
                    Sent::Status(200) => second_ok += 1,
                    Sent::Status(s) => errors.push(format!("second request: status {s}")),
                    Sent::Unsent => errors.push("second request: connection closed".into()),
                    Sent::Failed(e) => errors.push(format!("second request: {e}")),
                }
            }
        }
        errors.truncate(MAX_ERRORS);
        report["first_ok"] = json!(first_ok);
        report["still_open"] = json!(still_open);
        report["second_ok"] = json!(second_ok);
        report["errors"] = json!(errors);
    };
    if tokio::time::timeout(limit, run).await.is_err() {
        report["error"] = json!(format!("timed out after {limit:?}"));
    }
    report["elapsed_ms"] = json!(start.elapsed().as_millis() as u64);
    println!("{report}");
    ExitCode::SUCCESS
}

/// Runs the futures concurrently on this task and returns their outputs in order.
async fn futures_join_all<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
