//! Reading and validating the YAML configuration file.
//!
//! Every error names the file, the field (as a path such as `workloads[2].ips[0]`) and
//! the reason, so an operator can fix it without reading our source. Callers keep the
//! last good [`Config`] when loading fails.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::limits::{Limits, Position};
use super::model::{Config, Service};
use super::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};
use crate::identity::validate_component;

/// A configuration file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// Path of the offending field, e.g. `workloads[2].ips[0]`; empty for the whole file.
    pub field: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid config {}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "invalid config {}: field `{}`: {}",
                self.file.display(),
                self.field,
                self.reason
            )
        }
    }
}

/// Reads, parses and validates a config file within the default [`Limits`].
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    load_file_with(path, &Limits::default())
}

/// Reads, parses and validates a config file, refusing it before parsing when it is over
/// `limits`. Blocking, and CPU-bound for large files: async callers run it off their
/// workers (see [`super::watch`]).
pub fn load_file_with(path: &Path, limits: &Limits) -> Result<Config, ConfigError> {
    let text = read_file(path, limits)?;
    parse_str_with(path, &text, limits)
}

/// Reads `path` as UTF-8, refusing it without reading when its size is over the limit, and
/// reading at most one byte more than the limit in case it grows meanwhile.
pub fn read_file(path: &Path, limits: &Limits) -> Result<String, ConfigError> {
    read_capped(path, limits).map_err(|e| match e {
        ReadFailure::Io(e) | ReadFailure::Content(e) => e,
    })
}

/// Why [`read_capped`] returned no text: the watcher retries the first kind at its next
/// poll, and the second only when the file changes.
#[derive(Debug)]
pub(super) enum ReadFailure {
    /// Opening or reading failed (gone, no permission, out of file descriptors).
    Io(ConfigError),
    /// The bytes were read and are unusable (too large, not UTF-8).
    Content(ConfigError),
}

pub(super) fn read_capped(path: &Path, limits: &Limits) -> Result<String, ReadFailure> {
    let err = |reason: String| ConfigError {
        file: path.to_path_buf(),
        field: String::new(),
        reason,
    };
    let io = |e: std::io::Error| ReadFailure::Io(err(format!("cannot read file: {e}")));
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    limits
        .check_size(size)
        .map_err(|e| ReadFailure::Content(err(e.to_string())))?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    limits
        .check_size(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
        .map_err(|e| ReadFailure::Content(err(e.to_string())))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = text_position(e.as_bytes(), e.utf8_error().valid_up_to());
        ReadFailure::Content(err(format!("not UTF-8 text: invalid byte at {at}")))
    })
}

/// Parses and validates config text within the default [`Limits`]; `path` is only used in
/// errors.
pub fn parse_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_str_with(path, text, &Limits::default())
}

/// Parses and validates config text, refusing it before parsing when it is over `limits`;
/// `path` is only used in errors.
pub fn parse_str_with(path: &Path, text: &str, limits: &Limits) -> Result<Config, ConfigError> {
    let err = |field: String, reason: String| ConfigError {
        file: path.to_path_buf(),
        field,
        reason,
    };
    limits
        .check(text)
        .map_err(|e| err(String::new(), e.to_string()))?;
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let reason = e.into_inner().to_string();
        // serde_yaml_ng repeats the parent path in its message; the field already says it.
        let reason = match reason.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && field.starts_with(prefix) => {
                rest.to_string()
            }
            _ => reason,
        };
        err(field, reason)
    })?;
    validate(&config).map_err(|(field, reason)| err(field, reason))?;
    Ok(config)
}

/// The 1-based line and column of byte `offset` in `bytes`.
fn text_position(bytes: &[u8], offset: usize) -> Position {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Position {
        line: before.iter().filter(|&&b| b == b'\n').count() + 1,
        column: offset.saturating_sub(line_start) + 1,
    }
}

type Invalid = (String, String);

/// A field of an in-memory [`Config`] that fails validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct InvalidField {
    /// Path of the offending field, e.g. `workloads[2].ips[0]`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Validates a [`Config`] built in memory (e.g. translated from Kubernetes objects) with
/// the same rules as a file.
pub fn validate_config(config: &Config) -> Result<(), InvalidField> {
    validate(config).map_err(|(field, reason)| InvalidField { field, reason })
}

fn validate(c: &Config) -> Result<(), Invalid> {
    check_text(c)?;
    validate_component("trust domain", &c.trust_domain)
        .map_err(|e| ("trustDomain".into(), e.to_string()))?;

    let mut namespaces = BTreeMap::new();
    for (i, ns) in c.namespaces.iter().enumerate() {
        let at = format!("namespaces[{i}]");
        validate_component("namespace", &ns.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        if namespaces.insert(ns.name.as_str(), i).is_some() {
            return Err((
                format!("{at}.name"),
                format!("namespace `{}` is declared twice", ns.name),
            ));
        }
        check_mode_label(&ns.labels, &format!("{at}.labels"))?;
    }

    let mut names = HashMap::new();
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    for (i, w) in c.workloads.iter().enumerate() {
        let at = format!("workloads[{i}]");
        validate_component("workload name", &w.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        if !namespaces.contains_key(w.namespace.as_str()) {
            return Err((
                format!("{at}.namespace"),
                format!(
                    "namespace `{}` is not declared under `namespaces`",
                    w.namespace
                ),
            ));
        }
        validate_component("service account", &w.service_account)
            .map_err(|e| (format!("{at}.serviceAccount"), e.to_string()))?;
        if w.node.is_empty() {
            return Err((
                format!("{at}.node"),
                "must name the node the workload runs on".into(),
            ));
        }
        if names
            .insert((w.namespace.as_str(), w.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("{at}.name"),
                format!("workload `{}/{}` is declared twice", w.namespace, w.name),
            ));
        }
        if w.ips.is_empty() {
            return Err((
                format!("{at}.ips"),
                "a workload needs at least one IP".into(),
            ));
        }
        for (j, ip) in w.ips.iter().enumerate() {
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err((
                    format!("{at}.ips[{j}]"),
                    format!("{ip} cannot be a workload address"),
                ));
            }
            let owner = format!("{}/{}", w.namespace, w.name);
            if let Some(prev) = owners.insert(*ip, owner) {
                return Err((
                    format!("{at}.ips[{j}]"),
                    format!("{ip} is already the address of workload `{prev}`"),
                ));
            }
        }
        check_mode_label(&w.labels, &format!("{at}.labels"))?;
    }

    validate_policies(c, &namespaces)?;

    let mut services = HashMap::new();
    for (i, s) in c.services.iter().enumerate() {
        validate_service(s, &format!("services[{i}]"), &namespaces, &names)?;
        if services
            .insert((s.namespace.as_str(), s.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("services[{i}].name"),
                format!("service `{}/{}` is declared twice", s.namespace, s.name),
            ));
        }
        for (j, vip) in s.vips.iter().enumerate() {
            if let Some(prev) = owners.insert(*vip, format!("{}/{}", s.namespace, s.name)) {
                return Err((
                    format!("services[{i}].vips[{j}]"),
                    format!("{vip} is already used by `{prev}`"),
                ));
            }
        }
    }

    routes::validate_waypoints(c, &namespaces)?;
    routes::validate_routes(c, &namespaces, &services)?;
    traffic::validate_traffic_policies(c, &namespaces)?;
    Ok(())
}

fn validate_policies(c: &Config, namespaces: &BTreeMap<&str, usize>) -> Result<(), Invalid> {
    let scope_ok = |at: &str, ns: Option<&str>, has_selector: bool| -> Result<(), Invalid> {
        match ns {
            Some(ns) if !namespaces.contains_key(ns) => Err((
                format!("{at}.namespace"),
                format!("namespace `{ns}` is not declared under `namespaces`"),
            )),
            None if has_selector => Err((
                format!("{at}.selector"),
                "a selector needs a `namespace`".into(),
            )),
            _ => Ok(()),
        }
    };
    let mut names = HashMap::new();
    for (i, p) in c.authorization_policies.iter().enumerate() {
        let at = format!("authorizationPolicies[{i}]");
        validate_component("policy name", &p.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        scope_ok(&at, p.namespace.as_deref(), p.selector.is_some())?;
        if names
            .insert((p.namespace.as_deref(), p.name.as_str()), i)
            .is_some()
        {
            return Err((
                format!("{at}.name"),
                format!("policy `{}` is declared twice in its namespace", p.name),
            ));
        }
        crate::policy::compile(p).map_err(|(field, reason)| (format!("{at}.{field}"), reason))?;
    }
    let mut names = HashMap::new();
    for (i, p) in c.peer_authentications.iter().enumerate() {
        let at = format!("peerAuthentications[{i}]");
        validate_component("peer authentication name", &p.name)
            .map_err(|e| (format!("{at}.name"), e.to_string()))?;
        scope_ok(&at, p.namespace.as_deref(), p.selector.is_some())?;
        let scope = (p.namespace.as_deref(), p.selector.clone());
        if names.insert(scope, i).is_some() {
            return Err((
                at,
                "another peer authentication already covers exactly this scope".into(),
            ));
        }
    }
    Ok(())
}

fn validate_service(
    s: &Service,
    at: &str,
    namespaces: &BTreeMap<&str, usize>,
    workloads: &HashMap<(&str, &str), usize>,
) -> Result<(), Invalid> {
    validate_component("service name", &s.name)
        .map_err(|e| (format!("{at}.name"), e.to_string()))?;
    if !namespaces.contains_key(s.namespace.as_str()) {
        return Err((
            format!("{at}.namespace"),
            format!(
                "namespace `{}` is not declared under `namespaces`",
                s.namespace
            ),
        ));
    }
    if s.ports.is_empty() {
        return Err((
            format!("{at}.ports"),
            "a service needs at least one port".into(),
        ));
    }
    for (j, p) in s.ports.iter().enumerate() {
        if p.port == 0 || p.target_port == Some(0) {
            return Err((
                format!("{at}.ports[{j}]"),
                "port 0 is not a valid service port".into(),
            ));
        }
    }
    match (&s.selector, &s.endpoints) {
        (Some(_), Some(_)) => {
            return Err((
                at.to_string(),
                "set either `selector` or `endpoints`, not both".into(),
            ));
        }
        (None, None) => {
            return Err((
                at.to_string(),
                "set `selector` or `endpoints` so the service has backends".into(),
            ));
        }
        (None, Some(eps)) => {
            for (j, ep) in eps.iter().enumerate() {
                let field = format!("{at}.endpoints[{j}]");
                match (&ep.workload, &ep.ip) {
                    (Some(w), None) => {
                        if !workloads.contains_key(&(s.namespace.as_str(), w.as_str())) {
                            return Err((
                                format!("{field}.workload"),
                                format!("no workload `{w}` in namespace `{}`", s.namespace),
                            ));
                        }
                    }
                    (None, Some(_)) => {}
                    _ => {
                        return Err((
                            field,
                            "an endpoint sets exactly one of `workload` or `ip`".into(),
                        ));
                    }
                }
            }
        }
        (Some(_), None) => {}
    }
    Ok(())
}

/// Refuses control characters (C0, DEL, C1) and the Unicode bidirectional overrides in
/// every string of the config, keys included. None has a use in a name, label, path, header
/// or pattern, and each can forge or hide text in logs, metrics and `config_dump` (a
/// newline in a label value starts a fake log line; U+202E reverses what follows). Only
/// Kubernetes annotations, free text that tools write (kubectl's
/// `last-applied-configuration` ends in a newline), may hold tabs and line breaks.
fn check_text(c: &Config) -> Result<(), Invalid> {
    // The serialized form has exactly the field names a user wrote, so the path matches
    // the one serde reports for parse errors.
    let value = serde_json::to_value(c)
        .map_err(|e| (String::new(), format!("cannot inspect the config: {e}")))?;
    let mut path = String::new();
    walk_text(&value, &mut path, false)
}

fn walk_text(v: &serde_json::Value, path: &mut String, free_text: bool) -> Result<(), Invalid> {
    let len = path.len();
    let result = match v {
        serde_json::Value::String(s) => check_chars(s, free_text).map_err(|e| (path.clone(), e)),
        serde_json::Value::Array(items) => items.iter().enumerate().try_for_each(|(i, item)| {
            path.truncate(len);
            path.push_str(&format!("[{i}]"));
            walk_text(item, path, false)
        }),
        serde_json::Value::Object(fields) => fields.iter().try_for_each(|(k, item)| {
            path.truncate(len);
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
            check_chars(k, false).map_err(|e| (path.clone(), format!("in the key: {e}")))?;
            let annotations = k == "annotations" && path.ends_with("metadata.annotations");
            match (annotations, item) {
                (true, serde_json::Value::Object(notes)) => {
                    notes.iter().try_for_each(|(name, note)| {
                        path.truncate(len);
                        path.push_str(&format!(".{k}.{name}"));
                        check_chars(name, false)
                            .map_err(|e| (path.clone(), format!("in the key: {e}")))?;
                        walk_text(note, path, true)
                    })
                }
                _ => walk_text(item, path, false),
            }
        }),
        _ => Ok(()),
    };
    path.truncate(len);
    result
}

fn check_chars(s: &str, free_text: bool) -> Result<(), String> {
    let bad = s.chars().find(|&ch| {
        let allowed = free_text && matches!(ch, '\t' | '\n' | '\r');
        !allowed
            && (ch.is_control() || matches!(ch, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
    });
    match bad {
        Some(ch) => Err(format!(
            "control character U+{:04X} is not allowed here",
            u32::from(ch)
        )),
        None => Ok(()),
    }
}

fn check_mode_label(labels: &BTreeMap<String, String>, at: &str) -> Result<(), Invalid> {
    match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        None | Some(DATAPLANE_MODE_AMBIENT) | Some(DATAPLANE_MODE_NONE) => Ok(()),
        Some(other) => Err((
            format!("{at}.{DATAPLANE_MODE_LABEL}"),
            format!(
                "`{other}` is not a data-plane mode; use `{DATAPLANE_MODE_AMBIENT}` or `{DATAPLANE_MODE_NONE}`"
            ),
        )),
    }
}

mod routes;
mod traffic;

#[cfg(test)]
mod tests;
