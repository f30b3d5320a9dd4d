"""A launched skill's network: its own namespace, a veth to the host, NAT,
the compiled nftables table inside, the DNS stub and the NFLOG reader.

Sequence (supervisor side, agent/launch/supervisor.py):

    prepare:  plan_network()  -- validate pool and upstreams; no kernel change
    fork; the child unshares CLONE_NEWNET and says so on the socketpair
    attach(): under a flock on <state root>/netpool.lock, pick the lowest
              free /30 of the pool (probing the addresses the host has, so a
              dead launch's slot is free again once its veth is gone), create
              veth `sgv<slot>` with its peer `eth0` made directly inside the
              child's namespace, then in one batch of rtnetlink requests
              each side: inside, eth0 up, its addresses and the default
              routes; outside, the host end's addresses (plus the IPv6 twin
              from POOL6 and the resolver address 169.254.53.53); make sure
              the shared host table `inet skillguard_nat` is in place
              (agent/net/hostnat.py, usually a generation check); then the
              skill's nftables table (agent/compile/network.py) and an
              NFLOG socket inside the namespace; outside, the DNS stub bound
              to the veth. The child is then told to go on. The rtnetlink
              messages are pyroute2's, sent in batches by agent/net/rtnl.py.
    close():  drain NFLOG, read counters, close our references.

Nothing per launch lives outside the skill's namespace except the host end
of the veth, and deleting either end of a veth pair deletes both
(drivers/net/veth.c veth_dellink): when the skill's namespace dies (the
supervisor is SIGKILLed, so the child's PDEATHSIG kills the namespace's
init), the peer, the host end and the in-namespace table die with it. The
host-side NAT is one table for the whole pool, created once and kept.

A network namespace is per thread: `entered()` switches only the calling
thread, and sockets (netlink, libnftables' context) stay in the namespace
they were created in, so the handle keeps working from the host side.
`attach()` records how long each step took in `timings` (bench/net).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from agent.enforce.libc import CLONE_NEWNET, syscall
from agent.net.hostnat import NAT_TABLE, POOL6, VETH_PREFIX  # noqa: F401 - NAT_TABLE: for callers

RESOLVER4 = "169.254.53.53"  # the DNS stub as every skill sees it (compile.network.DEFAULT_RESOLVER4)
NFLOG_GROUP = 53  # one instance per namespace, so every skill can use the same group


class NetworkSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class NetworkSpec:
    """What plan_network decided before fork: pure data."""

    plan: object  # compile.network.NetworkPlan
    pool: ipaddress.IPv4Network
    upstreams: tuple[tuple[str, int], ...]
    lock_path: str
    ttl_floor: int
    ttl_ceiling: int


def plan_network(policy, host_config, state_root: str) -> NetworkSpec:
    from agent.compile.network import compile_network
    from agent.net.admit import TTL_CEILING, TTL_FLOOR

    plan = compile_network(policy)
    try:
        pool = ipaddress.IPv4Network(host_config.address_pool)
    except ValueError as exc:
        raise NetworkSetupError(f"address_pool {host_config.address_pool!r}: {exc}") from None
    if pool.prefixlen > 30:
        raise NetworkSetupError(f"address_pool {pool} holds no /30")
    upstreams: tuple = ()
    if plan.needs_dns:
        from agent.net.dns_stub import parse_upstreams, resolv_conf_upstreams

        entries = host_config.dns_upstream or resolv_conf_upstreams()
        try:
            upstreams = parse_upstreams(entries)
        except ValueError as exc:
            raise NetworkSetupError(f"dns_upstream: {exc}") from None
        if not upstreams:
            raise NetworkSetupError("name rules need an upstream resolver: set dns_upstream in the "
                                    "host config or a nameserver in /etc/resolv.conf")
    return NetworkSpec(plan, pool, upstreams, os.path.join(state_root, "netpool.lock"),
                       TTL_FLOOR, TTL_CEILING)


def resolv_conf(state_root: str) -> str:
    """A root-owned resolv.conf naming the stub, bound over the skill's /etc/resolv.conf."""
    directory = os.path.join(state_root, "net")
    path = os.path.join(directory, "resolv.conf")
    text = f"# written by skillguard: the skill's only resolver\nnameserver {RESOLVER4}\n" \
           "options timeout:2 attempts:2\n"
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# -- namespaces ---------------------------------------------------------------

def _setns(fd: int) -> None:
    syscall("setns", fd, CLONE_NEWNET)


@contextlib.contextmanager
def entered(netns_fd: int):
    """Run the block with the calling thread in another network namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            yield
        finally:
            _setns(home)  # if this failed we would be lost in the skill's namespace
    finally:
        os.close(home)


def _slot_of(address: ipaddress.IPv4Address, pool: ipaddress.IPv4Network) -> Optional[int]:
    if address not in pool:
        return None
    return (int(address) - int(pool.network_address)) // 4


@dataclass(frozen=True)
class Slot:
    index: int
    host4: str
    skill4: str
    host6: str
    skill6: str
    device: str


def _slot(pool: ipaddress.IPv4Network, index: int) -> Slot:
    base = int(pool.network_address) + 4 * index
    host4, skill4 = ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2)
    six = lambda a: str(ipaddress.IPv6Address(int(POOL6.network_address) + int(a)))
    return Slot(index, str(host4), str(skill4), six(host4), six(skill4), f"{VETH_PREFIX}{index}")


def _create_veth(host, pool: ipaddress.IPv4Network, addresses, netns_fd: int) -> tuple[Slot, int, int]:
    """The lowest /30 that no address of this host uses, as a veth pair whose
    peer `eth0` is created inside the skill's namespace. Returns the slot and
    the ifindex of each end (ours, then the peer's inside the namespace)."""
    from agent.net import rtnl

    used = {_slot_of(a, pool) for a in addresses if a.version == 4}
    for index in range(pool.num_addresses // 4):
        if index in used:
            continue
        slot = _slot(pool, index)
        try:
            (echoed,) = host.run([(f"create veth {slot.device}", rtnl.new_veth(slot.device, "eth0", netns_fd))],
                                 echo=True)
        except rtnl.RtnlError as exc:
            if exc.errno == errno.EEXIST:  # a veth of that name without addresses (yet): skip it
                continue
            raise
        # The kernel echoes the new link (NLM_F_ECHO, Linux 6.3+), whose
        # IFLA_LINK is the peer's ifindex (veth_get_iflink); ask otherwise.
        ours, peer = rtnl.parse_link(echoed[0]) if echoed else host.link_index(slot.device)
        if peer is None:
            raise NetworkSetupError(f"veth {slot.device}: the kernel did not say which index its peer has")
        return slot, ours, peer
    raise NetworkSetupError(f"address pool {pool} is exhausted ({pool.num_addresses // 4} skills)")


def _enable_forwarding(note: Callable[[str], None]) -> None:
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as fh:
        if fh.read().strip() == "1":
            return
    with open(path, "w") as fh:
        fh.write("1")
    note("network: set net.ipv4.ip_forward=1 (needed to NAT the skills' veths)")


# -- the handle ---------------------------------------------------------------


class NetnsHandle:
    """One launched skill's network; see the module doc."""

    def __init__(self, spec: NetworkSpec, emit: Callable[..., None], note: Callable[[str], None]):
        from agent.net.events import EventGate

        self.spec = spec
        self.emit_cb = emit
        self.note = note
        self.netns_fd: Optional[int] = None
        self.slot: Optional[Slot] = None
        self.nft = None  # libnftables context inside the skill's namespace
        self.nflog = None
        self.stub = None
        self.gate = EventGate()
        self.admitted: dict[str, set] = {}  # address -> {(name pattern, ports)}
        self.events = 0
        self.logged_drops = 0  # packets NFLOG handed over (the kernel's limit may skip some)
        self.host_index: Optional[int] = None
        self.setup_seconds = 0.0
        self.timings: dict[str, float] = {}  # ms per set-up step, for bench/net
        self.nat_check = ""  # how the host NAT table was found: stamp, listed or applied

    # set-up

    def attach(self, pid: int) -> None:
        from agent.compile.network import nft_ruleset
        from agent.enforce import nft
        from agent.net import rtnl
        from agent.net.hostnat import ensure_host_nat
        from agent.net.nflog import NflogSocket

        clock = time.perf_counter
        started = last = clock()

        def step(name: str) -> None:
            nonlocal last
            now = clock()
            self.timings[name] = (now - last) * 1000
            last = now

        spec = self.spec
        self.netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        os.makedirs(os.path.dirname(spec.lock_path), exist_ok=True)
        lock = os.open(spec.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            step("lock")
            with rtnl.Rtnl() as host:
                addresses = host.addresses()
                step("list host addresses")
                slot, index, peer = _create_veth(host, spec.pool, addresses, self.netns_fd)
                self.slot, self.host_index = slot, index
                step("veth")
                # Sockets made inside the namespace act on it from anywhere
                # (rtnetlink, libnftables' netlink socket, NFLOG).
                with entered(self.netns_fd), rtnl.Rtnl() as inner:
                    self.nft = nft.context()
                    self.nflog = NflogSocket(NFLOG_GROUP)
                    step("sockets in the namespace")
                    # `lo` is the child's to bring up.
                    inner.run([("eth0 up", rtnl.link_up(peer)),
                               (f"address {slot.skill4}/30", rtnl.new_address(peer, slot.skill4, 30)),
                               (f"address {slot.skill6}/126", rtnl.new_address(peer, slot.skill6, 126, nodad=True)),
                               ("default route", rtnl.new_default_route(slot.host4)),
                               ("IPv6 default route", rtnl.new_default_route(slot.host6))])
                step("namespace addresses and routes")
                host.run([(f"address {slot.host4}/30", rtnl.new_address(index, slot.host4, 30)),
                          (f"address {RESOLVER4}/32", rtnl.new_address(index, RESOLVER4, 32)),
                          (f"address {slot.host6}/126", rtnl.new_address(index, slot.host6, 126, nodad=True))])
                step("host addresses")
            own = tuple(ipaddress.ip_network(a) for a in addresses)
            self.nat_check = ensure_host_nat(spec.pool, os.path.join(os.path.dirname(spec.lock_path),
                                                                     "nat-verified"))
            step("host NAT check")
        finally:
            os.close(lock)  # releases the flock
        _enable_forwarding(self.note)
        if any(d.network.version == 6 for d in spec.plan.destinations) or spec.plan.names:
            with open("/proc/sys/net/ipv6/conf/all/forwarding") as fh:
                if fh.read().strip() != "1":
                    self.note("network: this host does not forward IPv6 (net.ipv6.conf.all.forwarding=0); "
                              "the skill's IPv6 destinations are unreachable")
        guard = (spec.pool, POOL6)
        ruleset = nft_ruleset(spec.plan, resolver4=RESOLVER4, guard=guard, log_group=NFLOG_GROUP)
        with entered(self.netns_fd):  # libnftables resolves interface names in the caller's namespace
            nft.apply(ruleset, self.nft)
        step("skill table")
        if spec.plan.needs_dns:
            from agent.compile.network import dns_sets
            from agent.net.dns_stub import DnsStub, StubRules

            rules = StubRules(spec.plan.names, dns_sets(spec.plan), spec.plan.private_names,
                              own + (spec.pool, POOL6), spec.ttl_floor, spec.ttl_ceiling)
            try:
                self.stub = DnsStub(rules, RESOLVER4, slot.device, spec.upstreams,
                                    admit=self._admit, refuse=self._refused_dns)
            except OSError as exc:
                raise NetworkSetupError(
                    f"DNS stub: cannot listen on {RESOLVER4}:53 on {slot.device}: {exc.strerror} "
                    "(a resolver on this host bound to 0.0.0.0:53 without SO_REUSEADDR holds the port)") from None
            step("DNS stub")
        self.setup_seconds = clock() - started

    def readers(self) -> dict[int, Callable[[int, int], None]]:
        out = {self.nflog.fileno(): self._on_nflog} if self.nflog else {}
        if self.stub is not None:
            out.update(self.stub.readers())
        return out

    # events

    def _emit(self, operation: str, rule: str) -> None:
        if not self.gate.allow(time.monotonic()):
            return
        held = self.gate.take_suppressed()
        detail = f"{held} similar network event(s) suppressed before this one (rate limit)" if held else ""
        self.events += 1
        self.emit_cb(pid=None, layer="network", operation=operation, decision="denied", rule=rule,
                     detail=detail)

    def _refused_dns(self, operation: str, rule: str) -> None:
        self._emit(operation, rule)

    def _admit(self, additions) -> None:
        from agent.compile.network import TABLE
        from agent.enforce import nft

        if not additions:
            return
        commands = [{"add": {"element": {"family": "inet", "table": TABLE, "name": a.set_name,
                                         "elem": [{"elem": {"val": a.address, "timeout": a.timeout}}]}}}
                    for a in additions]
        nft.apply({"nftables": commands}, self.nft)
        groups = {g.set4: g.ports for g in self._dns_sets()} | {g.set6: g.ports for g in self._dns_sets()}
        for a in additions:
            for grant in self.spec.plan.names:
                if grant.ports == groups.get(a.set_name):
                    self.admitted.setdefault(a.address, set()).add((grant.pattern, grant.ports))

    def _dns_sets(self):
        from agent.compile.network import dns_sets

        return dns_sets(self.spec.plan)

    def _on_nflog(self, _fd: int, _mask: int) -> None:
        from agent.net.events import missing_rule

        for packet in self.nflog.read():
            self.logged_drops += 1
            verb = "connect" if packet.protocol == "tcp" else "send"
            target = f"{packet.destination}:{packet.port}" if packet.port is not None else packet.destination
            rule = missing_rule(self.spec.plan, packet.protocol, packet.destination, packet.port,
                                {k: sorted(v) for k, v in self.admitted.items()},
                                own=self._is_own(packet.destination))
            self._emit(f"{verb} {packet.protocol} {target}", rule)

    def _is_own(self, destination: str) -> bool:
        try:
            address = ipaddress.ip_address(destination)
        except ValueError:
            return False
        return address == ipaddress.ip_address(RESOLVER4) or any(
            address.version == net.version and address in net for net in (self.spec.pool, POOL6))

    # metrics and teardown

    def counters(self) -> dict[str, int]:
        """Packets accepted by a grant and dropped for want of one, in this skill's table."""
        from agent.compile.network import TABLE
        from agent.enforce import nft

        return nft.counters("inet", TABLE, ("accepted", "dropped"), self.nft)

    def close(self) -> dict[str, int]:
        """Drain events, report what the rate limit held back, remove the veth. Idempotent."""
        totals = {"accepted": 0, "dropped": 0}
        if self.nflog is not None:
            try:
                self._on_nflog(self.nflog.fileno(), 0)
            except OSError:
                pass
        if self.nft is not None:
            try:
                totals = self.counters()
            except Exception as exc:  # noqa: BLE001 - report, keep tearing down
                self.note(f"network: counters unreadable: {exc}")
            self.note(f"network: counters: accepted {totals['accepted']}, dropped {totals['dropped']}")
            # Held back here, plus what the kernel's own log limit never handed over.
            held = self.gate.suppressed_total + max(0, totals["dropped"] - self.logged_drops)
            if held:
                self.emit_cb(pid=None, layer="network", operation="rate-limited network events",
                             decision="denied",
                             rule="network events are rate-limited per skill; the counters hold every drop",
                             detail=f"{held} network event(s) in all not reported one by one; "
                                    f"{totals['dropped']} packet(s) dropped and {totals['accepted']} "
                                    "connection(s) accepted in all")
        for closer in (self.stub, self.nflog):
            if closer is not None:
                closer.close()
        self.stub = self.nflog = None
        self.nft = None
        # The veth is not deleted here: it goes with the namespace once the
        # skill's processes and our references (this fd, the sockets above)
        # are gone, exactly as after a SIGKILL. Deleting it by hand costs
        # ~16 ms (unregister_netdevice waits for RCU grace periods).
        self.slot = None
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None
        return totals
