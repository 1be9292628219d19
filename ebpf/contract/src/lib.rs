//! The capture contract: every number and address that Ambit's kernel programs
//! (`ebpf/bpf/capture.bpf.c`), their loader (`ambit-ebpf`) and ztunnel must agree on.
//!
//! This crate is the one source. `ambit-ebpf`'s build script writes [`c_header`] to
//! `contract.h`, which the C programs include, so the kernel side cannot drift from the Rust
//! side; `ambit-shared` re-exports the ports, and ztunnel takes marks, the routing table
//! and the delivery addresses from here. Drift between copies of these values is how
//! capture once silently failed open (the IPv6 capture rule was written in one place and
//! not the other).
//!
//! It has no dependencies, so the waypoint can use it without pulling in the loader.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::net::{Ipv4Addr, Ipv6Addr};

/// `SO_MARK` on every socket ztunnel owns; the connect hooks never capture such a socket.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// `SO_MARK` bit the connect hooks set on captured sockets. The pod's capture rule
/// (`fwmark CAPTURE_MARK/CAPTURE_MARK lookup CAPTURE_ROUTE_TABLE`) sends their SYNs to a
/// `local` route on `lo`, where `sk_lookup` hands them to the pod's outbound listener.
pub const CAPTURE_MARK: u32 = 0x1000;

/// The per-pod outbound listener (captured connections), on loopback with
/// `IP_TRANSPARENT`/`IPV6_TRANSPARENT`.
pub const OUTBOUND_PORT: u16 = 15001;
/// The per-pod inbound plaintext listener, on loopback.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE; inbound connections to it are never redirected.
pub const HBONE_PORT: u16 = 15008;
/// The per-pod DNS proxy (UDP and TCP), on loopback.
pub const DNS_PROXY_PORT: u16 = 15053;
/// Queries (UDP and TCP) to this port are redirected to the DNS proxy.
pub const DNS_PORT: u16 = 53;

/// Where the per-pod IPv4 listeners (15001, 15006, 15053) bind inside the pod.
pub const LISTEN_ADDR_V4: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Where the per-pod IPv6 listeners bind inside the pod.
pub const LISTEN_ADDR_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Source address ztunnel binds when it delivers inbound IPv4 traffic to the app: the
/// `sk_lookup` program lets connections from it through instead of capturing them again.
///
/// IPv6 has no counterpart: ztunnel delivers inbound IPv6 traffic from the destination
/// address itself (the pod's own), which `sk_lookup` lets through as the pod talking to
/// itself. `::1` cannot serve: the kernel drops a reset from a pod address to `::1`, so a
/// delivery to a port nobody listens on would hang instead of being refused.
pub const DELIVERY_ADDR_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Routing table that holds the capture `local` routes (one per family) in each pod.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;
/// Priority of the `fwmark` rules that select [`CAPTURE_ROUTE_TABLE`]: before `main`
/// (32766), after `local` (0).
pub const CAPTURE_RULE_PRIORITY: u32 = 100;

/// Most pods one node's capture can enroll.
pub const MAX_PODS: u32 = 4096;
/// Most addresses one pod registers (IPv4, IPv6 and link-local, with room for secondary
/// addresses); the address-keyed maps hold `MAX_PODS * MAX_ADDRS_PER_POD` entries.
pub const MAX_ADDRS_PER_POD: u32 = 4;

/// Loopback is always interface 1 in a network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The contract as a C header: `#define`s for the kernel programs. Written to
/// `$OUT_DIR/contract.h` by `ambit-ebpf`'s build script; never edited by hand.
pub fn c_header() -> String {
    let mut h = String::new();
    let mut line = |s: String| {
        h.push_str(&s);
        h.push('\n');
    };
    line("/* Generated from the ambit-capture-contract crate by ambit-ebpf's build.rs. */".into());
    line("/* Do not edit: change ebpf/contract/src/lib.rs instead. */".into());
    line("#ifndef AMBIT_CONTRACT_H".into());
    line("#define AMBIT_CONTRACT_H".into());
    line(format!("#define ZTUNNEL_MARK {ZTUNNEL_MARK:#x}"));
    line(format!("#define CAPTURE_MARK {CAPTURE_MARK:#x}"));
    line(format!("#define OUTBOUND_PORT {OUTBOUND_PORT}"));
    line(format!("#define INBOUND_PORT {INBOUND_PORT}"));
    line(format!("#define HBONE_PORT {HBONE_PORT}"));
    line(format!("#define DNS_PROXY_PORT {DNS_PROXY_PORT}"));
    line(format!("#define DNS_PORT {DNS_PORT}"));
    line(format!(
        "#define LISTEN_ADDR_V4_HOST {:#010x}U",
        u32::from(LISTEN_ADDR_V4)
    ));
    line(format!(
        "#define DELIVERY_ADDR_V4_HOST {:#010x}U",
        u32::from(DELIVERY_ADDR_V4)
    ));
    // IPv6 addresses as four host-order 32-bit words, for bpf_htonl() per word.
    for (name, addr) in [("LISTEN_ADDR_V6", LISTEN_ADDR_V6)] {
        for (i, w) in addr.octets().chunks_exact(4).enumerate() {
            let word = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
            line(format!("#define {name}_HOST_WORD{i} {word:#010x}U"));
        }
    }
    line(format!("#define MAX_PODS {MAX_PODS}"));
    line(format!(
        "#define MAX_POD_ADDRS {}",
        MAX_PODS * MAX_ADDRS_PER_POD
    ));
    line(format!("#define LOOPBACK_IFINDEX {LOOPBACK_IFINDEX}"));
    line("#endif /* AMBIT_CONTRACT_H */".into());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_defines_every_constant() {
        let h = c_header();
        for needle in [
            "#define ZTUNNEL_MARK 0x539",
            "#define CAPTURE_MARK 0x1000",
            "#define OUTBOUND_PORT 15001",
            "#define INBOUND_PORT 15006",
            "#define HBONE_PORT 15008",
            "#define DNS_PROXY_PORT 15053",
            "#define DNS_PORT 53",
            "#define DELIVERY_ADDR_V4_HOST 0x7f000006U",
            "#define LISTEN_ADDR_V4_HOST 0x7f000001U",
            "#define LISTEN_ADDR_V6_HOST_WORD3 0x00000001U",
            "#define MAX_PODS 4096",
            "#define MAX_POD_ADDRS 16384",
            "#define LOOPBACK_IFINDEX 1",
        ] {
            assert!(h.contains(needle), "{needle} missing from:\n{h}");
        }
    }
}
