#!/usr/bin/env bash
# Run every fuzz target of meshshm-ring for SECONDS each (default 30).
#   shm-ring/fuzz/run.sh 60
# Installs cargo-fuzz if missing. Uses the nightly toolchain when rustup has
# one, else stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

for target in $("${fuzz[@]}" list); do
    echo "== fuzzing $target for ${secs}s"
    mkdir -p "corpus/$target"
    "${fuzz[@]}" run "$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
