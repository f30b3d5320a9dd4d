"""The launch path's modules, loaded from one file of code objects.

Python finds and validates each module it imports on its own (a path
search, stat calls, reading the .pyc and checking it against its source):
~0.2 ms a module here, ~3 ms for the modules and packages a launch from a
stored plan imports (bench/launch). `skillguard run` loads them from one
marshal file instead, `agent/__pycache__/launch-bundle.<cache tag>`, which
holds each module's code object compiled from its source with the source's
size and mtime.

The bundle is used only as Python uses its own .pyc files, while every
source still has the size and mtime it was compiled from, and only when
the file and its directory are root's and writable by no one else (the
command runs as root). Otherwise the modules are imported the usual way and
nothing is different. The slow path of `run` (agent/cli.py) rebuilds a
stale bundle; scripts/setup.sh builds it at install.
"""
import marshal
import posix
import sys

from agent import oslite

# What a launch from a stored plan imports after agent.fastrun, packages
# before their modules (agent/fastrun.py, agent/launch/supervisor.py).
MODULES = (
    "agent.launch", "agent.launch.plan_cache", "agent.enforce", "agent.launch.init_wire",
    "agent.launch.supervisor", "agent.events", "agent.events.violation", "agent.compile",
    "agent.compile.env", "agent.enforce.cgroup", "agent.launch.notify",
)
VERSION = 3


def path() -> str:
    return f"{oslite.REPO_ROOT}/agent/__pycache__/launch-bundle.{sys.implementation.cache_tag}"


def _source(name: str) -> tuple:
    """(source path, is a package) of module `name`."""
    base = f"{oslite.REPO_ROOT}/{name.replace('.', '/')}"
    if oslite.isdir(base):
        return f"{base}/__init__.py", True
    return f"{base}.py", False


def _stamp(source: str):
    try:
        st = posix.stat(source)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _root_only(st) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def load() -> dict | None:
    """{module name: (source path, is a package, marshalled code)} from a
    valid bundle, else None."""
    data = oslite.read_root_only(path(), 0o022, 0o022)
    if data is None:
        return None
    try:
        version, entries = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        return None
    if version != VERSION or not isinstance(entries, dict):
        return None
    modules = {}
    for name, (source, package, stamp, code) in entries.items():
        if _stamp(source) != stamp:
            return None
        modules[name] = (source, package, code)
    return modules  # code: marshal data, loaded when the module is (the child's in the child)


class _Finder:
    """A meta path finder for the bundle's modules (importlib's protocol:
    find_spec, then the spec's loader creates and executes the module)."""

    def __init__(self, modules: dict):
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        entry = self.modules.get(name)
        if entry is None:
            return None
        from _frozen_importlib import ModuleSpec

        source, package, _code = entry
        spec = ModuleSpec(name, self, origin=source, is_package=package)
        spec.has_location = True  # __file__ = origin, as for a module found on disk
        if package:
            spec.submodule_search_locations = [oslite.dirname(source)]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(marshal.loads(self.modules[module.__spec__.name][2]), module.__dict__)


def install() -> bool:
    """Serve the bundle's modules from now on; False (nothing changed) when
    there is no valid bundle."""
    modules = load()
    if modules is None:
        return False
    sys.meta_path.insert(0, _Finder(modules))
    return True


def build() -> bool:
    """Write the bundle from the sources (atomic; root only, into a
    directory that is root's). False when it cannot be written."""
    directory = oslite.dirname(path())
    try:
        oslite.makedirs(directory, 0o755)
        if posix.geteuid() != 0 or not _root_only(posix.stat(directory)):
            return False
        entries = {}
        for name in MODULES:
            source, package = _source(name)
            stamp = _stamp(source)
            with open(source, "rb") as fh:
                code = compile(fh.read(), source, "exec", dont_inherit=True)
            if stamp is None or _stamp(source) != stamp:
                return False  # changed while we read it: next time
            entries[name] = (source, package, stamp, marshal.dumps(code))
        tmp = f"{path()}.{posix.getpid()}.tmp"
        fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o644)
        with open(fd, "wb") as fh:
            fh.write(marshal.dumps((VERSION, entries)))
        posix.rename(tmp, path())
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def fresh() -> bool:
    return load() is not None


if __name__ == "__main__":  # scripts/setup.sh: python -m agent.bundle
    raise SystemExit(0 if build() else 1)
