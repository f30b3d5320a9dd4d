"""End to end against a running daemon with `require_signed: true`: the
`invoke` authorization method (and `launch ... invoked_by`), and signed
packages for `launch` and `register`.

Policies in the policy directory (installed by the host's root) are admitted
as they are; inline manifests and packages must carry a signature by a key in
`trusted_keys`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from conftest import require
from sgdaemon import (DaemonProcess, collect_events, make_root, manifest_text, read_all, remove_root,
                      run_in_cgroup,
                      wait_for)


def invoke_block(can_invoke=(), can_be_invoked_by=()) -> str:
    return (f"invoke_policy:\n  can_invoke: {list(can_invoke)!r}\n"
            f"  can_be_invoked_by: {list(can_be_invoked_by)!r}\n")


# name -> (can_invoke, can_be_invoked_by)
POLICIES = {
    "web-fetch": (["fs-*"], []),
    "web-idle": ([], []),  # admits nobody as a callee
    "fs-reader": ([], ["web-*"]),
    "fs-locked": ([], []),
}


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    root = make_root()
    work = str(root / "work")
    for name, (out, into) in POLICIES.items():
        (root / "policies" / f"{name}.yaml").write_text(manifest_text(name, work, invoke_block(out, into)))
    from agent.package.sign import generate_keypair

    trusted = generate_keypair(str(root / "trusted"))
    untrusted = generate_keypair(str(root / "untrusted"))
    d = DaemonProcess(root, config_extra=f"require_signed: true\ntrusted_keys: [{trusted.public_path}]\n")
    d.keys = {"trusted": trusted.private_path, "untrusted": untrusted.private_path}
    try:
        d.start()
        yield d
    finally:
        d.stop()
        d.end_supervisors()
        d.unload_hooks()
        remove_root(root)


def make_package(daemon, name: str, sign_with: str | None = "trusted", extra: str = "") -> str:
    from agent.package.sign import sign_package

    path = daemon.root / f"pkg-{name}"
    path.mkdir()
    text = manifest_text(name, str(daemon.work), extra)
    # The manifest grants its own package directory, read-only, so the skill can run run.py.
    text = text.replace(f"      - {daemon.work}:rw\n", f"      - {daemon.work}:rw\n      - {path}:ro\n")
    (path / "manifest.yaml").write_text(text)
    (path / "run.py").write_text("print('signed package ran')\n")
    if sign_with:
        sign_package(str(path), daemon.keys[sign_with])
    return str(path)


def rpc_error(daemon, method: str, params: dict):
    from agent.client import RpcError

    with pytest.raises(RpcError) as info:
        daemon.call(method, params)
    return info.value


def live_ids(daemon) -> set[str]:
    return {s["id"] for s in daemon.call("list")["skills"]}


# ---------------------------------------------------------------- invoke


MATRIX = [
    # caller, callee, allowed, which side refuses
    ("web-fetch", "fs-reader", True, None),  # can_invoke fs-* admits, can_be_invoked_by web-* admits
    ("web-fetch", "fs-locked", False, "callee"),  # the callee admits nobody
    ("web-idle", "fs-reader", False, "caller"),  # the callee admits web-*, the caller lists nobody
    ("fs-reader", "web-idle", False, "both"),
]


def test_invoke_matrix_and_refusals_on_events(daemon):
    events = daemon.client()
    events.subscribe()
    before = daemon.metric("skillguard_violations_total", layer="invoke")
    for caller, callee, allowed, side in MATRIX:
        reply = daemon.call("invoke", {"caller": caller, "callee": callee})
        assert reply["allowed"] is allowed, (caller, callee, reply)
        assert reply["caller"]["skill"] == caller and reply["callee"]["skill"] == callee
        if allowed:
            assert reply["caller"]["rule"] == "fs-*" and reply["callee"]["rule"] == "web-*"
        else:
            assert (f"{caller}'s invoke_policy.can_invoke" in reply["reason"]) is (side in ("caller", "both"))
            assert (f"{callee}'s invoke_policy.can_be_invoked_by" in reply["reason"]) is (
                side in ("callee", "both"))
    refused = [(c, e) for c, e, allowed, _ in MATRIX if not allowed]
    seen = collect_events(events, lambda e: e["layer"] == "invoke", count=len(refused))
    events.close()
    assert [(e["skill"], e["operation"]) for e in seen] == [(c, f"invoke {e}") for c, e in refused]
    assert all(e["decision"] == "denied" and "does not admit" in e["rule"] for e in seen)
    # The allowed call recorded nothing; each refusal is counted once.
    assert daemon.metric("skillguard_violations_total", layer="invoke") == before + len(refused)
    assert daemon.metric("skillguard_violations_total", layer="invoke", skill="web-fetch") >= 1


def test_invoke_unknown_skill_and_bad_params_are_errors(daemon):
    before = daemon.metric("skillguard_violations_total", layer="invoke")
    error = rpc_error(daemon, "invoke", {"caller": "web-fetch", "callee": "no-such-skill"})
    assert error.code == -32002 and error.data == {"param": "callee", "value": "no-such-skill"}
    error = rpc_error(daemon, "invoke", {"caller": "l-0000000000000000", "callee": "fs-reader"})
    assert error.code == -32002 and error.data["param"] == "caller"
    assert rpc_error(daemon, "invoke", {"caller": "web-fetch"}).code == -32602
    assert rpc_error(daemon, "invoke", {"caller": 3, "callee": "fs-reader"}).code == -32602
    assert rpc_error(daemon, "invoke", {"caller": "web-fetch", "callee": "fs-reader", "x": 1}).code == -32602
    assert daemon.metric("skillguard_violations_total", layer="invoke") == before


def test_invoke_by_skill_id_and_the_launch_path(daemon):
    # A running skill (a signed package) as the caller, named by its id.
    package = make_package(daemon, "web-pkg", extra=invoke_block(["fs-reader", "fs-locked"], []))
    null = os.open("/dev/null", os.O_RDWR)
    try:
        reply = daemon.call("launch", {"package": package, "argv": ["/bin/sleep", "30"], "stdio": True},
                            fds=[null, null, null])
    finally:
        os.close(null)
    daemon.pids_seen.add(reply["supervisor_pid"])
    caller_id = reply["id"]
    try:
        assert daemon.call("invoke", {"caller": caller_id, "callee": "fs-reader"})["allowed"] is True
        refused = daemon.call("invoke", {"caller": caller_id, "callee": "fs-locked", "pid": reply["pid"]})
        assert refused["allowed"] is False and refused["caller"]["id"] == caller_id
        # Recorded on the caller: its id on the event, its recent violations.
        recent = daemon.call("inspect", {"id": caller_id})["recent_violations"]
        assert any(v["layer"] == "invoke" and v["operation"] == "invoke fs-locked"
                   and v["pid"] == reply["pid"] for v in recent)

        # launch ... invoked_by: started only when both manifests agree.
        events = daemon.client()
        events.subscribe("web-fetch")
        before = live_ids(daemon)
        error = rpc_error(daemon, "launch", {"skill": "fs-locked", "argv": ["/bin/true"],
                                             "invoked_by": "web-fetch"})
        assert error.code == -32001 and error.data == {"layer": "invoke", "caller": "web-fetch",
                                                       "callee": "fs-locked"}
        assert "can_be_invoked_by [] (nobody) does not admit 'web-fetch'" in error.message
        assert live_ids(daemon) == before  # nothing was started
        [event] = collect_events(events, lambda e: e["layer"] == "invoke")
        events.close()
        assert event["skill"] == "web-fetch" and event["operation"] == "invoke fs-locked"

        started = daemon.call("launch", {"skill": "fs-reader", "argv": ["/bin/true"],
                                         "invoked_by": caller_id})
        daemon.pids_seen.add(started["supervisor_pid"])
        assert daemon.call("wait", {"id": started["id"]})["exit_code"] == 0
    finally:
        daemon.call("signal", {"id": caller_id, "signal": "SIGKILL"})
        daemon.call("wait", {"id": caller_id, "timeout": 10})


# ---------------------------------------------------------------- require_signed


def test_signed_package_launches(daemon):
    package = make_package(daemon, "signed-launch")
    null = os.open("/dev/null", os.O_RDWR)
    r, w = os.pipe()
    try:
        reply = daemon.call("launch", {"package": package, "argv": ["/usr/bin/python3", f"{package}/run.py"],
                                       "stdio": True}, fds=[null, w, w])
    finally:
        os.close(null)
        os.close(w)
    daemon.pids_seen.add(reply["supervisor_pid"])
    result = daemon.call("wait", {"id": reply["id"]})
    output = read_all(r)
    assert result["exit_code"] == 0, output
    assert "signed package ran" in output
    assert daemon.call("inspect", {"id": reply["id"]})["source"] == package


def refused_packages(daemon, tag: str) -> list[tuple[str, str]]:
    """(reason, package path) for each way a package is refused."""
    unsigned = make_package(daemon, f"{tag}-unsigned", sign_with=None)
    untrusted = make_package(daemon, f"{tag}-untrusted", sign_with="untrusted")
    flipped = make_package(daemon, f"{tag}-flipped")
    with open(f"{flipped}/run.py", "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 1]))
    added = make_package(daemon, f"{tag}-added")
    (daemon.root / f"pkg-{tag}-added" / "extra.txt").write_text("added after signing")
    chmodded = make_package(daemon, f"{tag}-chmod")
    os.chmod(f"{chmodded}/run.py", 0o755)
    return [("unsigned", unsigned), ("untrusted-key", untrusted), ("tampered", flipped),
            ("tampered", added), ("tampered", chmodded)]


def test_launch_refuses_unsigned_tampered_untrusted_and_inline(daemon):
    before = live_ids(daemon)
    for reason, package in refused_packages(daemon, "launch"):
        error = rpc_error(daemon, "launch", {"package": package, "argv": ["/bin/true"]})
        assert error.code == -32009, (reason, error.message)
        assert error.data == {"reason": reason, "package": package}
        assert error.message.startswith(f"package: {reason}: ") and "nothing was changed" in error.message
    error = rpc_error(daemon, "launch", {"manifest": manifest_text("inline", str(daemon.work)),
                                         "argv": ["/bin/true"]})
    assert error.code == -32009 and error.data == {"reason": "unsigned"}
    assert "require_signed is true" in error.message
    error = rpc_error(daemon, "launch", {"package": str(daemon.root / "no-such-package"), "argv": ["/bin/true"]})
    assert error.code == -32009 and error.data["reason"] == "invalid-package"
    assert live_ids(daemon) == before
    assert not any(r["id"].startswith("l-") for r in daemon.registry_records() if r["id"] not in before)


class Sleeper:
    """A process started outside skillguard, to register."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.pid = self.proc.pid

    def cgroups(self) -> str:
        return open(f"/proc/{self.pid}/cgroup").read()

    def end(self):
        self.proc.kill()
        self.proc.wait()


def test_register_refuses_unsigned_tampered_untrusted_and_inline(daemon):
    target = Sleeper()
    try:
        cgroups = target.cgroups()
        for reason, package in refused_packages(daemon, "register"):
            error = rpc_error(daemon, "register", {"pids": [target.pid], "package": package})
            assert error.code == -32009 and error.data == {"reason": reason, "package": package}
        error = rpc_error(daemon, "register", {"pids": [target.pid],
                                               "manifest": manifest_text("inline", str(daemon.work))})
        assert error.code == -32009 and error.data == {"reason": "unsigned"}
        assert target.cgroups() == cgroups  # not moved
        assert not any(s["kind"] == "registered" for s in daemon.call("list")["skills"])
    finally:
        target.end()


def test_register_accepts_a_signed_skill_archive(daemon):
    require(daemon.call("status")["register"] == "available",
            f"register unavailable: {daemon.call('status')['register']}")
    from agent.package.sign import sign_package

    directory = make_package(daemon, "signed-register", sign_with=None)
    archive = str(daemon.root / "signed-register.skill")
    with tarfile.open(archive, "w") as tar:
        tar.add(directory, arcname="signed-register")
    sign_package(archive, daemon.keys["trusted"])
    target = Sleeper()
    try:
        reply = daemon.call("register", {"pids": [target.pid], "package": archive})
        assert reply["skill"] == "signed-register" and reply["pids"] == [target.pid]
        assert daemon.subtree in target.cgroups()
        assert daemon.call("inspect", {"id": reply["id"]})["source"] == archive
        daemon.call("unregister", {"id": reply["id"]})
        wait_for(lambda: daemon.subtree not in target.cgroups(), 5, what="the process to leave the subtree")
    finally:
        target.end()


def test_a_process_in_a_skill_cgroup_may_not_call_invoke(daemon):
    """A refused `invoke` writes a violation in the caller's name: a process
    inside a skill cgroup (here root, moved below the daemon's subtree) must
    not be able to forge those."""
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    require(mounts.v2 is not None, "needs a cgroup v2 hierarchy")
    before = daemon.metric("skillguard_violations_total", layer="invoke")

    def call():
        from agent.client import RpcError

        try:
            return {"result": daemon.call("invoke", {"caller": "web-fetch", "callee": "fs-locked"})}
        except RpcError as exc:
            return {"code": exc.code, "message": exc.message}

    reply = run_in_cgroup(mounts.v2 / daemon.subtree / f"e2e-invoke-{os.getpid()}", call)
    assert reply.get("code") == -32001 and "skill cgroup" in reply["message"], reply
    assert daemon.metric("skillguard_violations_total", layer="invoke") == before
    # The same call from outside any skill cgroup is answered (and the refusal recorded).
    assert daemon.call("invoke", {"caller": "web-fetch", "callee": "fs-locked"})["allowed"] is False
    assert daemon.metric("skillguard_violations_total", layer="invoke") == before + 1
