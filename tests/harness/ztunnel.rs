//! Running the real `ztunnel` binary on a node, and reading its JSON logs.
//!
//! `ztunnel run` is started in the node netns with the cluster's config and
//! CA, the node's cgroup subtree and bpffs pin directory, and
//! `--log-format json`. Both output streams are parsed into JSON values
//! (tracing-subscriber's format: `{"timestamp", "level", "fields":
//! {"message", …}, "target", "span"}`) and teed to
//! `<cluster>/logs/ztunnel-<node>.<n>.log`, so tests assert on log records
//! instead of sleeping. Access logs have target `access` and fields such as
//! `src.addr`, `src.identity`, `dst.addr`, `dst.identity`, `direction`,
//! `bytes_sent`, `bytes_recv`, `duration_ms` and `error`.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::cluster::Node;
use crate::process::{OutputLine, OutputLog, Proc};

/// How long a graceful stop (SIGTERM) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How to start ztunnel. `Default` is `RUST_LOG=info` and the CLI's own
/// defaults for everything else.
#[derive(Debug, Clone)]
pub struct ZtunnelOpts {
    /// `RUST_LOG` (default `info`).
    pub rust_log: String,
    /// `--cert-ttl`, e.g. `"24h"` or `"30s"` (default: ztunnel's own).
    pub cert_ttl: Option<String>,
    /// `--admin-addr`, e.g. `127.0.0.1:15000` in the node netns.
    pub admin_addr: Option<String>,
    /// More arguments after the standard ones.
    pub extra_args: Vec<String>,
    /// More environment variables.
    pub env: Vec<(String, String)>,
    /// The binary; default [`crate::bin_path`]`("ztunnel")`.
    pub binary: Option<PathBuf>,
    /// Open-files limit (soft and hard, so ztunnel cannot raise it), set with `prlimit`.
    pub nofile: Option<u64>,
}

/// A ztunnel running on a node; killed on drop. After a panic, drop prints
/// the tail of its log.
pub struct Ztunnel {
    node: Node,
    opts: ZtunnelOpts,
    binary: PathBuf,
    log: OutputLog,
    proc: Option<Proc>,
    /// Index of the first log line of the current run.
    run_start: usize,
}

// === impl ZtunnelOpts ===

impl Default for ZtunnelOpts {
    fn default() -> Self {
        ZtunnelOpts {
            rust_log: "info".into(),
            cert_ttl: None,
            admin_addr: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            binary: None,
            nofile: None,
        }
    }
}

impl ZtunnelOpts {
    /// Sets `RUST_LOG` (default `info`).
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// Sets `--cert-ttl` (default: ztunnel's, 24h).
    pub fn cert_ttl(mut self, ttl: impl Into<String>) -> Self {
        self.cert_ttl = Some(ttl.into());
        self
    }

    /// Sets `--admin-addr` (default: ztunnel's, `127.0.0.1:15000`).
    pub fn admin_addr(mut self, addr: impl Into<String>) -> Self {
        self.admin_addr = Some(addr.into());
        self
    }

    /// Appends a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs ztunnel with this open-files limit (soft and hard), e.g. to exhaust it in a
    /// test.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// Uses another binary (e.g. a stand-in script in harness tests).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }
}

// === impl Node (ztunnel) ===

impl Node {
    /// Starts ztunnel on this node. Writes the cluster config first if it
    /// has not been written yet; the CA must exist
    /// ([`Cluster::init_ca`](crate::Cluster::init_ca)).
    ///
    /// Returns as soon as the process is spawned: call
    /// [`Ztunnel::wait_ready`] before sending traffic.
    pub fn start_ztunnel(&self, opts: &ZtunnelOpts) -> Result<Ztunnel> {
        let cluster = self.cluster();
        if !cluster.config_path().exists() {
            cluster.write_config()?;
        }
        let ca = cluster.ca_dir();
        if !ca.is_dir() {
            bail!(
                "no CA at {}: call Cluster::init_ca(trust_domain) before starting ztunnel",
                ca.display()
            );
        }
        let binary = match &opts.binary {
            Some(b) => b.clone(),
            None => crate::bin_path("ztunnel")?,
        };
        let log_path = cluster.log_path(&format!("ztunnel-{}", self.name()));
        let log = OutputLog::new(Some(&log_path))?;
        let mut zt = Ztunnel {
            node: self.clone(),
            opts: opts.clone(),
            binary,
            log,
            proc: None,
            run_start: 0,
        };
        zt.spawn()?;
        Ok(zt)
    }
}

// === impl Ztunnel ===

impl Ztunnel {
    fn spawn(&mut self) -> Result<()> {
        let cluster = self.node.cluster();
        // prlimit sets the limit on itself and execs ztunnel, so the PID is ztunnel's.
        let mut cmd = match self.opts.nofile {
            Some(n) => {
                let mut c = self.node.command("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(&self.binary);
                c
            }
            None => self.node.command(&self.binary),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(cluster.config_path())
            .args(["--node", self.node.name()])
            .arg("--ca-dir")
            .arg(cluster.ca_dir())
            .arg("--cgroup")
            .arg(self.node.cgroup_dir())
            .arg("--bpffs")
            .arg(self.node.bpffs_dir())
            .args(["--log-format", "json"]);
        if let Some(ttl) = &self.opts.cert_ttl {
            cmd.args(["--cert-ttl", ttl]);
        }
        if let Some(addr) = &self.opts.admin_addr {
            cmd.args(["--admin-addr", addr]);
        }
        cmd.args(&self.opts.extra_args);
        cmd.env("RUST_LOG", &self.opts.rust_log);
        // Never colourise: escape codes would break JSON parsing.
        cmd.env("NO_COLOR", "1");
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        self.run_start = self.log.len();
        let name = format!("ztunnel-{}", self.node.name());
        let proc = Proc::spawn_with_log(&mut cmd, &name, self.log.clone())?;
        cluster.record_pid(proc.pid());
        self.proc = Some(proc);
        Ok(())
    }

    /// The node it runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The current process's PID, if running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The log file (all runs).
    pub fn log_path(&self) -> Option<PathBuf> {
        self.log.path()
    }

    /// A cursor for [`Ztunnel::wait_for_log_since`]: only lines logged after
    /// this call will match.
    pub fn log_cursor(&self) -> usize {
        self.log.len()
    }

    /// Waits for a JSON log line of the current run matching `pred` (lines
    /// already logged count), and returns it. On timeout, or if ztunnel
    /// exits, the error includes the last ~20 lines.
    pub fn wait_for_log(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let generation = self.log.generation();
        self.wait(self.run_start, timeout, |l| {
            l.generation == generation && l.json.as_ref().is_some_and(&mut pred)
        })
    }

    /// Like [`Ztunnel::wait_for_log`], but only lines logged after `cursor`
    /// (from [`Ztunnel::log_cursor`]) count, e.g. "the reload after I
    /// rewrote the config".
    pub fn wait_for_log_since(
        &self,
        cursor: usize,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        self.wait(cursor, timeout, |l| l.json.as_ref().is_some_and(&mut pred))
    }

    fn wait(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl FnMut(&OutputLine) -> bool,
    ) -> Result<Value> {
        let line = self.log.wait_for(from, timeout, pred).with_context(|| {
            format!(
                "waiting for a log line from ztunnel on {} (pid {:?})",
                self.node.name(),
                self.pid()
            )
        })?;
        line.json.context("matched line is JSON by construction")
    }

    /// Waits until ztunnel logs a message containing "ready".
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_for_log(timeout, |v| message(v).is_some_and(|m| m.contains("ready")))
            .map(|_| ())
    }

    /// The JSON log lines of the current run.
    pub fn logs(&self) -> Vec<Value> {
        let generation = self.log.generation();
        self.log
            .lines()
            .into_iter()
            .filter(|l| l.generation == generation)
            .filter_map(|l| l.json)
            .collect()
    }

    /// The access-log records (target `access`) of the current run.
    pub fn access_logs(&self) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v["target"] == "access")
            .collect()
    }

    /// Every captured line of every run, including non-JSON output such as
    /// panic messages.
    pub fn output(&self) -> Vec<OutputLine> {
        self.log.lines()
    }

    /// The last `n` lines, for messages.
    pub fn tail(&self, n: usize) -> String {
        self.log.tail(n)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc
            .as_mut()
            .is_some_and(|p| matches!(p.try_wait(), Ok(None)))
    }

    /// SIGKILLs ztunnel (a crash: nothing is cleaned up, pinned maps stay).
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// SIGTERMs ztunnel and waits for it to exit (SIGKILL after 5 s).
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        match self.proc.take() {
            Some(mut p) => p.stop(STOP_GRACE).map(Some),
            None => Ok(None),
        }
    }

    /// Stops ztunnel (if running) and starts it again with the same options.
    /// Logs of the new run are appended; [`Ztunnel::wait_for_log`] and
    /// [`Ztunnel::logs`] then see only the new run.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let file = self
                .log
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            eprintln!(
                "--- ztunnel on {} (log: {file}), last lines:\n{}",
                self.node.name(),
                self.log.tail(40)
            );
        }
        // The Proc's own drop SIGKILLs and reaps it.
    }
}

/// `fields.message` of a log record.
pub fn message(v: &Value) -> Option<&str> {
    v.get("fields")?.get("message")?.as_str()
}

/// A field of a log record: looked up in `fields` (where tracing puts
/// event fields such as `src.addr`), then in the enclosing spans (`span`, or
/// the `spans` list from the innermost out), then at the top level.
///
/// See also [`field_str`].
pub fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let spans = v.get("spans").and_then(Value::as_array);
    v.get("fields")
        .and_then(|f| f.get(key))
        .or_else(|| v.get("span").and_then(|s| s.get(key)))
        .or_else(|| spans.and_then(|l| l.iter().rev().find_map(|s| s.get(key))))
        .or_else(|| v.get(key))
}

/// A string field of a log record ([`field`]), or `""` when absent or not a string.
pub fn field_str<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key).and_then(Value::as_str).unwrap_or_default()
}

/// Runs the ztunnel CLI outside any namespace (e.g. `ca issue`) and returns its stdout.
pub fn cli(args: &[&str]) -> Result<String> {
    let bin = crate::bin_path("ztunnel")?;
    let out = crate::process::run(
        std::process::Command::new(&bin).args(args),
        std::time::Duration::from_secs(60),
    )?;
    if !out.status.success() {
        anyhow::bail!(
            "ztunnel {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        let v: Value = serde_json::from_str(
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"connection complete","src.addr":"10.1.1.2:5"},"target":"access","span":{"node":"a"}}"#,
        )
        .expect("valid JSON literal");
        assert_eq!(message(&v), Some("connection complete"));
        assert_eq!(
            field(&v, "src.addr").and_then(Value::as_str),
            Some("10.1.1.2:5")
        );
        assert_eq!(field(&v, "node").and_then(Value::as_str), Some("a"));
        assert_eq!(field(&v, "level").and_then(Value::as_str), Some("INFO"));
        assert!(field(&v, "nope").is_none());
        let v: Value = serde_json::from_str(
            r#"{"fields":{"message":"m"},"spans":[{"pod":"outer","x":1},{"pod":"inner"}]}"#,
        )
        .expect("valid JSON literal");
        assert_eq!(field(&v, "pod").and_then(Value::as_str), Some("inner"));
        assert_eq!(field(&v, "x").and_then(Value::as_u64), Some(1));
    }
}
