/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Ambit traffic capture, without iptables and without rewriting addresses.
 *
 * Outbound: `cgroup/connect4|6` marks a pod's TCP sockets with CAPTURE_MARK.
 * Policy routing in the pod netns (`fwmark 0x1000/0x1000 lookup 100`, table
 * 100 = `local 0.0.0.0/0 dev lo src <podIP>`) loops the marked SYN back
 * through lo, and `sk_lookup` hands it to the pod's 15001 listener. The
 * accepted socket's local address is the original destination.
 *
 * Inbound: `sk_lookup` hands connections to the pod IP to the pod's 15006
 * listener, except HBONE (15008) and ztunnel's own deliveries from 127.0.0.6.
 *
 * Fail closed, and fast: when ztunnel is down its listeners are closed, and
 * the kernel removes a closed socket from every sockhash by itself (no
 * user-space clean-up, so this also holds after SIGKILL). The connect hooks
 * see the missing 15001 listener and refuse the connect() with EPERM, so the
 * app gets an immediate error instead of hanging in SYN retransmission (a
 * dropped SYN cannot be answered with a RST: its source would be the
 * non-local original destination). Behind that, sk_lookup still drops any
 * SYN that finds no listener (ztunnel died between connect() and the SYN),
 * so nothing leaves the pod unencrypted either way.
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

/* Netns cookie of an enrolled pod -> its IP. Read by the connect hooks,
 * which can see the netns cookie but not which pod they run for. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u64);
	__type(value, struct enrolled_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

/* Pod IP -> netns cookie. sk_lookup cannot call bpf_get_netns_cookie(), so
 * it recognises a pod by IP; the loader uses the cookie for bookkeeping. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, struct ip_key);
	__type(value, struct pod_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pods SEC(".maps");

/* Pod IP -> that pod's 15001 listener (value: socket fd on update, 4 bytes,
 * which is what aya's SockHash writes). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_PODS);
	__type(key, struct ip_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} outbound_listeners SEC(".maps");

/* Pod IP -> that pod's 15006 listener. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_PODS);
	__type(key, struct ip_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_listeners SEC(".maps");

/* ip4 is in network byte order, as in every BPF context. */
static __always_inline void key_from_v4(struct ip_key *key, __u32 ip4)
{
	key->addr32[0] = 0;
	key->addr32[1] = 0;
	key->addr32[2] = bpf_htonl(0x0000ffff);
	key->addr32[3] = ip4;
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

/* Destinations that never leave the pod: 127.0.0.0/8, 0.0.0.0 (the kernel
 * connects that to a local address), ::1 and ::. */
static __always_inline int key_is_local_only(const struct ip_key *key)
{
	if (key_is_v4(key)) {
		__u32 ip = bpf_ntohl(key->addr32[3]);
		return (ip >> 24) == 127 || ip == 0;
	}
	return key->addr32[0] == 0 && key->addr32[1] == 0 && key->addr32[2] == 0 &&
	       (key->addr32[3] == 0 || key->addr32[3] == bpf_htonl(1));
}

/*
 * Is the pod's outbound (15001) listener alive? Looks it up in the same
 * sockhash that sk_lookup assigns from, so "alive" here means exactly "a
 * captured SYN can be delivered": the entry is the socket ztunnel enrolled
 * (an app that binds 127.0.0.1:15001 itself cannot stand in for it), and the
 * kernel deletes it when the socket closes, however ztunnel died.
 *
 * The LISTEN check is belt and braces: a socket leaves the sockhash when it
 * stops listening (close or shutdown unhash it), and bpf_sk_assign() in
 * sk_lookup accepts only listening TCP sockets anyway.
 *
 * The lookup returns a referenced socket (or NULL); the verifier insists
 * that it is released on every path.
 */
static __always_inline int outbound_listener_alive(const struct ip_key *pod_ip)
{
	struct bpf_sock *listener = bpf_map_lookup_elem(&outbound_listeners, pod_ip);
	if (!listener)
		return 0;
	int alive = listener->state == BPF_TCP_LISTEN;
	bpf_sk_release(listener);
	return alive;
}

/*
 * Shared by connect4 and connect6. Never rewrites the address: capture is
 * purely "set a routing mark". Returns 1 (allow the connect) or 0 (the
 * kernel fails connect() with EPERM).
 *
 * A socket that would be captured is refused, never let through unmarked,
 * when the pod's 15001 listener is gone (ztunnel down: fail fast instead of
 * a SYN that sk_lookup drops and the app retransmits until it times out) or
 * when the mark cannot be set. Sockets that are not captured (not enrolled,
 * ztunnel's mark, loopback and pod-local destinations, UDP) are unaffected,
 * so a restarting ztunnel's own marked sockets still connect.
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
	struct ip_key pod_ip = pod->pod_ip;

	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	/* ztunnel's own sockets (including the ones it opens inside the pod
	 * netns) must go where they say. */
	__u32 mark = sk->mark;
	if (mark == ZTUNNEL_MARK)
		return 1;

	if (key_is_local_only(dst) || key_eq(dst, &pod_ip))
		return 1;

	if (!outbound_listener_alive(&pod_ip))
		return 0;

	/* OR, not assign: keep whatever mark bits the app set itself; the ip rule
	 * matches only our bit (fwmark 0x1000/0x1000). Unmarked, the SYN would
	 * leave the pod uncaptured, so a failure refuses the connect. */
	int new_mark = (int)(mark | CAPTURE_MARK);
	if (bpf_setsockopt(ctx, AMBIT_SOL_SOCKET, AMBIT_SO_MARK, &new_mark, sizeof(new_mark)))
		return 0;
	return 1;
}

SEC("cgroup/connect4")
int ambit_connect4(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	key_from_v4(&dst, ctx->user_ip4);
	return mark_if_captured(ctx, &dst);
}

/* v4-mapped destinations arrive here for dual-stack sockets (tcp_v6_connect
 * calls tcp_v4_connect directly, so connect4 never sees them); they compare
 * naturally because pod keys are v4-mapped too. Native IPv6 is marked as
 * well; with no v6 listener yet it fails closed, provided the pod netns has
 * the `ip -6` capture rule and route (without them the mark is ignored and
 * the connection leaves uncaptured). */
SEC("cgroup/connect6")
int ambit_connect6(struct bpf_sock_addr *ctx)
{
	struct ip_key dst;
	dst.addr32[0] = ctx->user_ip6[0];
	dst.addr32[1] = ctx->user_ip6[1];
	dst.addr32[2] = ctx->user_ip6[2];
	dst.addr32[3] = ctx->user_ip6[3];
	return mark_if_captured(ctx, &dst);
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
		local.addr32[0] = ctx->local_ip6[0];
		local.addr32[1] = ctx->local_ip6[1];
		local.addr32[2] = ctx->local_ip6[2];
		local.addr32[3] = ctx->local_ip6[3];
		remote.addr32[0] = ctx->remote_ip6[0];
		remote.addr32[1] = ctx->remote_ip6[1];
		remote.addr32[2] = ctx->remote_ip6[2];
		remote.addr32[3] = ctx->remote_ip6[3];
	} else {
		return SK_PASS;
	}

	/* Outbound: a captured SYN looped back through lo, from the pod to
	 * somewhere else. Only lo qualifies: locally routed traffic to the pod IP
	 * itself reports eth0, and real inbound traffic never comes from a pod
	 * IP of ours on lo. */
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX && !key_eq(&remote, &local) &&
	    bpf_map_lookup_elem(&pods, &remote))
		return assign_or_drop(ctx, &outbound_listeners, &remote);

	/* Inbound: to an enrolled pod's IP. */
	if (!bpf_map_lookup_elem(&pods, &local))
		return SK_PASS;
	/* HBONE terminates on ztunnel's normal 0.0.0.0:15008 listener. */
	if (ctx->local_port == HBONE_PORT)
		return SK_PASS;
	/* ztunnel delivering to the app, and the pod talking to itself. */
	if ((key_is_v4(&remote) && remote.addr32[3] == bpf_htonl(DELIVERY_ADDR_HOST)) ||
	    key_eq(&remote, &local))
		return SK_PASS;
	return assign_or_drop(ctx, &inbound_listeners, &local);
}

char LICENSE[] SEC("license") = "Apache-2.0";
