//! Endpoint selection: least-request power-of-two-choices, per request, with passive
//! ejection of endpoints that cannot be connected to.
//!
//! Every request (not every connection) picks an endpoint: two healthy candidates are
//! drawn at random and the one with fewer requests in flight wins. Because HTTP/2 and gRPC
//! requests share connections, balancing per request is what spreads them; balancing per
//! connection would pin a long-lived client to one endpoint.
//!
//! An endpoint that fails to connect is ejected for a while (5 s, doubling per consecutive
//! failure, at most 60 s). A retry prefers endpoints the request has not tried yet, then
//! any healthy one; if every endpoint is ejected, all are candidates again, since refusing
//! outright helps no one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_shared::balance::{EndpointState, Endpoints, p2c};

/// Counts one request against an endpoint while it lives (until its response ends).
pub use ambit_shared::balance::Load as InFlight;

/// Endpoint states kept before idle ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// Load and health of every endpoint this waypoint sends to.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Endpoints<SocketAddr>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            endpoints: Endpoints::with_limit(MAX_TRACKED),
        }
    }
}

impl Balancer {
    /// Picks one of `candidates` (by index), preferring healthy endpoints not in `tried`.
    pub fn pick(&self, candidates: &[SocketAddr], tried: &[SocketAddr]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let now = Instant::now();
        let states: Vec<Arc<EndpointState>> = candidates
            .iter()
            .map(|a| self.endpoints.state(*a))
            .collect();
        let healthy = |i: &usize| states[*i].healthy(now);
        let untried = |i: &usize| !tried.contains(&candidates[*i]);
        let all: Vec<usize> = (0..candidates.len()).collect();
        let tiers: [Vec<usize>; 3] = [
            all.iter()
                .copied()
                .filter(healthy)
                .filter(untried)
                .collect(),
            all.iter().copied().filter(healthy).collect(),
            all.iter().copied().filter(untried).collect(),
        ];
        let pool = tiers.into_iter().find(|t| !t.is_empty()).unwrap_or(all);
        p2c(&pool, |i| states[i].load())
    }

    /// Counts a request to `addr` until the guard drops.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        self.endpoints.start(addr)
    }

    /// Records a failed connect: ejects the endpoint for a while. Returns for how long.
    pub fn connect_failed(&self, addr: SocketAddr) -> Duration {
        self.endpoints.failed(addr)
    }

    /// Records a successful connect: the endpoint is healthy again.
    pub fn connected(&self, addr: SocketAddr) {
        self.endpoints.succeeded(addr)
    }

    /// Requests in flight to `addr` (tests and admin).
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        self.endpoints.state(addr).load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn spreads_sequential_requests_evenly() {
        let b = Balancer::default();
        let eps = addrs(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let i = b.pick(&eps, &[]).expect("an endpoint");
            // Each request finishes before the next: no load difference, random spread.
            drop(b.start(eps[i]));
            counts[i] += 1;
        }
        for c in counts {
            assert!((850..=1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn prefers_the_least_loaded_of_two() {
        let b = Balancer::default();
        let eps = addrs(2);
        // Endpoint 0 is busy: with two endpoints both are always drawn, so 1 always wins.
        let _busy: Vec<_> = (0..5).map(|_| b.start(eps[0])).collect();
        for _ in 0..100 {
            assert_eq!(b.pick(&eps, &[]), Some(1));
        }
        // Concurrent requests converge to an even load.
        let eps = addrs(4);
        let mut held = Vec::new();
        for _ in 0..400 {
            let i = b.pick(&eps, &[]).expect("an endpoint");
            held.push(b.start(eps[i]));
        }
        for ep in &eps {
            let n = b.in_flight(*ep);
            assert!((70..=130).contains(&n), "{ep}: {n} of 400 in flight");
        }
    }

    #[test]
    fn retries_avoid_tried_and_ejected_endpoints() {
        let b = Balancer::default();
        let eps = addrs(3);
        for _ in 0..100 {
            let i = b.pick(&eps, &[eps[0]]).expect("an endpoint");
            assert_ne!(i, 0);
        }
        assert_eq!(b.connect_failed(eps[1]), Duration::from_secs(5));
        assert_eq!(b.connect_failed(eps[1]), Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(b.pick(&eps, &[eps[0]]), Some(2));
        }
        // Everything tried: a healthy tried endpoint is better than an ejected one.
        for _ in 0..100 {
            let i = b.pick(&eps, &eps).expect("an endpoint");
            assert_ne!(i, 1);
        }
        // Everything ejected: all are candidates again.
        b.connect_failed(eps[0]);
        b.connect_failed(eps[2]);
        assert!(b.pick(&eps, &[]).is_some());
        b.connected(eps[1]);
        assert!((0..300).any(|_| b.pick(&eps, &[]) == Some(1)));
        assert_eq!(b.pick(&[], &[]), None);
    }
}
