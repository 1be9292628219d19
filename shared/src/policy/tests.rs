use std::collections::BTreeMap;

use super::*;
use crate::config::model::Rule;

fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: "api-1".into(),
        namespace: ns.into(),
        service_account: "api".into(),
        ips: vec!["10.0.2.2".parse().expect("ip")],
        node: "b".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn policy(yaml: &str) -> CompiledPolicy {
    let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("policy yaml");
    compile(&p).expect("compiles")
}

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

fn decide(
    policies: &[CompiledPolicy],
    src: Option<&Identity>,
    src_ip: &str,
    port: u16,
) -> Decision {
    let w = workload("shop", &[("app", "api")]);
    let conn = Conn {
        src_identity: src,
        src: src_ip.parse().expect("ip"),
        dst: SocketAddr::new("10.0.2.2".parse().expect("ip"), port),
        dst_workload: &w,
    };
    evaluate(&conn, policies, false).0
}

fn denied_by(d: &Decision) -> Option<&str> {
    match d {
        Decision::Deny { policy, .. } => Some(policy.as_deref().unwrap_or("<no allow matched>")),
        Decision::Allow => None,
    }
}

/// (name, policies, source identity, source IP, port, the policy expected to deny).
type Case<'a> = (
    &'a str,
    Vec<&'a CompiledPolicy>,
    Option<&'a Identity>,
    &'a str,
    u16,
    Option<&'a str>,
);

#[test]
fn table() {
    let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let batch = id("spiffe://cluster.local/ns/jobs/sa/batch");
    let allow_frontend = policy(
        "{name: allow-frontend, namespace: shop, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]}]}",
    );
    let deny_jobs =
        policy("{name: deny-jobs, action: DENY, rules: [{from: [{namespaces: [jobs]}]}]}");
    let deny_port =
        policy("{name: no-admin, namespace: shop, action: DENY, rules: [{to: [{ports: [9090]}]}]}");
    let allow_cidr = policy(
        "{name: office, namespace: shop, action: ALLOW, rules: [{from: [{ipBlocks: ['192.168.0.0/16']}]}]}",
    );
    let deny_not_shop = policy(
        "{name: only-shop, namespace: shop, action: DENY, rules: [{from: [{notNamespaces: [shop]}]}]}",
    );
    let allow_other_app =
        policy("{name: other, namespace: shop, selector: {app: web}, action: ALLOW, rules: [{}]}");
    let allow_prefix = policy(
        "{name: any-shop, namespace: shop, action: ALLOW, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/*']}], to: [{notPorts: [22]}]}]}",
    );
    let allow_nothing = policy("{name: closed, namespace: shop, action: ALLOW}");
    let deny_dry = policy("{name: dry, namespace: shop, action: DENY, dryRun: true, rules: [{}]}");
    let deny_sa = policy(
        "{name: no-batch, action: DENY, rules: [{from: [{serviceAccounts: ['jobs/batch']}]}]}",
    );
    let deny_plain_except = policy(
        "{name: mtls-only, namespace: shop, action: DENY, rules: [{from: [{notPrincipals: ['*']}]}]}",
    );

    let cases: Vec<Case<'_>> = vec![
        (
            "no policies allow",
            vec![],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "allow matches principal",
            vec![&allow_frontend],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "allow misses other principal",
            vec![&allow_frontend],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "allow misses plaintext",
            vec![&allow_frontend],
            None,
            "10.0.3.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "deny namespace wins over allow",
            vec![&allow_frontend, &deny_jobs],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("deny-jobs"),
        ),
        (
            "deny port",
            vec![&deny_port],
            Some(&frontend),
            "10.0.1.2",
            9090,
            Some("shop/no-admin"),
        ),
        (
            "deny port other port passes",
            vec![&deny_port],
            Some(&frontend),
            "10.0.1.2",
            8080,
            None,
        ),
        (
            "allow cidr matches plaintext",
            vec![&allow_cidr],
            None,
            "192.168.7.7",
            80,
            None,
        ),
        (
            "allow cidr misses",
            vec![&allow_cidr],
            None,
            "10.9.9.9",
            80,
            Some("<no allow matched>"),
        ),
        (
            "notNamespaces denies outsider",
            vec![&deny_not_shop],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("shop/only-shop"),
        ),
        (
            "notNamespaces spares insider",
            vec![&deny_not_shop],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "notNamespaces denies plaintext",
            vec![&deny_not_shop],
            None,
            "10.0.1.9",
            80,
            Some("shop/only-shop"),
        ),
        (
            "selector for other app does not apply",
            vec![&allow_other_app],
            Some(&batch),
            "10.0.3.2",
            80,
            None,
        ),
        (
            "prefix principal with notPorts",
            vec![&allow_prefix],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "prefix principal notPorts excludes 22",
            vec![&allow_prefix],
            Some(&frontend),
            "10.0.1.2",
            22,
            Some("<no allow matched>"),
        ),
        (
            "allow without rules matches nothing",
            vec![&allow_nothing],
            Some(&frontend),
            "10.0.1.2",
            80,
            Some("<no allow matched>"),
        ),
        (
            "dry-run deny never enforces",
            vec![&deny_dry],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
        (
            "service account deny",
            vec![&deny_sa],
            Some(&batch),
            "10.0.3.2",
            80,
            Some("no-batch"),
        ),
        (
            "notPrincipals * denies plaintext",
            vec![&deny_plain_except],
            None,
            "10.0.1.9",
            80,
            Some("shop/mtls-only"),
        ),
        (
            "notPrincipals * spares mTLS",
            vec![&deny_plain_except],
            Some(&frontend),
            "10.0.1.2",
            80,
            None,
        ),
    ];
    for (name, ps, src, ip, port, want) in cases {
        let ps: Vec<CompiledPolicy> = ps.into_iter().cloned().collect();
        let got = decide(&ps, src, ip, port);
        assert_eq!(denied_by(&got), want, "case `{name}`: {got:?}");
    }
}

#[test]
fn l7_policy_fails_closed_without_waypoint_and_reports_dry_run_and_audit() {
    let w = workload("shop", &[]);
    let conn = Conn {
        src_identity: None,
        src: "10.0.1.2".parse().expect("ip"),
        dst: "10.0.2.2:80".parse().expect("addr"),
        dst_workload: &w,
    };
    let l7 = policy(
        "{name: paths, namespace: shop, action: ALLOW, rules: [{to: [{paths: ['/v1/*'], methods: [GET]}]}]}",
    );
    let (d, _) = evaluate(&conn, std::slice::from_ref(&l7), false);
    match d {
        Decision::Deny { policy, reason } => {
            assert_eq!(policy.as_deref(), Some("shop/paths"));
            assert!(
                reason.contains("L7 attributes (methods, paths)") && reason.contains("no waypoint"),
                "{reason}"
            );
        }
        Decision::Allow => panic!("L7 policy must fail closed"),
    }
    let audit = policy("{name: watch, action: AUDIT, rules: [{}]}");
    let dry = policy("{name: dry, action: DENY, dryRun: true, rules: [{}]}");
    let (d, notes) = evaluate(&conn, &[audit, dry], false);
    assert_eq!(d, Decision::Allow);
    assert_eq!(notes.audited, ["watch"]);
    assert_eq!(notes.dry_run, [("dry".to_string(), Action::Deny)]);
}

#[test]
fn compile_errors_name_the_field() {
    let bad = |yaml: &str| {
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("yaml");
        compile(&p).expect_err("must not compile")
    };
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{from: [{ipBlocks: ['10.0.0.0/33']}]}]}").0,
        "rules[0].from[0].ipBlocks[0]"
    );
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{}, {from: [{principals: ['a*b*']}]}]}").0,
        "rules[1].from[0].principals[0]"
    );
    assert_eq!(
        bad("{name: x, action: DENY, rules: [{from: [{serviceAccounts: ['batch']}]}]}").0,
        "rules[0].from[0].serviceAccounts[0]"
    );
    let _ = (BTreeMap::<String, String>::new(), Rule::default());
}
