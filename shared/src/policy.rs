//! Authorization: a pure function from a connection (and, at a waypoint, an HTTP request)
//! and the policies to a decision.
//!
//! Policies are compiled once per config (patterns, CIDRs and header names parsed), then
//! evaluated per connection or request; the allow path allocates at most the peer's
//! principal strings. Semantics, as in Istio:
//! - any matching DENY refuses;
//! - if no ALLOW policy applies to the destination, the connection is allowed;
//! - otherwise one ALLOW policy must match;
//! - AUDIT policies are reported and never change the verdict;
//! - dry-run policies are reported as what they would have done, never enforced.
//!
//! L7 attributes (`methods`, `paths`, `hosts`, their negations, and `when` header
//! conditions) are only known where the request is seen: the waypoint passes a
//! [`Request`]. Without one:
//! - at a node tunnel for a destination with no waypoint (`has_waypoint == false`), an
//!   ALLOW or DENY policy that needs them denies (fail closed), with a reason saying so;
//! - at a waypoint forwarding plain TCP (`has_waypoint == true`), Istio's rule for
//!   HTTP-only fields on TCP traffic applies: in an ALLOW (or AUDIT) rule they never
//!   match, in a DENY rule they are ignored, so the rule matches on its L4 fields and the
//!   connection is refused rather than let through.
//!
//! Request matching: methods are exact and case-sensitive (`GET` is not `get`); paths are
//! normalized first (see [`path`]) and matched exact, prefix (`/v1/*`), suffix
//! (`*.json`) or any (`*`); hosts are the authority without its port, compared without
//! regard to ASCII case; a header condition reads all the header's values joined with
//! `,` (as HTTP defines repeated fields).

pub mod path;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::config::model::{
    Action, AuthorizationPolicy, Condition, Operation, Source, Workload, applies_to,
};
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
    /// The HTTP request, when the connection carries one and a waypoint sees it.
    pub request: Option<&'a Request<'a>>,
}

/// What policy sees of an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method, as sent (`GET`).
    pub method: &'a str,
    /// The path in [`path::Form::Match`]: query dropped, normalized.
    pub path: &'a str,
    /// The host: the authority (or `Host` header) without its port.
    pub host: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
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
    name: String,
    rules: Vec<CompiledRule>,
    l7_fields: Vec<&'static str>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledCondition>,
}

/// `request.headers[<name>]` with its accepted and refused values.
#[derive(Debug, Clone)]
struct CompiledCondition {
    header: HeaderName,
    values: Vec<Pattern>,
    not_values: Vec<Pattern>,
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
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
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

    /// [`Pattern::matches`] without regard to ASCII case (hosts).
    fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e.eq_ignore_ascii_case(value),
            Pattern::Prefix(p) => v
                .get(..p.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes())),
            Pattern::Suffix(s) => v
                .len()
                .checked_sub(s.len())
                .and_then(|start| v.get(start..))
                .is_some_and(|t| t.eq_ignore_ascii_case(s.as_bytes())),
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

/// Principals are matched against the peer's SPIFFE ID
/// (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`). Istio writes them
/// without the scheme (`cluster.local/ns/shop/sa/web`); such an entry, or any other that no
/// identity could match, would silently never match here, so it is refused.
fn principals(field: &str, values: &[String]) -> Result<Vec<Pattern>, CompileError> {
    for (i, v) in values.iter().enumerate() {
        check_principal(v).map_err(|reason| (format!("{field}[{i}]"), reason))?;
    }
    patterns(field, values)
}

/// The parts of a SPIFFE ID between its `/`s: `spiffe:`, ``, trust domain, `ns`,
/// namespace, `sa`, service account.
#[derive(Debug, Clone, Copy)]
enum IdPart {
    Literal(&'static str),
    Component,
}

const SPIFFE_ID_PARTS: [IdPart; 7] = [
    IdPart::Literal("spiffe:"),
    IdPart::Literal(""),
    IdPart::Component,
    IdPart::Literal("ns"),
    IdPart::Component,
    IdPart::Literal("sa"),
    IdPart::Component,
];

/// How much of an [`IdPart`] a piece of a pattern covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    Whole,
    Start,
    End,
}

impl IdPart {
    fn accepts(self, piece: &str, cover: Cover) -> bool {
        match (self, cover) {
            (IdPart::Literal(l), Cover::Whole) => piece == l,
            (IdPart::Literal(l), Cover::Start) => l.starts_with(piece),
            (IdPart::Literal(l), Cover::End) => l.ends_with(piece),
            (IdPart::Component, Cover::Whole) => {
                crate::identity::validate_component("component", piece).is_ok()
            }
            (IdPart::Component, cover) => {
                piece
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                    && !(cover == Cover::Start && piece.starts_with(['-', '.']))
                    && !(cover == Cover::End && piece.ends_with(['-', '.']))
            }
        }
    }
}

fn check_principal(p: &str) -> Result<(), String> {
    let hint = "principals are SPIFFE IDs: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, `*` at the start or end";
    let fits = |body: &str, prefix: bool| {
        let pieces: Vec<&str> = body.split('/').collect();
        let Some(skip) = SPIFFE_ID_PARTS.len().checked_sub(pieces.len()) else {
            return false;
        };
        // A prefix lines up with the ID's first parts and may stop inside its last one; a
        // suffix lines up with the last parts and may start inside its first one.
        let parts = if prefix {
            &SPIFFE_ID_PARTS[..pieces.len()]
        } else {
            &SPIFFE_ID_PARTS[skip..]
        };
        let last = pieces.len().saturating_sub(1);
        pieces
            .iter()
            .zip(parts)
            .enumerate()
            .all(|(i, (piece, part))| {
                let cover = match (prefix, i) {
                    (true, i) if i == last => Cover::Start,
                    (false, 0) => Cover::End,
                    _ => Cover::Whole,
                };
                part.accepts(piece, cover)
            })
    };
    let ok = match Pattern::parse(p)? {
        Pattern::Any => true,
        Pattern::Exact(id) => id.parse::<Identity>().is_ok(),
        Pattern::Prefix(body) => fits(&body, true),
        Pattern::Suffix(body) => fits(&body, false),
    };
    if ok {
        return Ok(());
    }
    let suggestion = match p.split_once("/ns/") {
        Some((td, _)) if !p.starts_with("spiffe://") && !td.contains(['*', ':']) => {
            format!(" (did you mean `spiffe://{p}`?)")
        }
        _ => String::new(),
    };
    Err(format!("`{p}` can never match a peer: {hint}{suggestion}"))
}

fn compile_source(s: &Source) -> Result<CompiledSource, CompileError> {
    Ok(CompiledSource {
        principals: principals("principals", &s.principals)?,
        not_principals: principals("notPrincipals", &s.not_principals)?,
        namespaces: patterns("namespaces", &s.namespaces)?,
        not_namespaces: patterns("notNamespaces", &s.not_namespaces)?,
        service_accounts: service_accounts("serviceAccounts", &s.service_accounts)?,
        not_service_accounts: service_accounts("notServiceAccounts", &s.not_service_accounts)?,
        ip_blocks: nets("ipBlocks", &s.ip_blocks)?,
        not_ip_blocks: nets("notIpBlocks", &s.not_ip_blocks)?,
    })
}

/// Methods are compared exactly, as Istio does: a lowercase or wildcard entry would
/// silently never match, so it is refused.
fn methods(field: &str, values: &[String]) -> Result<Vec<String>, CompileError> {
    for (i, m) in values.iter().enumerate() {
        let token = !m.is_empty()
            && m.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !token {
            return Err((
                format!("{field}[{i}]"),
                format!(
                    "`{m}` is not an HTTP method: methods match exactly and case-sensitively (e.g. GET, POST)"
                ),
            ));
        }
    }
    Ok(values.to_vec())
}

fn paths(field: &str, values: &[String]) -> Result<Vec<Pattern>, CompileError> {
    for (i, p) in values.iter().enumerate() {
        if !p.starts_with(['/', '*']) {
            return Err((
                format!("{field}[{i}]"),
                format!("`{p}` is not a path: it must start with `/` (or be `*` or `*suffix`)"),
            ));
        }
        if p.contains(['?', '#']) {
            return Err((
                format!("{field}[{i}]"),
                format!("`{p}`: paths are matched without the query string"),
            ));
        }
    }
    patterns(field, values)
}

fn compile_operation(o: &Operation) -> Result<CompiledOperation, CompileError> {
    for (i, p) in o.ports.iter().enumerate() {
        if *p == 0 {
            return Err((format!("ports[{i}]"), "port 0 never matches".into()));
        }
    }
    for (i, p) in o.not_ports.iter().enumerate() {
        if *p == 0 {
            return Err((format!("notPorts[{i}]"), "port 0 never matches".into()));
        }
    }
    Ok(CompiledOperation {
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        destination_ips: nets("destinationIps", &o.destination_ips)?,
        not_destination_ips: nets("notDestinationIps", &o.not_destination_ips)?,
        methods: methods("methods", &o.methods)?,
        not_methods: methods("notMethods", &o.not_methods)?,
        paths: paths("paths", &o.paths)?,
        not_paths: paths("notPaths", &o.not_paths)?,
        hosts: patterns("hosts", &o.hosts)?,
        not_hosts: patterns("notHosts", &o.not_hosts)?,
    })
}

/// The only `when` key supported: `request.headers[<name>]`.
const HEADER_KEY_PREFIX: &str = "request.headers[";

fn compile_condition(c: &Condition) -> Result<CompiledCondition, CompileError> {
    let name = c
        .key
        .strip_prefix(HEADER_KEY_PREFIX)
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(|| {
            (
                "key".to_string(),
                format!(
                    "unsupported key `{}`: only `request.headers[<name>]` is supported",
                    c.key
                ),
            )
        })?;
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        (
            "key".to_string(),
            format!("`{name}` is not a valid HTTP header name"),
        )
    })?;
    Ok(CompiledCondition {
        header,
        values: patterns("values", &c.values)?,
        not_values: patterns("notValues", &c.not_values)?,
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
        let when = rule
            .when
            .iter()
            .enumerate()
            .map(|(i, c)| {
                compile_condition(c).map_err(|(f, e)| (format!("rules[{r}].when[{i}].{f}"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.push(CompiledRule { from, to, when });
    }
    let name = match &p.namespace {
        Some(ns) => format!("{ns}/{}", p.name),
        None => p.name.clone(),
    };
    Ok(CompiledPolicy {
        source: p.clone(),
        name,
        rules,
        l7_fields,
    })
}

impl CompiledPolicy {
    /// The policy's name as `namespace/name`, or `name` for mesh-wide policies.
    pub fn qualified_name(&self) -> &str {
        &self.name
    }

    /// What a match does.
    pub fn action(&self) -> Action {
        self.source.action
    }

    /// True if the policy is only logged, never enforced.
    pub fn dry_run(&self) -> bool {
        self.source.dry_run
    }

    /// The L7 fields the policy uses (`methods`, `paths`, `when`, …); empty for a pure L4
    /// policy.
    pub fn l7_fields(&self) -> &[&'static str] {
        &self.l7_fields
    }

    /// True if the policy applies to workload `w` (its namespace and selector).
    pub fn applies_to(&self, w: &Workload) -> bool {
        applies_to(
            self.source.namespace.as_deref(),
            self.source.selector.as_ref(),
            w,
        )
    }

    fn matches(&self, f: &Facts<'_>) -> bool {
        // Istio: L7 fields absent from the traffic are ignored by DENY rules (so they match
        // on the rest, and refuse) and never match in ALLOW and AUDIT rules.
        let absent_l7_matches = self.source.action == Action::Deny;
        self.rules.iter().any(|r| r.matches(f, absent_l7_matches))
    }
}

/// The source's principal strings, worked out at most once per evaluation (and shared by
/// the evaluations for every endpoint of a request), and only when a rule asks for them.
#[derive(Default)]
struct PeerStrings {
    principal: OnceCell<Option<String>>,
    service_account: OnceCell<Option<String>>,
}

/// A connection and its source's strings.
struct Facts<'a> {
    conn: &'a Conn<'a>,
    peer: &'a PeerStrings,
}

impl Facts<'_> {
    fn principal(&self) -> Option<&str> {
        self.peer
            .principal
            .get_or_init(|| self.conn.src_identity.map(ToString::to_string))
            .as_deref()
    }

    fn service_account(&self) -> Option<&str> {
        self.peer
            .service_account
            .get_or_init(|| {
                self.conn
                    .src_identity
                    .map(|i| format!("{}/{}", i.namespace(), i.service_account()))
            })
            .as_deref()
    }
}

impl CompiledRule {
    fn matches(&self, f: &Facts<'_>, absent_l7_matches: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(f.conn, absent_l7_matches)))
            && match f.conn.request {
                Some(r) => self.when.iter().all(|c| c.holds(r)),
                None => self.when.is_empty() || absent_l7_matches,
            }
    }
}

impl CompiledCondition {
    fn holds(&self, r: &Request<'_>) -> bool {
        let mut all = r.headers.get_all(&self.header).iter();
        let Some(first) = all.next() else {
            // An absent header is not in `notValues` either, but Istio requires the
            // attribute to be present for any condition on it.
            return false;
        };
        let value: Cow<'_, str> = match all.next() {
            None => String::from_utf8_lossy(first.as_bytes()),
            Some(second) => {
                let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
                for v in std::iter::once(second).chain(all) {
                    joined.push(',');
                    joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Cow::Owned(joined)
            }
        };
        (self.values.is_empty() || self.values.iter().any(|p| p.matches(&value)))
            && !self.not_values.iter().any(|p| p.matches(&value))
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
    fn matches(&self, f: &Facts<'_>) -> bool {
        let c = f.conn;
        let namespace = c.src_identity.map(|i| i.namespace());
        let principals = || {
            let p = f.principal();
            positive(&self.principals, p) && negative(&self.not_principals, p)
        };
        let service_accounts = || {
            let sa = f.service_account();
            positive(&self.service_accounts, sa) && negative(&self.not_service_accounts, sa)
        };
        (self.principals.is_empty() && self.not_principals.is_empty() || principals())
            && positive(&self.namespaces, namespace)
            && negative(&self.not_namespaces, namespace)
            && (self.service_accounts.is_empty() && self.not_service_accounts.is_empty()
                || service_accounts())
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|n| n.contains(&c.src)))
            && !self.not_ip_blocks.iter().any(|n| n.contains(&c.src))
    }
}

impl CompiledOperation {
    fn matches(&self, c: &Conn<'_>, absent_l7_matches: bool) -> bool {
        let port = c.dst.port();
        let ip = c.dst.ip();
        let l4 = (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
            && (self.destination_ips.is_empty()
                || self.destination_ips.iter().any(|n| n.contains(&ip)))
            && !self.not_destination_ips.iter().any(|n| n.contains(&ip));
        l4 && match c.request {
            Some(r) => self.matches_request(r),
            None => !self.has_l7() || absent_l7_matches,
        }
    }

    fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }

    fn matches_request(&self, r: &Request<'_>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == r.method))
            && !self.not_methods.iter().any(|m| m == r.method)
            && positive(&self.paths, Some(r.path))
            && negative(&self.not_paths, Some(r.path))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches_ignore_case(r.host)))
            && !self.not_hosts.iter().any(|h| h.matches_ignore_case(r.host))
    }
}

/// Decides a connection, or (when `c.request` is set) one request on it.
///
/// `has_waypoint` tells whether L7 attributes are enforced where the traffic is seen as
/// HTTP: true at a waypoint, false at the node tunnel of a destination with no waypoint,
/// where an ALLOW or DENY policy using them fails closed. See the module docs.
pub fn evaluate(
    c: &Conn<'_>,
    policies: &[CompiledPolicy],
    has_waypoint: bool,
) -> (Decision, Notes) {
    evaluate_with(c, policies, has_waypoint, &PeerStrings::default())
}

/// Decides a request that may reach any of several endpoints (a service's): it is allowed
/// only if every endpoint's policies allow it, so no endpoint ever receives a request its
/// own policies refuse, whichever one the balancer picks. `c.dst` and `c.dst_workload`
/// are replaced by each endpoint's address and workload in turn; the first denial wins.
/// Notes are gathered from every endpoint, without repeats. With no endpoints, allows.
pub fn evaluate_endpoints(
    c: &Conn<'_>,
    endpoints: &[(SocketAddr, &Workload)],
    policies: &[CompiledPolicy],
    has_waypoint: bool,
) -> (Decision, Notes) {
    let peer = PeerStrings::default();
    let mut notes = Notes::default();
    for (dst, w) in endpoints {
        let conn = Conn {
            dst: *dst,
            dst_workload: w,
            ..c.clone()
        };
        let (d, n) = evaluate_with(&conn, policies, has_waypoint, &peer);
        for a in n.audited {
            if !notes.audited.contains(&a) {
                notes.audited.push(a);
            }
        }
        for d in n.dry_run {
            if !notes.dry_run.contains(&d) {
                notes.dry_run.push(d);
            }
        }
        if d != Decision::Allow {
            return (d, notes);
        }
    }
    (Decision::Allow, notes)
}

fn evaluate_with(
    c: &Conn<'_>,
    policies: &[CompiledPolicy],
    has_waypoint: bool,
    peer: &PeerStrings,
) -> (Decision, Notes) {
    let mut notes = Notes::default();
    let mut deny: Option<Decision> = None;
    let mut allow_applies = false;
    let mut allowed = false;
    let facts = Facts { conn: c, peer };
    for p in policies.iter().filter(|p| p.applies_to(c.dst_workload)) {
        let name = p.qualified_name();
        if !p.l7_fields.is_empty() && !has_waypoint && c.request.is_none() {
            if p.source.action == Action::Audit {
                // Auditing cannot refuse; an L7 audit is simply not checkable here.
                continue;
            }
            let reason = format!(
                "policy {name} uses L7 attributes ({}) but the destination has no waypoint to enforce them",
                p.l7_fields.join(", ")
            );
            if p.source.dry_run {
                notes.dry_run.push((name.to_string(), Action::Deny));
            } else if deny.is_none() {
                deny = Some(Decision::Deny {
                    policy: Some(name.to_string()),
                    reason,
                });
            }
            continue;
        }
        let matched = p.matches(&facts);
        if p.source.dry_run {
            // What it would have done: a matching DENY or AUDIT; for ALLOW, a match, or a
            // miss, which (if no other ALLOW matched) would have refused.
            let would = match (p.source.action, matched) {
                (Action::Deny, true) => Some(Action::Deny),
                (Action::Allow, true) => Some(Action::Allow),
                (Action::Allow, false) => Some(Action::Deny),
                (Action::Audit, true) => Some(Action::Audit),
                _ => None,
            };
            if let Some(a) = would {
                notes.dry_run.push((name.to_string(), a));
            }
            continue;
        }
        match p.source.action {
            Action::Deny if matched && deny.is_none() => {
                deny = Some(Decision::Deny {
                    policy: Some(name.to_string()),
                    reason: format!("denied by policy {name}"),
                });
            }
            Action::Deny => {}
            Action::Allow => {
                allow_applies = true;
                allowed |= matched;
            }
            Action::Audit if matched => notes.audited.push(name.to_string()),
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
