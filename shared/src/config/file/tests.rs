use std::path::Path;

use super::*;

mod routes;
mod traffic;

const GOOD: &str = r#"
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient }
  - name: legacy
workloads:
  - name: web-1
    namespace: shop
    serviceAccount: web
    ips: [10.1.1.2]
    node: node-a
    labels: { app: web }
  - name: batch
    namespace: shop
    ips: [10.1.1.3]
    node: node-a
    labels: { ambit.dev/dataplane-mode: none }
  - name: old
    namespace: legacy
    ips: [10.1.2.2]
    node: node-b
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{ port: 80, targetPort: 8080 }]
    selector: { app: web }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_str(Path::new("/etc/ambit/config.yaml"), text)
}

#[test]
fn parses_and_enrolls_by_namespace_label() {
    let c = parse(GOOD).expect("good config parses");
    let enrolled: Vec<_> = c
        .workloads
        .iter()
        .filter(|w| c.is_enrolled(w))
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(enrolled, ["web-1"]);
    let web = c
        .workload_by_ip("10.1.1.2".parse().expect("ip"))
        .expect("web-1 by ip");
    assert_eq!(
        c.identity_of(web).expect("identity").to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let batch = &c.workloads[1];
    assert_eq!(batch.service_account, "default");
}

fn expect_error(text: &str, field: &str, reason_contains: &str) {
    let e = parse(text).expect_err("config must be rejected");
    assert_eq!(e.file, Path::new("/etc/ambit/config.yaml"));
    assert_eq!(e.field, field, "wrong field in: {e}");
    assert!(
        e.reason.contains(reason_contains),
        "reason `{}` lacks `{reason_contains}`",
        e.reason
    );
    let shown = e.to_string();
    assert!(
        shown.contains("/etc/ambit/config.yaml") && shown.contains(field),
        "{shown}"
    );
}

#[test]
fn names_field_for_bad_ip() {
    expect_error(
        &GOOD.replace("[10.1.2.2]", "[10.1.2.300]"),
        "workloads[2].ips[0]",
        "invalid IP",
    );
}

#[test]
fn names_field_for_unknown_key() {
    expect_error(
        &GOOD.replace("serviceAccount: web", "serviceAcount: web"),
        "workloads[0].serviceAcount",
        "unknown field `serviceAcount`, expected one of",
    );
}

#[test]
fn rejects_duplicate_ip() {
    expect_error(
        &GOOD.replace("[10.1.2.2]", "[10.1.1.2]"),
        "workloads[2].ips[0]",
        "already the address of workload `shop/web-1`",
    );
}

#[test]
fn rejects_undeclared_namespace() {
    expect_error(
        &GOOD.replace("namespace: legacy", "namespace: legacyy"),
        "workloads[2].namespace",
        "not declared",
    );
}

#[test]
fn rejects_bad_mode_label() {
    expect_error(
        &GOOD.replace("dataplane-mode: ambient", "dataplane-mode: ambiant"),
        "namespaces[0].labels.ambit.dev/dataplane-mode",
        "not a data-plane mode",
    );
}

#[test]
fn names_field_for_incomplete_waypoint() {
    expect_error(
        &format!("{GOOD}waypoints: [{{name: x}}]\n"),
        "waypoints[0]",
        "missing field `namespace`",
    );
}

#[test]
fn rejects_service_without_backends() {
    expect_error(
        &GOOD.replace("    selector: { app: web }\n", ""),
        "services[0]",
        "set `selector` or `endpoints`",
    );
}

#[test]
fn rejects_garbage_without_panicking() {
    for text in [
        "",
        "[",
        "trustDomain: [1, 2]",
        "\u{0}\u{1}",
        "trustDomain: cluster.local\nworkloads: 3",
    ] {
        assert!(parse(text).is_err(), "{text:?}");
    }
}

#[test]
fn control_characters_are_refused_with_the_field() {
    for (extra, field) in [
        (
            "    labels: { app: \"web\\nINFO forged log line\" }\n",
            "namespaces[2].labels.app",
        ),
        (
            "    labels: { \"a\\u0007b\": x }\n",
            "namespaces[2].labels.a\u{7}b",
        ),
        (
            "    labels: { app: \"\\u202Eevil\" }\n",
            "namespaces[2].labels.app",
        ),
    ] {
        // A third namespace, after `legacy`.
        let text = GOOD.replacen(
            "  - name: legacy\n",
            &format!("  - name: legacy\n  - name: extra\n{extra}"),
            1,
        );
        expect_error(&text, field, "control character");
    }
    let routed = format!(
        "{GOOD}routes:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata:\n      name: r\n      namespace: shop\n      annotations: {{ kubectl.kubernetes.io/last-applied-configuration: \"{{}}\\n\" }}\n    spec:\n      parentRefs: [{{ group: \"\", kind: Service, name: web }}]\n      rules: [{{ backendRefs: [{{ name: web, port: 80 }}] }}]\n"
    );
    parse(&routed).expect("a newline in an annotation is fine");
    expect_error(
        &routed.replace("name: r\n", "name: r\n      labels: { a: \"\\t\" }\n"),
        "routes[0].metadata.labels.a",
        "U+0009",
    );
}

#[test]
fn names_field_for_bad_policy() {
    let text = format!(
        "{GOOD}authorizationPolicies:\n  - name: p\n    namespace: shop\n    action: DENY\n    rules: [{{from: [{{ipBlocks: [10.0.0.0/40]}}]}}]\n"
    );
    expect_error(
        &text,
        "authorizationPolicies[0].rules[0].from[0].ipBlocks[0]",
        "not an IP address or CIDR",
    );
    let typo = format!(
        "{GOOD}authorizationPolicies:\n  - name: p\n    action: DENY\n    rules: [{{from: [{{principal: [x]}}]}}]\n"
    );
    expect_error(
        &typo,
        "authorizationPolicies[0].rules[0].from[0].principal",
        "unknown field `principal`",
    );
    let bad_action = format!("{GOOD}authorizationPolicies:\n  - name: p\n    action: PERMIT\n");
    expect_error(
        &bad_action,
        "authorizationPolicies[0].action",
        "unknown variant `PERMIT`",
    );
    let selector = format!(
        "{GOOD}peerAuthentications:\n  - name: p\n    selector: {{app: web}}\n    mode: STRICT\n"
    );
    expect_error(
        &selector,
        "peerAuthentications[0].selector",
        "needs a `namespace`",
    );
}
