//! Counters and gauges of the resilience features, registered under `ambit_waypoint_`.
//! Requests refused or answered by them are also in `istio_requests_total` with their
//! response flag (`UO`, `RL`, `FI`, `DI`), like any other request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    destination_service: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    policy: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorLabels {
    destination_service: String,
    result: &'static str,
}

/// Resilience telemetry. Cheap to clone: the families are shared handles.
#[derive(Debug, Clone, Default)]
pub struct ResilienceMetrics {
    overflow: Family<LimitLabels, Counter>,
    ejected: Family<ServiceLabels, Gauge>,
    ejections: Family<ServiceLabels, Counter>,
    rate_limited: Family<PolicyLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
}

impl ResilienceMetrics {
    /// Adds the families to `registry` (the waypoint's, served on `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        let ambit = registry.sub_registry_with_prefix("ambit");
        ambit.register(
            "waypoint_circuit_breaker_overflow",
            "Requests refused (503, flag UO) or retries not attempted because a connection-pool limit of the destination service was reached, by limit",
            self.overflow.clone(),
        );
        ambit.register(
            "waypoint_ejected_endpoints",
            "Endpoints of the destination service currently ejected by outlier detection",
            self.ejected.clone(),
        );
        ambit.register(
            "waypoint_outlier_ejections",
            "Ejections of endpoints by outlier detection",
            self.ejections.clone(),
        );
        ambit.register(
            "waypoint_rate_limited",
            "Requests refused by a local rate limit (429, flag RL), by traffic policy",
            self.rate_limited.clone(),
        );
        ambit.register(
            "waypoint_faults_injected",
            "Requests delayed (kind delay, flag DI) or aborted (kind abort, flag FI) by fault injection",
            self.faults.clone(),
        );
        ambit.register(
            "waypoint_mirrored_requests",
            "Request copies for RequestMirror, by result: sent, failed, skipped_body (body too large or incomplete), skipped_busy (too many in flight)",
            self.mirrored.clone(),
        );
    }

    /// A connection-pool limit (`max_requests`, `max_pending_requests`, `max_connections`,
    /// `max_retries`) refused a request or a retry.
    pub fn overflow(&self, destination: &str, limit: &'static str) {
        self.overflow
            .get_or_create(&LimitLabels {
                destination_service: destination.to_string(),
                limit,
            })
            .inc();
    }

    /// The number of ejected endpoints of `destination` is now `n`.
    pub fn set_ejected(&self, destination: &str, n: usize) {
        self.ejected
            .get_or_create(&ServiceLabels {
                destination_service: destination.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An endpoint of `destination` was ejected.
    pub fn ejection(&self, destination: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                destination_service: destination.to_string(),
            })
            .inc();
    }

    /// A request was refused by the rate limit of `policy` (`namespace/name`).
    pub fn rate_limited(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .inc();
    }

    /// A fault (`delay` or `abort`) of `policy` was injected.
    pub fn fault(&self, policy: &str, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                policy: policy.to_string(),
                kind,
            })
            .inc();
    }

    /// A mirror copy to `destination` ended with `result`.
    pub fn mirrored(&self, destination: &str, result: &'static str) {
        self.mirrored
            .get_or_create(&MirrorLabels {
                destination_service: destination.to_string(),
                result,
            })
            .inc();
    }
}
