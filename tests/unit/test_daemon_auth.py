"""Who may call what (agent/daemon/auth.py: the pure decision)."""
from agent.daemon.auth import MUTATING, READ_ONLY, Peer, decide, skill_cgroup_of

ROOT = Peer(pid=10, uid=0, gid=0, groups=())
MEMBER = Peer(pid=11, uid=1000, gid=1000, groups=(1000, 4242))
STRANGER = Peer(pid=12, uid=1001, gid=1001, groups=(1001,))


def test_root_may_call_everything():
    for method in MUTATING | READ_ONLY:
        assert decide(method, ROOT, None, None) is None


def test_group_members_may_call_everything():
    for method in MUTATING | READ_ONLY:
        assert decide(method, MEMBER, 4242, None) is None


def test_primary_group_counts():
    assert decide("register", Peer(1, 1000, 4242, ()), 4242, None) is None


def test_others_are_refused():
    assert "root only" in decide("status", STRANGER, None, None)
    assert "members of the socket group" in decide("register", STRANGER, 4242, None)


def test_a_skill_may_not_mutate_even_as_root():
    cgroup = "/skillguard/demo/r-1"
    for method in MUTATING:
        reason = decide(method, ROOT, None, cgroup)
        assert reason is not None and "skill cgroup" in reason and cgroup in reason
    for method in READ_ONLY:
        assert decide(method, ROOT, None, cgroup) is None


def test_skill_cgroup_detection():
    paths = ["/user.slice/session-1.scope", "/"]
    assert skill_cgroup_of(paths, "skillguard") is None
    assert skill_cgroup_of(["/skillguard/demo/run-5"], "skillguard") == "/skillguard/demo/run-5"
    assert skill_cgroup_of(["/system.slice/x", "/skillguard/a/b"], "skillguard") == "/skillguard/a/b"
    # The daemon's own unit is not a skill cgroup.
    assert skill_cgroup_of(["/system.slice/skillguard.service"], "skillguard") is None
    assert skill_cgroup_of(["/skillguard"], "skillguard") is None
    assert skill_cgroup_of(["/custom/place"], "skillguard", known=["/custom"]) == "/custom/place"
    assert skill_cgroup_of(["/customer"], "skillguard", known=["/custom"]) is None
