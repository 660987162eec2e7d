#!/usr/bin/env bash
# Spindle's main demo: the whole story so far, on image files in a temporary folder.
# A RAID5 array of four images: checksummed data written, a member failed and the data read back
# degraded, the member replaced and rebuilt with progress, a scrub, everything verified again.
# Usage: Tools/demo.sh            (SPINDLE_DEMO_SIZE=1G Tools/demo.sh for larger members)
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh

size=${SPINDLE_DEMO_SIZE:-256M}
step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Building spindle (release)"
swift build -c release --product spindle 2>&1 | tail -n 1
spindle_bin="$(swift build -c release --show-bin-path)/spindle"
spindle() { "$spindle_bin" "$@"; }

work=$(mktemp -d /var/tmp/spindle-demo-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

step "An image file: sparse, direct I/O, and a fio-like load on the io_uring engine"
run spindle image create scratch.img --size "$size"
run spindle bench scratch.img --rw randread --bs 4K --iodepth 32 --runtime 3 --fill
rm scratch.img

step "Create a RAID5 array over four $size images (created sparse; their data areas zeroed, so parity starts right)"
run spindle array create demo --level 5 --chunk 64K --size "$size" m0.img m1.img m2.img m3.img
run spindle array status m0.img m1.img m2.img m3.img

step "Write the whole array with self-describing, checksummed blocks, then read random blocks back and check them"
run spindle bench --array m0.img m1.img m2.img m3.img --rw randread --bs 4K --iodepth 16 --runtime 3 --fill --verify --seed 7

step "A disk dies: fail m1.img. The array keeps serving every byte from parity"
run spindle array fail --member m1.img m0.img m1.img m2.img m3.img
run spindle array status m0.img m1.img m2.img m3.img
run spindle bench --array m0.img m2.img m3.img --bs 4K --iodepth 32 --verify-existing --seed 7

step "Replace it with a new image and rebuild onto it (progress on standard error)"
run spindle array replace --old m1.img --new m4.img m0.img m1.img m2.img m3.img
run spindle array status --scan .

step "Scrub: parity must match the data everywhere"
run spindle array scrub --scan .

step "Read every block once more, now with the rebuilt member in place"
run spindle bench --array m0.img m4.img m2.img m3.img --bs 4K --iodepth 32 --verify-existing --seed 7

step "Failures are refused with reasons: a stale member, a missing one"
run spindle array status m0.img m1.img m2.img m3.img || true
rm m2.img
run spindle array assemble m0.img m4.img m3.img
run spindle array status m0.img m4.img m3.img

step "Done: the images are removed with their temporary folder"
