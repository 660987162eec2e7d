#!/usr/bin/env bash
# Formats the Swift sources with swift-format and the repository's .swift-format configuration.
# Usage: Tools/format.sh           rewrite Sources, Tests, Examples and Benchmarks in place
#        Tools/format.sh --check   change nothing; list the files formatting would change, exit 1 if any
set -euo pipefail
cd "$(dirname "$0")/.."

mode=apply
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  *) echo "usage: Tools/format.sh [--check]" >&2; exit 2 ;;
esac

formatter=$(command -v swift-format || true)
if [ -z "$formatter" ] && command -v swift >/dev/null; then
  # Toolchains ship it beside swift.
  formatter=$(dirname "$(readlink -f "$(command -v swift)")")/swift-format
fi
[ -x "$formatter" ] || { echo "format: swift-format not found (it comes with Swift 6 toolchains)" >&2; exit 1; }

# The Swift files under the formatted folders, build folders left out.
mapfile -d '' files < <(find Sources Tests Examples Benchmarks -name .build -prune -o -name '*.swift' -type f -print0 | sort -z)

if [ "$mode" = apply ]; then
  "$formatter" format --configuration .swift-format --in-place --parallel "${files[@]}"
  exit 0
fi

# Check: format copies, compare them with the files.
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
for file in "${files[@]}"; do
  mkdir -p "$copy/$(dirname "$file")"
  cp "$file" "$copy/$file"
done
(cd "$copy" && "$formatter" format --configuration "$OLDPWD/.swift-format" --in-place --parallel "${files[@]}")
differ=0
for file in "${files[@]}"; do
  if ! cmp -s "$file" "$copy/$file"; then
    echo "$file"
    differ=1
  fi
done
if [ "$differ" -ne 0 ]; then
  echo "format: the files above are not formatted; run Tools/format.sh" >&2
fi
exit "$differ"
