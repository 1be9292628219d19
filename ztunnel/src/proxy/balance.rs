//! Service load balancing: power-of-two-choices least-connections over healthy endpoints,
//! with passive health checking.
//!
//! An endpoint that fails a connect is ejected for a while (longer after each consecutive
//! failure) and skipped by new picks; if every endpoint is ejected, all are candidates
//! again, since refusing outright helps no one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_shared::balance::{EndpointState, Endpoints, p2c};

/// Counts one connection against an endpoint while it lives.
pub use ambit_shared::balance::Load as Lease;

/// Load and health of every endpoint this node has connected to.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Endpoints<IpAddr>,
}

impl Balancer {
    /// Picks an endpoint among `candidates`, skipping `tried`.
    pub fn pick(&self, candidates: &[IpAddr], tried: &[IpAddr]) -> Option<IpAddr> {
        let now = Instant::now();
        let open: Vec<(IpAddr, Arc<EndpointState>)> = candidates
            .iter()
            .filter(|ip| !tried.contains(ip))
            .map(|ip| (*ip, self.endpoints.state(*ip)))
            .collect();
        let healthy: Vec<&(IpAddr, Arc<EndpointState>)> =
            open.iter().filter(|(_, s)| s.healthy(now)).collect();
        let pool: Vec<&(IpAddr, Arc<EndpointState>)> = if healthy.is_empty() {
            open.iter().collect()
        } else {
            healthy
        };
        p2c(&pool, |e| e.1.load()).map(|e| e.0)
    }

    /// Counts a connection to `ip` until the lease is dropped.
    pub fn lease(&self, ip: IpAddr) -> Lease {
        self.endpoints.start(ip)
    }

    /// Records a failed connect: ejects the endpoint for a while.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        self.endpoints.failed(ip)
    }

    /// Records a successful connect: the endpoint is healthy again.
    pub fn succeeded(&self, ip: IpAddr) {
        self.endpoints.succeeded(ip)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
        // Release the load, so below only health decides (least-connections would otherwise
        // never pick an endpoint left a few leases ahead).
        drop(leases);
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
