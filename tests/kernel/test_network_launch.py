"""Network confinement of launched skills, end to end on the real kernel (issue 4).

Every test runs `python -m agent run` as root inside the simulated host of
tests/kernel/netlab.py, with a test-made host config (address pool
10.99.0.0/24, upstream resolver = the lab's DNS server) and a real skill
program (`python3 -c ...`) that reports what it could reach as JSON. The
lab's servers log what they received, so "dropped" is proven by absence at
the destination, not only by an error in the skill.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require
from tests.kernel.netlab import DNS_SERVER, ECHO_PORT, OTHER, V6, WWW, WWW2, NetLab

POOL = "10.99.0.0/24"

# Helpers the skill programs use; each returns a short string or list.
PRELUDE = textwrap.dedent('''\
    import json, os, socket, struct, sys, time
    def conn(host, port, family=0):
        try:
            fam = family or (socket.AF_INET6 if ":" in host else socket.AF_INET)
            s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
            s.connect((host, port)); data = s.recv(100).decode().strip(); s.close()
            return "ok " + data
        except OSError as e:
            return "err " + (os.strerror(e.errno) if e.errno else str(e))
    def res(name):
        try:
            return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)})
        except OSError as e:
            return "err " + str(e)
    def udp(host, port, text):
        try:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(text.encode(), (host, port)); time.sleep(0.05); s.sendto(text.encode(), (host, port))
            return "sent"
        except OSError as e:
            return "err " + os.strerror(e.errno)
    def raw_dns(server, name):
        q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
            s.sendto(q, (server, 53)); s.recv(512); return "answered"
        except OSError as e:
            return "err " + (os.strerror(e.errno) if e.errno else str(e))
    def out(**kw):
        print(json.dumps(kw), flush=True)
    ''')


@pytest.fixture(scope="module")
def lab():
    require(os.geteuid() == 0, "needs root (euid 0)")
    require(shutil.which("nsenter") is not None, "nsenter (util-linux) missing")
    try:
        import nftables  # noqa: F401
        import dns.message  # noqa: F401
    except ImportError as exc:
        require(False, f"python module missing: {exc}")
    workdir = Path(tempfile.mkdtemp(prefix="skillguard-netlab-", dir="/var/tmp"))
    os.chmod(workdir, 0o711)
    built = NetLab.create(workdir)
    (workdir / "agent.yaml").write_text(f'address_pool: "{POOL}"\ndns_upstream: ["{DNS_SERVER}"]\n')
    try:
        yield built
    finally:
        built.close()
        shutil.rmtree(workdir, ignore_errors=True)


class Launch:
    def __init__(self, proc: subprocess.Popen, stdout: str, stderr: str):
        self.code = proc.returncode
        self.stdout, self.stderr = stdout, stderr
        self.events = [json.loads(l) for l in stderr.splitlines() if l.startswith("{")]
        self.notes = [l for l in stderr.splitlines() if l.startswith("skillguard:")]

    @property
    def result(self) -> dict:
        merged: dict = {}
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                merged.update(json.loads(line))
        return merged

    def network_events(self) -> list[dict]:
        return [e for e in self.events if e["layer"] == "network"]


def _manifest(lab: NetLab, name: str, body: str) -> Path:
    path = lab.workdir / f"{name}.yaml"
    path.write_text(f'name: {name}\nversion: "1"\npermissions:\n{textwrap.indent(textwrap.dedent(body), "  ")}'
                    "resources:\n  timeout: 30s\n")
    return path


def start(lab: NetLab, name: str, body: str, program: str, config: str = "agent.yaml") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NODE_"))}
    env.update(SKILLGUARD_CONFIG=str(lab.workdir / config),
               SKILLGUARD_STATE_ROOT=str(lab.workdir / "state"), PYTHONPATH=str(REPO_ROOT))
    argv = ["nsenter", f"--net={lab.host_netns_path}", sys.executable, "-m", "agent", "run",
            "--manifest", str(_manifest(lab, name, body)), "--", "python3", "-c", PRELUDE + textwrap.dedent(program)]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def launch(lab: NetLab, name: str, body: str, program: str, **kw) -> Launch:
    proc = start(lab, name, body, program, **kw)
    stdout, stderr = proc.communicate(timeout=60)
    return Launch(proc, stdout, stderr)


def refused(value: str) -> bool:
    """A connect rejected by the ruleset: a TCP reset, so ECONNREFUSED at once."""
    return value == "err " + os.strerror(errno.ECONNREFUSED)


def _gone(lab: NetLab, netns: str, deadline_s: float = 10.0) -> tuple[bool, list, list]:
    """Wait until no sgv* link is left in the simulated host and no process holds `netns`."""
    end = time.monotonic() + deadline_s
    while True:
        links = [l for l in lab.host_links() if l.startswith("sgv")]
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/net") == netns:
                    holders.append(pid)
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == netns:
                        holders.append(f"{pid}/fd/{fd}")
            except OSError:
                continue
        if (not links and not holders) or time.monotonic() > end:
            return not links and not holders, links, holders
        time.sleep(0.1)


# ---------------------------------------------------------------------------


def test_allowed_port_connects_other_port_and_host_are_refused(lab):
    run = launch(lab, "net-basic", f"""\
        tcp:
          allowlist: ["{WWW}:8080"]
        """, f"""\
        out(allowed=conn("{WWW}", 8080), other_port=conn("{WWW}", 8081), other_host=conn("{OTHER}", 8080),
            netns=os.readlink("/proc/self/ns/net"))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    assert r["allowed"] == f"ok hello ::ffff:{WWW} 8080"
    assert refused(r["other_port"]) and refused(r["other_host"]), r
    seen = {(e["dst"].removeprefix("::ffff:"), e["port"]) for e in lab.received() if e["kind"] == "tcp"}
    assert (WWW, 8080) in seen and (WWW, 8081) not in seen and (OTHER, 8080) not in seen
    by_op = {e["operation"]: e for e in run.network_events()}
    # Each event names the skill, destination, port, protocol and the missing rule.
    event = by_op[f"connect tcp {WWW}:8081"]
    assert event["skill"] == "net-basic" and event["decision"] == "denied"
    assert f"no tcp/http rule grants {WWW}:8081" in event["rule"] and f"{WWW}:8080 (port 8080)" in event["rule"]
    assert by_op[f"connect tcp {OTHER}:8080"]["rule"] == f"no tcp/http rule grants {OTHER}:8080"
    # Counters: read from the skill's table before teardown.
    counters = [n for n in run.notes if "network: counters" in n]
    assert counters and "accepted 1" in counters[0] and "dropped 2" in counters[0], run.notes


def test_name_is_admitted_through_dns_then_reachable(lab):
    run = launch(lab, "net-dns", """\
        tcp:
          allowlist: ["www.example.test:8080", "alias.example.test:8081"]
        """, f"""\
        before = conn("{WWW}", 8080)
        names = res("www.example.test")
        out(before=before, names=names, after=conn("www.example.test", 8080),
            other_port=conn("{WWW}", 8081), alias=res("alias.example.test"),
            alias_conn=conn("alias.example.test", 8081), alias_other_port=conn("{WWW2}", 8080))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    assert refused(r["before"]), "an address is reachable before its name was resolved"
    assert r["names"] == [WWW]
    assert r["after"] == f"ok hello ::ffff:{WWW} 8080"
    assert refused(r["other_port"]), "a name rule admitted more ports than it names"
    assert r["alias"] == [WWW2] and r["alias_conn"] == f"ok hello ::ffff:{WWW2} 8081"  # through a CNAME
    assert refused(r["alias_other_port"])


def test_name_not_in_allowlist_is_refused_at_dns_and_at_connect(lab):
    run = launch(lab, "net-refused-name", """\
        tcp:
          allowlist: ["www.example.test:8080"]
        """, f"""\
        out(resolved=res("other.example.test"), direct=conn("{OTHER}", 8080))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    assert r["resolved"].startswith("err"), r
    assert refused(r["direct"])
    assert not [e for e in lab.received() if e.get("qname") == "other.example.test"], \
        "the stub forwarded a name no rule names"
    ops = {e["operation"]: e["rule"] for e in run.network_events()}
    assert "no tcp/http rule names other.example.test" in ops["dns query other.example.test A"]
    assert f"connect tcp {OTHER}:8080" in ops


def test_rebinding_answers_are_not_admitted(lab):
    run = launch(lab, "net-rebind", """\
        tcp:
          allowlist: ["*.example.test:8080"]
          private_names: ["corp.example.test"]
        """, f"""\
        out(loop=res("loop.example.test"), meta=res("meta.example.test"), metav6=res("metav6.example.test"),
            mappedloop=res("mappedloop.example.test"), private=res("private.example.test"),
            corp=res("corp.example.test"), mixed=res("mixed.example.test"),
            meta_conn=conn("169.254.169.254", 8080))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    for name in ("loop", "meta", "metav6", "mappedloop", "private"):
        assert isinstance(r[name], str) and r[name].startswith("err"), (name, r[name])
    assert r["corp"] == ["10.1.2.4"]  # private answer, but the manifest opts in for this name
    assert r["mixed"] == [WWW2]  # the loopback record is stripped, the public one kept
    assert refused(r["meta_conn"])
    rules = {e["operation"]: e["rule"] for e in run.network_events()}
    assert "loopback" in rules["dns answer loop.example.test -> 127.0.0.1"]
    assert "cloud metadata" in rules["dns answer meta.example.test -> 169.254.169.254"]
    assert "cloud metadata" in rules["dns answer metav6.example.test -> fd00:ec2::254"]
    assert "loopback" in rules["dns answer mappedloop.example.test -> ::ffff:127.0.0.1"]
    assert "private" in rules["dns answer private.example.test -> 10.1.2.3"]
    assert "loopback" in rules["dns answer mixed.example.test -> 127.0.0.1"]


def test_dns_to_another_server_and_udp_are_dropped(lab):
    run = launch(lab, "net-udp", f"""\
        tcp:
          allowlist: ["www.example.test:8080", "{WWW}:9999"]
        """, f"""\
        out(direct_dns=raw_dns("{DNS_SERVER}", "direct.example.test"),
            direct_dns_tcp=conn("{DNS_SERVER}", 53),
            via_stub=res("www.example.test"),
            udp_granted_tcp_host=udp("{WWW}", 9999, "probe-1"), udp_other=udp("{OTHER}", 9999, "probe-2"),
            udp_v6=udp("{V6}", 9999, "probe-3"))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    assert r["direct_dns"] != "answered" and refused(r["direct_dns_tcp"])
    assert r["via_stub"] == [WWW]
    received = lab.received()
    assert not [e for e in received if e.get("qname") == "direct.example.test"]
    assert not [e for e in received if e["kind"] == "udp" and e["data"].startswith("probe-")]
    ops = {e["operation"] for e in run.network_events()}
    assert {f"send udp {DNS_SERVER}:53", f"send udp {WWW}:9999", f"send udp {OTHER}:9999",
            f"send udp {V6}:9999"} <= ops
    rule = next(e["rule"] for e in run.network_events() if e["operation"] == f"send udp {WWW}:9999")
    assert "grant TCP only" in rule


def test_ipv6_and_ipv4_mapped_addresses(lab):
    run = launch(lab, "net-v6", f"""\
        tcp:
          allowlist: ["[{V6}]:8080", "[::ffff:{WWW}]:8081", "v6.example.test:8081", "mapped.example.test:8080"]
        """, f"""\
        out(v6=conn("{V6}", 8080), v6_other_port=conn("{V6}", 8081),
            mapped_literal=conn("::ffff:{WWW}", 8081, socket.AF_INET6), as_v4=conn("{WWW}", 8081),
            v6_name=res("v6.example.test"), v6_name_conn=conn("v6.example.test", 8081, socket.AF_INET6),
            mapped_name=res("mapped.example.test"),
            mapped_name_conn=conn("::ffff:{WWW2}", 8080, socket.AF_INET6),
            mapped_name_v4=conn("{WWW2}", 8080), mapped_other_port=conn("{WWW2}", 8081))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    assert r["v6"] == f"ok hello {V6} 8080" and refused(r["v6_other_port"])
    # [::ffff:a.b.c.d] is the IPv4 host: reachable from AF_INET6 (mapped) and AF_INET sockets.
    assert r["mapped_literal"] == f"ok hello ::ffff:{WWW} 8081" and r["as_v4"] == r["mapped_literal"]
    assert r["v6_name"] == [V6] and r["v6_name_conn"] == f"ok hello {V6} 8081"
    # A mapped AAAA answer admits the IPv4 address it carries.
    assert r["mapped_name"] == [f"::ffff:{WWW2}"]
    assert r["mapped_name_conn"] == f"ok hello ::ffff:{WWW2} 8080" and r["mapped_name_v4"] == r["mapped_name_conn"]
    assert refused(r["mapped_other_port"])


def test_http_rule_is_host_and_port(lab):
    run = launch(lab, "net-http", """\
        http:
          allowlist: ["http://www.example.test/api/**"]
        """, f"""\
        import urllib.request
        body = urllib.request.urlopen("http://www.example.test/other/path", timeout=5).read().decode().strip()
        out(body=body, other_port=conn("{WWW}", 8080))
        """)
    r = run.result
    assert run.code == 0, run.stderr
    # The path is not enforceable in the kernel (validate warns); host and port are.
    assert r["body"] == "netlab http ok" and refused(r["other_port"])


def test_nothing_is_left_after_the_skill_exits(lab):
    run = launch(lab, "net-exit", f"""\
        tcp:
          allowlist: ["www.example.test:8080"]
        """, """\
        out(netns=os.readlink("/proc/self/ns/net"), names=res("www.example.test"))
        """)
    assert run.code == 0, run.stderr
    netns = run.result["netns"]
    ok, links, holders = _gone(lab, netns)
    assert ok, f"left behind: links {links}, netns held by {holders}"
    assert lab.host_tables() == ["table inet skillguard_nat"]  # the one shared table, no per-skill rule
    rules = lab.in_host("nft", "list", "table", "inet", "skillguard_nat").stdout
    assert rules.count("masquerade") == 2 and "sgv" in rules and "10.99.0.0/24" in rules


def test_nothing_is_left_after_the_supervisor_is_sigkilled(lab):
    proc = start(lab, "net-kill", """\
        tcp:
          allowlist: ["www.example.test:8080"]
        """, """\
        res("www.example.test")
        out(netns=os.readlink("/proc/self/ns/net"))
        time.sleep(60)
        """)
    try:
        line = proc.stdout.readline()
        netns = json.loads(line)["netns"]
        assert [l for l in lab.host_links() if l.startswith("sgv")], "the skill's veth should exist while it runs"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    ok, links, holders = _gone(lab, netns)
    assert ok, f"left behind after SIGKILL: links {links}, netns held by {holders}"
    assert lab.host_tables() == ["table inet skillguard_nat"]
    # The killed supervisor's cgroup directories (empty once its skill died)
    # are what the skill's next launch removes (agent/launch/supervisor.py).
    from agent.enforce.cgroup import remove_stale_instances
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    left = [Path(m, "skillguard", "net-kill", f"run-{proc.pid}")
            for m in [mounts.v2, *mounts.v1.values()] if m is not None]
    assert any(p.is_dir() for p in left), "the killed supervisor's cgroups should still be there"
    deadline = time.monotonic() + 10
    while any(p.exists() for p in left) and time.monotonic() < deadline:
        remove_stale_instances("net-kill", "run-", mounts)  # EBUSY until the init has died
        time.sleep(0.05)
    assert not any(p.exists() for p in left), left


def test_two_skills_do_not_see_each_others_grants(lab):
    a = start(lab, "net-a", """\
        tcp:
          allowlist: ["www.example.test:8080"]
        """, f"""\
        out(names=res("www.example.test"), own=conn("{WWW}", 8080), other=conn("{OTHER}", 8080),
            slot=[l for l in open("/proc/net/fib_trie").read().split() if l.startswith("10.99.")][:1])
        time.sleep(1.5)
        out(later_own=conn("{WWW}", 8080), later_other=conn("{OTHER}", 8080))
        """)
    b = start(lab, "net-b", f"""\
        tcp:
          allowlist: ["{OTHER}:8080"]
        """, f"""\
        time.sleep(0.7)  # net-a has resolved and admitted {WWW} by now
        out(own=conn("{OTHER}", 8080), others_name=res("www.example.test"), others_addr=conn("{WWW}", 8080))
        time.sleep(0.8)
        """)
    try:
        sa, ea = a.communicate(timeout=60)
        sb, eb = b.communicate(timeout=60)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    ra, rb = Launch(a, sa, ea), Launch(b, sb, eb)
    assert ra.code == 0 and rb.code == 0, (ea, eb)
    a_out, b_out = ra.result, rb.result
    assert a_out["names"] == [WWW] and a_out["own"].startswith("ok") and a_out["later_own"].startswith("ok")
    assert refused(a_out["other"]) and refused(a_out["later_other"])
    assert b_out["own"].startswith("ok")
    assert isinstance(b_out["others_name"], str) and refused(b_out["others_addr"])


def test_events_are_rate_limited_and_the_rest_counted(lab):
    run = launch(lab, "net-flood", f"""\
        tcp:
          allowlist: ["{WWW}:8080"]
        """, f"""\
        def blocking(host, port):  # no timeout: a blocking connect must fail at once too
            s = socket.socket()
            try:
                s.connect((host, port)); return "ok"
            except OSError as e:
                return "err " + os.strerror(e.errno)
            finally:
                s.close()
        out(results=sorted({{blocking("{OTHER}", 9000 + i) for i in range(100)}}))
        """)
    assert run.code == 0, run.stderr
    assert all(refused(x) for x in run.result["results"])
    drops = [e for e in run.network_events() if e["operation"].startswith("connect tcp")]
    summary = [e for e in run.network_events() if e["operation"] == "rate-limited network events"]
    assert 0 < len(drops) < 100 and len(summary) == 1, run.network_events()
    held = int(summary[0]["detail"].split()[0])
    others = [e for e in run.network_events() if e not in drops and e not in summary]
    assert len(drops) + len(others) + held == 100, (summary[0], others)
    assert "100 packet(s) dropped" in summary[0]["detail"]


def test_network_set_up_failure_fails_closed(lab):
    (lab.workdir / "bad-upstream.yaml").write_text(f'address_pool: "{POOL}"\ndns_upstream: ["not-an-ip"]\n')
    (lab.workdir / "tiny-pool.yaml").write_text(f'address_pool: "10.98.0.0/28"\ndns_upstream: ["{DNS_SERVER}"]\n')
    program = 'open("/proc/self/comm"); out(started=True)'
    body = """\
        tcp:
          allowlist: ["www.example.test:8080"]
        """
    bad = launch(lab, "net-bad-upstream", body, program, config="bad-upstream.yaml")
    assert bad.code == 125 and "started" not in bad.result
    assert "network" in bad.stderr and "dns_upstream" in bad.stderr, bad.stderr
    # Every /30 of the pool in use: the launch is refused, nothing is left.
    for host in ("10.98.0.1", "10.98.0.5", "10.98.0.9", "10.98.0.13"):
        subprocess.run(["ip", "-n", lab.host, "addr", "add", f"{host}/32", "dev", "lo"], check=True)
    try:
        full = launch(lab, "net-full", body, program, config="tiny-pool.yaml")
    finally:
        for host in ("10.98.0.1", "10.98.0.5", "10.98.0.9", "10.98.0.13"):
            subprocess.run(["ip", "-n", lab.host, "addr", "del", f"{host}/32", "dev", "lo"], check=False)
    assert full.code == 125 and "started" not in full.result
    assert "network" in full.stderr and "exhausted" in full.stderr, full.stderr
    assert not [l for l in lab.host_links() if l.startswith("sgv")]


def test_the_agents_own_addresses_stay_closed_even_under_a_wide_rule(lab):
    # A service on the simulated host, listening on every address it has.
    service = subprocess.Popen(
        ["nsenter", f"--net={lab.host_netns_path}", sys.executable, "-c",
         "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 2222)); s.listen(8); print('ready', flush=True)\n"
         "while True:\n    c, p = s.accept(); print(p[0], flush=True); c.close()\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout.readline().strip() == "ready"
        run = launch(lab, "net-own", """\
            tcp:
              allowlist: ["10.0.0.0/8:*", "169.254.0.0/16:*", "192.0.2.0/24:2222"]
            """, """\
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); probe.connect(("198.51.100.10", 9))
            mine = probe.getsockname()[0]
            gateway = mine.rsplit(".", 1)[0] + "." + str(int(mine.rsplit(".", 1)[1]) - 1)
            out(mine=mine, gateway=conn(gateway, 2222), resolver=conn("169.254.53.53", 2222),
                uplink=conn("192.0.2.2", 2222))
            """)
    finally:
        service.kill()
        service.wait()
    r = run.result
    assert run.code == 0, run.stderr
    assert r["mine"].startswith("10.99.0.")
    assert refused(r["gateway"]) and refused(r["resolver"]), r
    # A literal rule naming another address of the host is taken as written.
    assert r["uplink"] == "ok "  # the service closes at once: connected, then EOF
    rules = {e["operation"]: e["rule"] for e in run.network_events()}
    assert "the agent's own addresses" in rules["connect tcp 169.254.53.53:2222"]


def test_a_skill_cannot_send_tcp_segments_the_stateless_table_would_not_check(lab):
    """The skill's table checks TCP only where a connection opens (a SYN
    without ACK) and lets later segments pass; that holds only because a
    skill cannot make a segment itself: no raw or packet socket, no TCP
    repair mode, and a source route (IPv4 options, an IPv6 routing header,
    both settable without privilege) that would send a connection's
    segments to another first hop makes them checked like a SYN."""
    run = launch(lab, "net-forge", f"""\
        tcp:
          allowlist: ["{WWW}:{ECHO_PORT}", "[{V6}]:{ECHO_PORT}"]
        """, f"""\
        def attempt(fn):
            try:
                fn(); return "ok"
            except OSError as e:
                return "err " + os.strerror(e.errno)
        def repair():
            s = socket.socket(); s.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
        def rerouted(host, family, level, option, value):
            s = socket.create_connection((host, {ECHO_PORT}), timeout=3)
            s.sendall(b"before\\n"); before = s.recv(100).decode().strip()
            try:
                s.setsockopt(level, option, value)
            except OSError as e:
                return [before, "setsockopt err " + os.strerror(e.errno)]
            s.sendall(b"after\\n"); s.settimeout(1.5)
            try:
                after = s.recv(100).decode().strip() or "eof"
            except OSError as e:
                after = "err " + (os.strerror(e.errno) if e.errno else str(e))
            return [before, after]
        lsrr = bytes([0x83, 7, 4]) + socket.inet_aton("{OTHER}") + bytes([1])  # loose source route via OTHER
        segments = [socket.inet_pton(socket.AF_INET6, a) for a in ("{V6}", "2001:db8::99")]
        srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + b"".join(segments)  # segment routing header via 2001:db8::99
        out(raw_tcp=attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)),
            raw6=attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)),
            packet=attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)),
            sock_packet=attempt(lambda: socket.socket(socket.AF_INET, 10, 0)),  # SOCK_PACKET
            repair=attempt(repair),
            lsrr=rerouted("{WWW}", socket.AF_INET, socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr),
            srh=rerouted("{V6}", socket.AF_INET6, socket.IPPROTO_IPV6, 57, srh))  # IPV6_RTHDR
        """)
    r = run.result
    assert run.code == 0, run.stderr
    for name in ("raw_tcp", "raw6", "packet", "sock_packet", "repair"):
        assert r[name] == "err " + os.strerror(errno.EPERM), (name, r[name])
    # The connection works; once its segments carry a source route they are
    # checked against the first hop, which no rule grants, and go nowhere.
    # An IPv4 source route needs CAP_NET_RAW on this kernel (EPERM); an IPv6
    # segment routing header does not.
    ops = {e["operation"] for e in run.network_events()}
    assert r["srh"][0] == "before" and r["srh"][1] != "after", r["srh"]
    assert f"connect tcp 2001:db8::99:{ECHO_PORT}" in ops, ops
    assert r["lsrr"][0] == "before", r["lsrr"]
    if r["lsrr"][1] != "setsockopt err " + os.strerror(errno.EPERM):
        assert r["lsrr"][1] != "after" and f"connect tcp {OTHER}:{ECHO_PORT}" in ops, (r["lsrr"], ops)
    echoed = [e["data"] for e in lab.received() if e["kind"] == "echo"]
    assert "after\n" not in echoed


def _attached(lab: NetLab, body: str, skill, ttl_floor: int) -> dict:
    """Run `skill()` (returns a dict) in a forked child with its own network
    namespace, set up by the launcher's own NetnsHandle inside the lab's
    simulated host with a DNS TTL floor of `ttl_floor` seconds (the host
    config has no knob for it), the DNS stub and NFLOG served until the
    child is done. Returns {"skill": ..., "counters": ..., "events": [...]}."""
    import dataclasses
    import select

    result_r, result_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        out: dict = {}
        try:
            from agent.config import HostConfig
            from agent.enforce.libc import CLONE_NEWNET, unshare
            from agent.launch.netns import NetnsHandle, _setns, plan_network
            from agent.manifest import load_text

            host_fd = os.open(lab.host_netns_path, os.O_RDONLY)
            _setns(host_fd)
            policy = load_text(f'name: net-direct\nversion: "1"\npermissions:\n'
                               f'{textwrap.indent(textwrap.dedent(body), "  ")}').policy
            spec = plan_network(policy, HostConfig(address_pool=POOL, dns_upstream=(DNS_SERVER,)),
                                str(lab.workdir / "state"))
            spec = dataclasses.replace(spec, ttl_floor=ttl_floor)
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            child = os.fork()
            if child == 0:
                try:
                    unshare(CLONE_NEWNET)
                    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # as the launcher's child does
                    os.write(done_w, b"u")
                    os.read(go_r, 1)
                    try:
                        reply = skill()
                    except BaseException as exc:  # noqa: BLE001 - report to the helper
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    os.write(done_w, json.dumps(reply).encode())
                finally:
                    os._exit(0)
            assert os.read(done_r, 1) == b"u"
            events: list = []
            handle = NetnsHandle(spec, emit=lambda **kw: events.append(kw), note=lambda _text: None)
            try:
                handle.attach(child)
                os.write(go_w, b"g")
                readers = handle.readers()
                data = b""
                deadline = time.monotonic() + 30
                os.close(done_w)
                while time.monotonic() < deadline:
                    ready, _, _ = select.select(list(readers) + [done_r], [], [], 0.5)
                    for fd in ready:
                        if fd == done_r:
                            chunk = os.read(done_r, 65536)
                            if not chunk:
                                deadline = 0
                            data += chunk
                        else:
                            readers[fd](fd, select.POLLIN)
                out["skill"] = json.loads(data or b"{}")
            finally:
                os.waitpid(child, 0)
                out["counters"] = handle.close()
            out["events"] = [{"operation": e["operation"], "rule": e["rule"]} for e in events]
        except BaseException as exc:  # noqa: BLE001 - report to the test
            out["error"] = f"{type(exc).__name__}: {exc}"
        os.write(result_w, json.dumps(out).encode())
        os._exit(0)
    os.close(result_w)
    data = b""
    while chunk := os.read(result_r, 65536):
        data += chunk
    os.close(result_r)
    os.waitpid(helper, 0)
    out = json.loads(data)
    assert "error" not in out, out["error"]
    assert "error" not in out["skill"], out["skill"]["error"]
    return out


def test_a_connection_outlives_its_dns_admission_new_ones_do_not(lab):
    """The table checks TCP when a connection opens, so an address admitted
    through DNS for 1 s (the record's TTL, with a floor of 1 s here) keeps
    its established connection after the set element timed out, while a
    new connection and UDP to it are refused. No connection tracking runs
    in the skill's namespace (the table has no ct expression)."""

    def skill() -> dict:
        import dns.message
        import dns.query

        answer = dns.query.udp(dns.message.make_query("short.example.test", "A"), "169.254.53.53", timeout=3)
        addresses = sorted(r.address for rrset in answer.answer for r in rrset if rrset.rdtype == 1)
        s = socket.create_connection((WWW2, ECHO_PORT), timeout=3)
        s.sendall(b"one\n")
        one = s.recv(100).decode().strip()
        time.sleep(2.5)  # the element's timeout (1 s) has passed
        s.sendall(b"two\n")
        two = s.recv(100).decode().strip()
        try:
            socket.create_connection((WWW2, ECHO_PORT), timeout=3).close()
            new = "ok"
        except OSError as exc:
            new = "err " + (os.strerror(exc.errno) if exc.errno else str(exc))
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"late", (WWW2, 9999))
            udp = "sent"
        except OSError as exc:
            udp = "err " + (os.strerror(exc.errno) if exc.errno else str(exc))
        s.close()
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as fh:
            tracked = int(fh.read())
        return {"addresses": addresses, "ttl": answer.answer[0].ttl, "one": one, "two": two, "new": new,
                "udp": udp, "tracked": tracked}

    out = _attached(lab, f"""\
        tcp:
          allowlist: ["short.example.test:{ECHO_PORT}"]
        """, skill, ttl_floor=1)
    r = out["skill"]
    assert r["addresses"] == [WWW2] and r["ttl"] == 1, r
    assert r["one"] == "one" and r["two"] == "two", "an established connection was cut when its address expired"
    assert refused(r["new"]), "a new connection to an expired address was let through"
    assert r["udp"] == "err " + os.strerror(errno.EPERM)
    assert r["tracked"] == 0, "connection tracking runs in the skill's namespace"
    assert out["counters"]["accepted"] == 1  # the one SYN that opened the connection
    assert f"connect tcp {WWW2}:{ECHO_PORT}" in {e["operation"] for e in out["events"]}
