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
//!   [`OUTBOUND_PORT`] listener, and hands connections arriving for the pod
//!   IP to its [`INBOUND_PORT`] listener (except [`HBONE_PORT`] and
//!   ztunnel's own deliveries from [`DELIVERY_ADDR`]).
//!
//! The accepted socket's `local_addr()` is the original destination, and the
//! listener that accepted it tells which pod it came from.
//!
//! DNS is the one exception to "no rewriting": the connect hooks and
//! `cgroup/sendmsg4|6` send a pod's UDP and TCP queries to port 53 to its DNS
//! proxy on `127.0.0.1:`[`DNS_PROXY_PORT`] (registered with
//! [`Capture::enroll_dns`]), and `cgroup/recvmsg4|6` and
//! `cgroup/getpeername4|6` show the server the app asked in place of the
//! proxy's address (and `cgroup/getsockname4|6` the pod IP in place of
//! 127.0.0.1, for apps that learn their address from a UDP socket connected
//! to a DNS server). Why rewriting rather than marking, as TCP does: a mark
//! set from `sendmsg` applies from the next datagram on, so the first query
//! of an unconnected socket (musl, many stub resolvers) would escape; and
//! replies must come from the server's address *and port 53*, which a proxy
//! socket bound to 15053 cannot send from. Rewriting handles both in the
//! socket layer, for connected and unconnected sockets alike.
//!
//! # What ztunnel must set up per pod (this crate does not)
//!
//! In the pod netns, before [`Capture::enroll`]:
//!
//! ```text
//! ip rule add fwmark 0x1000/0x1000 lookup 100 priority 100
//! ip route add local 0.0.0.0/0 dev lo table 100 src <podIP>
//! ip -6 rule add fwmark 0x1000/0x1000 lookup 100 priority 100
//! ip -6 route add local ::/0 dev lo table 100
//! ```
//!
//! - `src <podIP>` is required: without it the kernel takes the destination
//!   as the source of the looped SYN and `connect()` fails with
//!   `ENETUNREACH`.
//! - The two `-6` lines are required too, although there is no IPv6
//!   listener yet: connect6 marks native IPv6 sockets, and without a v6 rule
//!   the mark does nothing and the connection leaves the pod uncaptured.
//!   With them, native IPv6 fails closed. (v4-mapped destinations on
//!   dual-stack sockets are captured like IPv4.)
//!
//! And three listeners, created inside the pod netns (a thread that did
//! `setns`), each with `SO_MARK` [`ZTUNNEL_MARK`]:
//!
//! - `127.0.0.1:15001` with `IP_TRANSPARENT`: its SYN-ACKs come from the
//!   original, non-local destination, and without `IP_TRANSPARENT` the kernel
//!   cannot route them (the client's connect times out).
//! - `127.0.0.1:15006`.
//! - `0.0.0.0:15008`.
//!
//! For DNS, a UDP socket and a TCP listener on `127.0.0.1:15053` (also
//! marked, nothing else needed), the UDP one registered with
//! [`Capture::enroll_dns`] before [`Capture::enroll`].
//!
//! [`Capture::enroll`] checks that both sockhash listeners live in the pod's
//! netns. Reuseport groups are fine; the program assigns the exact socket
//! that was enrolled.
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

pub use error::Error;
pub use loader::{Capture, CaptureConfig, DnsCapture, PodCapture};

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::BorrowedFd;

/// `SO_MARK` on every socket ztunnel owns; the connect hooks never capture it.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// `SO_MARK` bit the connect hooks set on captured sockets.
pub const CAPTURE_MARK: u32 = 0x1000;
/// Port of the per-pod outbound listener (`127.0.0.1`, `IP_TRANSPARENT`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the per-pod inbound plaintext listener (`127.0.0.1`).
pub const INBOUND_PORT: u16 = 15006;
/// HBONE port; inbound connections to it are never redirected.
pub const HBONE_PORT: u16 = 15008;
/// Port of the per-pod DNS proxy (`127.0.0.1`, UDP and TCP).
pub const DNS_PROXY_PORT: u16 = 15053;
/// Queries (UDP and TCP) to this port are redirected to the DNS proxy.
pub const DNS_PORT: u16 = 53;
/// Where redirected DNS queries go inside the pod netns.
pub const DNS_PROXY_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Source address ztunnel binds when it delivers inbound traffic to the app.
pub const DELIVERY_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
/// Routing table that holds the capture `local` route in each pod netns.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;
/// Priority of the `fwmark` rule that selects [`CAPTURE_ROUTE_TABLE`].
pub const CAPTURE_RULE_PRIORITY: u32 = 100;
/// Most pods one [`Capture`] can enroll (size of every map).
pub const MAX_PODS: u32 = 4096;

/// The `SO_NETNS_COOKIE` of a socket: a socket created inside a network
/// namespace tells that namespace's cookie, which is what the connect hooks
/// see for the pod.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> Result<u64, Error> {
    sys::netns_cookie(sock).map_err(|source| Error::NetnsCookie { source })
}
