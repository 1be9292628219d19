//! A pod's addresses as capture serves them: every address its namespace has (link-local
//! included), and per family the primary one its captured connections leave from.
//!
//! The namespace, not the config, says which addresses the pod has: an address the config
//! does not list is still one the pod can be reached on, and leaving it unregistered would
//! let plaintext reach the app through it (the kernel programs drop connections to unserved
//! addresses, but only registered ones are logged and judged by policy). The config decides
//! which address is primary when the pod has several.

use std::net::IpAddr;

/// See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodAddrs {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    primary_v4: Option<IpAddr>,
    primary_v6: Option<IpAddr>,
    ipv6_on: bool,
}

impl PodAddrs {
    /// `found`: every address in the pod's namespace (loopback included, as `getifaddrs`
    /// lists them); `configured`: the workload's addresses in the config, in order.
    pub fn new(found: &[IpAddr], configured: &[IpAddr]) -> Self {
        let mut addrs = PodAddrs {
            ipv6_on: found.iter().any(IpAddr::is_ipv6),
            ..PodAddrs::default()
        };
        for addr in found.iter().map(IpAddr::to_canonical) {
            if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
                continue;
            }
            let list = if addr.is_ipv4() {
                &mut addrs.v4
            } else {
                &mut addrs.v6
            };
            if !list.contains(&addr) {
                list.push(addr);
            }
        }
        let primary = |list: &[IpAddr]| {
            configured
                .iter()
                .map(IpAddr::to_canonical)
                .find(|c| list.contains(c) && !is_link_local(*c))
                .or_else(|| list.iter().copied().find(|a| !is_link_local(*a)))
        };
        addrs.primary_v4 = primary(&addrs.v4);
        addrs.primary_v6 = primary(&addrs.v6);
        addrs
    }

    /// Whether the pod has an IPv4 address.
    pub fn has_v4(&self) -> bool {
        !self.v4.is_empty()
    }

    /// Whether IPv6 is on in the pod (any IPv6 address, `::1` and link-local included).
    pub fn ipv6_on(&self) -> bool {
        self.ipv6_on
    }

    /// The pod's IPv4 addresses.
    pub fn v4(&self) -> &[IpAddr] {
        &self.v4
    }

    /// The pod's IPv6 addresses, link-local included.
    pub fn v6(&self) -> &[IpAddr] {
        &self.v6
    }

    /// Where the pod's IPv4 connections come from, if it has a routable IPv4 address.
    pub fn primary_v4(&self) -> Option<IpAddr> {
        self.primary_v4
    }

    /// Where the pod's IPv6 connections come from, if it has a routable IPv6 address.
    pub fn primary_v6(&self) -> Option<IpAddr> {
        self.primary_v6
    }

    /// Every address: the primary ones first (IPv4, then IPv6), since the first names the
    /// pod in logs; then the rest.
    pub fn all(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = [self.primary_v4, self.primary_v6]
            .into_iter()
            .flatten()
            .collect();
        let rest: Vec<IpAddr> = self
            .v4
            .iter()
            .chain(&self.v6)
            .filter(|a| !all.contains(a))
            .copied()
            .collect();
        all.extend(rest);
        all
    }

    /// The configured addresses the namespace does not have (worth a warning: peers will
    /// dial them in vain).
    pub fn missing<'a>(&'a self, configured: &'a [IpAddr]) -> impl Iterator<Item = IpAddr> + 'a {
        configured
            .iter()
            .map(IpAddr::to_canonical)
            .filter(|c| !self.v4.contains(c) && !self.v6.contains(c))
    }
}

/// `fe80::/10`: link-local, never routable, never a primary address.
pub fn is_link_local(addr: IpAddr) -> bool {
    matches!(addr.to_canonical(), IpAddr::V6(v6) if v6.is_unicast_link_local())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter()
            .map(|s| s.parse().expect("test address"))
            .collect()
    }

    #[test]
    fn dual_stack_pod_with_link_local() {
        let found = ips(&["127.0.0.1", "::1", "10.1.1.2", "fd00:1::2", "fe80::1"]);
        let a = PodAddrs::new(&found, &ips(&["10.1.1.2", "fd00:1::2"]));
        assert_eq!(a.v4(), ips(&["10.1.1.2"]).as_slice());
        assert_eq!(a.v6(), ips(&["fd00:1::2", "fe80::1"]).as_slice());
        assert_eq!(a.primary_v4(), Some(ips(&["10.1.1.2"])[0]));
        assert_eq!(a.primary_v6(), Some(ips(&["fd00:1::2"])[0]));
        assert!(a.has_v4() && a.ipv6_on());
        assert_eq!(a.all(), ips(&["10.1.1.2", "fd00:1::2", "fe80::1"]));
    }

    #[test]
    fn ipv4_only_config_still_serves_the_link_local_address() {
        let found = ips(&["127.0.0.1", "::1", "10.1.1.2", "fe80::1"]);
        let a = PodAddrs::new(&found, &ips(&["10.1.1.2"]));
        assert_eq!(a.v6(), ips(&["fe80::1"]).as_slice());
        assert_eq!(a.primary_v6(), None, "link-local is never primary");
        assert!(a.ipv6_on());
    }

    #[test]
    fn ipv6_only_pod() {
        let found = ips(&["::1", "fd00:1::7", "fe80::7"]);
        let a = PodAddrs::new(&found, &ips(&["fd00:1::7"]));
        assert!(!a.has_v4());
        assert_eq!(a.primary_v4(), None);
        assert_eq!(a.primary_v6(), Some(ips(&["fd00:1::7"])[0]));
    }

    #[test]
    fn ipv6_off() {
        let a = PodAddrs::new(&ips(&["127.0.0.1", "10.1.1.2"]), &ips(&["10.1.1.2"]));
        assert!(!a.ipv6_on());
        assert!(a.v6().is_empty());
    }

    #[test]
    fn the_config_picks_the_primary_among_several() {
        let found = ips(&["10.1.1.2", "10.1.1.3", "fd00:1::2", "fd00:1::3"]);
        let a = PodAddrs::new(&found, &ips(&["fd00:1::3", "10.1.1.3"]));
        assert_eq!(a.primary_v4(), Some(ips(&["10.1.1.3"])[0]));
        assert_eq!(a.primary_v6(), Some(ips(&["fd00:1::3"])[0]));
        let missing: Vec<IpAddr> = a.missing(&ips(&["10.9.9.9", "10.1.1.2"])).collect();
        assert_eq!(missing, ips(&["10.9.9.9"]));
    }
}
