"""The seccomp compiler, checked by running its output in the BPF simulator."""
from __future__ import annotations

import errno
import random

import pytest

from agent.compile import bpf as B
from agent.compile import seccomp as S
from agent.manifest.model import HostPattern, Policy, SyscallOverrides, TcpPolicy, TcpRule

ALLOW = B.SECCOMP_RET_ALLOW
EPERM = B.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = B.SECCOMP_RET_ERRNO | errno.ENOSYS
KILL = B.SECCOMP_RET_KILL_PROCESS
ONES = (1 << 64) - 1

PLAIN = Policy(name="t", version="1")
NETWORKED = Policy(
    name="t", version="1",
    tcp=TcpPolicy(enabled=True, allowlist=(TcpRule(
        host=HostPattern(text="api.example.com", name="api.example.com"),
        port=443, text="api.example.com:443"),)),
)
AF_PACKET, AF_VSOCK, NETLINK_AUDIT = 17, 40, 9
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
CLONE_THREAD_FLAGS = 0x3D0F00  # glibc pthread_create's flags


@pytest.fixture(scope="module")
def profile():
    return S.load_base_profile()


@pytest.fixture(scope="module")
def plain():
    return S.compile_seccomp(PLAIN)


@pytest.fixture(scope="module")
def sim(plain):
    return B.Simulator(plain.bpf)


def nr(name: str) -> int:
    number = S.syscall_number(name)
    assert number >= 0, name
    return number


def call(sim, name, *args, arch=B.AUDIT_ARCH_X86_64):
    return sim(nr(name), arch=arch, args=tuple(args) + (0,) * (6 - len(args)))


# ----------------------------------------------------------- profile


def test_profile_lists_are_disjoint_and_known(profile):
    lists = [profile.allow, profile.conditional, profile.enosys, profile.always_deny]
    names = [n for lst in lists for n in lst]
    assert len(names) == len(set(names))
    assert all(S.known_syscall(n) for n in names)
    for must in ("io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace",
                 "process_vm_readv", "process_vm_writev", "bpf", "mount", "umount2",
                 "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
                 "mount_setattr", "pivot_root", "chroot", "unshare", "setns", "keyctl",
                 "add_key", "request_key", "perf_event_open", "userfaultfd", "kexec_load",
                 "kexec_file_load", "init_module", "finit_module", "delete_module", "acct",
                 "swapon", "swapoff", "reboot", "quotactl", "lookup_dcookie",
                 "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm",
                 "settimeofday", "clock_settime", "adjtimex", "vhangup", "nfsservctl",
                 "syslog"):
        assert must in S.always_denied(), must
    assert set(profile.conditional) == {"clone", "socket", "socketpair", "personality"}
    assert profile.enosys == ("clone3",)


def test_known_syscall():
    assert S.known_syscall("read") and S.known_syscall("io_uring_setup")
    assert not S.known_syscall("no_such_call") and not S.known_syscall("")
    assert not S.known_syscall("read; rm")


def test_profile_errors_name_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nallow: [read, nosuchcall]\nconditional: {}\n")
    with pytest.raises(S.ProfileError, match=r"p\.yaml.*nosuchcall"):
        S.load_base_profile(bad)
    bad.write_text("version: 1\nallow: [read]\nalways_deny: [read]\n")
    with pytest.raises(S.ProfileError, match="both allow and always_deny"):
        S.load_base_profile(bad)
    bad.write_text("version: 1\nallow: [read]\nconditional: {socket: x}\n")
    with pytest.raises(S.ProfileError, match="compiler checks arguments"):
        S.load_base_profile(bad)


# ----------------------------------------------------------- verdicts


def test_every_allowed_syscall_is_allowed(plain, sim, profile):
    assert plain.allowed == profile.allow
    for name in plain.allowed:
        assert call(sim, name) == ALLOW, name


def test_every_always_denied_syscall_is_denied(sim, profile):
    for name in profile.always_deny:
        assert call(sim, name) == EPERM, name


def test_unlisted_and_unknown_numbers_are_denied(sim, profile):
    listed = set(profile.allow) | set(profile.conditional) | set(profile.enosys)
    unlisted = [n for n in range(0, 470) if n not in {nr(x) for x in listed}]
    assert len(unlisted) > 60
    for number in unlisted:
        assert sim(number) == EPERM, number
    for number in (512, 1000, 0x3FFFFFFF, 0xFFFFFFFF):  # -1 is not an x32 number
        assert sim(number) == EPERM, hex(number)


def test_foreign_arch_and_x32_are_killed(sim):
    for arch in (B.AUDIT_ARCH_I386, 0xC00000B7, 0x4000003E):  # i386, aarch64, x32 audit arch
        assert sim(nr("getpid"), arch=arch) == KILL
    # x32 syscalls arrive as AUDIT_ARCH_X86_64 with bit 30 set in nr
    for name in ("read", "getpid", "ptrace", "socket"):
        assert call(sim, "read") == ALLOW
        assert sim(nr(name) | B.X32_SYSCALL_BIT) == KILL, name


def test_clone_namespace_flags_denied_plain_clone_allowed(sim):
    assert call(sim, "clone", SIGCHLD) == ALLOW
    assert call(sim, "clone", CLONE_THREAD_FLAGS) == ALLOW
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, CLONE_NEWUSER,
                 0x20000000, CLONE_NEWNET, 0x80):
        assert call(sim, "clone", SIGCHLD | flag) == EPERM, hex(flag)
    assert call(sim, "clone", CLONE_NEWUSER | 1 << 40) == EPERM


def test_clone3_answers_enosys(sim, plain):
    assert call(sim, "clone3") == ENOSYS
    assert plain.enosys == ("clone3",)


def test_socket_families_without_network(sim):
    assert call(sim, "socket", 1, 1) == ALLOW            # AF_UNIX
    assert call(sim, "socketpair", 1, 1) == ALLOW
    assert call(sim, "socket", 2, 1) == EPERM            # AF_INET
    assert call(sim, "socket", 10, 2) == EPERM           # AF_INET6
    assert call(sim, "socket", AF_PACKET, 3) == EPERM
    assert call(sim, "socket", AF_VSOCK, 1) == EPERM
    assert call(sim, "socketpair", 2, 1) == EPERM
    assert call(sim, "socket", 1 | 1 << 32, 1) == EPERM  # high garbage fails closed


def test_socket_families_with_network():
    art = S.compile_seccomp(NETWORKED)
    sim = B.Simulator(art.bpf)
    for family in (1, 2, 10):
        assert call(sim, "socket", family, 1) == ALLOW, family
    for family in (AF_PACKET, AF_VSOCK, 3, 38):
        assert call(sim, "socket", family, 1) == EPERM, family
    assert call(sim, "socketpair", 2, 1) == EPERM
    assert "AF_INET" in art.socket_families and "AF_INET" not in S.compile_seccomp(PLAIN).socket_families


def test_netlink_route_only(sim):
    assert call(sim, "socket", 16, 3, 0) == ALLOW               # NETLINK_ROUTE
    assert call(sim, "socket", 16, 3, NETLINK_AUDIT) == EPERM
    assert call(sim, "socket", 16, 3, 4) == EPERM               # NETLINK_SOCK_DIAG
    assert call(sim, "socket", 16, 3, 1 << 32) == EPERM


def test_ioctl_is_a_plain_allow_so_the_kernel_caches_it(sim):
    # TIOCSTI is refused by the kernel itself without a controlling tty
    # (launched skills run setsid()); checking it here cost ~100 filter
    # instructions on every terminal ioctl.
    for cmd in (0x5401, 0x541B, 0x5412, 0x541C, 0xFFFFFFFF, 0x5401 | 1 << 40):
        assert call(sim, "ioctl", 0, cmd) == ALLOW, hex(cmd)
        assert call(sim, "ioctl", 7, cmd, 1 << 63) == ALLOW, hex(cmd)


def test_personality_only_linux_and_query(sim):
    assert call(sim, "personality", 0) == ALLOW
    assert call(sim, "personality", 0xFFFFFFFF) == ALLOW
    assert call(sim, "personality", ONES) == ALLOW              # sign-extended query
    assert call(sim, "personality", 0x0040000) == EPERM         # ADDR_NO_RANDOMIZE
    assert call(sim, "personality", 8) == EPERM                 # PER_LINUX32


def test_allowed_syscalls_are_cache_friendly(plain, sim):
    """The kernel caches a constant verdict per syscall only when the filter
    does not look at the arguments (or ip); emulate its check."""
    for name in plain.allowed:
        number = nr(name)
        zero = sim(number, args=(0,) * 6, ip=0)
        ones = sim(number, args=(ONES,) * 6, ip=ONES)
        assert zero == ones == ALLOW, name


# ----------------------------------------------------------- actions


def test_notify_and_log_variants():
    notify = B.Simulator(S.compile_seccomp(PLAIN, deny_action="notify").bpf)
    log = B.Simulator(S.compile_seccomp(PLAIN, deny_action="log").bpf)
    for sim, deny in ((notify, B.SECCOMP_RET_USER_NOTIF), (log, B.SECCOMP_RET_LOG)):
        assert call(sim, "getpid") == ALLOW
        assert call(sim, "mbind") == deny                  # unlisted
        assert sim(600) == deny                            # unknown number
        assert call(sim, "socket", 2, 1) == deny           # AF_INET without a grant
        assert call(sim, "ptrace") == EPERM                # always_deny holds in every mode
        assert call(sim, "io_uring_setup") == EPERM
        assert call(sim, "clone3") == ENOSYS
        assert sim(nr("getpid"), arch=B.AUDIT_ARCH_I386) == KILL
    with pytest.raises(ValueError, match="deny_action"):
        S.compile_seccomp(PLAIN, deny_action="allow")


def test_deterministic():
    first = S.compile_seccomp(NETWORKED, deny_action="notify")
    second = S.compile_seccomp(NETWORKED, deny_action="notify")
    assert first.bpf == second.bpf and first.pfc == second.pfc
    assert first == second
    assert S.compile_seccomp(PLAIN).bpf != first.bpf


# ----------------------------------------------------------- overrides


def test_manifest_allow_and_deny():
    policy = Policy(name="t", version="1",
                    syscalls=SyscallOverrides(allow=("mbind",), deny=("getpid", "socket")))
    art = S.compile_seccomp(policy)
    sim = B.Simulator(art.bpf)
    assert call(sim, "mbind") == ALLOW and "mbind" in art.allowed
    assert call(sim, "getpid") == EPERM and "getpid" in art.denied
    assert call(sim, "socket", 1, 1) == EPERM and "socket" not in art.arg_checked
    assert call(sim, "getppid") == ALLOW


@pytest.mark.parametrize("name", ["ptrace", "io_uring_setup", "bpf", "unshare"])
def test_manifest_cannot_allow_always_denied(name):
    with pytest.raises(ValueError, match=f"'{name}' is always denied"):
        S.compile_seccomp(Policy(name="t", version="1", syscalls=SyscallOverrides(allow=(name,))))


@pytest.mark.parametrize("name", ["clone3", "socket", "personality"])
def test_manifest_cannot_lift_argument_checks(name):
    with pytest.raises(ValueError, match="argument-checked or answered ENOSYS"):
        S.compile_seccomp(Policy(name="t", version="1", syscalls=SyscallOverrides(allow=(name,))))


def test_manifest_unknown_syscall_rejected():
    with pytest.raises(ValueError, match="not an x86_64 syscall"):
        S.compile_seccomp(Policy(name="t", version="1", syscalls=SyscallOverrides(deny=("nope",))))


def test_summary_counts(plain):
    info = S.summary(plain)
    assert info["instructions"] * 8 == len(plain.bpf) == info["bytes"]
    assert info["allowed"] == len(plain.allowed) and info["arg_checked"] == 4
    assert info["deny_action"] == "errno"
    assert info["instructions"] <= 4096
    assert "ALLOW" in plain.pfc and "KILL_PROCESS" in plain.pfc
