use super::*;

fn with_policy(policy: &str) -> String {
    format!("{GOOD}trafficPolicies:\n{policy}")
}

#[test]
fn accepts_a_full_service_policy_and_a_route_policy() {
    let c = parse(&with_policy(
        r#"
  - name: web-guard
    namespace: shop
    targetRefs: [{ kind: Service, name: web }]
    connectionPool: { maxConnections: 100, maxPendingRequests: 10, maxRequests: 10, maxRetries: 3 }
    outlierDetection: { consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s, maxEjectionPercent: 50 }
    rateLimit: { requests: 100 }
  - name: canary-faults
    namespace: shop
    targetRefs: [{ group: gateway.networking.k8s.io, kind: HTTPRoute, name: canary, sectionName: v2 }]
    rateLimit: { requests: 10, interval: 1s, burst: 20, perSource: true }
    fault:
      delay: { fixedDelay: 100ms, percentage: 10 }
      abort: { httpStatus: 503, percentage: 0.5 }
"#,
    ))
    .expect("valid traffic policies");
    let p = &c.traffic_policies[0];
    let o = p.outlier_detection.as_ref().expect("outlier detection");
    assert_eq!(o.consecutive_5xx_errors, 3);
    assert_eq!(o.consecutive_gateway_errors, 0);
    assert_eq!(o.interval.as_duration().as_secs(), 1);
    let r = c.traffic_policies[1]
        .rate_limit
        .as_ref()
        .expect("rate limit");
    assert!(r.per_source);
    assert_eq!(r.burst, Some(20));
    let defaults = p.rate_limit.as_ref().expect("rate limit");
    assert_eq!(defaults.interval.as_duration().as_secs(), 1);
}

#[test]
fn refuses_bad_traffic_policies_naming_the_field() {
    let cases = [
        (
            "  - { name: p, namespace: shop, targetRefs: [] }\n",
            "trafficPolicies[0].targetRefs",
            "at least one",
        ),
        (
            "  - { name: p, namespace: shop, targetRefs: [{ kind: Deployment, name: web }] }\n",
            "trafficPolicies[0].targetRefs[0].kind",
            "cannot be targeted",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ group: gateway.networking.k8s.io, kind: HTTPRoute, name: r }]\n    connectionPool: { maxRequests: 1 }\n",
            "trafficPolicies[0].connectionPool",
            "target a Service",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ kind: Service, name: web }, { group: gateway.networking.k8s.io, kind: HTTPRoute, name: r }]\n    allowPathParameters: true\n",
            "trafficPolicies[0].allowPathParameters",
            "target a Service",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ kind: Service, name: web }]\n    fault: { abort: { httpStatus: 700, percentage: 10 } }\n",
            "trafficPolicies[0].fault.abort.httpStatus",
            "not an HTTP status",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ kind: Service, name: web }]\n    fault: { delay: { fixedDelay: 1s, percentage: 101 } }\n",
            "trafficPolicies[0].fault.delay.percentage",
            "not a percentage",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ kind: Service, name: web }]\n    rateLimit: { requests: 0 }\n",
            "trafficPolicies[0].rateLimit.requests",
            "at least 1",
        ),
        (
            "  - name: p\n    namespace: nowhere\n    targetRefs: [{ kind: Service, name: web }]\n",
            "trafficPolicies[0].namespace",
            "not declared",
        ),
        (
            "  - name: p\n    namespace: shop\n    targetRefs: [{ kind: Service, name: web }]\n    outlierDetection: { interval: 1 }\n",
            "trafficPolicies[0].outlierDetection.interval",
            "",
        ),
    ];
    for (policy, field, reason) in cases {
        let e = parse(&with_policy(policy)).expect_err(policy);
        assert_eq!(e.field, field, "{policy}: {e}");
        assert!(e.reason.contains(reason), "{policy}: {e}");
    }
}
