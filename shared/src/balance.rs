//! The core both proxies balance with: per-endpoint load counters, passive ejection, and
//! a power-of-two-choices pick.
//!
//! Each proxy decides what counts as load and which endpoints are candidates: the node
//! tunnel counts open connections (least-connections) and the waypoint requests in flight
//! (least-request). Both are the same counter, held by a [`Load`] guard while the unit of
//! work lives.
//!
//! An endpoint that fails to connect is ejected for a while (5 s, doubling per consecutive
//! failure, at most 60 s); [`EndpointState::healthy`] tells whether it is back. A
//! successful connect makes it healthy again at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// First ejection; doubles per consecutive failure.
const BASE_EJECTION: Duration = Duration::from_secs(5);
/// Longest ejection.
const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Load and health of every endpoint a proxy sends to, keyed by `K` (an address).
#[derive(Debug)]
pub struct Endpoints<K> {
    states: Mutex<HashMap<K, Arc<EndpointState>>>,
    /// States kept before idle, healthy ones are forgotten (`None`: never).
    limit: Option<usize>,
}

impl<K> Default for Endpoints<K> {
    fn default() -> Self {
        Endpoints {
            states: Mutex::new(HashMap::new()),
            limit: None,
        }
    }
}

/// One endpoint's load and health.
#[derive(Debug, Default)]
pub struct EndpointState {
    load: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl EndpointState {
    /// Not ejected at `now`.
    pub fn healthy(&self, now: Instant) -> bool {
        self.ejected_until.lock().is_none_or(|until| until <= now)
    }

    /// Units of work (connections or requests) held against it now.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Acquire)
    }
}

/// Counts one unit of work against an endpoint while it lives.
#[derive(Debug)]
pub struct Load(Arc<EndpointState>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<K: Hash + Eq + Copy> Endpoints<K> {
    /// A table that, once it holds `limit` endpoints, forgets idle healthy ones before
    /// tracking a new one.
    pub fn with_limit(limit: usize) -> Self {
        Endpoints {
            states: Mutex::new(HashMap::new()),
            limit: Some(limit),
        }
    }

    /// The state of `key`, created on first use.
    pub fn state(&self, key: K) -> Arc<EndpointState> {
        let mut map = self.states.lock();
        if let Some(limit) = self.limit
            && map.len() >= limit
            && !map.contains_key(&key)
        {
            let now = Instant::now();
            map.retain(|_, s| Arc::strong_count(s) > 1 || !s.healthy(now));
        }
        map.entry(key).or_default().clone()
    }

    /// Counts a unit of work against `key` until the guard drops.
    pub fn start(&self, key: K) -> Load {
        let s = self.state(key);
        s.load.fetch_add(1, Ordering::AcqRel);
        Load(s)
    }

    /// Records a failed connect: ejects the endpoint for a while. Returns for how long.
    pub fn failed(&self, key: K) -> Duration {
        let s = self.state(key);
        let n = s
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel)
            .min(16);
        let ejection = BASE_EJECTION.saturating_mul(1 << n).min(MAX_EJECTION);
        *s.ejected_until.lock() = Some(Instant::now() + ejection);
        ejection
    }

    /// Records a successful connect: the endpoint is healthy again.
    pub fn succeeded(&self, key: K) {
        let s = self.state(key);
        s.consecutive_failures.store(0, Ordering::Release);
        *s.ejected_until.lock() = None;
    }
}

/// Power of two choices: draws two distinct members of `pool` at random and returns the
/// one with the lower `load` (the first drawn on a tie). `None` if `pool` is empty.
pub fn p2c<T: Copy>(pool: &[T], load: impl Fn(T) -> usize) -> Option<T> {
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (pool[a], pool[b]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_doubles_and_success_restores() {
        let e: Endpoints<u8> = Endpoints::default();
        assert_eq!(e.failed(1), Duration::from_secs(5));
        assert_eq!(e.failed(1), Duration::from_secs(10));
        for _ in 0..10 {
            e.failed(1);
        }
        assert_eq!(e.failed(1), MAX_EJECTION);
        assert!(!e.state(1).healthy(Instant::now()));
        e.succeeded(1);
        assert!(e.state(1).healthy(Instant::now()));
        assert_eq!(e.failed(1), Duration::from_secs(5));
    }

    #[test]
    fn load_is_held_by_the_guard() {
        let e: Endpoints<u8> = Endpoints::default();
        let a = e.start(1);
        let b = e.start(1);
        assert_eq!(e.state(1).load(), 2);
        drop(a);
        drop(b);
        assert_eq!(e.state(1).load(), 0);
    }

    #[test]
    fn limit_forgets_idle_healthy_endpoints() {
        let e: Endpoints<u8> = Endpoints::with_limit(2);
        let _busy = e.start(1);
        e.failed(2);
        e.state(3);
        let map = e.states.lock();
        // 1 is busy and 2 ejected: both kept.
        assert!(map.contains_key(&1) && map.contains_key(&2) && map.contains_key(&3));
    }

    #[test]
    fn p2c_prefers_the_lighter_of_two() {
        assert_eq!(p2c::<u8>(&[], |_| 0), None);
        assert_eq!(p2c(&[7u8], |_| 0), Some(7));
        for _ in 0..100 {
            assert_eq!(p2c(&[1u8, 2], |x| if x == 1 { 5 } else { 0 }), Some(2));
        }
    }
}
