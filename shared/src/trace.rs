//! W3C trace context (`traceparent`), parsed at the boundary and generated when missing.
//!
//! A proxy keeps the trace id of the request it received, and gives the request it sends
//! on a new span id whose parent is the received one ([`TraceParent::child`]), so a trace
//! shows each hop. See <https://www.w3.org/TR/trace-context/#traceparent-header>.

use std::fmt;
use std::str::FromStr;

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";

/// A version-00 `traceparent`: trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` value was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {0:?}")]
pub struct TraceParentError(pub String);

impl TraceParent {
    /// A new trace: random trace and span ids, sampled.
    pub fn generate() -> Self {
        let mut bytes = random_bytes::<24>();
        // All-zero ids are invalid; astronomically unlikely, but cheap to rule out.
        if bytes[..16].iter().all(|b| *b == 0) {
            bytes[0] = 1;
        }
        if bytes[16..].iter().all(|b| *b == 0) {
            bytes[16] = 1;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        trace_id.copy_from_slice(&bytes[..16]);
        span_id.copy_from_slice(&bytes[16..]);
        TraceParent {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// The same trace with a new span id: what a hop sends onwards.
    pub fn child(&self) -> Self {
        let mut span_id = random_bytes::<8>();
        if span_id.iter().all(|b| *b == 0) {
            span_id[0] = 1;
        }
        TraceParent { span_id, ..*self }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span (parent) id, 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    /// True if the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`. Later versions are read by their first four
    /// fields, as the spec asks; all-zero ids and version `ff` are refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TraceParentError(s.chars().take(64).collect());
        let mut parts = s.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        let version = unhex::<1>(version).ok_or_else(err)?;
        if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
            return Err(err());
        }
        let trace_id = unhex::<16>(trace).ok_or_else(err)?;
        let span_id = unhex::<8>(span).ok_or_else(err)?;
        let flags = unhex::<1>(flags).ok_or_else(err)?[0];
        if trace_id.iter().all(|b| *b == 0) || span_id.iter().all(|b| *b == 0) {
            return Err(err());
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// Trace ids need uniqueness, not secrecy, and are made for every request: a thread-local
/// PRNG (seeded once per thread) keeps the per-request `getrandom` syscall of the system
/// CSPRNG off the request path.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    fastrand::fill(&mut bytes);
    bytes
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let s = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let tp: TraceParent = s.parse().expect("valid");
        assert_eq!(tp.to_string(), s);
        assert_eq!(tp.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.span_id(), "b7ad6b7169203331");
        assert!(tp.sampled());
        let child = tp.child();
        assert_eq!(child.trace_id(), tp.trace_id());
        assert_ne!(child.span_id(), tp.span_id());
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031ü-b7ad6b7169203331-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"
                .parse::<TraceParent>()
                .is_ok()
        );
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = TraceParent::generate();
        let b = TraceParent::generate();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(a.to_string().parse::<TraceParent>(), Ok(a));
    }
}
