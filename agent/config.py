"""The host's configuration: embedded defaults, overridden by /etc/skillguard/agent.yaml.

Every field has a default, so the agent runs with no file at all. A file that
exists but is malformed is an error naming file:line and the field; it is
never half-applied.

Override the path with $SKILLGUARD_CONFIG (tests, packagers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Optional

DEFAULT_PATH = "/etc/skillguard/agent.yaml"
CONFIG_ENV = "SKILLGUARD_CONFIG"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class HostConfig:
    socket_path: str = "/run/skillguard/agent.sock"
    socket_mode: int = 0o660
    socket_group: Optional[str] = None  # members may register; root always may
    metrics_address: str = "127.0.0.1:9464"  # "" disables /metrics
    policy_dir: str = "/etc/skillguard/policies"
    state_root: str = "/var/lib/skillguard"
    uid_range: str = "200000000-200999999"
    address_pool: str = "10.213.0.0/16"  # per-skill veth /30s for launched skills
    dns_upstream: tuple[str, ...] = ()  # empty: the nameservers of /etc/resolv.conf
    log_path: Optional[str] = None  # None: violations as JSON lines on stdout (journald)
    require_signed: bool = False
    trusted_keys: tuple[str, ...] = ()  # paths of Ed25519 public key files
    source: str = "<defaults>"  # the file these values came from
    # The daemon's socket API and event pipeline (docs/api.md, docs/operations.md).
    request_max_bytes: int = 1_048_576  # one JSON-RPC line, newline included
    request_timeout_s: float = 10.0  # a request that has begun must end within this
    idle_timeout_s: float = 600.0  # a connection with no request and no `events` stream; 0: never
    max_clients: int = 256  # connections at once; more are answered with an error and closed
    subscriber_queue: int = 10_000  # events buffered per `events` subscriber before it loses some
    event_rate_limit: int = 1_000  # events per skill per second written and streamed; the rest counted as suppressed
    metrics_skill_labels: int = 200  # distinct `skill` label values; the rest are counted under "_other"
    # Registered skills (agent/attach): where the eBPF objects are pinned, the
    # cgroup v2 subtree the hooks attach at, the nftables table of socket-cgroup rules.
    bpf_pin_dir: str = "/sys/fs/bpf/skillguard/v2"
    cgroup_subtree: str = "skillguard"
    nft_cgroup_table: str = "skillguard_cg"


_TUPLES = {"dns_upstream", "trusted_keys"}
_INTS = {"request_max_bytes": (1024, 1 << 30), "max_clients": (1, 65536),
         "subscriber_queue": (1, 10_000_000), "event_rate_limit": (1, 100_000_000),
         "metrics_skill_labels": (1, 100_000)}
_FLOATS = {"request_timeout_s": (0.01, 3600.0), "idle_timeout_s": (0.0, 31_536_000.0)}


def load_host_config(path: Optional[str] = None) -> HostConfig:
    """The defaults, with the file at `path` (or $SKILLGUARD_CONFIG, or DEFAULT_PATH) on top.

    A missing default file is not an error; a missing file that was asked for is.
    """
    explicit = path or os.environ.get(CONFIG_ENV)
    path = explicit or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return HostConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse_host_config(text, path)


def parse_host_config(text: str, path: str = "<string>") -> HostConfig:
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        document = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if document is None:
        return HostConfig(source=path)
    if not isinstance(document, yaml.MappingNode):
        raise ConfigError(f"{path}:{document.start_mark.line + 1}: the file must be a mapping")
    known = {f.name: f for f in fields(HostConfig) if f.name != "source"}
    values: dict = {}
    errors: list[str] = []
    for key_node, value_node in document.value:
        key = key_node.value
        where = f"{path}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
        if key not in known:
            errors.append(f"{where}: {key}: unknown field (one of {', '.join(sorted(known))})")
            continue
        if key in values:
            errors.append(f"{where}: {key}: given twice")
            continue
        value = yaml.load(yaml.serialize(value_node), Loader=yaml.SafeLoader)
        problem = _check(key, value)
        if problem:
            errors.append(f"{where}: {key}: {problem}")
            continue
        if key == "socket_mode" and isinstance(value, str):
            value = int(value, 8)
        if key in _FLOATS:
            value = float(value)
        values[key] = tuple(value) if key in _TUPLES else value
    if errors:
        raise ConfigError("\n".join(errors))
    return replace(HostConfig(source=path), **values)


def _check(key: str, value) -> Optional[str]:
    if key in _TUPLES:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return "must be a list of non-empty strings"
        return None
    if key == "require_signed":
        return None if isinstance(value, bool) else "must be true or false"
    if key in _INTS:
        low, high = _INTS[key]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"must be an integer from {low} to {high}"
    if key in _FLOATS:
        low, high = _FLOATS[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"must be a number of seconds from {low:g} to {high:g}"
    if key == "socket_mode":
        # YAML 1.1 reads 0660 as octal but not 0o660; take both, and the quoted forms.
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                return "must be an octal mode like 0660"
        return None if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777 \
            else "must be an octal mode like 0660"
    if key in ("socket_group", "log_path"):
        return None if value is None or (isinstance(value, str) and value) else "must be a string"
    if key == "uid_range":
        if not isinstance(value, str) or value.count("-") != 1:
            return "must be FIRST-LAST"
        first, last = value.split("-")
        if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last)):
            return "must be FIRST-LAST with 0 < FIRST <= LAST"
        return None
    if key == "address_pool":
        import ipaddress

        try:
            network = ipaddress.ip_network(value)
        except (TypeError, ValueError) as exc:
            return f"must be an IPv4 CIDR ({exc})"
        return None if network.version == 4 and network.prefixlen <= 28 else "must be an IPv4 CIDR of /28 or larger"
    if not isinstance(value, str):
        return "must be a string"
    if key == "bpf_pin_dir" and not value.startswith("/sys/fs/bpf/"):
        return "must be a directory below /sys/fs/bpf"
    if key == "cgroup_subtree" and (not value.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                    or value.startswith(".")):
        return "must be one cgroup directory name (letters, digits, - _ .)"
    if key == "nft_cgroup_table" and not value.replace("_", "").isalnum():
        return "must be an nftables table name (letters, digits, _)"
    if key in ("socket_path", "policy_dir", "state_root") and not value.startswith("/"):
        return "must be an absolute path"
    if key == "socket_path" and len(value.encode()) > 107:
        return "must be at most 107 bytes (sun_path, unix(7))"
    if key == "metrics_address" and value:
        try:
            split_host_port(value)
        except ValueError as exc:
            return str(exc)
    return None


def split_host_port(address: str) -> tuple[str, int]:
    """"127.0.0.1:9464" or "[::1]:9464" -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"host {host!r} must be an IP address or localhost") from None
    return host, int(port)
