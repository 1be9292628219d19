//! Where the config comes from: a YAML file (the default) or, with the `kubernetes`
//! feature, the Kubernetes API. Either way the proxies get a watch channel of validated
//! [`Config`]s and a task that keeps it current.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch as channel;

use super::watch::{self, ReloadOutcome};
use super::{Config, ConfigError};

/// How long the Kubernetes source waits for the first complete list of every kind.
#[cfg(feature = "kubernetes")]
pub const KUBE_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A config source.
#[derive(Debug, Clone)]
pub enum Source {
    /// A YAML file, polled and re-read on SIGHUP.
    File(PathBuf),
    /// The Kubernetes API server.
    #[cfg(feature = "kubernetes")]
    Kubernetes(super::kube::KubeSettings),
}

/// Why no initial config could be had.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// The Kubernetes source could not start.
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Kube(#[from] super::kube::KubeError),
}

/// The task that keeps the config current; spawn it.
pub type SourceTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Loads the initial config and returns its receiver plus the task that publishes every
/// later valid version, reporting each reload to `observe`.
pub async fn start<F>(
    source: &Source,
    observe: F,
) -> Result<(channel::Receiver<Arc<Config>>, SourceTask), SourceError>
where
    F: Fn(ReloadOutcome) + Send + 'static,
{
    match source {
        Source::File(path) => {
            let tx = watch::load_initial(path)?;
            let rx = tx.subscribe();
            Ok((rx, Box::pin(watch::watch_file(path.clone(), tx, observe))))
        }
        #[cfg(feature = "kubernetes")]
        Source::Kubernetes(settings) => {
            let kube = super::kube::KubeSource::start(settings, KUBE_SYNC_TIMEOUT).await?;
            let tx = kube.initial()?;
            let rx = tx.subscribe();
            Ok((rx, Box::pin(kube.run(tx, observe))))
        }
    }
}
