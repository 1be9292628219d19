//! The L4 suite: pod to pod across two nodes, for every contender.
//!
//! | scenario | tool | figures |
//! |---|---|---|
//! | `throughput` | `iperf3`, one stream | Gbit/s; proxy CPU s per GB |
//! | `latency` | `ambit-bench load fixed-rate` (open loop) | p50/p90/p99 at 1,000 rps |
//! | `saturation` | `wrk` | req/s; p50/p90/p99; proxy CPU s per 1,000 requests |
//! | `connrate` | `ambit-bench load conn-rate` | new connections/s; proxy CPU per 1,000 |
//! | `memory` | `ambit-bench load hold` | proxy RSS idle, with 1,000 open connections, and (ztunnel) with 10,000 workloads in config |

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use harness::config::{AMBIENT, DATAPLANE_MODE, Labels, Workload};
use harness::ztunnel::{field, message};
use serde_json::Value;

use crate::model::{Better, Kind, Metric, Sample, Scenario};
use crate::procfs;
use crate::tools;
use crate::topology::Bench;

/// Knobs of the L4 suite.
#[derive(Debug, Clone)]
pub struct L4Settings {
    /// Seconds per measured run.
    pub secs: u64,
    /// Total request rate of the fixed-rate latency run.
    pub rate: u32,
    /// Keep-alive connections sharing that rate.
    pub rate_conns: usize,
    /// wrk threads and connections for the saturation run.
    pub wrk_threads: usize,
    pub wrk_conns: usize,
    /// Concurrent connect/request/close loops for the connection-rate run.
    pub conn_workers: usize,
    /// Connections held open for the memory figure.
    pub hold_conns: usize,
    /// Workloads added to the config for the memory figure.
    pub fake_workloads: usize,
    /// Pause after (re)starting a proxy or changing its load, before reading its memory.
    pub settle: Duration,
}

/// The scenarios, in run order.
pub fn scenarios(s: &L4Settings) -> Vec<Box<dyn Scenario<Bench>>> {
    vec![
        Box::new(Throughput(s.clone())),
        Box::new(FixedRate(s.clone())),
        Box::new(Saturation(s.clone())),
        Box::new(ConnRate(s.clone())),
        Box::new(Memory(s.clone())),
    ]
}

pub const SCENARIO_IDS: [&str; 5] = ["throughput", "latency", "saturation", "connrate", "memory"];

const fn metric(
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    decimals: usize,
) -> Metric {
    Metric {
        id,
        label,
        unit,
        better,
        decimals,
    }
}

/// Runs `f` and returns its result with the CPU seconds the proxy processes of `kind` used
/// meanwhile (`None` for direct, which has none).
fn with_proxy_cpu<T>(
    bench: &Bench,
    kind: Kind,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<f64>)> {
    let pids = bench.proxy_pids(kind)?;
    let before = procfs::cpu_seconds_all(&pids)?;
    let out = f()?;
    let after = procfs::cpu_seconds_all(&pids)?;
    Ok((out, (!pids.is_empty()).then_some(after - before)))
}

// --- throughput ---

struct Throughput(L4Settings);

impl Scenario<Bench> for Throughput {
    fn applies_to(&self, kind: Kind) -> bool {
        // The relay floor is only of interest where latency is.
        kind != Kind::Relay
    }
    fn id(&self) -> &'static str {
        "throughput"
    }
    fn title(&self) -> String {
        "Single-stream bulk throughput".into()
    }
    fn method(&self) -> String {
        format!(
            "`iperf3 -s -p 5201` in the destination pod; in the source pod `iperf3 {}` (one \
             stream, source → destination, receiver's figure). CPU: `utime+stime` of both \
             proxy processes over the run, divided by the GB (10^9 bytes) received.",
            tools::iperf3_args(([10, 0, 0, 1], 5201).into(), self.0.secs)
                .join(" ")
                .replace("10.0.0.1", "<dst>")
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("gbps", "throughput", "Gbit/s", Better::Higher, 2),
            metric(
                "cpu_per_gb",
                "proxy CPU per GB",
                "CPU s/GB",
                Better::Lower,
                3,
            ),
        ]
    }
    fn run_once(&self, bench: &mut Bench, kind: Kind) -> Result<Sample> {
        let c = bench.contender(kind)?;
        let (r, cpu) = with_proxy_cpu(bench, kind, || {
            tools::iperf3(&c.client, c.iperf, self.0.secs)
        })?;
        let mut s = Sample::default();
        s.set("gbps", r.bits_per_second / 1e9);
        if let Some(cpu) = cpu {
            ensure!(r.bytes > 0.0, "iperf3 moved no bytes");
            s.set("cpu_per_gb", cpu / (r.bytes / 1e9));
        }
        Ok(s)
    }
}

// --- fixed-rate latency ---

struct FixedRate(L4Settings);

impl FixedRate {
    fn args(&self, to: &str) -> Vec<String> {
        vec![
            "fixed-rate".into(),
            "--to".into(),
            to.into(),
            "--rate".into(),
            self.0.rate.to_string(),
            "--conns".into(),
            self.0.rate_conns.to_string(),
            "--secs".into(),
            self.0.secs.to_string(),
        ]
    }
}

impl Scenario<Bench> for FixedRate {
    fn id(&self) -> &'static str {
        "latency"
    }
    fn title(&self) -> String {
        format!(
            "Request/response latency at a fixed {} rps",
            thousands(f64::from(self.0.rate))
        )
    }
    fn method(&self) -> String {
        format!(
            "nginx (one process, `return 200`, 23-byte body) in the destination pod; in the \
             source pod `ambit-bench load {}`: an open-loop HTTP/1.1 client, each of the \
             keep-alive connections on its own evenly spaced schedule; latency is counted from \
             the scheduled send time whenever the previous response was late (no coordinated \
             omission). `relay` is not a competitor but the floor: an HAProxy pair in plain \
             TCP mode (no TLS) puts the same two extra processes in the path, so what it adds \
             is what the hops alone cost here.",
            self.args("<dst>:80").join(" ")
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("p50_us", "p50", "µs", Better::Lower, 0),
            metric("p90_us", "p90", "µs", Better::Lower, 0),
            metric("p99_us", "p99", "µs", Better::Lower, 0),
        ]
    }
    fn run_once(&self, bench: &mut Bench, kind: Kind) -> Result<Sample> {
        let c = bench.contender(kind)?;
        let v = tools::load(
            &c.client,
            &self.args(&c.http.to_string()),
            self.0.secs as f64,
        )?;
        let mut s = Sample::default();
        for id in ["p50_us", "p90_us", "p99_us"] {
            s.set(id, num(&v, id)?);
        }
        let errors = num(&v, "errors")?;
        let achieved = num(&v, "achieved_rps")?;
        if errors > 0.0 {
            s.note(format!(
                "{errors} failed requests (first: {})",
                v["first_error"].as_str().unwrap_or("?")
            ));
        }
        if achieved < 0.95 * f64::from(self.0.rate) {
            s.note(format!("achieved only {achieved:.0} rps"));
        }
        Ok(s)
    }
}

// --- saturation ---

struct Saturation(L4Settings);

impl Scenario<Bench> for Saturation {
    fn applies_to(&self, kind: Kind) -> bool {
        // The relay floor is only of interest where latency is.
        kind != Kind::Relay
    }
    fn id(&self) -> &'static str {
        "saturation"
    }
    fn title(&self) -> String {
        "Request/response at saturation".into()
    }
    fn method(&self) -> String {
        format!(
            "the same nginx; in the source pod `wrk {}` (closed loop, as fast as it goes). \
             CPU: both proxy processes over the run, per 1,000 requests completed.",
            tools::wrk_args(
                ([10, 0, 0, 1], 80).into(),
                self.0.wrk_threads,
                self.0.wrk_conns,
                self.0.secs
            )
            .join(" ")
            .replace("10.0.0.1:80", "<dst>:80")
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("rps", "requests/s", "req/s", Better::Higher, 0),
            metric("p50_us", "p50", "µs", Better::Lower, 0),
            metric("p90_us", "p90", "µs", Better::Lower, 0),
            metric("p99_us", "p99", "µs", Better::Lower, 0),
            metric(
                "cpu_per_1k",
                "proxy CPU per 1,000 requests",
                "CPU s",
                Better::Lower,
                4,
            ),
        ]
    }
    fn run_once(&self, bench: &mut Bench, kind: Kind) -> Result<Sample> {
        let c = bench.contender(kind)?;
        let s8 = &self.0;
        let (w, cpu) = with_proxy_cpu(bench, kind, || {
            tools::wrk(&c.client, c.http, s8.wrk_threads, s8.wrk_conns, s8.secs)
        })?;
        let mut s = Sample::default();
        s.set("rps", w.rps);
        s.set("p50_us", w.p50_us);
        s.set("p90_us", w.p90_us);
        s.set("p99_us", w.p99_us);
        if let Some(cpu) = cpu {
            s.set("cpu_per_1k", cpu / w.requests * 1000.0);
        }
        if let Some(e) = w.errors {
            s.note(e);
        }
        Ok(s)
    }
}

// --- connection rate ---

struct ConnRate(L4Settings);

impl ConnRate {
    fn args(&self, to: &str) -> Vec<String> {
        vec![
            "conn-rate".into(),
            "--to".into(),
            to.into(),
            "--workers".into(),
            self.0.conn_workers.to_string(),
            "--secs".into(),
            self.0.secs.to_string(),
        ]
    }
}

impl Scenario<Bench> for ConnRate {
    fn applies_to(&self, kind: Kind) -> bool {
        // The relay floor is only of interest where latency is.
        kind != Kind::Relay
    }
    fn id(&self) -> &'static str {
        "connrate"
    }
    fn title(&self) -> String {
        "New connections per second".into()
    }
    fn method(&self) -> String {
        format!(
            "in the source pod `ambit-bench load {}`: each worker loops connect → `GET /` with \
             `Connection: close` → read to EOF. CPU: both proxy processes, per 1,000 \
             connections.",
            self.args("<dst>:80").join(" ")
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("cps", "connections/s", "conn/s", Better::Higher, 0),
            metric(
                "cpu_per_1k",
                "proxy CPU per 1,000 connections",
                "CPU s",
                Better::Lower,
                3,
            ),
        ]
    }
    fn run_once(&self, bench: &mut Bench, kind: Kind) -> Result<Sample> {
        let c = bench.contender(kind)?;
        let (v, cpu) = with_proxy_cpu(bench, kind, || {
            tools::load(
                &c.client,
                &self.args(&c.http.to_string()),
                self.0.secs as f64,
            )
        })?;
        let conns = num(&v, "conns")?;
        ensure!(conns > 0.0, "no connection succeeded: {v}");
        let mut s = Sample::default();
        s.set("cps", num(&v, "conns_per_sec")?);
        if let Some(cpu) = cpu {
            s.set("cpu_per_1k", cpu / conns * 1000.0);
        }
        let errors = num(&v, "errors")?;
        if errors > 0.0 {
            s.note(format!(
                "{errors} failed connections (first: {})",
                v["first_error"].as_str().unwrap_or("?")
            ));
        }
        Ok(s)
    }
}

// --- memory ---

struct Memory(L4Settings);

const MB: f64 = 1e6;

impl Memory {
    /// Resident memory of the larger of the contender's two proxy processes, in MB.
    fn rss_mb(bench: &Bench, kind: Kind) -> Result<f64> {
        let pids = bench.proxy_pids(kind)?;
        let mut max = 0u64;
        for p in pids {
            max = max.max(procfs::rss_bytes(p)?);
        }
        Ok(max as f64 / MB)
    }

    fn restart(bench: &mut Bench, kind: Kind) -> Result<()> {
        match kind {
            Kind::Ztunnel => bench.restart_ztunnels(),
            _ => bench
                .contender_mut(kind)?
                .pair
                .as_mut()
                .context("no tunnel pair to restart")?
                .restart(),
        }
    }

    /// Holds `hold_conns` connections open through the contender and reads the memory.
    fn rss_with_open_conns(&self, bench: &Bench, kind: Kind) -> Result<f64> {
        let c = bench.contender(kind)?;
        let exe = std::env::current_exe().context("locating ambit-bench")?;
        let mut cmd = c.client.command(exe);
        cmd.args([
            "load",
            "hold",
            "--to",
            &c.http.to_string(),
            "--conns",
            &self.0.hold_conns.to_string(),
        ]);
        let hold = c.client.spawn(&mut cmd)?;
        let line = hold.wait_for_line(Duration::from_secs(60), |l| l.contains("\"held\""))?;
        let v: Value = serde_json::from_str(&line).context("hold report")?;
        let held = num(&v, "held")?;
        ensure!(
            held as usize == self.0.hold_conns,
            "only {held} of {} connections could be opened: {line}",
            self.0.hold_conns
        );
        std::thread::sleep(self.0.settle);
        let rss = Self::rss_mb(bench, kind);
        drop(hold);
        rss
    }

    /// Adds `fake_workloads` workloads on fake nodes, waits until both ztunnels reloaded,
    /// reads the memory, and restores the config.
    fn rss_with_big_config(&self, bench: &Bench) -> Result<f64> {
        let n = self.0.fake_workloads;
        let cursors: Vec<usize> = bench.ztunnels.iter().map(|z| z.log_cursor()).collect();
        bench.cluster.edit_config(|c| add_fake_workloads(c, n));
        bench.cluster.write_config()?;
        let wait = |cursors: &[usize], pred: &dyn Fn(u64) -> bool| -> Result<()> {
            for (zt, &cur) in bench.ztunnels.iter().zip(cursors) {
                zt.wait_for_log_since(cur, Duration::from_secs(60), |v| {
                    message(v) == Some("config reloaded")
                        && field(v, "workloads")
                            .and_then(Value::as_u64)
                            .is_some_and(pred)
                })?;
            }
            Ok(())
        };
        let measured = wait(&cursors, &|w| w >= n as u64).and_then(|()| {
            std::thread::sleep(self.0.settle);
            Self::rss_mb(bench, Kind::Ztunnel)
        });
        let cursors: Vec<usize> = bench.ztunnels.iter().map(|z| z.log_cursor()).collect();
        bench.cluster.edit_config(remove_fake_workloads);
        bench.cluster.write_config()?;
        wait(&cursors, &|w| w < n as u64)?;
        measured
    }
}

impl Scenario<Bench> for Memory {
    fn id(&self) -> &'static str {
        "memory"
    }
    fn title(&self) -> String {
        "Proxy resident memory (larger of the two sides)".into()
    }
    fn method(&self) -> String {
        format!(
            "`VmRSS` of the larger of the two proxy processes (MB = 10^6 bytes), each run on \
             freshly restarted proxies: idle ({settle:?} after start); with {hold} connections \
             held open through the pair (`ambit-bench load hold --to <dst>:80 --conns {hold}`, \
             one request each, then idle); ztunnel only: after adding {fake} workloads (on 100 \
             other nodes, half in ambient namespaces) to the config and waiting for both \
             ztunnels' `config reloaded` log line (then the config is restored and ztunnel \
             restarted before the open-connections figure).",
            settle = self.0.settle,
            hold = self.0.hold_conns,
            fake = thousands(self.0.fake_workloads as f64),
        )
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            metric("idle_mb", "idle", "MB", Better::Lower, 1),
            metric("conns_mb", "1,000 open connections", "MB", Better::Lower, 1),
            metric(
                "workloads_mb",
                "10,000 workloads in config",
                "MB",
                Better::Lower,
                1,
            ),
        ]
    }
    fn applies_to(&self, kind: Kind) -> bool {
        kind.has_proxy() && kind != Kind::Relay
    }
    fn run_once(&self, bench: &mut Bench, kind: Kind) -> Result<Sample> {
        let mut s = Sample::default();
        Self::restart(bench, kind)?;
        std::thread::sleep(self.0.settle);
        s.set("idle_mb", Self::rss_mb(bench, kind)?);
        if kind == Kind::Ztunnel {
            s.set("workloads_mb", self.rss_with_big_config(bench)?);
            Self::restart(bench, kind)?;
            std::thread::sleep(self.0.settle);
        }
        s.set("conns_mb", self.rss_with_open_conns(bench, kind)?);
        Ok(s)
    }
}

const FAKE_NODE_PREFIX: &str = "fake-node-";
const FAKE_NS_PREFIX: &str = "fake-ns-";

/// Appends `n` workloads on 100 fake nodes across 20 fake namespaces (every other one
/// ambient), with unique IPs in 172.16.0.0/12.
fn add_fake_workloads(c: &mut harness::Config, n: usize) {
    for ns in 0..20 {
        let labels: Labels = if ns % 2 == 0 {
            [(DATAPLANE_MODE.to_string(), AMBIENT.to_string())].into()
        } else {
            Labels::new()
        };
        c.namespace_mut(&format!("{FAKE_NS_PREFIX}{ns}")).labels = labels;
    }
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + i as u32);
        c.workloads.push(Workload {
            name: format!("wl-{i}"),
            namespace: format!("{FAKE_NS_PREFIX}{}", i % 20),
            service_account: format!("sa-{}", i % 50),
            ips: vec![IpAddr::V4(ip)],
            node: format!("{FAKE_NODE_PREFIX}{}", i % 100),
            labels: [("app".to_string(), format!("app-{}", i % 200))].into(),
        });
    }
}

fn remove_fake_workloads(c: &mut harness::Config) {
    c.workloads
        .retain(|w| !w.node.starts_with(FAKE_NODE_PREFIX));
    c.namespaces.retain(|n| !n.name.starts_with(FAKE_NS_PREFIX));
}

fn num(v: &Value, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number {key:?} in {v}"))
}

/// `1000` → `1,000`.
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(10000.0), "10,000");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }

    #[test]
    fn fake_workloads_round_trip() {
        let mut c = harness::Config::new("cluster.local");
        c.namespace_mut("mesh");
        add_fake_workloads(&mut c, 10_000);
        assert_eq!(c.workloads.len(), 10_000);
        let ips: std::collections::BTreeSet<_> = c.workloads.iter().map(|w| w.ips[0]).collect();
        assert_eq!(ips.len(), 10_000);
        assert_eq!(c.namespaces.len(), 21);
        remove_fake_workloads(&mut c);
        assert!(c.workloads.is_empty());
        assert_eq!(c.namespaces.len(), 1);
    }
}
