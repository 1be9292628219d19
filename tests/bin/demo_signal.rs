//! Ctrl-C (and SIGTERM, SIGHUP) for `ambit-demo`: stop the demo and let it
//! tear the simulated cluster down, never leak it.
//!
//! [`install`] registers handlers (through tokio, on a thread of its own;
//! handlers rather than a blocked mask, which every child process would
//! inherit). On the first signal it sets the stop flag and, every 200 ms from
//! then on, SIGKILLs every process inside the cluster's network namespaces,
//! so whatever the demo is waiting for (a curl, a transfer, a ztunnel log
//! line) ends at once. The demo thread sees [`stopped`], unwinds normally
//! and drops the cluster, which removes the namespaces, mounts and
//! cgroups. The cluster is only ever touched by the demo thread, so
//! tear-down never races with a step that still uses it.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// The signal that stopped the demo, 0 while none has.
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);
/// `<cluster id>-`, the prefix of every namespace the cluster creates.
static NETNS_PREFIX: Mutex<Option<String>> = Mutex::new(None);

/// Registers the handlers and starts the thread that serves them. Call
/// first thing in `main`: from then on these signals no longer kill the
/// process outright.
pub fn install() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    // Registered here, before returning, so no early signal is missed.
    let (mut int, mut term, mut hup) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ))
        })
        .context("installing SIGINT/SIGTERM/SIGHUP handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    let sig = tokio::select! {
                        _ = int.recv() => Signal::SIGINT,
                        _ = term.recv() => Signal::SIGTERM,
                        _ = hup.recv() => Signal::SIGHUP,
                    };
                    on_signal(sig);
                }
            })
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// True once a signal asked the demo to stop.
pub fn stopped() -> bool {
    STOPPED_BY.load(Ordering::SeqCst) != 0
}

/// The exit code for an interrupted run: 128 + the signal number.
pub fn exit_code() -> u8 {
    u8::try_from(128 + STOPPED_BY.load(Ordering::SeqCst)).unwrap_or(130)
}

/// Tells the handler which cluster to stop.
pub fn watch_cluster(id: &str) {
    *NETNS_PREFIX.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{id}-"));
}

fn on_signal(sig: Signal) {
    let first = STOPPED_BY
        .compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if first {
        eprintln!("\n{sig} received: stopping the demo and removing the simulated cluster…");
        let _ = std::thread::Builder::new()
            .name("stopper".into())
            .spawn(|| {
                loop {
                    kill_cluster_processes();
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
    } else {
        eprintln!("{sig} received again: still removing the simulated cluster, a moment…");
    }
}

/// SIGKILLs every process in the cluster's namespaces: ztunnel, the apps,
/// tcpdump, and any client the demo is running. All of them were started by
/// the demo (the harness never puts anything else there).
fn kill_cluster_processes() {
    let prefix = NETNS_PREFIX
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(prefix) = prefix else { return };
    for name in harness::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
    {
        let path = Path::new(harness::netns::NETNS_DIR).join(&name);
        for pid in harness::netns::pids_in(&path) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
