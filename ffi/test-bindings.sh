#!/usr/bin/env bash
# Build libmeshshm and the proxy, install the library into a temporary
# prefix, and run every language's tests against the real proxy:
#   rust (ffi unit tests + header check), c (examples + test_meshshm), c++ (ctest),
#   python (pip install + pytest), java (mvn test), go (go test).
# Ends with the line "N passed, M failed" (N, M count suites); exits non-zero
# if any suite failed.
#
# usage: ffi/test-bindings.sh [SUITE...]      (default: all; e.g. `ffi/test-bindings.sh python go`)
# env:   PROFILE=release   test a release build (default: debug)
#        KEEP=1            keep the temporary directory
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
profile=${PROFILE:-debug}
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(rust c cpp python java go)

work=$(mktemp -d "${TMPDIR:-/tmp}/meshshm-bindings.XXXXXX")
prefix="$work/prefix"
# Every suite makes its temporary directories (proxy sockets, logs) under here,
# so leftovers are easy to find.
export TMPDIR="$work/tmp"
mkdir -p "$TMPDIR"

cleanup() {
    # Proxies or example servers a failed suite may have left behind: only ours (by path).
    local pids
    pids=$(pgrep -f -- "$work/" || true)
    if [ -n "$pids" ]; then
        echo "test-bindings: stopping leftover processes: $pids" >&2
        for p in $pids; do kill "$p" 2>/dev/null || true; done
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

log() { printf '\n==== %s\n' "$*"; }

# Tools this script needs that a machine of this kind may lack: install them
# from Debian's packages when we can (root + apt-get), else say what is missing.
ensure_tools() {
    local missing=()
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v make >/dev/null || missing+=(make)
    command -v cc >/dev/null || missing+=(gcc)
    command -v c++ >/dev/null || missing+=(g++)
    command -v cmake >/dev/null || missing+=(cmake)
    [ -e /usr/include/gtest/gtest.h ] || [ -e /usr/local/include/gtest/gtest.h ] || missing+=(libgtest-dev)
    command -v mvn >/dev/null || missing+=(maven)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "installing ${missing[*]}"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "test-bindings: missing ${missing[*]} (install them)" >&2
        fi
    fi
    command -v go >/dev/null || echo "test-bindings: no Go toolchain on PATH: the go suite will fail" >&2
}
ensure_tools

log "build libmeshshm and meshshm-proxy ($profile)"
cargo_profile=()
outdir="$root/target/debug"
if [ "$profile" != debug ]; then
    cargo_profile=(--profile "$profile")
    outdir="$root/target/$profile"
fi
if ! (cd "$root" && cargo build "${cargo_profile[@]}" -p meshshm-ffi -p meshshm-proxy); then
    echo "0 passed, 1 failed"
    exit 1
fi
export MESHSHM_PROXY="$outdir/meshshm-proxy"

log "install into $prefix"
if ! NO_BUILD=1 PROFILE="$profile" "$here/install.sh" "$prefix"; then
    echo "0 passed, 1 failed"
    exit 1
fi
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MESHSHM_LIB="$prefix/lib"
# Go's build cache keys cgo packages on the CGO_* variables, not on what
# pkg-config prints: without these, a cached test binary from an earlier run
# links against that run's (deleted) prefix.
export CGO_CFLAGS="-I$prefix/include" CGO_LDFLAGS="-L$prefix/lib"

shm_before=$(ls /dev/shm 2>/dev/null | sort)

# ---- the suites: each returns non-zero on failure ----

suite_rust() {
    (cd "$root" && cargo test "${cargo_profile[@]}" -p meshshm-ffi)
}

suite_c() {
    local b="$work/c"
    mkdir -p "$b"
    # Out-of-tree build of the examples' Makefile.
    make -f "$here/examples/c/Makefile" O="$b" all static || return 1
    export MESHSHM_C_CLIENT="$b/meshshm-client" MESHSHM_C_SERVER="$b/meshshm-server"
    "$b/meshshm-client-static" -s "$TMPDIR/nobody.sock" echo Echo x 2>/dev/null
    [ $? -eq 1 ] || { echo "the statically linked client should fail to connect"; return 1; }
    timeout 600 "$b/test_meshshm"
}

suite_cpp() {
    local b="$work/cpp"
    cmake -S "$here/bindings/cpp" -B "$b" -DMESHSHM_PROXY="$MESHSHM_PROXY" >"$b.configure.log" 2>&1 \
        || { cat "$b.configure.log"; return 1; }
    cmake --build "$b" -j2 || return 1
    (cd "$b" && timeout 600 ctest --output-on-failure)
}

suite_python() {
    local venv="$work/venv"
    python3 -m venv --system-site-packages "$venv" || return 1
    if ! "$venv/bin/python" -c 'import pytest' 2>/dev/null; then
        "$venv/bin/pip" install -q pytest || return 1
    fi
    # pip install from the source tree (a copy, so no build files land in it).
    cp -r "$here/bindings/python" "$work/python-src"
    rm -rf "$work/python-src/build" "$work/python-src"/src/*.egg-info
    "$venv/bin/pip" install -q "$work/python-src" || return 1
    # Run from elsewhere so `import meshshm` is the installed package.
    (cd "$work" && timeout 600 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --rootdir "$work/python-src" "$work/python-src/tests")
}

suite_java() {
    if [ -z "${MESHSHM_C_SERVER:-}" ]; then
        local b="$work/c"
        mkdir -p "$b"
        make -f "$here/examples/c/Makefile" O="$b" "$b/meshshm-server" || return 1
        export MESHSHM_C_SERVER="$b/meshshm-server"
    fi
    local rc
    (cd "$here/bindings/java" && timeout 900 mvn -B -q test -DargLine="-Djava.io.tmpdir=$TMPDIR")
    rc=$?
    # mvn -q hides Surefire's summary: show it from the reports.
    cat "$here"/bindings/java/target/surefire-reports/*.txt 2>/dev/null | grep -h "Tests run" || true
    return $rc
}

suite_go() {
    (cd "$here/bindings/go" && go vet ./... && timeout 600 go test -count=1 -v ./... 2>&1 \
        | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go|error|cannot|undefined' ; exit "${PIPESTATUS[0]}")
}

passed=0
failed=0
results=()
for s in "${suites[@]}"; do
    log "suite: $s"
    if "suite_$s"; then
        passed=$((passed + 1))
        results+=("ok      $s")
    else
        failed=$((failed + 1))
        results+=("FAILED  $s")
    fi
done

# Nothing may be left behind: no process of ours, no segment in /dev/shm.
log "leftovers"
left=$(pgrep -f -- "$work/" || true)
shm_after=$(ls /dev/shm 2>/dev/null | sort)
new_shm=$(comm -13 <(echo "$shm_before") <(echo "$shm_after") | grep -i meshshm || true)
if [ -n "$left" ] || [ -n "$new_shm" ]; then
    echo "left behind: processes [$left] /dev/shm [$new_shm]"
    failed=$((failed + 1))
    results+=("FAILED  leftovers")
else
    echo "no process or /dev/shm segment left behind"
fi

echo
for r in "${results[@]}"; do echo "$r"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
