//! The node's resolvers, from ztunnel's own `resolv.conf`.

use std::net::{IpAddr, SocketAddr};

/// Like glibc, only the first three `nameserver` lines count (`MAXNS`).
const MAX_NAMESERVERS: usize = 3;
/// The DNS port.
const PORT: u16 = 53;

/// The servers of the `nameserver` lines, in order, on port 53, and a note for each line that
/// could not be used. Comments (`#`, `;`) and other keywords are ignored. Link-local IPv6
/// servers with a zone (`fe80::1%eth0`) are skipped: they name an interface of ztunnel's
/// namespace that a plain address cannot carry.
pub(crate) fn nameservers(text: &str) -> (Vec<SocketAddr>, Vec<String>) {
    let mut servers = Vec::new();
    let mut skipped = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            skipped.push(format!("{line:?}: no address"));
            continue;
        };
        match addr.parse::<IpAddr>() {
            Ok(ip) if servers.len() < MAX_NAMESERVERS => servers.push(SocketAddr::new(ip, PORT)),
            Ok(ip) => skipped.push(format!("{ip}: only the first {MAX_NAMESERVERS} are used")),
            Err(_) => skipped.push(format!("{addr:?}: not an IP address")),
        }
    }
    (servers, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_like_glibc() {
        let text = "\
# generated
search shop.svc.cluster.local svc.cluster.local
nameserver 10.0.0.10
nameserver   fd00::53   # comment
; nameserver 10.9.9.9
nameserver fe80::1%eth0
nameserver
options ndots:5
nameserver 10.0.0.11
nameserver 10.0.0.12
";
        let (servers, skipped) = nameservers(text);
        assert_eq!(
            servers,
            vec![
                "10.0.0.10:53".parse().expect("literal"),
                "[fd00::53]:53".parse().expect("literal"),
                "10.0.0.11:53".parse().expect("literal"),
            ]
        );
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(nameservers("").0.is_empty());
    }
}
