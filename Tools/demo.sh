#!/usr/bin/env bash
# Spindle's main demo: the whole story so far, on image files in a temporary folder.
# Usage: Tools/demo.sh            (SPINDLE_DEMO_SIZE=4G Tools/demo.sh for a larger image)
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh

size=${SPINDLE_DEMO_SIZE:-1G}
step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Building spindle (release)"
swift build -c release --product spindle 2>&1 | tail -n 1
spindle_bin="$(swift build -c release --show-bin-path)/spindle"
spindle() { "$spindle_bin" "$@"; }

work=$(mktemp -d /var/tmp/spindle-demo-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

step "Create a sparse $size image: it takes no space until written"
run spindle image create disk.img --size "$size"
run spindle image info disk.img

step "Write it end to end in 1 MiB requests, each block self-describing, then read every block back and check it"
run spindle bench disk.img --rw write --bs 1M --iodepth 8 --ops $(( $("$spindle_bin" image info disk.img --json | sed -n 's/.*"sizeBytes" : \([0-9]*\).*/\1/p') / 1048576 )) --verify
run spindle image info disk.img

step "4 KiB random reads at queue depth 32, O_DIRECT, through the io_uring engine"
run spindle bench disk.img --rw randread --bs 4K --iodepth 32 --runtime 5

step "Mixed random reads and writes at depth 16, verifying every byte read"
run spindle bench disk.img --rw randrw --bs 4K --iodepth 16 --runtime 3 --verify

step "Scripts read the same reports as JSON"
run spindle bench disk.img --rw read --bs 128K --iodepth 4 --ops 2000 --json > report.json
head -n 12 report.json

step "Mistakes get one clear line on standard error and a non-zero status"
run spindle image create disk.img --size "$size" || echo "(exit status $?)"
run spindle bench disk.img --bs 3000 --ops 10 || echo "(exit status $?)"

step "Done: the image is removed with its temporary folder"
