"""The inter-skill invoke policy: may skill A call skill B? (pure)

A call is allowed only when both sides agree: A's `invoke_policy.can_invoke`
admits B's name AND B's `invoke_policy.can_be_invoked_by` admits A's name.
Entries are skill names or globs (`fs-*`, `*`; see glob.match_name). An
empty list admits nobody, so a manifest without `invoke_policy` can neither
call nor be called. Nothing here touches the kernel: the daemon's `invoke`
method and `skillguard invoke-check` ask `may_invoke` and record every
refusal with `invoke_violation`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.manifest.glob import match_name
from agent.manifest.model import Policy


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    caller_rule: Optional[str] = None  # the can_invoke entry that admitted the callee
    callee_rule: Optional[str] = None  # the can_be_invoked_by entry that admitted the caller


def _first_match(patterns: tuple[str, ...], name: str) -> Optional[str]:
    return next((p for p in patterns if match_name(p, name)), None)


def _listed(patterns: tuple[str, ...]) -> str:
    return "[" + ", ".join(patterns) + "]" if patterns else "[] (nobody)"


def may_invoke(caller: Policy, callee: Policy) -> Decision:
    out_rule = _first_match(caller.invoke.can_invoke, callee.name)
    in_rule = _first_match(callee.invoke.can_be_invoked_by, caller.name)
    refusals = []
    if out_rule is None:
        refusals.append(f"{caller.name}'s invoke_policy.can_invoke {_listed(caller.invoke.can_invoke)} "
                        f"does not admit {callee.name!r}")
    if in_rule is None:
        refusals.append(f"{callee.name}'s invoke_policy.can_be_invoked_by "
                        f"{_listed(callee.invoke.can_be_invoked_by)} does not admit {caller.name!r}")
    if refusals:
        return Decision(False, "; ".join(refusals), out_rule, in_rule)
    return Decision(True, f"{caller.name}'s can_invoke {out_rule!r} admits {callee.name!r} and "
                          f"{callee.name}'s can_be_invoked_by {in_rule!r} admits {caller.name!r}",
                    out_rule, in_rule)


def invoke_violation(caller: Policy, callee: Policy, decision: Decision, pid: Optional[int] = None):
    """The `invoke` Violation recording a refused call (attributed to the caller)."""
    from agent.events.violation import Violation

    if decision.allowed:
        raise ValueError("invoke_violation: the call was allowed; there is nothing to record")
    return Violation(skill=caller.name, pid=pid, layer="invoke",
                     operation=f"invoke {callee.name}", decision="denied", rule=decision.reason)
