#!/usr/bin/env bash
# fuzz.sh [DURATION] — runs every Fuzz target in the module for DURATION each
# (default 20s). go test -fuzz takes one target per run, hence the loop.
set -euo pipefail
dur=${1:-20s}
cd "$(dirname "$0")/.."
grep -rl --include='*_test.go' '^func Fuzz' . | while read -r f; do
  pkg=./$(dirname "${f#./}")
  for t in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$f"); do
    echo "== $pkg $t ($dur)"
    go test -run '^$' -fuzz "^$t\$" -fuzztime "$dur" "$pkg"
  done
done
