#!/usr/bin/env bash
# Run every fuzz target of meshshm-proto (handshake, metadata, stream) for
# SECONDS each (default 30):   shm-ring/proto/fuzz/run.sh 60
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../../../scripts/fuzz.sh" "$here" "${1:-30}"
