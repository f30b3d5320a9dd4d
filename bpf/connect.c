/* cgroup/connect4, connect6, sendmsg4, sendmsg6: a registered skill's
 * sockets may reach only the destinations its manifest grants.
 *
 * Attached once at the root of skillguard's cgroup v2 subtree; per-skill
 * policy is in maps keyed by cgroup id (skillguard.h). A cgroup id that is
 * not in `skills` (a launched skill, anything that is not registered) is
 * allowed at once: that lookup is the first thing every program does.
 * Return 1 allows; 0 makes connect()/sendmsg() fail with EPERM
 * (kernel/bpf/cgroup.c __cgroup_bpf_run_filter_sock_addr).
 *
 * TCP: the (address, port) must match a tcp/http grant: longest-prefix match
 * in allow4/allow6 within the skill, then the port in `ports` unless the
 * prefix allows any port (user space merges the ports of covering prefixes
 * into each prefix, so the longest match carries every port that applies).
 * UDP and anything else: only DNS (port 53) to a resolver address, and only
 * for skills whose manifest names hosts. IPv4-mapped IPv6 destinations
 * (::ffff:a.b.c.d) are checked against the IPv4 trie.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "skillguard.h"

BPF_TABLE_PINNED("lpm_trie", struct lpm4_key, struct net_value, allow4, 65536, PIN("allow4"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm6_key, struct net_value, allow6, 65536, PIN("allow6"), BPF_F_NO_PREALLOC);

#define DNS_PORT 53

static __always_inline int port_allowed(u64 cg, struct net_value *nv, u32 port)
{
	if (nv->any_port)
		return 1;
	struct port_key pk = {};
	pk.cgroup_id = cg;
	pk.net_id = nv->net_id;
	pk.port = port;
	return ports.lookup(&pk) != 0;
}

static __always_inline int is_resolver(u32 family, u32 a0, u32 a1, u32 a2, u32 a3)
{
	struct resolver_key rk = {};
	rk.family = family;
	rk.addr[0] = a0;
	rk.addr[1] = a1;
	rk.addr[2] = a2;
	rk.addr[3] = a3;
	return resolvers.lookup(&rk) != 0;
}

static __always_inline int allowed4(u64 cg, struct skill *s, u32 proto, u32 daddr, u32 port)
{
	if (port == DNS_PORT && (s->flags & SKILL_DNS) &&
	    (proto == IPPROTO_UDP || proto == IPPROTO_TCP) && is_resolver(4, daddr, 0, 0, 0))
		return 1;
	if (proto != IPPROTO_TCP)
		return 0;
	struct lpm4_key k = {};
	k.prefixlen = 64 + 32;
	k.cg_lo = (u32)cg;
	k.cg_hi = cg >> 32;
	k.addr = daddr;
	struct net_value *nv = allow4.lookup(&k);
	return nv && port_allowed(cg, nv, port);
}

static __always_inline int refuse(struct bpf_sock_addr *ctx, u64 cg, struct skill *s, u32 family,
				  u32 a0, u32 a1, u32 a2, u32 a3, u32 port)
{
	int enforce = s->flags & SKILL_ENFORCE;
	__sync_fetch_and_add(&s->net_denied, 1);
	struct event *e = new_event(EV_NET, enforce ? DEC_DENIED : DEC_AUDITED, cg);
	if (e) {
		e->family = family;
		e->proto = ctx->protocol;
		e->port = port;
		e->addr[0] = a0;
		e->addr[1] = a1;
		e->addr[2] = a2;
		e->addr[3] = a3;
		e->flags = ctx->type;
		events.ringbuf_submit(e, 0);
	}
	return enforce ? 0 : 1;
}

static __always_inline int check4(struct bpf_sock_addr *ctx)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct skill *s = skills.lookup(&cg);
	if (!s)
		return 1;
	u32 daddr = ctx->user_ip4;
	u32 port = bpf_ntohs((u16)ctx->user_port);
	if (allowed4(cg, s, ctx->protocol, daddr, port))
		return 1;
	return refuse(ctx, cg, s, 4, daddr, 0, 0, 0, port);
}

static __always_inline int check6(struct bpf_sock_addr *ctx)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct skill *s = skills.lookup(&cg);
	if (!s)
		return 1;
	u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	u32 port = bpf_ntohs((u16)ctx->user_port);
	u32 proto = ctx->protocol;
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
		/* ::ffff:a.b.c.d reaches the IPv4 host a.b.c.d (RFC 4291 2.5.5.2) */
		if (allowed4(cg, s, proto, a3, port))
			return 1;
		return refuse(ctx, cg, s, 6, a0, a1, a2, a3, port);
	}
	if (port == DNS_PORT && (s->flags & SKILL_DNS) &&
	    (proto == IPPROTO_UDP || proto == IPPROTO_TCP) && is_resolver(6, a0, a1, a2, a3))
		return 1;
	if (proto == IPPROTO_TCP) {
		struct lpm6_key k = {};
		k.prefixlen = 64 + 128;
		k.cg_lo = (u32)cg;
		k.cg_hi = cg >> 32;
		k.addr[0] = a0;
		k.addr[1] = a1;
		k.addr[2] = a2;
		k.addr[3] = a3;
		struct net_value *nv = allow6.lookup(&k);
		if (nv && port_allowed(cg, nv, port))
			return 1;
	}
	return refuse(ctx, cg, s, 6, a0, a1, a2, a3, port);
}

int sg_connect4(struct bpf_sock_addr *ctx) { return check4(ctx); }
int sg_sendmsg4(struct bpf_sock_addr *ctx) { return check4(ctx); }
int sg_connect6(struct bpf_sock_addr *ctx) { return check6(ctx); }
int sg_sendmsg6(struct bpf_sock_addr *ctx) { return check6(ctx); }
