#!/usr/bin/env bash
# Set-up, build and the whole test suite: a release-style build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the concurrency tests under
# ThreadSanitizer. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j "$(nproc)")
BUILD_DIR=build-asan scripts/build.sh -DMOEFLUX_SANITIZE=ON -DMOEFLUX_BENCH=OFF
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
   ctest --output-on-failure -j "$(nproc)")
# ThreadSanitizer: only the concurrency tests (C API sessions sharing a model from threads, the
# expert store shared by sessions), so the build stays a few minutes on CI's two cores.
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEFLUX_TSAN=ON \
  -DMOEFLUX_BENCH=OFF >/dev/null
cmake --build build-tsan -j "$(nproc)" --target moeflux_tsan_tests
(cd build-tsan && ctest --output-on-failure -L tsan)
