"""The typed, validated form of a skill manifest.

Everything here is frozen and holds only what the manifest says, after
validation and normalisation; defaults are filled in by the loader so that
compilers never guess. Deny by default: an absent or disabled block is
represented by an empty grant, never by None.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

Mode = Literal["enforce", "audit"]
Access = Literal["ro", "rw"]

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class DirGrant:
    """One `fs.dirs` entry: an absolute path pattern and its access mode."""

    pattern: str  # absolute, normalised; may hold `*` / `**` segments
    access: Access

    @property
    def is_glob(self) -> bool:
        return "*" in self.pattern


@dataclass(frozen=True)
class FsPolicy:
    enabled: bool = False
    dirs: tuple[DirGrant, ...] = ()
    # What a registered (attached) process gets for opening a path outside
    # every grant: "report" (an event) or "kill" (SIGKILL from the tracepoint).
    on_violation: Literal["report", "kill"] = "report"

    @property
    def grants(self) -> tuple[DirGrant, ...]:
        return self.dirs if self.enabled else ()


@dataclass(frozen=True)
class HostPattern:
    """A destination host as written: either `networks` or a `name`.

    `networks` holds literal IPs (as /32 or /128), CIDRs and IP wildcards
    (`10.0.0.*` becomes 10.0.0.0/24; a bare `*` becomes 0.0.0.0/0 and ::/0);
    IPv4-mapped IPv6 addresses are stored as the IPv4 address they carry.
    `name` holds a lower-case DNS name pattern whose labels may be `*` (one
    label) or `**` (any number); names are admitted only through DNS.
    """

    text: str
    networks: tuple[IPNetwork, ...] = ()
    name: Optional[str] = None


@dataclass(frozen=True)
class TcpRule:
    host: HostPattern
    port: Optional[int]  # None: any port
    text: str


@dataclass(frozen=True)
class UrlRule:
    scheme: Literal["http", "https"]
    host: HostPattern
    port: int  # the scheme's port when the URL names none
    path: str  # glob over `/`-separated segments; not enforceable in the kernel
    text: str


@dataclass(frozen=True)
class TcpPolicy:
    enabled: bool = False
    allowlist: tuple[TcpRule, ...] = ()
    # DNS name patterns whose answers may be private (RFC 1918, ULA); see agent/net/admit.py.
    private_names: tuple[str, ...] = ()

    @property
    def grants(self) -> tuple[TcpRule, ...]:
        return self.allowlist if self.enabled else ()


@dataclass(frozen=True)
class HttpPolicy:
    enabled: bool = False
    allowlist: tuple[UrlRule, ...] = ()
    https_only: bool = False
    private_names: tuple[str, ...] = ()  # as TcpPolicy.private_names

    @property
    def grants(self) -> tuple[UrlRule, ...]:
        return self.allowlist if self.enabled else ()


@dataclass(frozen=True)
class CommandPattern:
    """A shell allowlist entry split into words; words may be `*` or `**`."""

    words: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class ShellPolicy:
    enabled: bool = False
    allowlist: tuple[CommandPattern, ...] = ()
    allowed_dirs: tuple[str, ...] = ()

    @property
    def grants(self) -> tuple[CommandPattern, ...]:
        return self.allowlist if self.enabled else ()


@dataclass(frozen=True)
class EnvPolicy:
    passthrough: tuple[str, ...] = ()  # `env.pass`: extra variable names


@dataclass(frozen=True)
class Resources:
    memory_bytes: int = 512 * 1024 * 1024
    cpu: float = 1.0  # CPUs' worth of time, e.g. 0.5 = half of one CPU
    pids: int = 128
    timeout_s: float = 60.0  # 0: no wall-clock limit


@dataclass(frozen=True)
class SyscallOverrides:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class InvokePolicy:
    can_invoke: tuple[str, ...] = ()
    can_be_invoked_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    mode: Mode = "enforce"
    entrypoint: tuple[str, ...] = ()
    # `entrypoint_sha256`: lower-case hex; the launcher executes only a program with this digest.
    entrypoint_sha256: Optional[str] = None
    fs: FsPolicy = field(default_factory=FsPolicy)
    http: HttpPolicy = field(default_factory=HttpPolicy)
    tcp: TcpPolicy = field(default_factory=TcpPolicy)
    shell: ShellPolicy = field(default_factory=ShellPolicy)
    env: EnvPolicy = field(default_factory=EnvPolicy)
    resources: Resources = field(default_factory=Resources)
    syscalls: SyscallOverrides = field(default_factory=SyscallOverrides)
    invoke: InvokePolicy = field(default_factory=InvokePolicy)
    source: str = "<string>"  # the file it was loaded from

    @property
    def network_granted(self) -> bool:
        """True when any rule grants IP networking (tcp or http)."""
        return bool(self.tcp.grants or self.http.grants)
