"""The invoke policy: both sides must agree; names and globs."""
from __future__ import annotations

import pytest

from agent.invoke import invoke_violation, may_invoke
from agent.manifest import load_text


def skill(name: str, can_invoke=(), can_be_invoked_by=()):
    text = f"name: {name}\nversion: '1'\ninvoke_policy:\n"
    text += f"  can_invoke: {list(can_invoke)!r}\n  can_be_invoked_by: {list(can_be_invoked_by)!r}\n"
    result = load_text(text, f"{name}.yaml")
    assert result.ok, result.format(result.errors, "error")
    return result.policy


@pytest.mark.parametrize("a_admits_b,b_admits_a,allowed", [
    (True, True, True), (True, False, False), (False, True, False), (False, False, False),
])
def test_the_four_combinations(a_admits_b, b_admits_a, allowed):
    a = skill("caller", can_invoke=["callee"] if a_admits_b else ["someone-else"])
    b = skill("callee", can_be_invoked_by=["caller"] if b_admits_a else [])
    decision = may_invoke(a, b)
    assert decision.allowed is allowed
    assert ("caller's invoke_policy.can_invoke" in decision.reason) is (not a_admits_b)
    assert ("callee's invoke_policy.can_be_invoked_by" in decision.reason) is (not b_admits_a)


@pytest.mark.parametrize("out_pattern,in_pattern,allowed", [
    ("fs-*", "web-*", True),
    ("*", "*", True),
    ("fs-*", "db-*", False),  # the callee does not admit web-fetch
    ("db-*", "*", False),  # the caller does not admit fs-reader
    ("fs-reader", "web-fetch", True),
    ("fs-read", "*", False),  # a name is not a prefix
    ("fs-?eader", "*", False),  # only `*` is special; `?` is refused by the loader
])
def test_globs(out_pattern, in_pattern, allowed):
    if "?" in out_pattern:
        result = load_text(f"name: x\nversion: '1'\ninvoke_policy:\n  can_invoke: ['{out_pattern}']\n")
        assert not result.ok
        return
    a = skill("web-fetch", can_invoke=[out_pattern])
    b = skill("fs-reader", can_be_invoked_by=[in_pattern])
    decision = may_invoke(a, b)
    assert decision.allowed is allowed, decision.reason
    if allowed:
        assert decision.caller_rule == out_pattern and decision.callee_rule == in_pattern


def test_no_invoke_policy_admits_nobody():
    a, b = skill("a"), skill("b")
    decision = may_invoke(a, b)
    assert not decision.allowed
    assert "[] (nobody)" in decision.reason


def test_the_policy_is_directional():
    a = skill("a", can_invoke=["b"])
    b = skill("b", can_be_invoked_by=["a"])
    assert may_invoke(a, b).allowed
    assert not may_invoke(b, a).allowed


def test_a_refusal_becomes_an_invoke_violation():
    a, b = skill("a", can_invoke=["b"]), skill("b")
    decision = may_invoke(a, b)
    violation = invoke_violation(a, b, decision, pid=42)
    record = violation.to_dict()
    assert record["layer"] == "invoke" and record["decision"] == "denied"
    assert record["skill"] == "a" and record["operation"] == "invoke b" and record["pid"] == 42
    assert "b's invoke_policy.can_be_invoked_by" in record["rule"]
    with pytest.raises(ValueError):
        invoke_violation(a, a, may_invoke(skill("x", can_invoke=["*"]), skill("y", can_be_invoked_by=["*"])))
