/*
 * skillguard-init: the skill's PID 1, from the clone to the skill's execve.
 *
 * The supervisor (agent/launch/supervisor.py) starts this program with
 * posix_spawn(3), the signals the init forwards blocked:
 *
 *     skillguard-init SOCK_FD ERR_FD CGROUP_FD [idmap=OWNER_UID:OWNER_GID:UID:GID ...]
 *                     [tasks=V1_TASKS_FILE ...] [procs=V2_PROCS_FILE]
 *
 * SOCK_FD is our end of a SOCK_SEQPACKET pair with the supervisor, ERR_FD the
 * write end of a pipe on which the first failure is reported as
 * "layer\0reason" before we exit 125, so the skill never starts
 * half-confined. CGROUP_FD is the skill's v2 directory (-1: none).
 *
 * Launcher: make the idmapping user namespaces the binds need (each
 * idmap=), then clone3(CLONE_NEWPID | CLONE_INTO_CGROUP | CLONE_PARENT)
 * the init, a child of the supervisor, tell the supervisor its pid
 * ("pid" + int32 on SOCK_FD: the first message the supervisor reads there,
 * since the init sends nothing before the launcher has exited) and exit.
 * Done here, in a small static
 * process, so that the supervisor neither copies its interpreter nor
 * loads a foreign-function library to make namespaces.
 *
 * First phase of the init (nothing of it depends on the skill; a spare of
 * the daemon's launch zygote runs it before its launch exists): signal
 * forwarders, "0" into every tasks= file (and procs= when clone3 could not
 * place us), unshare(NEWNS|NEWIPC|NEWUTS|NEWNET|NEWCGROUP), setsid. Then one
 * message from the supervisor carries the plan (agent/launch/init_wire.py
 * writes it; the layout is read in read_plan() below, in the same order)
 * with its fds, and the second phase runs in the order of the launch path:
 * mounts -> network -> loopback -> hostname -> rlimits -> ids and
 * capabilities -> cwd -> no_new_privs -> Landlock -> seccomp (listener fd
 * sent to the supervisor) -> fork + exec of the skill.
 *
 * The program then stays as the namespace's init. PID 1 ignores every
 * signal it has no handler for, even SIGTERM from its own namespace
 * (pid_namespaces(7)): the init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
 * SIGUSR1 and SIGUSR2 to the skill, reaps orphans, and when the skill ends
 * sends its raw wait status on SOCK_FD and exits with its code (128+N for a
 * signal); the kernel then kills what the skill left (zap_pid_ns_processes).
 * The init is confined exactly like the skill.
 *
 * Everything here is plain system calls on the plan's values; every choice
 * was made by the supervisor's compilers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

/* agent/launch/init_wire.py FORMAT: a plan of another layout is refused. */
#define WIRE_FORMAT 1
#define FLAG_STDIO 1     /* the first three fds passed are the skill's stdio */
#define FLAG_NETWORK 2   /* wait for the supervisor to set up our netns */
#define FLAG_LANDLOCK 4  /* a Landlock section follows the rlimits */

#define SETUP_FAILED 125
#define EXEC_FAILED 127
#define MAX_MESSAGE (1 << 20)
#define MAX_FDS 64

/* include/uapi/linux/landlock.h, by value: the build host's headers may be
 * older than the running kernel's ABI. */
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#define CLONE_INTO_CGROUP_FLAG 0x200000000ULL
/* struct clone_args (include/uapi/linux/sched.h), CLONE_ARGS_SIZE_VER2 */
struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};
#define MAX_IDMAPS 16
#define LANDLOCK_VERSION_FLAG 1
#define LANDLOCK_RULE_PATH_BENEATH 1
#define LANDLOCK_RULE_NET_PORT 2
#define LANDLOCK_ACCESS_NET_CONNECT_TCP (1ULL << 1)
/* landlock_restrict_self(2) flag, ABI 7: keep logging denials after the
 * next execve (security/landlock/audit.c checks cred->domain_exec). */
#define LANDLOCK_LOG_NEW_EXEC_ON (1U << 1)
#define LANDLOCK_AUDIT_ABI 7

struct ruleset_attr { uint64_t fs, net, scoped; };
struct path_beneath_attr { uint64_t allowed; int32_t parent_fd; } __attribute__((packed));
struct net_port_attr { uint64_t allowed, port; };

static int sock_fd = -1, err_fd = -1, cgroup_fd = -1;
/* The idmapping user namespaces the launcher made; the plan names them
 * with fd index -2 - N. */
static int idmap_fds[MAX_IDMAPS];
static int nidmaps;
static int launcher_gate = -1;  /* read end of a pipe: EOF once the launcher is gone */

/* ------------------------------------------------------------ failures */

static void fail(const char *layer, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 2, 3)));

static void report(const char *layer, const char *reason)
{
    char buf[4096];
    size_t lsize = strlen(layer) + 1;
    size_t rsize = strnlen(reason, sizeof buf - lsize);
    memcpy(buf, layer, lsize);
    memcpy(buf + lsize, reason, rsize);
    if (write(err_fd, buf, lsize + rsize) < 0) {
        /* the supervisor is gone; nothing to tell */
    }
}

static void fail(const char *layer, const char *fmt, ...)
{
    char reason[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    report(layer, reason);
    _exit(SETUP_FAILED);
}

/* ------------------------------------------------------------ signals */

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define NFORWARDED (sizeof forwarded / sizeof forwarded[0])
static volatile sig_atomic_t skill_pid;
static volatile sig_atomic_t pending; /* bit per signal that came before the skill */

static void forward(int signum)
{
    if (skill_pid > 0)
        kill(skill_pid, signum);
    else
        pending |= 1 << signum;
}

static void forwarded_set(sigset_t *set)
{
    sigemptyset(set);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaddset(set, forwarded[i]);
}

/* ------------------------------------------------------------ the plan */

struct reader { const uint8_t *p, *end; };

static uint64_t get_u64(struct reader *r)
{
    uint64_t v;
    if (r->end - r->p < 8)
        fail("launch", "the plan message is truncated");
    memcpy(&v, r->p, 8);
    r->p += 8;
    return v;
}

/* An fd the plan names: index >= 0, one passed with it; -1 none; -2 - N,
 * the Nth user namespace the launcher made. */
static int get_fd(struct reader *r, const int *fds, int nfds)
{
    int64_t v = (int64_t)get_u64(r);
    if (v >= 0 && v < nfds)
        return fds[v];
    if (v == -1)
        return -1;
    if (v <= -2 && -2 - v < nidmaps)
        return idmap_fds[-2 - v];
    fail("launch", "the plan names fd %lld of %d passed and %d made", (long long)v, nfds, nidmaps);
}

static const uint8_t *get_bytes(struct reader *r, uint64_t *size)
{
    *size = get_u64(r);
    if ((uint64_t)(r->end - r->p) < *size)
        fail("launch", "the plan message is truncated");
    const uint8_t *start = r->p;
    r->p += *size;
    return start;
}

/* A string is sent with its NUL; one with another NUL inside is refused. */
static const char *get_str(struct reader *r)
{
    uint64_t size;
    const char *s = (const char *)get_bytes(r, &size);
    if (size == 0 || s[size - 1] != '\0' || strlen(s) != size - 1)
        fail("launch", "the plan holds a malformed string");
    return s;
}

static char **get_strs(struct reader *r)
{
    uint64_t n = get_u64(r);
    if (n > MAX_MESSAGE / 8)
        fail("launch", "the plan holds a malformed list");
    char **list = calloc(n + 1, sizeof *list);
    if (!list)
        fail("launch", "out of memory");
    for (uint64_t i = 0; i < n; i++)
        list[i] = (char *)get_str(r);
    return list;
}

struct bind { const char *path, *origin; int writable, userns_fd, tree_fd; };
struct rule { const char *path, *origin, *names; uint64_t bits; };

struct plan {
    uint64_t flags;
    const char *executable, *cwd, *hostname;
    char **argv, **env;
    uint64_t uid, gid, tmp_size;
    const char *resolv_source, *resolv_target;
    size_t nbinds;
    struct bind *binds;
    size_t nrlimits;
    uint64_t (*rlimits)[3];
    uint64_t ll_abi, ll_fs, ll_net, ll_scoped;
    size_t nrules, nports;
    struct rule *rules;
    uint64_t *ports;
    const uint8_t *bpf;
    uint64_t bpf_size;
    int exec_fd;
};

static void *array(uint64_t n, size_t size)
{
    if (n > MAX_MESSAGE / 8)
        fail("launch", "the plan holds a malformed list");
    void *a = calloc(n ? n : 1, size);
    if (!a)
        fail("launch", "out of memory");
    return a;
}

static void read_plan(struct reader *r, struct plan *plan, const int *fds, int nfds)
{
    if (get_u64(r) != WIRE_FORMAT)
        fail("launch", "this skillguard-init reads plan format %d and the supervisor sent "
                       "another: rebuild it (sudo make setup)", WIRE_FORMAT);
    plan->flags = get_u64(r);
    plan->executable = get_str(r);
    plan->argv = get_strs(r);
    plan->env = get_strs(r);
    plan->cwd = get_str(r);
    plan->hostname = get_str(r);
    plan->uid = get_u64(r);
    plan->gid = get_u64(r);

    plan->tmp_size = get_u64(r);
    plan->resolv_source = get_str(r);
    plan->resolv_target = get_str(r);
    plan->nbinds = get_u64(r);
    plan->binds = array(plan->nbinds, sizeof *plan->binds);
    for (size_t i = 0; i < plan->nbinds; i++) {
        struct bind *b = &plan->binds[i];
        b->path = get_str(r);
        b->writable = get_u64(r) != 0;
        b->origin = get_str(r);
        b->userns_fd = get_fd(r, fds, nfds);
    }

    plan->nrlimits = get_u64(r);
    plan->rlimits = array(plan->nrlimits, sizeof *plan->rlimits);
    for (size_t i = 0; i < plan->nrlimits; i++)
        for (int k = 0; k < 3; k++)
            plan->rlimits[i][k] = get_u64(r);

    if (plan->flags & FLAG_LANDLOCK) {
        plan->ll_abi = get_u64(r);
        plan->ll_fs = get_u64(r);
        plan->ll_net = get_u64(r);
        plan->ll_scoped = get_u64(r);
        plan->nrules = get_u64(r);
        plan->rules = array(plan->nrules, sizeof *plan->rules);
        for (size_t i = 0; i < plan->nrules; i++) {
            plan->rules[i].path = get_str(r);  /* "": the pinned entrypoint's fd */
            plan->rules[i].bits = get_u64(r);
            plan->rules[i].origin = get_str(r);
            plan->rules[i].names = get_str(r);
        }
        plan->nports = get_u64(r);
        plan->ports = array(plan->nports, sizeof *plan->ports);
        for (size_t i = 0; i < plan->nports; i++)
            plan->ports[i] = get_u64(r);
    }
    plan->bpf = get_bytes(r, &plan->bpf_size);
    plan->exec_fd = get_fd(r, fds, nfds);
    if (r->p != r->end)
        fail("launch", "the plan message has %zd bytes past its end", (ssize_t)(r->end - r->p));
}

/* The plan and its fds (SCM_RIGHTS, close-on-exec). With FLAG_STDIO the
 * first three are the skill's stdio, put on 0..2 (inheritable). */
static void receive_plan(struct plan *plan)
{
    static uint8_t message[MAX_MESSAGE];
    union { struct cmsghdr align; char buf[CMSG_SPACE(MAX_FDS * sizeof(int))]; } control;
    struct iovec iov = {message, sizeof message};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t size;
    do
        size = recvmsg(sock_fd, &msg, MSG_CMSG_CLOEXEC);
    while (size < 0 && errno == EINTR);
    if (size <= 0)
        fail("launch", "the supervisor did not send the plan%s%s",
             size < 0 ? ": " : "", size < 0 ? strerror(errno) : "");
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
        fail("launch", "the plan message or its fds were truncated");
    int fds[MAX_FDS], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        if (nfds + n > MAX_FDS)
            fail("launch", "too many fds with the plan");
        memcpy(fds + nfds, CMSG_DATA(c), n * sizeof(int));
        nfds += n;
    }
    struct reader r = {message, message + size};
    read_plan(&r, plan, fds, nfds);
    if (plan->flags & FLAG_STDIO) {
        if (nfds < 3)
            fail("launch", "the plan came without the skill's stdio");
        for (int i = 0; i < 3; i++)
            if (dup2(fds[i], i) < 0)
                fail("launch", "stdio: dup2: %s", strerror(errno));
        for (int i = 0; i < 3; i++)
            if (fds[i] > 2)
                close(fds[i]);
    }
}

/* ------------------------------------------------------------ mounts */

#define MOUNT_FAIL(...) fail("mount", "mount namespace: " __VA_ARGS__)

static int clone_tree(const char *path, int writable, int userns_fd, const char *origin)
{
    int fd = open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (fd < 0)
        MOUNT_FAIL("%s: cannot clone %s: %s", origin, path, strerror(errno));
    struct mount_attr attr = {
        .attr_set = MOUNT_ATTR_NOSUID | (writable ? 0 : MOUNT_ATTR_RDONLY),
        .attr_clr = writable ? MOUNT_ATTR_RDONLY : 0,
    };
    if (userns_fd >= 0) {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = (uint64_t)userns_fd;
    }
    if (mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) < 0)
        MOUNT_FAIL("%s: mount_setattr on %s: %s%s", origin, path, strerror(errno),
                   userns_fd >= 0 && errno == EINVAL
                       ? " (filesystem does not support idmapped mounts)" : "");
    return fd;
}

static int under_tmp(const char *path)
{
    return strncmp(path, "/tmp", 4) == 0 && (path[4] == '\0' || path[4] == '/');
}

/* mkdir -p of every parent of `path` (0755), then `path` itself: a directory,
 * or an empty file to mount a file over. */
static void make_mountpoint(const char *path, int is_dir, const char *origin)
{
    char buf[4096];
    if (strlen(path) >= sizeof buf)
        MOUNT_FAIL("%s: path too long", origin);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            MOUNT_FAIL("%s: attaching %s: mkdir %s: %s", origin, path, buf, strerror(errno));
        *p = '/';
    }
    if (is_dir) {
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            MOUNT_FAIL("%s: attaching %s: %s", origin, path, strerror(errno));
    } else {
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0)
            MOUNT_FAIL("%s: attaching %s: %s", origin, path, strerror(errno));
        close(fd);
    }
}

/* The skill's view (agent/launch/mounts.py has the why of each step):
 * private propagation, the grants cloned before anything covers them (in
 * the order sent: outer paths first), the whole tree read-only and nosuid,
 * a fresh /tmp and /proc, then the clones attached at their own paths. */
static void setup_mounts(struct plan *plan)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        MOUNT_FAIL("making / private: %s", strerror(errno));
    for (size_t i = 0; i < plan->nbinds; i++) {
        struct bind *b = &plan->binds[i];
        b->tree_fd = clone_tree(b->path, b->writable, b->userns_fd, b->origin);
    }
    int resolv_fd = -1;
    if (*plan->resolv_source)
        resolv_fd = clone_tree(plan->resolv_source, 0, -1, "resolv.conf");
    struct mount_attr ro = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID};
    if (mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &ro, sizeof ro) < 0)
        MOUNT_FAIL("read-only root: mount_setattr: %s", strerror(errno));
    char options[128];
    int n = snprintf(options, sizeof options, "mode=0700,uid=%llu,gid=%llu",
                     (unsigned long long)plan->uid, (unsigned long long)plan->gid);
    if (plan->tmp_size)
        snprintf(options + n, sizeof options - n, ",size=%llu", (unsigned long long)plan->tmp_size);
    if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options) < 0)
        MOUNT_FAIL("private /tmp: mount tmpfs: %s", strerror(errno));
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        MOUNT_FAIL("/proc: mount procfs: %s", strerror(errno));
    for (size_t i = 0; i < plan->nbinds; i++) {
        struct bind *b = &plan->binds[i];
        if (under_tmp(b->path)) {
            struct stat st;
            if (fstat(b->tree_fd, &st) < 0)
                MOUNT_FAIL("%s: attaching %s: %s", b->origin, b->path, strerror(errno));
            make_mountpoint(b->path, S_ISDIR(st.st_mode), b->origin);
        }
        if (move_mount(b->tree_fd, "", AT_FDCWD, b->path, MOVE_MOUNT_F_EMPTY_PATH) < 0)
            MOUNT_FAIL("%s: attaching %s: %s", b->origin, b->path, strerror(errno));
        close(b->tree_fd);
    }
    for (size_t i = 0; i < plan->nbinds; i++) {  /* binds may share a user namespace's fd */
        int fd = plan->binds[i].userns_fd;
        if (fd < 0)
            continue;
        close(fd);
        for (size_t k = i; k < plan->nbinds; k++)
            if (plan->binds[k].userns_fd == fd)
                plan->binds[k].userns_fd = -1;
    }
    if (resolv_fd >= 0) {
        /* move_mount(2) does not follow a symlink in the target's last
         * component: the supervisor sent the file /etc/resolv.conf names. */
        if (move_mount(resolv_fd, "", AT_FDCWD, plan->resolv_target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
            MOUNT_FAIL("resolv.conf: attaching %s: %s", plan->resolv_target, strerror(errno));
        close(resolv_fd);
    }
}

/* ------------------------------------------------------------ the rest */

static void wait_for_network(void)
{
    /* The supervisor answers "go" once veth, routes, nftables and the DNS
     * stub are in place (agent/launch/netns.py); if it fails it kills us. */
    char answer[16];
    ssize_t n;
    do
        n = recv(sock_fd, answer, sizeof answer, 0);
    while (n < 0 && errno == EINTR);
    if (n != 2 || memcmp(answer, "go", 2) != 0)
        fail("network", "the supervisor did not finish the network namespace set-up");
}

static void loopback_up(void)
{
    /* A new network namespace has only `lo`, and it is down (network_namespaces(7)). */
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq req;
    memset(&req, 0, sizeof req);
    strcpy(req.ifr_name, "lo");
    if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &req) < 0)
        fail("network", "loopback: %s", strerror(errno));
    req.ifr_flags |= IFF_UP;
    if (ioctl(fd, SIOCSIFFLAGS, &req) < 0)
        fail("network", "loopback up: %s", strerror(errno));
    close(fd);
}

static void drop_identity(uid_t uid, gid_t gid)
{
    /* Empty the bounding set while CAP_SETPCAP is still ours, so nothing the
     * skill executes can regain a capability; clear the ambient set; then
     * switch ids. setresuid from 0 to non-zero clears the permitted and
     * effective sets (no SECBIT_KEEP_CAPS; capabilities(7)). */
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            fail("identity", "dropping capability %d from the bounding set: %s", cap, strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        fail("identity", "clearing ambient capabilities: %s", strerror(errno));
    if (setgroups(0, NULL) < 0)
        fail("identity", "setgroups: %s", strerror(errno));
    if (setresgid(gid, gid, gid) < 0)
        fail("identity", "setresgid %u: %s", gid, strerror(errno));
    if (setresuid(uid, uid, uid) < 0)
        fail("identity", "setresuid %u: %s", uid, strerror(errno));
    if (setresuid(0, 0, 0) == 0)
        fail("identity", "could regain uid 0 after dropping it");
    uid_t r, e, s;
    gid_t gr, ge, gs;
    if (getresuid(&r, &e, &s) < 0 || r != uid || e != uid || s != uid
        || getresgid(&gr, &ge, &gs) < 0 || gr != gid || ge != gid || gs != gid
        || getgroups(0, NULL) != 0)
        fail("identity", "ids did not change as asked");
}

static void rearm_parent_death(void)
{
    /* Changing ids clears the parent-death signal (commit_creds(),
     * kernel/cred.c): set it again. getppid() is 0 for a namespace's init,
     * so our socket tells whether the supervisor died before this call. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        fail("identity", "PR_SET_PDEATHSIG: %s", strerror(errno));
    struct pollfd p = {.fd = sock_fd, .events = POLLIN};
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR)))
        fail("identity", "the supervisor is gone");
}

static void landlock(struct plan *plan)
{
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_VERSION_FLAG);
    if (abi < 0)
        fail("landlock", "landlock: unsupported: %s", errno == ENOSYS
             ? "kernel has no Landlock (ENOSYS)"
             : errno == EOPNOTSUPP ? "Landlock disabled at boot (EOPNOTSUPP; check lsm=)"
             : strerror(errno));
    if ((uint64_t)abi != plan->ll_abi)
        /* Stored plans are keyed by the kernel release (plan_cache.py): an
         * ABI other than the plan's is never a guess to make here. */
        fail("landlock", "Landlock ABI is %ld, the plan was made for %llu", abi,
             (unsigned long long)plan->ll_abi);
    struct ruleset_attr attr = {plan->ll_fs, plan->ll_net, plan->ll_scoped};
    /* Only the fields this ABI knows: the kernel refuses non-zero bytes past
     * them (E2BIG); handled_access_net came with ABI 4, scoped with 6. */
    size_t attr_size = abi >= 6 ? 24 : abi >= 4 ? 16 : 8;
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, attr_size, 0);
    if (ruleset < 0)
        fail("landlock", "landlock: create_ruleset (ABI %ld): %s", abi, strerror(errno));
    for (size_t i = 0; i < plan->nrules; i++) {
        struct rule *rule = &plan->rules[i];
        char pinned[64];
        const char *path = rule->path;
        if (!*path) {
            if (plan->exec_fd < 0)
                fail("landlock", "landlock: a rule for the pinned entrypoint, and no entrypoint fd");
            snprintf(pinned, sizeof pinned, "/proc/self/fd/%d", plan->exec_fd);
            path = pinned;
        }
        int fd = open(path, O_PATH | O_CLOEXEC);
        if (fd < 0)
            fail("landlock", "landlock: rule %s (%s): cannot open: %s", path, rule->origin,
                 strerror(errno));
        struct path_beneath_attr beneath = {rule->bits, fd};
        if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &beneath, 0) < 0)
            /* EINVAL: a directory-only right on a file, or a right the
             * ruleset does not handle (landlock_add_rule(2)). */
            fail("landlock", "landlock: rule %s (%s) %s: add_rule: %s %s", path, rule->origin,
                 rule->names, strerrorname_np(errno) ? strerrorname_np(errno) : "?", strerror(errno));
        close(fd);
    }
    if (plan->ll_net & LANDLOCK_ACCESS_NET_CONNECT_TCP)
        for (size_t i = 0; i < plan->nports; i++) {
            struct net_port_attr port = {LANDLOCK_ACCESS_NET_CONNECT_TCP, plan->ports[i]};
            if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_NET_PORT, &port, 0) < 0)
                fail("landlock", "landlock: rule connect_tcp port %llu: add_rule: %s",
                     (unsigned long long)plan->ports[i], strerror(errno));
        }
    unsigned flags = abi >= LANDLOCK_AUDIT_ABI ? LANDLOCK_LOG_NEW_EXEC_ON : 0;
    if (syscall(SYS_landlock_restrict_self, ruleset, flags) < 0)
        fail("landlock", "landlock: restrict_self: %s%s", strerror(errno),
             errno == EPERM ? " (set no_new_privs first)" : "");
    close(ruleset);
}

/* Install the filter with a user-notification listener and hand the
 * listener to the supervisor, which answers every denied call. */
static void seccomp_filter(struct plan *plan)
{
    if (plan->bpf_size == 0 || plan->bpf_size % sizeof(struct sock_filter)
        || plan->bpf_size / sizeof(struct sock_filter) > BPF_MAXINSNS)
        fail("seccomp", "program of %llu bytes is not 1..%d 8-byte instructions",
             (unsigned long long)plan->bpf_size, BPF_MAXINSNS);
    /* A copy: the message buffer has no alignment for struct sock_filter. */
    struct sock_filter *insns = malloc(plan->bpf_size);
    if (!insns)
        fail("seccomp", "out of memory");
    memcpy(insns, plan->bpf, plan->bpf_size);
    struct sock_fprog prog = {(unsigned short)(plan->bpf_size / sizeof *insns), insns};
    int listener = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (listener < 0) {
        const char *why = errno == EINVAL ? "the kernel rejected the program or a flag"
            : errno == EACCES ? "no_new_privs is not set and the caller lacks CAP_SYS_ADMIN"
            : errno == EBUSY ? "another filter in this process already has a listener"
            : errno == ENOMEM ? "filter too large for the kernel's limit" : strerror(errno);
        fail("seccomp", "seccomp: cannot install filter: %s", why);
    }
    free(insns);
    char tag[] = "listener";
    struct iovec iov = {tag, sizeof tag - 1};
    union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &listener, sizeof(int));
    if (sendmsg(sock_fd, &msg, 0) < 0)
        fail("seccomp", "sending the listener to the supervisor: %s", strerror(errno));
    close(listener);
}

static void exec_skill(struct plan *plan)
{
    close(sock_fd);
    /* Every disposition back to its default, since execve keeps SIG_IGN:
     * ours, what the supervisor ignored (Python ignores SIGPIPE), and
     * glibc's two internal signals, which posix_spawn(3) ignores in the
     * child (sysdeps/unix/sysv/linux/spawni.c) and glibc's sigaction refuses
     * to touch: hence the raw rt_sigaction(2). */
    struct { void *handler; unsigned long flags; void *restorer; uint64_t mask; } dfl = {SIG_DFL, 0, NULL, 0};
    for (int signum = 1; signum <= 64; signum++)
        if (signum != SIGKILL && signum != SIGSTOP)
            syscall(SYS_rt_sigaction, signum, &dfl, NULL, sizeof dfl.mask);
    /* A signal the init forwarded before we got here acts now, with its
     * default action, and the skill never starts. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (plan->exec_fd >= 0)
        /* The inode behind the fd, whatever its path names now (execveat(2)). */
        syscall(SYS_execveat, plan->exec_fd, "", plan->argv, plan->env, AT_EMPTY_PATH);
    else
        execve(plan->executable, plan->argv, plan->env);
    char reason[4096];
    snprintf(reason, sizeof reason, "%s: %s", plan->executable, strerror(errno));
    report("exec", reason);
    _exit(EXEC_FAILED);
}

static int init_loop(pid_t main_pid)
{
    /* Keep no copy of the caller's terminal or pipes: the skill's reader
     * should see EOF when the skill closes them. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        for (int fd = 0; fd < 3; fd++)
            dup2(null, fd);
        close(null);
    }
    int status = 0;
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break;  /* ECHILD */
        }
        if (pid == main_pid) {
            status = st;
            break;
        }
    }
    if (send(sock_fd, &status, sizeof status, MSG_NOSIGNAL) < 0) {
        /* the supervisor is gone */
    }
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return WIFEXITED(status) ? WEXITSTATUS(status) : SETUP_FAILED;
}

static int compare_ints(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

/* Only what the supervisor meant to pass: 0..2, the socket, the pipe, the
 * cgroup directory. */
static void close_other_fds(void)
{
    int keep[3] = {sock_fd, err_fd, cgroup_fd};
    qsort(keep, 3, sizeof keep[0], compare_ints);
    unsigned next = 3;
    for (int i = 0; i < 3; i++) {
        if (keep[i] < (int)next)
            continue;
        if ((unsigned)keep[i] > next)
            syscall(SYS_close_range, next, (unsigned)keep[i] - 1, 0);
        next = (unsigned)keep[i] + 1;
    }
    syscall(SYS_close_range, next, ~0U, 0);
}

static void wait_for_launcher(void)
{
    char byte;
    while (read(launcher_gate, &byte, 1) < 0 && errno == EINTR)
        ;
    close(launcher_gate);
}

static int parse_fd(const char *text)
{
    char *end;
    long fd = strtol(text, &end, 10);
    return (*text && !*end && fd > 2 && fd < 65536) ? (int)fd : -1;
}

static void write_file(const char *path, const char *data, const char *layer, const char *what)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    size_t size = strlen(data);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size)
        fail(layer, "%s %s: %s", what, path, strerror(errno));
    close(fd);
}

/* A user namespace mapping OWNER_UID/GID (on disk) to the skill's UID/GID,
 * kept by an fd: a child is cloned into a new one and exits at once; its
 * maps are written while it is a zombie, which keeps its credentials (and
 * so the namespace) until it is reaped (kernel/user_namespace.c; release_task()). */
static int make_idmap(const char *spec)
{
    unsigned long owner_uid, owner_gid, uid, gid;
    char tail;
    if (sscanf(spec, "%lu:%lu:%lu:%lu%c", &owner_uid, &owner_gid, &uid, &gid, &tail) != 4)
        fail("launch", "bad idmap argument %s", spec);
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid < 0)
        fail("mount", "mount namespace: idmap: cannot create a user namespace: %s", strerror(errno));
    if (pid == 0)
        syscall(SYS_exit, 0);
    char path[64], line[64];
    int fd;
    snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
    snprintf(line, sizeof line, "%lu %lu 1\n", owner_uid, uid);
    write_file(path, line, "mount", "mount namespace: idmap: writing");
    snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
    snprintf(line, sizeof line, "%lu %lu 1\n", owner_gid, gid);
    write_file(path, line, "mount", "mount namespace: idmap: writing");
    snprintf(path, sizeof path, "/proc/%d/ns/user", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("mount", "mount namespace: idmap: %s: %s", path, strerror(errno));
    waitpid(pid, NULL, 0);
    return fd;
}

/* The init: a child of the supervisor (CLONE_PARENT) in a new PID namespace,
 * started in the skill's v2 cgroup where clone3 can (CLONE_INTO_CGROUP: no
 * move by pid, so no wait on cgroup_threadgroup_rwsem). Returns 0 in the
 * init; in the launcher, after telling the supervisor the init's pid, exits. */
static int clone_init(void)
{
    /* The pid message must be the first thing the supervisor reads on the
     * socket: the init sends nothing before the launcher has exited
     * (wait_for_launcher), which closes the gate's write end. */
    int gate[2];
    if (pipe2(gate, O_CLOEXEC) < 0)
        fail("launch", "pipe: %s", strerror(errno));
    struct clone_args_v2 args = {.flags = CLONE_NEWPID | CLONE_PARENT};
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP_FLAG;
        args.cgroup = (uint64_t)cgroup_fd;
    }
    /* exit_signal stays 0: with CLONE_PARENT the init's is the launcher's
     * own (SIGCHLD from posix_spawn), and clone3 refuses another. */
    long pid = syscall(SYS_clone3, &args, sizeof args);
    int in_cgroup = cgroup_fd >= 0;
    if (pid < 0 && errno == ENOSYS) {  /* before Linux 5.7 */
        pid = syscall(SYS_clone, CLONE_NEWPID | CLONE_PARENT, NULL, NULL, NULL, NULL);
        in_cgroup = 0;
    }
    if (pid < 0)
        fail("namespaces", "clone3(CLONE_NEWPID%s): %s", cgroup_fd >= 0 ? "|CLONE_INTO_CGROUP" : "",
             strerror(errno));
    if (pid == 0) {
        close(gate[1]);
        launcher_gate = gate[0];
        return in_cgroup;
    }
    char message[7] = "pid";
    int32_t value = (int32_t)pid;
    memcpy(message + 3, &value, 4);
    if (send(sock_fd, message, sizeof message, MSG_NOSIGNAL) != sizeof message) {
        kill((pid_t)pid, SIGKILL);
        fail("launch", "telling the supervisor the init's pid: %s", strerror(errno));
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 4 || (sock_fd = parse_fd(argv[1])) < 0 || (err_fd = parse_fd(argv[2])) < 0
        || sock_fd == err_fd
        || ((cgroup_fd = parse_fd(argv[3])) < 0 && strcmp(argv[3], "-1") != 0)
        || cgroup_fd == sock_fd || cgroup_fd == err_fd) {
        static const char usage[] =
            "skillguard-init: started by the skillguard supervisor only (SOCK_FD ERR_FD CGROUP_FD "
            "[idmap=OWNER_UID:OWNER_GID:UID:GID ...] [tasks=FILE ...] [procs=FILE])\n";
        if (write(2, usage, sizeof usage - 1) < 0) {
            /* nowhere to say it */
        }
        return 2;
    }
    fcntl(sock_fd, F_SETFD, FD_CLOEXEC);
    fcntl(err_fd, F_SETFD, FD_CLOEXEC);
    close_other_fds();
    for (int i = 4; i < argc; i++)
        if (strncmp(argv[i], "idmap=", 6) == 0) {
            if (nidmaps == MAX_IDMAPS)
                fail("launch", "more than %d idmapped owners", MAX_IDMAPS);
            idmap_fds[nidmaps++] = make_idmap(argv[i] + 6);
        }

    int in_cgroup = clone_init();
    if (cgroup_fd >= 0)
        close(cgroup_fd);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);

    /* posix_spawn started us with the forwarded signals blocked: as PID 1
     * with no handler we would discard them (pid_namespaces(7)); blocked,
     * they wait (kernel/signal.c sig_ignored). Held until the skill exists. */
    struct sigaction action = {.sa_handler = forward, .sa_flags = SA_RESTART};
    sigset_t set;
    forwarded_set(&set);
    action.sa_mask = set;
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaction(forwarded[i], &action, NULL);
    sigprocmask(SIG_UNBLOCK, &set, NULL);

    /* "0": the writer itself. Into v1 `tasks`, only the calling thread
     * moves, without cgroup_threadgroup_rwsem's write side (kernel/cgroup/
     * cgroup.c cgroup_procs_write_start); we have one thread. */
    for (int i = 4; i < argc; i++)
        if (strncmp(argv[i], "tasks=", 6) == 0 || (!in_cgroup && strncmp(argv[i], "procs=", 6) == 0))
            write_file(argv[i] + 6, "0", "cgroup", "moving the launcher into");
    /* The cgroup namespace's root is the cgroup joined above: the skill sees "/". */
    if (unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP) < 0)
        fail("namespaces", "unshare: %s", strerror(errno));
    setsid();  /* no controlling terminal: nothing to TIOCSTI into */

    struct plan plan;
    memset(&plan, 0, sizeof plan);
    receive_plan(&plan);
    wait_for_launcher();
    if (plan.flags & FLAG_NETWORK)  /* the supervisor may now enter our netns */
        if (send(sock_fd, "netns", 5, MSG_NOSIGNAL) != 5)
            fail("network", "telling the supervisor: %s", strerror(errno));
    setup_mounts(&plan);
    if (plan.flags & FLAG_NETWORK)
        wait_for_network();
    loopback_up();
    if (sethostname(plan.hostname, strlen(plan.hostname)) < 0)
        fail("uts", "sethostname %s: %s", plan.hostname, strerror(errno));
    for (size_t i = 0; i < plan.nrlimits; i++) {
        struct rlimit64 limit = {plan.rlimits[i][1], plan.rlimits[i][2]};
        if (prlimit64(0, (int)plan.rlimits[i][0], &limit, NULL) < 0)
            fail("rlimits", "resource %llu: %s", (unsigned long long)plan.rlimits[i][0],
                 strerror(errno));
    }
    drop_identity((uid_t)plan.uid, (gid_t)plan.gid);
    rearm_parent_death();
    if (chdir(plan.cwd) < 0)
        fail("cwd", "%s: %s", plan.cwd, strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail("no_new_privs", "%s", strerror(errno));
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);  /* /proc/1/... stays closed to the skill */
    if (plan.flags & FLAG_LANDLOCK)
        landlock(&plan);
    seccomp_filter(&plan);

    sigprocmask(SIG_BLOCK, &set, NULL);
    pid_t pid = fork();
    if (pid < 0)
        fail("exec", "fork: %s", strerror(errno));
    if (pid == 0)
        exec_skill(&plan);
    skill_pid = pid;
    for (size_t i = 0; i < NFORWARDED; i++)  /* arrived during set-up: the skill gets them now */
        if (pending & (1 << forwarded[i]))
            kill(pid, forwarded[i]);
    pending = 0;
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    close(err_fd);
    return init_loop(pid);
}
