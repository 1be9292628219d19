//! Request paths as authorization sees them: the query string dropped, and normalized so
//! that two spellings of one resource match the same rules.
//!
//! What is done, in order (RFC 3986 section 6.2.2, as Envoy's `normalize_path` plus Istio's
//! `MERGE_SLASHES`, which is what an Istio waypoint applies by default):
//! - the query (`?…`) and fragment (`#…`) are dropped;
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, so
//!   `%2e%2e` is `..`, and the hex digits of the escapes that stay are upper-cased;
//! - `.` segments are removed and `..` segments remove the segment before them (never
//!   above the root), so `/v1/../admin` is `/admin`;
//! - runs of `/` are merged, so `//admin` is `/admin`.
//!
//! What is deliberately *not* done:
//! - **Case is kept.** Rules match paths case-sensitively, as Istio's do: a DENY on `/admin`
//!   does not match `/ADMIN`. A backend that treats paths case-insensitively needs a rule
//!   for each spelling (or an ALLOW list, which fails closed).
//! - **Decoding happens once.** `%2561` decodes to `%61`, which stays as it is: it is not
//!   decoded again to `a`, so `/%2561dmin` is not `/admin` (Envoy and Istio agree). The
//!   backend receives `/%2561dmin`; one that decodes twice is outside what a proxy can
//!   protect, and rules should not rely on it.
//!
//! Path parameters (`;` in a segment, RFC 3986 section 3.3) are how Tomcat and Spring read
//! `/admin;x` as `/admin` and `/x/..;/admin` as `/admin`. [`has_parameters`] finds them:
//! the waypoint refuses such requests unless a traffic policy allows them. Where they are
//! allowed, [`Form::Match`] removes each segment's parameters (`;` to the end of the
//! segment, also when spelled `%3B`) before dot segments are resolved, which is how those
//! servers map them, so a rule on `/admin` matches `/admin;x` and `/x/..;/admin`.
//!
//! Encoded slashes (`%2F`) and backslashes (`%5C`, `\`) are where the two forms differ:
//! - [`Form::Match`], the form rules are checked against, treats them as `/`: a backend
//!   that decodes them must not reach `/admin/x` through `/admin%2Fx` past a rule on
//!   `/admin/*`, or `/admin` through `/v1%2F..%2Fadmin` under an ALLOW on `/v1/*`;
//! - [`Form::Forward`], the path the waypoint sends upstream, keeps them encoded, so
//!   applications that put encoded slashes in identifiers keep working. Dot segments and
//!   repeated slashes are resolved in it too, so a backend that routes on the raw path
//!   (a prefix router on `/admin/`) never sees `/admin/..` after `/` was authorized.
//!   Path parameters are forwarded as sent.

use std::borrow::Cow;

/// Which normalized form to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// For matching rules: encoded slashes and backslashes are path separators, and path
    /// parameters are removed from each segment.
    Match,
    /// For forwarding: encoded slashes and backslashes stay as they were sent.
    Forward,
}

/// Normalizes `raw` (a request target's path, with or without its query) into `form`.
/// Borrows when nothing changes, which is the common case. A path that does not start
/// with `/` (`*`, for `OPTIONS *`) is returned without its query, otherwise unchanged.
///
/// The [`Form::Forward`] of a path always normalizes to its [`Form::Match`]: where keeping
/// an encoded slash or a backslash would make a `..` remove a different segment than it
/// did for matching (`/x%2Fy/../admin` is `/x/admin` to the rules, but was forwarded as
/// `/admin`, found by the `path` fuzz target), the matched form is forwarded instead.
pub fn normalize(raw: &str, form: Form) -> Cow<'_, str> {
    let out = normalize_form(raw, form);
    if form == Form::Forward && matches!(out, Cow::Owned(_)) {
        let matched = normalize_form(raw, Form::Match);
        if normalize_form(&out, Form::Match) != matched {
            return Cow::Owned(matched.into_owned());
        }
    }
    out
}

fn normalize_form(raw: &str, form: Form) -> Cow<'_, str> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') || is_normal(path, form) {
        return Cow::Borrowed(path);
    }
    let decoded = decode(path, form);
    let mut segments: Vec<&str> = Vec::new();
    let separators: &[char] = match form {
        Form::Match => &['/', '\\'],
        Form::Forward => &['/'],
    };
    let mut parts = decoded.split(separators).peekable();
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        // Tomcat and Spring drop a segment's parameters before resolving dot segments,
        // so `..;x` is `..` to them, and must be to the rules.
        let seg = match form {
            Form::Match => seg.split(';').next().unwrap_or_default(),
            Form::Forward => seg,
        };
        match seg {
            "" | "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// True if `path` is already in `form`: the fast path, which allocates nothing.
fn is_normal(path: &str, form: Form) -> bool {
    let b = path.as_bytes();
    if b.contains(&b'%') || (form == Form::Match && (b.contains(&b'\\') || b.contains(&b';'))) {
        return false;
    }
    // Every segment after a `/` must be non-empty (except a final one) and not a dot
    // segment.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Decodes percent-escapes of unreserved characters (and, for [`Form::Match`], of `/`, `\`
/// and `;`); upper-cases the hex digits of the escapes left. One pass only: the `%61` that
/// `%2561` decodes to stays. A `%` not followed by two hex digits is encoded as `%25`: kept
/// bare, it could join the characters after it into an escape that the next decoder (the
/// backend) decodes, though it was never matched decoded (`/%%361dmin` became `/%61dmin`,
/// which a backend reads as `/admin`; found by the `path` fuzz target).
fn decode(path: &str, form: Form) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let rest = path.get(i..).unwrap_or_default();
        let Some(after) = rest.strip_prefix('%') else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8().max(1);
            continue;
        };
        // Two hex digits exactly: `from_str_radix` alone would take a sign (`%+1`).
        let hex = after
            .get(..2)
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) if is_unreserved(v) => out.push(char::from(v)),
            Some(v @ (b'/' | b'\\' | b';')) if form == Form::Match => out.push(char::from(v)),
            Some(v) => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(v >> 4)]));
                out.push(char::from(HEX[usize::from(v & 0x0f)]));
            }
            None => {
                out.push_str("%25");
                i += 1;
                continue;
            }
        }
        i += 3;
    }
    out
}

/// True if the path (query excluded) carries path parameters: a `;`, or its escape `%3B`,
/// which servers that decode before splitting parameters read as one.
pub fn has_parameters(raw: &str) -> bool {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    path.contains(';')
        || path
            .as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'3' && w[2].eq_ignore_ascii_case(&b'b'))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The host of an `:authority` or `Host` value: the port dropped (IPv6 brackets kept).
pub fn host_of(authority: &str) -> &str {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => authority.get(..=end).unwrap_or(authority),
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}
