//! Graceful shutdown: one [`DrainTrigger`] and any number of [`DrainWatcher`]s.
//!
//! Listeners and connections hold a watcher. When the trigger starts a drain, every
//! watcher's [`DrainWatcher::signaled`] completes, so listeners stop accepting and
//! connections finish what they are doing (an HTTP/1 connection closes after its response,
//! an HTTP/2 one sends GOAWAY). The drain is over when every watcher has been dropped,
//! which [`DrainTrigger::drain`] waits for, bounded by a grace period.
//!
//! ```
//! # async fn example() {
//! use std::time::Duration;
//! let (trigger, watcher) = ambit_shared::drain::channel();
//! tokio::spawn(async move {
//!     watcher.signaled().await;
//!     // ... finish the in-flight request, then drop the watcher ...
//! });
//! let finished_in_time = trigger.drain(Duration::from_secs(5)).await;
//! # let _ = finished_in_time;
//! # }
//! ```

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain and waits for it to finish.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by anything that must finish before the process exits.
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    // Never sent on: the trigger learns every watcher is gone when the channel closes.
    _alive: mpsc::Sender<()>,
}

/// A connected trigger and watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (signal, signal_rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        DrainTrigger { signal, done },
        DrainWatcher {
            signal: signal_rx,
            _alive: alive,
        },
    )
}

impl DrainTrigger {
    /// Signals every watcher, then waits until all are dropped or `grace` has passed.
    /// Returns true if the drain finished within the grace period.
    pub async fn drain(mut self, grace: Duration) -> bool {
        self.signal.send_replace(true);
        tokio::time::timeout(grace, self.done.recv()).await.is_ok()
    }
}

impl DrainWatcher {
    /// Completes once a drain has started (at once if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone, which is a drain too.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_watchers_within_grace() {
        let (trigger, watcher) = channel();
        let held = watcher.clone();
        assert!(!watcher.is_draining());
        let task = tokio::spawn(async move {
            watcher.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let stuck = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(held);
        });
        assert!(!trigger.drain(Duration::from_millis(200)).await);
        task.await.expect("task");
        stuck.abort();
    }

    #[tokio::test]
    async fn finishes_when_all_watchers_drop() {
        let (trigger, watcher) = channel();
        let task = tokio::spawn(async move {
            watcher.signaled().await;
        });
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.expect("task");
    }
}
