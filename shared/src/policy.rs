//! L4 authorization: a pure function from a connection and the policies to a decision.
//!
//! Policies are compiled once per config (patterns and CIDRs parsed), then evaluated per
//! connection with no allocation on the allow path. Semantics, as in Istio:
//! - any matching DENY refuses;
//! - if no ALLOW policy applies to the destination, the connection is allowed;
//! - otherwise one ALLOW policy must match;
//! - AUDIT policies are reported and never change the verdict;
//! - dry-run policies are reported as what they would have done, never enforced;
//! - a policy that needs L7 attributes (methods, paths, hosts) cannot be checked at L4,
//!   so when it applies to a destination without a waypoint it denies (fail closed).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::config::model::{Action, AuthorizationPolicy, Operation, Source, Workload, applies_to};
use crate::identity::Identity;

/// What policy sees of a connection.
#[derive(Debug, Clone)]
pub struct Conn<'a> {
    /// The peer's proven identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The client address.
    pub src: IpAddr,
    /// The destination address and port.
    pub dst: SocketAddr,
    /// The destination workload.
    pub dst_workload: &'a Workload,
}

/// The verdict, with what explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny {
        /// The policy that decided, if one did (none: no ALLOW matched).
        policy: Option<String>,
        /// Why, for logs.
        reason: String,
    },
}

/// Reports alongside a decision: audits and dry-run verdicts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Dry-run policies and what they would have done.
    pub dry_run: Vec<(String, Action)>,
}

/// Why a policy could not be compiled: (field path relative to the policy, reason).
pub type CompileError = (String, String);

/// A policy ready for evaluation.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    source: AuthorizationPolicy,
    rules: Vec<CompiledRule>,
    l7_fields: Vec<&'static str>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
}

#[derive(Debug, Clone, Default)]
struct CompiledSource {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    service_accounts: Vec<Pattern>,
    not_service_accounts: Vec<Pattern>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Clone, Default)]
struct CompiledOperation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    destination_ips: Vec<IpNet>,
    not_destination_ips: Vec<IpNet>,
}

/// A string match: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        let stars = s.matches('*').count();
        match (stars, s.strip_prefix('*'), s.strip_suffix('*')) {
            (0, _, _) if !s.is_empty() => Ok(Pattern::Exact(s.to_string())),
            (1, Some(""), _) => Ok(Pattern::Any),
            (1, Some(rest), _) => Ok(Pattern::Suffix(rest.to_string())),
            (1, None, Some(rest)) => Ok(Pattern::Prefix(rest.to_string())),
            _ => Err(format!("`{s}`: `*` may only start or end a pattern, once")),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == value,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

fn patterns(field: &str, values: &[String]) -> Result<Vec<Pattern>, CompileError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Pattern::parse(v).map_err(|e| (format!("{field}[{i}]"), e)))
        .collect()
}

fn nets(field: &str, values: &[String]) -> Result<Vec<IpNet>, CompileError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        format!("{field}[{i}]"),
                        format!("`{v}` is not an IP address or CIDR"),
                    )
                })
        })
        .collect()
}

fn service_accounts(field: &str, values: &[String]) -> Result<Vec<Pattern>, CompileError> {
    for (i, v) in values.iter().enumerate() {
        if v.split('/').count() != 2 {
            return Err((
                format!("{field}[{i}]"),
                format!("`{v}` is not `namespace/service-account`"),
            ));
        }
    }
    patterns(field, values)
}

fn compile_source(s: &Source) -> Result<CompiledSource, CompileError> {
    Ok(CompiledSource {
        principals: patterns("principals", &s.principals)?,
        not_principals: patterns("notPrincipals", &s.not_principals)?,
        namespaces: patterns("namespaces", &s.namespaces)?,
        not_namespaces: patterns("notNamespaces", &s.not_namespaces)?,
        service_accounts: service_accounts("serviceAccounts", &s.service_accounts)?,
        not_service_accounts: service_accounts("notServiceAccounts", &s.not_service_accounts)?,
        ip_blocks: nets("ipBlocks", &s.ip_blocks)?,
        not_ip_blocks: nets("notIpBlocks", &s.not_ip_blocks)?,
    })
}

fn compile_operation(o: &Operation) -> Result<CompiledOperation, CompileError> {
    for (i, p) in o.ports.iter().chain(&o.not_ports).enumerate() {
        if *p == 0 {
            return Err((format!("ports[{i}]"), "port 0 never matches".into()));
        }
    }
    Ok(CompiledOperation {
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        destination_ips: nets("destinationIps", &o.destination_ips)?,
        not_destination_ips: nets("notDestinationIps", &o.not_destination_ips)?,
    })
}

/// Compiles one policy; errors name the field relative to the policy.
pub fn compile(p: &AuthorizationPolicy) -> Result<CompiledPolicy, CompileError> {
    let mut rules = Vec::with_capacity(p.rules.len());
    let mut l7_fields = Vec::new();
    for (r, rule) in p.rules.iter().enumerate() {
        let from = rule
            .from
            .iter()
            .enumerate()
            .map(|(i, s)| {
                compile_source(s).map_err(|(f, e)| (format!("rules[{r}].from[{i}].{f}"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let to = rule
            .to
            .iter()
            .enumerate()
            .map(|(i, o)| {
                compile_operation(o).map_err(|(f, e)| (format!("rules[{r}].to[{i}].{f}"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for o in &rule.to {
            for f in o.l7_fields() {
                if !l7_fields.contains(&f) {
                    l7_fields.push(f);
                }
            }
        }
        if !rule.when.is_empty() && !l7_fields.contains(&"when") {
            l7_fields.push("when");
        }
        rules.push(CompiledRule { from, to });
    }
    Ok(CompiledPolicy {
        source: p.clone(),
        rules,
        l7_fields,
    })
}

impl CompiledPolicy {
    /// The policy's name as `namespace/name`, or `name` for mesh-wide policies.
    pub fn qualified_name(&self) -> String {
        match &self.source.namespace {
            Some(ns) => format!("{ns}/{}", self.source.name),
            None => self.source.name.clone(),
        }
    }

    fn applies(&self, w: &Workload) -> bool {
        applies_to(
            self.source.namespace.as_deref(),
            self.source.selector.as_ref(),
            w,
        )
    }

    fn matches(&self, c: &Conn<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}

impl CompiledRule {
    fn matches(&self, c: &Conn<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c)))
    }
}

/// Positive conditions: empty means "no condition"; an absent value never matches.
fn positive(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

/// Negative conditions: an absent value is indeed "not in the list".
fn negative(patterns: &[Pattern], value: Option<&str>) -> bool {
    value.is_none_or(|v| !patterns.iter().any(|p| p.matches(v)))
}

impl CompiledSource {
    fn matches(&self, c: &Conn<'_>) -> bool {
        let principal = c.src_identity.map(ToString::to_string);
        let namespace = c.src_identity.map(|i| i.namespace());
        let sa = c
            .src_identity
            .map(|i| format!("{}/{}", i.namespace(), i.service_account()));
        positive(&self.principals, principal.as_deref())
            && negative(&self.not_principals, principal.as_deref())
            && positive(&self.namespaces, namespace)
            && negative(&self.not_namespaces, namespace)
            && positive(&self.service_accounts, sa.as_deref())
            && negative(&self.not_service_accounts, sa.as_deref())
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|n| n.contains(&c.src)))
            && !self.not_ip_blocks.iter().any(|n| n.contains(&c.src))
    }
}

impl CompiledOperation {
    fn matches(&self, c: &Conn<'_>) -> bool {
        let port = c.dst.port();
        let ip = c.dst.ip();
        (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
            && (self.destination_ips.is_empty()
                || self.destination_ips.iter().any(|n| n.contains(&ip)))
            && !self.not_destination_ips.iter().any(|n| n.contains(&ip))
    }
}

/// Decides a connection. `has_waypoint` tells whether L7 policies can be enforced
/// downstream (by a waypoint); without one they fail closed here.
pub fn evaluate(
    c: &Conn<'_>,
    policies: &[CompiledPolicy],
    has_waypoint: bool,
) -> (Decision, Notes) {
    let mut notes = Notes::default();
    let mut deny: Option<Decision> = None;
    let mut allow_applies = false;
    let mut allowed = false;
    for p in policies.iter().filter(|p| p.applies(c.dst_workload)) {
        let name = p.qualified_name();
        if !p.l7_fields.is_empty() && !has_waypoint {
            let reason = format!(
                "policy {name} uses L7 attributes ({}) but the destination has no waypoint to enforce them",
                p.l7_fields.join(", ")
            );
            if p.source.dry_run {
                notes.dry_run.push((name, Action::Deny));
            } else if deny.is_none() {
                deny = Some(Decision::Deny {
                    policy: Some(name),
                    reason,
                });
            }
            continue;
        }
        let matched = p.matches(c);
        if p.source.dry_run {
            let would = match (p.source.action, matched) {
                (Action::Deny, true) => Some(Action::Deny),
                (Action::Allow, true) => Some(Action::Allow),
                (Action::Audit, true) => Some(Action::Audit),
                _ => None,
            };
            if let Some(a) = would {
                notes.dry_run.push((name, a));
            }
            continue;
        }
        match p.source.action {
            Action::Deny if matched && deny.is_none() => {
                deny = Some(Decision::Deny {
                    policy: Some(name.clone()),
                    reason: format!("denied by policy {name}"),
                });
            }
            Action::Deny => {}
            Action::Allow => {
                allow_applies = true;
                allowed |= matched;
            }
            Action::Audit if matched => notes.audited.push(name),
            Action::Audit => {}
        }
    }
    if let Some(d) = deny {
        return (d, notes);
    }
    if allow_applies && !allowed {
        return (
            Decision::Deny {
                policy: None,
                reason: "no ALLOW policy matched".into(),
            },
            notes,
        );
    }
    (Decision::Allow, notes)
}

#[cfg(test)]
mod tests;
