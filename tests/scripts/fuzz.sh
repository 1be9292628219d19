#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for a while; exits non-zero on the first
# finding (crash, failed property, hang or memory blow-up), which libFuzzer saves under
# fuzz/artifacts/<target>/.
#
#   tests/scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# test.sh runs every target for 10 s from an unoptimized build (AMBIT_FUZZ_BUILD=dev:
# cargo-fuzz builds every crate with one codegen unit, and optimizing all of them costs
# minutes of CI for seconds of fuzzing). Long runs use the optimized build (the default),
# one target at a time:
#   nice -n 19 tests/scripts/fuzz.sh 3600 config
#
# Stable toolchain: cargo-fuzz's default AddressSanitizer needs nightly (-Zsanitizer), so
# the targets run with `--sanitizer none` (sanitizer-coverage only). Safe Rust needs no
# ASan to find panics, failed assertions, hangs and allocation blow-ups.
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"

seconds=${1:-10}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

profile=()
case "${AMBIT_FUZZ_BUILD:-release}" in
  release) ;;
  dev) profile=(--dev) ;;
  *) echo "fuzz: AMBIT_FUZZ_BUILD must be release or dev" >&2; exit 2 ;;
esac

cargo fuzz build "${profile[@]}" --sanitizer none
for t in "${targets[@]}"; do
  # New inputs go to corpus/<t>; seeds/<t> and regressions/<t> are read only.
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  for d in "seeds/$t" "regressions/$t"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  log="artifacts/$t.log"
  mkdir -p artifacts
  # -timeout: one input taking 10 s is a finding (the config parser took 41 s on one).
  # -rss_limit_mb/-malloc_limit_mb: a blow-up is a finding, not a dead machine.
  if ! cargo fuzz run "${profile[@]}" --sanitizer none "$t" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -print_final_stats=1 >"$log" 2>&1; then
    grep -v '^#[0-9]' "$log" | tail -n 80 >&2
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/, the log in fuzz/$log" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "fuzz: $t ok: ${runs:-?} runs in ${seconds}s, ${cov:-cov: ?}"
done
