#!/usr/bin/env bash
# Runs the test suite under AddressSanitizer and ThreadSanitizer, each in its own build folder.
# Usage: Tools/sanitizers.sh [address|thread ...] [swift test arguments]   (both sanitizers by default)
#   Tools/sanitizers.sh address --filter 'RAID5WritePath|RAIDFailure|StackSimulation'
#     (the RAID5 write-path property test, the failure tests and the widened simulator only)
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh
sanitizers=()
while [ $# -gt 0 ] && { [ "$1" = address ] || [ "$1" = thread ]; }; do
  sanitizers+=("$1")
  shift
done
[ ${#sanitizers[@]} -gt 0 ] || sanitizers=(address thread)
# LeakSanitizer reports allocations the XCTest runner itself keeps; leaks are not what this run checks.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
# See the file for the one pattern suppressed (the Swift runtime's continuation hand-off).
export TSAN_OPTIONS=${TSAN_OPTIONS:-suppressions=$PWD/Tools/tsan-suppressions.txt}
for sanitizer in "${sanitizers[@]}"; do
  echo "==> swift test --sanitize=$sanitizer $*"
  swift test --no-parallel --sanitize="$sanitizer" --scratch-path ".build-$sanitizer" "$@"
done
