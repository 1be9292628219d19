//! Packet captures on the simulated cluster's bridges, and pcap helpers.
//!
//! Captures let tests check what is actually on the wire: that a marker
//! sent by an app is visible in the clear without the mesh and invisible
//! with it, and that meshed traffic between nodes only uses the HBONE port.
//! tcpdump runs inside the cluster (or a node) netns, writing to a file
//! under the cluster directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use crate::cluster::ClusterShared;
use crate::process::{self, Proc};

/// How long to wait for tcpdump to attach to the interface.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpdump gets to flush and exit after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running tcpdump; stop it with [`Capture::stop`] to get the file.
/// Dropping it kills tcpdump (the file stays, but may lack the last
/// packets).
pub struct Capture {
    proc: Proc,
    path: PathBuf,
}

// === impl Capture ===

impl Capture {
    /// Starts `tcpdump -i <iface>` in the netns `netns_name` and waits until
    /// it is capturing.
    pub(crate) fn start(
        cluster: &Arc<ClusterShared>,
        netns_name: &str,
        iface: &str,
        stem: &str,
    ) -> Result<Capture> {
        let path = cluster.artifact_path("captures", stem, "pcap")?;
        let ns = Path::new(crate::netns::NETNS_DIR).join(netns_name);
        let mut cmd = Command::new("tcpdump");
        let fd = crate::netns::open_netns(&ns)?;
        crate::sys::join_before_exec(
            &mut cmd,
            crate::sys::Join {
                cgroup_procs: None,
                netns: Some(fd),
            },
        );
        cmd.args(["-i", iface, "-n", "-s", "0"])
            // -U: write each packet as it arrives, so the file is complete
            // even if tcpdump is killed. --immediate-mode: deliver packets
            // now rather than when a TPACKET_V3 block fills or times out,
            // so stopping right after traffic doesn't lose the tail.
            .args(["-U", "--immediate-mode"])
            // A 64 MiB kernel buffer: with the default 2 MiB, bursts of tunnelled bulk
            // traffic overflow it and a "marker never in the clear" check would be read
            // from a capture that missed half the stream.
            .args(["-B", "65536"])
            // Debian's tcpdump drops to user "tcpdump" after opening the
            // device, which could not write into our root-owned directory.
            .args(["-Z", "root", "-w"])
            .arg(&path);
        let proc = cluster.spawn(&mut cmd, &format!("tcpdump-{stem}"))?;
        // tcpdump prints "listening on <iface>" once the capture socket is
        // bound, so packets from here on are recorded.
        proc.wait_for_line(START_TIMEOUT, |l| l.contains("listening on"))
            .with_context(|| format!("starting tcpdump on {iface} in {netns_name}"))?;
        Ok(Capture { proc, path })
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the capture and returns the pcap file.
    ///
    /// Waits (bounded) until the file stops growing, so packets still in
    /// flight are recorded, then interrupts tcpdump, which flushes and exits.
    pub fn stop(mut self) -> Result<PathBuf> {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut last = size(&self.path);
        let mut stable = 0;
        // Quiet for 3 polls in a row (≥ 150 ms), at most 2 s.
        let _ = crate::wait_until(Duration::from_secs(2), || {
            std::thread::sleep(Duration::from_millis(50));
            let now = size(&self.path);
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            stable >= 3
        });
        self.proc.signal(Signal::SIGINT)?;
        if self.proc.wait(STOP_TIMEOUT).is_err() {
            self.proc.kill()?;
        }
        if !self.path.exists() {
            bail!(
                "tcpdump wrote no file at {}:\n{}",
                self.path.display(),
                self.proc.output_text()
            );
        }
        Ok(self.path.clone())
    }
}

/// True if `needle` occurs anywhere in the file's bytes. A raw search is
/// enough to find a plaintext marker in captured payloads; it can miss a
/// needle split across two segments, so send it more than once.
///
/// # Panics
/// If the file can't be read: a missing capture must fail the test, not
/// make "the marker is absent" pass vacuously.
pub fn pcap_contains(path: &Path, needle: &[u8]) -> bool {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("reading capture {}: {e}", path.display()));
    !needle.is_empty() && data.windows(needle.len()).any(|w| w == needle)
}

/// Every TCP port (source or destination) in the capture.
///
/// # Panics
/// If tshark can't read the file (a missing capture must not pass as "no
/// ports").
pub fn tcp_ports_seen(path: &Path) -> BTreeSet<u16> {
    try_tcp_ports_seen(path)
        .unwrap_or_else(|e| panic!("reading TCP ports from {}: {e:#}", path.display()))
}

/// Like [`tcp_ports_seen`], returning errors.
pub fn try_tcp_ports_seen(path: &Path) -> Result<BTreeSet<u16>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"]).arg(path).args([
        "-Y",
        "tcp",
        "-T",
        "fields",
        "-e",
        "tcp.dstport",
        "-e",
        "tcp.srcport",
    ]);
    let out =
        process::run_ok(&mut cmd, Duration::from_secs(60)).context("tshark (is it installed?)")?;
    Ok(parse_port_fields(&out))
}

/// A one-line-per-packet text rendering (`tcpdump -nn -r`), for failure
/// messages.
pub fn pcap_text(path: &Path) -> Result<String> {
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-nn", "-r"]).arg(path);
    process::run_ok(&mut cmd, Duration::from_secs(60))
}

fn parse_port_fields(text: &str) -> BTreeSet<u16> {
    text.split(['\t', '\n', ','])
        .filter_map(|f| f.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tshark_fields() {
        let ports = parse_port_fields("15008\t40312\n40312\t15008\n\n8080,8080\t1\n");
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![1, 8080, 15008, 40312]
        );
    }

    #[test]
    fn finds_needles() {
        let dir = std::env::temp_dir().join(format!("ambit-pcap-test-{}", std::process::id()));
        std::fs::write(&dir, b"xxMARKERyy").expect("temp dir is writable");
        assert!(pcap_contains(&dir, b"MARKER"));
        assert!(!pcap_contains(&dir, b"MARKET"));
        let _ = std::fs::remove_file(&dir);
    }
}
