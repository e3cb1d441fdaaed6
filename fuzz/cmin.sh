#!/usr/bin/env bash
# Rebuilds the committed corpus of TARGET from its current corpus, the seeds
# and any directories of new inputs (e.g. a run's output), minimised by
# coverage edges (libFuzzer's merge, as `cargo fuzz cmin` does, without
# hit counts). A corpus over MAX_KB keeps its smallest inputs up to MAX_KB,
# merged again, so the repository stays small.
#   fuzz/cmin.sh TARGET [NEW_INPUT_DIR...]     (MAX_KB defaults to 100)
set -euo pipefail
cd "$(dirname "$0")"
t=$1
shift
max=$(( ${MAX_KB:-100} * 1024 ))
cargo +nightly fuzz build "$t"
bin=target/x86_64-unknown-linux-gnu/release/$t
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "corpus/$t" "$tmp/all" "$tmp/small" "$tmp/out"
inputs=("corpus/$t" "$@")
[ -d "seeds/$t" ] && inputs+=("seeds/$t")
"$bin" -merge=1 -use_counters=0 "$tmp/all" "${inputs[@]}" 2>&1 | grep MERGE-OUTER | tail -n 1
total=0
for f in $(ls -Sr "$tmp/all"); do
  size=$(stat -c %s "$tmp/all/$f")
  [ $((total + size)) -gt "$max" ] && break
  total=$((total + size))
  cp "$tmp/all/$f" "$tmp/small/"
done
"$bin" -merge=1 -use_counters=0 "$tmp/out" "$tmp/small" 2>&1 | grep MERGE-OUTER | tail -n 1
rm -rf "corpus/$t"
mv "$tmp/out" "corpus/$t"
echo "$t: $(ls "corpus/$t" | wc -l) inputs, $(cat "corpus/$t"/* | wc -c) bytes"
