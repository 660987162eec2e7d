#!/usr/bin/env bash
# Process-level crash runs: `spindle serve` is killed with SIGKILL while a client writes and flushes
# through NBD, and snapshot, resize, delete, scrub --repair, replace and rebuild are killed at random
# moments; after each kill the array is reassembled and checked (flushed data present, other blocks
# old-or-written, snapshots intact, pool check clean, scrub without mismatch).
# Usage: Tools/crash.sh [--rounds 200] [--seeds 1] [--seed 1]
# Prints, per seed, the rounds, the kills by command and the blocks checked; any mismatch fails.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=100 seeds=1 seed=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --seeds) seeds="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        *) echo "usage: Tools/crash.sh [--rounds N] [--seeds N] [--seed FIRST]" >&2; exit 2 ;;
    esac
done
Tools/setup.sh
swift build --build-tests 2>&1 | tail -n 1
status=0
for ((s = seed; s < seed + seeds; s++)); do
    output=$(SPINDLE_CRASH_ROUNDS="$rounds" SPINDLE_CRASH_SEED="$s" swift test --skip-build --filter ProcessCrashTests 2>&1) || status=1
    echo "$output" | grep -E "crash run|recorded an issue|↳ seed|passed after|failed after" | grep -v "Test run" || true
done
[ $status = 0 ] && echo "all crash runs passed" || echo "A CRASH RUN FAILED (its seed and round are above)"
exit $status
