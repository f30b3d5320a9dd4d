/* Syscall tracepoints for open/openat/openat2/creat and execve/execveat:
 * observe what a registered skill opens and runs.
 *
 * A tracepoint runs before the syscall reads its arguments and cannot change
 * its result: this observes, it does not deny (the kernel reads the path
 * again after us, so a racing thread can even change it in between). For
 * processes in a registered skill's cgroup each call becomes an event with
 * the path as given, the dirfd and the flags; user space resolves relative
 * paths and checks them against the manifest's fs rules.
 *
 * With fs.on_violation: kill (SKILL_FS_KILL, enforce mode), an absolute path
 * outside every allowed prefix (the `fs_prefixes` trie, under the skill's
 * fs policy id: "dir/" for a directory's contents, "dir\0" for the directory
 * itself) gets
 * bpf_send_signal(SIGKILL) before the syscall proceeds. Relative paths,
 * truncated paths and paths under an allowed prefix (even with "..") are
 * left to user space, which reports them.
 *
 * Every enabled syscall tracepoint puts every task on the syscall slow path
 * (TIF_SYSCALL_TRACEPOINT, kernel/trace/trace_syscalls.c), so the agent
 * attaches these only while a registered skill needs them.
 */
#include <uapi/linux/bpf.h>
#include "skillguard.h"

#define SIGKILL 9
#define O_WRONLY 01
#define O_CREAT 0100
#define O_TRUNC 01000

BPF_TABLE_PINNED("lpm_trie", struct path_key, u32, fs_prefixes, 65536, PIN("fs_prefixes"), BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(scratch, struct path_key, 1);

/* The common part of every syscalls:sys_enter_* record (see its format file). */
struct sys_enter {
	u64 common;
	s32 nr;
	u32 pad;
	u64 args[6];
};

static __always_inline int observe(u32 kind, s64 dfd, const char *filename, u64 flags)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct skill *s = skills.lookup(&cg);
	if (!s || !(s->flags & SKILL_FS_OBSERVE))
		return 0;
	u32 zero = 0;
	struct path_key *k = scratch.lookup(&zero);
	if (!k)
		return 0;
	__builtin_memset(k, 0, sizeof(*k));
	long n = bpf_probe_read_user_str(k->path, KEY_PATH_LEN, filename);
	u32 decision = DEC_OBSERVED;
	if ((s->flags & (SKILL_FS_KILL | SKILL_ENFORCE)) == (SKILL_FS_KILL | SKILL_ENFORCE) &&
	    n > 1 && n < KEY_PATH_LEN && k->path[0] == '/') {
		k->prefixlen = 64 + KEY_PATH_LEN * 8;
		k->policy_lo = s->fs_policy;
		k->policy_hi = 0;
		if (!fs_prefixes.lookup(k)) {
			bpf_send_signal(SIGKILL);
			decision = DEC_KILLED;
			__sync_fetch_and_add(&s->fs_killed, 1);
		}
	}
	__sync_fetch_and_add(&s->fs_events, 1);
	struct event *e = new_event(kind, decision, cg);
	if (!e)
		return 0;
	e->dfd = (s32)dfd;
	e->flags = (u32)flags;
	e->port = n > 0 ? (u32)n : 0;   /* bytes read, NUL included */
	bpf_probe_read_kernel(e->path, EV_PATH_LEN, k->path);
	events.ringbuf_submit(e, 0);
	return 0;
}

#define AT_FDCWD -100

int sg_openat(struct sys_enter *ctx)
{
	return observe(EV_OPEN, (s32)ctx->args[0], (const char *)ctx->args[1], ctx->args[2]);
}

int sg_openat2(struct sys_enter *ctx)
{
	u64 flags = 0;
	bpf_probe_read_user(&flags, sizeof(flags), (void *)ctx->args[2]); /* open_how.flags */
	return observe(EV_OPEN, (s32)ctx->args[0], (const char *)ctx->args[1], flags);
}

int sg_open(struct sys_enter *ctx)
{
	return observe(EV_OPEN, AT_FDCWD, (const char *)ctx->args[0], ctx->args[1]);
}

int sg_creat(struct sys_enter *ctx)
{
	return observe(EV_OPEN, AT_FDCWD, (const char *)ctx->args[0], O_CREAT | O_WRONLY | O_TRUNC);
}

int sg_execve(struct sys_enter *ctx)
{
	return observe(EV_EXEC, AT_FDCWD, (const char *)ctx->args[0], 0);
}

int sg_execveat(struct sys_enter *ctx)
{
	return observe(EV_EXEC, (s32)ctx->args[0], (const char *)ctx->args[1], ctx->args[4]);
}
