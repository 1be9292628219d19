//! Caps on a config file, checked before the YAML parser sees a byte of it.
//!
//! The parser (libyaml, through `serde_yaml_ng`) loads a whole document's events before
//! deserializing, and its scanner is quadratic in flow nesting: a 205 KB file nested
//! 100,000 deep cost 41 s of CPU before `serde_yaml_ng`'s own recursion limit refused it,
//! and a 70 MB file peaked at 2.1 GB. So a file is refused, with the reason, when:
//! - it is larger than [`Limits::max_bytes`] (checked on the file's size before reading it,
//!   and again on what was read, in case it grew);
//! - a linear pre-scan ([`Limits::check`]) finds nesting deeper than [`Limits::max_depth`].
//!
//! The pre-scan is a conservative model of YAML's structure, not a parser: it counts block
//! levels by indentation (plus the compact `- `, `? ` and `: ` indicators) and flow levels
//! by brackets outside quoted scalars and comments. It may overestimate a file's depth,
//! never (outside aliases, which the deserializer bounds itself) underestimate it by more
//! than half: a block sequence may sit at its parent key's indentation, so the real depth
//! is at most twice the block levels it counts. The config fuzz target checks that bound
//! against the parser.
//!
//! Both caps can be raised or lowered with environment variables ([`MAX_BYTES_ENV`],
//! [`MAX_DEPTH_ENV`]); real configs are far from the defaults.

use std::fmt;

/// Largest config file accepted by default: 16 MiB. A file describing 100,000 workloads is
/// about 15 MB; the parser's transient memory is about 30 times the file (measured: 70 MB
/// peaked at 2.1 GB), so this bounds a reload at roughly 500 MB at worst.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting accepted by default. Our deepest field (a route's
/// `spec.rules[].matches[].headers[].value`) sits 10 levels down, and Kubernetes'
/// `managedFields` (tolerated in route metadata) rarely passes 20; the parser's own
/// recursion limit is 128.
pub const DEFAULT_MAX_DEPTH: usize = 64;
/// Environment variable overriding [`DEFAULT_MAX_BYTES`] (a number of bytes).
pub const MAX_BYTES_ENV: &str = "AMBIT_CONFIG_MAX_BYTES";
/// Environment variable overriding [`DEFAULT_MAX_DEPTH`] (a number of levels).
pub const MAX_DEPTH_ENV: &str = "AMBIT_CONFIG_MAX_DEPTH";

/// The caps a config file must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest file, in bytes. Default [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
    /// Deepest nesting of collections. Default [`DEFAULT_MAX_DEPTH`].
    pub max_depth: usize,
}

/// Why a file was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The file is over [`Limits::max_bytes`].
    #[error(
        "the file is {size} bytes, over the limit of {limit} bytes (set {MAX_BYTES_ENV} to change it)"
    )]
    TooLarge {
        /// Its size (or, if it grew while being read, a lower bound).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Collections nest deeper than [`Limits::max_depth`].
    #[error("nesting deeper than {limit} levels at {at} (set {MAX_DEPTH_ENV} to change the limit)")]
    TooDeep {
        /// The limit.
        limit: usize,
        /// Where the limit was passed.
        at: Position,
    },
}

/// A place in the file, 1-based as editors show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line number.
    pub line: usize,
    /// Column, in bytes.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// An environment variable that does not hold a usable limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {reason}")]
pub struct LimitEnvError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// Why it was refused.
    pub reason: &'static str,
}

// === impl Limits ===

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl Limits {
    /// The defaults, overridden by [`MAX_BYTES_ENV`] and [`MAX_DEPTH_ENV`] when set.
    pub fn from_env() -> Result<Limits, LimitEnvError> {
        Limits::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Limits::from_env`] reading variables through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Limits, LimitEnvError> {
        let mut limits = Limits::default();
        if let Some(value) = get(MAX_BYTES_ENV) {
            limits.max_bytes = positive(MAX_BYTES_ENV, value)?;
        }
        if let Some(value) = get(MAX_DEPTH_ENV) {
            let depth = positive(MAX_DEPTH_ENV, value.clone())?;
            // The parser refuses deeper documents itself, after paying for them.
            if depth > 128 {
                return Err(LimitEnvError {
                    name: MAX_DEPTH_ENV,
                    value,
                    reason: "the YAML parser refuses nesting deeper than 128 anyway",
                });
            }
            limits.max_depth = usize::try_from(depth).unwrap_or(128);
        }
        Ok(limits)
    }

    /// Refuses a file whose size on disk is over the limit, before it is read.
    pub fn check_size(&self, size: u64) -> Result<(), LimitError> {
        if size > self.max_bytes {
            return Err(LimitError::TooLarge {
                size,
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Checks `text` against both caps, in time linear in its length.
    pub fn check(&self, text: &str) -> Result<(), LimitError> {
        self.check_size(u64::try_from(text.len()).unwrap_or(u64::MAX))?;
        check_depth(text, self.max_depth)
    }
}

fn positive(name: &'static str, value: String) -> Result<u64, LimitEnvError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(LimitEnvError {
            name,
            value,
            reason: "expected a positive whole number",
        }),
    }
}

/// The pre-scan: fails at the first point where the nesting it counts passes `limit`.
fn check_depth(text: &str, limit: usize) -> Result<(), LimitError> {
    let mut scan = Scan {
        limit,
        indents: Vec::new(),
        flow: 0,
        quote: None,
        prev: None,
        block_scalar: None,
        plain_from: None,
    };
    // Every line break libyaml knows (YAML 1.1): LF, CR (alone, or before LF: the empty
    // line between them is harmless), NEL, LS and PS. Splitting on LF alone let a file
    // with CR line breaks nest as deep as it liked (found by the `config` fuzz target).
    for (n, line) in text
        .split(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
        .enumerate()
    {
        scan.line(n + 1, line.as_bytes())?;
    }
    Ok(())
}

/// State carried from line to line.
struct Scan {
    limit: usize,
    /// Columns of the open block levels, increasing.
    indents: Vec<usize>,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// The quote of a quoted scalar that continues onto the next line.
    quote: Option<u8>,
    /// The last significant byte, carried across lines inside flow collections (where a
    /// line break is only white space).
    prev: Option<u8>,
    /// Indentation of the line that opened a block scalar (`|`, `>`): more indented lines
    /// are its text, not structure.
    block_scalar: Option<usize>,
    /// Indentation of the line whose plain scalar may continue on more indented lines
    /// (`a: b` then `  'c`): those lines are text, and a quote there opens nothing.
    plain_from: Option<usize>,
}

/// What the last significant byte was, for [`node_start`]: a plain scalar's byte, or the
/// end of a quoted scalar or of a flow collection.
const PLAIN: u8 = b'x';
const CLOSED: u8 = b')';

/// Whether a node may start after `prev`, the last significant byte (`None`: nothing yet on
/// this line). Quotes and brackets only open a scalar or collection at a node's start;
/// elsewhere (`a: it's`, `value: ^x[0-9]`) they are part of a plain scalar.
fn node_start(prev: Option<u8>) -> bool {
    matches!(prev, None | Some(b'[' | b'{' | b',' | b':' | b'-' | b'?'))
}

fn is_blank(b: Option<&u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t' | b'\r'))
}

impl Scan {
    fn too_deep(&self, line: usize, index: usize) -> Result<(), LimitError> {
        if self.indents.len() + self.flow > self.limit {
            return Err(LimitError::TooDeep {
                limit: self.limit,
                at: Position {
                    line,
                    column: index + 1,
                },
            });
        }
        Ok(())
    }

    fn line(&mut self, n: usize, b: &[u8]) -> Result<(), LimitError> {
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let mut i = indent;
        let mut prev: Option<u8> = None;
        if self.quote.is_some() {
            // Inside a quoted scalar: only its closing quote matters.
        } else if self.flow > 0 {
            prev = self.prev;
        } else {
            if let Some(parent) = self.block_scalar {
                if b.get(indent).is_none_or(|&c| c == b'\r') || indent > parent {
                    return Ok(());
                }
                self.block_scalar = None;
            }
            match b.get(indent) {
                None | Some(b'\r') => return Ok(()),
                Some(b'#') => {
                    self.plain_from = None;
                    return Ok(());
                }
                _ => {}
            }
            match self.plain_from {
                Some(from) if indent > from => prev = Some(PLAIN),
                _ => self.structure(n, b, indent, &mut i, &mut prev)?,
            }
        }
        let commented = self.bytes(n, b, &mut i, &mut prev)?;
        if self.flow > 0 {
            self.prev = prev;
        }
        if commented || self.quote.is_some() || self.flow > 0 || prev != Some(PLAIN) {
            self.plain_from = None;
        } else if self.plain_from.is_none() {
            self.plain_from = Some(indent);
        }
        Ok(())
    }

    /// A line that starts a block-context node: its indentation and leading indicators open
    /// or close block levels.
    fn structure(
        &mut self,
        n: usize,
        b: &[u8],
        indent: usize,
        i: &mut usize,
        prev: &mut Option<u8>,
    ) -> Result<(), LimitError> {
        self.plain_from = None;
        // A document marker ends every open level.
        if indent == 0 && (b.starts_with(b"---") || b.starts_with(b"...")) && is_blank(b.get(3)) {
            self.indents.clear();
            *i = 3;
            return Ok(());
        }
        while self.indents.last().is_some_and(|&c| c >= indent) {
            self.indents.pop();
        }
        self.indents.push(indent);
        self.too_deep(n, indent)?;
        // Compact nesting on one line: `- - x`, `- ? k`, `? - x`.
        while let Some(&c @ (b'-' | b'?' | b':')) = b.get(*i) {
            if !is_blank(b.get(*i + 1)) {
                break;
            }
            *prev = Some(c);
            *i += 1;
            while matches!(b.get(*i), Some(b' ' | b'\t')) {
                *i += 1;
            }
            if b.get(*i).is_some_and(|&c| c != b'#' && c != b'\r') {
                self.indents.push(*i);
                self.too_deep(n, *i)?;
            }
        }
        Ok(())
    }

    /// The rest of a line from `i`: quotes, brackets and comments. Returns true if the line
    /// ended in a comment.
    fn bytes(
        &mut self,
        n: usize,
        b: &[u8],
        i: &mut usize,
        prev: &mut Option<u8>,
    ) -> Result<bool, LimitError> {
        while let Some(&c) = b.get(*i) {
            match self.quote {
                Some(b'\'') => {
                    if c == b'\'' {
                        if b.get(*i + 1) == Some(&b'\'') {
                            *i += 1;
                        } else {
                            self.quote = None;
                            *prev = Some(CLOSED);
                        }
                    }
                }
                Some(_) => {
                    if c == b'\\' {
                        *i += 1;
                    } else if c == b'"' {
                        self.quote = None;
                        *prev = Some(CLOSED);
                    }
                }
                None => match c {
                    b' ' | b'\t' | b'\r' => {}
                    // A comment starts at a `#` after white space (or at the line's start).
                    b'#' if *i == 0 || is_blank(b.get(*i - 1)) => return Ok(true),
                    b'\'' | b'"' if node_start(*prev) => self.quote = Some(c),
                    b'[' | b'{' if self.flow > 0 || node_start(*prev) => {
                        self.flow += 1;
                        self.too_deep(n, *i)?;
                        *prev = Some(c);
                    }
                    b']' | b'}' if self.flow > 0 => {
                        self.flow -= 1;
                        *prev = Some(CLOSED);
                    }
                    b',' if self.flow > 0 => *prev = Some(c),
                    // A mapping value indicator (followed by a blank, or any `:` in flow).
                    b':' if self.flow > 0 || is_blank(b.get(*i + 1)) => *prev = Some(c),
                    b'-' | b'?' if node_start(*prev) && is_blank(b.get(*i + 1)) => *prev = Some(c),
                    // Anchors and tags come before the node they name: the node still
                    // starts after them.
                    b'&' | b'!' if node_start(*prev) => {
                        // The name ends at a blank (or, in flow, at an indicator).
                        let ends = |c: u8| {
                            matches!(c, b' ' | b'\t' | b'\r')
                                || (self.flow > 0 && matches!(c, b',' | b'[' | b']' | b'{' | b'}'))
                        };
                        while b.get(*i + 1).is_some_and(|&c| !ends(c)) {
                            *i += 1;
                        }
                    }
                    b'|' | b'>' if self.flow == 0 && node_start(*prev) => {
                        self.block_scalar = Some(b.iter().take_while(|&&c| c == b' ').count());
                        return Ok(true);
                    }
                    _ => *prev = Some(PLAIN),
                },
            }
            *i += 1;
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
