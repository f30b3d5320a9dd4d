"""The classic-BPF simulator against hand-written programs (no libseccomp)."""
from __future__ import annotations

import pytest

from agent.compile import bpf as B
from agent.compile.bpf import Insn

LD_ABS = B.BPF_LD | B.BPF_W | B.BPF_ABS
JEQ_K = B.BPF_JMP | B.BPF_JEQ | B.BPF_K
RET_K = B.BPF_RET | B.BPF_K


def prog(*insns: tuple) -> bytes:
    return B.encode([Insn(*i) for i in insns])


# Allow getpid (39) on x86_64, ERRNO(13) for everything else, kill other arches.
TINY = prog(
    (LD_ABS, 0, 0, 4),                     # 0: A = arch
    (JEQ_K, 1, 0, B.AUDIT_ARCH_X86_64),    # 1: x86_64 ? 3 : 2
    (RET_K, 0, 0, B.SECCOMP_RET_KILL_PROCESS),
    (LD_ABS, 0, 0, 0),                     # 3: A = nr
    (JEQ_K, 0, 1, 39),                     # 4: getpid ? 5 : 6
    (RET_K, 0, 0, B.SECCOMP_RET_ALLOW),
    (RET_K, 0, 0, B.SECCOMP_RET_ERRNO | 13),
)


def test_tiny_program_paths():
    assert B.simulate(TINY, 39) == B.SECCOMP_RET_ALLOW
    assert B.simulate(TINY, 40) == B.SECCOMP_RET_ERRNO | 13
    assert B.simulate(TINY, 39, arch=B.AUDIT_ARCH_I386) == B.SECCOMP_RET_KILL_PROCESS


def test_argument_words_and_alu():
    # Return ALLOW iff (args[2].hi & 0xf0) >> 4 == 0xa, using X, scratch memory and JSET.
    p = prog(
        (LD_ABS, 0, 0, 16 + 2 * 8 + 4),                  # 0: A = args[2].hi
        (B.BPF_ALU | B.BPF_AND | B.BPF_K, 0, 0, 0xF0),    # 1
        (B.BPF_ALU | B.BPF_RSH | B.BPF_K, 0, 0, 4),       # 2
        (B.BPF_ST, 0, 0, 3),                              # 3: M[3] = A
        (B.BPF_LDX | B.BPF_IMM, 0, 0, 0xA),               # 4: X = 0xa
        (B.BPF_LD | B.BPF_MEM, 0, 0, 3),                  # 5: A = M[3]
        (B.BPF_JMP | B.BPF_JEQ | B.BPF_X, 0, 2, 0),       # 6: A == X ? 7 : 9
        (B.BPF_JMP | B.BPF_JSET | B.BPF_K, 0, 1, 0x2),    # 7: A & 2 ? 8 : 9
        (RET_K, 0, 0, B.SECCOMP_RET_ALLOW),               # 8
        (RET_K, 0, 0, B.SECCOMP_RET_ERRNO | 1),           # 9
    )
    assert B.simulate(p, 0, args=(0, 0, 0xA0 << 32, 0, 0, 0)) == B.SECCOMP_RET_ALLOW
    assert B.simulate(p, 0, args=(0, 0, 0xA0, 0, 0, 0)) == B.SECCOMP_RET_ERRNO | 1
    assert B.simulate(p, 0, args=(0, 0, 0xB0 << 32, 0, 0, 0)) == B.SECCOMP_RET_ERRNO | 1


def test_ja_ret_a_and_len():
    p = prog(
        (B.BPF_JMP | B.BPF_JA, 0, 0, 1),     # 0: -> 2
        (RET_K, 0, 0, 0),                     # 1: skipped (KILL_THREAD)
        (B.BPF_LD | B.BPF_W | B.BPF_LEN, 0, 0, 0),  # 2: A = 64
        (B.BPF_MISC | B.BPF_TAX, 0, 0, 0),    # 3: X = A
        (B.BPF_LD | B.BPF_IMM, 0, 0, B.SECCOMP_RET_ERRNO),
        (B.BPF_ALU | B.BPF_OR | B.BPF_X, 0, 0, 0),  # A |= X
        (B.BPF_RET | B.BPF_A, 0, 0, 0),
    )
    assert B.simulate(p, 1) == B.SECCOMP_RET_ERRNO | 64


@pytest.mark.parametrize("bad, why", [
    (b"\x00" * 7, "multiple of 8"),
    (prog((LD_ABS, 0, 0, 64), (RET_K, 0, 0, 0)), "outside seccomp_data"),
    (prog((LD_ABS, 0, 0, 2), (RET_K, 0, 0, 0)), "unaligned"),
    (prog((JEQ_K, 5, 0, 1), (RET_K, 0, 0, 0)), "jump out of program"),
    (prog((LD_ABS, 0, 0, 0),), "does not end with a return"),
    (prog((B.BPF_LD | B.BPF_B | B.BPF_ABS, 0, 0, 0), (RET_K, 0, 0, 0)), "not allowed"),
    (prog((B.BPF_ST, 0, 0, 16), (RET_K, 0, 0, 0)), "scratch memory"),
])
def test_rejects_what_the_kernel_rejects(bad, why):
    with pytest.raises(B.BpfError, match=why):
        B.simulate(bad, 0)


def test_action_names():
    assert B.action_name(B.SECCOMP_RET_ALLOW) == "ALLOW"
    assert B.action_name(B.SECCOMP_RET_ERRNO | 1) == "ERRNO(1)"
    assert B.action_name(B.SECCOMP_RET_KILL_PROCESS) == "KILL_PROCESS"
    assert B.action_name(B.SECCOMP_RET_KILL_THREAD) == "KILL_THREAD"
    assert B.action_name(B.SECCOMP_RET_USER_NOTIF) == "USER_NOTIF"
    assert B.action_name(B.SECCOMP_RET_LOG) == "LOG"
    assert B.action_name(B.SECCOMP_RET_TRACE | 7) == "TRACE(7)"
    assert B.action_name(0x12340000).startswith("UNKNOWN")


def test_disassemble_names_fields_targets_and_actions():
    text = B.disassemble(TINY)
    lines = text.splitlines()
    assert len(lines) == 7
    assert "arch" in lines[0] and "nr" in lines[3]
    assert "jeq #0xc000003e, 3, 2" in lines[1]
    assert lines[5].endswith("ret ALLOW") and lines[6].endswith("ret ERRNO(13)")
    assert "KILL_PROCESS" in lines[2]
    args_line = B.disassemble(prog((LD_ABS, 0, 0, 16 + 8 * 5 + 4), (RET_K, 0, 0, 0)))
    assert "args[5].hi" in args_line


def test_steps_count_executed_instructions():
    sim = B.Simulator(TINY)
    assert sim.steps(39) == 5          # insns 0, 1, 3, 4, 5
    assert sim.steps(40) == 5          # insns 0, 1, 3, 4, 6
    assert sim.steps(39, arch=B.AUDIT_ARCH_I386) == 3
