from pathlib import Path

import pytest

from agent.enforce.cgroupfs import cgroup_mounts, cgroup_mounts_from, parse_mountinfo

HYBRID = """\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

PURE_V2 = """\
25 30 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""

V1_ONLY = """\
20 1 0:19 / /cg/mem\\040limits rw,relatime - cgroup none rw,memory,release_agent=/bin/true
21 1 0:20 / /cg/cpu rw,relatime - cgroup none rw,noprefix,cpu,cpuacct,cpuset
22 1 0:21 / /cg/pids rw,relatime - cgroup none rw,pids
23 1 0:20 /sub /elsewhere/cpu rw,relatime - cgroup none rw,noprefix,cpu,cpuacct,cpuset
"""


def test_parse_line_fields():
    mounts = parse_mountinfo(HYBRID)
    assert len(mounts) == 7
    cpu = mounts[2]
    assert cpu.mount_id == 32 and cpu.parent_id == 31 and cpu.device == "0:29"
    assert cpu.root == "/"
    assert cpu.mount_point == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert cpu.mount_options == ("rw", "nosuid", "nodev", "noexec", "relatime")
    assert cpu.fstype == "cgroup" and cpu.source == "cgroup"
    assert cpu.super_options == ("rw", "cpu", "cpuacct")


def test_hybrid():
    cg = cgroup_mounts_from(parse_mountinfo(HYBRID))
    assert cg.v2 == Path("/sys/fs/cgroup/unified")
    assert cg.v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }
    assert cg.named == {"systemd": Path("/sys/fs/cgroup/systemd")}


def test_pure_v2():
    cg = cgroup_mounts_from(parse_mountinfo(PURE_V2))
    assert cg.v2 == Path("/sys/fs/cgroup")
    assert cg.v1 == {} and cg.named == {}


def test_v1_only_escapes_options_and_first_mount_wins():
    cg = cgroup_mounts_from(parse_mountinfo(V1_ONLY))
    assert cg.v2 is None
    assert cg.v1["memory"] == Path("/cg/mem limits")  # \040 is a space
    assert cg.v1["cpu"] == cg.v1["cpuset"] == Path("/cg/cpu")  # not the later bind mount
    assert cg.v1["pids"] == Path("/cg/pids")
    assert set(cg.v1) == {"memory", "cpu", "cpuacct", "cpuset", "pids"}  # no rw/noprefix/release_agent


def test_malformed_line_names_the_line():
    with pytest.raises(ValueError, match="malformed mountinfo line"):
        parse_mountinfo("1 2 0:3 / /x rw\n")


def test_reader_reads_a_mountinfo_file(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(HYBRID)
    assert cgroup_mounts(str(path)).v2 == Path("/sys/fs/cgroup/unified")
