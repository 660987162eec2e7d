#!/usr/bin/env bash
# Runs Spindle's test suite, installing what it needs first: builds the package and its tests, builds
# and runs the programs in Examples/ (checking that the README quotes them as they are), then runs
# the Swift Testing suites.
# Usage: Tools/test.sh [extra swift test arguments, e.g. --filter Engine]
set -euo pipefail
cd "$(dirname "$0")/.."
# The NBD tests drive real clients: fio, qemu-img, nbdkit, libnbd (nbdinfo, nbdcopy, nbdfuse, and its Python
# bindings for Tools/incremental-backup.py), ext4 tools.
Tools/setup.sh fio qemu-utils nbdkit libnbd-bin python3-libnbd fuse3 fuse2fs e2fsprogs python3 gnutls-bin
# The sources are formatted as .swift-format says (Tools/format.sh rewrites them).
Tools/format.sh --check
swift build --build-tests

# The examples, a package of their own that depends on this one by path. Built in this package's
# own build folder (Examples/.build: sharing the root's build folder leaves stale build descriptions); each
# works in a temporary folder, checks what it reads back and exits non-zero on a failure.
swift build --package-path Examples
examples_bin=$(swift build --package-path Examples --show-bin-path)
examples=$(swift package --package-path Examples describe --type json | python3 -c '
import json, sys
print(" ".join(p["name"] for p in json.load(sys.stdin)["products"] if "executable" in p["type"]))')
for example in $examples; do
  "$examples_bin/$example" || { echo "test: example $example failed" >&2; exit 1; }
done

# Every ```swift block in the README must be quoted from the example file its paragraph links to:
# runs of lines, in order, separated by `// …` lines where the README leaves code out.
python3 - <<'EOF'
import re, sys
lines = open("README.md").read().split("\n")
failures, index, quoted = [], 0, 0
while index < len(lines):
    if lines[index].strip() != "```swift":
        index += 1
        continue
    start = index
    paragraph = []
    back = start - 1
    while back >= 0 and lines[back].strip() == "":
        back -= 1
    while back >= 0 and lines[back].strip() != "":
        paragraph.insert(0, lines[back])
        back -= 1
    end = lines.index("```", start + 1)
    block = lines[start + 1:end]
    index = end + 1
    named = re.search(r"\((Examples/[^)]+\.swift)\)", " ".join(paragraph))
    if not named:
        failures.append(f"README.md:{start + 1}: a swift block whose paragraph names no file in Examples/")
        continue
    source = [line.strip() for line in open(named.group(1)).read().split("\n")]
    runs, run = [], []
    for line in block:
        if line.strip().startswith("// …"):
            runs.append(run)
            run = []
        else:
            run.append(line.strip())
    runs.append(run)
    position = 0
    for run in filter(None, runs):
        found = next((at for at in range(position, len(source) - len(run) + 1) if source[at:at + len(run)] == run), None)
        if found is None:
            missing = next((line for line in run if line not in source[position:]), None)
            failures.append(f"README.md:{start + 1}: " + (f"'{missing}' is not in {named.group(1)}" if missing is not None
                            else f"lines from '{run[0]}' on are not together, in this order, in {named.group(1)}"))
            break
        position = found + len(run)
    quoted += 1
for failure in failures:
    print(failure, file=sys.stderr)
if failures:
    sys.exit(1)
print(f"README: {quoted} swift blocks quoted from Examples/ as they are")
EOF

# Suites that count open descriptors or hold process-wide locks are serialized; the rest run in
# parallel inside each suite's own tasks, so the run itself goes one test at a time.
swift test --skip-build --no-parallel "$@"
