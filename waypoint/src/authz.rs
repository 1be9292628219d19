//! Authorization at the waypoint: every request (and every connection forwarded at L4) is
//! checked against the authorization policies of the workloads it is going to, with the
//! client's own identity.
//!
//! - **Who.** The source is the tunnel's TLS peer: the source ztunnel presents the client
//!   workload's certificate, so its identity is the client's. The source address is the
//!   TLS peer's address (the client pod's, since its ztunnel dials from inside the pod),
//!   not the `forwarded` header, as at the node tunnel.
//! - **Where to.** The policies selected as the node tunnel selects them (namespace and
//!   selector) against the destination's workloads: the workload dialled, or every
//!   endpoint of the service dialled. A request must be allowed by the policies of *every*
//!   endpoint it could reach, so no endpoint receives a request its own policies refuse,
//!   whichever one the balancer picks, and the verdict does not depend on the pick.
//!   `ports` and `destinationIps` see the endpoint's address (workload IP and target
//!   port), as the endpoint's node tunnel would, so a policy means the same wherever it
//!   is enforced.
//! - **When.** Before routing and before any filter rewrites the request, as Istio's RBAC
//!   filter runs before its router: what is authorized is what the client sent. If the
//!   chosen route sends requests to other services ([`check_route`]), their endpoints
//!   are checked too, with the same request, before the route's filters run: a route
//!   cannot carry a request to workloads whose policies refuse it. A request no route
//!   matches (404) goes nowhere and is not checked against routes.
//! - **Path.** Matched in its normalized form (see [`ambit_shared::policy::path`]); the
//!   request is forwarded with dot segments and repeated slashes resolved, so the backend
//!   never sees a spelling of the path that was not authorized.
//! - **Verdict.** Any matching DENY: 403. ALLOW policies apply and none matches: 403.
//!   AUDIT matches are logged; dry-run policies are logged with what they would have done,
//!   never enforced. A denial logs the policy (the access log's `authz_policy`) and
//!   counts it in `ambit_waypoint_authz_denied_total{policy}`.
//!
//! The destination ztunnel of a waypoint-fronted workload accepts only this waypoint and
//! leaves policy to it.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use ambit_shared::config::index::Snapshot;
use ambit_shared::config::{Action, Workload};
use ambit_shared::identity::Identity;
use ambit_shared::policy::path::{self, Form};
use ambit_shared::policy::{self, Conn, Decision, Notes, Request};
use http::request::Parts;
use http::{StatusCode, Uri};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::route::{BackendRef, Route, Target};

/// Who is asking: the tunnel's TLS peer.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The identity mutual TLS proved: the client workload's.
    pub identity: Option<&'a Identity>,
    /// The TLS peer's address.
    pub ip: IpAddr,
}

/// Why a request or connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// What the client gets: 403, or 400 for a path that cannot be normalized.
    pub status: StatusCode,
    /// The DENY policy that matched (`namespace/name`); or, when no ALLOW policy matched,
    /// the ALLOW policies that applied, joined with `,`. Empty for a 400.
    pub policy: String,
    /// For logs and the response body.
    pub reason: String,
}

// === impl Denial ===

impl Denial {
    /// What the client is told: for a 403 only that access is denied, as Istio answers
    /// (`RBAC: access denied`), since policy names and rules are the operator's business;
    /// the reason for a 400.
    pub fn client_message(&self) -> &str {
        if self.status == StatusCode::FORBIDDEN {
            "RBAC: access denied"
        } else {
            &self.reason
        }
    }
}

/// The endpoints a target's traffic may reach that are mesh workloads: the workload
/// dialled, or every endpoint of the service (on its target port). Bare-IP endpoints have
/// no workload, so no policy selects them. Added to `out` unless already there.
fn endpoints_into<'s>(
    snap: &'s Snapshot,
    target: &Target,
    out: &mut Vec<(SocketAddr, &'s Workload)>,
) {
    let mut add = |addr: SocketAddr| {
        if let Some(w) = snap.workload_by_ip(addr.ip())
            && !out.iter().any(|(a, _)| *a == addr)
        {
            out.push((addr, w));
        }
    };
    match target {
        Target::Service {
            namespace,
            name,
            target_port,
            ..
        } => {
            if let Some((_, ips)) = snap.service(namespace, name) {
                for ip in ips {
                    add(SocketAddr::new(*ip, *target_port));
                }
            }
        }
        Target::Workload { addr, .. } => add(*addr),
    }
}

/// Decides `request` (or, without one, an L4 connection) against the policies of every
/// endpoint in `eps`.
fn decide(
    snap: &Snapshot,
    client: Client<'_>,
    eps: &[(SocketAddr, &Workload)],
    request: Option<&Request<'_>>,
) -> (Result<(), Denial>, Notes) {
    let Some((first_addr, first_w)) = eps.first() else {
        return (Ok(()), Notes::default());
    };
    let conn = Conn {
        src_identity: client.identity,
        src: client.ip,
        dst: *first_addr,
        dst_workload: first_w,
        request,
    };
    let (d, notes) = policy::evaluate_endpoints(&conn, eps, &snap.policies, true);
    match d {
        Decision::Allow => (Ok(()), notes),
        Decision::Deny { policy, reason } => {
            let denial = Denial {
                status: StatusCode::FORBIDDEN,
                policy: policy.unwrap_or_else(|| allow_policies(snap, eps)),
                reason,
            };
            (Err(denial), notes)
        }
    }
}

/// The enforced ALLOW policies that apply to any of `eps`, for a "no ALLOW matched" log.
fn allow_policies(snap: &Snapshot, eps: &[(SocketAddr, &Workload)]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for p in &snap.policies {
        if p.action() == Action::Allow
            && !p.dry_run()
            && eps.iter().any(|(_, w)| p.applies_to(w))
            && !names.contains(&p.qualified_name())
        {
            names.push(p.qualified_name());
        }
    }
    names.join(",")
}

/// Logs audits and dry-run verdicts, and a denial (counted in the metrics).
fn report(
    metrics: &Metrics,
    client: Client<'_>,
    what: &str,
    result: &Result<(), Denial>,
    notes: Notes,
) {
    let src = client.identity.map(ToString::to_string).unwrap_or_default();
    for p in notes.audited {
        info!(target: "authz", policy = %p, src.identity = %src, src.addr = %client.ip, request = %what,
            "AUDIT policy matched");
    }
    for (p, would) in notes.dry_run {
        let would = match would {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
        };
        info!(target: "authz", policy = %p, would, src.identity = %src, src.addr = %client.ip, request = %what,
            "dry-run policy matched; not enforced");
    }
    if let Err(d) = result {
        warn!(target: "authz", policy = %d.policy, reason = %d.reason, src.identity = %src,
            src.addr = %client.ip, request = %what, "denied by authorization policy");
        metrics.authz_denied(&d.policy);
    }
}

/// Resolves the request's path for forwarding (dot segments, repeated slashes; see
/// [`path`]) in place, keeping the query. Err if the rewritten target is not a valid URI,
/// which would mean the path could not be normalized: such a request is refused rather
/// than forwarded in a form other than the one authorized.
pub fn normalize_path(head: &mut Parts) -> Result<(), String> {
    let raw = head.uri.path();
    let Cow::Owned(normal) = path::normalize(raw, Form::Forward) else {
        return Ok(());
    };
    let target = match head.uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = head.uri.clone().into_parts();
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|e| format!("path `{target}` is not valid after normalization: {e}"))?,
    );
    head.uri = Uri::from_parts(parts).map_err(|e| format!("invalid request target: {e}"))?;
    Ok(())
}

/// The request path's entry point, called once per request before routing: normalizes
/// the path for forwarding ([`normalize_path`]), then authorizes the request as the client
/// sent it against the endpoints of `target`, the service or workload it dialled.
pub fn check(
    snap: &Snapshot,
    metrics: &Metrics,
    client: Client<'_>,
    target: &Target,
    head: &mut Parts,
) -> Result<(), Denial> {
    // Authorize first, on the path as sent (normalized for matching, which is at least as
    // strict as the forwarded form), then rewrite what is forwarded.
    let mut eps = Vec::new();
    endpoints_into(snap, target, &mut eps);
    authorize_request(snap, metrics, client, &eps, head)?;
    normalize_path(head).map_err(|reason| Denial {
        status: StatusCode::BAD_REQUEST,
        policy: String::new(),
        reason,
    })
}

/// Called once the route is chosen, before its filters: when the route sends requests to
/// other services than the one dialled, authorizes the request against their endpoints
/// that [`check`] did not already cover, so a route cannot carry a request to workloads
/// whose policies would refuse it.
pub fn check_route(
    snap: &Snapshot,
    metrics: &Metrics,
    client: Client<'_>,
    dialled: &Target,
    route: &Route,
    head: &Parts,
) -> Result<(), Denial> {
    if snap.policies.is_empty()
        || route
            .backends
            .iter()
            .all(|b| b.backend == BackendRef::Parent)
    {
        return Ok(());
    }
    let mut checked = Vec::new();
    endpoints_into(snap, dialled, &mut checked);
    let mut eps = checked.clone();
    for b in &route.backends {
        if let Some(t) = backend_target(snap, &b.backend) {
            endpoints_into(snap, &t, &mut eps);
        }
    }
    let rest: Vec<_> = eps.split_off(checked.len());
    authorize_request(snap, metrics, client, &rest, head)
}

/// A backend service as a target, on the port the route names.
fn backend_target(snap: &Snapshot, backend: &BackendRef) -> Option<Target> {
    let BackendRef::Service {
        namespace,
        name,
        port,
    } = backend
    else {
        return None;
    };
    let (svc, _) = snap.service(namespace, name)?;
    let p = svc.ports.iter().find(|p| p.port == *port)?;
    Some(Target::Service {
        namespace: namespace.clone(),
        name: name.clone(),
        port: *port,
        target_port: p.target_port.unwrap_or(p.port),
        port_name: p.name.as_deref().map(Into::into),
    })
}

/// Authorizes one HTTP request to the endpoints `eps`, as the client sent it (`head`
/// before any filter). Logs audits and dry runs; logs and counts a denial.
fn authorize_request(
    snap: &Snapshot,
    metrics: &Metrics,
    client: Client<'_>,
    eps: &[(SocketAddr, &Workload)],
    head: &Parts,
) -> Result<(), Denial> {
    if snap.policies.is_empty() || eps.is_empty() {
        return Ok(());
    }
    let matched_path = path::normalize(head.uri.path(), Form::Match);
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| head.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or_default();
    let request = Request {
        method: head.method.as_str(),
        path: &matched_path,
        host: path::host_of(authority),
        headers: &head.headers,
    };
    let (result, notes) = decide(snap, client, eps, Some(&request));
    if !notes.audited.is_empty() || !notes.dry_run.is_empty() || result.is_err() {
        let what = format!("{} {} {}", head.method, authority, head.uri.path());
        report(metrics, client, &what, &result, notes);
    }
    result
}

/// Authorizes a connection forwarded at L4 (not HTTP) to `target`'s endpoints. L7 fields
/// follow Istio's rule for TCP traffic (see [`ambit_shared::policy`]): they never match in
/// ALLOW rules, and DENY rules match on their other fields.
pub fn authorize_connection(
    snap: &Snapshot,
    metrics: &Metrics,
    client: Client<'_>,
    target: &Target,
) -> Result<(), Denial> {
    if snap.policies.is_empty() {
        return Ok(());
    }
    let mut eps = Vec::new();
    endpoints_into(snap, target, &mut eps);
    let (result, notes) = decide(snap, client, &eps, None);
    if !notes.audited.is_empty() || !notes.dry_run.is_empty() || result.is_err() {
        report(
            metrics,
            client,
            &format!("tcp {}", target.key()),
            &result,
            notes,
        );
    }
    result
}

#[cfg(test)]
mod tests;
