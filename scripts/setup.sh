#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 host for skillguard: apt packages, kernel
# headers for bcc, and the repo virtualenv (.venv) with the agent installed
# editable. Quick when everything is already present.
#
# Usage: scripts/setup.sh [--bench] [--check]
#   --bench  also install what `make bench` needs (bubblewrap, firejail)
#   --check  change nothing; list what a set-up run would do, exit 1 if anything
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO_ROOT/.venv"
SYSTEM_PYTHON=/usr/bin/python3
# The stamp lives inside the venv, so removing the venv invalidates it.
STAMP="$VENV/.skillguard-setup-stamp"
OS_RELEASE_FILE=${SKILLGUARD_OS_RELEASE:-/etc/os-release}

# What the agent and its tests need. bcc and the nftables bindings only import
# in Debian's /usr/bin/python3, hence apt rather than pip for them.
RUNTIME_APT_PACKAGES=(
    python3-venv      # venv + ensurepip for .venv
    python3-yaml      # manifest loader (also satisfies PyYAML in the venv)
    python3-nftables  # nftables JSON API bindings
    nftables          # nft CLI and libnftables
    python3-bpfcc     # bcc: eBPF programs in bpf/
    python3-pyroute2  # netns, veth, addresses and routes over netlink
    python3-dnspython # DNS wire format for the per-skill DNS stub
    python3-cryptography # Ed25519 signatures of skill packages
    python3-prometheus-client # /metrics
    libseccomp2       # loaded by pyseccomp through ctypes
    iproute2          # ip(8) for netns/veth debugging and tests
    systemd           # systemd-analyze verify for systemd/skillguard.service
    make
    gcc               # the skill's init (init/skillguard-init.c); test and bench C helpers
    libc6-dev         # static libc for the init (no loader, no shared libraries at each launch)
    prometheus        # promtool check metrics/rules, and a real scraper in the e2e tests
    socat             # the socket API is usable from socat; the docs and a test show it
)
BENCH_APT_PACKAGES=(bubblewrap firejail)

want_bench=0
check_only=0
for arg in "$@"; do
    case $arg in
        --bench) want_bench=1 ;;
        --check) check_only=1 ;;
        *) echo "usage: $0 [--bench] [--check]" >&2; exit 2 ;;
    esac
done

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
pending=()          # what --check found to do
would() { pending+=("$*"); log "needed: $*"; }

started_at=$(date +%s.%N)

refuse_unsupported_host() {
    [[ $(id -u) -eq 0 ]] \
        || die "must run as root (try: sudo make ...): installs apt packages and links kernel headers under /lib/modules"
    [[ -r $OS_RELEASE_FILE ]] || die "cannot read $OS_RELEASE_FILE: not a Debian-like system"
    local id id_like
    id=$(. "$OS_RELEASE_FILE" && printf '%s' "${ID:-}")
    id_like=$(. "$OS_RELEASE_FILE" && printf '%s' "${ID_LIKE:-}")
    [[ $id == debian || " $id_like " == *" debian "* ]] \
        || die "unsupported OS '${id:-unknown}': this set-up needs Debian 12 (bookworm) or a Debian derivative (apt, dpkg)"
    command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
        || die "apt-get/dpkg-query not found: this set-up needs a Debian-like system"
}

# Headers for bcc. On a Debian kernel the exact linux-headers-$(uname -r)
# exists; other kernels (like the 6.18 dev kernel) get the distribution's
# headers, which bcc accepts for the programs in bpf/ (see architecture.md).
kernel_headers_package() {
    local release arch
    release=$(uname -r)
    if [[ -e /lib/modules/$release/build/Makefile ]]; then
        return 0    # headers already there; whoever put them there owns them
    fi
    if [[ -e /boot/config-$release ]] && apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
        echo "linux-headers-$release"
        return 0
    fi
    arch=$(dpkg --print-architecture)
    echo "linux-headers-$arch"
}

missing_apt_packages() {
    # dpkg-query prints "<name> ii " for installed packages and errors for
    # unknown ones; anything not "ii" counts as missing.
    local pkg status
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [[ $status == ii* ]] || echo "$pkg"
    done
}

install_apt_packages() {
    local missing
    mapfile -t missing < <(missing_apt_packages "$@")
    ((${#missing[@]})) || return 0
    if ((check_only)); then would "apt-get install ${missing[*]}"; return 0; fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Other apt users (unattended-upgrades, a parallel set-up) hold the dpkg
    # lock for a while; wait for it instead of failing.
    apt-get update -q -o DPkg::Lock::Timeout=300
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null
    mapfile -t missing < <(missing_apt_packages "$@")
    ((${#missing[@]} == 0)) || die "apt-get finished but still missing: ${missing[*]}"
}

# bcc looks for headers at /lib/modules/$(uname -r)/build (and /source for
# the arch-independent tree). Debian's headers for a non-Debian kernel are at
# /usr/src/linux-headers-<ver>-<arch> and -common; link them there.
link_kernel_headers() {
    local release moddir arch_tree common_tree
    release=$(uname -r)
    moddir=/lib/modules/$release
    # Headers made for this very kernel (a real tree, or Debian's own link to
    # /usr/src/linux-headers-<release>) are left alone.
    if [[ -e $moddir/build/Makefile ]] \
       && [[ ! -L $moddir/build || $(readlink "$moddir/build") == "/usr/src/linux-headers-$release" ]]; then
        return 0
    fi
    arch_tree=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$(dpkg --print-architecture)" \
                    -type d 2>/dev/null | sort -V | tail -n 1)
    if [[ -z $arch_tree ]]; then
        ((check_only)) && { would "link kernel headers into $moddir (none installed yet)"; return 0; }
        die "no /usr/src/linux-headers-*-$(dpkg --print-architecture) after installing headers: bcc cannot compile"
    fi
    common_tree=${arch_tree%-*}-common
    [[ -d $common_tree ]] || common_tree=$arch_tree
    if [[ $(readlink "$moddir/build" 2>/dev/null) == "$arch_tree" \
          && $(readlink "$moddir/source" 2>/dev/null) == "$common_tree" ]]; then
        return 0
    fi
    if ((check_only)); then would "link $moddir/build -> $arch_tree, source -> $common_tree"; return 0; fi
    log "linking kernel headers: $moddir/build -> $arch_tree, $moddir/source -> $common_tree"
    mkdir -p "$moddir"
    ln -sfn "$arch_tree" "$moddir/build"
    ln -sfn "$common_tree" "$moddir/source"
}

# bcc finds tracepoint ids and formats in tracefs; attaching a tracepoint fails
# when it is not mounted (as on these dev machines, where nothing mounts it).
# The mount does not survive a reboot: the agent must check it too.
mount_tracefs() {
    if awk '$(NF-2) == "tracefs" { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        return 0
    fi
    if ((check_only)); then would "mount tracefs on /sys/kernel/tracing"; return 0; fi
    log "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing \
        || die "cannot mount tracefs on /sys/kernel/tracing: bcc tracepoints need it (CONFIG_TRACING?)"
}

venv_is_usable() {
    [[ -x $VENV/bin/python && -r $VENV/pyvenv.cfg ]] || return 1
    grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" || return 1
    grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" || return 1
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

ensure_venv() {
    venv_is_usable && return 0
    if ((check_only)); then would "create $VENV from $SYSTEM_PYTHON --system-site-packages"; return 0; fi
    if [[ -e $VENV ]]; then
        log "$VENV is not a --system-site-packages venv of $SYSTEM_PYTHON; recreating it"
        rm -rf -- "$VENV"
    fi
    log "creating $VENV"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
}

# Everything that should force the slow path when it changes: this script
# (which holds the package lists), the declared dependencies, the kernel whose
# headers bcc compiles against, and the interpreter.
stamp_key() {
    {
        sha256sum "$REPO_ROOT/scripts/setup.sh" "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1
        uname -r
        "$SYSTEM_PYTHON" -VV
    } | sha256sum | cut -d' ' -f1
}

# Proof that the pieces fit: imports in the venv, one bcc program compiled
# against the linked headers and loaded into the kernel (a socket filter needs
# no attach point), and one syscall tracepoint attached through tracefs.
# cleanup() detaches and closes everything. No kprobe: CONFIG_KPROBES is off
# on the 6.18 dev kernel.
verify_environment() {
    "$VENV/bin/python" - <<'PY'
import sys

failures = []
for module in ("yaml", "pyseccomp", "prometheus_client", "pyroute2", "pytest", "nftables", "bcc", "agent"):
    try:
        __import__(module)
    except Exception as error:
        failures.append(f"import {module}: {error}")

try:
    from bcc import BPF
    program = BPF(text=r"""
#include <linux/sched.h>
#include <uapi/linux/ptrace.h>
int setup_probe(struct __sk_buff *skb) { return 0; }
""")
    program.load_func("setup_probe", BPF.SOCKET_FILTER)
    program.cleanup()
except Exception as error:
    failures.append(f"bcc compile+load against /lib/modules/<release>/build: {error}")

try:
    from bcc import BPF
    program = BPF(text="TRACEPOINT_PROBE(syscalls, sys_enter_nanosleep) { return 0; }")
    if program.num_open_tracepoints() != 1:
        raise RuntimeError("tracepoint did not attach")
    program.cleanup()
except Exception as error:
    failures.append(f"bcc tracepoint syscalls:sys_enter_nanosleep: {error}")

for failure in failures:
    print(f"setup: verify: {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
}

install_python_packages() {
    log "installing the agent (editable) and its Python dependencies into $VENV"
    # editable_mode=compat: a plain path entry in a .pth file. The default
    # import-hook finder costs ~20 ms (pathlib, importlib.util) at every
    # interpreter start, which `skillguard run` pays on each launch.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --config-settings editable_mode=compat -e "$REPO_ROOT[test]"
}

install_command() {
    # The `skillguard` command pip generated starts Python with site-packages
    # (~5 ms, plus .pth hooks) before it knows what it will do. This one starts
    # it isolated and without site (-IS); agent/fastrun.py adds site-packages
    # only when the full CLI is needed, so `skillguard run` from a stored plan
    # imports nothing but the launcher (bench/launch).
    local target="$VENV/bin/skillguard"
    cat >"$target.tmp" <<EOF
#!$VENV/bin/python -IS
import sys
sys.path.insert(0, "$REPO_ROOT")
from agent.fastrun import main
raise SystemExit(main())
EOF
    chmod 0755 "$target.tmp"
    mv -f "$target.tmp" "$target"
}

# The skill's init: executed by every launch between clone and the skill's
# exec (agent/launch/supervisor.py). Static: no dynamic loader to run at each
# launch. Rebuilt when its source (or this script) is newer; written to a
# temporary name and renamed, so a launch never executes a half-written file.
INIT_SOURCE="$REPO_ROOT/init/skillguard-init.c"
INIT_BINARY="$REPO_ROOT/build/skillguard-init"
build_init() {
    if [[ -x $INIT_BINARY && $INIT_BINARY -nt $INIT_SOURCE && $INIT_BINARY -nt ${BASH_SOURCE[0]} ]]; then
        return 0
    fi
    if ((check_only)); then would "build $INIT_BINARY from $INIT_SOURCE"; return 0; fi
    log "building $INIT_BINARY"
    install -d -m 0755 "$(dirname "$INIT_BINARY")"
    gcc -std=gnu11 -O2 -Wall -Wextra -Werror -static -o "$INIT_BINARY.tmp" "$INIT_SOURCE" \
        || die "could not build $INIT_BINARY (gcc and libc6-dev are needed)"
    chmod 0755 "$INIT_BINARY.tmp"
    mv -f "$INIT_BINARY.tmp" "$INIT_BINARY"
}

main() {
    refuse_unsupported_host

    local headers_package
    headers_package=$(kernel_headers_package)
    local packages=("${RUNTIME_APT_PACKAGES[@]}" ${headers_package:+"$headers_package"})
    ((want_bench)) && packages+=("${BENCH_APT_PACKAGES[@]}")
    install_apt_packages "${packages[@]}"
    link_kernel_headers
    mount_tracefs
    build_init
    ensure_venv

    local key
    key=$(stamp_key)
    if [[ -r $STAMP && $(<"$STAMP") == "$key" ]]; then
        ((check_only)) || log "venv up to date (stamp $STAMP)"
    elif ((check_only)); then
        would "pip install -e '.[test]' into $VENV and verify (stamp missing or stale)"
    else
        rm -f -- "$STAMP"
        install_python_packages
        verify_environment || die "environment check failed (see above); not writing the stamp"
        printf '%s\n' "$key" >"$STAMP"
    fi
    if ((!check_only)); then
        # Byte-compile the agent: an editable install leaves that to the first
        # import, which never happens under PYTHONDONTWRITEBYTECODE, and then
        # every `skillguard run` compiles its modules again (~30 ms).
        "$VENV/bin/python" -m compileall -q "$REPO_ROOT/agent" >/dev/null
        # The launch path's modules in one file (agent/bundle.py).
        (cd "$REPO_ROOT" && "$VENV/bin/python" -m agent.bundle) || log "note: launch bundle not written"
        install_command
    fi

    local elapsed
    elapsed=$(awk -v a="$started_at" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    if ((check_only)); then
        ((${#pending[@]} == 0)) || { log "check: ${#pending[@]} step(s) needed (${elapsed}s)"; exit 1; }
        log "check: nothing to do (${elapsed}s)"
    else
        log "ready (${elapsed}s)"
    fi
}

main
