//! Ambit's traffic capture: kernel programs and the loader ztunnel drives.
//!
//! The kernel side (`bpf/capture.bpf.c`) captures a pod's TCP traffic without
//! iptables and without rewriting addresses:
//!
//! - `cgroup/connect4` and `cgroup/connect6`, attached to a cgroup v2 subtree,
//!   put [`CAPTURE_MARK`] on the TCP sockets of enrolled pods (sockets marked
//!   [`ZTUNNEL_MARK`], and loopback or pod-local destinations, are left alone).
//! - A policy route in the pod netns loops those marked SYNs through `lo`.
//! - `sk_lookup`, one link per pod netns, hands them to the pod's
//!   [`OUTBOUND_PORT`] listener of their family, and hands connections
//!   arriving for any of the pod's addresses to its [`INBOUND_PORT`] listener
//!   (except [`HBONE_PORT`] and ztunnel's own deliveries, from
//!   [`contract::DELIVERY_ADDR_V4`] or, over IPv6, from the pod's own address).
//!
//! The accepted socket's `local_addr()` is the original destination, and the
//! listener that accepted it tells which pod it came from.
//!
//! DNS is the one exception to "no rewriting": the connect hooks and
//! `cgroup/sendmsg4|6` send a pod's UDP and TCP queries to port 53 to its DNS
//! proxy on loopback:[`DNS_PROXY_PORT`] of their family (registered with
//! [`Capture::enroll_dns`]), and `cgroup/recvmsg4|6` and
//! `cgroup/getpeername4|6` show the server the app asked in place of the
//! proxy's address (and `cgroup/getsockname4|6` the pod's address in place
//! of loopback, for apps that learn their address from a UDP socket connected
//! to a DNS server). Why rewriting rather than marking, as TCP does: a mark
//! set from `sendmsg` applies from the next datagram on, so the first query
//! of an unconnected socket (musl, many stub resolvers) would escape; and
//! replies must come from the server's address *and port 53*, which a proxy
//! socket bound to 15053 cannot send from. Rewriting handles both in the
//! socket layer, for connected and unconnected sockets alike.
//!
//! # What ztunnel must set up per pod (this crate does not)
//!
//! In the pod netns, before [`Capture::enroll`], for both families (the IPv6
//! pair also when the pod has no routable IPv6 address, as a backstop):
//!
//! ```text
//! ip rule add fwmark 0x1000/0x1000 lookup 100 priority 100
//! ip route add local 0.0.0.0/0 dev lo table 100 src <pod IPv4>
//! ip -6 rule add fwmark 0x1000/0x1000 lookup 100 priority 100
//! ip -6 route add local ::/0 dev lo table 100 src <pod IPv6>
//! ```
//!
//! (ztunnel does it over rtnetlink; the numbers are in [`contract`].)
//!
//! - `src` is required: without it the kernel takes the destination as the
//!   source of the looped SYN and `connect()` fails with `ENETUNREACH`.
//! - Without the rule of a family the mark does nothing and that family's
//!   connections leave the pod uncaptured; the connect hooks refuse a family
//!   the pod is not enrolled on, but the rules must be there regardless.
//!
//! And, per family the pod has, listeners created inside the pod netns (a
//! thread that did `setns`), each with `SO_MARK` [`ZTUNNEL_MARK`]:
//!
//! - `127.0.0.1:15001` with `IP_TRANSPARENT` (`[::1]:15001` with
//!   `IPV6_TRANSPARENT`, `IPV6_V6ONLY`): its SYN-ACKs come from the original,
//!   non-local destination, and without transparency the kernel cannot route
//!   them (the client's connect times out).
//! - `127.0.0.1:15006` (`[::1]:15006`).
//! - `0.0.0.0:15008` (`[::]:15008`, `IPV6_V6ONLY`).
//!
//! For DNS, per family a UDP socket and a TCP listener on loopback:15053
//! (also marked, nothing else needed), the UDP ones registered with
//! [`Capture::enroll_dns`] before [`Capture::enroll`].
//!
//! [`Capture::enroll`] registers every address of the pod (link-local ones
//! included) and checks that the listeners live in the pod's netns. Reuseport
//! groups are fine; the program assigns the exact socket that was enrolled.
//!
//! # Fail closed on every family
//!
//! - A pod is captured on a family only if it has a routable address of that
//!   family; otherwise that family's connections are refused (`EPERM`).
//! - Link-local destinations are always refused: they cannot be tunnelled.
//! - Inbound connections to any registered address go to the family's 15006
//!   listener; ones to an address of the pod that is not registered (added
//!   after enrollment) are dropped.
//! - A captured SYN from an address that is not registered is dropped,
//!   never handed to a local listener.
//!
//! Maps and links are pinned on bpffs, so when ztunnel dies the capture stays
//! on and fails closed: no SYN leaves the pod. It also fails fast: the kernel
//! removes a closed listener from the sockhash by itself (so this holds after
//! SIGKILL too, with no clean-up by anyone), and the connect hooks refuse a
//! connection they would capture when the pod's [`OUTBOUND_PORT`] listener is
//! missing, so the app's `connect()` fails at once with `EPERM` ("Operation
//! not permitted") instead of hanging in SYN retransmission. Connections that
//! are never captured (loopback, the pod's own IP, [`ZTUNNEL_MARK`]ed sockets)
//! are not affected. In the rare race where ztunnel dies between `connect()`
//! and the SYN, sk_lookup drops the SYN and the app sees its own timeout. A
//! restarted ztunnel calls [`Capture::load_or_adopt`] and re-enrolls its pods.
//!
//! The flip side of failing fast: connections attempted while a pod has no
//! listener are refused rather than delayed, so a ztunnel restart is visible
//! to apps that connect during the gap. An upgrade that must not be visible
//! enrolls the new ztunnel's listeners (reuseport siblings of the old ones)
//! before the old ztunnel closes its own; re-enrolling swaps the sockhash
//! entry in one step, so there is no gap.
//!
//! DNS follows the same rule: with ztunnel down (the pod's [`OUTBOUND_PORT`]
//! listener gone) a pod's queries to port 53 fail at once with `EPERM` from
//! `connect()` or `sendmsg()`, and resolvers report the failure instead of
//! waiting out their timeouts. Only when ztunnel is up but has no DNS proxy
//! for the pod (never registered, or its socket closed) do queries go to the
//! server the app asked, as without a mesh.

mod error;
mod loader;
mod maps;
mod sys;

pub use ambit_capture_contract as contract;
pub use contract::{
    CAPTURE_MARK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY, DNS_PORT, DNS_PROXY_PORT, HBONE_PORT,
    INBOUND_PORT, MAX_ADDRS_PER_POD, MAX_PODS, OUTBOUND_PORT, ZTUNNEL_MARK,
};
pub use error::{Error, PodId};
pub use loader::{Capture, CaptureConfig, DnsCapture, EnrolledPod, FamilyCapture, PodCapture};

use std::os::fd::BorrowedFd;

/// The `SO_NETNS_COOKIE` of a socket: a socket created inside a network
/// namespace tells that namespace's cookie, which is what the connect hooks
/// see for the pod.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> Result<u64, Error> {
    sys::netns_cookie(sock).map_err(|source| Error::NetnsCookie { source })
}
