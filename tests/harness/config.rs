//! The YAML config that ztunnel reads in file mode, as typed values.
//!
//! The shape (camelCase keys) is:
//!
//! ```yaml
//! trustDomain: cluster.local
//! namespaces:
//!   - name: shop
//!     labels: { ambit.dev/dataplane-mode: ambient }
//! workloads:
//!   - name: web-1
//!     namespace: shop
//!     serviceAccount: web
//!     ips: [10.100.1.2]
//!     node: node-a
//!     labels: { app: web }
//! services: []
//! ```
//!
//! The [`Cluster`](crate::Cluster) keeps one [`Config`] in step with its pods
//! and writes it atomically, so ztunnel's file watcher never reads a
//! half-written file. Services and any other top-level sections (policies,
//! waypoints, …) are kept as raw YAML until the model settles, so scenarios
//! can use new config kinds without waiting for the harness.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// The namespace label that enrolls a namespace (or, on a pod, opts it out
/// with `none`).
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";
/// The value of [`DATAPLANE_MODE`] that enrolls.
pub const AMBIENT: &str = "ambient";
/// The value of [`DATAPLANE_MODE`] that opts a pod out.
pub const NONE: &str = "none";
/// The label that sends traffic through a waypoint.
pub const USE_WAYPOINT: &str = "ambit.dev/use-waypoint";

/// Labels, sorted so the written file is deterministic.
pub type Labels = BTreeMap<String, String>;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Namespaces and their labels.
    pub namespaces: Vec<Namespace>,
    /// One entry per pod.
    pub workloads: Vec<Workload>,
    /// Services, as raw YAML mappings.
    pub services: Vec<serde_yaml_ng::Value>,
    /// Any other top-level sections, written as given.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml_ng::Value>,
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// Its labels, e.g. [`DATAPLANE_MODE`]`: `[`AMBIENT`].
    #[serde(default)]
    pub labels: Labels,
}

/// A workload (pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// The pod name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its service account (the `sa` of its SPIFFE identity).
    pub service_account: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// The node it runs on.
    pub node: String,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
}

// === impl Config ===

impl Config {
    /// An empty config for `trust_domain`.
    pub fn new(trust_domain: impl Into<String>) -> Config {
        Config {
            trust_domain: trust_domain.into(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// The namespace `name`, created without labels if missing.
    pub fn namespace_mut(&mut self, name: &str) -> &mut Namespace {
        let idx = match self.namespaces.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                self.namespaces.push(Namespace {
                    name: name.to_string(),
                    labels: Labels::new(),
                });
                self.namespaces.len() - 1
            }
        };
        &mut self.namespaces[idx]
    }

    /// The workload `namespace/name`, if present.
    pub fn workload_mut(&mut self, namespace: &str, name: &str) -> Option<&mut Workload> {
        self.workloads
            .iter_mut()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// Serializes to YAML.
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml_ng::to_string(self).context("serializing config")
    }

    /// Writes the YAML to `path` atomically: a temp file in the same
    /// directory, fsynced, then renamed over `path`.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let yaml = self.to_yaml()?;
        let dir = path
            .parent()
            .context("config path has no parent directory")?;
        let name = path
            .file_name()
            .context("config path has no file name")?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(yaml.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().context("fsync config")?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }
}

/// Builds a [`Labels`] map from pairs.
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_expected_shape() {
        let mut c = Config::new("cluster.local");
        c.namespace_mut("shop")
            .labels
            .insert(DATAPLANE_MODE.into(), AMBIENT.into());
        c.workloads.push(Workload {
            name: "web-1".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            ips: vec!["10.100.1.2".parse().expect("literal IP")],
            node: "node-a".into(),
            labels: labels([("app", "web")]),
        });
        let yaml = c.to_yaml().expect("config serializes");
        let expected = "\
trustDomain: cluster.local
namespaces:
- name: shop
  labels:
    ambit.dev/dataplane-mode: ambient
workloads:
- name: web-1
  namespace: shop
  serviceAccount: web
  ips:
  - 10.100.1.2
  node: node-a
  labels:
    app: web
services: []
";
        assert_eq!(yaml, expected);
        let back: Config = serde_yaml_ng::from_str(&yaml).expect("round trip");
        assert_eq!(back, c);
    }

    #[test]
    fn extra_sections_are_written() {
        let mut c = Config::new("td");
        c.extra
            .insert("policies".into(), serde_yaml_ng::Value::Sequence(vec![]));
        assert!(c.to_yaml().expect("serializes").contains("policies: []"));
    }
}
