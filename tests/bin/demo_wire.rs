//! What crossed the link between the nodes: a tcpdump on the cluster bridge
//! and what `tshark` and a byte search make of it.
//!
//! The capture does what [`Cluster::capture_bridge`](harness::Cluster::capture_bridge)
//! does, plus a much larger kernel buffer (`-B`): the 8 MiB transfer crosses the
//! bridge in a few dozen milliseconds, in 64 KiB GSO segments, which
//! overflows tcpdump's default 2 MiB buffer and drops packets. A claim like
//! "the marker never appears in the clear" is only worth something if the
//! capture is complete, so [`Wire`] also measures how much of each TCP
//! stream it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use harness::{Cluster, Proc};
use nix::sys::signal::Signal;

/// tcpdump's kernel buffer, in KiB: room for the whole transfer.
const BUFFER_KIB: &str = "65536";
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running tcpdump on the bridge `br0` in the cluster netns.
pub struct BridgeCapture {
    proc: Proc,
    path: PathBuf,
}

impl BridgeCapture {
    /// Starts tcpdump and waits until it captures.
    pub fn start(cluster: &Cluster, name: &str) -> Result<BridgeCapture> {
        // The harness names the cluster netns `<id>-c`; check rather than
        // capture on some other namespace's bridge.
        let netns = format!("{}-c", cluster.id());
        ensure!(
            cluster.footprint().netns.contains(&netns),
            "cluster netns {netns} not found"
        );
        let dir = cluster.dir().join("captures");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{name}.pcap"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns, "tcpdump"])
            .args(["-i", harness::cluster::CLUSTER_BRIDGE, "-n", "-s", "0"])
            .args(["-B", BUFFER_KIB, "-U", "--immediate-mode"])
            // Debian's tcpdump would drop to user "tcpdump", which can't
            // write into the root-owned cluster directory.
            .args(["-Z", "root", "-w"])
            .arg(&path);
        let log = cluster.logs_dir().join(format!("tcpdump-{name}.log"));
        let proc = Proc::spawn(&mut cmd, "tcpdump", Some(&log))?;
        proc.wait_for_line(START_TIMEOUT, |l| l.contains("listening on"))
            .context("starting tcpdump on the cluster bridge")?;
        Ok(BridgeCapture { proc, path })
    }

    /// Lets packets in flight arrive, stops tcpdump and returns the file.
    pub fn stop(mut self) -> Result<PathBuf> {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let (mut last, mut quiet) = (size(&self.path), 0);
        // Quiet for 3 polls in a row (≥ 150 ms), at most 2 s.
        let _ = harness::wait_until(Duration::from_secs(2), || {
            std::thread::sleep(Duration::from_millis(50));
            let now = size(&self.path);
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
            quiet >= 3
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

/// What a capture holds.
pub struct Wire {
    /// Every TCP segment as (src port, dst port).
    pub segments: Vec<(u16, u16)>,
    /// TCP payload bytes captured, and how many the streams' sequence
    /// numbers say went by (equal when nothing was missed).
    pub payload_captured: u64,
    pub payload_sent: u64,
    /// The raw file, for byte searches.
    pub data: Vec<u8>,
}

impl Wire {
    pub fn read(pcap: &Path) -> Result<Wire> {
        let data = std::fs::read(pcap).with_context(|| format!("reading {}", pcap.display()))?;
        let text = tshark(
            pcap,
            &[],
            "tcp",
            &[
                "tcp.srcport",
                "tcp.dstport",
                "tcp.stream",
                "tcp.seq",
                "tcp.len",
            ],
        )?;
        let mut segments = Vec::new();
        let mut payload_captured = 0;
        // (stream, src port) → (lowest seq, highest seq + len) of data segments.
        let mut spans: BTreeMap<(u64, u16), (u64, u64)> = BTreeMap::new();
        for line in text.lines() {
            let cols: Vec<&str> = line.split('\t').map(str::trim).collect();
            let num = |i: usize| cols.get(i).and_then(|c| c.parse::<u64>().ok());
            let (Some(src), Some(dst)) = (num(0), num(1)) else {
                continue;
            };
            let (Ok(src), Ok(dst)) = (u16::try_from(src), u16::try_from(dst)) else {
                continue;
            };
            segments.push((src, dst));
            if let (Some(stream), Some(seq), Some(len)) = (num(2), num(3), num(4))
                && len > 0
            {
                payload_captured += len;
                let span = spans.entry((stream, src)).or_insert((seq, seq + len));
                span.0 = span.0.min(seq);
                span.1 = span.1.max(seq + len);
            }
        }
        let payload_sent = spans.values().map(|(lo, hi)| hi - lo).sum();
        Ok(Wire {
            segments,
            payload_captured: payload_captured.min(payload_sent),
            payload_sent,
            data,
        })
    }

    /// The server side of each segment: the lower port (clients use
    /// ephemeral ports from 32768 up).
    pub fn service_ports(&self) -> BTreeSet<u16> {
        self.segments.iter().map(|&(s, d)| s.min(d)).collect()
    }

    /// Distinct (src, dst) port pairs without `port` on either side.
    pub fn pairs_without(&self, port: u16) -> BTreeSet<(u16, u16)> {
        self.segments
            .iter()
            .copied()
            .filter(|&(s, d)| s != port && d != port)
            .collect()
    }

    /// Segments with `port` on either side.
    pub fn segments_with(&self, port: u16) -> usize {
        self.segments
            .iter()
            .filter(|&&(s, d)| s == port || d == port)
            .count()
    }

    /// True if no TCP payload went by uncaptured.
    pub fn complete(&self) -> bool {
        self.payload_captured == self.payload_sent
    }

    /// Occurrences of `needle` anywhere in the capture.
    pub fn count(&self, needle: &[u8]) -> usize {
        if needle.is_empty() {
            return 0;
        }
        self.data
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }
}

/// ServerHello `supported_version` values (`0x0304` is TLS 1.3), decoding
/// `port` as TLS.
pub fn tls_versions(pcap: &Path, port: u16) -> Result<Vec<String>> {
    let decode_as = format!("tcp.port=={port},tls");
    let text = tshark(
        pcap,
        &["-d", &decode_as],
        "tls.handshake.type == 2",
        &["tls.handshake.extensions.supported_version"],
    )?;
    Ok(text
        .lines()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect())
}

/// A TLS version number as people say it.
pub fn tls_name(version: &str) -> String {
    match version {
        "0x0304" => "TLS 1.3".into(),
        "0x0303" => "TLS 1.2".into(),
        other => format!("unknown ({other})"),
    }
}

/// `tshark -n -r pcap [extra] -Y filter -T fields -e …`: one line per packet.
fn tshark(pcap: &Path, extra: &[&str], filter: &str, fields: &[&str]) -> Result<String> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"])
        .arg(pcap)
        .args(extra)
        .args(["-Y", filter, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    harness::process::run_ok(&mut cmd, Duration::from_secs(60)).context("running tshark")
}
