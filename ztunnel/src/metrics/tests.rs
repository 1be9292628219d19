use std::path::Path;
use std::sync::atomic::Ordering;

use ambit_shared::telemetry::encode;

use super::*;

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient }
  - name: legacy
workloads:
  - { name: client-1, namespace: shop, serviceAccount: client, ips: [10.0.1.2], node: a, labels: { app: client, version: v2 } }
  - { name: api-1, namespace: shop, serviceAccount: api, ips: [10.0.2.2], node: b, labels: { app: api } }
  - { name: db, namespace: legacy, ips: [10.0.2.3], node: b }
services:
  - name: api
    namespace: shop
    vips: [10.96.0.10]
    ports: [{ port: 80, targetPort: 8080 }]
    selector: { app: api }
"#;

fn snapshot() -> Snapshot {
    let config = ambit_shared::config::parse_str(Path::new("test.yaml"), CONFIG).expect("valid");
    Snapshot::new(Arc::new(config))
}

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// The value of the one sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn outbound_hbone_to_a_service_gets_istio_labels() {
    let snap = snapshot();
    let client = id("spiffe://cluster.local/ns/shop/sa/client");
    let api = id("spiffe://cluster.local/ns/shop/sa/api");
    let l = TrafficLabels::new(
        &snap,
        &ConnectionFacts {
            reporter: Reporter::Source,
            src: addr("10.0.1.2:40000"),
            src_identity: Some(&client),
            dst: addr("10.96.0.10:80"),
            endpoint: Some("10.0.2.2".parse().expect("ip")),
            dst_identity: Some(&api),
            mtls: true,
        },
    );
    assert_eq!(l.reporter, "source");
    assert_eq!(l.source_workload, "client-1");
    assert_eq!(l.source_workload_namespace, "shop");
    assert_eq!(l.source_app, "client");
    assert_eq!(l.source_canonical_service, "client");
    assert_eq!(l.source_version, "v2");
    assert_eq!(l.source_principal, client.to_string());
    assert_eq!(l.destination_workload, "api-1");
    assert_eq!(l.destination_canonical_revision, "latest");
    assert_eq!(l.destination_principal, api.to_string());
    assert_eq!(l.destination_service, "api.shop.svc.cluster.local");
    assert_eq!(l.destination_service_name, "api");
    assert_eq!(l.destination_service_namespace, "shop");
    assert_eq!(l.connection_security_policy, "mutual_tls");
    assert_eq!(l.response_flags, "-");
    assert_eq!(l.request_protocol, "tcp");
}

#[test]
fn plaintext_has_no_principal_and_inbound_guesses_the_service() {
    let snap = snapshot();
    let client = id("spiffe://cluster.local/ns/shop/sa/client");
    // Passthrough to a workload outside the mesh: no mTLS, so no source principal; the
    // destination principal is the workload's identity, as Istio reports it.
    let l = TrafficLabels::new(
        &snap,
        &ConnectionFacts {
            reporter: Reporter::Source,
            src: addr("10.0.1.2:40000"),
            src_identity: Some(&client),
            dst: addr("10.0.2.3:5432"),
            endpoint: None,
            dst_identity: None,
            mtls: false,
        },
    );
    assert_eq!(l.source_principal, "unknown");
    assert_eq!(l.destination_workload, "db");
    assert_eq!(
        l.destination_principal,
        "spiffe://cluster.local/ns/legacy/sa/default"
    );
    assert_eq!(l.destination_service, "unknown");
    assert_eq!(l.connection_security_policy, "unknown");

    let l = TrafficLabels::new(
        &snap,
        &ConnectionFacts {
            reporter: Reporter::Destination,
            src: addr("10.9.9.9:1234"),
            src_identity: None,
            dst: addr("10.0.2.2:8080"),
            endpoint: None,
            dst_identity: None,
            mtls: false,
        },
    );
    assert_eq!(l.reporter, "destination");
    assert_eq!(l.source_workload, "unknown");
    assert_eq!(l.destination_service, "api.shop.svc.cluster.local");
}

#[test]
fn bytes_of_open_connections_show_at_scrape_and_closing_counts_once() {
    let mut registry = Registry::default();
    let traffic = Traffic::new(registry.sub_registry_with_prefix("istio"));
    let snap = snapshot();
    let labels = TrafficLabels::new(
        &snap,
        &ConnectionFacts {
            reporter: Reporter::Destination,
            src: addr("10.0.1.2:40000"),
            src_identity: None,
            dst: addr("10.0.2.2:8080"),
            endpoint: None,
            dst_identity: None,
            mtls: false,
        },
    );
    let counters = Arc::new(Counters::default());
    let mut meter = traffic.open(labels, counters.clone());
    counters.a_to_b.fetch_add(1000, Ordering::Relaxed);
    counters.b_to_a.fetch_add(10, Ordering::Relaxed);
    let text = encode(&registry).expect("encode");
    let me = [("destination_workload", "api-1")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &me),
        Some(1)
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &me),
        Some(1000)
    );
    assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &me), Some(10));
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &me),
        None
    );
    assert!(
        text.contains("# TYPE istio_tcp_connections_opened counter"),
        "{text}"
    );

    counters.a_to_b.fetch_add(24, Ordering::Relaxed);
    meter.set_flags(ResponseFlags::Deny);
    drop(meter);
    assert_eq!(traffic.open_connections(), 0);
    let text = encode(&registry).expect("encode");
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &me),
        Some(1024)
    );
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_closed_total",
            &[
                ("destination_workload", "api-1"),
                ("response_flags", "DENY")
            ]
        ),
        Some(1)
    );
    // Scraping again adds nothing.
    let again = encode(&registry).expect("encode");
    assert_eq!(
        sample(&again, "istio_tcp_received_bytes_total", &me),
        Some(1024)
    );
}

#[test]
fn reload_counters_and_expiry_gauges_are_encoded() {
    #[derive(Debug)]
    struct Fixed;
    impl ExpirySource for Fixed {
        fn expiries(&self) -> Vec<Expiry> {
            vec![
                Expiry {
                    kind: CertKind::Leaf,
                    identity: "spiffe://td/ns/a/sa/b".into(),
                    seconds_left: 42,
                },
                Expiry {
                    kind: CertKind::Root,
                    identity: "root 1".into(),
                    seconds_left: 7,
                },
                Expiry {
                    kind: CertKind::Root,
                    identity: "root 2".into(),
                    seconds_left: -3,
                },
            ]
        }
    }
    let mut registry = Registry::default();
    let ambit = registry.sub_registry_with_prefix("ambit");
    let reloads = ConfigReloads::new(ambit);
    let certs = CertMetrics::new(ambit);
    register_expiry(ambit, Arc::new(Fixed));
    register_build(registry.sub_registry_with_prefix("istio"));
    reloads.failure();
    reloads.success();
    reloads.success();
    certs.renewal(RenewReason::IssuerChanged, true);
    certs.ca_reload(CaFile::Bundle, false);
    let text = encode(&registry).expect("encode");
    let get = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        get("ambit_config_reloads_total", &[("result", "success")]),
        Some(2)
    );
    assert_eq!(
        get("ambit_config_reloads_total", &[("result", "failure")]),
        Some(1)
    );
    assert_eq!(
        get(
            "ambit_certificate_renewals_total",
            &[("reason", "issuer_changed"), ("result", "success")]
        ),
        Some(1)
    );
    assert_eq!(
        get(
            "ambit_ca_reloads_total",
            &[("file", "bundle"), ("result", "failure")]
        ),
        Some(1)
    );
    assert!(
        text.contains(
            "ambit_certificate_expiry_seconds{kind=\"leaf\",identity=\"spiffe://td/ns/a/sa/b\"} 42"
        ),
        "{text}"
    );
    assert!(
        text.contains("ambit_certificate_expiry_seconds{kind=\"root\",identity=\"root 2\"} -3"),
        "{text}"
    );
    assert!(text.contains("ambit_trust_bundle_roots 2"), "{text}");
    assert!(text.contains("istio_build{component=\"ztunnel\""), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}
