//! The config the node tunnel runs on: loaded from a file, re-read when it changes, and
//! published through a watch channel. A file that fails to parse or validate is reported
//! and ignored: the last good config stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::net::IpAddr;

use ambit_shared::config::{
    self, Config, ConfigError, Service, USE_WAYPOINT_LABEL, WAYPOINT_NAME_LABEL, Waypoint, Workload,
};
use ambit_shared::policy::{self, CompiledPolicy};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info};

use crate::metrics::ConfigReloads;

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
/// valid change. Comparing contents, not mtimes, also catches atomic renames. Every change
/// counts in `reloads`, as applied or refused.
pub async fn watch_file(path: PathBuf, tx: ConfigSender, reloads: ConfigReloads) {
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
                    reloads.failure();
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
                reloads.success();
                info!(path = %path.display(), workloads = c.workloads.len(), "config reloaded");
                tx.send_replace(Arc::new(c));
            }
            Err(e) => {
                reloads.failure();
                error!(file = %e.file.display(), field = %e.field, reason = %e.reason,
                    "invalid config refused; keeping the last good config");
            }
        }
    }
}

/// A config with the lookups the data path needs, built once per config version.
#[derive(Debug)]
pub struct Snapshot {
    /// The config it was built from.
    pub config: Arc<Config>,
    by_ip: HashMap<IpAddr, usize>,
    by_vip: HashMap<IpAddr, usize>,
    endpoints: Vec<Vec<IpAddr>>,
    /// Workload address → index of the waypoint in front of it.
    fronted_by: HashMap<IpAddr, usize>,
    /// Authorization policies, compiled.
    pub policies: Vec<CompiledPolicy>,
}

impl Snapshot {
    /// Indexes `config`. Policies that fail to compile were already refused by validation;
    /// any that slip through are left out and logged.
    pub fn new(config: Arc<Config>) -> Self {
        let mut by_ip = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            for ip in &w.ips {
                by_ip.insert(*ip, i);
            }
        }
        let mut by_vip = HashMap::new();
        let mut endpoints = Vec::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            for vip in &s.vips {
                by_vip.insert(*vip, i);
            }
            endpoints.push(service_endpoints(&config, s));
        }
        let policies = config
            .authorization_policies
            .iter()
            .filter_map(|p| match policy::compile(p) {
                Ok(c) => Some(c),
                Err((field, reason)) => {
                    error!(policy = %p.name, field, reason, "policy left out");
                    None
                }
            })
            .collect();
        let fronted_by = fronted_workloads(&config, &endpoints);
        Snapshot { config, by_ip, by_vip, endpoints, fronted_by, policies }
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip)
            .and_then(|i| self.config.workloads.get(*i))
    }

    /// The waypoint every connection to workload address `ip` must go through.
    pub fn waypoint_in_front_of(&self, ip: IpAddr) -> Option<&Waypoint> {
        self.fronted_by.get(&ip).and_then(|i| self.config.waypoints.get(*i))
    }

    /// The service behind a VIP, with its endpoints.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<(&Service, &[IpAddr])> {
        let i = *self.by_vip.get(&ip)?;
        Some((
            self.config.services.get(i)?,
            self.endpoints.get(i).map(Vec::as_slice).unwrap_or_default(),
        ))
    }
}

/// Which workloads sit behind a waypoint: those in a namespace labelled
/// `ambit.dev/use-waypoint`, and the endpoints of services that use one. Waypoint pods
/// themselves never do: they are the way in.
fn fronted_workloads(config: &Config, endpoints: &[Vec<IpAddr>]) -> HashMap<IpAddr, usize> {
    let index_of = |wp: &Waypoint| config.waypoints.iter().position(|w| std::ptr::eq(w, wp));
    let is_waypoint_pod = |w: &Workload| w.labels.contains_key(WAYPOINT_NAME_LABEL);
    let mut fronted = HashMap::new();
    for w in config.workloads.iter().filter(|w| !is_waypoint_pod(w)) {
        let label = config.namespace(&w.namespace).and_then(|n| n.labels.get(USE_WAYPOINT_LABEL));
        if let Some(i) = label.and_then(|name| config.waypoint(&w.namespace, name)).and_then(index_of) {
            for ip in &w.ips {
                fronted.insert(*ip, i);
            }
        }
    }
    for (s, eps) in config.services.iter().zip(endpoints) {
        if let Some(i) = config.waypoint_for_service(s).and_then(index_of) {
            for ip in eps {
                if config.workload_by_ip(*ip).is_some_and(|w| !is_waypoint_pod(w)) {
                    fronted.insert(*ip, i);
                }
            }
        }
    }
    fronted
}

fn service_endpoints(config: &Config, s: &Service) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Some(selector) = &s.selector {
        for w in &config.workloads {
            if w.namespace == s.namespace
                && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            {
                out.extend(w.ips.iter().filter(|ip| ip.is_ipv4()).copied());
            }
        }
    }
    for ep in s.endpoints.iter().flatten() {
        match (&ep.workload, ep.ip) {
            (Some(name), _) => {
                if let Some(w) = config
                    .workloads
                    .iter()
                    .find(|w| w.namespace == s.namespace && &w.name == name)
                {
                    out.extend(w.ips.iter().filter(|ip| ip.is_ipv4()).copied());
                }
            }
            (None, Some(ip)) => out.push(ip),
            (None, None) => {}
        }
    }
    out
}

/// Keeps a [`Snapshot`] channel in step with the config channel.
pub async fn index(mut config: watch::Receiver<Arc<Config>>, tx: watch::Sender<Arc<Snapshot>>) {
    while config.changed().await.is_ok() {
        let c = config.borrow_and_update().clone();
        tx.send_replace(Arc::new(Snapshot::new(c)));
    }
}
