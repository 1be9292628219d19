//! Private filesystem mounts (cgroup2, bpffs) and cgroup v2 directories.
//!
//! The harness mounts its own cgroup2 instance instead of relying on
//! `/sys/fs/cgroup`: hosts differ (hybrid layouts put cgroup2 at
//! `/sys/fs/cgroup/unified`), and `ip netns exec` remounts /sys. Every cgroup2
//! mount shows the same single hierarchy, so a directory made through our
//! mount is the same cgroup the kernel's eBPF hooks see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A filesystem we mounted; unmounted on drop.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

// === impl Mount ===

impl Mount {
    /// Mounts a fresh instance of `fstype` (`"cgroup2"` or `"bpf"`) at
    /// `target`, creating the directory.
    pub fn new(fstype: &str, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating {}", target.display()))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some(fstype), target, Some(fstype), flags, None::<&str>)
            .with_context(|| format!("mounting {fstype} at {}", target.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    /// Where it is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts. A busy mount is detached lazily, so tear-down never hangs
    /// on a process that still has a file open in it.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        unmount(&self.target)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = unmount(&self.target);
        }
    }
}

/// Unmounts `target`, lazily if it is busy.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH)
            .with_context(|| format!("lazily unmounting {}", target.display())),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
}

/// Mount points (from `/proc/self/mounts`) at or below `prefix`.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// `/proc/mounts` escapes spaces and the like as octal (`\040`).
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// PIDs in the cgroup `dir` itself (not its children).
pub fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// True while any process is in `dir` or below it.
pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in the subtree `dir`, waits (bounded) until it is
/// empty, then removes the directories bottom-up.
///
/// `cgroup.kill` (Linux 5.14+) kills the whole subtree atomically, including
/// processes forked while we kill; on older kernels fall back to SIGKILL per
/// PID. Only harness-started processes are ever in these cgroups.
pub fn remove_tree(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        kill_each(dir);
    }
    crate::wait_until(timeout, || {
        if populated(dir) {
            kill_each(dir);
            false
        } else {
            true
        }
    })
    .with_context(|| format!("cgroup {} still has processes", dir.display()))?;
    // rmdir can briefly fail with EBUSY right after the last task exits.
    let mut last_err = None;
    let removed = crate::wait_until(timeout, || match rmdir_tree(dir) {
        Ok(()) => true,
        Err(e) => {
            last_err = Some(e);
            false
        }
    });
    if removed.is_err() {
        bail!("removing cgroup {}: {:?}", dir.display(), last_err);
    }
    Ok(())
}

fn kill_each(dir: &Path) {
    for pid in procs(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for child in subdirs(dir) {
        kill_each(&child);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for child in subdirs(dir) {
        rmdir_tree(&child)?;
    }
    // cgroupfs directories are removed with rmdir(2) even though they
    // contain control files.
    std::fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(
            unescape_mount_path("/run/a\\040b"),
            PathBuf::from("/run/a b")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path("/end\\04"), PathBuf::from("/end\\04"));
    }
}
