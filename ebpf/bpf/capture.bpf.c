/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Ambit traffic capture, without iptables, and without rewriting addresses
 * except for DNS. Both address families, and every address of a pod,
 * link-local included.
 *
 * Outbound: `cgroup/connect4|6` marks a pod's TCP sockets with CAPTURE_MARK.
 * Policy routing in the pod netns (`fwmark CAPTURE_MARK lookup 100`, with
 * table 100 = `local 0.0.0.0/0 dev lo src <podIPv4>` and `local ::/0 dev lo
 * src <podIPv6>`) loops the marked SYN back through lo, and `sk_lookup` hands
 * it to the pod's 15001 listener of that family. The accepted socket's local
 * address is the original destination.
 *
 * Inbound: `sk_lookup` hands connections to any of the pod's addresses to its
 * 15006 listener of that family, except HBONE (15008) and ztunnel's own
 * deliveries (from DELIVERY_ADDR_V4, or over IPv6 from the pod's own address).
 *
 * Fail closed, on every family. A pod is captured on a family only if it has
 * an address of that family that ztunnel serves; otherwise the connect hooks
 * refuse that family's connections (EPERM). Link-local destinations are
 * always refused: they cannot be tunnelled, and the peer's link-local
 * address is not in any config, so it could never be told apart from a
 * non-mesh peer. A SYN that reaches `sk_lookup` through the capture route
 * from an address ztunnel does not serve, or that arrives for an address of
 * the pod ztunnel does not serve, is dropped: normal socket lookup would hand
 * it to whatever local socket listens on that port (the app itself), which is
 * wrong delivery in plaintext.
 *
 * DNS: UDP and TCP to port 53 are the one place where an address is
 * rewritten. The connect and sendmsg hooks send them to the pod's DNS proxy
 * on loopback:15053 of the same family (same netns, so no routing tricks are
 * needed, and sendmsg rewrites each datagram of an unconnected socket, which
 * a routing mark set from that hook would only do from the next datagram
 * on). The server the app asked is kept in socket-local storage, and the
 * recvmsg and getpeername hooks put it back, so resolvers that check where a
 * reply came from (glibc, musl, dig) accept the proxy's answers; getsockname
 * shows the pod's address where the kernel bound loopback. See dns_capture().
 *
 * Fail fast: when ztunnel is down its listeners are closed, and the kernel
 * removes a closed socket from every sockhash by itself (no user-space
 * clean-up, so this also holds after SIGKILL). The connect hooks see the
 * missing 15001 listener and refuse the connect() with EPERM, so the app gets
 * an immediate error instead of hanging in SYN retransmission (a dropped SYN
 * cannot be answered with a RST: its source would be the non-local original
 * destination). Behind that, sk_lookup still drops any SYN that finds no
 * listener (ztunnel died between connect() and the SYN), so nothing leaves
 * the pod unencrypted either way. DNS fails the same way (EPERM from
 * connect() and sendmsg()); see dns_capture().
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

/* Netns cookie of an enrolled (or held) pod -> its primary address of each
 * family. Read by the connect hooks, which can see the netns cookie but not
 * which pod they run for. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u64);
	__type(value, struct enrolled_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

/* Every address of every enrolled pod -> its netns cookie. sk_lookup cannot
 * call bpf_get_netns_cookie(), so it recognises a pod by address; the connect
 * hooks use it to tell a pod's own addresses from everyone else's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct ip_key);
	__type(value, struct pod_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pods SEC(".maps");

/* Pod address -> that pod's 15001 listener of the address's family (value:
 * socket fd on update, 4 bytes, which is what aya's SockHash writes). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct ip_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} outbound_listeners SEC(".maps");

/* Pod address -> that pod's 15006 listener of the address's family. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct ip_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_listeners SEC(".maps");

/* Pod's primary address of a family -> that pod's DNS proxy UDP socket of the
 * family (loopback:15053). Only its presence is used: it says "DNS of this
 * pod is proxied on this family, and the proxy is alive" (the kernel removes
 * a closed socket from the map by itself). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct ip_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_listeners SEC(".maps");

/* Per app socket: the DNS server it addressed before redirection. Pinned so
 * that a restarted ztunnel's programs keep restoring addresses for sockets
 * redirected by the previous ones; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct dns_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_origins SEC(".maps");

/* ip4 is in network byte order, as in every BPF context. */
static __always_inline void key_from_v4(struct ip_key *key, __u32 ip4)
{
	key->addr32[0] = 0;
	key->addr32[1] = 0;
	key->addr32[2] = bpf_htonl(0x0000ffff);
	key->addr32[3] = ip4;
}

static __always_inline void key_from_v6(struct ip_key *key, const __u32 *ip6)
{
	key->addr32[0] = ip6[0];
	key->addr32[1] = ip6[1];
	key->addr32[2] = ip6[2];
	key->addr32[3] = ip6[3];
}

static __always_inline int key_eq(const struct ip_key *a, const struct ip_key *b)
{
	return a->addr32[0] == b->addr32[0] && a->addr32[1] == b->addr32[1] &&
	       a->addr32[2] == b->addr32[2] && a->addr32[3] == b->addr32[3];
}

static __always_inline int key_is_v4(const struct ip_key *key)
{
	return key->addr32[0] == 0 && key->addr32[1] == 0 &&
	       key->addr32[2] == bpf_htonl(0x0000ffff);
}

/* "No address": a family the pod is not served on. */
static __always_inline int key_is_none(const struct ip_key *key)
{
	return key->addr32[0] == 0 && key->addr32[1] == 0 && key->addr32[2] == 0 &&
	       key->addr32[3] == 0;
}

/* fe80::/10. */
static __always_inline int key_is_link_local(const struct ip_key *key)
{
	return (key->addr32[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

/* Loopback and unspecified destinations never leave the pod. */
static __always_inline int key_is_local_only(const struct ip_key *key)
{
	if (key_is_v4(key)) {
		__u32 ip = bpf_ntohl(key->addr32[3]);
		return (ip >> 24) == 127 || ip == 0;
	}
	return key->addr32[0] == 0 && key->addr32[1] == 0 && key->addr32[2] == 0 &&
	       (key->addr32[3] == 0 || key->addr32[3] == bpf_htonl(1));
}

/* ztunnel's IPv4 delivery source. Over IPv6 ztunnel delivers from the pod's own
 * address, which the "pod talking to itself" case lets through. */
static __always_inline int key_is_delivery(const struct ip_key *key)
{
	return key_is_v4(key) && key->addr32[3] == bpf_htonl(DELIVERY_ADDR_V4_HOST);
}

/* Is `addr` one of the addresses of the pod whose netns cookie is `cookie`? */
static __always_inline int is_own_addr(const struct ip_key *addr, __u64 cookie)
{
	struct pod_value *owner = bpf_map_lookup_elem(&pods, addr);
	return owner && owner->netns_cookie == cookie;
}

/* The pod's primary address of the destination's family: the key of its
 * listeners for that family. */
static __always_inline struct ip_key pod_key_for(const struct enrolled_value *pod,
						 const struct ip_key *dst)
{
	return key_is_v4(dst) ? pod->ip4 : pod->ip6;
}

/*
 * Is the pod's outbound (15001) listener of a family alive? Looks it up in the
 * same sockhash that sk_lookup assigns from, so "alive" here means exactly "a
 * captured SYN can be delivered": the entry is the socket ztunnel enrolled
 * (an app that binds loopback:15001 itself cannot stand in for it), and the
 * kernel deletes it when the socket closes, however ztunnel died.
 *
 * The LISTEN check is belt and braces: a socket leaves the sockhash when it
 * stops listening (close or shutdown unhash it), and bpf_sk_assign() in
 * sk_lookup accepts only listening TCP sockets anyway.
 *
 * The lookup returns a referenced socket (or NULL); the verifier insists
 * that it is released on every path.
 */
static __always_inline int outbound_listener_alive(const struct ip_key *pod_key)
{
	if (key_is_none(pod_key))
		return 0;
	struct bpf_sock *listener = bpf_map_lookup_elem(&outbound_listeners, pod_key);
	if (!listener)
		return 0;
	int alive = listener->state == BPF_TCP_LISTEN;
	bpf_sk_release(listener);
	return alive;
}

/* Is the pod's DNS proxy socket of a family alive? Presence in the sockhash is
 * enough: a UDP socket leaves it when it is closed. */
static __always_inline int dns_listener_alive(const struct ip_key *pod_key)
{
	struct bpf_sock *listener = bpf_map_lookup_elem(&dns_listeners, pod_key);
	if (!listener)
		return 0;
	bpf_sk_release(listener);
	return 1;
}

enum dns_verdict {
	/* Not a DNS query this program proxies: carry on as without DNS capture. */
	DNS_SKIP,
	/* Send it to the pod's DNS proxy (dns_redirect4/6). */
	DNS_REDIRECT,
	/* Refuse the connect()/sendmsg() with EPERM. */
	DNS_REFUSE,
};

/*
 * Shared by the connect and sendmsg hooks of both families. A DNS query
 * (UDP or TCP to port 53) from an enrolled pod, not from ztunnel's own
 * sockets and not to loopback or the pod itself, is
 *
 * - refused when the pod is not served on the server's family (no address
 *   of that family): resolvers move on to a server of the other family;
 * - redirected when the pod's DNS proxy of that family is alive;
 * - refused (EPERM) when ztunnel is down, i.e. the pod's 15001 listener is
 *   gone too: DNS fails fast and closed, like TCP, instead of silently
 *   reaching a server ztunnel would not have chosen. Resolvers move on to
 *   their next server or report the error at once; nothing hangs;
 * - left alone when ztunnel is up but has no DNS proxy for this pod (the
 *   proxy is turned off, or its socket was closed): the query goes to the
 *   server the app asked, exactly as without a mesh.
 */
static __always_inline int dns_capture(struct bpf_sock_addr *ctx, const struct ip_key *dst,
					struct ip_key *pod_key_out)
{
	if (ctx->user_port != bpf_htons(DNS_PORT))
		return DNS_SKIP;
	__u32 type = ctx->type;
	__u32 protocol = ctx->protocol;
	if (!(type == AMBIT_SOCK_DGRAM && protocol == AMBIT_IPPROTO_UDP) &&
	    !(type == AMBIT_SOCK_STREAM && protocol == AMBIT_IPPROTO_TCP))
		return DNS_SKIP;

	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct enrolled_value *pod = bpf_map_lookup_elem(&enrolled, &cookie);
	if (!pod)
		return DNS_SKIP;
	struct ip_key pod_key = pod_key_for(pod, dst);

	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->mark == ZTUNNEL_MARK)
		return DNS_SKIP;
	if (key_is_local_only(dst) || is_own_addr(dst, cookie))
		return DNS_SKIP;

	if (!outbound_listener_alive(&pod_key))
		return DNS_REFUSE;
	if (!dns_listener_alive(&pod_key))
		return DNS_SKIP;
	*pod_key_out = pod_key;
	return DNS_REDIRECT;
}

/* Remembers where the app meant to go, for recvmsg/getpeername. The key is
 * stored as given (v4-mapped for IPv4, also on IPv6 sockets). Without
 * storage the redirection could not be undone and the resolver would drop
 * the replies, so the caller refuses instead. */
static __always_inline int dns_remember(struct bpf_sock_addr *ctx, const struct ip_key *dst,
					 const struct ip_key *pod_key)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct dns_origin *origin =
		bpf_sk_storage_get(&dns_origins, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!origin)
		return 0;
	origin->addr = *dst;
	origin->pod_ip = *pod_key;
	origin->port = ctx->user_port;
	return 1;
}

/* connect4/sendmsg4: 1 to go on (redirected or not), 0 to refuse. Sets
 * *handled when the DNS verdict decided the outcome. */
static __always_inline int dns_redirect4(struct bpf_sock_addr *ctx, const struct ip_key *dst,
					 int *handled)
{
	struct ip_key pod_key = {};
	*handled = 1;
	switch (dns_capture(ctx, dst, &pod_key)) {
	case DNS_REFUSE:
		return 0;
	case DNS_REDIRECT:
		if (!dns_remember(ctx, dst, &pod_key))
			return 0;
		ctx->user_ip4 = bpf_htonl(LISTEN_ADDR_V4_HOST);
		ctx->user_port = bpf_htons(DNS_PROXY_PORT);
		return 1;
	default:
		*handled = 0;
		return 1;
	}
}

/* connect6/sendmsg6. v4-mapped servers (dual-stack sockets) go to the IPv4
 * proxy's v4-mapped address, native IPv6 servers to the IPv6 proxy. */
static __always_inline int dns_redirect6(struct bpf_sock_addr *ctx, const struct ip_key *dst,
					 int *handled)
{
	struct ip_key pod_key = {};
	*handled = 1;
	switch (dns_capture(ctx, dst, &pod_key)) {
	case DNS_REFUSE:
		return 0;
	case DNS_REDIRECT:
		if (!dns_remember(ctx, dst, &pod_key))
			return 0;
		if (key_is_v4(dst)) {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
			ctx->user_ip6[3] = bpf_htonl(LISTEN_ADDR_V4_HOST);
		} else {
			ctx->user_ip6[0] = bpf_htonl(LISTEN_ADDR_V6_HOST_WORD0);
			ctx->user_ip6[1] = bpf_htonl(LISTEN_ADDR_V6_HOST_WORD1);
			ctx->user_ip6[2] = bpf_htonl(LISTEN_ADDR_V6_HOST_WORD2);
			ctx->user_ip6[3] = bpf_htonl(LISTEN_ADDR_V6_HOST_WORD3);
		}
		ctx->user_port = bpf_htons(DNS_PROXY_PORT);
		return 1;
	default:
		*handled = 0;
		return 1;
	}
}

/* The stored server of a socket whose peer/source is the DNS proxy, or NULL. */
static __always_inline struct dns_origin *dns_origin_of(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PROXY_PORT))
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	return bpf_sk_storage_get(&dns_origins, sk, 0, 0);
}

/* Is the IPv6 sockaddr of `ctx` the IPv4 proxy's v4-mapped address? */
static __always_inline int user_ip6_is_mapped_listen(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff) &&
	       ctx->user_ip6[3] == bpf_htonl(LISTEN_ADDR_V4_HOST);
}

/* Is the IPv6 sockaddr of `ctx` the IPv6 proxy's address? */
static __always_inline int user_ip6_is_listen6(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == bpf_htonl(LISTEN_ADDR_V6_HOST_WORD0) &&
	       ctx->user_ip6[1] == bpf_htonl(LISTEN_ADDR_V6_HOST_WORD1) &&
	       ctx->user_ip6[2] == bpf_htonl(LISTEN_ADDR_V6_HOST_WORD2) &&
	       ctx->user_ip6[3] == bpf_htonl(LISTEN_ADDR_V6_HOST_WORD3);
}

/* recvmsg4/getpeername4: replies from (and the peer) 127.0.0.1:15053 are
 * shown as the server the app asked. Must return 1. */
static __always_inline int dns_restore4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(LISTEN_ADDR_V4_HOST))
		return 1;
	struct dns_origin *origin = dns_origin_of(ctx);
	if (!origin || !key_is_v4(&origin->addr))
		return 1;
	ctx->user_ip4 = origin->addr.addr32[3];
	ctx->user_port = origin->port;
	return 1;
}

static __always_inline int dns_restore6(struct bpf_sock_addr *ctx)
{
	int mapped = user_ip6_is_mapped_listen(ctx);
	if (!mapped && !user_ip6_is_listen6(ctx))
		return 1;
	struct dns_origin *origin = dns_origin_of(ctx);
	/* The proxy of the other family never answers this socket. */
	if (!origin || key_is_v4(&origin->addr) != mapped)
		return 1;
	ctx->user_ip6[0] = origin->addr.addr32[0];
	ctx->user_ip6[1] = origin->addr.addr32[1];
	ctx->user_ip6[2] = origin->addr.addr32[2];
	ctx->user_ip6[3] = origin->addr.addr32[3];
	ctx->user_port = origin->port;
	return 1;
}

/*
 * Shared by connect4 and connect6. Never rewrites the address: capture is
 * purely "set a routing mark". Returns 1 (allow the connect) or 0 (the
 * kernel fails connect() with EPERM).
 *
 * A socket that would be captured is refused, never let through unmarked,
 * when the pod is not served on the destination's family (no address of it),
 * when the destination is link-local, when the pod's 15001 listener of that
 * family is gone (ztunnel down: fail fast instead of a SYN that sk_lookup
 * drops and the app retransmits until it times out) or when the mark cannot
 * be set. Sockets that are not captured (not enrolled, ztunnel's mark,
 * loopback destinations and the pod's own addresses, UDP) are unaffected, so
 * a restarting ztunnel's own marked sockets still connect. (UDP to port 53,
 * and TCP to 53 while the pod's DNS is proxied, never get here: the hooks hand
 * them to dns_redirect4/6 first.)
 */
static __always_inline int mark_if_captured(struct bpf_sock_addr *ctx,
					    const struct ip_key *dst)
{
	if (ctx->type != AMBIT_SOCK_STREAM || ctx->protocol != AMBIT_IPPROTO_TCP)
		return 1;

	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct enrolled_value *pod = bpf_map_lookup_elem(&enrolled, &cookie);
	if (!pod)
		return 1;
	/* A stack copy: the map value may be replaced while we use it. */
	struct ip_key pod_key = pod_key_for(pod, dst);

	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	/* ztunnel's own sockets (including the ones it opens inside the pod
	 * netns) must go where they say. */
	__u32 mark = sk->mark;
	if (mark == ZTUNNEL_MARK)
		return 1;

	if (key_is_local_only(dst) || is_own_addr(dst, cookie))
		return 1;

	/* Link-local cannot be tunnelled, and no config says which link-local
	 * peer is in the mesh: refuse rather than guess. */
	if (key_is_link_local(dst))
		return 0;
	if (!outbound_listener_alive(&pod_key))
		return 0;

	/* OR, not assign: keep whatever mark bits the app set itself; the ip rule
	 * matches only our bit (fwmark 0x1000/0x1000). Unmarked, the SYN would
	 * leave the pod uncaptured, so a failure refuses the connect. */
	int new_mark = (int)(mark | CAPTURE_MARK);
	if (bpf_setsockopt(ctx, AMBIT_SOL_SOCKET, AMBIT_SO_MARK, &new_mark, sizeof(new_mark)))
		return 0;
	return 1;
}

/* getsockname4/6: a redirected socket bound by the kernel to the proxy's
 * loopback address shows the pod's address instead, the address it would
 * have had. Only the loopback address is replaced (a socket the app bound
 * itself keeps its address), and only on sockets the DNS hooks redirected.
 * Must return 1. */
static __always_inline int dns_local4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(LISTEN_ADDR_V4_HOST))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct dns_origin *origin = bpf_sk_storage_get(&dns_origins, sk, 0, 0);
	if (!origin || !key_is_v4(&origin->pod_ip))
		return 1;
	ctx->user_ip4 = origin->pod_ip.addr32[3];
	return 1;
}

static __always_inline int dns_local6(struct bpf_sock_addr *ctx)
{
	int mapped = user_ip6_is_mapped_listen(ctx);
	if (!mapped && !user_ip6_is_listen6(ctx))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct dns_origin *origin = bpf_sk_storage_get(&dns_origins, sk, 0, 0);
	if (!origin || key_is_v4(&origin->pod_ip) != mapped)
		return 1;
	ctx->user_ip6[0] = origin->pod_ip.addr32[0];
	ctx->user_ip6[1] = origin->pod_ip.addr32[1];
	ctx->user_ip6[2] = origin->pod_ip.addr32[2];
	ctx->user_ip6[3] = origin->pod_ip.addr32[3];
	return 1;
}

SEC("cgroup/connect4")
int ambit_connect4(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	key_from_v4(&dst, ctx->user_ip4);
	int handled = 0;
	int verdict = dns_redirect4(ctx, &dst, &handled);
	if (handled)
		return verdict;
	return mark_if_captured(ctx, &dst);
}

/* v4-mapped destinations arrive here for dual-stack sockets (tcp_v6_connect
 * calls tcp_v4_connect directly, so connect4 never sees them); they compare
 * naturally because IPv4 keys are v4-mapped too, and go to the IPv4
 * listeners. Native IPv6 goes to the IPv6 ones. */
SEC("cgroup/connect6")
int ambit_connect6(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	key_from_v6(&dst, ctx->user_ip6);
	int handled = 0;
	int verdict = dns_redirect6(ctx, &dst, &handled);
	if (handled)
		return verdict;
	return mark_if_captured(ctx, &dst);
}

/* Datagrams sent with an explicit address (unconnected UDP sockets, as musl
 * and many stub resolvers use): the same DNS redirection, per datagram. */
SEC("cgroup/sendmsg4")
int ambit_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	key_from_v4(&dst, ctx->user_ip4);
	int handled = 0;
	return dns_redirect4(ctx, &dst, &handled);
}

SEC("cgroup/sendmsg6")
int ambit_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	key_from_v6(&dst, ctx->user_ip6);
	int handled = 0;
	return dns_redirect6(ctx, &dst, &handled);
}

SEC("cgroup/recvmsg4")
int ambit_recvmsg4(struct bpf_sock_addr *ctx)
{
	return dns_restore4(ctx);
}

SEC("cgroup/recvmsg6")
int ambit_recvmsg6(struct bpf_sock_addr *ctx)
{
	return dns_restore6(ctx);
}

SEC("cgroup/getpeername4")
int ambit_getpeername4(struct bpf_sock_addr *ctx)
{
	return dns_restore4(ctx);
}

SEC("cgroup/getpeername6")
int ambit_getpeername6(struct bpf_sock_addr *ctx)
{
	return dns_restore6(ctx);
}

SEC("cgroup/getsockname4")
int ambit_getsockname4(struct bpf_sock_addr *ctx)
{
	return dns_local4(ctx);
}

SEC("cgroup/getsockname6")
int ambit_getsockname6(struct bpf_sock_addr *ctx)
{
	return dns_local6(ctx);
}

/* Steers the connection to the listener stored under `key`, or drops it when
 * there is none (ztunnel down: fail closed). */
static __always_inline int assign_or_drop(struct bpf_sk_lookup *ctx, void *listeners,
					  const struct ip_key *key)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(listeners, key);
	if (!sk)
		return SK_DROP;
	/* NO_REUSEPORT: the sockhash names the exact listener. Without it a
	 * reuseport group could pick a sibling, e.g. the old listener of a
	 * ztunnel that is handing over to its successor. */
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
	/* The lookup took a reference; the kernel holds its own once assigned. */
	bpf_sk_release(sk);
	return err == 0 ? SK_PASS : SK_DROP;
}

/* Runs in enrolled pods' network namespaces only (one link per pod netns). */
SEC("sk_lookup")
int ambit_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != AMBIT_IPPROTO_TCP)
		return SK_PASS;

	struct ip_key local, remote;
	if (ctx->family == AMBIT_AF_INET) {
		key_from_v4(&local, ctx->local_ip4);
		key_from_v4(&remote, ctx->remote_ip4);
	} else if (ctx->family == AMBIT_AF_INET6) {
		key_from_v6(&local, ctx->local_ip6);
		key_from_v6(&remote, ctx->remote_ip6);
	} else {
		return SK_PASS;
	}

	/* Outbound: a SYN that came through lo to a non-loopback address that
	 * is not its source. Only the capture route sends such SYNs through lo
	 * (locally routed traffic to the pod's own addresses reports the
	 * interface that owns them), so this is a captured connection: it goes
	 * to the pod's 15001 listener of its source address, or nowhere. Letting
	 * normal lookup have it would deliver it, in plaintext, to whatever
	 * local socket listens on the destination port. */
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX && !key_eq(&remote, &local) &&
	    !key_is_local_only(&local)) {
		if (bpf_map_lookup_elem(&pods, &remote))
			return assign_or_drop(ctx, &outbound_listeners, &remote);
		return SK_DROP;
	}

	/* HBONE terminates on ztunnel's own 15008 listeners. */
	if (ctx->local_port == HBONE_PORT)
		return SK_PASS;
	/* ztunnel delivering to the app, and the pod talking to itself. */
	if (key_is_delivery(&remote) || key_eq(&remote, &local))
		return SK_PASS;
	/* Inbound: to one of the pod's addresses. */
	if (bpf_map_lookup_elem(&pods, &local))
		return assign_or_drop(ctx, &inbound_listeners, &local);
	/* Loopback traffic inside the pod is none of our business. */
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	/* From the network to an address of this pod that ztunnel does not
	 * serve (one added after enrollment, say): refused, not delivered
	 * uncaptured. */
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Apache-2.0";
