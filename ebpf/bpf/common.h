/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map layouts shared by Ambit's kernel programs and their Rust loader, and
 * the UAPI values the programs need. Every number of the capture contract
 * (ports, marks, addresses, sizes) comes from "contract.h", which the build
 * generates from the ambit-capture-contract crate: never define one here.
 *
 * Every struct here has a #[repr(C)] mirror in ebpf/src/maps.rs: change both
 * sides together (the loader checks the sizes of pinned maps, so a mismatch
 * is reported at load time instead of silently corrupting lookups).
 */
#ifndef AMBIT_COMMON_H
#define AMBIT_COMMON_H

#include <linux/types.h>

#include "contract.h"

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
 * An IP address as a map key: IPv6 bytes in network order, IPv4 as the
 * v4-mapped address ::ffff:a.b.c.d. One key shape for both families keeps
 * every map single-typed. All zeros (::) is never a pod address and means
 * "none". The union only gives the BPF side aligned 32-bit access; the layout
 * is plain 16 bytes (Rust: `IpKey { addr: [u8; 16] }`).
 */
struct ip_key {
	union {
		__u8 addr[16];
		__u32 addr32[4];
	};
};

/*
 * Value of `enrolled` (key: netns cookie): the pod's primary address of each
 * family, the keys of its listeners in the sockhashes. A family the pod has
 * no served address in is all zeros, and the connect hooks refuse it: a pod
 * is captured on every family or refused on it, never left uncaptured.
 */
struct enrolled_value {
	struct ip_key ip4;
	struct ip_key ip6;
};

/* Value of `pods` (key: any address of a pod, link-local included). */
struct pod_value {
	__u64 netns_cookie;
};

/*
 * Value of `dns_origins` (socket-local storage, no user-space mirror needed
 * beyond its size): the DNS server an app socket addressed before the
 * connect/sendmsg hooks sent it to the pod's DNS proxy instead, and the pod's
 * address of that family. The recvmsg and getpeername hooks put the server
 * back, so the resolver sees its replies come from the server it asked;
 * getsockname shows the pod's address rather than loopback, as the socket
 * would have had without the redirection (apps learn "their" address by
 * connecting a UDP socket to a DNS server and asking getsockname()). `port`
 * is in network byte order in the low 16 bits, exactly as
 * `bpf_sock_addr.user_port`.
 */
struct dns_origin {
	struct ip_key addr;
	struct ip_key pod_ip;
	__u32 port;
};

#endif /* AMBIT_COMMON_H */
