use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as KNamespace, Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::DynamicObject;
use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::config::model::{Action, PeerAuthMode, RouteSpec};

const CLUSTER: &str = include_str!("../../../../../tests/fixtures/kube/cluster.yaml");
const BAD: &str = include_str!("../../../../../tests/fixtures/kube/bad.yaml");

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("fixture document is YAML"))
        .collect()
}

fn load(text: &str) -> Objects {
    let mut o = Objects::default();
    for doc in docs(text) {
        let kind = doc["kind"].as_str().expect("kind").to_string();
        let dynamic = || serde_json::from_value::<DynamicObject>(doc.clone()).expect("object");
        match kind.as_str() {
            "Namespace" => o
                .namespaces
                .push(serde_json::from_value(doc).expect("Namespace")),
            "Pod" => o.pods.push(serde_json::from_value(doc).expect("Pod")),
            "Service" => o
                .services
                .push(serde_json::from_value(doc).expect("Service")),
            "EndpointSlice" => o
                .endpoint_slices
                .push(serde_json::from_value(doc).expect("EndpointSlice")),
            "AuthorizationPolicy" => o.authorization_policies.push(dynamic()),
            "PeerAuthentication" => o.peer_authentications.push(dynamic()),
            "TrafficPolicy" => o.traffic_policies.push(dynamic()),
            "Gateway" => o.gateways.push(dynamic()),
            "HTTPRoute" => o.http_routes.push(dynamic()),
            "GRPCRoute" => o.grpc_routes.push(dynamic()),
            other => panic!("fixture kind {other}"),
        }
    }
    o
}

fn pod_named<'a>(o: &'a Objects, name: &str) -> &'a Pod {
    o.pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .expect("pod in fixture")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn namespaces_keep_their_labels() {
    let o = load(CLUSTER);
    let shop: &KNamespace = &o.namespaces[0];
    let n = namespace(shop);
    assert_eq!(n.name, "shop");
    assert_eq!(n.labels["ambit.dev/dataplane-mode"], "ambient");
    assert_eq!(n.labels["ambit.dev/use-waypoint"], "shop-waypoint");
    let legacy = namespace(&o.namespaces[1]);
    assert!(!legacy.labels.contains_key("ambit.dev/dataplane-mode"));
}

#[test]
fn running_pods_become_workloads_with_account_ips_node_and_labels() {
    let o = load(CLUSTER);
    let w = pod(pod_named(&o, "web-7d9f8-abcde")).expect("workload");
    assert_eq!(
        (
            w.name.as_str(),
            w.namespace.as_str(),
            w.service_account.as_str(),
            w.node.as_str()
        ),
        ("web-7d9f8-abcde", "shop", "web", "node-a")
    );
    assert_eq!(w.ips, vec![ip("10.1.1.5"), ip("fd00:1::5")]);
    assert_eq!(w.labels["app"], "web");
    assert_eq!(w.labels["version"], "v1");

    // No serviceAccountName: `default`; a bare podIP is enough.
    let plain = pod(pod_named(&o, "plain")).expect("workload");
    assert_eq!(plain.service_account, "default");
    assert_eq!(plain.ips, vec![ip("10.1.2.20")]);

    for skipped in ["web-7d9f8-pending", "migrate-x7", "node-exporter-q1"] {
        assert_eq!(
            pod(pod_named(&o, skipped)),
            None,
            "{skipped} is not a workload"
        );
    }
}

#[test]
fn opt_out_label_keeps_the_workload_but_not_in_the_mesh() {
    let o = load(CLUSTER);
    let (c, errors) = snapshot("cluster.local", &o).expect("snapshot");
    assert!(errors.is_empty(), "{errors:?}");
    let batch = c
        .workloads
        .iter()
        .find(|w| w.name == "batch")
        .expect("batch");
    assert_eq!(batch.labels["ambit.dev/dataplane-mode"], "none");
    assert!(!c.is_enrolled(batch));
    let web = c
        .workloads
        .iter()
        .find(|w| w.name == "web-7d9f8-abcde")
        .expect("web");
    assert!(c.is_enrolled(web));
    let plain = c
        .workloads
        .iter()
        .find(|w| w.name == "plain")
        .expect("plain");
    assert!(!c.is_enrolled(plain), "legacy is not labelled");
}

#[test]
fn service_with_slices_gets_ready_endpoints_and_resolved_named_ports() {
    let o = load(CLUSTER);
    let (c, _) = snapshot("cluster.local", &o).expect("snapshot");
    let web = c.service("shop", "web").expect("web service");
    assert_eq!(web.vips, vec![ip("10.96.0.20"), ip("fd00:96::20")]);
    let ports: Vec<(u16, Option<u16>)> =
        web.ports.iter().map(|p| (p.port, p.target_port)).collect();
    assert_eq!(ports, vec![(80, Some(8080)), (9090, Some(9090))]);
    assert_eq!(web.selector, None, "slices make the endpoints explicit");
    let eps = web.endpoints.as_ref().expect("endpoints");
    // The known pod by name, the not-ready one left out, the address without a pod by IP.
    assert_eq!(
        eps,
        &vec![
            EndpointRef {
                workload: Some("web-7d9f8-abcde".into()),
                ip: None
            },
            EndpointRef {
                workload: None,
                ip: Some(ip("10.1.2.30"))
            },
        ]
    );
    assert_eq!(web.labels["app"], "web");
}

#[test]
fn service_without_slices_keeps_its_selector_and_headless_has_no_vip() {
    let o = load(CLUSTER);
    let (c, _) = snapshot("cluster.local", &o).expect("snapshot");
    let batch = c.service("shop", "batch").expect("batch");
    assert_eq!(batch.vips, vec![ip("10.96.0.30")]);
    assert_eq!(
        batch.selector.as_ref().map(|s| s["app"].as_str()),
        Some("batch")
    );
    assert_eq!(batch.endpoints, None);
    assert_eq!(
        (batch.ports[0].port, batch.ports[0].target_port),
        (7000, None)
    );
    let headless = c.service("shop", "web-headless").expect("headless");
    assert!(headless.vips.is_empty());
}

#[test]
fn named_target_port_missing_from_the_slices_names_the_field() {
    let o = load(CLUSTER);
    let svc: &KService = o
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("web"))
        .expect("web");
    let mut slice: EndpointSlice = o.endpoint_slices[0].clone();
    slice.ports = Some(Vec::new());
    let e = service(svc, &[&slice], &BTreeSet::new()).expect_err("unresolvable port");
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("Service", "shop", "web")
    );
    assert_eq!(e.field, "spec.ports[0].targetPort");
    assert!(e.reason.contains("`http`"), "{e}");
}

#[test]
fn http_route_keeps_parent_refs_and_weights() {
    let o = load(CLUSTER);
    let r = route("HTTPRoute", &o.http_routes[0]).expect("route");
    assert_eq!(r.metadata.name, "web-canary");
    assert_eq!(r.metadata.namespace, "shop");
    let RouteSpec::Http(spec) = &r.spec else {
        panic!("an HTTPRoute")
    };
    assert_eq!(spec.parent_refs.len(), 1);
    assert_eq!(spec.parent_refs[0].name, "web");
    assert_eq!(spec.parent_refs[0].kind.as_deref(), Some("Service"));
    assert_eq!(spec.parent_refs[0].port, Some(80));
    let weights: Vec<(Option<u16>, u32)> = spec.rules[0]
        .backend_refs
        .iter()
        .map(|b| (b.port, b.weight))
        .collect();
    assert_eq!(weights, vec![(Some(80), 90), (Some(9090), 10)]);
    let g = route("GRPCRoute", &o.grpc_routes[0]).expect("grpc route");
    assert!(matches!(g.spec, RouteSpec::Grpc(_)));
}

#[test]
fn policy_kinds_take_name_and_namespace_from_metadata() {
    let o = load(CLUSTER);
    let a = authorization_policy(&o.authorization_policies[0]).expect("authz");
    assert_eq!(
        (a.name.as_str(), a.namespace.as_deref()),
        ("web-allow-client", Some("shop"))
    );
    assert_eq!(a.action, Action::Allow);
    assert_eq!(a.selector.as_ref().map(|s| s["app"].as_str()), Some("web"));
    assert_eq!(
        a.rules[0].from[0].service_accounts,
        vec!["shop/client".to_string()]
    );
    assert_eq!(a.rules[0].to[0].ports, vec![8080]);

    let p = peer_authentication(&o.peer_authentications[0]).expect("peer auth");
    assert_eq!(
        (p.name.as_str(), p.namespace.as_deref(), p.mode),
        ("strict", Some("shop"), PeerAuthMode::Strict)
    );

    let t = traffic_policy(&o.traffic_policies[0]).expect("traffic policy");
    assert_eq!(
        (t.name.as_str(), t.namespace.as_str()),
        ("web-limits", "shop")
    );
    assert_eq!(t.target_refs[0].name, "web");
    assert_eq!(
        t.connection_pool.as_ref().and_then(|c| c.max_connections),
        Some(100)
    );
    assert_eq!(t.rate_limit.as_ref().map(|r| r.requests), Some(50));

    // `name` inside spec would be ambiguous: refused, with the field.
    let mut dup = o.peer_authentications[0].clone();
    dup.data["spec"]["name"] = Value::String("other".into());
    let e = peer_authentication(&dup).expect_err("name in spec");
    assert_eq!(e.field, "spec.name");
}

#[test]
fn waypoint_gateways_become_waypoints_and_others_are_ignored() {
    let o = load(CLUSTER);
    let w = gateway(&o.gateways[0]).expect("waypoint");
    assert_eq!(
        (w.name.as_str(), w.namespace.as_str()),
        ("shop-waypoint", "shop")
    );
    assert_eq!(w.service_account(), "waypoint");
    assert_eq!(gateway(&o.gateways[1]), None);
}

#[test]
fn managed_fields_are_stripped() {
    let o = load(CLUSTER);
    let mut ns = o.namespaces[0].clone();
    assert!(
        ns.metadata.managed_fields.is_some(),
        "fixture carries managedFields"
    );
    strip_managed_fields(&mut ns);
    assert_eq!(ns.metadata.managed_fields, None);
    let mut r = o.http_routes[0].clone();
    strip_managed_fields(&mut r);
    assert!(r.metadata.managed_fields.is_none());
    // The route still translates.
    route("HTTPRoute", &r).expect("route");
}

#[test]
fn whole_cluster_translates_to_a_valid_config() {
    let o = load(CLUSTER);
    let (c, errors) = snapshot("cluster.local", &o).expect("snapshot");
    assert!(errors.is_empty(), "{errors:?}");
    let names = |v: Vec<&str>| v.join(",");
    assert_eq!(
        names(c.namespaces.iter().map(|n| n.name.as_str()).collect()),
        "legacy,shop"
    );
    // Oldest pod first (no timestamp sorts first), then by namespace and name.
    assert_eq!(
        names(c.workloads.iter().map(|w| w.name.as_str()).collect()),
        "plain,batch,web-7d9f8-fghij,web-7d9f8-abcde"
    );
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.authorization_policies.len(), 1);
    assert_eq!(c.peer_authentications.len(), 1);
    assert_eq!(c.traffic_policies.len(), 1);
    assert_eq!(c.waypoints.len(), 1);
    assert_eq!(c.routes.len(), 2);
    // The namespace label sends the service through the waypoint.
    let web = c.service("shop", "web").expect("web");
    assert_eq!(
        c.waypoint_for_service(web).map(|w| w.name.as_str()),
        Some("shop-waypoint")
    );
    // Same objects, same config.
    assert_eq!(snapshot("cluster.local", &o).expect("again").0, c);
}

#[test]
fn bad_objects_are_reported_by_kind_namespace_name_and_field_and_the_rest_applies() {
    let mut o = load(CLUSTER);
    let bad = load(BAD);
    o.authorization_policies.extend(bad.authorization_policies);
    o.pods.extend(bad.pods);
    o.http_routes.extend(bad.http_routes);
    let (c, errors) = snapshot("cluster.local", &o).expect("snapshot");
    let find = |kind: &str, name: &str| {
        errors
            .iter()
            .find(|e| e.kind == kind && e.name == name)
            .unwrap_or_else(|| panic!("no error for {kind} {name}: {errors:?}"))
    };
    let typo = find("AuthorizationPolicy", "typo");
    assert_eq!(
        (typo.namespace.as_str(), typo.field.as_str()),
        ("shop", "spec.action")
    );
    assert!(typo.reason.contains("PERMIT"), "{typo}");
    assert_eq!(
        typo.to_string(),
        format!(
            "AuthorizationPolicy shop/typo: field `spec.action`: {}",
            typo.reason
        )
    );
    // Found by validation of the assembled config, mapped back to the object.
    let cidr = find("AuthorizationPolicy", "bad-cidr");
    assert!(
        cidr.field.starts_with("rules[0].from[0].ipBlocks[0]"),
        "{cidr}"
    );
    let impostor = find("Pod", "impostor");
    assert_eq!(impostor.field, "ips[0]");
    assert!(
        impostor.reason.contains("shop/web-7d9f8-abcde"),
        "{impostor}"
    );
    let route = find("HTTPRoute", "unknown-field");
    assert!(route.reason.contains("wieght"), "{route}");
    assert_eq!(errors.len(), 4, "{errors:?}");

    // Everything else still applies.
    assert!(c.workloads.iter().all(|w| w.name != "impostor"));
    assert_eq!(c.workloads.len(), 4);
    assert_eq!(c.authorization_policies.len(), 1);
    assert_eq!(c.routes.len(), 2);
    assert!(c.service("shop", "web").is_some());
}

#[test]
fn an_unowned_invalid_field_fails_the_snapshot() {
    let o = load(CLUSTER);
    let e = snapshot("not a domain!", &o).expect_err("bad trust domain");
    assert_eq!(e.field, "trustDomain");
}
