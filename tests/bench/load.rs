//! Load generators that run inside a pod (`ambit-bench load …`, started through
//! `Pod::command`), each printing one JSON object on stdout when done.
//!
//! - `fixed-rate`: open-loop HTTP/1.1 GETs at a fixed total rate over keep-alive
//!   connections. Every connection has its own evenly spaced schedule. Latency is measured
//!   from the *scheduled* send time whenever the connection was still busy with the
//!   previous response at that time (so a slow server is charged for the requests it made
//!   wait: no coordinated omission), and from the actual send otherwise (so the client's own
//!   timer jitter is not charged to the server).
//! - `conn-rate`: workers loop connect → one GET with `Connection: close` → read to EOF.
//! - `hold`: opens N keep-alive connections, does one GET on each (so every hop of the path
//!   is established), reports, then holds them until killed (or `--max-secs`).
//!
//! Plain blocking sockets and one OS thread per connection or worker: few moving parts,
//! and `nanosleep` with a 1 ns timer slack is far more precise than an async timer wheel.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::json;

/// The request every generator sends (keep-alive).
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: ambit-bench\r\n\r\n";
/// The same, asking the server to close after the response.
const REQUEST_CLOSE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: ambit-bench\r\nConnection: close\r\n\r\n";
/// Bound on every connect, read and write, so no generator can hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses larger than this are refused (the benchmark server sends a few hundred bytes).
const MAX_RESPONSE: usize = 64 * 1024;

/// The generators.
#[derive(Debug, Subcommand)]
pub enum LoadCmd {
    /// Open-loop fixed-rate GETs over keep-alive connections; prints latency percentiles.
    FixedRate {
        #[arg(long)]
        to: SocketAddr,
        /// Total requests per second.
        #[arg(long)]
        rate: u32,
        /// Keep-alive connections sharing the rate.
        #[arg(long, default_value_t = 10)]
        conns: usize,
        #[arg(long)]
        secs: f64,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// New connections per second: connect, one GET, close.
    ConnRate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long)]
        secs: f64,
    },
    /// Opens and holds keep-alive connections; prints once they are all established.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
        /// Exit on its own after this long, in case nobody kills it.
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
}

/// Runs a generator and prints its JSON report.
pub fn run(cmd: LoadCmd) -> Result<()> {
    raise_nofile_limit();
    // Without this, every sleep may overshoot by the default 50 µs slack.
    let _ = nix::sys::prctl::set_timerslack(1);
    let report = match cmd {
        LoadCmd::FixedRate {
            to,
            rate,
            conns,
            secs,
            path,
        } => fixed_rate(to, rate, conns, secs, &path)?,
        LoadCmd::ConnRate { to, workers, secs } => conn_rate(to, workers, secs)?,
        LoadCmd::Hold {
            to,
            conns,
            max_secs,
        } => return hold(to, conns, max_secs),
    };
    println!("{report}");
    Ok(())
}

/// Raises the soft open-files limit to the hard one (holding 1,000 connections needs it).
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// One HTTP/1.1 keep-alive connection.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    fn connect(to: SocketAddr) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(HttpConn {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Sends `request` and reads one whole response; fails unless it is a 200.
    fn get(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(total) = response_len(&self.buf)?
                && self.buf.len() >= total
            {
                if !self.buf.starts_with(b"HTTP/1.1 200") {
                    return Err(io::Error::other("status is not 200"));
                }
                // No pipelining, so nothing may follow the response.
                self.buf.drain(..total);
                return Ok(());
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(io::Error::other("response too large"));
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The full length of the response at the start of `buf` (head plus `Content-Length`), once
/// the head is complete.
fn response_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(io::Error::other)?;
    let body = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .ok_or_else(|| io::Error::other("response without Content-Length"))?;
    Ok(Some(head_end + 4 + body))
}

/// Latency percentiles in microseconds, by nearest rank.
fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1e6
    };
    let mean = if samples.is_empty() {
        f64::NAN
    } else {
        samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6
    };
    json!({
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": at(1.0),
        "mean_us": mean,
    })
}

fn fixed_rate(
    to: SocketAddr,
    rate: u32,
    conns: usize,
    secs: f64,
    path: &str,
) -> Result<serde_json::Value> {
    if rate == 0 || conns == 0 || secs.is_nan() || secs <= 0.0 {
        bail!("rate, conns and secs must be positive");
    }
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace()) {
        bail!("the path must start with / and contain no spaces");
    }
    let request: Arc<[u8]> = if path == "/" {
        REQUEST.into()
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: ambit-bench\r\n\r\n")
            .into_bytes()
            .into()
    };
    // Connect everything first, so connection set-up is not part of any latency.
    let mut opened = Vec::with_capacity(conns);
    for _ in 0..conns {
        opened.push(HttpConn::connect(to).with_context(|| format!("connecting to {to}"))?);
    }
    let interval = Duration::from_secs_f64(conns as f64 / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let first = start + interval.mul_f64(i as f64 / conns as f64);
            let request = request.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut late = 0u64;
                let mut first_error: Option<String> = None;
                let mut scheduled = first;
                let mut prev_done = start;
                while scheduled < end {
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    let sent = Instant::now();
                    let busy = prev_done > scheduled;
                    late += u64::from(busy);
                    let from = if busy { scheduled } else { sent };
                    match conn.get(&request) {
                        Ok(()) => latencies.push(from.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            // Reconnect (bounded by IO_TIMEOUT); a failure is retried at the
                            // next scheduled time.
                            if let Ok(c) = HttpConn::connect(to) {
                                conn = c;
                            }
                        }
                    }
                    prev_done = Instant::now();
                    scheduled += interval;
                }
                (latencies, errors, late, first_error)
            })
        })
        .collect();
    let mut all = Vec::new();
    let (mut errors, mut late) = (0u64, 0u64);
    let mut first_error = None;
    for t in threads {
        let (l, e, lt, f) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        all.extend(l);
        errors += e;
        late += lt;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let requests = all.len();
    let mut report = percentiles(all);
    report["requests"] = json!(requests);
    report["errors"] = json!(errors);
    report["late"] = json!(late);
    report["first_error"] = json!(first_error);
    report["achieved_rps"] = json!(requests as f64 / elapsed);
    Ok(report)
}

fn conn_rate(to: SocketAddr, workers: usize, secs: f64) -> Result<serde_json::Value> {
    if workers == 0 || secs.is_nan() || secs <= 0.0 {
        bail!("workers and secs must be positive");
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let once = HttpConn::connect(to).and_then(|mut c| {
                        c.get(REQUEST_CLOSE)?;
                        // The server closes; wait for it so the next connection does not race
                        // this one's teardown.
                        let mut rest = [0u8; 64];
                        while c.stream.read(&mut rest)? > 0 {}
                        Ok(())
                    });
                    match once {
                        Ok(()) => latencies.push(t0.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            // Do not spin on a persistent failure.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for t in threads {
        let (l, e, f) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        all.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let conns = all.len();
    let mut report = percentiles(all);
    report["conns"] = json!(conns);
    report["errors"] = json!(errors);
    report["first_error"] = json!(first_error);
    report["conns_per_sec"] = json!(conns as f64 / elapsed);
    Ok(report)
}

fn hold(to: SocketAddr, conns: usize, max_secs: u64) -> Result<()> {
    const OPENERS: usize = 4;
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let threads: Vec<_> = (0..OPENERS)
        .map(|i| {
            let n = conns / OPENERS + usize::from(i < conns % OPENERS);
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(n);
                let mut errors = 0u64;
                for _ in 0..n {
                    match HttpConn::connect(to).and_then(|mut c| c.get(REQUEST).map(|()| c)) {
                        Ok(c) => held.push(c),
                        Err(_) => errors += 1,
                    }
                }
                (held, errors)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(conns);
    let mut errors = 0u64;
    for t in threads {
        let (h, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("an opener thread panicked"))?;
        held.extend(h);
        errors += e;
    }
    println!("{}", json!({ "held": held.len(), "errors": errors }));
    io::stdout().flush()?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_response_length() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(response_len(r).expect("valid"), Some(r.len()));
        assert_eq!(
            response_len(b"HTTP/1.1 200 OK\r\nContent-Le").expect("partial"),
            None
        );
        assert!(response_len(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples = (1..=100).map(Duration::from_micros).collect();
        let p = percentiles(samples);
        assert_eq!(p["p50_us"].as_f64(), Some(50.0));
        assert_eq!(p["p99_us"].as_f64(), Some(99.0));
        assert_eq!(p["max_us"].as_f64(), Some(100.0));
    }
}
