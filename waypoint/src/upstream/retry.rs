//! Retries: which failures are retried, how long to wait between attempts, and the budget
//! that keeps retries from multiplying load during an outage.
//!
//! - [`RetryPolicy::default`] applies when no route sets a policy: 2 retries on connect
//!   failure, refused stream, 503 (or gRPC `UNAVAILABLE`) and reset, 25 ms backoff.
//! - [`RetryPolicy::backoff`] waits at least the policy's backoff (Gateway API calls it the
//!   minimum), doubling per retry with up to 50 % jitter, capped at ten times the base.
//! - [`RetryBudget`] admits a retry only while retries stay at or below 20 % of the
//!   requests of the last 10 s, plus a floor of 3 concurrent retries so that light traffic
//!   can always retry (the Finagle/Linkerd ratio with Envoy's `min_retry_concurrency`).
//!
//! Whether the request itself can be sent again (its body was fully buffered under the
//! cap, or never sent) is [`super::body::ReplayBody`]'s call.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use parking_lot::Mutex;

/// Retries when no route sets a policy.
pub const DEFAULT_RETRIES: u32 = 2;
/// Backoff when no route sets one.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Share of requests that may be retries.
pub const BUDGET_RATIO: f64 = 0.2;
/// Retries always admitted while fewer than this many are in flight.
pub const BUDGET_MIN_CONCURRENT: usize = 3;
/// The window the ratio is measured over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Buckets the window is split into.
const BUCKETS: usize = 10;

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No connection to the endpoint (TCP, TLS or HBONE refused). Nothing was sent.
    Connect,
    /// The peer refused the HTTP/2 stream (`REFUSED_STREAM`). Nothing was processed.
    RefusedStream,
    /// The connection or stream was reset before a response arrived.
    Reset,
    /// The attempt's own timeout (`backendRequest`) passed.
    Timeout,
    /// The response had this status.
    Status(StatusCode),
    /// The response was a gRPC `UNAVAILABLE` (status 14) trailers-only answer.
    GrpcUnavailable,
    /// The endpoint broke the protocol (unparsable response, HTTP/2 protocol error).
    Protocol,
    /// The client's side failed (its request body broke off).
    Client,
    /// A circuit-breaking limit refused the attempt; nothing was sent.
    Overflow,
}

impl Failure {
    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect_failure",
            Failure::RefusedStream => "refused_stream",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Status(StatusCode::SERVICE_UNAVAILABLE) => "unavailable",
            Failure::Status(_) => "status",
            Failure::GrpcUnavailable => "grpc_unavailable",
            Failure::Protocol => "protocol_error",
            Failure::Client => "downstream",
            Failure::Overflow => "overflow",
        }
    }
}

/// When and how often to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Gateway API `attempts`, Istio `attempts`).
    pub retries: u32,
    /// Minimum wait before a retry.
    pub backoff: Duration,
    /// Retry when no connection could be made.
    pub connect_failure: bool,
    /// Retry when the peer refused the stream.
    pub refused_stream: bool,
    /// Retry on 503 and gRPC `UNAVAILABLE`.
    pub unavailable: bool,
    /// Retry when the connection or stream was reset before a response.
    pub reset: bool,
    /// Retry when an attempt timed out.
    pub timeout: bool,
    /// Retry on these response statuses (Gateway API `codes`).
    pub codes: Vec<StatusCode>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            connect_failure: true,
            refused_stream: true,
            unavailable: true,
            reset: true,
            timeout: false,
            codes: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Never retries.
    pub fn none() -> Self {
        RetryPolicy {
            retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// A route's policy: retry on `codes` plus the connection-level failures, as Istio does
    /// for a Gateway API `retry`.
    pub fn with_codes(retries: u32, backoff: Option<Duration>, codes: Vec<StatusCode>) -> Self {
        RetryPolicy {
            retries,
            backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
            unavailable: false,
            codes,
            ..RetryPolicy::default()
        }
    }

    /// True if `failure` is one this policy retries.
    pub fn retries_on(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.connect_failure,
            Failure::RefusedStream => self.refused_stream,
            Failure::Reset => self.reset,
            Failure::Timeout => self.timeout,
            Failure::GrpcUnavailable => self.unavailable,
            Failure::Protocol | Failure::Client | Failure::Overflow => false,
            Failure::Status(s) => {
                (self.unavailable && s == StatusCode::SERVICE_UNAVAILABLE)
                    || self.codes.contains(&s)
            }
        }
    }

    /// The wait before retry number `retry` (1-based): the backoff doubled per retry, with
    /// up to 50 % added at random so clients don't retry in lockstep, capped at ten times
    /// the backoff.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self.backoff;
        let exp = base.saturating_mul(1 << retry.saturating_sub(1).min(8));
        let capped = exp.min(base.saturating_mul(10));
        capped + capped.mul_f64(fastrand::f64() * 0.5)
    }
}

// === budget ===

/// Retry budget of one destination (see the module docs). Cheap to share.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_concurrent: usize,
    bucket_len: Duration,
    window: Mutex<Window>,
    active_retries: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Window {
    /// Requests and retries per bucket; `head` is the current one.
    buckets: [(u64, u64); BUCKETS],
    head: usize,
    head_start: Instant,
}

/// Holds one admitted retry; dropping it ends the retry.
#[derive(Debug)]
pub struct RetryPermit(Arc<AtomicUsize>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(BUDGET_RATIO, BUDGET_MIN_CONCURRENT, BUDGET_WINDOW)
    }
}

impl RetryBudget {
    /// A budget admitting retries up to `ratio` of the requests of the last `window`, plus
    /// any retry while fewer than `min_concurrent` are in flight.
    pub fn new(ratio: f64, min_concurrent: usize, window: Duration) -> Self {
        RetryBudget {
            ratio,
            min_concurrent,
            bucket_len: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            window: Mutex::new(Window {
                buckets: [(0, 0); BUCKETS],
                head: 0,
                head_start: Instant::now(),
            }),
            active_retries: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn advance(&self, w: &mut Window, now: Instant) {
        let elapsed = now.saturating_duration_since(w.head_start);
        let steps = (elapsed.as_nanos() / self.bucket_len.as_nanos().max(1)) as usize;
        if steps == 0 {
            return;
        }
        for _ in 0..steps.min(BUCKETS) {
            w.head = (w.head + 1) % BUCKETS;
            w.buckets[w.head] = (0, 0);
        }
        w.head_start += self.bucket_len * steps.min(u32::MAX as usize) as u32;
        if steps >= BUCKETS {
            w.head_start = now;
        }
    }

    /// Counts a request (each original request, not its retries).
    pub fn record_request(&self) {
        let mut w = self.window.lock();
        self.advance(&mut w, Instant::now());
        let head = w.head;
        w.buckets[head].0 += 1;
    }

    /// Admits one retry, or `None` when the budget is spent.
    pub fn try_retry(&self) -> Option<RetryPermit> {
        let mut w = self.window.lock();
        self.advance(&mut w, Instant::now());
        let (requests, retries) = w
            .buckets
            .iter()
            .fold((0u64, 0u64), |(a, b), (r, t)| (a + r, b + t));
        let below_floor = self.active_retries.load(Ordering::Acquire) < self.min_concurrent;
        let within_ratio = (retries + 1) as f64 <= self.ratio * requests as f64;
        if !(below_floor || within_ratio) {
            return None;
        }
        let head = w.head;
        w.buckets[head].1 += 1;
        self.active_retries.fetch_add(1, Ordering::AcqRel);
        Some(RetryPermit(self.active_retries.clone()))
    }

    /// Retries in flight now.
    pub fn active_retries(&self) -> usize {
        self.active_retries.load(Ordering::Acquire)
    }
}

/// One retry budget per destination (service, or workload for direct traffic).
#[derive(Debug, Default)]
pub struct Budgets {
    budgets: Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>,
}

impl Budgets {
    /// The budget of `destination`, created on first use.
    pub fn get(&self, destination: &Arc<str>) -> Arc<RetryBudget> {
        let mut map = self.budgets.lock();
        if let Some(b) = map.get(destination) {
            return b.clone();
        }
        // Bound the map: destinations come from config, but workload addresses churn.
        if map.len() >= 4096 {
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        map.entry(destination.clone()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_retries_connection_failures_and_503_only() {
        let p = RetryPolicy::default();
        assert_eq!(p.retries, 2);
        assert_eq!(p.backoff, Duration::from_millis(25));
        for f in [
            Failure::Connect,
            Failure::RefusedStream,
            Failure::Reset,
            Failure::Status(StatusCode::SERVICE_UNAVAILABLE),
            Failure::GrpcUnavailable,
        ] {
            assert!(p.retries_on(f), "{f:?}");
        }
        for f in [
            Failure::Timeout,
            Failure::Protocol,
            Failure::Client,
            Failure::Status(StatusCode::INTERNAL_SERVER_ERROR),
            Failure::Status(StatusCode::BAD_GATEWAY),
        ] {
            assert!(!p.retries_on(f), "{f:?}");
        }
        let route = RetryPolicy::with_codes(3, None, vec![StatusCode::BAD_GATEWAY]);
        assert!(route.retries_on(Failure::Status(StatusCode::BAD_GATEWAY)));
        assert!(route.retries_on(Failure::Connect));
        assert!(!route.retries_on(Failure::Status(StatusCode::SERVICE_UNAVAILABLE)));
        assert_eq!(RetryPolicy::none().retries, 0);
    }

    #[test]
    fn backoff_is_at_least_the_minimum_and_bounded() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            let first = p.backoff(1);
            assert!(first >= Duration::from_millis(25) && first <= Duration::from_micros(37_500));
            let second = p.backoff(2);
            assert!(second >= Duration::from_millis(50) && second <= Duration::from_millis(75));
            let late = p.backoff(30);
            assert!(late <= Duration::from_millis(375), "{late:?}");
        }
    }

    #[test]
    fn budget_floor_admits_light_traffic() {
        let b = RetryBudget::default();
        // No requests recorded at all: the floor still admits up to 3 at once.
        let permits: Vec<_> = (0..3)
            .map(|_| b.try_retry().expect("under floor"))
            .collect();
        assert!(
            b.try_retry().is_none(),
            "a fourth concurrent retry exceeds the floor"
        );
        drop(permits);
        // Sequential retries (one at a time) are always under the floor.
        for _ in 0..50 {
            assert!(b.try_retry().is_some());
        }
    }

    #[test]
    fn budget_caps_concurrent_retries_at_the_ratio_plus_floor() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.record_request();
        }
        let mut held = Vec::new();
        while let Some(p) = b.try_retry() {
            held.push(p);
            assert!(held.len() <= 1000, "budget never ran out");
        }
        // 20 % of 1000 requests, plus what the floor let in before the ratio applied.
        assert!(
            (200..=203).contains(&held.len()),
            "{} retries admitted",
            held.len()
        );
        assert_eq!(b.active_retries(), held.len());
        drop(held);
        assert_eq!(b.active_retries(), 0);
    }

    #[test]
    fn budget_window_forgets_old_requests() {
        let b = RetryBudget::new(0.2, 0, Duration::from_millis(100));
        for _ in 0..100 {
            b.record_request();
        }
        let held: Vec<_> = std::iter::from_fn(|| b.try_retry()).take(100).collect();
        assert_eq!(held.len(), 20);
        drop(held);
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            b.try_retry().is_none(),
            "old requests no longer fund retries"
        );
    }

    #[test]
    fn budgets_are_per_destination() {
        let budgets = Budgets::default();
        let a: Arc<str> = "shop/web".into();
        let c: Arc<str> = "shop/cart".into();
        assert!(Arc::ptr_eq(&budgets.get(&a), &budgets.get(&a)));
        assert!(!Arc::ptr_eq(&budgets.get(&a), &budgets.get(&c)));
    }
}
