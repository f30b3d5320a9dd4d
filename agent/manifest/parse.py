"""Manifest Values -> Policy, collecting every problem with its position.

Field names in messages are dotted paths as written in the file
(`permissions.tcp.allowlist[2]`), so a reviewer can find them at a glance.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from agent.compile import env as envrules
from agent.manifest import glob, units
from agent.manifest.model import (
    CommandPattern, DirGrant, EnvPolicy, FsPolicy, HostPattern, HttpPolicy,
    InvokePolicy, Policy, Resources, ShellPolicy, SyscallOverrides, TcpPolicy,
    TcpRule, UrlRule,
)
from agent.manifest.nodes import Pos, Value, describe

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_GLOB_RE = re.compile(r"^[a-z0-9._*-]{1,63}$")
LABEL_RE = re.compile(r"^(?:\*\*?|[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)$")
SYSCALL_RE = re.compile(r"^[a-z0-9_]{1,64}$")
SCHEME_PORTS = {"http": 80, "https": 443}
# Shell metacharacters that chain, pipe, redirect or substitute commands.
SHELL_OPERATORS = ("&&", "||", ";", "|", ">", "<", "`", "$(", "&", "\n")


@dataclass(frozen=True)
class Problem:
    pos: Pos
    field: str
    message: str


@dataclass
class Checker:
    errors: list[Problem] = field(default_factory=list)
    positions: dict[str, Pos] = field(default_factory=dict)

    def error(self, where: Value | Pos, fieldname: str, message: str) -> None:
        pos = where.pos if isinstance(where, Value) else where
        self.errors.append(Problem(pos, fieldname, message))

    # -- structural helpers -------------------------------------------------

    def mapping(self, v: Optional[Value], fieldname: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Value]:
        """The mapping's entries; unknown keys and missing required ones are errors."""
        if v is None:
            return {}
        if not isinstance(v.data, dict):
            self.error(v, fieldname, f"expected a mapping, got {v.kind()}")
            return {}
        for key in v.data:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.error(v.key_pos[key], _join(fieldname, key),
                           f"unknown key{hint}; expected one of: {', '.join(allowed)}")
        for key in required:
            if key not in v.data:
                self.error(v, _join(fieldname, key), "required key is missing")
        for key, sub in v.data.items():
            self.positions[_join(fieldname, key)] = sub.pos
        return {k: s for k, s in v.data.items() if k in allowed}

    def scalar(self, v: Value, fieldname: str, kinds: tuple[type, ...], what: str) -> Any:
        data = v.data
        if isinstance(data, bool) and bool not in kinds:
            self.error(v, fieldname, f"expected {what}, got boolean (quote it if you meant '{v.raw}')")
            return None
        if not isinstance(data, kinds):
            self.error(v, fieldname, f"expected {what}, got {describe(data) if v.raw is not None else v.kind()}")
            return None
        return data

    def string(self, v: Optional[Value], fieldname: str, default: Optional[str] = None) -> Optional[str]:
        if v is None:
            return default
        return self.scalar(v, fieldname, (str,), "a string")

    def boolean(self, v: Optional[Value], fieldname: str, default: bool) -> bool:
        if v is None:
            return default
        got = self.scalar(v, fieldname, (bool,), "true or false")
        return default if got is None else got

    def strings(self, v: Optional[Value], fieldname: str,
                item: Callable[[str, Value, str], Any]) -> tuple:
        """A list of strings, each passed through `item`; duplicates are errors."""
        if v is None:
            return ()
        if not isinstance(v.data, list):
            self.error(v, fieldname, f"expected a list, got {v.kind()}")
            return ()
        out, seen = [], {}
        for i, sub in enumerate(v.data):
            name = f"{fieldname}[{i}]"
            self.positions[name] = sub.pos
            text = self.scalar(sub, name, (str,), "a string")
            if text is None:
                continue
            if not text.strip():
                self.error(sub, name, "empty pattern")
                continue
            if text in seen:
                self.error(sub, name, f"duplicate of {fieldname}[{seen[text]}]")
                continue
            seen[text] = i
            converted = item(text, sub, name)
            if converted is not None:
                out.append(converted)
        return tuple(out)


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _closest(key: str, allowed: tuple[str, ...]) -> str:
    import difflib

    match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" '{key}' (did you mean '{match[0]}'?)" if match else f" '{key}'"


# -- leaf parsers: each returns the typed value or records an error ----------


def abs_path(c: Checker, text: str, v: Value, name: str) -> Optional[str]:
    if not text.startswith("/"):
        c.error(v, name, f"'{text}' is not an absolute path")
        return None
    parts = glob.path_segments(text)
    if ".." in parts or "." in parts:
        c.error(v, name, f"'{text}': '.' and '..' are not allowed in paths")
        return None
    if "\0" in text:
        c.error(v, name, "path contains a NUL byte")
        return None
    why = glob.check_segments(parts, "path component")
    if why:
        c.error(v, name, why)
        return None
    return "/" + "/".join(parts)


def dir_grant(c: Checker, text: str, v: Value, name: str) -> Optional[DirGrant]:
    path, sep, access = text.rpartition(":")
    if not sep or access not in ("ro", "rw"):
        c.error(v, name, f"'{text}': expected PATH:ro or PATH:rw")
        return None
    norm = abs_path(c, path, v, name)
    return DirGrant(norm, access) if norm else None  # type: ignore[arg-type]


def host_pattern(c: Checker, host: str, v: Value, name: str, *, bracketed: bool = False) -> Optional[HostPattern]:
    text = host
    try:
        wildcard = glob.ipv4_wildcard(host)
    except ValueError as exc:
        c.error(v, name, str(exc))
        return None
    if wildcard is not None:
        if host == "*":
            return HostPattern(text, networks=(wildcard, ipaddress.IPv6Network("::/0")))
        return HostPattern(text, networks=(wildcard,))
    looks_ip = bracketed or bool(re.match(r"^[0-9.]+(/\d+)?$", host))
    if looks_ip:
        try:
            net = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            c.error(v, name, f"'{host}' is not an IP address or CIDR: {exc}")
            return None
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 \
                and net.network_address.ipv4_mapped is not None:
            # ::ffff:a.b.c.d is the IPv4 host a.b.c.d (RFC 4291 2.5.5.2).
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        return HostPattern(text, networks=(net,))
    lowered = host.lower().rstrip(".")
    labels = lowered.split(".")
    if len(lowered) > 253 or not all(LABEL_RE.match(label) for label in labels):
        c.error(v, name, f"'{host}' is not a valid host name pattern "
                         "(labels of a-z, 0-9, '-', or '*' / '**' as a whole label)")
        return None
    return HostPattern(text, name=lowered)


def port(c: Checker, text: str, v: Value, name: str) -> tuple[bool, Optional[int]]:
    """(ok, port); port None means any."""
    if text == "*":
        return True, None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        c.error(v, name, f"port '{text}' is out of range (1 to 65535, or '*' for any)")
        return False, None
    return True, int(text)


def tcp_rule(c: Checker, text: str, v: Value, name: str) -> Optional[TcpRule]:
    bracketed = text.startswith("[")
    if bracketed:
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            c.error(v, name, f"'{text}': expected [IPV6]:PORT")
            return None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            c.error(v, name, f"'{text}': expected HOST:PORT (PORT may be '*')")
            return None
        if ":" in host:
            c.error(v, name, f"'{text}': write IPv6 addresses in brackets, e.g. [2001:db8::1]:443")
            return None
    ok, p = port(c, port_text, v, name)
    hp = host_pattern(c, host, v, name, bracketed=bracketed)
    return TcpRule(hp, p, text) if ok and hp else None


def url_rule(c: Checker, text: str, v: Value, name: str) -> Optional[UrlRule]:
    try:
        parts = urlsplit(text)
        explicit_port = parts.port
    except ValueError as exc:
        c.error(v, name, f"'{text}': {exc}")
        return None
    if parts.scheme not in SCHEME_PORTS:
        c.error(v, name, f"'{text}': scheme must be http or https")
        return None
    if parts.username is not None or parts.password is not None:
        c.error(v, name, f"'{text}': credentials in URLs are not allowed")
        return None
    if parts.query or parts.fragment:
        c.error(v, name, f"'{text}': query strings and fragments cannot be matched")
        return None
    host = parts.hostname or ""
    if not host:
        c.error(v, name, f"'{text}': the URL has no host")
        return None
    path = parts.path or "/**"
    why = glob.check_segments(glob.path_segments(path), "path segment")
    if why:
        c.error(v, name, why)
        return None
    hp = host_pattern(c, host, v, name, bracketed=parts.netloc.startswith("["))
    if hp is None:
        return None
    return UrlRule(parts.scheme, hp, explicit_port or SCHEME_PORTS[parts.scheme], path, text)  # type: ignore[arg-type]


def command(c: Checker, text: str, v: Value, name: str) -> Optional[CommandPattern]:
    for op in SHELL_OPERATORS:
        if op in text:
            c.error(v, name, f"'{text}': shell operator '{op.strip() or 'newline'}' is not allowed; "
                             "list each command on its own")
            return None
    words = tuple(text.split())
    if any(ch in text for ch in "'\"\\$"):
        c.error(v, name, f"'{text}': quotes, backslashes and '$' are not allowed in patterns")
        return None
    why = glob.check_segments(words, "word")
    if why:
        c.error(v, name, why)
        return None
    return CommandPattern(words, text)


def skill_glob(c: Checker, text: str, v: Value, name: str) -> Optional[str]:
    if not NAME_GLOB_RE.match(text):
        c.error(v, name, f"'{text}' is not a skill name or glob (a-z, 0-9, '.', '_', '-', '*')")
        return None
    return text


def env_name(c: Checker, text: str, v: Value, name: str) -> Optional[str]:
    why = envrules.refusal(text)
    if why:
        c.error(v, name, why)
        return None
    return text


def syscall_name(c: Checker, text: str, v: Value, name: str) -> Optional[str]:
    from agent.compile.seccomp import known_syscall

    if not SYSCALL_RE.match(text) or not known_syscall(text):
        c.error(v, name, f"'{text}' is not a known x86_64 system call")
        return None
    return text


# -- the blocks ---------------------------------------------------------------

TOP_KEYS = ("name", "version", "description", "mode", "entrypoint", "entrypoint_sha256", "permissions",
            "env", "resources", "syscalls", "invoke_policy")
PERMISSION_KEYS = ("fs", "http", "tcp", "shell")


def policy_from(c: Checker, root: Value, source: str) -> Optional[Policy]:
    top = c.mapping(root, "", TOP_KEYS, required=("name", "version"))
    name = c.string(top.get("name"), "name")
    if name is not None and not NAME_RE.match(name):
        c.error(top["name"], "name", f"'{name}': expected lower-case letters, digits, '.', '_', '-' "
                                     "(starting with a letter or digit, at most 63)")
        name = None
    version = _version(c, top.get("version"))
    c.string(top.get("description"), "description")
    mode = c.string(top.get("mode"), "mode", "enforce")
    if mode not in ("enforce", "audit"):
        c.error(top["mode"], "mode", f"'{mode}': expected enforce or audit")
    perms = c.mapping(top.get("permissions"), "permissions", PERMISSION_KEYS)

    policy = Policy(
        name=name or "", version=version or "", mode=mode if mode == "audit" else "enforce",
        entrypoint=_entrypoint(c, top.get("entrypoint")),
        entrypoint_sha256=_entrypoint_pin(c, top.get("entrypoint_sha256"), top.get("entrypoint")),
        fs=_fs(c, perms.get("fs")),
        http=_http(c, perms.get("http")),
        tcp=_tcp(c, perms.get("tcp")),
        shell=_shell(c, perms.get("shell")),
        env=_env(c, top.get("env")),
        resources=_resources(c, top.get("resources")),
        syscalls=_syscalls(c, top.get("syscalls")),
        invoke=_invoke(c, top.get("invoke_policy")),
        source=source,
    )
    return None if c.errors else policy


def _version(c: Checker, v: Optional[Value]) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v.data, (int, float)) and not isinstance(v.data, bool):
        return v.raw  # `version: 1.0` is a float to YAML; keep the text as written
    text = c.string(v, "version")
    if text is not None and (not text or any(ch.isspace() for ch in text)):
        c.error(v, "version", "expected a non-empty version without spaces")
    return text


def _entrypoint(c: Checker, v: Optional[Value]) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v.data, str):
        words = tuple(v.data.split())
    else:
        words = c.strings(v, "entrypoint", lambda t, sub, n: t)
    if v.data is not None and not words:
        c.error(v, "entrypoint", "expected a command: a string or a list of words")
    elif words and not words[0].startswith("/"):
        c.error(v, "entrypoint", f"'{words[0]}': the program must be an absolute path")
    return words


SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def _entrypoint_pin(c: Checker, v: Optional[Value], entrypoint: Optional[Value]) -> Optional[str]:
    """`entrypoint_sha256`: the sha256 the launched program must have (64 hex digits)."""
    if v is None:
        return None
    text = c.string(v, "entrypoint_sha256")
    if text is None:
        return None
    if not SHA256_RE.match(text):
        c.error(v, "entrypoint_sha256", f"'{text}': expected 64 hex digits (sha256sum of the program)")
        return None
    if entrypoint is None:
        c.error(v, "entrypoint_sha256", "pins the entrypoint, but the manifest has no entrypoint")
        return None
    return text.lower()


def _block(c: Checker, v: Optional[Value], fieldname: str, keys: tuple[str, ...]) -> tuple[dict, bool]:
    entries = c.mapping(v, fieldname, ("enabled",) + keys)
    # A block that is present defaults to enabled; `enabled: false` keeps its rules but grants nothing.
    enabled = c.boolean(entries.get("enabled"), f"{fieldname}.enabled", v is not None)
    return entries, enabled


def _fs(c: Checker, v: Optional[Value]) -> FsPolicy:
    f = "permissions.fs"
    entries, enabled = _block(c, v, f, ("dirs", "on_violation"))
    on_violation = c.string(entries.get("on_violation"), f"{f}.on_violation", "report")
    if on_violation is not None and on_violation not in ("report", "kill"):
        c.error(entries["on_violation"], f"{f}.on_violation", f"'{on_violation}': expected report or kill")
    if on_violation not in ("report", "kill"):
        on_violation = "report"
    seen: dict[str, str] = {}

    def item(text: str, sub: Value, name: str) -> Optional[DirGrant]:
        from agent.compile.landlock import private_path_reached

        grant = dir_grant(c, text, sub, name)
        private = private_path_reached(grant.pattern) if grant else None
        if private:
            c.error(sub, name, f"'{grant.pattern}' would reach {private}, which no skill may access")
            return None
        if grant and grant.pattern in seen:
            c.error(sub, name, f"'{grant.pattern}' is already granted by {seen[grant.pattern]}")
            return None
        if grant:
            seen[grant.pattern] = name
        return grant

    return FsPolicy(enabled, c.strings(entries.get("dirs"), f"{f}.dirs", item), on_violation)


def _http(c: Checker, v: Optional[Value]) -> HttpPolicy:
    f = "permissions.http"
    entries, enabled = _block(c, v, f, ("allowlist", "https_only", "private_names"))
    https_only = c.boolean(entries.get("https_only"), f"{f}.https_only", False)

    def item(text: str, sub: Value, name: str) -> Optional[UrlRule]:
        rule = url_rule(c, text, sub, name)
        if rule and https_only and rule.scheme == "http":
            c.error(sub, name, f"'{text}': plain http is refused by https_only: true")
            return None
        return rule

    return HttpPolicy(enabled, c.strings(entries.get("allowlist"), f"{f}.allowlist", item), https_only,
                      _private_names(c, entries.get("private_names"), f"{f}.private_names"))


def _tcp(c: Checker, v: Optional[Value]) -> TcpPolicy:
    f = "permissions.tcp"
    entries, enabled = _block(c, v, f, ("allowlist", "private_names"))
    return TcpPolicy(enabled, c.strings(entries.get("allowlist"), f"{f}.allowlist",
                                        lambda t, s, n: tcp_rule(c, t, s, n)),
                     _private_names(c, entries.get("private_names"), f"{f}.private_names"))


def _private_names(c: Checker, v: Optional[Value], fieldname: str) -> tuple[str, ...]:
    """DNS name patterns whose answers may be private addresses (opt-in, see agent/net/admit.py)."""

    def item(text: str, sub: Value, name: str) -> Optional[str]:
        hp = host_pattern(c, text, sub, name)
        if hp is not None and hp.name is None:
            c.error(sub, name, f"'{text}': private_names lists DNS names; an IP or CIDR "
                               "belongs in the allowlist, where it is taken as written")
            return None
        return hp.name if hp else None

    return c.strings(v, fieldname, item)


def _shell(c: Checker, v: Optional[Value]) -> ShellPolicy:
    f = "permissions.shell"
    entries, enabled = _block(c, v, f, ("allowlist", "allowed_dirs"))
    allow = c.strings(entries.get("allowlist"), f"{f}.allowlist", lambda t, s, n: command(c, t, s, n))
    dirs = c.strings(entries.get("allowed_dirs"), f"{f}.allowed_dirs", lambda t, s, n: abs_path(c, t, s, n))
    return ShellPolicy(enabled, allow, dirs)


def _env(c: Checker, v: Optional[Value]) -> EnvPolicy:
    entries = c.mapping(v, "env", ("pass",))
    return EnvPolicy(c.strings(entries.get("pass"), "env.pass", lambda t, s, n: env_name(c, t, s, n)))


def _resources(c: Checker, v: Optional[Value]) -> Resources:
    entries = c.mapping(v, "resources", ("memory", "cpu", "pids", "timeout"))
    default = Resources()
    out = {}
    for key, parser, attr in (("memory", units.parse_size, "memory_bytes"),
                              ("cpu", units.parse_cpu, "cpu"),
                              ("timeout", units.parse_duration, "timeout_s")):
        if key in entries:
            try:
                out[attr] = parser(entries[key].data)
            except ValueError as exc:
                c.error(entries[key], f"resources.{key}", str(exc))
    if "pids" in entries:
        pids = c.scalar(entries["pids"], "resources.pids", (int,), "a whole number of processes")
        if pids is not None and not 1 <= pids <= 4_194_304:
            c.error(entries["pids"], "resources.pids", f"{pids} is out of range (1 to 4194304)")
        elif pids is not None:
            out["pids"] = pids
    return Resources(**{**default.__dict__, **out})


def _syscalls(c: Checker, v: Optional[Value]) -> SyscallOverrides:
    if v is None:
        return SyscallOverrides()
    from agent.compile.seccomp import always_denied, not_allowable

    entries = c.mapping(v, "syscalls", ("allow", "deny"))
    hard, checked = always_denied(), not_allowable()
    denied_names = set()
    if entries.get("deny") is not None and isinstance(entries["deny"].data, list):
        denied_names = {sub.data for sub in entries["deny"].data if isinstance(sub.data, str)}

    def allowed(text: str, sub: Value, name: str) -> Optional[str]:
        if syscall_name(c, text, sub, name) is None:
            return None
        if text in hard:
            c.error(sub, name, f"'{text}' is always denied and cannot be allowed by a manifest")
            return None
        if text in checked:
            c.error(sub, name, f"'{text}' is argument-checked or answered ENOSYS by the base profile; "
                               "allowing it outright would drop that")
            return None
        if text in denied_names:
            c.error(sub, name, f"'{text}' is both allowed and denied")
            return None
        return text

    allow = c.strings(entries.get("allow"), "syscalls.allow", allowed)
    deny = c.strings(entries.get("deny"), "syscalls.deny", lambda t, s, n: syscall_name(c, t, s, n))
    return SyscallOverrides(allow, deny)


def _invoke(c: Checker, v: Optional[Value]) -> InvokePolicy:
    f = "invoke_policy"
    entries = c.mapping(v, f, ("can_invoke", "can_be_invoked_by"))
    return InvokePolicy(
        c.strings(entries.get("can_invoke"), f"{f}.can_invoke", lambda t, s, n: skill_glob(c, t, s, n)),
        c.strings(entries.get("can_be_invoked_by"), f"{f}.can_be_invoked_by",
                  lambda t, s, n: skill_glob(c, t, s, n)),
    )
