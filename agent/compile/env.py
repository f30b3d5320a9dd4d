"""The environment a skill starts with: a safe set, `env.pass`, nothing else.

Variables that change how the loader or an interpreter finds code can never
be passed, whoever asks: the loader's (LD_*, GLIBC_TUNABLES, GCONV_PATH —
see ld.so(8); ld.so ignores most of them only for set-uid programs, and
skills are not set-uid), the interpreters' (PYTHON*, NODE_OPTIONS, PERL5*,
RUBY*, JAVA_TOOL_OPTIONS, ...) and the shells' start-up hooks (BASH_ENV,
ENV, PS4 via SHELLOPTS=xtrace).
"""
# Imported by the launcher on every launch (`filter_env`): nothing heavy here.

# Taken from the caller's environment when present.
SAFE_PASSTHROUGH = ("LANG", "LANGUAGE", "TERM", "TZ", "COLORTERM", "NO_COLOR")
SAFE_PASSTHROUGH_PREFIXES = ("LC_",)

# Always set by skillguard; neither the caller nor a manifest chooses them.
MANAGED = ("HOME", "USER", "LOGNAME", "PATH", "TMPDIR", "SHELL", "SKILLGUARD_SKILL")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

PROTECTED_PREFIXES = ("LD_", "DYLD_", "PYTHON", "PERL5", "PERL_", "RUBY", "NODE_",
                      "BASH_FUNC_", "GIT_CONFIG", "MALLOC_")
PROTECTED = frozenset({
    "GLIBC_TUNABLES", "GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES",
    "RESOLV_HOST_CONF", "LOCALDOMAIN", "RES_OPTIONS", "TMPDIR",
    "PERLLIB", "PERLIO", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
    "CLASSPATH", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS",
    "CDPATH", "GIT_EXEC_PATH", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_ASKPASS",
    "GIT_PROXY_COMMAND", "GIT_EXTERNAL_DIFF", "GIT_PAGER", "PAGER", "EDITOR",
    "VISUAL", "LESSOPEN", "LESSCLOSE", "SSH_ASKPASS", "OPENSSL_CONF",
    "OPENSSL_ENGINES", "SSLKEYLOGFILE", "LUA_PATH", "LUA_CPATH", "GEM_PATH",
    "GEM_HOME", "R_PROFILE", "PHPRC", "ZDOTDIR",
})

_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_NAME_REST = _NAME_START | frozenset("0123456789")


def valid_name(name: str) -> bool:
    """A POSIX shell variable name: [A-Za-z_][A-Za-z0-9_]*."""
    return bool(name) and name[0] in _NAME_START and all(c in _NAME_REST for c in name)


def is_protected(name: str) -> bool:
    return name in PROTECTED or name.startswith(PROTECTED_PREFIXES)


def refusal(name: str) -> str | None:
    """Why `name` may not appear in `env.pass`, or None when it may."""
    if not valid_name(name):
        return f"'{name}' is not a valid variable name"
    if name in MANAGED:
        return f"'{name}' is set by skillguard itself"
    if is_protected(name):
        return f"'{name}' is protected: it changes how code is loaded"
    return None


class EnvArtifact:
    __slots__ = ("env", "refused")

    def __init__(self, env: tuple, refused: tuple):
        self.env = env  # sorted (name, value) pairs
        self.refused = refused  # protected names the caller had, not passed

    def __eq__(self, other) -> bool:
        return isinstance(other, EnvArtifact) and (self.env, self.refused) == (other.env, other.refused)

    def __repr__(self) -> str:
        return f"EnvArtifact(env={self.env!r}, refused={self.refused!r})"

    def as_dict(self) -> dict[str, str]:
        return dict(self.env)


def fixed_env(policy, *, home: str, user: str) -> dict[str, str]:
    """The variables skillguard sets itself (MANAGED)."""
    return {
        "HOME": home, "USER": user, "LOGNAME": user, "PATH": DEFAULT_PATH,
        "TMPDIR": "/tmp", "SHELL": "/bin/sh", "SKILLGUARD_SKILL": policy.name,
    }


def passable_names(policy) -> set[str]:
    """The manifest's `env.pass` names that may be passed."""
    return {name for name in policy.env.passthrough if refusal(name) is None}


def filter_env(fixed: dict, passable, caller_env) -> EnvArtifact:
    """The exact environment for `execve`: `fixed`, then from `caller_env` the
    safe set and the `passable` names; protected names are reported."""
    env = dict(fixed)
    for name, value in caller_env.items():
        if name in env:
            continue
        if name in SAFE_PASSTHROUGH or name.startswith(SAFE_PASSTHROUGH_PREFIXES) or name in passable:
            env[name] = value
    refused = sorted(n for n in caller_env if is_protected(n) and n not in MANAGED)
    return EnvArtifact(tuple(sorted(env.items())), tuple(refused))


def compile_env(policy, caller_env, *, home: str, user: str) -> EnvArtifact:
    """The exact environment for `execve`, from the caller's and the policy's."""
    return filter_env(fixed_env(policy, home=home, user=user), passable_names(policy), caller_env)
