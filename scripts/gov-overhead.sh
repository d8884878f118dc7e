#!/usr/bin/env bash
# Governance overhead on the 1 KiB round trip (docs/GOVERNANCE.md, "Overhead").
#
#   scripts/gov-overhead.sh RTT_BIN ROUNDS CALLS LABEL=PROXY_BIN:on|off ...
#
# Starts one proxy per LABEL (all at once, each on its own socket and port),
# then runs RTT_BIN (client-shim/examples/rtt.rs, release) against each in
# turn, ROUNDS times interleaved, CALLS calls of 1 KiB per run. "off": the
# embedded default configuration with the admin port off (no governance
# configured). "on": admin port on, a policy on `echo` (max_in_flight, an
# attribute route on `tenant`) and an access rule covering it in dry-run
# (the caller's uid allowed, so shm calls pass the rule check and TCP calls
# are counted as would-deny). Prints the median over the rounds of each
# proxy's p50 and p99, shm and TCP, and the median p50 of the quiet rounds
# (VERBOSE=1: every run's figures too).
set -euo pipefail
rtt=$1 rounds=$2 calls=$3
shift 3
dir=$(mktemp -d /tmp/gov-overhead.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
labels=()
port=$((20000 + RANDOM % 20000))
for spec in "$@"; do
    label=${spec%%=*} rest=${spec#*=}
    bin=${rest%:*} mode=${rest##*:}
    labels+=("$label")
    cfg="$dir/$label.toml"
    "$bin" --print-default-config >"$cfg"
    if [ "$mode" = on ]; then
        cat >>"$cfg" <<EOF
[services.echo]
max_in_flight = 100000
[[services.echo.attribute_routes]]
header = "tenant"
value = "blue"
to = "echo"
percent = 10
[[access.rules]]
services = ["echo"]
uids = [$(id -u)]
mode = "dry-run"
EOF
        admin="127.0.0.1:$((port + 1000))"
    else
        admin=off
    fi
    "$bin" --config "$cfg" --socket "$dir/$label.sock" --tcp "127.0.0.1:$port" \
        --admin "$admin" >"$dir/$label.out" 2>"$dir/$label.log" &
    pids+=($!)
    echo "$label 127.0.0.1:$port" >>"$dir/addrs"
    port=$((port + 1))
done
for label in "${labels[@]}"; do
    for _ in $(seq 100); do [ -S "$dir/$label.sock" ] && break; sleep 0.05; done
done
for r in $(seq "$rounds"); do
    while read -r label addr; do
        "$rtt" "$dir/$label.sock" "$addr" "$calls" 1024 |
            awk -v l="$label" '/^shm:|^tcp:/ {print l, $1, $3, $6}' >>"$dir/results"
    done <"$dir/addrs"
done
[ -n "${VERBOSE:-}" ] && cat "$dir/results" >&2
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# The machine may flip modes during a run (shm p50 ~2 us, or ~50 us while
# another process holds a core): "quiet" is the median over the runs whose
# p50 is within 3x the label's best, with how many runs that kept.
printf '%-10s %-5s %8s %8s %12s   (us; median of %s rounds of %s calls)\n' \
    label tr p50 p99 "quiet p50" "$rounds" "$calls"
for label in "${labels[@]}"; do
    for tr in shm: tcp:; do
        vals=$(awk -v l="$label" -v t="$tr" '$1==l && $2==t {print $3}' "$dir/results")
        p50=$(echo "$vals" | median)
        p99=$(awk -v l="$label" -v t="$tr" '$1==l && $2==t {print $4}' "$dir/results" | median)
        best=$(echo "$vals" | sort -g | head -1)
        quiet=$(echo "$vals" | awk -v b="$best" '$1 <= 3 * b')
        printf '%-10s %-5s %8s %8s %7s (%2s)\n' "$label" "${tr%:}" "$p50" "$p99" \
            "$(echo "$quiet" | median)" "$(echo "$quiet" | wc -l)"
    done
done
