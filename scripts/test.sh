#!/usr/bin/env bash
# Set-up, build and the whole test suite: a release-style build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the concurrency tests under
# ThreadSanitizer, then each libFuzzer target for a short fixed time (scripts/fuzz.sh). At the
# end, pass or fail, it lists every skipped test with its reason. This is what CI runs (.ci/run,
# with CI=true: there a skip of what CI is expected to have fails instead, tests/test_util.h).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each ctest run writes a JUnit file; the skipped tests and the reasons their output gives
# (gtest prints "FILE:LINE: Skipped" and the reason, then "[  SKIPPED ]") are listed from them.
junits=(build/ctest-junit.xml build-asan/ctest-junit.xml build-tsan/ctest-junit.xml)
rm -f "${junits[@]}"
skip_summary() {
  local f lines=""
  for f in "${junits[@]}"; do
    [ -f "$f" ] || continue
    lines+=$(awk -v build="${f%%/*}" '
      function unxml(s) {
        gsub(/&lt;/, "<", s); gsub(/&gt;/, ">", s); gsub(/&quot;/, "\"", s)
        gsub(/&apos;/, "\047", s); gsub(/&#10;/, " ", s); gsub(/&amp;/, "\\&", s)
        return s
      }
      /<testcase / {
        match($0, / name="[^"]*"/); name = substr($0, RSTART + 7, RLENGTH - 8)
        skipped = index($0, "status=\"skipped\"") > 0; why = ""; in_reason = 0
      }
      /<skipped/ { skipped = 1 }
      /\[  SKIPPED \]/ { in_reason = 0 }
      in_reason { why = why (why == "" ? "" : " ") $0 }
      /: Skipped$/ { in_reason = 1 }
      /<\/testcase>/ && skipped {
        printf "  %s: %s: %s\n", build, unxml(name), (why == "" ? "(no reason printed)" : unxml(why))
        skipped = 0
      }' "$f")$'\n'
  done
  lines=$(printf '%s' "$lines" | sed '/^$/d')
  echo "=== skipped tests: $(printf '%s' "$lines" | grep -c . || true)"
  [ -z "$lines" ] || printf '%s\n' "$lines"
}
trap skip_summary EXIT

scripts/setup.sh
BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j "$(nproc)" --output-junit ctest-junit.xml)
# The sanitizer and fuzz builds leave the CUDA backend out (-DMOEFLUX_CUDA=OFF): without a GPU
# it only reports itself unusable, which the plain build's tests already cover, and nvcc would
# add minutes to each build on CI's two cores.
BUILD_DIR=build-asan scripts/build.sh -DMOEFLUX_SANITIZE=ON -DMOEFLUX_BENCH=OFF -DMOEFLUX_CUDA=OFF
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
   ctest --output-on-failure -j "$(nproc)" --output-junit ctest-junit.xml)
# ThreadSanitizer: only the concurrency tests (C API sessions sharing a model from threads, the
# expert store shared by sessions), so the build stays a few minutes on CI's two cores.
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEFLUX_TSAN=ON \
  -DMOEFLUX_BENCH=OFF -DMOEFLUX_CUDA=OFF >/dev/null
cmake --build build-tsan -j "$(nproc)" --target moeflux_tsan_tests
(cd build-tsan && ctest --output-on-failure -L tsan --output-junit ctest-junit.xml)
# libFuzzer: the clang build of the fuzz targets only (build-fuzz), 20 s per target.
BUILD_DIR=build-fuzz FUZZ_SECONDS=20 scripts/fuzz.sh
