#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECONDS each (default 600), then prints a table of
# target, seconds, executions and crashes. Not run by CI.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      JOBS=2 scripts/fuzz.sh 600   (two at a time)
#
# cargo-fuzz needs a nightly compiler: `cargo +nightly` when a nightly toolchain is installed,
# else the stable one with RUSTC_BOOTSTRAP=1. Install cargo-fuzz with `cargo install cargo-fuzz`.
# New corpus entries land in fuzz/corpus/<target>/ (only the seed-* files are committed);
# crashes land in fuzz/artifacts/<target>/ and make this script exit 1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(config_compile path_match usage_parse headers)
fi
jobs="${JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is required: cargo install cargo-fuzz" >&2
  exit 2
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

# -O: optimised, without sanitizer-wide debug assertions; Cargo.toml turns overflow checks and
# debug assertions on for tollgate itself.
"${fuzz[@]}" build -O

mkdir -p logs
run_one() {
  local t="$1"
  mkdir -p "corpus/$t"
  set +e
  nice -n 19 "${fuzz[@]}" run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -max_len=8192 >"logs/$t.log" 2>&1
  echo $? >"logs/$t.rc"
  set -e
}

running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

status=0
printf '%-16s %8s %14s %8s %8s\n' target seconds execs crashes corpus
for t in "${targets[@]}"; do
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "logs/$t.log" | awk '{print $2}' | tail -1)
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "logs/$t.log" | awk '{print $5}' | tail -1)
  crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
  corpus=$(find "corpus/$t" -type f | wc -l)
  rc=$(cat "logs/$t.rc" 2>/dev/null || echo 1)
  if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
    status=1
  fi
  printf '%-16s %8s %14s %8s %8s\n' "$t" "${took:-?}" "${execs:-?}" "$crashes" "$corpus"
done
exit "$status"
