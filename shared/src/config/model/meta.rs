//! Kubernetes object metadata, as carried by the Gateway API objects in the config.
//!
//! Kubernetes owns `metadata`, so unlike the rest of our model it tolerates keys we do not
//! use (`uid`, `resourceVersion`, `generation`, `managedFields`, ...): a route copied from
//! `kubectl get -o yaml` loads unchanged. Only the fields below are kept.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `metadata` of a Kubernetes object: its name, namespace, labels and age.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name, unique per kind within its namespace.
    pub name: String,
    /// Namespace; it must be declared under `namespaces`.
    pub namespace: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// When Kubernetes created the object. Route precedence prefers older routes; objects
    /// without one (the usual case in a file) count as newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Timestamp>,
}

/// An RFC 3339 instant such as `2024-05-01T12:00:00Z`, as Kubernetes writes
/// `creationTimestamp`. Ordered by the instant; the text is kept as written.
#[derive(Debug, Clone)]
pub struct Timestamp {
    seconds: i64,
    nanos: u32,
    text: String,
}

/// Why a string is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an RFC 3339 timestamp like `2024-05-01T12:00:00Z`")]
pub struct TimestampError(String);

// === impl Timestamp ===

impl Timestamp {
    /// Seconds since the Unix epoch.
    pub fn unix_seconds(&self) -> i64 {
        self.seconds
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_rfc3339(text).ok_or_else(|| TimestampError(text.to_string()))
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if sep(i, b'.') {
        let digits = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let frac = num(i + 1..i + 1 + digits)?;
        let scale = 10u32.pow(9 - u32::try_from(digits).ok()?);
        nanos = u32::try_from(frac).ok()? * scale;
        i += 1 + digits;
    }
    let offset = match b.get(i..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let minutes = oh * 60 + om;
            if *sign == b'+' { minutes } else { -minutes }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset * 60;
    Some(Timestamp {
        seconds,
        nanos,
        text: text.to_string(),
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Timestamp {}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.seconds, self.nanos).cmp(&(other.seconds, other.nanos))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_kubernetes_timestamps() {
        assert_eq!(ts("1970-01-01T00:00:00Z").unix_seconds(), 0);
        assert_eq!(ts("2020-09-08T01:02:03Z").unix_seconds(), 1_599_526_923);
        assert_eq!(ts("2024-02-29T00:00:00Z").unix_seconds(), 1_709_164_800);
        assert_eq!(
            ts("2020-09-08T03:02:03+02:00"),
            ts("2020-09-08T01:02:03Z"),
            "offsets are applied"
        );
        assert!(ts("2020-09-08T01:02:03.5Z") > ts("2020-09-08T01:02:03Z"));
        // The spec's example: 01:02:03 is older than 01:02:04.
        assert!(ts("2020-09-08T01:02:03Z") < ts("2020-09-08T01:02:04Z"));
    }

    #[test]
    fn rejects_malformed_timestamps() {
        for bad in [
            "",
            "2020-09-08",
            "2020-09-08 01:02:03Z",
            "2020-13-08T01:02:03Z",
            "2023-02-29T01:02:03Z",
            "2020-09-08T24:00:00Z",
            "2020-09-08T01:02:03",
            "2020-09-08T01:02:03.Z",
            "2020-09-08T01:02:03+0200",
            "2020-09-08T01:02:03Zjunk",
            "２020-09-08T01:02:03Z",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_tolerates_kubernetes_keys() {
        let m: ObjectMeta = serde_yaml_ng::from_str(
            "{name: r, namespace: shop, uid: 1234, resourceVersion: '7', generation: 2, \
             creationTimestamp: null, managedFields: [{manager: kubectl}]}",
        )
        .expect("metadata");
        assert_eq!((m.name.as_str(), m.namespace.as_str()), ("r", "shop"));
        assert_eq!(m.creation_timestamp, None);
    }
}
