//! Validation of `trafficPolicies`: shapes and ranges.
//!
//! A target that names no existing Service or route is accepted (the policy then applies
//! to nothing), because in Kubernetes a policy may arrive before its target.

use std::collections::{BTreeMap, HashMap};

use super::Invalid;
use crate::config::model::{Config, TrafficPolicy};
use crate::identity::validate_component;

pub(super) fn validate_traffic_policies(
    c: &Config,
    namespaces: &BTreeMap<&str, usize>,
) -> Result<(), Invalid> {
    let mut names = HashMap::new();
    for (i, p) in c.traffic_policies.iter().enumerate() {
        let at = format!("trafficPolicies[{i}]");
        validate_component("traffic policy name", &p.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        if !namespaces.contains_key(p.namespace.as_str()) {
            return Err((
                format!("{at}.namespace"),
                format!(
                    "namespace `{}` is not declared under `namespaces`",
                    p.namespace
                ),
            ));
        }
        if names
            .insert((p.namespace.as_str(), p.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("{at}.name"),
                format!(
                    "traffic policy `{}` is declared twice in its namespace",
                    p.name
                ),
            ));
        }
        validate_one(p).map_err(|(f, reason)| (format!("{at}.{f}"), reason))?;
    }
    Ok(())
}

fn validate_one(p: &TrafficPolicy) -> Result<(), Invalid> {
    if p.target_refs.is_empty() {
        return Err((
            "targetRefs".into(),
            "name at least one Service, HTTPRoute or GRPCRoute".into(),
        ));
    }
    let mut any_route = false;
    for (i, t) in p.target_refs.iter().enumerate() {
        let at = format!("targetRefs[{i}]");
        if !t.is_service() && !t.is_route() {
            return Err((
                format!("{at}.kind"),
                format!(
                    "`{}` in group `{}` cannot be targeted: use kind `Service` (group \"\"), or `HTTPRoute`/`GRPCRoute` (group gateway.networking.k8s.io)",
                    t.kind, t.group
                ),
            ));
        }
        if t.is_service() && t.section_name.is_some() {
            return Err((
                format!("{at}.sectionName"),
                "only a route target may name a section (a rule name)".into(),
            ));
        }
        any_route |= t.is_route();
    }
    let route_targeted = any_route;
    if route_targeted && p.connection_pool.is_some() {
        return Err((
            "connectionPool".into(),
            "circuit-breaking limits guard a destination: target a Service, not a route".into(),
        ));
    }
    if route_targeted && p.allow_path_parameters {
        return Err((
            "allowPathParameters".into(),
            "path parameters are accepted or refused before routing, for the Service dialled: target a Service, not a route".into(),
        ));
    }
    if route_targeted && p.outlier_detection.is_some() {
        return Err((
            "outlierDetection".into(),
            "outlier detection ejects a service's endpoints: target a Service, not a route".into(),
        ));
    }
    if let Some(o) = &p.outlier_detection {
        if o.interval.is_zero() {
            return Err((
                "outlierDetection.interval".into(),
                "must be longer than 0s".into(),
            ));
        }
        if o.base_ejection_time.is_zero() {
            return Err((
                "outlierDetection.baseEjectionTime".into(),
                "must be longer than 0s".into(),
            ));
        }
        if o.max_ejection_percent > 100 {
            return Err((
                "outlierDetection.maxEjectionPercent".into(),
                format!("{} is not a percentage (0 to 100)", o.max_ejection_percent),
            ));
        }
    }
    if let Some(r) = &p.rate_limit {
        if r.requests == 0 {
            return Err((
                "rateLimit.requests".into(),
                "must be at least 1 (to refuse all traffic, use an authorization policy)".into(),
            ));
        }
        if r.interval.is_zero() {
            return Err(("rateLimit.interval".into(), "must be longer than 0s".into()));
        }
        if r.burst == Some(0) {
            return Err(("rateLimit.burst".into(), "must be at least 1".into()));
        }
    }
    if let Some(f) = &p.fault {
        if f.delay.is_none() && f.abort.is_none() {
            return Err(("fault".into(), "set `delay`, `abort` or both".into()));
        }
        if let Some(d) = &f.delay {
            check_percentage("fault.delay.percentage", d.percentage)?;
        }
        if let Some(a) = &f.abort {
            check_percentage("fault.abort.percentage", a.percentage)?;
            if !(200..=599).contains(&a.http_status) {
                return Err((
                    "fault.abort.httpStatus".into(),
                    format!("{} is not an HTTP status (200 to 599)", a.http_status),
                ));
            }
        }
    }
    Ok(())
}

fn check_percentage(field: &str, v: f64) -> Result<(), Invalid> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err((field.into(), format!("{v} is not a percentage (0 to 100)")))
    }
}
