/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Constants and map layouts shared by Ambit's kernel programs and their Rust
 * loader. Every struct here has a #[repr(C)] mirror in ebpf/src/maps.rs and
 * every constant a `pub const` in ebpf/src/lib.rs: change both sides together
 * (the loader checks the sizes of pinned maps, so a mismatch is reported at
 * load time instead of silently corrupting lookups).
 */
#ifndef AMBIT_COMMON_H
#define AMBIT_COMMON_H

#include <linux/types.h>

/* SO_MARK carried by every socket ztunnel owns: such sockets are never captured. */
#define ZTUNNEL_MARK 0x539
/* SO_MARK bit set on captured app sockets; `ip rule fwmark 0x1000/0x1000 lookup 100`
 * sends their SYNs to a `local` route on lo, where sk_lookup picks them up. */
#define CAPTURE_MARK 0x1000

#define OUTBOUND_PORT 15001
#define INBOUND_PORT 15006
#define HBONE_PORT 15008
/* ztunnel's per-pod DNS proxy: UDP and TCP on 127.0.0.1:15053 in the pod netns. */
#define DNS_PROXY_PORT 15053
/* Where apps send DNS: UDP and TCP to port 53 are redirected to the proxy. */
#define DNS_PORT 53

/* 127.0.0.6: the source address ztunnel uses when it delivers inbound traffic
 * to the app, so that sk_lookup lets that connection through untouched. */
#define DELIVERY_ADDR_HOST 0x7f000006U

/* 127.0.0.1, where the DNS proxy listens inside each pod netns. */
#define LOOPBACK_ADDR_HOST 0x7f000001U

/* Loopback is always interface 1 in a network namespace. */
#define LOOPBACK_IFINDEX 1

/* Upper bound on pods one ztunnel enrolls; maps are small (16-24 B per entry). */
#define MAX_PODS 4096

/* UAPI values, spelled out so the BPF build needs no libc headers. */
#define AMBIT_AF_INET 2
#define AMBIT_AF_INET6 10
#define AMBIT_SOCK_STREAM 1
#define AMBIT_SOCK_DGRAM 2
#define AMBIT_IPPROTO_TCP 6
#define AMBIT_IPPROTO_UDP 17
#define AMBIT_SOL_SOCKET 1
#define AMBIT_SO_MARK 36

/*
 * A pod IP as a map key: IPv6 bytes in network order, IPv4 as the v4-mapped
 * address ::ffff:a.b.c.d. One key shape for both families keeps every map
 * single-typed. The union only gives the BPF side aligned 32-bit access; the
 * layout is plain 16 bytes (Rust: `IpKey { addr: [u8; 16] }`).
 */
struct ip_key {
	union {
		__u8 addr[16];
		__u32 addr32[4];
	};
};

/* Value of `enrolled` (key: netns cookie). */
struct enrolled_value {
	struct ip_key pod_ip;
};

/* Value of `pods` (key: struct ip_key). */
struct pod_value {
	__u64 netns_cookie;
};

/*
 * Value of `dns_origins` (socket-local storage, no user-space mirror needed
 * beyond its size): the DNS server an app socket addressed before the
 * connect/sendmsg hooks sent it to the pod's DNS proxy instead, and the pod
 * IP. The recvmsg and getpeername hooks put the server back, so the resolver
 * sees its replies come from the server it asked; getsockname shows the pod
 * IP rather than 127.0.0.1, as the socket would have had without the
 * redirection (apps learn "their" address by connecting a UDP socket to a
 * DNS server and asking getsockname()). `port` is in network byte order in
 * the low 16 bits, exactly as `bpf_sock_addr.user_port`.
 */
struct dns_origin {
	struct ip_key addr;
	struct ip_key pod_ip;
	__u32 port;
};

#endif /* AMBIT_COMMON_H */
