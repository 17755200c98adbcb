#!/usr/bin/env bash
# Builds the libFuzzer targets (every tests/fuzz/fuzz_*.cpp) with clang into
# ${BUILD_DIR:-build-fuzz}, then runs each for ${FUZZ_SECONDS:-20} s on its seed corpus
# tests/fuzz/corpus/<target without fuzz_>/ with tests/fuzz/<target>.dict, or json.dict when
# there is none. Prints "fuzz <target>: N runs in S s" per target; a finding (crash, sanitizer
# report, leak, input slower than 60 s) fails the script, with the input and the log left in
# ${BUILD_DIR}/fuzz-runs/<name>/. FUZZ_TARGETS (space-separated) picks targets. scripts/test.sh
# (CI) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
BUILD_DIR=${BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-20}

targets=()
for src in tests/fuzz/fuzz_*.cpp; do targets+=("$(basename "$src" .cpp)"); done
# FUZZ_TARGETS="fuzz_a fuzz_b" runs only those (e.g. long runs split over cores).
[ -n "${FUZZ_TARGETS:-}" ] && read -r -a targets <<<"$FUZZ_TARGETS"
for t in "${targets[@]}"; do
  if [ ! -d "tests/fuzz/corpus/${t#fuzz_}" ]; then
    echo "fuzz: $t has no seed corpus tests/fuzz/corpus/${t#fuzz_}/" >&2
    exit 1
  fi
done

# Only the fuzz targets: the instrumented core (moeflux_fuzz_core) and the target files.
start=$SECONDS
if ! BUILD_DIR=$BUILD_DIR TARGETS="${targets[*]}" scripts/build.sh -DCMAKE_C_COMPILER=clang \
     -DCMAKE_CXX_COMPILER=clang++ -DMOEFLUX_BENCH=OFF -DMOEFLUX_CUDA=OFF; then
  grep -qs '^MOEFLUX_HAVE_LIBFUZZER:INTERNAL=1' "$BUILD_DIR/CMakeCache.txt" ||
    echo "fuzz: clang cannot link -fsanitize=fuzzer (scripts/setup.sh installs clang and" \
         "libclang-rt-dev)" >&2
  exit 1
fi
echo "fuzz: built ${targets[*]} in $((SECONDS - start)) s"

status=0
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  work=$BUILD_DIR/fuzz-runs/$name
  rm -rf "$work"
  mkdir -p "$work/corpus"
  dict=tests/fuzz/$t.dict
  [ -f "$dict" ] || dict=tests/fuzz/json.dict
  # New inputs go to the run's corpus/ (first directory), the seeds are only read. The run's
  # directory is the working directory: fuzz_snapshot writes a fresh seed to ./corpus/.
  if ! (cd "$work" && "$root/$BUILD_DIR/tests/$t" -max_total_time="$seconds" -timeout=60 \
          -dict="$root/$dict" -artifact_prefix=./ -print_final_stats=1 \
          corpus "$root/tests/fuzz/corpus/$name") >"$work/log" 2>&1; then
    tail -n 60 "$work/log"
    echo "fuzz $t: FAILED; input and log in $work/"
    status=1
    continue
  fi
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1/p' "$work/log")
  secs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$work/log")
  cov=$(grep -o 'DONE *cov: [0-9]*' "$work/log" | grep -o '[0-9]*$' || true)
  echo "fuzz $t: ${runs:-?} runs in ${secs:-?} s (coverage ${cov:-?}," \
       "corpus $(ls "tests/fuzz/corpus/$name" | wc -l) seeds + $(ls "$work/corpus" | wc -l) found)"
done
exit $status
