#!/usr/bin/env bash
# Install what building, testing, benchmarking and the demo of socketserver
# need, and only what is missing.  Run by `make deps` / `make test` / `make demo`
# (and `make bench` with --bench).  Safe to run again: when everything is there
# it changes nothing and does not touch the network.
#
#   scripts/deps.sh            build + test + demo + benchmark
#   scripts/deps.sh --bench    the same (park.test uses wrk as well)
#
# Debian/Ubuntu only (apt-get); elsewhere it lists what to install by hand.
# Works without a terminal (CI=true, no stdin): apt runs non-interactively.
set -euo pipefail

for arg in "$@"; do
    case $arg in
        --bench) ;;
        -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "deps.sh: unknown argument \"$arg\" (expected --bench)" >&2; exit 2 ;;
    esac
done

say() { printf 'deps: %s\n' "$*"; }

# Rust comes from rustup, not apt: say so clearly instead of failing deep in make.
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        say "cargo is in $HOME/.cargo/bin but not on PATH: run  export PATH=\"\$HOME/.cargo/bin:\$PATH\"" >&2
    else
        say "cargo not found: install the Rust toolchain (https://rustup.rs) and put cargo on PATH" >&2
    fi
    exit 1
fi

# What we need, as "debian-package check" pairs.  The check is either
# cmd:NAME (a command on PATH) or pkg (the package itself is installed, for
# libraries and headers that have no command).
needs=(
    "libclang-dev   pkg"             # libclang for bindgen in the tcl crate's clib build step
    "pkg-config     cmd:pkg-config"  # clib finds Tcl through pkg-config
    "gcc            cmd:cc"          # the linker cargo calls
    "binutils       cmd:readelf"     # load.test: the library must not need libtcl
    "tcl8.6-dev     pkg"             # tcl.h, libtcl8.6.so, tcl8.6.pc; libtcl8.6.a for load.test's host
    "tcl-dev        pkg"             # tcl.pc (clib also looks for that name)
    "tcl            cmd:tclsh"       # tclsh for the tests, demo and examples
    "tclx8.4        pkg"             # Tclx fork/wait/kill/signal used by tests and examples
    "tcl-thread     pkg"             # the Thread package: tests of the poll notifier with threads
    "curl           cmd:curl"        # the demo's suggested client; used by tests
    "procps         cmd:ps"          # tests check for left-over children with ps
    "apache2-utils  cmd:ab"          # load in the pool tests; the benchmark
    "valgrind       cmd:valgrind"    # signals.test: trap scripts that delete interps, checked for reads of freed memory
    "wrk            cmd:wrk"         # park.test (keep-alive load on the example); the benchmark
    "python3        cmd:python3"     # park.test: 10,000 connections without Tcl's bind() per socket; python.test: examples/worker.py
    "util-linux     cmd:setpriv"     # path.test: a registration from a process of another uid
    "systemd        cmd:systemd-socket-activate"  # activate.test: a real service manager passing a socket
    "haproxy        cmd:haproxy"     # agent.test, proxy.test: HAProxy in front (agent-check, send-proxy); the PROXY bench row
    "nginx          cmd:nginx"       # proxy.test: nginx stream in front (proxy_protocol on)
    "libnginx-mod-stream pkg"        # nginx's stream module (/usr/lib/nginx/modules/ngx_stream_module.so)
)

have_dpkg=0
command -v dpkg-query >/dev/null 2>&1 && have_dpkg=1

installed() {   # installed PACKAGE CHECK
    case $2 in
        cmd:*) command -v "${2#cmd:}" >/dev/null 2>&1 ;;
        pkg)
            [ "$have_dpkg" = 1 ] || return 0   # cannot tell without dpkg: assume present
            [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ] ;;
    esac
}

missing_list() {
    local entry pkg check
    for entry in "${needs[@]}"; do
        read -r pkg check <<<"$entry"
        installed "$pkg" "$check" || printf '%s\n' "$pkg"
    done
}

mapfile -t missing < <(missing_list)
if [ "${#missing[@]}" -eq 0 ]; then
    say "everything needed is installed"
    exit 0
fi

say "missing: ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: install the equivalents of the packages above by hand" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        say "not root and no sudo: as root run  apt-get install ${missing[*]}" >&2
        exit 1
    fi
    # With no terminal to ask for a password (CI), fail instead of hanging.
    if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
fi

apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
"${apt[@]}" update
"${apt[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null

mapfile -t still < <(missing_list)
if [ "${#still[@]}" -ne 0 ]; then
    say "still missing after apt-get install: ${still[*]}" >&2
    exit 1
fi
say "installed: ${missing[*]}"
