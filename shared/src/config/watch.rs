//! Watching the config file: load it once at start, then re-read it when it changes and
//! publish each valid version through a watch channel.
//!
//! A file that fails to parse or validate is reported and ignored: the last good config
//! stays in force. The file is polled every second (comparing contents, not mtimes, so an
//! atomic rename is caught too), and re-read at once on `SIGHUP`.
//!
//! Both the node tunnel and the waypoint run on this; each reports reloads to its own
//! metrics through the `observe` callback of [`watch_file`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info};

use super::{Config, ConfigError, load_file, parse_str};

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes the config in force to every task that needs it.
pub type ConfigSender = watch::Sender<Arc<Config>>;

/// What became of a change to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new version parsed, validated and is now in force.
    Applied,
    /// The new version was refused (unreadable, unparsable or invalid); the last good
    /// config stays in force.
    Refused,
}

/// Loads the initial config; a proxy refuses to start without a valid one.
pub fn load_initial(path: &Path) -> Result<ConfigSender, ConfigError> {
    let config = load_file(path)?;
    Ok(watch::Sender::new(Arc::new(config)))
}

/// Watches `path` (polling, plus SIGHUP for an immediate reload) and publishes each valid
/// change on `tx`. Every change is reported to `observe`, as applied or refused. Runs until
/// the task is dropped or every receiver is gone.
pub async fn watch_file<F>(path: PathBuf, tx: ConfigSender, observe: F)
where
    F: Fn(ReloadOutcome) + Send + 'static,
{
    watch_file_every(path, tx, observe, POLL_INTERVAL).await
}

/// [`watch_file`] with a custom poll interval (tests).
pub async fn watch_file_every<F>(path: PathBuf, tx: ConfigSender, observe: F, every: Duration)
where
    F: Fn(ReloadOutcome) + Send + 'static,
{
    // Starts unknown, so the first poll compares the file with the config in force: a
    // change made between the initial load and this task's start is not missed.
    let mut last_text: Option<String> = None;
    let mut first = true;
    // Without a handler (e.g. signals unavailable) polling alone still works.
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                info!(path = %path.display(), "SIGHUP: reloading config");
            }
        }
        if tx.is_closed() {
            return;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                // Reported once per disappearance, not at every poll.
                if last_text.take().is_some() || std::mem::take(&mut first) {
                    observe(ReloadOutcome::Refused);
                    error!(path = %path.display(), error = %e,
                        "config file unreadable; keeping the last good config");
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        let first_read = std::mem::take(&mut first);
        match parse_str(&path, &text) {
            Ok(c) if first_read && c == **tx.borrow() => {}
            Ok(c) => {
                observe(ReloadOutcome::Applied);
                info!(path = %path.display(), workloads = c.workloads.len(),
                    services = c.services.len(), "config reloaded");
                tx.send_replace(Arc::new(c));
            }
            Err(e) => {
                observe(ReloadOutcome::Refused);
                error!(file = %e.file.display(), field = %e.field, reason = %e.reason,
                    "invalid config refused; keeping the last good config");
            }
        }
        last_text = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    const GOOD: &str = "trustDomain: cluster.local\nnamespaces: [{name: shop}]\n";
    const GOOD2: &str = "trustDomain: example.org\nnamespaces: [{name: shop}]\n";
    const BAD: &str = "trustDomain: cluster.local\nbogus: 1\n";

    #[tokio::test]
    async fn applies_good_changes_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, GOOD).expect("write");
        let tx = load_initial(&path).expect("initial config loads");
        let mut rx = tx.subscribe();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(watch_file_every(
            path.clone(),
            tx,
            move |o| log.lock().push(o),
            Duration::from_millis(10),
        ));

        std::fs::write(&path, BAD).expect("write");
        let wait = |n: usize| {
            let seen = seen.clone();
            async move {
                for _ in 0..500 {
                    if seen.lock().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("no reload reported");
            }
        };
        wait(1).await;
        assert_eq!(seen.lock()[0], ReloadOutcome::Refused);
        assert_eq!(rx.borrow_and_update().trust_domain, "cluster.local");

        std::fs::write(&path, GOOD2).expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("change published")
            .expect("sender alive");
        assert_eq!(rx.borrow().trust_domain, "example.org");
        assert_eq!(seen.lock()[1], ReloadOutcome::Applied);
        task.abort();
    }
}
