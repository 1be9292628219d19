//! What both proxies' Prometheus metrics share: the text encoding, Istio's label
//! conventions and the build info gauge. Each proxy keeps its own metric families.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::Workload;
use crate::config::index::Snapshot;
use crate::identity::Identity;

/// Istio's default cluster DNS domain, used to name services in `destination_service`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The value of a label we have nothing for, as Istio writes it.
pub const UNKNOWN: &str = "unknown";

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes every metric in `registry` in the OpenMetrics text format Prometheus scrapes.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// `success` or `failure`, the `result` label of reload and renewal counters.
pub fn result(ok: bool) -> &'static str {
    if ok { "success" } else { "failure" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// Registers `build{component=<component>, tag=<tag>} 1` (`istio_build` under the
/// `istio` prefix), as Istio does.
pub fn register_build(registry: &mut Registry, component: &'static str, tag: &'static str) {
    let build: Family<BuildLabels, Gauge> = Family::default();
    build.get_or_create(&BuildLabels { component, tag }).set(1);
    registry.register("build", "Istio component build info", build);
}

/// The `destination_principal` of a connection: the identity the destination proved (or
/// was expected to prove), else the identity of the workload reached, per the config.
pub fn destination_principal(
    snap: &Snapshot,
    proven: Option<&Identity>,
    workload: Option<&Workload>,
) -> Option<String> {
    match (proven, workload) {
        (Some(id), _) => Some(id.to_string()),
        (None, Some(w)) => snap.config.identity_of(w).ok().map(|id| id.to_string()),
        (None, None) => None,
    }
}
