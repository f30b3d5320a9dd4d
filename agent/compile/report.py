"""What a manifest becomes, for a human reviewing a skill before trusting it."""
from __future__ import annotations

import json
import textwrap

from agent.compile.artifacts import Artifacts
from agent.compile import env as envrules


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def to_dict(art: Artifacts) -> dict:
    from agent.compile import bpf, network, seccomp

    p = art.policy
    ll = art.landlock
    return {
        "skill": {"name": p.name, "version": p.version, "mode": p.mode, "source": p.source,
                  "entrypoint": list(p.entrypoint)},
        "seccomp": {
            **seccomp.summary(art.seccomp),
            "allowed_syscalls": list(art.seccomp.allowed),
            "arg_checked_syscalls": list(art.seccomp.arg_checked),
            "enosys_syscalls": list(art.seccomp.enosys),
            "denied_syscalls": list(art.seccomp.denied),
            "bpf_hex": art.seccomp.bpf.hex(),
            "listing": bpf.disassemble(art.seccomp.bpf).splitlines(),
        },
        "landlock": {
            "abi": ll.abi,
            "handled_fs": list(ll.handled_fs),
            "rules": [{"path": r.path, "access": list(r.access), "origin": r.origin} for r in ll.path_rules],
            "handled_net": list(ll.handled_net),
            "connect_ports": list(ll.connect_ports),
            "scopes": list(ll.scopes),
            "notes": list(ll.notes),
        },
        "network": network.summary(art.network),
        "nftables": art.nft,
        "env": {
            "managed": list(envrules.MANAGED),
            "safe_passthrough": list(envrules.SAFE_PASSTHROUGH) + [p + "*" for p in envrules.SAFE_PASSTHROUGH_PREFIXES],
            "pass": list(p.env.passthrough),
            "never_passed": sorted(envrules.PROTECTED) + [p + "*" for p in envrules.PROTECTED_PREFIXES],
        },
        "limits": {"memory_bytes": art.limits.memory_bytes, "cpu": art.limits.cpu,
                   "pids": art.limits.pids, "timeout_s": p.resources.timeout_s},
        "rlimits": [{"name": r.name, "soft": r.soft, "hard": r.hard} for r in art.rlimits],
    }


def _wrap(label: str, items) -> list[str]:
    text = ", ".join(items) if items else "(none)"
    return textwrap.wrap(text, 96, initial_indent=f"  {label:<18}", subsequent_indent=" " * 20)


def to_text(art: Artifacts) -> str:
    d = to_dict(art)
    s, ll, net, lim = d["seccomp"], d["landlock"], d["network"], d["limits"]
    skill = d["skill"]
    out = [f"skill {skill['name']} {skill['version']} ({skill['mode']}) from {skill['source']}",
           f"  entrypoint        {' '.join(skill['entrypoint']) or '(given at launch)'}", ""]

    out.append(f"seccomp: {s['allowed']} allowed, {s['arg_checked']} argument-checked, "
               f"{s['enosys']} ENOSYS, {s['denied']} denied; anything else: {s['deny_action']}; "
               f"{s['instructions']} BPF instructions")
    out += _wrap("allowed", s["allowed_syscalls"])
    out += _wrap("argument-checked", s["arg_checked_syscalls"])
    out += _wrap("ENOSYS", s["enosys_syscalls"])
    out += _wrap("denied", s["denied_syscalls"])
    out += _wrap("socket families", s["socket_families"])
    out.append("  BPF listing:")
    out += ["    " + line for line in s["listing"]]
    out.append("")

    out.append(f"landlock (ABI {ll['abi']}): handles {len(ll['handled_fs'])} filesystem rights")
    width = max((len(r["path"]) for r in ll["rules"]), default=10)
    for r in ll["rules"]:
        out.append(f"  {r['path']:<{width}}  {','.join(r['access']):<40} {r['origin']}")
    ports = ", ".join(map(str, ll["connect_ports"])) or "none"
    out.append(f"  net: handles {', '.join(ll['handled_net']) or 'nothing'}; connect_tcp ports: {ports}")
    out.append(f"  scopes: {', '.join(ll['scopes']) or 'none'}")
    out += [f"  note: {n}" for n in ll["notes"]]
    out.append("")

    if net["loopback_only"]:
        out.append("network: loopback only (no tcp or http grant)")
    else:
        out.append("network: default drop; allowed destinations")
        for dst in net["destinations"]:
            out.append(f"  {dst['network']:<28} port {dst['ports']:<6} from {dst['rule']}")
        for name in net["names_via_dns"]:
            out.append(f"  {name['pattern']:<28} port {name['ports']:<6} via DNS, from {name['rule']}")
    out.append("  nftables ruleset (libnftables JSON):")
    out += ["    " + json.dumps(cmd, sort_keys=True) for cmd in d["nftables"]["nftables"]]
    out.append("")

    e = d["env"]
    out.append("environment:")
    out += _wrap("set by skillguard", e["managed"])
    out += _wrap("from the caller", e["safe_passthrough"] + e["pass"])
    out += _wrap("never passed", e["never_passed"])
    out.append("")

    timeout = f"{lim['timeout_s']:g} s" if lim["timeout_s"] else "none"
    out.append(f"limits: memory {_mib(lim['memory_bytes'])}, cpu {lim['cpu']:g} CPU, pids {lim['pids']}, "
               f"timeout {timeout}")
    out += [f"  {r['name']:<18}{r['soft']}" for r in d["rlimits"]]
    return "\n".join(out) + "\n"
