//! Token buckets for local rate limiting: one per target, or one per (target, source
//! identity) with a bounded number of sources.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token bucket: `capacity` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `capacity` (at least 1) refilled with `requests` every `interval`.
    pub fn new(requests: u32, interval: Duration, capacity: u32, now: Instant) -> Self {
        let secs = interval.as_secs_f64().max(1e-9);
        Bucket {
            capacity: f64::from(capacity.max(1)),
            per_sec: f64::from(requests) / secs,
            tokens: f64::from(capacity.max(1)),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        let secs = if self.per_sec > 0.0 {
            missing / self.per_sec
        } else {
            f64::MAX
        };
        Err(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }

    /// True once refilled to capacity: forgetting it changes nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.per_sec >= self.capacity
    }
}

/// Seconds for `retry-after`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

/// Per-source buckets of one target, at most `max` of them.
#[derive(Debug)]
pub struct PerSource {
    template: Bucket,
    max: usize,
    buckets: HashMap<Arc<str>, Bucket>,
}

impl PerSource {
    /// Buckets like `template` (full), one per source, at most `max` (at least 1).
    pub fn new(template: Bucket, max: usize) -> Self {
        PerSource {
            template,
            max: max.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token from `source`'s bucket.
    pub fn take(&mut self, source: &str, now: Instant) -> Result<(), Duration> {
        if let Some(b) = self.buckets.get_mut(source) {
            return b.take(now);
        }
        if self.buckets.len() >= self.max {
            self.evict(now);
        }
        let mut b = self.template.clone();
        b.last = now;
        let r = b.take(now);
        self.buckets.insert(source.into(), b);
        r
    }

    /// Drops full (idle) buckets; if none is, the one used least recently, so a flood of
    /// sources cannot grow the map. An evicted busy source starts again with a full bucket.
    fn evict(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(now));
        if self.buckets.len() >= self.max
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
        {
            self.buckets.remove(&oldest);
        }
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no source has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, SEC, 5, t0);
        for _ in 0..5 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).expect_err("empty");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(99));
        // 10 per second: one token every 100 ms.
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(150)).is_err());
        // Over 10 s at most burst + 10 × 10 pass, whatever the offered load.
        let mut ok = 0;
        for ms in 0..10_000u64 {
            if b.take(t0 + Duration::from_millis(200 + ms)).is_ok() {
                ok += 1;
            }
        }
        assert!((99..=101).contains(&ok), "{ok}");
        // Refill caps at capacity.
        assert!(b.is_full(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        let t0 = Instant::now();
        let mut slow = Bucket::new(1, Duration::from_secs(60), 1, t0);
        assert!(slow.take(t0).is_ok());
        assert_eq!(retry_after_secs(slow.take(t0).expect_err("empty")), 60);
    }

    #[test]
    fn per_source_buckets_are_separate_and_bounded() {
        let t0 = Instant::now();
        let mut p = PerSource::new(Bucket::new(1, SEC, 1, t0), 3);
        assert!(p.take("a", t0).is_ok());
        assert!(p.take("a", t0).is_err());
        assert!(p.take("b", t0).is_ok(), "b has its own bucket");
        assert!(p.take("c", t0).is_ok());
        assert_eq!(p.len(), 3);
        // A fourth source evicts the least recently used, never growing past the bound.
        assert!(p.take("d", t0 + Duration::from_millis(10)).is_ok());
        assert_eq!(p.len(), 3);
        // Later, idle (refilled) buckets are dropped first.
        let later = t0 + Duration::from_secs(5);
        assert!(p.take("e", later).is_ok());
        assert_eq!(p.len(), 1);
    }
}
