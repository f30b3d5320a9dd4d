"""Doctor's pure parts: output formats, capability and BTF parsing, child plumbing."""
from __future__ import annotations

import json
import os
import signal
import struct
import time

import pytest

from agent import doctor
from agent.doctor import Probe, ProbeError

SAMPLE = [
    Probe("kernel", True, "Linux 6.18"),
    Probe("seccomp", False, "EPERM (Operation not permitted) from seccomp"),
    Probe("bpf-lsm", False, "EPERM loading BPF_PROG_TYPE_LSM"),
]


def test_render_text_aligns_columns_and_marks_optional():
    text = doctor.render_text(SAMPLE)
    lines = text.splitlines()
    assert lines[0].split() == ["LAYER", "STATUS", "DETAIL"]
    detail_column = lines[0].index("DETAIL")
    for line, probe in zip(lines[1:], SAMPLE):
        assert line.startswith(probe.layer)
        assert line[detail_column:] == probe.detail
    assert lines[1].split()[1] == "ok"
    assert lines[2].split()[1] == "FAIL"
    assert lines[3].split()[1] == "no"  # optional layer
    assert "optional" in lines[-1]


def test_render_text_without_optional_failures_has_no_footnote():
    assert "optional" not in doctor.render_text(SAMPLE[:2])


def test_to_json_round_trips():
    parsed = json.loads(doctor.to_json(SAMPLE))
    assert parsed == {"probes": [
        {"layer": "kernel", "ok": True, "optional": False, "detail": "Linux 6.18"},
        {"layer": "seccomp", "ok": False, "optional": False,
         "detail": "EPERM (Operation not permitted) from seccomp"},
        {"layer": "bpf-lsm", "ok": False, "optional": True, "detail": "EPERM loading BPF_PROG_TYPE_LSM"},
    ]}


def test_layers_cover_every_probe_name():
    probe_names = [layer for layer, _ in doctor.PROBES]
    assert set(probe_names) <= set(doctor.LAYERS)
    assert doctor.OPTIONAL_LAYERS <= set(doctor.LAYERS)


def test_effective_caps():
    status = "Name:\tx\nCapEff:\t000001fffeffffff\n"
    caps = doctor.effective_caps(status)
    assert "SYS_RESOURCE" not in caps  # bit 24 clear
    assert {"SYS_ADMIN", "BPF", "PERFMON", "CHECKPOINT_RESTORE"} <= caps
    assert doctor.effective_caps("CapEff:\t0000000000000000\n") == set()
    assert doctor.effective_caps("") == set()


def test_guarded_turns_crashes_into_failed_probes():
    def crash():
        raise RuntimeError("boom")

    def probe_error():
        raise ProbeError("EPERM (Operation not permitted) doing x")

    assert doctor._guarded("seccomp", crash) == [Probe("seccomp", False, "probe crashed: RuntimeError: boom")]
    assert doctor._guarded("netns", probe_error) == [
        Probe("netns", False, "EPERM (Operation not permitted) doing x")]


# ---------------------------------------------------------------- child plumbing

def test_in_child_returns_value_and_reports_errors():
    assert doctor._in_child(lambda: {"pid": os.getpid()})["pid"] != os.getpid()

    def oserror():
        raise OSError(13, "open /x: Permission denied")
    with pytest.raises(ProbeError, match=r"^EACCES \(Permission denied\) from open /x$"):
        doctor._in_child(oserror)

    def missing_file():
        open("/nonexistent/skillguard")
    with pytest.raises(ProbeError, match=r"^ENOENT \(No such file or directory\) on /nonexistent/skillguard$"):
        doctor._in_child(missing_file)


def test_in_child_times_out_and_reaps():
    start = time.monotonic()
    with pytest.raises(ProbeError, match="timed out after 0.3s"):
        doctor._in_child(lambda: time.sleep(30), timeout=0.3)
    assert time.monotonic() - start < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_in_child_reports_death_by_signal():
    with pytest.raises(ProbeError, match="killed by SIGKILL"):
        doctor._in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_grandchild_does_not_hold_its_parents_answer_pipe():
    """Otherwise a lingering grandchild would keep the caller waiting for EOF."""
    def grandchild_sees(parent_answer_fd):
        try:
            os.fstat(parent_answer_fd)
        except OSError:
            return "closed"
        return "open"

    def body():
        mine = doctor._answer_fd
        return [mine, doctor._collect(*doctor._fork_call(lambda: grandchild_sees(mine)), 2)]

    parent_fd, seen = doctor._in_child(body)
    assert parent_fd is not None
    assert seen == "closed"


# ---------------------------------------------------------------- BTF

def _btf_blob() -> bytes:
    strings = b"\0int\0s\0target_a\0target_b\0only_a_var\0"
    off = {name: strings.index(b"\0" + name + b"\0") + 1 for name in
           (b"int", b"s", b"target_a", b"target_b", b"only_a_var")}

    def btf_type(name_off, kind, vlen, size_or_type):
        return struct.pack("<III", name_off, kind << 24 | vlen, size_or_type)
    types = b"".join([
        btf_type(off[b"int"], 1, 0, 4) + struct.pack("<I", 32),             # 1 INT (+4)
        btf_type(off[b"s"], 4, 2, 8) + b"\0" * 24,                          # 2 STRUCT, 2 members
        btf_type(0, 13, 1, 1) + b"\0" * 8,                                  # 3 FUNC_PROTO, 1 param
        btf_type(off[b"target_a"], 12, 0, 3),                               # 4 FUNC
        btf_type(0, 6, 3, 4) + b"\0" * 24,                                  # 5 ENUM, 3 values
        btf_type(0, 3, 0, 0) + b"\0" * 12,                                  # 6 ARRAY
        btf_type(off[b"only_a_var"], 14, 0, 1) + b"\0" * 4,                 # 7 VAR
        btf_type(0, 19, 1, 8) + b"\0" * 12,                                 # 8 ENUM64
        btf_type(off[b"target_b"], 12, 0, 3),                               # 9 FUNC
    ])
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_btf_func_ids(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(_btf_blob())
    ids = doctor.btf_func_ids(("target_a", "target_b", "only_a_var", "absent"), str(path))
    assert ids == {"target_a": 4, "target_b": 9}


def test_btf_rejects_other_magic(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ProbeError, match="not little-endian BTF"):
        doctor.btf_func_ids(("x",), str(path))
