//! Where the config comes from: a YAML file (the default) or, with the `kubernetes`
//! feature, the Kubernetes API. Either way the proxies get a watch channel of validated
//! [`Config`]s and a task that keeps it current.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch as channel;

use super::limits::LimitEnvError;
use super::watch::{self, ReloadOutcome, WatchSettings};
use super::{Config, ConfigError, Limits};

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

/// Which source the command line chose (`--config-source file|kubernetes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The YAML file given by `--config`.
    File,
    /// The Kubernetes API (needs the `kubernetes` build feature).
    Kubernetes,
}

impl std::str::FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "file" => Ok(SourceKind::File),
            "kubernetes" => Ok(SourceKind::Kubernetes),
            other => Err(format!(
                "`{other}` is not a config source: use file or kubernetes"
            )),
        }
    }
}

/// Why the command line names no usable source.
#[derive(Debug, thiserror::Error)]
pub enum SourceFlagsError {
    /// File mode without a file.
    #[error("--config is required with --config-source file")]
    NoFile,
    /// A `--kube-url` that does not parse.
    #[error("--kube-url {0:?} is not a URL")]
    BadKubeUrl(String),
    /// Kubernetes mode in a binary built without it.
    #[error("--config-source kubernetes: this binary was built without the `kubernetes` feature")]
    NoKubernetes,
}

impl Source {
    /// The source the flags select; `namespace` limits a Kubernetes source to one
    /// namespace (the waypoint's).
    pub fn from_flags(
        kind: SourceKind,
        config: Option<PathBuf>,
        kube_url: Option<String>,
        trust_domain: String,
        namespace: Option<String>,
    ) -> Result<Source, SourceFlagsError> {
        match kind {
            SourceKind::File => config.map(Source::File).ok_or(SourceFlagsError::NoFile),
            #[cfg(feature = "kubernetes")]
            SourceKind::Kubernetes => {
                let url = match kube_url {
                    Some(u) => Some(
                        u.parse::<http::Uri>()
                            .map_err(|_| SourceFlagsError::BadKubeUrl(u))?,
                    ),
                    None => None,
                };
                Ok(Source::Kubernetes(super::kube::KubeSettings {
                    url,
                    trust_domain,
                    namespace,
                }))
            }
            #[cfg(not(feature = "kubernetes"))]
            SourceKind::Kubernetes => {
                let _ = (kube_url, trust_domain, namespace);
                Err(SourceFlagsError::NoKubernetes)
            }
        }
    }
}

/// Why no initial config could be had.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// An environment variable overriding a config limit is unusable.
    #[error(transparent)]
    Limits(#[from] LimitEnvError),
    /// The thread loading the file ended without an answer.
    #[error("loading the config file failed: {0}")]
    Loader(String),
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
            let settings = WatchSettings {
                limits: Limits::from_env()?,
                ..WatchSettings::default()
            };
            // Off the async workers, like every later reload.
            let load = path.clone();
            let tx =
                tokio::task::spawn_blocking(move || watch::load_initial(&load, &settings.limits))
                    .await
                    .map_err(|e| SourceError::Loader(e.to_string()))??;
            let rx = tx.subscribe();
            let task = watch::watch_file_with(path.clone(), tx, observe, settings);
            Ok((rx, Box::pin(task)))
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
