#!/usr/bin/env bash
# Runs Spindle's test suite, installing what it needs first.
# Usage: Tools/test.sh [extra swift test arguments, e.g. --filter Engine]
set -euo pipefail
cd "$(dirname "$0")/.."
# The NBD tests drive real clients: fio, qemu-img, nbdkit, libnbd (nbdinfo, nbdcopy, nbdfuse), ext4 tools.
Tools/setup.sh fio qemu-utils nbdkit libnbd-bin fuse3 fuse2fs e2fsprogs
# Suites that count open descriptors or hold process-wide locks are serialized; the rest run in
# parallel inside each suite's own tasks, so the run itself goes one test at a time.
swift build --build-tests
swift test --skip-build --no-parallel "$@"
