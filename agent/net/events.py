"""The wording and the rate limit of network events. Pure.

Every dropped packet the supervisor hears about and every refused DNS
query becomes a `network` Violation, but a skill that loops on a refused
connect must not flood the log: `EventGate` passes a burst, then a steady
rate, and counts what it held back; the count goes into the next event that
passes and into a summary when the skill ends.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from agent.compile.network import ANY_PORT, NetworkPlan


@dataclass
class EventGate:
    rate: float = 10.0  # events per second, steady
    burst: int = 20
    tokens: float = field(default=-1.0)
    last: float = 0.0
    suppressed: int = 0  # held back since the last event that passed
    suppressed_total: int = 0

    def allow(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.last = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


def _ports(ports: tuple[int, int]) -> str:
    if ports == ANY_PORT:
        return "any port"
    return f"port {ports[0]}" if ports[0] == ports[1] else f"ports {ports[0]}-{ports[1]}"


def missing_rule(plan: NetworkPlan, protocol: str, destination: str, port: Optional[int],
                 admitted: Mapping[str, Iterable[tuple[str, tuple[int, int]]]] = {},
                 own: bool = False) -> str:
    """Say which rule the manifest would need for this packet, and what it has instead."""
    if own:
        return (f"{destination} is one of the agent's own addresses (veth pool, DNS stub); "
                "only DNS to the stub may reach it")
    target = f"{destination}:{port}" if port is not None else destination
    if protocol != "tcp":
        return f"no rule grants {protocol.upper()} to {target}: tcp and http rules grant TCP only " \
               "(and DNS to the agent's resolver)"
    try:
        address = ipaddress.ip_address(destination)
    except ValueError:
        return f"no tcp/http rule grants {target}"
    have = [f"{d.rule} ({_ports(d.ports)})" for d in plan.destinations
            if d.network.version == address.version and address in d.network]
    have += [f"{pattern} via DNS ({_ports(ports)})" for pattern, ports in admitted.get(destination, ())]
    if have:
        return f"no tcp/http rule grants {target}; {destination} is granted only by " + ", ".join(sorted(set(have)))
    return f"no tcp/http rule grants {target}"
