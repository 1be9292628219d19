//! Prometheus metrics, served in the text format on 15020 by [`crate::admin`].
//!
//! The registry is created in `app.rs`; each group here registers under a prefixed
//! sub-registry:
//!
//! - [`Traffic`] (`istio_`): Istio's TCP metrics, `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total` and
//!   `istio_tcp_sent_bytes_total`, with the label set of Istio's node tunnel, so existing
//!   Grafana and Kiali dashboards work unchanged. Like Istio, "received" is what the client
//!   sent (request bytes) and "sent" what it got back (response bytes), for both reporters.
//!   Connections are recorded through a drop guard ([`ConnectionMeter`]), so one whose task
//!   is cancelled still counts as closed, and the bytes of open connections are added up at
//!   each scrape, so long-lived connections show their traffic before they end.
//! - [`ConfigReloads`] (`ambit_`): config file reloads by result.
//! - [`CaptureMetrics`] (`ambit_`): namespace lookups that failed (and so changed nothing).
//! - [`CertMetrics`] (`ambit_`): certificate renewals and CA file reloads; with
//!   [`register_expiry`], the time left on every leaf, issuer and root, computed at scrape.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ambit_shared::certs::{CaFile, CertEvents, CertKind, Certificates, Expiry, RenewReason};
use ambit_shared::config::index::{Snapshot, canonical};
use ambit_shared::config::watch::ReloadOutcome;
use ambit_shared::config::{Service, Workload};
use ambit_shared::copy::Counters;
use ambit_shared::identity::Identity;
use ambit_shared::telemetry::{self, CLUSTER_DOMAIN, UNKNOWN, destination_principal};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Registers `istio_build{component="ztunnel", tag=<version>} 1`, as Istio does.
pub fn register_build(registry: &mut Registry) {
    telemetry::register_build(registry, "ztunnel", env!("CARGO_PKG_VERSION"));
}

// === traffic ===

/// Which side of a connection reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The source's node tunnel (outbound).
    Source,
    /// The destination's node tunnel (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Why a connection ended badly, in Istio's `response_flags` vocabulary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// Nothing to report (`-`).
    #[default]
    None,
    /// Refused or closed by authorization policy (`DENY`).
    Deny,
    /// The upstream could not be reached, or the connection failed before any byte
    /// flowed (`CONNECT`).
    ConnectFailure,
}

impl ResponseFlags {
    fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::ConnectFailure => "CONNECT",
        }
    }
}

/// The labels of Istio's TCP metrics, with Istio's names and order. Values we cannot know
/// are `unknown`, as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// What a connection's labels are derived from.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// Who reports.
    pub reporter: Reporter,
    /// The client's address.
    pub src: SocketAddr,
    /// The client identity proved by mutual TLS (inbound), or presented by us (outbound).
    pub src_identity: Option<&'a Identity>,
    /// The address the client dialled: a pod, or a service VIP.
    pub dst: SocketAddr,
    /// The endpoint actually reached, when it differs from `dst` (a service's backend).
    pub endpoint: Option<IpAddr>,
    /// The identity the destination proved or was expected to prove.
    pub dst_identity: Option<&'a Identity>,
    /// Whether the connection is carried over mutual TLS (HBONE).
    pub mtls: bool,
}

impl TrafficLabels {
    /// Derives the labels of a connection from the config in force.
    pub fn new(snap: &Snapshot, f: &ConnectionFacts<'_>) -> Self {
        let unknown = || UNKNOWN.to_string();
        let mut l = TrafficLabels {
            reporter: f.reporter.as_str(),
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_workload: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_cluster: unknown(),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None.as_str(),
            connection_security_policy: if f.mtls { "mutual_tls" } else { UNKNOWN },
        };
        if let Some(w) = snap.workload_by_ip(f.src.ip()) {
            let (service, revision) = canonical(w);
            l.source_workload = w.name.clone();
            l.source_workload_namespace = w.namespace.clone();
            l.source_app = service.clone();
            l.source_canonical_service = service;
            l.source_version = revision.clone();
            l.source_canonical_revision = revision;
        }
        // Only an identity that mutual TLS vouches for is a principal.
        if let (true, Some(id)) = (f.mtls, f.src_identity) {
            l.source_principal = id.to_string();
        }
        let endpoint = f.endpoint.unwrap_or(f.dst.ip());
        let dst_workload = snap.workload_by_ip(endpoint);
        if let Some(w) = dst_workload {
            let (service, revision) = canonical(w);
            l.destination_workload = w.name.clone();
            l.destination_workload_namespace = w.namespace.clone();
            l.destination_app = service.clone();
            l.destination_canonical_service = service;
            l.destination_version = revision.clone();
            l.destination_canonical_revision = revision;
        }
        if let Some(p) = destination_principal(snap, f.dst_identity, dst_workload) {
            l.destination_principal = p;
        }
        let service = match snap.service_by_vip(f.dst.ip()) {
            Some((s, _)) => Some(s),
            None => dst_workload.and_then(|w| guess_service(snap, w, f.dst.port())),
        };
        if let Some(s) = service {
            l.destination_service = format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace);
            l.destination_service_name = s.name.clone();
            l.destination_service_namespace = s.namespace.clone();
        }
        l
    }

    fn with_flags(&self, flags: ResponseFlags) -> Self {
        TrafficLabels {
            response_flags: flags.as_str(),
            ..self.clone()
        }
    }
}

/// The service a connection straight to a workload was most likely meant for: one that
/// selects the workload and targets the port, as Istio guesses on inbound.
fn guess_service<'a>(snap: &'a Snapshot, w: &Workload, port: u16) -> Option<&'a Service> {
    snap.config.services.iter().find(|s| {
        let targets_port = s
            .ports
            .iter()
            .any(|p| p.target_port.unwrap_or(p.port) == port);
        let selects = s.namespace == w.namespace
            && (s
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                || s.endpoints.iter().flatten().any(|e| {
                    e.workload.as_deref() == Some(w.name.as_str())
                        || e.ip.is_some_and(|ip| w.ips.contains(&ip))
                }));
        targets_port && selects
    })
}

/// Istio's TCP metrics. Registered as a collector, so open connections' bytes are added
/// up at each scrape.
#[derive(Default)]
pub struct Traffic {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    received: Family<TrafficLabels, Counter>,
    sent: Family<TrafficLabels, Counter>,
    live: Mutex<HashMap<u64, Arc<Live>>>,
    next_id: AtomicU64,
}

/// An open connection's byte counters and what of them the metrics already hold.
#[derive(Debug)]
struct Live {
    counters: Arc<Counters>,
    received: Counter,
    sent: Counter,
    reported_received: AtomicU64,
    reported_sent: AtomicU64,
}

impl Live {
    /// Adds what the connection moved since the last flush. Safe to race with itself:
    /// `fetch_max` hands each byte to exactly one caller.
    fn flush(&self) {
        let (a_to_b, b_to_a) = self.counters.get();
        let before = self.reported_received.fetch_max(a_to_b, Ordering::AcqRel);
        self.received.inc_by(a_to_b.saturating_sub(before));
        let before = self.reported_sent.fetch_max(b_to_a, Ordering::AcqRel);
        self.sent.inc_by(b_to_a.saturating_sub(before));
    }
}

impl Traffic {
    /// Creates the metrics and registers them in `registry` (meant to be prefixed `istio`).
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let traffic = Arc::new(Traffic::default());
        registry.register_collector(Box::new(TrafficCollector(traffic.clone())));
        traffic
    }

    /// Counts a connection as opened and starts metering `counters` (client→server as
    /// received bytes, server→client as sent bytes). The connection counts as closed when
    /// the returned guard drops.
    pub fn open(
        self: &Arc<Self>,
        labels: TrafficLabels,
        counters: Arc<Counters>,
    ) -> ConnectionMeter {
        self.opened.get_or_create(&labels).inc();
        let live = Arc::new(Live {
            counters,
            received: self.received.get_or_create(&labels).clone(),
            sent: self.sent.get_or_create(&labels).clone(),
            reported_received: AtomicU64::new(0),
            reported_sent: AtomicU64::new(0),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(id, live.clone());
        ConnectionMeter {
            traffic: self.clone(),
            id,
            live,
            labels,
            flags: ResponseFlags::None,
        }
    }

    fn flush_live(&self) {
        let live: Vec<Arc<Live>> = self.live.lock().values().cloned().collect();
        for l in live {
            l.flush();
        }
    }

    /// Connections being metered now.
    pub fn open_connections(&self) -> usize {
        self.live.lock().len()
    }
}

impl fmt::Debug for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The families can hold thousands of series; the count is what a debug print needs.
        f.debug_struct("Traffic")
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct TrafficCollector(Arc<Traffic>);

impl Collector for TrafficCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let t = &self.0;
        t.flush_live();
        let families = [
            (
                "tcp_connections_opened",
                "The total number of TCP connections opened",
                &t.opened,
            ),
            (
                "tcp_connections_closed",
                "The total number of TCP connections closed",
                &t.closed,
            ),
            (
                "tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
                &t.received,
            ),
            (
                "tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
                &t.sent,
            ),
        ];
        for (name, help, family) in families {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            family.encode(metric)?;
        }
        Ok(())
    }
}

/// One connection's metrics. Dropping it adds its last bytes and counts it as closed, so a
/// connection whose task is cancelled is still recorded.
#[derive(Debug)]
pub struct ConnectionMeter {
    traffic: Arc<Traffic>,
    id: u64,
    live: Arc<Live>,
    labels: TrafficLabels,
    flags: ResponseFlags,
}

impl ConnectionMeter {
    /// The response flags the close is recorded with (as in Istio, only the closed counter
    /// carries them).
    pub fn set_flags(&mut self, flags: ResponseFlags) {
        self.flags = flags;
    }
}

impl Drop for ConnectionMeter {
    fn drop(&mut self) {
        self.traffic.live.lock().remove(&self.id);
        self.live.flush();
        self.traffic
            .closed
            .get_or_create(&self.labels.with_flags(self.flags))
            .inc();
    }
}

// === config ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `ambit_config_reloads_total{result="success|failure"}`: config file changes applied, or
/// refused because the file did not parse or validate.
#[derive(Clone, Debug, Default)]
pub struct ConfigReloads(Family<ResultLabels, Counter>);

impl ConfigReloads {
    /// Creates the counter and registers it in `registry` (meant to be prefixed `ambit`).
    pub fn new(registry: &mut Registry) -> Self {
        let reloads = ConfigReloads::default();
        // Both series exist from the start, so a dashboard sees 0, not "no data".
        for result in ["success", "failure"] {
            let _ = reloads.0.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "config_reloads",
            "Config file reloads, by result: success (applied) or failure (refused; the last good config stays)",
            reloads.0.clone(),
        );
        reloads
    }

    /// A changed file was applied.
    pub fn success(&self) {
        self.0
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
    }

    /// A changed file was refused.
    pub fn failure(&self) {
        self.0
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
    }

    /// Counts a change as [`ConfigReloads::success`] or [`ConfigReloads::failure`].
    pub fn record(&self, outcome: ReloadOutcome) {
        match outcome {
            ReloadOutcome::Applied => self.success(),
            ReloadOutcome::Refused => self.failure(),
        }
    }
}

// === capture ===

/// Capture control's own health.
#[derive(Clone, Debug, Default)]
pub struct CaptureMetrics {
    /// `ambit_netns_lookup_errors_total`: network namespaces that could not be inspected while
    /// looking for pods (out of file descriptors, a failed `setns`). Such a failure never
    /// un-enrolls a pod; a rising count says the node is short of something.
    pub netns_lookup_errors: Counter,
}

impl CaptureMetrics {
    /// Creates the counters and registers them in `registry` (meant to be prefixed `ambit`).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = CaptureMetrics::default();
        registry.register(
            "netns_lookup_errors",
            "Network namespaces that could not be inspected while looking for pods; such a failure never un-enrolls a pod",
            metrics.netns_lookup_errors.clone(),
        );
        metrics
    }
}

// === certificates ===

/// Anything that can list the certificates in use, asked at each scrape.
pub trait ExpirySource: fmt::Debug + Send + Sync + 'static {
    /// Every leaf, the issuer and every root, with their time left now.
    fn expiries(&self) -> Vec<Expiry>;
}

impl ExpirySource for Certificates {
    fn expiries(&self) -> Vec<Expiry> {
        Certificates::expiries(self)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    reason: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaReloadLabels {
    file: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiryLabels {
    kind: &'static str,
    identity: String,
}

/// Certificate renewals and reloads of the CA's files.
#[derive(Clone, Debug, Default)]
pub struct CertMetrics {
    renewals: Family<RenewalLabels, Counter>,
    ca_reloads: Family<CaReloadLabels, Counter>,
}

impl CertMetrics {
    /// Creates the counters and registers them in `registry` (meant to be prefixed `ambit`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = CertMetrics::default();
        registry.register(
            "certificate_renewals",
            "Workload certificate renewals, by reason (half_life, issuer_changed) and result",
            m.renewals.clone(),
        );
        registry.register(
            "ca_reloads",
            "Changes to the CA's files picked up, by file (bundle, issuer) and result; a failure keeps the last good one",
            m.ca_reloads.clone(),
        );
        m
    }
}

impl CertEvents for CertMetrics {
    fn renewal(&self, reason: RenewReason, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.renewals
            .get_or_create(&RenewalLabels {
                reason: reason.as_str(),
                result,
            })
            .inc();
    }

    fn ca_reload(&self, file: CaFile, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.ca_reloads
            .get_or_create(&CaReloadLabels {
                file: file.as_str(),
                result,
            })
            .inc();
    }
}

/// Registers `ambit_certificate_expiry_seconds{kind, identity}` and
/// `ambit_trust_bundle_roots`, computed from `source` at each scrape.
pub fn register_expiry(registry: &mut Registry, source: Arc<dyn ExpirySource>) {
    registry.register_collector(Box::new(ExpiryCollector(source)));
}

#[derive(Debug)]
struct ExpiryCollector(Arc<dyn ExpirySource>);

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let expiries = self.0.expiries();
        let mut metric = encoder.encode_descriptor(
            "certificate_expiry_seconds",
            "Seconds until a certificate in use expires: kind is leaf (workload), issuer or root (trust bundle)",
            None,
            MetricType::Gauge,
        )?;
        for e in &expiries {
            let labels = ExpiryLabels {
                kind: e.kind.as_str(),
                identity: e.identity.clone(),
            };
            ConstGauge::new(e.seconds_left).encode(metric.encode_family(&labels)?)?;
        }
        let roots = expiries.iter().filter(|e| e.kind == CertKind::Root).count();
        let metric = encoder.encode_descriptor(
            "trust_bundle_roots",
            "Roots in the trust bundle in force",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(roots as i64).encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
