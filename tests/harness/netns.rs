//! Named network namespaces (`ip netns`), `ip` invocations, and running a
//! closure inside a namespace.
//!
//! Namespaces are created with `ip netns add`, so they show up under
//! `/var/run/netns/` for debugging (`ip netns exec <name> ss -tnp`) and the
//! stale-leftover sweep can find them by name. Links are always configured
//! with `ip -n <ns>`, never from the root namespace, so nothing is ever added
//! to the host's network.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    removed: bool,
}

// === impl NetNs ===

impl NetNs {
    /// Creates the namespace `name` and brings its `lo` up (ztunnel's admin
    /// port and in-pod listeners rely on loopback).
    pub fn create(name: &str) -> Result<NetNs> {
        ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        let ns = NetNs {
            name: name.to_string(),
            removed: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs several `ip` commands in this namespace; see [`ip_batch`].
    pub fn ip_batch(&self, commands: &[String]) -> Result<()> {
        ip_batch(&self.name, commands)
    }

    /// Opens an fd on the namespace, e.g. for `setns` in a child.
    pub fn open(&self) -> Result<OwnedFd> {
        open_netns(&self.path())
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and
    /// returns its result. The calling thread's namespace is untouched.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in_netns(&self.path(), f)
    }

    /// Writes a sysctl inside the namespace; see [`sysctl`].
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sysctl(&self.name, key, value)
    }

    /// TCP ports with a socket in LISTEN state in this namespace.
    pub fn tcp_listen_ports(&self) -> Result<BTreeSet<u16>> {
        self.run_in(listen_ports_here)?
    }

    /// Deletes the namespace. Interfaces inside it go with it; the kernel
    /// frees it once no process remains inside.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        delete(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.removed {
            let _ = delete(&self.name);
        }
    }
}

/// Runs `ip <args>` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(drop)
}

/// Runs `ip <args>` and returns its stdout, failing with its stderr.
pub fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs several `ip` commands (one per line, without the leading `ip`) in
/// the namespace `name` with one `ip -n <name> -batch -` process, which is
/// much cheaper than one fork per command when building a topology.
pub fn ip_batch(name: &str, commands: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", name, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ip -batch")?;
    {
        let mut stdin = child
            .stdin
            .take()
            .context("ip -batch stdin was requested as piped")?;
        for c in commands {
            writeln!(stdin, "{c}").context("writing to ip -batch")?;
        }
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip -n {name} -batch failed ({}): {}\ncommands:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            commands.join("\n")
        );
    }
    Ok(())
}

/// Writes a sysctl (`net/ipv4/ip_forward` or `net.ipv4.ip_forward`) inside
/// the namespace `name`. `/proc/sys/net` shows the namespace of the thread
/// that opens it, so this runs on a thread that joined the namespace; no
/// `ip netns exec` (which remounts /sys) is needed.
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    run_in_netns(&Path::new(NETNS_DIR).join(name), || {
        std::fs::write(&path, value)
    })?
    .with_context(|| format!("setting {} in netns {name}", path.display()))
}

/// TCP ports in LISTEN state in the calling thread's namespace (call it via
/// [`run_in_netns`]).
pub fn listen_ports_here() -> Result<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    // /proc/thread-self/net follows this thread's namespace; /proc/self/net
    // would follow the main thread's.
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        ports.extend(parse_listen_ports(&text));
    }
    Ok(ports)
}

/// Deletes the named namespace; a missing one is not an error.
pub fn delete(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Names of all namespaces under `/var/run/netns`.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Opens an fd on a namespace file.
pub fn open_netns(path: &Path) -> Result<OwnedFd> {
    let f = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    Ok(f.into())
}

/// Runs `f` on a fresh thread that joined the namespace at `path`.
pub fn run_in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let fd = open_netns(path)?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // setns(CLONE_NEWNET) changes only this thread, which ends when
            // the scope does, so no other code ever runs in the namespace.
            setns(&fd, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside netns panicked"))?
    })
}

/// PIDs of live processes whose network namespace is the one at `path`.
///
/// Used on tear-down and by the stale sweep: everything inside our
/// namespaces was started by the harness, so this finds children that a
/// test leaked or that outlived a killed test process.
pub fn pids_in(path: &Path) -> Vec<i32> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let own = std::process::id() as i32;
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        })
        .collect()
}

fn parse_listen_ports(text: &str) -> impl Iterator<Item = u16> + '_ {
    // Format: "sl local_address rem_address st ...", local as HEXIP:HEXPORT,
    // st 0A = LISTEN.
    text.lines().skip(1).filter_map(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1)?;
        let state = cols.nth(1)?;
        if state != "0A" {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(parse_listen_ports(text).collect::<Vec<_>>(), vec![8080]);
    }
}
