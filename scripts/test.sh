#!/usr/bin/env bash
# The full test run: every suite, once. README.md names this command and
# .ci/run calls it. Prints "N passed, M failed" (suites) at the end and exits
# non-zero if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECS=${FUZZ_SECS:-30}
passed=0
failed=0
failures=()

suite() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "=== $name: FAILED ($((SECONDS - t0)) s)"
    fi
}

# Leftovers in /dev/shm from before this run are not ours to judge.
before=$(ls /dev/shm 2>/dev/null | grep -c '^meshshm' || true)

suite fmt cargo fmt --all -- --check
suite clippy cargo clippy --workspace --all-targets -- -D warnings
# The multi-process tests start the real binaries: build them first.
suite build cargo build --workspace --bins
suite cargo-test cargo test --workspace
suite loom env RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom \
    cargo test -p meshshm-ring --test loom --release
suite fuzz-ring bash shm-ring/fuzz/run.sh "$FUZZ_SECS"
if [ -x shm-ring/proto/fuzz/run.sh ] || [ -f shm-ring/proto/fuzz/run.sh ]; then
    suite fuzz-proto bash shm-ring/proto/fuzz/run.sh "$FUZZ_SECS"
fi
if [ -f ffi/test-bindings.sh ]; then
    suite bindings bash ffi/test-bindings.sh
fi

after=$(ls /dev/shm 2>/dev/null | grep -c '^meshshm' || true)
if [ "$after" -gt "$before" ]; then
    echo "files left in /dev/shm by the tests:"
    ls -la /dev/shm | grep meshshm
    failed=$((failed + 1))
    failures+=("dev-shm-clean")
else
    passed=$((passed + 1))
fi

echo
[ ${#failures[@]} -gt 0 ] && echo "failed suites: ${failures[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
