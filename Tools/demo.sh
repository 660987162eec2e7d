#!/usr/bin/env bash
# Spindle's main demo: the whole story, on image files in a temporary folder.
# A RAID5 array of four images; a thin pool on it; volumes with checksummed data; a file imported,
# a snapshot that keeps it while the origin changes, an incremental backup of what changed; a member
# failed, data read back degraded, the member replaced and rebuilt with progress, a scrub; a volume
# grown and shrunk; everything verified.
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
export SPINDLE_DIR="$work"   # where spindle pool/volume commands look for pools

step "An image file: sparse, direct I/O, and a fio-like load on the io_uring engine"
run spindle image create scratch.img --size "$size"
run spindle bench scratch.img --rw randread --bs 4K --iodepth 32 --runtime 3 --fill
rm scratch.img

step "Create a RAID5 array over four $size images (created sparse; their data areas zeroed, so parity starts right)"
run spindle array create demo --level 5 --chunk 64K --size "$size" m0.img m1.img m2.img m3.img
run spindle array status m0.img m1.img m2.img m3.img

step "A thin pool on the array (found later by name, from the label on the array), and two volumes"
run spindle pool create tank array:demo
run spindle volume create tank/vm1 --size 512M
run spindle volume create tank/files --size 1G
run spindle volume list tank

step "Write checksummed, self-describing blocks over vm1's first 128 MiB and read random ones back"
run spindle bench --volume tank/vm1 --rw randread --bs 4K --iodepth 16 --size 128M --runtime 2 --fill --verify --seed 7

step "Import a file into tank/files (its zero runs take no space), then snapshot it read-only"
head -c 24M /dev/urandom > original.bin
truncate -s 64M original.bin
run spindle volume import tank/files original.bin
run spindle volume snapshot tank/files before --read-only

step "Change the origin: the snapshot keeps the old data, and only the changed chunks were copied"
head -c 8M /dev/urandom > update.bin
run spindle volume import tank/files update.bin
run spindle volume export tank/before from-snapshot.bin
truncate -s 64M from-snapshot.bin
run cmp original.bin from-snapshot.bin && echo "the snapshot still holds the original file"
run spindle volume export tank/files from-origin.bin
cmp -s <(head -c 8M from-origin.bin) update.bin && echo "the origin holds the update"
run spindle pool status tank

step "An incremental backup: what changed since the snapshot, and its copy brought up to date with only that"
run spindle volume snapshot tank/files after --read-only
run spindle volume diff tank/before tank/after
run spindle volume export tank/after from-snapshot.bin --since tank/before
run cmp from-origin.bin from-snapshot.bin && echo "the copy of 'before' is now a copy of 'after', from 8 MiB of writes"

step "A disk dies: fail m1.img. The pool keeps serving every byte from parity"
run spindle array fail --member m1.img --scan .
run spindle array status --scan .
run spindle bench --volume tank/vm1 --bs 4K --iodepth 32 --size 128M --verify-existing --seed 7

step "Replace it with a new image and rebuild onto it (progress on standard error)"
run spindle array replace --old m1.img --new m4.img --scan .
rm m1.img
run spindle array scrub --scan .

step "Everything reads back after the rebuild: vm1's blocks, and the snapshot's file"
run spindle bench --volume tank/vm1 --bs 4K --iodepth 32 --size 128M --verify-existing --seed 7
run spindle volume export tank/before again.bin
truncate -s 64M again.bin
run cmp original.bin again.bin && echo "the snapshot survived the failure and the rebuild"

step "Grow vm1, then shrink it to 256 MiB (shrinking asks; --yes answers): its first 128 MiB are intact"
run spindle volume resize tank/vm1 --size 2G
run spindle volume resize tank/vm1 --size 256M --yes
run spindle bench --volume tank/vm1 --bs 4K --iodepth 32 --size 128M --verify-existing --seed 7

step "Delete the snapshot (its own chunks return to the pool), and check the metadata like thin_check"
run spindle volume delete tank/before --yes
run spindle volume delete tank/after --yes
run spindle pool check tank
run spindle pool status tank

step "Mistakes are refused with reasons"
run spindle pool status pond || true
run spindle volume create tank/vm1 --size 1G || true
run spindle volume snapshot tank/ghost g1 || true
run spindle pool create other m0.img || true

step "Done: the images are removed with their temporary folder"
