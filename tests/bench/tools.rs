//! Running the client tools inside a pod and reading their results: `iperf3 -J`, `wrk
//! --latency`, and this binary's own `load` generators (JSON on stdout).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use harness::Pod;
use serde_json::Value;

/// Slack on top of a run's own duration before it is killed.
const SLACK: Duration = Duration::from_secs(30);

/// The `iperf3` command line for a single-stream run of `secs` seconds to `to`.
pub fn iperf3_args(to: SocketAddr, secs: u64) -> Vec<String> {
    vec![
        "-c".into(),
        to.ip().to_string(),
        "-p".into(),
        to.port().to_string(),
        "-P".into(),
        "1".into(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ]
}

/// What one iperf3 run measured at the receiver.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    pub bits_per_second: f64,
    pub bytes: f64,
}

pub fn iperf3(pod: &Pod, to: SocketAddr, secs: u64) -> Result<Iperf> {
    let out = pod.run(
        pod.command("iperf3").args(iperf3_args(to, secs)),
        Duration::from_secs(secs) + SLACK,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    parse_iperf3(&v)
}

fn parse_iperf3(v: &Value) -> Result<Iperf> {
    let recv = &v["end"]["sum_received"];
    let bits_per_second = recv["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")?;
    let bytes = recv["bytes"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bytes")?;
    Ok(Iperf {
        bits_per_second,
        bytes,
    })
}

/// The `wrk` command line: `threads` threads, `conns` keep-alive connections, `secs`
/// seconds, latency distribution on.
pub fn wrk_args(to: SocketAddr, threads: usize, conns: usize, secs: u64) -> Vec<String> {
    vec![
        "-t".into(),
        threads.to_string(),
        "-c".into(),
        conns.to_string(),
        "-d".into(),
        format!("{secs}s"),
        "--timeout".into(),
        "5s".into(),
        "--latency".into(),
        format!("http://{to}/"),
    ]
}

/// What one wrk run reported.
#[derive(Debug, Clone, Default)]
pub struct Wrk {
    pub requests: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Socket errors and non-2xx responses, if any.
    pub errors: Option<String>,
}

pub fn wrk(pod: &Pod, to: SocketAddr, threads: usize, conns: usize, secs: u64) -> Result<Wrk> {
    let out = pod.run(
        pod.command("wrk").args(wrk_args(to, threads, conns, secs)),
        Duration::from_secs(secs) + SLACK,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

pub fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => w.p50_us = duration_us(v)?,
            (Some("90%"), Some(v)) => w.p90_us = duration_us(v)?,
            (Some("99%"), Some(v)) => w.p99_us = duration_us(v)?,
            (Some("Requests/sec:"), Some(v)) => w.rps = v.parse().context("Requests/sec")?,
            (Some(n), Some("requests")) => w.requests = n.parse().context("requests")?,
            (Some("Socket"), Some("errors:")) | (Some("Non-2xx"), _) => {
                errors.push(line.to_string())
            }
            _ => {}
        }
    }
    ensure!(
        w.requests > 0.0 && w.rps > 0.0 && w.p50_us > 0.0,
        "no requests or latency"
    );
    if !errors.is_empty() {
        w.errors = Some(errors.join("; "));
    }
    Ok(w)
}

/// wrk's durations: `812.00us`, `1.21ms`, `2.00s`.
fn duration_us(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {v:?}"))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad number in {v:?}"))?;
    Ok(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        other => bail!("unknown unit {other:?} in {v:?}"),
    })
}

/// `ambit-bench load <args>` in `pod`; returns the JSON it prints last.
pub fn load(pod: &Pod, args: &[String], secs: f64) -> Result<Value> {
    let exe = std::env::current_exe().context("locating ambit-bench")?;
    let mut cmd = pod.command(exe);
    cmd.arg("load").args(args);
    let out = pod.run(&mut cmd, Duration::from_secs_f64(secs) + SLACK)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let v: Value = serde_json::from_str(last).with_context(|| {
        format!(
            "ambit-bench load {} printed no JSON ({}): {stdout} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 5s test @ http://10.1.2.3:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.50us  101.00us   3.00ms   90.00%
    Req/Sec    39.00k     1.00k   41.00k    80.00%
  Latency Distribution
     50%  800.00us
     75%  850.00us
     90%  1.10ms
     99%  2.00s
  195000 requests in 5.00s, 40.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 0
Requests/sec:  38999.50
Transfer/sec:      8.00MB
";
        let w = parse_wrk(text).expect("parses");
        assert_eq!(w.requests, 195000.0);
        assert_eq!(w.rps, 38999.5);
        assert_eq!(w.p50_us, 800.0);
        assert_eq!(w.p90_us, 1100.0);
        assert_eq!(w.p99_us, 2e6);
        assert!(w.errors.expect("errors").contains("read 1"));
    }

    #[test]
    fn parses_iperf3() {
        let v: Value = serde_json::from_str(
            r#"{"end":{"sum_received":{"bytes":5000000000,"bits_per_second":8.0e9}}}"#,
        )
        .expect("json");
        let r = parse_iperf3(&v).expect("parses");
        assert_eq!(r.bits_per_second, 8.0e9);
        assert_eq!(r.bytes, 5e9);
    }
}
