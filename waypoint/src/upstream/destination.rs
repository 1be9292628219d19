//! Per destination service: circuit-breaking limits (a `TrafficPolicy`'s
//! `connectionPool`) and outlier detection.
//!
//! Limits are counters with permits that give back on drop:
//! - `max_requests`: requests in flight (from the first attempt until the response body
//!   ends). Over it, the request gets 503 with flag `UO` at once.
//! - `max_connections`: upstream HTTP connections open to the service's endpoints. A
//!   request that needs a new connection when the limit is reached waits, as a pending
//!   request, for a connection to close or for a request to end (which leaves an idle
//!   connection to reuse), until the connect timeout; then `UO`. Unlike the other limits
//!   it has a default, [`DEFAULT_MAX_CONNECTIONS`] (Envoy's circuit-breaker default;
//!   `waypoint run --max-connections-per-destination`), used when no policy sets one: a
//!   slow backend must not take a file descriptor per request without bound.
//! - `max_pending_requests`: requests waiting that way. Over it, `UO` at once.
//! - `max_retries`: retries in flight. Over it the retry is not attempted and the original
//!   failure is returned.
//!
//! Limits and outlier settings come from the config in force and are refreshed by the
//! listener before each request ([`Destinations::configure`]); counters survive config
//! changes, so a lowered limit applies to requests already in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::outlier::{Ejection, Outcome, OutlierConfig, Outliers};
use crate::resilience::metrics::ResilienceMetrics;

/// Default `max_connections` per destination when no policy sets one (Envoy's default).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// Destinations tracked before unconfigured, idle ones are forgotten.
const MAX_DESTINATIONS: usize = 4096;
/// How often a pending request looks for a free connection again, besides being woken.
const PENDING_POLL: Duration = Duration::from_millis(50);

/// Circuit-breaking limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections to the service's endpoints.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
    /// Retries in flight.
    pub max_retries: Option<u32>,
}

/// Which limit overflowed; named as in the metric's `limit` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`.
    Connections,
    /// `max_pending_requests`.
    PendingRequests,
    /// `max_requests`.
    Requests,
    /// `max_retries`.
    Retries,
}

impl Limit {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::PendingRequests => "max_pending_requests",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }
}

const UNLIMITED: u32 = u32::MAX;

fn store(a: &AtomicU32, v: Option<u32>) {
    a.store(v.unwrap_or(UNLIMITED), Ordering::Relaxed);
}

/// One counter with a limit.
#[derive(Debug)]
struct Gauge {
    limit: AtomicU32,
    current: Arc<AtomicUsize>,
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge {
            limit: AtomicU32::new(UNLIMITED),
            current: Arc::default(),
        }
    }
}

impl Gauge {
    /// Takes one unit if under the limit.
    fn try_take(&self, dest: &Arc<Destination>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            if limit != UNLIMITED && cur >= limit as usize {
                return None;
            }
            match self.current.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Permit {
                        count: self.current.clone(),
                        dest: dest.clone(),
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}

/// One unit of a limit (a request, connection, pending request or retry); given back
/// when dropped, waking pending requests.
#[derive(Debug)]
pub struct Permit {
    count: Arc<AtomicUsize>,
    dest: Arc<Destination>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.dest.freed.notify_waiters();
    }
}

/// State of one destination service.
#[derive(Debug)]
pub struct Destination {
    key: Arc<str>,
    connections: Gauge,
    pending: Gauge,
    requests: Gauge,
    retries: Gauge,
    freed: Notify,
    outliers: Mutex<Option<Outliers>>,
    metrics: ResilienceMetrics,
}

impl Destination {
    fn new(
        key: Arc<str>,
        metrics: ResilienceMetrics,
        default_max_connections: Option<u32>,
    ) -> Self {
        let connections = Gauge::default();
        store(&connections.limit, default_max_connections);
        Destination {
            key,
            connections,
            pending: Gauge::default(),
            requests: Gauge::default(),
            retries: Gauge::default(),
            freed: Notify::new(),
            outliers: Mutex::new(None),
            metrics,
        }
    }

    fn set_limits(&self, l: &Limits, default_max_connections: Option<u32>) {
        store(
            &self.connections.limit,
            l.max_connections.or(default_max_connections),
        );
        store(&self.pending.limit, l.max_pending_requests);
        store(&self.requests.limit, l.max_requests);
        store(&self.retries.limit, l.max_retries);
    }

    fn overflowed(&self, limit: Limit) {
        self.metrics.overflow(&self.key, limit.as_str());
    }

    /// Admits a request, or says which limit refused it.
    pub fn admit_request(self: &Arc<Self>) -> Result<Permit, Limit> {
        self.requests.try_take(self).ok_or_else(|| {
            self.overflowed(Limit::Requests);
            Limit::Requests
        })
    }

    /// Admits a retry; `None` (counted) when too many are in flight.
    pub fn admit_retry(self: &Arc<Self>) -> Option<Permit> {
        let p = self.retries.try_take(self);
        if p.is_none() {
            self.overflowed(Limit::Retries);
        }
        p
    }

    /// A slot for a new connection, if the limit allows one now.
    pub fn try_connection(self: &Arc<Self>) -> Option<Permit> {
        self.connections.try_take(self)
    }

    /// Waits, as a pending request, until a connection or a request ends (or a short
    /// poll passes); `Err` when too many are pending already.
    pub async fn wait_pending(self: &Arc<Self>) -> Result<(), Limit> {
        let Some(_pending) = self.pending.try_take(self) else {
            self.overflowed(Limit::PendingRequests);
            return Err(Limit::PendingRequests);
        };
        let _ = tokio::time::timeout(PENDING_POLL, self.freed.notified()).await;
        Ok(())
    }

    /// A pending request gave up: the connection limit stayed full.
    pub fn connections_exhausted(&self) {
        self.overflowed(Limit::Connections);
    }

    /// Current (connections, pending, requests, retries), for tests and the admin page.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.connections.current(),
            self.pending.current(),
            self.requests.current(),
            self.retries.current(),
        )
    }

    /// Records an attempt's outcome at `addr` for outlier detection, and sweeps if due.
    pub fn observe(&self, addr: SocketAddr, outcome: Outcome, service_size: usize) {
        let mut guard = self.outliers.lock();
        let Some(o) = guard.as_mut() else {
            return;
        };
        let now = Instant::now();
        o.set_service_size(service_size);
        o.observe(addr, outcome, now);
        self.sweep_locked(o, now);
    }

    fn sweep_locked(&self, o: &mut Outliers, now: Instant) {
        if let Some(s) = o.maybe_sweep(now) {
            for (addr, time) in &s.ejected {
                self.metrics.ejection(&self.key);
                tracing::warn!(destination = %self.key, endpoint = %addr, ejection = ?time,
                    "outlier detection: endpoint ejected");
            }
            for addr in &s.returned {
                tracing::info!(destination = %self.key, endpoint = %addr,
                    "outlier detection: endpoint back in service");
            }
            self.metrics.set_ejected(&self.key, o.ejected_count());
        }
    }

    /// The endpoints of `candidates` not ejected; all of them if every one is.
    pub fn eligible<'a, T>(
        &self,
        candidates: &'a [T],
        addr: impl Fn(&T) -> SocketAddr,
    ) -> Vec<&'a T> {
        let mut guard = self.outliers.lock();
        let Some(o) = guard.as_mut() else {
            return candidates.iter().collect();
        };
        let now = Instant::now();
        self.sweep_locked(o, now);
        let kept: Vec<&T> = candidates
            .iter()
            .filter(|c| !o.is_ejected(addr(c), now))
            .collect();
        if kept.is_empty() {
            candidates.iter().collect()
        } else {
            kept
        }
    }

    /// Current ejections (after a sweep if one is due).
    pub fn ejections(&self) -> Vec<Ejection> {
        let mut guard = self.outliers.lock();
        let Some(o) = guard.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        self.sweep_locked(o, now);
        o.ejections(now)
    }
}

/// Every destination this waypoint sends to.
#[derive(Debug, Default)]
pub struct Destinations {
    map: Mutex<HashMap<Arc<str>, Arc<Destination>>>,
    /// Resilience telemetry.
    pub metrics: ResilienceMetrics,
    /// `max_connections` where no policy sets one; `None` (the `Default`) is unlimited.
    default_max_connections: Option<u32>,
}

impl Destinations {
    /// Destinations whose connections are capped at `max_connections` unless a policy
    /// says otherwise.
    pub fn with_default_max_connections(max_connections: Option<u32>) -> Self {
        Destinations {
            default_max_connections: max_connections,
            ..Destinations::default()
        }
    }

    /// The state of `key` (`namespace/name`), created on first use.
    pub fn get(&self, key: &Arc<str>) -> Arc<Destination> {
        let mut map = self.map.lock();
        if let Some(d) = map.get(key) {
            return d.clone();
        }
        if map.len() >= MAX_DESTINATIONS {
            // Forget destinations nothing refers to and nothing configures.
            map.retain(|_, d| Arc::strong_count(d) > 1 || d.outliers.lock().is_some());
        }
        let d = Arc::new(Destination::new(
            key.clone(),
            self.metrics.clone(),
            self.default_max_connections,
        ));
        map.insert(key.clone(), d.clone());
        d
    }

    /// Applies the settings in force for `key`.
    pub fn configure(&self, key: &Arc<str>, limits: &Limits, outliers: Option<OutlierConfig>) {
        let d = self.get(key);
        d.set_limits(limits, self.default_max_connections);
        let mut o = d.outliers.lock();
        match (o.as_mut(), outliers) {
            (Some(cur), Some(cfg)) if cur.config() != cfg => {
                cur.reconfigure(cfg, Instant::now());
            }
            (Some(_), Some(_)) => {}
            (None, Some(cfg)) => *o = Some(Outliers::new(cfg, Instant::now())),
            (Some(_), None) => {
                *o = None;
                d.metrics.set_ejected(key, 0);
            }
            (None, None) => {}
        }
    }

    /// Current ejections of every destination, by `namespace/name`.
    pub fn ejections(&self) -> Vec<(Arc<str>, Vec<Ejection>)> {
        let all: Vec<Arc<Destination>> = self.map.lock().values().cloned().collect();
        let mut out: Vec<(Arc<str>, Vec<Ejection>)> = all
            .iter()
            .filter(|d| d.outliers.lock().is_some())
            .map(|d| (d.key.clone(), d.ejections()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_accounting_gives_back_on_drop() {
        let ds = Destinations::default();
        let key: Arc<str> = "ns/svc".into();
        ds.configure(
            &key,
            &Limits {
                max_requests: Some(2),
                max_retries: Some(1),
                ..Limits::default()
            },
            None,
        );
        let d = ds.get(&key);
        let a = d.admit_request().expect("first");
        let b = d.admit_request().expect("second");
        assert_eq!(d.admit_request().err(), Some(Limit::Requests));
        assert_eq!(d.counts().2, 2);
        drop(a);
        let c = d.admit_request().expect("room again");
        let r = d.admit_retry().expect("one retry");
        assert!(d.admit_retry().is_none());
        drop(r);
        assert!(d.admit_retry().is_some());
        drop((b, c));
        assert_eq!(d.counts(), (0, 0, 0, 0));
        // Unlimited once the policy goes.
        ds.configure(&key, &Limits::default(), None);
        let many: Vec<_> = (0..100).map(|_| d.admit_request()).collect();
        assert!(many.iter().all(Result::is_ok));
    }

    #[test]
    fn the_default_connection_cap_applies_until_a_policy_sets_one() {
        let ds = Destinations::with_default_max_connections(Some(2));
        let key: Arc<str> = "ns/svc".into();
        let d = ds.get(&key);
        let held: Vec<_> = (0..2)
            .map(|_| d.try_connection().expect("under the default"))
            .collect();
        assert!(d.try_connection().is_none(), "default cap of 2");
        ds.configure(&key, &Limits::default(), None);
        assert!(
            d.try_connection().is_none(),
            "a policy without maxConnections keeps it"
        );
        ds.configure(
            &key,
            &Limits {
                max_connections: Some(3),
                ..Limits::default()
            },
            None,
        );
        assert!(d.try_connection().is_some(), "the policy's own cap wins");
        drop(held);
    }

    #[tokio::test]
    async fn pending_requests_are_bounded() {
        let ds = Destinations::default();
        let key: Arc<str> = "ns/svc".into();
        ds.configure(
            &key,
            &Limits {
                max_connections: Some(1),
                max_pending_requests: Some(1),
                ..Limits::default()
            },
            None,
        );
        let d = ds.get(&key);
        let conn = d.try_connection().expect("one connection");
        assert!(d.try_connection().is_none());
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.wait_pending().await });
        // Let the waiter register as pending, then a second one overflows.
        while d.counts().1 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(d.wait_pending().await, Err(Limit::PendingRequests));
        drop(conn);
        assert_eq!(waiter.await.ok(), Some(Ok(())));
        assert!(d.try_connection().is_some());
    }
}
