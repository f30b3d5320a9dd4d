"""compile_landlock / downgrade / glob_expand as pure functions on a fake tree."""
from __future__ import annotations

import ipaddress

import pytest

from agent.compile.landlock import (
    DEFAULT_BASE_PROFILE,
    FILE_RIGHTS,
    BaseEntry,
    BaseProfile,
    LandlockCompileError,
    PathRule,
    compile_landlock,
    downgrade,
    glob_expand,
    load_base_profile,
)
from agent.manifest.model import (
    DirGrant,
    FsPolicy,
    HostPattern,
    HttpPolicy,
    Policy,
    TcpPolicy,
    TcpRule,
    UrlRule,
)

ALL_FS = ("execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file",
          "make_char", "make_dir", "make_reg", "make_sock", "make_fifo", "make_block",
          "make_sym", "refer", "truncate", "ioctl_dev")
RW = ("write_file", "read_file", "read_dir", "remove_dir", "remove_file", "make_dir",
      "make_reg", "make_sock", "make_fifo", "make_sym", "refer", "truncate", "ioctl_dev")


class FakeFs:
    """A tree of directories and files given as absolute paths."""

    def __init__(self, dirs=(), files=(), symlinked_dirs=()):
        self.dirs = {"/"} | set(dirs) | set(symlinked_dirs)
        self.files = set(files)
        self.symlinked = set(symlinked_dirs)
        for path in list(self.dirs | self.files):
            parent = path.rsplit("/", 1)[0] or "/"
            while parent not in self.dirs:
                self.dirs.add(parent)
                parent = parent.rsplit("/", 1)[0] or "/"

    def isdir(self, path):
        return path in self.dirs

    def exists(self, path):
        return path in self.dirs or path in self.files

    def _children(self, path):
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0]
                       for p in self.dirs | self.files if p.startswith(prefix) and p != path})

    def list_subdirs(self, path):
        prefix = path.rstrip("/") + "/"
        return [n for n in self._children(path)
                if prefix + n in self.dirs and prefix + n not in self.symlinked]

    def list_names(self, path):
        return self._children(path)

    def expand(self, pattern):
        return glob_expand(pattern, list_subdirs=self.list_subdirs, isdir=self.isdir)


BASE = BaseProfile(
    rules=(
        BaseEntry("/usr", ("execute", "read_file", "read_dir")),
        BaseEntry("/lib32", ("execute", "read_file", "read_dir")),
        BaseEntry("/etc/hosts", ("read_file", "read_dir")),
        BaseEntry("/etc/python3*", ("read_file", "read_dir")),
        BaseEntry("/dev/null", ("read_file", "write_file")),
    ),
    never=("/etc/shadow", "/root", "/home", "/var/lib/skillguard"),
    agent_private=("/etc/shadow", "/var/lib/skillguard", "/etc/skillguard"),
    source="test-base",
)

FS = FakeFs(
    dirs=("/usr/bin", "/etc/python3", "/etc/python3.11", "/data/a/src", "/data/b/src",
          "/data/b/deep/x/src", "/data/c", "/srv/ref", "/var/lib/skillguard/s/demo"),
    files=("/etc/hosts", "/dev/null", "/etc/python3-not-a-dir", "/data/notes.txt",
           "/opt/tool/bin/run"),
    symlinked_dirs=("/data/link",),
)


def policy(dirs=(), tcp=(), http=(), entrypoint=()):
    return Policy(
        name="demo", version="1", entrypoint=tuple(entrypoint),
        fs=FsPolicy(enabled=bool(dirs), dirs=tuple(DirGrant(p, a) for p, a in dirs)),
        tcp=TcpPolicy(enabled=bool(tcp), allowlist=tuple(tcp)),
        http=HttpPolicy(enabled=bool(http), allowlist=tuple(http)),
    )


def build(pol, fs=FS, **kw):
    kw.setdefault("install_dir", "/opt/skillguard/agent")
    kw.setdefault("realpath", lambda p: p)
    return compile_landlock(pol, expand=fs.expand, exists=fs.exists, isdir=fs.isdir,
                            list_names=fs.list_names, base=BASE, **kw)


def rules_by_origin(artifact, prefix):
    return [r for r in artifact.path_rules if r.origin.startswith(prefix)]


def tcp(port, host="10.0.0.1"):
    return TcpRule(HostPattern(host, networks=(ipaddress.ip_network(host),)), port, f"{host}:{port}")


def url(port, name="api.example.com", scheme="https"):
    return UrlRule(scheme, HostPattern(name, name=name), port, "/**", f"{scheme}://{name}:{port}/")


# ------------------------------------------------------------ rights per mode


def test_ro_grants_read_only_without_execute():
    art = build(policy(dirs=[("/srv/ref", "ro")]))
    assert rules_by_origin(art, "manifest") == [
        PathRule("/srv/ref", ("read_file", "read_dir"), "manifest:/srv/ref:ro")]


def test_rw_grants_all_but_execute_and_device_nodes():
    (rule,) = rules_by_origin(build(policy(dirs=[("/data/c", "rw")])), "manifest")
    assert rule.access == RW
    assert "execute" not in rule.access
    assert "make_char" not in rule.access and "make_block" not in rule.access


def test_handles_every_right_of_current_abi_in_kernel_order():
    art = build(policy())
    assert art.abi == 7
    assert art.handled_fs == ALL_FS


def test_rights_are_in_kernel_bit_order():
    art = build(policy(dirs=[("/data/c", "rw"), ("/srv/ref", "ro")]), state_dir="/data/a")
    order = {name: i for i, name in enumerate(ALL_FS)}
    for rule in art.path_rules:
        assert list(rule.access) == sorted(rule.access, key=order.__getitem__), rule


# ------------------------------------------------------------ file vs directory


def test_rw_on_a_file_is_masked_to_file_rights():
    (rule,) = rules_by_origin(build(policy(dirs=[("/data/notes.txt", "rw")])), "manifest")
    assert rule.access == ("write_file", "read_file", "truncate", "ioctl_dev")
    assert set(rule.access) <= FILE_RIGHTS


def test_ro_on_a_file_keeps_read_file_only():
    (rule,) = rules_by_origin(build(policy(dirs=[("/data/notes.txt", "ro")])), "manifest")
    assert rule.access == ("read_file",)


def test_base_file_entries_are_masked():
    art = build(policy())
    hosts = [r for r in art.path_rules if r.path == "/etc/hosts"]
    assert hosts == [PathRule("/etc/hosts", ("read_file",), "base")]


def test_entrypoint_and_exec_paths_get_execute():
    art = build(policy(entrypoint=["/opt/tool/bin/run", "--flag"]),
                exec_paths=("/usr/bin/git",))
    assert PathRule("/opt/tool/bin/run", ("execute", "read_file"), "entrypoint") in art.path_rules
    assert PathRule("/usr/bin/git", ("execute", "read_file"), "exec") in art.path_rules


def test_relative_entrypoint_is_a_note_not_a_rule():
    art = build(policy(entrypoint=["python3", "main.py"]))
    assert not rules_by_origin(art, "entrypoint")
    assert any("python3" in n and "exec_paths" in n for n in art.notes)


# ------------------------------------------------------------ base profile


def test_missing_base_paths_are_skipped_with_a_note():
    art = build(policy())
    assert "/lib32" not in [r.path for r in art.path_rules]
    assert any("/lib32" in n and "skipped" in n for n in art.notes)


def test_base_glob_matches_existing_names():
    art = build(policy())
    paths = [r.path for r in art.path_rules if r.origin == "base"]
    assert "/etc/python3" in paths and "/etc/python3.11" in paths
    # A file matching the glob is masked to file rights, not dropped.
    assert PathRule("/etc/python3-not-a-dir", ("read_file",), "base") in art.path_rules


def test_base_entry_reaching_a_never_path_is_an_error():
    bad = BaseProfile(rules=(BaseEntry("/", ("read_file", "read_dir")),), never=("/root",),
                      agent_private=(), source="bad")
    with pytest.raises(LandlockCompileError, match="forbidden /root"):
        compile_landlock(policy(), base=bad, exists=FS.exists, isdir=FS.isdir,
                         install_dir="/opt/x")


def test_base_entry_inside_never_fails_even_if_absent_on_host():
    bad = BaseProfile(rules=(BaseEntry("/home/alice", ("read_file",)),), never=("/home",),
                      agent_private=(), source="bad")
    with pytest.raises(LandlockCompileError, match="/home/alice"):
        compile_landlock(policy(), base=bad, exists=lambda p: False, isdir=FS.isdir,
                         install_dir="/opt/x")


def test_install_dir_under_base_tree_is_noted():
    art = build(policy(), install_dir="/usr/lib/python3/dist-packages/agent")
    assert any("install dir" in n and "/usr" in n for n in art.notes)


def test_shipped_base_profile_parses_and_avoids_secrets():
    base = load_base_profile(DEFAULT_BASE_PROFILE)
    paths = {e.path for e in base.rules}
    assert {"/usr", "/etc/ld.so.cache", "/proc", "/dev/null", "/etc/alternatives"} <= paths
    for forbidden in ("/etc/shadow", "/etc/gshadow", "/root", "/home", "/var/lib/skillguard",
                      "/etc/skillguard", "/run/skillguard"):
        assert forbidden in base.never
    assert "/dev/tty" not in paths and "/tmp" not in paths and "/etc/ssl" not in paths
    # Compiling against the shipped profile on an empty fake host works.
    empty = FakeFs()
    art = compile_landlock(policy(), base=base, exists=empty.exists, isdir=empty.isdir,
                           list_names=empty.list_names, install_dir="/opt/x")
    assert art.path_rules == ()
    assert len([n for n in art.notes if n.startswith("base:")]) == len(base.rules)


def test_base_profile_rejects_unknown_rights(tmp_path):
    bad = tmp_path / "base.yaml"
    bad.write_text("version: 1\nrules:\n  - {path: /usr, access: [read_everything]}\n")
    with pytest.raises(LandlockCompileError, match="read_everything"):
        load_base_profile(bad)


# ------------------------------------------------------------ agent-private paths


@pytest.mark.parametrize("path", ["/", "/var/lib", "/var/lib/skillguard",
                                  "/var/lib/skillguard/s/demo", "/etc", "/etc/skillguard/x"])
def test_manifest_may_not_reach_agent_private_paths(path):
    with pytest.raises(LandlockCompileError, match="private"):
        build(policy(dirs=[(path, "ro")]))


def test_manifest_may_not_reach_the_install_dir():
    with pytest.raises(LandlockCompileError, match="private"):
        build(policy(dirs=[("/opt", "ro")]))


def test_manifest_symlink_into_agent_private_is_refused():
    links = {"/data/c": "/etc/skillguard"}
    with pytest.raises(LandlockCompileError, match="/data/c reaches"):
        build(policy(dirs=[("/data/c", "ro")]), realpath=lambda p: links.get(p, p))


def test_state_dir_is_rw_even_under_agent_state():
    art = build(policy(), state_dir="/var/lib/skillguard/s/demo")
    assert rules_by_origin(art, "state-dir") == [
        PathRule("/var/lib/skillguard/s/demo", RW, "state-dir")]


def test_state_dir_may_not_contain_agent_private():
    with pytest.raises(LandlockCompileError, match="state dir"):
        build(policy(), state_dir="/var/lib")


# ------------------------------------------------------------ globs


def test_star_matches_one_segment():
    assert FS.expand("/data/*/src") == ["/data/a/src", "/data/b/src"]


def test_double_star_matches_any_depth_including_zero():
    assert FS.expand("/data/**/src") == ["/data/a/src", "/data/b/deep/x/src", "/data/b/src"]
    assert FS.expand("/data/b/**") == ["/data/b", "/data/b/deep", "/data/b/deep/x",
                                       "/data/b/deep/x/src", "/data/b/src"]


def test_star_within_a_segment():
    assert FS.expand("/etc/python3.*") == ["/etc/python3.11"]


def test_globs_match_directories_only_and_skip_symlinks():
    assert FS.expand("/data/*") == ["/data/a", "/data/b", "/data/c"]


def test_glob_grant_expands_to_sorted_rules():
    art = build(policy(dirs=[("/data/*/src", "rw")]))
    assert [(r.path, r.origin) for r in rules_by_origin(art, "manifest")] == [
        ("/data/a/src", "manifest:/data/*/src:rw"), ("/data/b/src", "manifest:/data/*/src:rw")]


def test_glob_rules_covered_by_an_outer_match_are_dropped():
    art = build(policy(dirs=[("/data/b/**", "ro")]))
    assert [r.path for r in rules_by_origin(art, "manifest")] == ["/data/b"]


def test_glob_matching_nothing_is_a_note():
    art = build(policy(dirs=[("/nowhere/*", "ro")]))
    assert not rules_by_origin(art, "manifest")
    assert any("/nowhere/*" in n and "matches no directory" in n for n in art.notes)


def test_missing_literal_grant_stays_for_the_enforcer_to_reject():
    art = build(policy(dirs=[("/does/not/exist", "ro")]))
    assert [r.path for r in rules_by_origin(art, "manifest")] == ["/does/not/exist"]


def test_glob_expand_on_real_tree(tmp_path):
    for sub in ("p1/src", "p2/src", "p2/docs"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "src").write_text("a file, not a dir")
    (tmp_path / "loop").symlink_to(tmp_path)
    assert glob_expand(f"{tmp_path}/*/src") == [f"{tmp_path}/p1/src", f"{tmp_path}/p2/src"]
    assert glob_expand(f"{tmp_path}/**/src") == [f"{tmp_path}/p1/src", f"{tmp_path}/p2/src"]


# ------------------------------------------------------------ network


def test_no_network_grant_handles_connect_with_no_ports():
    art = build(policy())
    assert art.handled_net == ("bind_tcp", "connect_tcp")
    assert art.connect_ports == ()


def test_ports_from_tcp_and_http_rules_sorted_and_deduplicated():
    art = build(policy(tcp=[tcp(5432), tcp(22), tcp(5432, "10.0.0.2")],
                       http=[url(443, scheme="https"), url(8080, scheme="http")]))
    assert art.handled_net == ("bind_tcp", "connect_tcp")
    # 53: DNS over TCP because the http rules name hosts.
    assert art.connect_ports == (22, 53, 443, 5432, 8080)


def test_ip_only_rules_do_not_open_dns():
    art = build(policy(tcp=[tcp(5432)]))
    assert art.connect_ports == (5432,)


def test_any_port_tcp_rule_leaves_connect_to_nftables():
    art = build(policy(tcp=[tcp(None), tcp(22)]))
    assert art.handled_net == ("bind_tcp",)
    assert art.connect_ports == ()
    assert any("connect_tcp not handled" in n and "nftables" in n for n in art.notes)


def test_disabled_blocks_grant_nothing():
    pol = Policy(name="d", version="1",
                 tcp=TcpPolicy(enabled=False, allowlist=(tcp(22),)),
                 fs=FsPolicy(enabled=False, dirs=(DirGrant("/data/c", "rw"),)))
    art = build(pol)
    assert art.connect_ports == () and not rules_by_origin(art, "manifest")


def test_scopes_always_both():
    assert build(policy()).scopes == ("abstract_unix_socket", "signal")


# ------------------------------------------------------------ downgrade


@pytest.fixture
def full():
    return build(policy(dirs=[("/data/c", "rw"), ("/data/notes.txt", "rw")], tcp=[tcp(22)]),
                 state_dir="/var/lib/skillguard/s/demo")


def test_downgrade_to_current_or_newer_is_identity(full):
    assert downgrade(full, 7) == (full, [])
    assert downgrade(full, 8) == (full, [])


def test_downgrade_abi6_only_lowers_abi(full):
    fitted, dropped = downgrade(full, 6)
    assert fitted.abi == 6 and dropped == []
    assert fitted.handled_fs == full.handled_fs and fitted.scopes == full.scopes


def test_downgrade_abi5_drops_scopes(full):
    fitted, dropped = downgrade(full, 5)
    assert fitted.scopes == ()
    assert fitted.handled_net == full.handled_net and fitted.connect_ports == (22,)
    assert len(dropped) == 1 and "scopes" in dropped[0]


def test_downgrade_abi4_drops_ioctl_dev(full):
    fitted, dropped = downgrade(full, 4)
    assert "ioctl_dev" not in fitted.handled_fs
    assert all("ioctl_dev" not in r.access for r in fitted.path_rules)
    assert fitted.handled_net == ("bind_tcp", "connect_tcp")
    assert any("ioctl_dev" in d for d in dropped) and any("scopes" in d for d in dropped)


def test_downgrade_abi3_drops_network(full):
    fitted, dropped = downgrade(full, 3)
    assert fitted.handled_net == () and fitted.connect_ports == ()
    assert "truncate" in fitted.handled_fs
    assert any("net" in d and "nftables" in d for d in dropped)


def test_downgrade_abi1_drops_refer_and_truncate_and_says_so(full):
    fitted, dropped = downgrade(full, 1)
    assert fitted.abi == 1
    assert fitted.handled_fs == ALL_FS[:13]
    for rule in fitted.path_rules:
        assert not {"refer", "truncate", "ioctl_dev"} & set(rule.access)
    text = " ".join(dropped)
    for word in ("refer", "truncate", "ioctl_dev", "net", "scopes", "rename"):
        assert word in text


def test_downgrade_reports_rules_left_empty():
    only_ioctl = build(policy())
    only_ioctl = type(only_ioctl)(7, only_ioctl.handled_fs,
                                  (PathRule("/dev/x", ("ioctl_dev",), "test"),), (), (), (), ())
    fitted, dropped = downgrade(only_ioctl, 4)
    assert fitted.path_rules == ()
    assert any("/dev/x" in d for d in dropped)


def test_downgrade_refuses_abi0(full):
    with pytest.raises(LandlockCompileError):
        downgrade(full, 0)


# ------------------------------------------------------------ determinism


def test_same_policy_same_artifact():
    pol = policy(dirs=[("/data/**/src", "rw"), ("/srv/ref", "ro")],
                 tcp=[tcp(22), tcp(443)], http=[url(443)])
    first = build(pol, state_dir="/var/lib/skillguard/s/demo")
    second = build(pol, state_dir="/var/lib/skillguard/s/demo")
    assert first == second
    assert repr(first) == repr(second)
