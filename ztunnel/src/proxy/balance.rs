//! Service load balancing: power-of-two-choices least-connections over healthy endpoints,
//! with passive health checking.
//!
//! An endpoint that fails a connect is ejected for a while (longer after each consecutive
//! failure) and skipped by new picks; if every endpoint is ejected, all are candidates
//! again, since refusing outright helps no one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// First ejection; doubles per consecutive failure.
const BASE_EJECTION: Duration = Duration::from_secs(5);
/// Longest ejection.
const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Load and health of every endpoint this node has connected to.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<IpAddr, Arc<EndpointState>>>,
}

#[derive(Debug, Default)]
struct EndpointState {
    active: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

/// Counts one connection against an endpoint while it lives.
#[derive(Debug)]
pub struct Lease(Arc<EndpointState>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Balancer {
    fn state(&self, ip: IpAddr) -> Arc<EndpointState> {
        self.endpoints.lock().entry(ip).or_default().clone()
    }

    /// Picks an endpoint among `candidates`, skipping `tried`.
    pub fn pick(&self, candidates: &[IpAddr], tried: &[IpAddr]) -> Option<IpAddr> {
        let now = Instant::now();
        let open: Vec<(IpAddr, Arc<EndpointState>)> = candidates
            .iter()
            .filter(|ip| !tried.contains(ip))
            .map(|ip| (*ip, self.state(*ip)))
            .collect();
        let healthy: Vec<&(IpAddr, Arc<EndpointState>)> = open
            .iter()
            .filter(|(_, s)| s.ejected_until.lock().is_none_or(|until| until <= now))
            .collect();
        let pool: Vec<&(IpAddr, Arc<EndpointState>)> = if healthy.is_empty() {
            open.iter().collect()
        } else {
            healthy
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].0),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ea, eb) = (pool[a], pool[b]);
                let pick =
                    if eb.1.active.load(Ordering::Acquire) < ea.1.active.load(Ordering::Acquire) {
                        eb
                    } else {
                        ea
                    };
                Some(pick.0)
            }
        }
    }

    /// Counts a connection to `ip` until the lease is dropped.
    pub fn lease(&self, ip: IpAddr) -> Lease {
        let s = self.state(ip);
        s.active.fetch_add(1, Ordering::AcqRel);
        Lease(s)
    }

    /// Records a failed connect: ejects the endpoint for a while.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let s = self.state(ip);
        let n = s
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel)
            .min(16);
        let ejection = BASE_EJECTION.saturating_mul(1 << n).min(MAX_EJECTION);
        *s.ejected_until.lock() = Some(Instant::now() + ejection);
        ejection
    }

    /// Records a successful connect: the endpoint is healthy again.
    pub fn succeeded(&self, ip: IpAddr) {
        let s = self.state(ip);
        s.consecutive_failures.store(0, Ordering::Release);
        *s.ejected_until.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly_and_skips_ejected() {
        let b = Balancer::default();
        let ips: Vec<IpAddr> = (1..=3).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let mut leases = Vec::new();
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            let ip = b.pick(&ips, &[]).expect("an endpoint");
            *counts.entry(ip).or_insert(0) += 1;
            leases.push(b.lease(ip));
        }
        for ip in &ips {
            let n = counts[ip];
            assert!((900..=1100).contains(&n), "{ip}: {n} of 3000");
        }
        b.failed(ips[0]);
        for _ in 0..100 {
            assert_ne!(b.pick(&ips, &[]), Some(ips[0]));
        }
        assert_eq!(
            b.pick(&ips, &[ips[1], ips[2]]),
            Some(ips[0]),
            "all others tried: ejected one is still a candidate"
        );
        b.succeeded(ips[0]);
        assert!((0..300).any(|_| b.pick(&ips, &[]) == Some(ips[0])));
        assert_eq!(b.pick(&[], &[]), None);
    }
}
