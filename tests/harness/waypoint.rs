//! The waypoint as a process in a pod of a simulated cluster: started with the cluster's
//! config and CA, JSON logs, and waited for until it says it is ready; plus the two things
//! tests ask of a running waypoint, its metrics and its memory.

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::cluster::{Cluster, Pod};
use crate::process::Proc;
use crate::ztunnel::message;

/// How long a waypoint may take to say it is ready.
const READY: Duration = Duration::from_secs(30);

/// Starts `waypoint run` in `pod` as waypoint `name` of `namespace`, with `extra` flags
/// appended (the last occurrence of a flag wins), and waits for "waypoint ready".
pub fn spawn_waypoint(
    cluster: &Cluster,
    pod: &Pod,
    name: &str,
    namespace: &str,
    extra: &[&str],
) -> Result<Proc> {
    let mut cmd = pod.command(crate::bin_path("waypoint")?);
    cmd.arg("run")
        .arg("--config")
        .arg(cluster.config_path())
        .args(["--name", name, "--namespace", namespace])
        .arg("--ca-dir")
        .arg(cluster.ca_dir())
        .args(["--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let waypoint = pod.spawn(&mut cmd)?;
    waypoint
        .log()
        .wait_for(0, READY, |l| {
            l.json.as_ref().and_then(message) == Some("waypoint ready")
        })
        .with_context(|| format!("waypoint did not start:\n{}", waypoint.log().tail(30)))?;
    Ok(waypoint)
}

/// The waypoint's `/metrics` (port 15020), scraped from inside its pod.
pub fn scrape(pod: &Pod) -> Result<String> {
    pod.run_ok(
        pod.command("curl")
            .args(["-sS", "-m", "20", "http://127.0.0.1:15020/metrics"]),
        Duration::from_secs(30),
    )
    .context("scraping the waypoint")
}

/// The value of the first sample of `metrics` whose line starts with `series` (a name with
/// its labels, e.g. `ambit_waypoint_overload_in_flight{resource="requests"}`); 0 if none.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Resident memory of process `pid`, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}
