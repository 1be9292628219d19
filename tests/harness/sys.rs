//! The one place that uses `unsafe`: `Command::pre_exec`, which makes a
//! child join a pod's cgroup and network namespace between fork and exec.
//!
//! Joining in the child (rather than wrapping the program in `ip netns exec`
//! or `nsenter`) keeps the PID we hold equal to the program's PID, so
//! killing it by PID is exact, and avoids `ip netns exec` remounting /sys.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};

/// What a child joins before exec. Both fds are opened by the parent, before
/// fork, so the child only issues the `write` and `setns` syscalls.
pub(crate) struct Join {
    /// An fd on `<cgroup>/cgroup.procs`, opened for writing.
    pub cgroup_procs: Option<OwnedFd>,
    /// An fd on the network namespace (`/var/run/netns/<name>`).
    pub netns: Option<OwnedFd>,
}

/// Arranges for the child of `cmd` to join `join` before exec.
pub(crate) fn join_before_exec(cmd: &mut Command, join: Join) {
    let join = Arc::new(join);
    let hook = move || -> std::io::Result<()> {
        if let Some(fd) = &join.cgroup_procs {
            // "0" means "the writing process"; this moves the child before it
            // runs any program code, so every byte it sends is attributed to
            // the pod's cgroup (which is what the eBPF connect hooks key on).
            nix::unistd::write(fd, b"0").map_err(std::io::Error::from)?;
        }
        if let Some(fd) = &join.netns {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only calls
    // `write(2)` and `setns(2)` on fds opened before fork (async-signal-safe
    // syscalls; nix's `Errno` converts to `io::Error` via
    // `from_raw_os_error`, without allocating), allocates nothing, and takes no locks. The `Arc` is only
    // dereferenced, never cloned or dropped, in the child.
    unsafe {
        cmd.pre_exec(hook);
    }
}
