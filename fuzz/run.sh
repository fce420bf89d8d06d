#!/usr/bin/env bash
# Runs the fuzz targets one after another, each for SECONDS on one core (libFuzzer -jobs=1
# -workers=1), new inputs going to fuzz/corpus-run/<target>/ (the committed seeds in
# fuzz/corpus/<target>/ are read, never written). Installs cargo-fuzz if it is missing; needs
# the nightly toolchain. Prints each target's final libFuzzer lines; exits 1 if any target
# found a crash, a timeout or an OOM (the input is left in fuzz/artifacts/<target>/).
#
#   fuzz/run.sh [SECONDS] [TARGET...]      (default: 60 seconds, every target)
#   fuzz/run.sh --replay [TARGET...]        every committed seed and every defect's input
#                                           (tests/data/fuzz-*.qcow2) once: deterministic (CI)
set -euo pipefail
cd "$(dirname "$0")"
replay=0
if [ "${1:-}" = --replay ]; then
  replay=1
  seconds=0
else
  seconds=${1:-60}
fi
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(header_parse open_read check repair write_model map)
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi
# One core for the fuzzer; the build may use what CARGO_BUILD_JOBS allows.
cargo +nightly fuzz build -s none
failed=()
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus-run/$t" "artifacts/$t"
  max_len=()
  [ "$t" = write_model ] && max_len=(-max_len=388 -len_control=0)
  log="logs/$t.log"
  rm -f fuzz-0.log
  rc=0
  if [ "$replay" = 1 ]; then
    echo "== replay $t: seeds and defect inputs (log: fuzz/$log)"
    inputs=("corpus/$t")
    if [ "$t" != write_model ]; then
      mkdir -p "corpus-run/replay"
      cp ../tests/data/fuzz-*.qcow2 corpus-run/replay/
      inputs+=("corpus-run/replay")
    fi
    cargo +nightly fuzz run -s none "$t" "${inputs[@]}" -- -runs=0 -rss_limit_mb=2048 -timeout=30 \
      >"$log" 2>&1 || rc=$?
  else
    echo "== fuzz $t for ${seconds}s (log: fuzz/$log)"
    cargo +nightly fuzz run -s none "$t" "corpus-run/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -jobs=1 -workers=1 -rss_limit_mb=2048 -timeout=10 \
      -print_final_stats=1 "${max_len[@]}" >/dev/null 2>&1 || rc=$?
    mv -f fuzz-0.log "$log" 2>/dev/null || true
  fi
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::|^Done|SUMMARY|panicked at|^==[0-9]+== ERROR|Test unit written' "$log" | sed 's/^/   /' || true
  if [ "$rc" -ne 0 ] || grep -qE 'Test unit written|^==[0-9]+== ERROR' "$log"; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes, timeouts or OOMs in: ${failed[*]} (inputs in fuzz/artifacts/; see fuzz/RESULTS.md)" >&2
  exit 1
fi
if [ "$replay" = 1 ]; then
  echo "fuzz: ${#targets[@]} targets replayed, no crash"
else
  echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
fi
