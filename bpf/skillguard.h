/* Maps and records shared by every skillguard BPF program.
 *
 * Every map is pinned under PIN_DIR (passed by the loader as -DPIN_DIR=...):
 * bcc opens a pinned map when the path exists and creates and pins it
 * otherwise, so programs loaded by a restarted agent share the maps (and the
 * policy in them) with the programs they replace. Layouts here and in
 * agent/enforce/bpf_maps.py must agree. LAYOUT_VERSION is part of the default
 * PIN_DIR and is stored in the pinned `layout` map: the loader refuses a pin
 * dir whose maps were made for another layout rather than misread them.
 */
#ifndef SKILLGUARD_H
#define SKILLGUARD_H

#define LAYOUT_VERSION 2  /* = bpf_hooks.LAYOUT_VERSION; bump on any change below */

#define SKILL_ENFORCE    1u  /* else audit: report, allow */
#define SKILL_DNS        2u  /* DNS to the agent's resolver is allowed */
#define SKILL_FS_OBSERVE 4u
#define SKILL_FS_KILL    8u  /* fs.on_violation: kill */

#define EV_NET  1
#define EV_OPEN 2
#define EV_EXEC 3

#define DEC_DENIED   0
#define DEC_AUDITED  1
#define DEC_KILLED   2
#define DEC_OBSERVED 3

#define EV_PATH_LEN  248  /* = KEY_PATH_LEN: the event carries the bytes the kill decision saw */
#define KEY_PATH_LEN 248  /* LPM data may be 256 bytes: 8 of cgroup id + 248 of path */

struct skill {
	u32 flags;
	u32 fs_policy;       /* key of this skill's prefixes in fs_prefixes; 0: none */
	u64 net_denied;
	u64 fs_events;
	u64 fs_killed;
};

/* LPM keys: prefixlen counts the bits after itself, so putting the cgroup id
 * first (always matched in full, 64 bits) keeps every match inside one skill. */
struct lpm4_key {
	u32 prefixlen;
	u32 cg_lo, cg_hi;
	u32 addr;            /* network byte order */
};

struct lpm6_key {
	u32 prefixlen;
	u32 cg_lo, cg_hi;
	u32 addr[4];
};

struct net_value {
	u32 net_id;          /* with the cgroup id, the key of `ports` */
	u32 any_port;
};

struct port_key {
	u64 cgroup_id;
	u32 net_id;
	u32 port;            /* host byte order */
};

struct resolver_key {
	u32 family;          /* 4 or 6 */
	u32 addr[4];         /* network byte order; IPv4 in addr[0] */
};

/* Path prefixes are keyed by an fs policy id, not a cgroup id: every skill
 * with the same fs rules shares one prefix set (user space allocates the ids
 * and reference-counts them), so the trie grows with distinct policies, not
 * with registered skills. */
struct path_key {
	u32 prefixlen;
	u32 policy_lo, policy_hi;
	char path[KEY_PATH_LEN];
};

struct event {
	u32 kind;
	u32 decision;
	u64 cgroup_id;
	u32 pid;             /* thread id */
	u32 tgid;
	u32 family;
	u32 proto;
	u32 port;
	u32 addr[4];
	s32 dfd;
	u32 flags;
	char path[EV_PATH_LEN];
};

#define PIN(name) PIN_DIR "/" name

BPF_TABLE_PINNED("hash", u64, struct skill, skills, 65536, PIN("skills"));
BPF_TABLE_PINNED("hash", struct port_key, u32, ports, 262144, PIN("ports"));
BPF_TABLE_PINNED("hash", struct resolver_key, u32, resolvers, 64, PIN("resolvers"));
BPF_TABLE_PINNED("percpu_array", u32, u64, lost, 1, PIN("lost"));
BPF_TABLE_PINNED("array", u32, u32, layout, 1, PIN("layout"));  /* [0] = LAYOUT_VERSION, set by the loader */

/* bcc's BPF_RINGBUF_OUTPUT cannot be pinned; this is the same declaration
 * with a pinned section ("maps/<type>:<path>", see bcc's frontend). */
struct events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output) (void *, u64, u64);
	void* (*ringbuf_reserve) (u64);
	void (*ringbuf_discard) (void *, u64);
	void (*ringbuf_submit) (void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN("events"))))
struct events_table_t events = { .max_entries = RINGBUF_BYTES };

static __always_inline void count_lost(void)
{
	u32 zero = 0;
	u64 *n = lost.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline struct event *new_event(u32 kind, u32 decision, u64 cg)
{
	struct event *e = events.ringbuf_reserve(sizeof(struct event));
	if (!e) {
		count_lost();
		return 0;
	}
	u64 pid_tgid = bpf_get_current_pid_tgid();
	e->kind = kind;
	e->decision = decision;
	e->cgroup_id = cg;
	e->pid = (u32)pid_tgid;
	e->tgid = pid_tgid >> 32;
	e->family = 0;
	e->proto = 0;
	e->port = 0;
	e->addr[0] = e->addr[1] = e->addr[2] = e->addr[3] = 0;
	e->dfd = 0;
	e->flags = 0;
	e->path[0] = 0;
	return e;
}

#endif
