"""Classic BPF for seccomp: decode, disassemble and simulate.

A seccomp filter is an array of `struct sock_filter` (linux/filter.h):
    struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; };
run over `struct seccomp_data` (linux/seccomp.h):
    int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
The kernel accepts only the subset listed in seccomp_check_filter()
(kernel/seccomp.c); this interpreter implements exactly that subset and
refuses anything else, so a program it runs is one the kernel would load.
Pure: no system calls.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

INSN_SIZE = 8
_INSN = struct.Struct("<HBBI")  # x86_64 is little-endian
MAX_INSNS = 4096  # BPF_MAXINSNS

# linux/audit.h
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h

# linux/seccomp.h
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF

_ACTION_NAMES = {
    SECCOMP_RET_KILL_PROCESS: "KILL_PROCESS",
    SECCOMP_RET_KILL_THREAD: "KILL_THREAD",
    SECCOMP_RET_TRAP: "TRAP",
    SECCOMP_RET_ERRNO: "ERRNO",
    SECCOMP_RET_USER_NOTIF: "USER_NOTIF",
    SECCOMP_RET_TRACE: "TRACE",
    SECCOMP_RET_LOG: "LOG",
    SECCOMP_RET_ALLOW: "ALLOW",
}

SECCOMP_DATA_SIZE = 64

# Opcode fields (linux/bpf_common.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10  # BPF_RET source
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MEMWORDS = 16

_ALU_OPS = {
    BPF_ADD: ("add", lambda a, b: a + b),
    BPF_SUB: ("sub", lambda a, b: a - b),
    BPF_MUL: ("mul", lambda a, b: a * b),
    BPF_DIV: ("div", lambda a, b: a // b),
    BPF_MOD: ("mod", lambda a, b: a % b),
    BPF_OR: ("or", lambda a, b: a | b),
    BPF_AND: ("and", lambda a, b: a & b),
    BPF_XOR: ("xor", lambda a, b: a ^ b),
    BPF_LSH: ("lsh", lambda a, b: a << (b & 31)),
    BPF_RSH: ("rsh", lambda a, b: a >> (b & 31)),
}
_JMP_OPS = {
    BPF_JEQ: ("jeq", lambda a, b: a == b),
    BPF_JGT: ("jgt", lambda a, b: a > b),
    BPF_JGE: ("jge", lambda a, b: a >= b),
    BPF_JSET: ("jset", lambda a, b: (a & b) != 0),
}


class BpfError(ValueError):
    """The program is not one the kernel's seccomp verifier would accept."""


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int

    def pack(self) -> bytes:
        return _INSN.pack(self.code, self.jt, self.jf, self.k)


def decode(bpf: bytes) -> tuple[Insn, ...]:
    if len(bpf) % INSN_SIZE:
        raise BpfError(f"program length {len(bpf)} is not a multiple of {INSN_SIZE}")
    count = len(bpf) // INSN_SIZE
    if not 0 < count <= MAX_INSNS:
        raise BpfError(f"program has {count} instructions (kernel accepts 1..{MAX_INSNS})")
    return tuple(Insn(*fields) for fields in _INSN.iter_unpack(bpf))


def encode(insns: Sequence[Insn]) -> bytes:
    return b"".join(i.pack() for i in insns)


def action_name(ret: int) -> str:
    """Name a SECCOMP_RET_* value: "ALLOW", "ERRNO(1)", "USER_NOTIF", ..."""
    action = ret & SECCOMP_RET_ACTION_FULL
    name = _ACTION_NAMES.get(action)
    if name is None:
        # The kernel treats unknown actions as KILL_PROCESS (seccomp_run_filters).
        return f"UNKNOWN(0x{ret:08x})"
    if action in (SECCOMP_RET_ERRNO, SECCOMP_RET_TRACE, SECCOMP_RET_TRAP):
        return f"{name}({ret & SECCOMP_RET_DATA})"
    return name


def _field_name(offset: int) -> str:
    if offset == 0:
        return "nr"
    if offset == 4:
        return "arch"
    if offset in (8, 12):
        return "instruction_pointer" + ("" if offset == 8 else ".hi")
    index, rest = divmod(offset - 16, 8)
    return f"args[{index}]" + (".hi" if rest else ".lo")


def _check_load_offset(pc: int, offset: int) -> None:
    if offset % 4 or offset >= SECCOMP_DATA_SIZE:
        raise BpfError(f"insn {pc}: load at offset {offset} outside seccomp_data or unaligned")


def _validate(insns: Sequence[Insn]) -> None:
    """The checks of sk_chk_filter + seccomp_check_filter that matter here."""
    n = len(insns)
    for pc, ins in enumerate(insns):
        cls = ins.code & 0x07
        if cls == BPF_LD:
            if ins.code == BPF_LD | BPF_W | BPF_ABS:
                _check_load_offset(pc, ins.k)
            elif ins.code not in (BPF_LD | BPF_W | BPF_LEN, BPF_LD | BPF_IMM, BPF_LD | BPF_MEM):
                raise BpfError(f"insn {pc}: load 0x{ins.code:04x} not allowed in seccomp")
        elif cls == BPF_LDX:
            if ins.code not in (BPF_LDX | BPF_W | BPF_LEN, BPF_LDX | BPF_IMM, BPF_LDX | BPF_MEM):
                raise BpfError(f"insn {pc}: load 0x{ins.code:04x} not allowed in seccomp")
        elif cls == BPF_ALU:
            op = ins.code & 0xF0
            if op != BPF_NEG and op not in _ALU_OPS:
                raise BpfError(f"insn {pc}: unknown ALU op 0x{ins.code:04x}")
            if op in (BPF_DIV, BPF_MOD) and not ins.code & BPF_X and ins.k == 0:
                raise BpfError(f"insn {pc}: division by constant zero")
        elif cls == BPF_JMP:
            op = ins.code & 0xF0
            if op == BPF_JA:
                if pc + 1 + ins.k >= n:
                    raise BpfError(f"insn {pc}: jump out of program")
            elif op in _JMP_OPS:
                if pc + 1 + max(ins.jt, ins.jf) >= n:
                    raise BpfError(f"insn {pc}: jump out of program")
            else:
                raise BpfError(f"insn {pc}: unknown jump 0x{ins.code:04x}")
        elif cls in (BPF_ST, BPF_STX) or ins.code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM):
            pass
        elif cls == BPF_RET:
            if ins.code not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
                raise BpfError(f"insn {pc}: bad return 0x{ins.code:04x}")
        elif cls == BPF_MISC:
            if ins.code not in (BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA):
                raise BpfError(f"insn {pc}: bad misc 0x{ins.code:04x}")
        uses_mem = cls in (BPF_ST, BPF_STX) or (cls in (BPF_LD, BPF_LDX) and ins.code & 0xE0 == BPF_MEM)
        if uses_mem and ins.k >= BPF_MEMWORDS:
            raise BpfError(f"insn {pc}: scratch memory index {ins.k} out of range")
    if insns[-1].code & 0x07 != BPF_RET:
        raise BpfError("program does not end with a return")


def seccomp_data(nr: int, arch: int = AUDIT_ARCH_X86_64, args: Sequence[int] = (0,) * 6,
                 ip: int = 0) -> bytes:
    if len(args) != 6:
        raise ValueError("seccomp_data holds exactly 6 arguments")
    mask64 = (1 << 64) - 1
    return struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch & 0xFFFFFFFF, ip & mask64,
                       *(a & mask64 for a in args))


def run(insns: Sequence[Insn], data: bytes) -> int:
    """Interpret a validated program over raw seccomp_data bytes."""
    return _execute(insns, data)[0]


def _execute(insns: Sequence[Insn], data: bytes) -> tuple[int, int]:
    """(SECCOMP_RET_* value, instructions executed)."""
    acc = idx = 0
    mem = [0] * BPF_MEMWORDS
    pc = 0
    m32 = 0xFFFFFFFF
    for step in range(1, len(insns) + 1):  # jumps only go forward
        ins = insns[pc]
        cls, code, k = ins.code & 0x07, ins.code, ins.k
        pc += 1
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode == BPF_ABS:
                acc = struct.unpack_from("<I", data, k)[0]
            elif mode == BPF_LEN:
                acc = SECCOMP_DATA_SIZE
            elif mode == BPF_IMM:
                acc = k
            else:
                acc = mem[k]
        elif cls == BPF_LDX:
            mode = code & 0xE0
            idx = SECCOMP_DATA_SIZE if mode == BPF_LEN else (k if mode == BPF_IMM else mem[k])
        elif cls == BPF_ST:
            mem[k] = acc
        elif cls == BPF_STX:
            mem[k] = idx
        elif cls == BPF_ALU:
            op = code & 0xF0
            if op == BPF_NEG:
                acc = (-acc) & m32
            else:
                operand = idx if code & BPF_X else k
                if op in (BPF_DIV, BPF_MOD) and operand == 0:
                    return 0, step  # the kernel's interpreter returns 0 (KILL) on x/0
                acc = _ALU_OPS[op][1](acc, operand) & m32
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
            else:
                operand = idx if code & BPF_X else k
                pc += ins.jt if _JMP_OPS[op][1](acc, operand) else ins.jf
        elif cls == BPF_RET:
            return (acc if code & BPF_A else k), step
        elif cls == BPF_MISC:
            if code & 0xF8 == BPF_TXA:
                acc = idx
            else:
                idx = acc
    raise BpfError("program ran off its end")


def simulate(bpf: bytes, nr: int, arch: int = AUDIT_ARCH_X86_64,
             args: Sequence[int] = (0,) * 6, ip: int = 0) -> int:
    """Run `bpf` on one synthetic system call; return the SECCOMP_RET_* value."""
    insns = decode(bpf)
    _validate(insns)
    return run(insns, seccomp_data(nr, arch, args, ip))


class Simulator:
    """Decode and validate once, then run many synthetic calls (tests, tools)."""

    def __init__(self, bpf: bytes):
        self.insns = decode(bpf)
        _validate(self.insns)

    def __call__(self, nr: int, arch: int = AUDIT_ARCH_X86_64,
                 args: Sequence[int] = (0,) * 6, ip: int = 0) -> int:
        return run(self.insns, seccomp_data(nr, arch, args, ip))

    def steps(self, nr: int, arch: int = AUDIT_ARCH_X86_64,
              args: Sequence[int] = (0,) * 6, ip: int = 0) -> int:
        """How many instructions the kernel runs for this call (a cost measure)."""
        return _execute(self.insns, seccomp_data(nr, arch, args, ip))[1]


def _format(pc: int, ins: Insn) -> str:
    cls, code, k = ins.code & 0x07, ins.code, ins.k
    if cls == BPF_LD:
        mode = code & 0xE0
        if mode == BPF_ABS:
            return f"ld  [{k}]  ; {_field_name(k)}"
        if mode == BPF_LEN:
            return "ld  #len"
        if mode == BPF_IMM:
            return f"ld  #0x{k:x}"
        return f"ld  M[{k}]"
    if cls == BPF_LDX:
        mode = code & 0xE0
        return {BPF_LEN: "ldx #len", BPF_IMM: f"ldx #0x{k:x}"}.get(mode, f"ldx M[{k}]")
    if cls == BPF_ST:
        return f"st  M[{k}]"
    if cls == BPF_STX:
        return f"stx M[{k}]"
    if cls == BPF_ALU:
        op = code & 0xF0
        if op == BPF_NEG:
            return "neg"
        return f"{_ALU_OPS[op][0]} " + ("x" if code & BPF_X else f"#0x{k:x}")
    if cls == BPF_JMP:
        op = code & 0xF0
        if op == BPF_JA:
            return f"ja  {pc + 1 + k}"
        operand = "x" if code & BPF_X else f"#0x{k:x}"
        return f"{_JMP_OPS[op][0]} {operand}, {pc + 1 + ins.jt}, {pc + 1 + ins.jf}"
    if cls == BPF_RET:
        return "ret a" if code & BPF_A else f"ret {action_name(k)}"
    return "txa" if code & 0xF8 == BPF_TXA else "tax"


def iter_listing(bpf: bytes) -> Iterator[str]:
    for pc, ins in enumerate(decode(bpf)):
        yield f"{pc:4d}: {_format(pc, ins)}"


def disassemble(bpf: bytes) -> str:
    """One line per instruction: `pc: op operand, jt-target, jf-target ; field`."""
    return "\n".join(iter_listing(bpf))
