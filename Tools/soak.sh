#!/usr/bin/env bash
# Long soak of the whole-stack simulation (release build): thin volumes on a pool on RAID5 and RAID1 on
# fault-injecting disks, with read errors, member failures and rebuilds, and power cuts.
# Usage: Tools/soak.sh --minutes 30        or   Tools/soak.sh --seeds 500 [--seed 1000] [--operations 800]
#        Tools/soak.sh --minutes 10 --integrity --levels 5,1   (checksummed members, silent faults)
# Prints runs, operations, faults injected by kind (with --integrity, silent faults by kind, blocks
# that failed their checksums and were rewritten), power cuts and mismatches (0 is the only passing value).
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh
swift build -c release --product spindle 2>&1 | tail -n 1
"$(swift build -c release --show-bin-path)/spindle" simulate "$@"
