#!/usr/bin/env bash
# Runs a fuzz target for SECONDS, starting from the committed corpus.
#
#   scripts/fuzz.sh TARGET SECONDS   one target (see fuzz/Cargo.toml)
#   scripts/fuzz.sh all SECONDS      every target in turn
#
# Exits non-zero if any target finds a crash; the crashing input is left in
# fuzz/artifacts/TARGET/. New inputs go to a temporary directory: the
# committed corpus (fuzz/corpus/TARGET) is only read, so a run never
# dirties the repository. Extra arguments after SECONDS go to libFuzzer.
# SIGIL_FUZZ_SANITIZER picks cargo-fuzz's sanitizer (default: address).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if [ $# -lt 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 TARGET|all SECONDS [LIBFUZZER_ARGS...]" >&2
  exit 2
fi
target=$1
seconds=$2
shift 2

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (cargo-fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi

# cargo-fuzz has no --locked: refuse here if fuzz/Cargo.lock is out of date.
cargo +nightly metadata --locked --format-version 1 >/dev/null
targets=$(cargo +nightly fuzz list)
if [ "$target" = all ]; then
  run=$targets
elif grep -qx -- "$target" <<<"$targets"; then
  run=$target
else
  echo "unknown fuzz target $target; targets are:" $targets >&2
  exit 2
fi

sanitizer=(--sanitizer "${SIGIL_FUZZ_SANITIZER:-address}")
# One build for every target, so the runs below start at once.
cargo +nightly fuzz build "${sanitizer[@]}" $([ "$target" = all ] || echo "$target")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in $run; do
  echo "==> fuzzing $t for ${seconds}s"
  mkdir -p "corpus/$t" "$work/$t"
  # The first directory receives new inputs; the committed one is read only.
  if ! cargo +nightly fuzz run "${sanitizer[@]}" "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 "$@"; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
