#!/usr/bin/env bash
# Run every fuzz target of meshshm-ring (hostile_producer) for SECONDS each
# (default 30):   shm-ring/fuzz/run.sh 60
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../../scripts/fuzz.sh" "$here" "${1:-30}"
