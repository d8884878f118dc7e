#!/usr/bin/env bash
# Binding overhead: the median round trip of a 1 KiB echo call from each
# language, against one proxy, next to the same call from Rust (the client
# shim itself). Release builds; CALLS calls (default 2000) after a warm-up,
# one at a time on one client.
#
# The machines are noisy: the languages take turns, ROUNDS times (default 3),
# so that a burst of load elsewhere hits them all alike; compare within a round.
#
# usage: [ROUNDS=3] ffi/bench-latency.sh [CALLS]
set -euo pipefail

calls=${1:-2000}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/meshshm-bench.XXXXXX")
proxy_pid=
cleanup() {
    if [ -n "$proxy_pid" ]; then
        kill "$proxy_pid" 2>/dev/null || true
        wait "$proxy_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# (Two builds: naming --example would restrict the first to that one target.)
(cd "$root" && cargo build --release -p meshshm-ffi -p meshshm-proxy && cargo build --release -p meshshm-ffi --example latency)
NO_BUILD=1 PROFILE=release "$here/install.sh" "$work/prefix" >/dev/null
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" LD_LIBRARY_PATH="$work/prefix/lib" MESHSHM_LIB="$work/prefix/lib"
export CGO_LDFLAGS="-Wl,-rpath,$work/prefix/lib"

echo "building the probes..."
make -s -f "$here/examples/c/Makefile" O="$work" "$work/meshshm-latency"
cmake -S "$here/bindings/cpp" -B "$work/cpp" -DCMAKE_BUILD_TYPE=Release -DMESHSHM_BUILD_TESTS=OFF >/dev/null
cmake --build "$work/cpp" >/dev/null
(cd "$here/bindings/go" && go build -o "$work/go-latency" ./cmd/meshshm-latency)
(cd "$here/bindings/java" && mvn -B -q test-compile dependency:build-classpath -Dmdep.outputFile="$work/cp.txt" >/dev/null)
java_cp="$here/bindings/java/target/classes:$here/bindings/java/target/test-classes:$(cat "$work/cp.txt")"

sock="$work/proxy.sock"
"$root/target/release/meshshm-proxy" --socket "$sock" --tcp off >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done

echo "1 KiB echo round trip, $calls calls each, median (p99); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "${ROUNDS:-3}"); do
    echo "-- round $round"
    "$root/target/release/examples/latency" "$sock" "$calls"
    "$work/meshshm-latency" -s "$sock" -n "$calls"
    "$work/cpp/meshshm_cpp_latency" "$sock" "$calls"
    PYTHONPATH="$here/bindings/python/src" python3 "$here/bindings/python/bench_latency.py" "$sock" "$calls"
    java -cp "$java_cp" io.meshshm.Latency "$sock" "$calls"
    "$work/go-latency" -s "$sock" -n "$calls"
done
