#!/usr/bin/env bash
# Run every cargo-fuzz target of the fuzz package in DIR for SECONDS each.
#   scripts/fuzz.sh shm-ring/fuzz 60
# Installs cargo-fuzz if missing. Uses the nightly toolchain when rustup has
# one, else stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
set -euo pipefail
dir="$1"
secs="${2:-30}"
cd "$dir"

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
