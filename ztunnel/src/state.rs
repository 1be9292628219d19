//! The config the node tunnel runs on: loaded from a file, re-read when it changes, and
//! published through a watch channel. A file that fails to parse or validate is reported
//! and ignored: the last good config stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_shared::config::{self, Config, ConfigError};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info};

/// How often the file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes the config in force to every task that needs it.
pub type ConfigSender = watch::Sender<Arc<Config>>;

/// Loads the initial config; ztunnel refuses to start without a valid one.
pub fn load_initial(path: &Path) -> Result<ConfigSender, ConfigError> {
    let config = config::load_file(path)?;
    Ok(watch::Sender::new(Arc::new(config)))
}

/// Watches the file (polling, plus SIGHUP for an immediate reload) and publishes each
/// valid change. Comparing contents, not mtimes, also catches atomic renames.
pub async fn watch_file(path: PathBuf, tx: ConfigSender) {
    let mut last_text = std::fs::read_to_string(&path).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!(path = %path.display(), "SIGHUP: reloading config");
            }
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                if last_text.take().is_some() {
                    error!(path = %path.display(), error = %e, "config file unreadable; keeping the last good config");
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        match config::parse_str(&path, &text) {
            Ok(c) => {
                info!(path = %path.display(), workloads = c.workloads.len(), "config reloaded");
                tx.send_replace(Arc::new(c));
            }
            Err(e) => {
                error!(file = %e.file.display(), field = %e.field, reason = %e.reason,
                    "invalid config refused; keeping the last good config");
            }
        }
    }
}
