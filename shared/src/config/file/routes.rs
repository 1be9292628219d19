//! Validation of waypoints and routes, which refer to namespaces, workloads and services.

use std::collections::{BTreeMap, HashMap};

use super::Invalid;
use crate::config::model::{Config, RouteKind};
use crate::config::{USE_WAYPOINT_LABEL, USE_WAYPOINT_NONE, WAYPOINT_NAME_LABEL};
use crate::identity::validate_component;

/// Waypoints: names, namespaces and their pods' service accounts.
///
/// An `ambit.dev/use-waypoint` label that names no declared waypoint is accepted;
/// [`Config::waypoint_for_service`] then finds no waypoint for the service.
pub(super) fn validate_waypoints(
    c: &Config,
    namespaces: &BTreeMap<&str, usize>,
) -> Result<(), Invalid> {
    let mut names = HashMap::new();
    for (i, w) in c.waypoints.iter().enumerate() {
        let at = format!("waypoints[{i}]");
        validate_component("waypoint name", &w.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        if w.name == USE_WAYPOINT_NONE {
            return Err((
                format!("{at}.name"),
                format!(
                    "`{USE_WAYPOINT_NONE}` is reserved: as a `{USE_WAYPOINT_LABEL}` value it opts a service out of its namespace's waypoint"
                ),
            ));
        }
        if !namespaces.contains_key(w.namespace.as_str()) {
            return Err((
                format!("{at}.namespace"),
                format!(
                    "namespace `{}` is not declared under `namespaces`",
                    w.namespace
                ),
            ));
        }
        if let Some(sa) = &w.service_account {
            validate_component("service account", sa)
                .map_err(|e| (format!("{at}.serviceAccount"), e.to_string()))?;
        }
        if names
            .insert((w.namespace.as_str(), w.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("{at}.name"),
                format!("waypoint `{}/{}` is declared twice", w.namespace, w.name),
            ));
        }
    }
    // The destination's ztunnel accepts waypoint traffic only from the waypoint's identity,
    // so a waypoint pod under another service account would silently break traffic.
    for (i, p) in c.workloads.iter().enumerate() {
        let Some(w) = p
            .labels
            .get(WAYPOINT_NAME_LABEL)
            .and_then(|gw| c.waypoint(&p.namespace, gw))
        else {
            continue;
        };
        if p.service_account != w.service_account() {
            return Err((
                format!("workloads[{i}].serviceAccount"),
                format!(
                    "workload `{}/{}` is a pod of waypoint `{}` (label {WAYPOINT_NAME_LABEL}), so it must run as the waypoint's service account `{}`, not `{}`",
                    p.namespace,
                    p.name,
                    w.name,
                    w.service_account(),
                    p.service_account
                ),
            ));
        }
    }
    Ok(())
}

/// Routes: each compiles, lives in a declared namespace, is declared once, and refers to
/// services (and ports) that exist.
pub(super) fn validate_routes(
    c: &Config,
    namespaces: &BTreeMap<&str, usize>,
    services: &HashMap<(&str, &str), usize>,
) -> Result<(), Invalid> {
    let mut names: HashMap<(RouteKind, &str, &str), usize> = HashMap::new();
    for (i, r) in c.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        let compiled = crate::route::compile(r).map_err(|(f, e)| (format!("{at}.{f}"), e))?;
        let ns = r.metadata.namespace.as_str();
        if !namespaces.contains_key(ns) {
            return Err((
                format!("{at}.metadata.namespace"),
                format!("namespace `{ns}` is not declared under `namespaces`"),
            ));
        }
        if names
            .insert((r.kind(), ns, r.metadata.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("{at}.metadata.name"),
                format!("{} `{}` is declared twice", r.kind(), r.qualified_name()),
            ));
        }
        for (j, p) in r.parent_refs().iter().enumerate() {
            if !p.is_service() {
                continue;
            }
            let field = format!("{at}.spec.parentRefs[{j}]");
            let svc_ns = p.namespace_or(ns);
            let Some(&s) = services.get(&(svc_ns, p.name.as_str())) else {
                return Err((
                    format!("{field}.name"),
                    format!("no service `{}` in namespace `{svc_ns}`", p.name),
                ));
            };
            let service = &c.services[s];
            crate::route::attached_ports(service, p)
                .map_err(|(f, reason)| (format!("{field}.{f}"), reason))?;
        }
        for (k, rule) in compiled.rules().enumerate() {
            for (b, backend) in rule.backends.iter().enumerate() {
                let field = format!("{at}.spec.rules[{k}].backendRefs[{b}]");
                let Some(&s) = services.get(&(backend.namespace.as_str(), backend.name.as_str()))
                else {
                    return Err((
                        format!("{field}.name"),
                        format!(
                            "no service `{}` in namespace `{}`",
                            backend.name, backend.namespace
                        ),
                    ));
                };
                if !c.services[s].ports.iter().any(|p| p.port == backend.port) {
                    return Err((
                        format!("{field}.port"),
                        format!(
                            "service `{}/{}` has no port {}",
                            backend.namespace, backend.name, backend.port
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}
