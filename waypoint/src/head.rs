//! The request head that authorization and the backend both see: exactly one host, and a
//! path whose parameters are either refused or explicitly allowed.
//!
//! [`canonicalize`] runs once per request, before authorization, and rewrites the head in
//! place, so the host and path that [`crate::authz`] checks are the ones forwarded. The
//! rules (a refusal is 400, response flag `DPE`):
//!
//! - **Host.** Exactly one `Host` header for HTTP/1.1 (RFC 9112 §3.2: none, or two, is
//!   400), whatever the request-target's form. A request with no host at all (HTTP/1.0
//!   without `Host`, HTTP/2 without `:authority` or `host`) is refused too: every rule on
//!   `hosts` would see an empty host, and the backend would pick a default one.
//! - **Absolute form.** `GET http://a/ HTTP/1.1` with `Host: b` means host `a` (RFC 9112
//!   §3.2.2: the target's authority wins); `a` is authorized and forwarded as `Host`.
//! - **HTTP/2.** `:authority` is the host; a `host` header that names another is 400 (RFC
//!   9113 §8.3.1); `host` alone stands in for a missing `:authority`.
//! - **Syntax.** `name[:port]`, `IPv4[:port]` or `[IPv6][:port]`: letters, digits, `-`,
//!   `_` and `.`, no empty label, a port of 1 to 65535. Anything else (`web, evil.example`,
//!   `user@web`, `%`-escapes, spaces) is 400: a backend or intermediary could read such a
//!   value as another host than the rules did.
//! - **Trailing dot.** One trailing dot is removed (`evil.example.` is `evil.example`, the
//!   same DNS name), in what is authorized and in what is forwarded.
//! - Case is kept; `hosts` rules compare without regard to case.
//!
//! Path parameters (`/admin;x`, `/x/..;/admin`, see [`ambit_shared::policy::path`]) are
//! refused unless a `TrafficPolicy` on the dialled Service sets `allowPathParameters`
//! ([`path_parameters`]).

use std::net::{IpAddr, Ipv6Addr};

use ambit_shared::config::index::Snapshot;
use ambit_shared::policy::path;
use http::header::{HOST, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{StatusCode, Uri, Version};

use crate::route::Target;

/// The longest host accepted: a DNS name (253), a dot, a colon and a port.
const MAX_AUTHORITY: usize = 253 + 1 + 6;

/// Why a request head is refused; every case is the client's (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// No `Host` header (HTTP/1.1), or no host at all.
    #[error("the request names no host")]
    MissingHost,
    /// More than one `Host` header.
    #[error("the request has {count} Host headers")]
    RepeatedHost {
        /// How many.
        count: usize,
    },
    /// A host that is not `name[:port]`.
    #[error("invalid host {value:?}")]
    InvalidHost {
        /// What was sent (lossy UTF-8).
        value: String,
    },
    /// HTTP/2 `:authority` and `host` name different hosts.
    #[error("`:authority` {authority:?} and `host` {host:?} differ")]
    ConflictingHost {
        /// `:authority`.
        authority: String,
        /// `host`.
        host: String,
    },
    /// `;` in the path, and no traffic policy allows it.
    #[error(
        "path {path:?} has parameters (`;`), which this service does not accept (see `allowPathParameters`)"
    )]
    PathParameters {
        /// The path as sent.
        path: String,
    },
}

// === impl HeadError ===

impl HeadError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Whether path parameters are accepted for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathParameters {
    /// 400 for any `;` (or `%3B`) in the path: the default.
    Refuse,
    /// Forwarded as sent; authorization matches segments without their parameters.
    Allow,
}

/// Whether `target`, the service or workload dialled, accepts path parameters: a
/// `TrafficPolicy` in its namespace targets the Service (for a workload address: a Service
/// that has it as an endpoint) with `allowPathParameters: true`.
pub fn path_parameters(snap: &Snapshot, target: &Target) -> PathParameters {
    let allows = |namespace: &str, name: &str| {
        snap.config.traffic_policies.iter().any(|p| {
            p.allow_path_parameters
                && p.namespace == namespace
                && p.target_refs
                    .iter()
                    .any(|t| t.is_service() && t.name == name)
        })
    };
    let allowed = match target {
        Target::Service {
            namespace, name, ..
        } => allows(namespace, name),
        Target::Workload {
            namespace, addr, ..
        } => snap.config.services.iter().any(|s| {
            s.namespace == **namespace
                && allows(&s.namespace, &s.name)
                && snap
                    .service(&s.namespace, &s.name)
                    .is_some_and(|(_, ips)| ips.contains(&addr.ip()))
        }),
    };
    if allowed {
        PathParameters::Allow
    } else {
        PathParameters::Refuse
    }
}

/// Checks `head` against the rules above and rewrites it to its one canonical host: the
/// `Host` header (a single one) and, when the target has one, the URI's authority both
/// become it. Returns the host as authorized and forwarded (`name[:port]`).
pub fn canonicalize(head: &mut Parts, params: PathParameters) -> Result<String, HeadError> {
    let authority = canonical_authority(head)?;
    if params == PathParameters::Refuse && path::has_parameters(head.uri.path()) {
        return Err(HeadError::PathParameters {
            path: head.uri.path().to_string(),
        });
    }
    let invalid = || HeadError::InvalidHost {
        value: authority.clone(),
    };
    // `canonical_authority` only returns what it validated, which is also a valid header
    // value and URI authority; the errors are kept rather than unwrapped all the same.
    let value = HeaderValue::from_str(&authority).map_err(|_| invalid())?;
    head.headers.insert(HOST, value);
    if head.uri.authority().is_some() {
        let mut parts = head.uri.clone().into_parts();
        parts.authority = Some(Authority::try_from(authority.as_str()).map_err(|_| invalid())?);
        head.uri = Uri::from_parts(parts).map_err(|_| invalid())?;
    }
    Ok(authority)
}

/// The one host the request names, validated and with one trailing dot removed.
fn canonical_authority(head: &Parts) -> Result<String, HeadError> {
    let count = head.headers.get_all(HOST).iter().count();
    if count > 1 {
        return Err(HeadError::RepeatedHost { count });
    }
    let header = match head.headers.get(HOST) {
        Some(v) => Some(parse_authority(v.as_bytes())?),
        None => None,
    };
    let target = match head.uri.authority() {
        Some(a) => Some(parse_authority(a.as_str().as_bytes())?),
        None => None,
    };
    if head.version == Version::HTTP_11 && header.is_none() {
        return Err(HeadError::MissingHost);
    }
    match (target, header) {
        (Some(authority), Some(host))
            if head.version == Version::HTTP_2 && !authority.eq_ignore_ascii_case(&host) =>
        {
            Err(HeadError::ConflictingHost { authority, host })
        }
        // HTTP/1 absolute form: the target's authority, whatever `Host` says; HTTP/2:
        // `:authority`.
        (Some(authority), _) => Ok(authority),
        (None, Some(host)) => Ok(host),
        (None, None) => Err(HeadError::MissingHost),
    }
}

/// Parses `host[:port]` strictly; returns it with one trailing dot of a name removed and
/// the port in its plain decimal form.
fn parse_authority(raw: &[u8]) -> Result<String, HeadError> {
    let invalid = || HeadError::InvalidHost {
        value: String::from_utf8_lossy(raw).into_owned(),
    };
    let text = std::str::from_utf8(raw).map_err(|_| invalid())?;
    if text.is_empty() || text.len() > MAX_AUTHORITY {
        return Err(invalid());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(invalid)?;
        inside.parse::<Ipv6Addr>().map_err(|_| invalid())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(invalid)?),
        };
        (format!("[{inside}]"), port)
    } else {
        let (name, port) = match text.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        };
        (canonical_name(name).ok_or_else(invalid)?, port)
    };
    match port {
        None => Ok(host),
        Some(p) => {
            // At most five digits, then a u16 that is not 0: `:`, `:0` and `:99999` fail.
            let n: u16 = (p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse().ok())
                .flatten()
                .filter(|n| *n != 0)
                .ok_or_else(invalid)?;
            Ok(format!("{host}:{n}"))
        }
    }
}

/// A DNS name or IPv4 address with one trailing dot removed; `None` if it has a character
/// outside letters, digits, `-`, `_` and `.`, or an empty label.
fn canonical_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(valid_label) {
        return None;
    }
    // Digits and dots only must be a dotted-quad IPv4 address (`1.2.3` or `01.2.3.4` are
    // read differently by different resolvers).
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ip: IpAddr = name.parse().ok()?;
        return Some(ip.to_string());
    }
    Some(name.to_string())
}

#[cfg(test)]
mod tests;
