//! Gateway API durations ([GEP-2257]): `1h`, `30m`, `10s`, `500ms`, or up to four of them
//! run together (`1h30m`), each a one-to-five-digit decimal integer and a unit.
//!
//! The grammar is exactly `^([0-9]{1,5}(h|m|s|ms)){1,4}$`: no fractions, no signs, no days.
//! Components add up, in any order and even repeated (`100ms200ms` is `300ms`). The text the
//! user wrote is kept and serialized back unchanged, because GEP-2257 forbids rewriting user
//! input; [`Display`](fmt::Display) renders the standard form (`150m` shows as `2h30m`,
//! zero as `0s`) for logs.
//!
//! [GEP-2257]: https://gateway-api.sigs.k8s.io/geps/gep-2257/

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most components a duration may have.
const MAX_COMPONENTS: usize = 4;
/// The most digits one component may have.
const MAX_DIGITS: usize = 5;

/// A duration written in the Gateway API format, e.g. `10s` or `1h30m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayDuration {
    value: Duration,
    text: String,
}

/// Why a string is not a Gateway API duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not a Gateway API duration: {reason} (write 1 to 4 parts like `1h30m` or `500ms`, each 1 to 5 digits followed by h, m, s or ms)"
)]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

// === impl GatewayDuration ===

impl GatewayDuration {
    /// The length of time.
    pub fn as_duration(&self) -> Duration {
        self.value
    }

    /// True for `0s` (or `0h`, `0ms`, ...), which Gateway API uses to disable a timeout.
    pub fn is_zero(&self) -> bool {
        self.value.is_zero()
    }

    /// The text as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for GatewayDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| DurationError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        let mut rest = text.as_bytes();
        let mut millis: u64 = 0;
        let mut components = 0;
        while !rest.is_empty() {
            components += 1;
            if components > MAX_COMPONENTS {
                return Err(fail("it has more than 4 parts"));
            }
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return Err(fail(match rest.first() {
                    Some(b'-') => "negative durations are not allowed",
                    Some(b'.') => "fractions are not allowed",
                    _ => "each part must start with a number",
                }));
            }
            if digits > MAX_DIGITS {
                return Err(fail("a part has more than 5 digits"));
            }
            let (number, after) = rest.split_at(digits);
            let value = number
                .iter()
                .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
            let (unit_millis, unit_len) = match after {
                [b'm', b's', ..] => (1, 2),
                [b'h', ..] => (3_600_000, 1),
                [b'm', ..] => (60_000, 1),
                [b's', ..] => (1_000, 1),
                [b'.', ..] => return Err(fail("fractions are not allowed")),
                [] => return Err(fail("a number lacks its unit")),
                _ => return Err(fail("the unit must be h, m, s or ms")),
            };
            // At most 4 parts of 99999 h each: far below u64::MAX milliseconds.
            millis += value * unit_millis;
            rest = &after[unit_len..];
        }
        Ok(GatewayDuration {
            value: Duration::from_millis(millis),
            text: text.to_string(),
        })
    }
}

/// Renders the GEP-2257 standard form: descending, non-repeating units, largest first,
/// and `0s` for zero. Sub-millisecond precision cannot occur: values are parsed.
impl fmt::Display for GatewayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut millis = self.value.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            let n = millis / size;
            if n > 0 {
                write!(f, "{n}{unit}")?;
                millis %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for GatewayDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GatewayDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GatewayDuration, DurationError> {
        s.parse()
    }

    /// The parsing vectors from GEP-2257.
    #[test]
    fn gep_2257_valid_vectors() {
        for (input, canonical, millis) in [
            ("0h", "0s", 0),
            ("0s", "0s", 0),
            ("0h0m0s", "0s", 0),
            ("1h", "1h", 3_600_000),
            ("30m", "30m", 1_800_000),
            ("10s", "10s", 10_000),
            ("500ms", "500ms", 500),
            ("2h30m", "2h30m", 9_000_000),
            ("150m", "2h30m", 9_000_000),
            ("7230s", "2h30s", 7_230_000),
            ("1h30m10s", "1h30m10s", 5_410_000),
            ("10s30m1h", "1h30m10s", 5_410_000),
            ("100ms200ms300ms", "600ms", 600),
        ] {
            let d = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(d.as_duration(), Duration::from_millis(millis), "{input}");
            assert_eq!(d.to_string(), canonical, "{input}");
            assert_eq!(d.as_str(), input, "user text is kept");
        }
    }

    /// The invalid vectors from GEP-2257, plus a few more.
    #[test]
    fn gep_2257_invalid_vectors() {
        for (input, reason) in [
            ("1", "lacks its unit"),
            ("1m1", "lacks its unit"),
            ("1d", "unit must be"),
            ("1h30m10s20ms50h", "more than 4 parts"),
            ("999999h", "more than 5 digits"),
            ("1.5h", "fractions"),
            ("-15m", "negative"),
            ("", "empty"),
            ("h", "start with a number"),
            ("1H", "unit must be"),
            ("1 s", "unit must be"),
            ("1s ", "start with a number"),
        ] {
            let e = parse(input).expect_err(input);
            assert!(e.to_string().contains(reason), "{input}: {e}");
        }
    }

    /// The formatting vectors from GEP-2257 that a parsed value can reach.
    #[test]
    fn gep_2257_formatting_vectors() {
        for (input, canonical) in [
            ("2h600ms", "2h600ms"),
            ("2h30m600ms", "2h30m600ms"),
            ("2h30m10s600ms", "2h30m10s600ms"),
            ("240h", "240h"),
            ("1440m", "24h"),
            ("60000ms", "1m"),
            ("99999h", "99999h"),
        ] {
            assert_eq!(parse(input).expect(input).to_string(), canonical);
        }
    }

    #[test]
    fn zero_and_maximum() {
        assert!(parse("0ms").expect("zero").is_zero());
        let max = parse("99999h99999h99999h99999h").expect("max");
        assert_eq!(max.as_duration(), Duration::from_secs(4 * 99_999 * 3600));
    }

    #[test]
    fn serde_keeps_user_text() {
        let d: GatewayDuration = serde_yaml_ng::from_str("30m1800s").expect("yaml");
        assert_eq!(d.as_duration(), Duration::from_secs(3600));
        assert_eq!(
            serde_yaml_ng::to_string(&d).expect("serialize").trim(),
            "30m1800s"
        );
        let e = serde_yaml_ng::from_str::<GatewayDuration>("1.5s").expect_err("fraction");
        assert!(e.to_string().contains("fractions are not allowed"), "{e}");
    }
}
