//! Prometheus metrics, served on 15020 by [`crate::admin`], with Istio's names and labels
//! so existing Grafana and Kiali dashboards work unchanged (`reporter="waypoint"`, as
//! Istio's waypoints report).
//!
//! Under the `istio_` prefix:
//! - `istio_requests_total`: HTTP and gRPC requests, by source, destination, protocol,
//!   `response_code`, `grpc_response_status` and `response_flags`;
//! - `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`:
//!   histograms with the same labels (bodies, in bytes);
//! - `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`: traffic forwarded at
//!   L4 (not HTTP);
//! - `istio_build{component="waypoint"}`.
//!
//! Labels come from the config and the identity mutual TLS proved, never from what a
//! client sends (see [`Source`]). The request and TCP families each hold at most
//! `max_series` label sets (`waypoint run --max-metric-series`, default
//! [`DEFAULT_MAX_SERIES`]); a record that would add one more is counted in the family's
//! *folded* series instead, whose source and destination labels are all `unknown`, and in
//! `ambit_waypoint_metric_series_folded_total{family}`. Totals stay right; only the
//! breakdown of the overflow is lost. A request series costs about 30 KB of `/metrics`
//! text (its counter and three histograms carry 22 labels each), so the cap bounds the
//! scrape as well as the memory.
//!
//! Under `ambit_`: `ambit_waypoint_retries_total{destination, reason, result}` (admitted or
//! refused by the retry budget), `ambit_waypoint_authz_denied_total{policy}` (requests and
//! L4 connections refused by authorization policy), `ambit_config_reloads_total{result}`,
//! `ambit_certificate_renewals_total{reason, result}`, `ambit_ca_reloads_total{file,
//! result}`, and, computed at each scrape, `ambit_certificate_expiry_seconds{kind,
//! identity}` for the waypoint's certificate, the issuer and every root.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use ambit_shared::certs::{CaFile, CertEvents, Certificates, RenewReason};
use ambit_shared::config::index::{Snapshot, canonical};
use ambit_shared::config::watch::ReloadOutcome;
use ambit_shared::identity::Identity;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::route::Target;
use crate::upstream::RetryObserver;
use crate::upstream::retry::Failure;

/// Istio's duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Default cap on label sets per family (see the module docs).
pub const DEFAULT_MAX_SERIES: usize = 2_000;

/// Istio's size buckets, in bytes.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

use ambit_shared::telemetry::{self, CLUSTER_DOMAIN, UNKNOWN, destination_principal, result};

// === labels ===

/// Who sent a request and who served it, with Istio's label names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: &'static str,
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
    destination_cluster: &'static str,
    connection_security_policy: &'static str,
}

/// Labels of the HTTP request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    peers: PeerLabels,
    request_protocol: &'static str,
    response_code: String,
    grpc_response_status: String,
    response_flags: String,
}

/// Labels of the L4 metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    peers: PeerLabels,
    request_protocol: &'static str,
    response_flags: String,
}

/// The client side of a tunnel, worked out once per tunnel.
///
/// Every value comes from the config, picked by the identity mutual TLS proved: a client
/// can never put a string of its own into a label (the tunnel's `baggage` is ignored), so
/// the number of series is bounded by the config, not by what clients send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// Workload name, from the config.
    pub workload: Option<String>,
    /// Its namespace (the identity's when the workload is not known).
    pub namespace: Option<String>,
    /// Canonical service and revision.
    pub canonical: Option<(String, String)>,
    /// The identity mutual TLS proved.
    pub principal: Option<Identity>,
}

impl Source {
    /// Works out the client of a tunnel: the workload at `forwarded` (the address the
    /// source ztunnel says the client has; it pools tunnels per identity, so the TLS peer
    /// may be a sibling pod), else the one at `peer` (the TLS peer's address), each only if
    /// its identity is `principal`. Else only the identity's namespace is known. The
    /// `forwarded` claim can therefore only choose among workloads of the proven identity.
    pub fn new(
        snap: &Snapshot,
        principal: &Identity,
        peer: std::net::IpAddr,
        forwarded: Option<std::net::IpAddr>,
    ) -> Self {
        let mut src = Source {
            principal: Some(principal.clone()),
            namespace: Some(principal.namespace().to_string()),
            ..Source::default()
        };
        let proven = forwarded.into_iter().chain([peer]).find_map(|ip| {
            snap.workload_by_ip(ip)
                .filter(|w| snap.config.identity_of(w).ok().as_ref() == Some(principal))
        });
        if let Some(w) = proven {
            src.workload = Some(w.name.clone());
            src.namespace = Some(w.namespace.clone());
            src.canonical = Some(canonical(w));
        }
        src
    }
}

/// Builds [`PeerLabels`] for a request or connection.
#[derive(Debug, Clone, Copy)]
pub struct Peers<'a> {
    /// The client.
    pub source: &'a Source,
    /// What it dialled.
    pub target: &'a Target,
    /// The endpoint that served it, if one was reached.
    pub endpoint: Option<std::net::IpAddr>,
    /// The identity the endpoint proved (or was required to).
    pub endpoint_identity: Option<&'a Identity>,
}

// === impl PeerLabels ===

impl PeerLabels {
    /// The labels of the folded series: every source and destination label `unknown`.
    fn folded() -> Self {
        let unknown = || UNKNOWN.to_string();
        PeerLabels {
            reporter: "waypoint",
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: UNKNOWN,
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
            destination_cluster: UNKNOWN,
            connection_security_policy: "mutual_tls",
        }
    }
}

impl Peers<'_> {
    /// The label set, looking endpoint workloads up in `snap`.
    pub fn labels(&self, snap: &Snapshot) -> PeerLabels {
        let unknown = || UNKNOWN.to_string();
        let s = self.source;
        let (src_svc, src_rev) = s
            .canonical
            .clone()
            .unwrap_or_else(|| (unknown(), unknown()));
        let mut l = PeerLabels {
            reporter: "waypoint",
            source_workload: s.workload.clone().unwrap_or_else(unknown),
            source_canonical_service: src_svc.clone(),
            source_canonical_revision: src_rev.clone(),
            source_workload_namespace: s.namespace.clone().unwrap_or_else(unknown),
            source_principal: s
                .principal
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(unknown),
            source_app: src_svc,
            source_version: src_rev,
            source_cluster: UNKNOWN,
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
            destination_cluster: UNKNOWN,
            connection_security_policy: "mutual_tls",
        };
        if let Target::Service {
            namespace, name, ..
        } = self.target
        {
            l.destination_service = format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}");
            l.destination_service_name = name.to_string();
            l.destination_service_namespace = namespace.to_string();
        }
        let workload = self.endpoint.and_then(|ip| snap.workload_by_ip(ip));
        if let Some(w) = workload {
            let (svc, rev) = canonical(w);
            l.destination_workload = w.name.clone();
            l.destination_workload_namespace = w.namespace.clone();
            l.destination_app = svc.clone();
            l.destination_canonical_service = svc;
            l.destination_version = rev.clone();
            l.destination_canonical_revision = rev;
        }
        if let Some(p) = destination_principal(snap, self.endpoint_identity, workload) {
            l.destination_principal = p;
        }
        l
    }
}

// === metrics ===

/// What one finished request is recorded with.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// Who and where.
    pub peers: PeerLabels,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The status the client got (0 if none).
    pub status: u16,
    /// gRPC status, for gRPC.
    pub grpc_status: Option<String>,
    /// Istio response flags (`-` when none).
    pub flags: String,
    /// Request duration, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    destination: String,
    reason: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
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
struct AuthzLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiryLabels {
    kind: &'static str,
    identity: String,
}

/// Every metric the waypoint records.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    renewals: Family<RenewalLabels, Counter>,
    ca_reloads: Family<CaReloadLabels, Counter>,
    authz_denied: Family<AuthzLabels, Counter>,
    max_series: usize,
    /// Own (not folded) series of the request families, and of the TCP families.
    request_series: Mutex<usize>,
    tcp_series: Mutex<usize>,
    folded: Family<FamilyLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under `istio_` and `ambit_`,
    /// with the default series cap.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        Metrics::with_max_series(registry, DEFAULT_MAX_SERIES)
    }

    /// [`Metrics::new`] with at most `max_series` (at least 1) label sets per family.
    pub fn with_max_series(registry: &mut Registry, max_series: usize) -> Arc<Self> {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            retries: Family::default(),
            reloads: Family::default(),
            renewals: Family::default(),
            ca_reloads: Family::default(),
            authz_denied: Family::default(),
            max_series: max_series.max(1),
            request_series: Mutex::new(0),
            tcp_series: Mutex::new(0),
            folded: Family::default(),
        };
        for family in ["requests", "tcp"] {
            let _ = m.folded.get_or_create(&FamilyLabels { family });
        }
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Total number of requests", m.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration, in milliseconds",
            m.duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Size of the request body, in bytes",
            m.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Size of the response body, in bytes",
            m.response_bytes.clone(),
        );
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.tcp_closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.tcp_received.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.tcp_sent.clone(),
        );
        telemetry::register_build(istio, "waypoint", env!("CARGO_PKG_VERSION"));
        let ambit = registry.sub_registry_with_prefix("ambit");
        ambit.register(
            "waypoint_retries",
            "Retries by destination and reason; result is admitted, or budget_exhausted when the retry budget refused it",
            m.retries.clone(),
        );
        for result in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result });
        }
        ambit.register(
            "config_reloads",
            "Config file reloads, by result: success (applied) or failure (refused; the last good config stays)",
            m.reloads.clone(),
        );
        ambit.register(
            "certificate_renewals",
            "Certificate renewals, by reason (half_life, issuer_changed) and result",
            m.renewals.clone(),
        );
        ambit.register(
            "ca_reloads",
            "Changes to the CA's files picked up, by file (bundle, issuer) and result; a failure keeps the last good one",
            m.ca_reloads.clone(),
        );
        ambit.register(
            "waypoint_authz_denied",
            "Requests and L4 connections refused by authorization policy, by the policy that decided (the applicable ALLOW policies, comma-joined, when none matched)",
            m.authz_denied.clone(),
        );
        ambit.register(
            "waypoint_metric_series_folded",
            "Records counted in a family's folded series (source and destination labels unknown) because the family reached its series cap, by family (requests, tcp)",
            m.folded.clone(),
        );
        Arc::new(m)
    }

    /// Whether `labels` have (or now get) a series of their own in `family`, whose own
    /// series `count` counts; false once the cap is reached. The lock is taken only when
    /// a label set is new, and makes the count exact.
    fn own_series<S: Clone + Hash + Eq>(
        &self,
        family: &Family<S, Counter>,
        labels: &S,
        count: &Mutex<usize>,
    ) -> bool {
        if family.get(labels).is_some() {
            return true;
        }
        let mut n = count.lock();
        if family.get(labels).is_some() {
            return true;
        }
        if *n >= self.max_series {
            return false;
        }
        *n += 1;
        let _ = family.get_or_create(labels);
        true
    }

    /// Counts a record of `family` that went to the folded series.
    fn fold(&self, family: &'static str) {
        self.folded.get_or_create(&FamilyLabels { family }).inc();
    }

    /// Counts a request or connection refused by authorization `policy`.
    pub fn authz_denied(&self, policy: &str) {
        self.authz_denied
            .get_or_create(&AuthzLabels {
                policy: policy.to_string(),
            })
            .inc();
    }

    /// Registers `ambit_certificate_expiry_seconds`, read from `certs` at each scrape.
    pub fn register_expiry(registry: &mut Registry, certs: Certificates) {
        registry
            .sub_registry_with_prefix("ambit")
            .register_collector(Box::new(ExpiryCollector(certs)));
    }

    /// Records a finished request.
    pub fn request(&self, o: RequestOutcome) {
        let mut labels = RequestLabels {
            peers: o.peers,
            request_protocol: o.protocol,
            response_code: o.status.to_string(),
            // The endpoint writes `grpc-status`; only a number is a gRPC status.
            grpc_response_status: o
                .grpc_status
                .filter(|s| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
                .unwrap_or_default(),
            response_flags: o.flags,
        };
        // The common case, a label set seen before, hashes the labels once for the check
        // and the count together.
        let counted = self.requests.get(&labels).map(|c| c.inc()).is_some();
        if !counted {
            if !self.own_series(&self.requests, &labels, &self.request_series) {
                self.fold("requests");
                labels.peers = PeerLabels::folded();
            }
            self.requests.get_or_create(&labels).inc();
        }
        self.duration.get_or_create(&labels).observe(o.duration_ms);
        self.request_bytes
            .get_or_create(&labels)
            .observe(o.request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(o.response_bytes as f64);
    }

    /// The TCP families' labels for `peers`: its own, or the folded ones over the cap
    /// (counted once per connection, when it opens). `tcp_connections_opened` holds every
    /// peer set the other TCP families use, so it decides for all of them.
    fn tcp_labels(&self, peers: PeerLabels, opening: bool) -> TcpLabels {
        let labels = TcpLabels {
            peers,
            request_protocol: "tcp",
            response_flags: "-".into(),
        };
        if self.own_series(&self.tcp_opened, &labels, &self.tcp_series) {
            return labels;
        }
        if opening {
            self.fold("tcp");
        }
        TcpLabels {
            peers: PeerLabels::folded(),
            ..labels
        }
    }

    /// Counts an L4 connection as opened.
    pub fn tcp_opened(&self, peers: PeerLabels) {
        let labels = self.tcp_labels(peers, true);
        self.tcp_opened.get_or_create(&labels).inc();
    }

    /// Counts an L4 connection as closed, with its bytes each way.
    pub fn tcp_closed(&self, peers: PeerLabels, flags: &str, received: u64, sent: u64) {
        let opened = self.tcp_labels(peers, false);
        self.tcp_received.get_or_create(&opened).inc_by(received);
        self.tcp_sent.get_or_create(&opened).inc_by(sent);
        let closed = TcpLabels {
            response_flags: flags.to_string(),
            ..opened
        };
        self.tcp_closed.get_or_create(&closed).inc();
    }

    /// Counts a config file change, applied or refused.
    pub fn config_reload(&self, outcome: ReloadOutcome) {
        let result = match outcome {
            ReloadOutcome::Applied => "success",
            ReloadOutcome::Refused => "failure",
        };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

impl CertEvents for Metrics {
    fn renewal(&self, reason: RenewReason, ok: bool) {
        self.renewals
            .get_or_create(&RenewalLabels {
                reason: reason.as_str(),
                result: result(ok),
            })
            .inc();
    }

    fn ca_reload(&self, file: CaFile, ok: bool) {
        self.ca_reloads
            .get_or_create(&CaReloadLabels {
                file: file.as_str(),
                result: result(ok),
            })
            .inc();
    }
}

#[derive(Debug)]
struct ExpiryCollector(Certificates);

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "certificate_expiry_seconds",
            "Seconds until a certificate in use expires: kind is leaf (the waypoint's), issuer or root",
            None,
            MetricType::Gauge,
        )?;
        for e in self.0.expiries() {
            let labels = ExpiryLabels {
                kind: e.kind.as_str(),
                identity: e.identity,
            };
            ConstGauge::new(e.seconds_left).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl RetryObserver for Metrics {
    fn retry(&self, destination: &str, failure: Failure, admitted: bool) {
        self.retries
            .get_or_create(&RetryLabels {
                destination: destination.to_string(),
                reason: failure.as_str(),
                result: if admitted {
                    "admitted"
                } else {
                    "budget_exhausted"
                },
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_shared::telemetry::encode;
    use std::path::Path;

    const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }]
workloads:
  - { name: client-1, namespace: shop, serviceAccount: client, ips: [10.1.1.9], node: a, labels: { app: client } }
  - { name: web-1, namespace: shop, serviceAccount: web, ips: [10.1.1.2], node: a, labels: { app: web, version: v1 } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80, targetPort: 8080 }], selector: { app: web } }
"#;

    fn snapshot() -> Snapshot {
        let c = ambit_shared::config::parse_str(Path::new("t.yaml"), CONFIG).expect("config");
        Snapshot::new(Arc::new(c))
    }

    fn id(s: &str) -> Identity {
        s.parse().expect("identity")
    }

    #[test]
    fn sources_come_from_the_config_for_the_proven_identity() {
        let snap = snapshot();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let s = Source::new(&snap, &client, ip("10.1.1.9"), None);
        assert_eq!(s.workload.as_deref(), Some("client-1"));
        assert_eq!(s.canonical, Some(("client".into(), "latest".into())));
        // `forwarded` may name the workload when its identity is the proven one...
        let s = Source::new(&snap, &client, ip("10.9.9.9"), Some(ip("10.1.1.9")));
        assert_eq!(s.workload.as_deref(), Some("client-1"));
        // ...but never a workload of another identity: then only the namespace is known.
        let other = id("spiffe://cluster.local/ns/shop/sa/other");
        for forwarded in [None, Some(ip("10.1.1.9")), Some(ip("10.1.1.2"))] {
            let s = Source::new(&snap, &other, ip("10.1.1.9"), forwarded);
            assert_eq!(s.workload, None);
            assert_eq!(s.canonical, None);
            assert_eq!(s.namespace.as_deref(), Some("shop"));
        }
    }

    #[test]
    fn series_are_capped_and_the_rest_folded() {
        let snap = snapshot();
        let mut registry = Registry::default();
        let m = Metrics::with_max_series(&mut registry, 2);
        let target = Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
            port: 80,
            target_port: 8080,
            port_name: None,
        };
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let source = Source::new(&snap, &client, "10.1.1.9".parse().expect("ip"), None);
        let peers = Peers {
            source: &source,
            target: &target,
            endpoint: None,
            endpoint_identity: None,
        }
        .labels(&snap);
        for status in [200, 201, 202, 203, 200, 204] {
            m.request(RequestOutcome {
                peers: peers.clone(),
                protocol: "http",
                status,
                grpc_status: Some("not a number".into()),
                flags: "-".into(),
                duration_ms: 1.0,
                request_bytes: 0,
                response_bytes: 0,
            });
        }
        for _ in 0..3 {
            m.tcp_opened(peers.clone());
            m.tcp_closed(peers.clone(), "-", 1, 1);
        }
        let text = encode(&registry).expect("encodes");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        // 200 and 201 got their own series (200 twice); 202, 203 and 204 were folded,
        // and the folded series keeps its response code.
        assert_eq!(series.len(), 5, "{series:#?}");
        let total: f64 = series
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 6.0, "no request is lost");
        assert!(
            series
                .iter()
                .filter(|l| l.contains(r#"source_workload="unknown""#))
                .count()
                == 3
        );
        assert!(
            !text.contains("not a number"),
            "grpc status must be numeric"
        );
        assert!(text.contains(r#"ambit_waypoint_metric_series_folded_total{family="requests"} 3"#));
        assert!(text.contains(r#"ambit_waypoint_metric_series_folded_total{family="tcp"} 0"#));
    }

    #[test]
    fn request_metrics_carry_istio_labels() {
        let snap = snapshot();
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let source = Source::new(&snap, &client, "10.1.1.9".parse().expect("ip"), None);
        let target = Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
            port: 80,
            target_port: 8080,
            port_name: None,
        };
        let peers = Peers {
            source: &source,
            target: &target,
            endpoint: Some("10.1.1.2".parse().expect("ip")),
            endpoint_identity: None,
        }
        .labels(&snap);
        for _ in 0..3 {
            m.request(RequestOutcome {
                peers: peers.clone(),
                protocol: "http",
                status: 200,
                grpc_status: None,
                flags: "-".into(),
                duration_ms: 3.0,
                request_bytes: 0,
                response_bytes: 15,
            });
        }
        m.retry("shop/web", Failure::Connect, true);
        let text = encode(&registry).expect("encodes");
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect("requests counter");
        for want in [
            r#"reporter="waypoint""#,
            r#"source_workload="client-1""#,
            r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#,
            r#"destination_service="web.shop.svc.cluster.local""#,
            r#"destination_workload="web-1""#,
            r#"destination_principal="spiffe://cluster.local/ns/shop/sa/web""#,
            r#"destination_version="v1""#,
            r#"request_protocol="http""#,
            r#"response_code="200""#,
            r#"response_flags="-""#,
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(line.ends_with(" 3"), "{line}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(text.contains("istio_response_bytes_sum{"));
        assert!(text.contains(r#"ambit_waypoint_retries_total{destination="shop/web",reason="connect_failure",result="admitted"} 1"#));
        assert!(text.contains(r#"istio_build{component="waypoint""#));
    }
}
