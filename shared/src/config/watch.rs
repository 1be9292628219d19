//! Watching the config file: load it once at start, then re-read it when it changes and
//! publish each valid version through a watch channel.
//!
//! A file that fails to parse or validate is reported and ignored: the last good config
//! stays in force. The file is checked every second and at once on `SIGHUP`, cheaply:
//! - its metadata (size, mtime, ctime, inode, device) is compared with the version last
//!   read, and nothing is read while they are unchanged (an atomic rename changes the
//!   inode; an edit in place changes mtime and ctime);
//! - a changed file is read (at most [`Limits::max_bytes`]) and hashed, and parsed only
//!   when its content hash differs from the last one parsed;
//! - a file modified within [`RACY_WINDOW`] of being read is read again at the next poll,
//!   since a second write in the same clock tick could leave its metadata unchanged.
//!
//! Reading and parsing run on a dedicated thread, never on an async worker: a file that
//! is slow to parse must not stall traffic on a one-core proxy (it stalled plaintext
//! requests on the waypoint before). The [`limits`](super::limits) pre-scan refuses files
//! that would be slow to parse at all.
//!
//! Both the node tunnel and the waypoint run on this; each reports reloads to its own
//! metrics through the `observe` callback of [`watch_file`].

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use super::file::{ReadFailure, read_capped};
use super::{Config, ConfigError, Limits, load_file_with, parse_str_with};

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A file whose mtime is this recent when read is read again at the next poll: file
/// systems with coarse timestamps could give a second write within the same tick the
/// same metadata (git's "racily clean" problem).
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Publishes the config in force to every task that needs it.
pub type ConfigSender = watch::Sender<Arc<Config>>;

/// What became of a change to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new version parsed, validated and is now in force.
    Applied,
    /// The new version was refused (unreadable, too large or deep, unparsable or invalid);
    /// the last good config stays in force.
    Refused,
}

/// How the file is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// Time between checks. Default [`POLL_INTERVAL`].
    pub every: Duration,
    /// Caps checked before parsing. Default [`Limits::default`].
    pub limits: Limits,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            every: POLL_INTERVAL,
            limits: Limits::default(),
        }
    }
}

/// Loads the initial config; a proxy refuses to start without a valid one. Blocking: call
/// it from a blocking context (`spawn_blocking`) in async code.
pub fn load_initial(path: &Path, limits: &Limits) -> Result<ConfigSender, ConfigError> {
    let config = load_file_with(path, limits)?;
    Ok(watch::Sender::new(Arc::new(config)))
}

/// Watches `path` (polling, plus SIGHUP for an immediate reload) with the default
/// [`WatchSettings`] and publishes each valid change on `tx`. Every change is reported to
/// `observe`, as applied or refused. Runs until the task is dropped or every receiver is
/// gone.
pub async fn watch_file<F>(path: PathBuf, tx: ConfigSender, observe: F)
where
    F: Fn(ReloadOutcome) + Send + 'static,
{
    watch_file_with(path, tx, observe, WatchSettings::default()).await
}

/// [`watch_file`] with explicit settings. The checks run on a thread of their own, which
/// ends soon after this future is dropped or every receiver is gone.
pub async fn watch_file_with<F>(
    path: PathBuf,
    tx: ConfigSender,
    observe: F,
    settings: WatchSettings,
) where
    F: Fn(ReloadOutcome) + Send + 'static,
{
    // Dropping this future drops `wake`, which ends the thread at its next wait.
    let (wake, woken) = mpsc::channel::<()>();
    let (done_tx, mut done) = oneshot::channel::<()>();
    let watcher = Watcher::new(path.clone(), tx, observe, settings.limits);
    let spawned = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            watcher.run(&woken, settings.every);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        // The config in force stays; only reloads stop. Loud, since it needs a restart.
        error!(path = %path.display(), error = %e,
            "cannot start the config watcher thread; the file will not be reloaded");
        return;
    }
    // Without a handler (e.g. signals unavailable) polling alone still works.
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = &mut done => return,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                info!(path = %path.display(), "SIGHUP: reloading config");
                let _ = wake.send(());
            }
        }
    }
}

/// Milliseconds since `started`, as a number in JSON logs (a `u128` is logged as text).
fn millis(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Fingerprint {
    fn of(m: &std::fs::Metadata) -> Self {
        Fingerprint {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// The watcher thread's state.
struct Watcher<F> {
    path: PathBuf,
    tx: ConfigSender,
    observe: F,
    limits: Limits,
    /// Metadata of the version last read; `None`: read at the next poll.
    seen: Option<Fingerprint>,
    /// Hash of the content last parsed; `None`: compare the next parse with the config in
    /// force instead (the initial load, or a change made before the watcher started).
    parsed: Option<[u8; 32]>,
    /// An unreadable file was reported and has not been readable since (reported once).
    failing: bool,
}

impl<F: Fn(ReloadOutcome)> Watcher<F> {
    fn new(path: PathBuf, tx: ConfigSender, observe: F, limits: Limits) -> Self {
        Watcher {
            path,
            tx,
            observe,
            limits,
            seen: None,
            parsed: None,
            failing: false,
        }
    }

    fn run(mut self, woken: &mpsc::Receiver<()>, every: Duration) {
        let mut forced = false;
        loop {
            if self.tx.is_closed() {
                return;
            }
            self.poll(forced);
            forced = match woken.recv_timeout(every) {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            };
        }
    }

    /// One check; `forced` (SIGHUP) reads the file even if its metadata is unchanged.
    fn poll(&mut self, forced: bool) {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                self.seen = None;
                return self.unreadable(ConfigError {
                    file: self.path.clone(),
                    field: String::new(),
                    reason: format!("cannot read file: {e}"),
                });
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        if !forced && self.seen == Some(fingerprint) {
            return;
        }
        let started = Instant::now();
        let text = match read_capped(&self.path, &self.limits) {
            Ok(text) => text,
            // Retried at the next poll: the file may be fine and the failure ours (EMFILE).
            Err(ReadFailure::Io(e)) => {
                self.seen = None;
                return self.unreadable(e);
            }
            Err(ReadFailure::Content(e)) => {
                self.failing = false;
                self.seen = Some(fingerprint);
                self.parsed = None;
                return self.refused(&e, started);
            }
        };
        self.failing = false;
        let racy = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RACY_WINDOW);
        self.seen = (!racy).then_some(fingerprint);
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if self.parsed == Some(hash) {
            return;
        }
        let first = self.parsed.is_none();
        self.parsed = Some(hash);
        match parse_str_with(&self.path, &text, &self.limits) {
            Ok(c) if first && c == **self.tx.borrow() => {}
            Ok(c) => {
                (self.observe)(ReloadOutcome::Applied);
                info!(path = %self.path.display(), workloads = c.workloads.len(),
                    services = c.services.len(), elapsed_ms = millis(started),
                    "config reloaded");
                self.tx.send_replace(Arc::new(c));
            }
            Err(e) => self.refused(&e, started),
        }
    }

    fn refused(&self, e: &ConfigError, started: Instant) {
        (self.observe)(ReloadOutcome::Refused);
        error!(file = %e.file.display(), field = %e.field, reason = %e.reason,
            elapsed_ms = millis(started),
            "invalid config refused; keeping the last good config");
    }

    /// Reported once until the file is readable again, not at every poll.
    fn unreadable(&mut self, e: ConfigError) {
        // The next readable version is compared with the config in force, as at start.
        self.parsed = None;
        if std::mem::replace(&mut self.failing, true) {
            return;
        }
        (self.observe)(ReloadOutcome::Refused);
        error!(path = %e.file.display(), error = %e.reason,
            "config file unreadable; keeping the last good config");
    }
}

#[cfg(test)]
mod tests;
