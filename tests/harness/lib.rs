//! Ambit's simulated-cluster harness.
//!
//! End-to-end tests build a real topology out of network namespaces, run the
//! real binaries inside it, and tear everything down again, even when the
//! test panics. The layout mirrors a Kubernetes cluster (see "The simulated
//! cluster" in the design brief):
//!
//! ```text
//!  cluster netns  amb<pid>-<n>-c     br0 (10.S.0.254/24)
//!        │ veth
//!  node netns     amb<pid>-<n>-n-<node>   eth0 10.S.0.(i+1)/24, cbr0 10.S.(i+1).1/24
//!        │ veth
//!  pod netns      amb<pid>-<n>-p-<ns>_<pod>  eth0 10.S.(i+1).k/24, default via cbr0
//! ```
//!
//! Every cluster owns a `/16` (`10.S.0.0/16`, `S` in `100..=199`) reserved
//! with an flock, a private cgroup2 mount with one directory per node and pod,
//! a private bpffs with one pin directory per node, and a state directory
//! under `/run/ambit-tests/<id>/` for config, CA, logs and captures.
//!
//! ```no_run
//! use std::time::Duration;
//! use harness::{Cluster, PodSpec};
//!
//! # fn main() -> anyhow::Result<()> {
//! harness::skip_or_fail!(Ok(()));
//! let cluster = Cluster::new()?;
//! let a = cluster.add_node("node-a")?;
//! let b = cluster.add_node("node-b")?;
//! let client = cluster.add_pod(&a, PodSpec::new("client"))?;
//! let server = cluster.add_pod(&b, PodSpec::new("server"))?;
//! let _app = server.spawn_testapp(&["http", "--listen", "0.0.0.0:8080", "--name", "server"])?;
//! let out = client.run_ok(
//!     client.command("curl").args(["-sS", &format!("http://{}:8080/", server.ip())]),
//!     Duration::from_secs(10),
//! )?;
//! assert_eq!(out, "hello from server\n");
//! # Ok(())
//! # }
//! ```
//!
//! Modules:
//! - [`skip`]: privilege checks and [`skip_or_fail!`].
//! - [`netns`]: named network namespaces and `ip` invocations.
//! - [`cluster`]: [`Cluster`], [`Node`], [`Pod`], subnet slots, clean-up.
//! - [`process`]: [`Proc`], output capture, bounded runs.
//! - [`ztunnel`]: the [`Ztunnel`] handle and its JSON logs.
//! - [`config`]: the typed YAML config that ztunnel reads.
//! - [`capture`]: tcpdump captures and pcap helpers.
//! - [`fake_apiserver`]: a fake Kubernetes API server (list/watch) for the Kubernetes
//!   config source.
//! - [`token_review`]: a fake API server (TokenReview, pods by node) for the signer.
//! - [`waypoint`]: a waypoint process in a pod, its metrics and its memory.

pub mod capture;
pub mod cgroup;
pub mod cluster;
pub mod config;
pub mod fake_apiserver;
pub mod netns;
pub mod process;
pub mod skip;
pub mod token_review;
pub mod waypoint;
pub mod ztunnel;

mod sys;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub use capture::{Capture, pcap_contains, pcap_text, tcp_ports_seen};
pub use cluster::{Cluster, Footprint, IpFamilies, Node, Pod, PodSpec};
pub use config::Config;
pub use fake_apiserver::FakeApiServer;
pub use process::{OutputLine, Proc, Stream};
pub use skip::{Unavailable, require_privileges};
pub use ztunnel::{Ztunnel, ZtunnelOpts};

/// Root of all harness state on this machine; each cluster gets a
/// subdirectory, and `slots/` holds the subnet locks.
pub const STATE_ROOT: &str = "/run/ambit-tests";

/// Polls `cond` until it returns true, or fails once `timeout` has passed.
///
/// The poll interval starts at 5 ms and backs off to 100 ms, so fast
/// conditions are seen quickly without spinning on slow ones.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_for(timeout, || cond().then_some(()))
        .map_err(|_| anyhow::anyhow!("condition not met within {timeout:?}"))
}

/// Polls `f` until it returns `Some`, or fails once `timeout` has passed.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// Locates a binary built by this workspace.
///
/// The env var `AMBIT_<NAME>_BIN` wins (`ztunnel` → `AMBIT_ZTUNNEL_BIN`,
/// `ambit-testapp` → `AMBIT_TESTAPP_BIN`). Otherwise the binary is looked up
/// next to the running executable: test executables live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let var = bin_env_var(name);
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{var}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let mut dir = exe
        .parent()
        .context("current executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if candidate.is_file() {
        return Ok(candidate);
    }
    let package = match name {
        "ztunnel" => "ambit-ztunnel",
        "waypoint" => "ambit-waypoint",
        "ambit-testapp" => "ambit-tests",
        other => other,
    };
    bail!(
        "binary {name:?} not found at {} (build it with `cargo build -p {package}` using the same profile, \
         or point {var} at it)",
        candidate.display()
    )
}

fn bin_env_var(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let stem = upper.strip_prefix("AMBIT_").unwrap_or(&upper);
    format!("AMBIT_{stem}_BIN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names() {
        assert_eq!(bin_env_var("ztunnel"), "AMBIT_ZTUNNEL_BIN");
        assert_eq!(bin_env_var("ambit-testapp"), "AMBIT_TESTAPP_BIN");
    }

    #[test]
    fn wait_until_times_out() {
        let start = Instant::now();
        assert!(wait_until(Duration::from_millis(50), || false).is_err());
        assert!(start.elapsed() >= Duration::from_millis(50));
        let mut n = 0;
        wait_until(Duration::from_secs(5), || {
            n += 1;
            n > 3
        })
        .expect("condition becomes true on the fourth poll");
    }
}
