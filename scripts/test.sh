#!/usr/bin/env bash
# Set-up, build and the whole test suite: a release-style build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j "$(nproc)")
BUILD_DIR=build-asan scripts/build.sh -DMOEFLUX_SANITIZE=ON
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
   ctest --output-on-failure -j "$(nproc)")
