"""Every artifact of a policy at once (`skillguard compile`, the daemon's policy check)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from agent.manifest.model import Policy

if TYPE_CHECKING:
    from agent.compile.landlock import LandlockArtifact
    from agent.compile.network import NetworkPlan
    from agent.compile.rlimits import Limits, Rlimit
    from agent.compile.seccomp import SeccompArtifact


@dataclass(frozen=True)
class Artifacts:
    policy: Policy
    seccomp: "SeccompArtifact"
    landlock: "LandlockArtifact"
    network: "NetworkPlan"
    nft: dict
    limits: "Limits"
    rlimits: tuple["Rlimit", ...]


def compile_policy(policy: Policy, *, deny_action: Optional[str] = None,
                   state_dir: Optional[str] = None) -> Artifacts:
    """Every artifact for `policy`. `deny_action` defaults to errno, or log in audit mode."""
    from agent.compile.landlock import compile_landlock
    from agent.compile.network import compile_network, nft_ruleset
    from agent.compile.rlimits import compile_limits, compile_rlimits
    from agent.compile.seccomp import compile_seccomp

    if deny_action is None:
        deny_action = "log" if policy.mode == "audit" else "errno"
    plan = compile_network(policy)
    return Artifacts(
        policy=policy,
        seccomp=compile_seccomp(policy, deny_action=deny_action),
        landlock=compile_landlock(policy, state_dir=state_dir),
        network=plan,
        nft=nft_ruleset(plan),
        limits=compile_limits(policy.resources),
        rlimits=compile_rlimits(policy.resources),
    )
