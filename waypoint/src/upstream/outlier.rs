//! Outlier detection for one destination service: endpoints that keep failing are ejected
//! from balancing for a while.
//!
//! - Every answer updates the endpoint's counters: a 5xx (or a connect failure, reset or
//!   attempt timeout) adds to the consecutive-5xx count; a 502, 503, 504 or one of those
//!   local failures also adds to the consecutive-gateway-error count; anything else
//!   resets both.
//! - Decisions are taken on a sweep every `interval` (run by the traffic itself, and by
//!   readers such as the admin page, so an idle waypoint needs no timer): an endpoint over
//!   a threshold is ejected for `base × n`, n being its ejections in a row; ejections whose
//!   time is over are lifted.
//! - At most `maxEjectionPercent` of the service's endpoints are ejected at once, and at
//!   least one may be.
//! - An endpoint back in service for a whole `base` without being ejected again starts
//!   over at n = 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;

/// Endpoint states kept per service before idle, healthy ones are forgotten.
const MAX_TRACKED: usize = 1024;

/// Outlier detection settings (from a `TrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive 5xx that eject; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors that eject; 0 disables.
    pub consecutive_gateway: u32,
    /// Sweep period.
    pub interval: Duration,
    /// First ejection's length.
    pub base_ejection: Duration,
    /// Cap on ejected endpoints, percent of the service's endpoints.
    pub max_ejection_percent: u32,
}

/// An attempt's result, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(StatusCode),
    /// No connection, a reset, or no answer in time: a gateway error.
    LocalFailure,
}

#[derive(Debug, Clone)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row.
    ejections: u32,
    returned_at: Option<Instant>,
    last_seen: Instant,
}

/// An ejected endpoint, for the admin page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Time left.
    pub remaining: Duration,
    /// Ejections in a row, this one included.
    pub times: u32,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Endpoints ejected, with for how long.
    pub ejected: Vec<(SocketAddr, Duration)>,
    /// Endpoints back in service.
    pub returned: Vec<SocketAddr>,
    /// Endpoints over a threshold left in service by `maxEjectionPercent`.
    pub capped: usize,
}

/// Outlier state of one service.
#[derive(Debug)]
pub struct Outliers {
    cfg: OutlierConfig,
    endpoints: HashMap<SocketAddr, EndpointState>,
    /// How many endpoints the service has (from the latest request).
    service_size: usize,
    next_sweep: Instant,
}

impl Outliers {
    /// No endpoint ejected yet.
    pub fn new(cfg: OutlierConfig, now: Instant) -> Self {
        Outliers {
            cfg,
            endpoints: HashMap::new(),
            service_size: 0,
            next_sweep: now + cfg.interval,
        }
    }

    /// The settings.
    pub fn config(&self) -> OutlierConfig {
        self.cfg
    }

    /// New settings; counters and ejections are kept.
    pub fn reconfigure(&mut self, cfg: OutlierConfig, now: Instant) {
        if cfg.interval != self.cfg.interval {
            self.next_sweep = now + cfg.interval;
        }
        self.cfg = cfg;
    }

    /// The service has `n` endpoints.
    pub fn set_service_size(&mut self, n: usize) {
        self.service_size = n;
    }

    /// Records an attempt's outcome at `addr`.
    pub fn observe(&mut self, addr: SocketAddr, outcome: Outcome, now: Instant) {
        if self.endpoints.len() >= MAX_TRACKED && !self.endpoints.contains_key(&addr) {
            self.forget_idle(now);
        }
        let e = self.endpoints.entry(addr).or_insert(EndpointState {
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ejected_until: None,
            ejections: 0,
            returned_at: None,
            last_seen: now,
        });
        e.last_seen = now;
        let (is_5xx, is_gateway) = match outcome {
            Outcome::LocalFailure => (true, true),
            Outcome::Status(s) => (s.is_server_error(), matches!(s.as_u16(), 502..=504)),
        };
        if is_5xx {
            e.consecutive_5xx = e.consecutive_5xx.saturating_add(1);
        } else {
            e.consecutive_5xx = 0;
        }
        if is_gateway {
            e.consecutive_gateway = e.consecutive_gateway.saturating_add(1);
        } else {
            e.consecutive_gateway = 0;
        }
    }

    fn forget_idle(&mut self, now: Instant) {
        let keep_for = self.cfg.base_ejection.max(Duration::from_secs(300));
        self.endpoints.retain(|_, e| {
            e.ejected_until.is_some() || now.saturating_duration_since(e.last_seen) < keep_for
        });
    }

    /// Runs a sweep if one is due.
    pub fn maybe_sweep(&mut self, now: Instant) -> Option<Sweep> {
        if now < self.next_sweep {
            return None;
        }
        self.next_sweep = now + self.cfg.interval;
        Some(self.sweep(now))
    }

    /// Lifts ended ejections and ejects endpoints over a threshold, within the cap.
    pub fn sweep(&mut self, now: Instant) -> Sweep {
        let mut out = Sweep::default();
        let cfg = self.cfg;
        for (addr, e) in &mut self.endpoints {
            if let Some(until) = e.ejected_until
                && until <= now
            {
                e.ejected_until = None;
                e.returned_at = Some(now);
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
                out.returned.push(*addr);
            }
            if e.ejected_until.is_none()
                && e.ejections > 0
                && e.returned_at
                    .is_some_and(|r| now.saturating_duration_since(r) >= cfg.base_ejection)
                && !over_threshold(&cfg, e)
            {
                e.ejections = 0;
                e.returned_at = None;
            }
        }
        let mut ejected = self.ejected_count();
        let cap = max_ejected(
            self.service_size.max(self.endpoints.len()),
            cfg.max_ejection_percent,
        );
        let mut candidates: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.ejected_until.is_none() && over_threshold(&cfg, e))
            .map(|(a, _)| *a)
            .collect();
        candidates.sort();
        for addr in candidates {
            if ejected >= cap {
                out.capped += 1;
                continue;
            }
            if let Some(e) = self.endpoints.get_mut(&addr) {
                e.ejections = e.ejections.saturating_add(1);
                let time = ejection_time(cfg.base_ejection, e.ejections);
                e.ejected_until = Some(now + time);
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
                ejected += 1;
                out.ejected.push((addr, time));
            }
        }
        out
    }

    /// True while `addr` is ejected (as of the last sweep; an ejection that ended since is
    /// lifted by the next one).
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.endpoints
            .get(&addr)
            .and_then(|e| e.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Endpoints ejected now.
    pub fn ejected_count(&self) -> usize {
        self.endpoints
            .values()
            .filter(|e| e.ejected_until.is_some())
            .count()
    }

    /// The current ejections.
    pub fn ejections(&self, now: Instant) -> Vec<Ejection> {
        let mut v: Vec<Ejection> = self
            .endpoints
            .iter()
            .filter_map(|(addr, e)| {
                let until = e.ejected_until?;
                Some(Ejection {
                    addr: *addr,
                    remaining: until.saturating_duration_since(now),
                    times: e.ejections,
                })
            })
            .collect();
        v.sort_by_key(|e| e.addr);
        v
    }
}

fn over_threshold(cfg: &OutlierConfig, e: &EndpointState) -> bool {
    (cfg.consecutive_5xx > 0 && e.consecutive_5xx >= cfg.consecutive_5xx)
        || (cfg.consecutive_gateway > 0 && e.consecutive_gateway >= cfg.consecutive_gateway)
}

/// The n-th ejection in a row lasts n times the base.
pub fn ejection_time(base: Duration, n: u32) -> Duration {
    base.saturating_mul(n.max(1))
}

/// Endpoints that may be ejected at once out of `size`: `percent` of them, rounded down,
/// but at least one.
pub fn max_ejected(size: usize, percent: u32) -> usize {
    (size.saturating_mul(percent.min(100) as usize) / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8080))
    }

    const E500: Outcome = Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
    const OK: Outcome = Outcome::Status(StatusCode::OK);

    #[test]
    fn ejection_arithmetic() {
        let base = Duration::from_secs(30);
        assert_eq!(ejection_time(base, 0), base);
        assert_eq!(ejection_time(base, 1), base);
        assert_eq!(ejection_time(base, 3), Duration::from_secs(90));
        assert_eq!(max_ejected(3, 10), 1, "at least one");
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(4, 50), 2);
        assert_eq!(max_ejected(10, 100), 10);
        assert_eq!(max_ejected(10, 250), 10);
        assert_eq!(max_ejected(0, 0), 1);
    }

    #[test]
    fn consecutive_failures_eject_at_the_sweep_and_successes_reset() {
        let t0 = Instant::now();
        let mut o = Outliers::new(cfg(), t0);
        o.set_service_size(3);
        o.observe(addr(1), E500, t0);
        o.observe(addr(1), E500, t0);
        o.observe(addr(1), OK, t0);
        o.observe(addr(1), E500, t0);
        o.observe(addr(1), E500, t0);
        assert!(o.maybe_sweep(t0).is_none(), "not due yet");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            o.maybe_sweep(t1),
            Some(Sweep::default()),
            "2 in a row is under 3"
        );
        o.observe(addr(1), E500, t1);
        assert!(
            !o.is_ejected(addr(1), t1),
            "decided at the sweep, not at once"
        );
        let s = o.sweep(t1);
        assert_eq!(s.ejected, vec![(addr(1), Duration::from_secs(10))]);
        assert!(o.is_ejected(addr(1), t1 + Duration::from_secs(9)));
        assert!(!o.is_ejected(addr(1), t1 + Duration::from_secs(10)));
        assert_eq!(o.ejected_count(), 1);
    }

    #[test]
    fn repeated_ejections_grow_and_health_resets_them() {
        let t0 = Instant::now();
        let mut o = Outliers::new(cfg(), t0);
        o.set_service_size(2);
        let fail = |o: &mut Outliers, t| {
            for _ in 0..3 {
                o.observe(addr(1), E500, t);
            }
        };
        fail(&mut o, t0);
        assert_eq!(
            o.sweep(t0).ejected,
            vec![(addr(1), Duration::from_secs(10))]
        );
        let t1 = t0 + Duration::from_secs(10);
        let s = o.sweep(t1);
        assert_eq!(s.returned, vec![addr(1)]);
        fail(&mut o, t1);
        assert_eq!(
            o.sweep(t1).ejected,
            vec![(addr(1), Duration::from_secs(20))]
        );
        let t2 = t1 + Duration::from_secs(20);
        o.sweep(t2);
        fail(&mut o, t2);
        assert_eq!(
            o.sweep(t2).ejected,
            vec![(addr(1), Duration::from_secs(30))]
        );
        // Back, then healthy for a whole base period: starts over.
        let t3 = t2 + Duration::from_secs(30);
        o.sweep(t3);
        o.observe(addr(1), OK, t3);
        o.sweep(t3 + Duration::from_secs(10));
        fail(&mut o, t3 + Duration::from_secs(11));
        assert_eq!(
            o.sweep(t3 + Duration::from_secs(11)).ejected,
            vec![(addr(1), Duration::from_secs(10))]
        );
    }

    #[test]
    fn max_ejection_percent_caps_but_allows_one() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.max_ejection_percent = 10;
        let mut o = Outliers::new(c, t0);
        o.set_service_size(3);
        for i in 1..=3 {
            for _ in 0..3 {
                o.observe(addr(i), E500, t0);
            }
        }
        let s = o.sweep(t0);
        assert_eq!(s.ejected.len(), 1, "10 % of 3 rounds to 0, but one may go");
        assert_eq!(s.capped, 2);
        assert_eq!(o.ejected_count(), 1);
        // Still capped at the next sweep while the first is out.
        let s = o.sweep(t0 + Duration::from_secs(1));
        assert!(s.ejected.is_empty());
    }

    #[test]
    fn gateway_errors_count_separately() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.consecutive_5xx = 0;
        c.consecutive_gateway = 2;
        let mut o = Outliers::new(c, t0);
        o.set_service_size(2);
        o.observe(addr(1), E500, t0);
        o.observe(addr(1), E500, t0);
        assert!(o.sweep(t0).ejected.is_empty(), "500 is not a gateway error");
        o.observe(addr(1), Outcome::Status(StatusCode::BAD_GATEWAY), t0);
        o.observe(addr(1), Outcome::LocalFailure, t0);
        assert_eq!(o.sweep(t0).ejected.len(), 1);
    }
}
