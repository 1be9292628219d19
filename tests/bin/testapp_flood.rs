//! `flood`: opens many TCP connections and holds them, the way a hostile peer exhausts a
//! listener, and reports what the server did with them.
//!
//! `flood --to ADDR --conns N [--max-attempts M] [--sources IP,IP…] [--send TEXT]
//! [--hold-secs S] [--concurrency C]` keeps up to N connections open: each of N slots
//! connects (source addresses taken in turn, so per-source bounds can be tested; each must
//! be an address of the namespace it runs in; at most C connecting at once), writes TEXT
//! (e.g. a partial HTTP head; nothing by default), and holds the connection until the
//! server closes it, then connects again, until M connects were attempted in all (default
//! N: one each) or S seconds have passed. A connection closed by the server releases its
//! descriptor at once, so the flood holds only what the server lets it hold.
//!
//! It prints one JSON line: `attempted`, `connected`, `connect_failed`, `closed_by_peer`,
//! `open_at_end`, `max_open`, and the first connect errors.
//!
//! Bounded in count (M) and time (S, plus the connect timeout).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const MAX_ERRORS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct FloodArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    conns: usize,
    /// Connects in all (default: --conns).
    #[arg(long)]
    max_attempts: Option<u64>,
    /// Source addresses, used in turn (default: the kernel's choice).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Bytes written on each connection after it opens (`\r\n` escapes allowed).
    #[arg(long)]
    send: Option<String>,
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

#[derive(Default)]
struct Tally {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    closed_by_peer: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    errors: Mutex<Vec<String>>,
}

pub async fn run(args: FloodArgs) -> ExitCode {
    raise_limit();
    let tally = Arc::new(Tally::default());
    let payload: Option<Arc<Vec<u8>>> = args
        .send
        .as_ref()
        .map(|s| Arc::new(s.replace("\\r", "\r").replace("\\n", "\n").into_bytes()));
    let deadline = Instant::now() + Duration::from_secs(args.hold_secs);
    let connecting = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let max_attempts = args.max_attempts.unwrap_or(args.conns as u64);
    let attempts = Arc::new(AtomicU64::new(0));
    let sources = Arc::new(args.sources.clone());
    let mut slots = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let (tally, payload, to) = (tally.clone(), payload.clone(), args.to);
        let (connecting, attempts, sources) =
            (connecting.clone(), attempts.clone(), sources.clone());
        slots.push(tokio::spawn(async move {
            loop {
                let n = attempts.fetch_add(1, Ordering::Relaxed);
                if n >= max_attempts || Instant::now() >= deadline {
                    return;
                }
                let source = (!sources.is_empty()).then(|| sources[n as usize % sources.len()]);
                let Ok(permit) = connecting.acquire().await else {
                    return;
                };
                let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect(to, source)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        failed(&tally, e.to_string());
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(_) => {
                        failed(&tally, "connect timed out".into());
                        continue;
                    }
                };
                drop(permit);
                tally.connected.fetch_add(1, Ordering::Relaxed);
                let open = tally.open.fetch_add(1, Ordering::Relaxed) + 1;
                tally.max_open.fetch_max(open, Ordering::Relaxed);
                let closed = hold(stream, payload.clone(), deadline, &tally).await;
                tally.open.fetch_sub(1, Ordering::Relaxed);
                if !closed {
                    return;
                }
            }
        }));
    }
    for t in slots {
        let _ = t.await;
    }
    let errors = tally.errors.lock().clone();
    let connected = tally.connected.load(Ordering::Relaxed);
    let closed = tally.closed_by_peer.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "attempted": connected + tally.connect_failed.load(Ordering::Relaxed),
            "connected": connected,
            "connect_failed": tally.connect_failed.load(Ordering::Relaxed),
            "closed_by_peer": closed,
            "open_at_end": connected - closed,
            "max_open": tally.max_open.load(Ordering::Relaxed),
            "errors": errors,
        })
    );
    ExitCode::SUCCESS
}

/// A flood holds many sockets; as root, go past the hard limit too.
fn raise_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_NOFILE, 1 << 20, 1 << 20).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn failed(tally: &Tally, e: String) {
    tally.connect_failed.fetch_add(1, Ordering::Relaxed);
    let mut errors = tally.errors.lock();
    if errors.len() < MAX_ERRORS {
        errors.push(e);
    }
}

async fn connect(to: SocketAddr, source: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

/// Writes the payload, then waits until the server closes (or resets) the connection or
/// the deadline passes; whatever the server sends is discarded. True if the server closed.
async fn hold(
    mut stream: tokio::net::TcpStream,
    payload: Option<Arc<Vec<u8>>>,
    deadline: Instant,
    tally: &Tally,
) -> bool {
    if let Some(p) = payload
        && stream.write_all(&p).await.is_err()
    {
        tally.closed_by_peer.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => {
                tally.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Ok(_)) => {}
        }
    }
}
