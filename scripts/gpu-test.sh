#!/usr/bin/env bash
# Builds moeflux with the CUDA backend and runs the GPU tests, on the GPU machine (the `run`
# tool of this workplace, or any machine with an NVIDIA GPU, nvcc, CMake and ninja).
#
# That machine has none of our Debian packages and reaches no registry: first, here,
#   ../shared/tools/device-deps.sh .device-deps      (and list .device-deps in .git/info/exclude)
# then take .device-deps along; this script unpacks it into /opt/deps when it is there.
#
# Writes under ${OUT:-build-gpu/out}: gpu.txt, configure.log, build.log, tests.log, tests.xml
# (and memcheck.log with MEMCHECK=1). Prints a short summary last. Environment:
#   FILTER     gtest filter (default: every CUDA test: the shared op harness's cuda cases,
#              the CUDA-vs-CPU ops, the oracle on CUDA, the CLI's greedy decode on CUDA)
#   MEMCHECK=1 also runs the CUDA op tests under compute-sanitizer --tool memcheck
#   ARCH       CMAKE_CUDA_ARCHITECTURES (default 90a: the H200; the project default builds 80 too)
#   BENCH=1    also times the mat-vec/mat-mul kernels (moeflux_bench_cuda -> bench_matmul.md) and
#              runs `moeflux bench` on CUDA on a synth qwen3.5-35b-a3b q4 of SYNTH_LAYERS layers
#              (default 8; all experts resident) -> bench_model.md
#   PROFILE=1  per-kernel device times of an 8-token decode and of a 512-token prefill under
#              ncu -> profile.txt, profile_pp.txt
#   TESTS=0    skips the tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
source scripts/device-deps-env.sh  # sets prefix=(CMake flags) on the GPU machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
t0=$(date +%s)
if ! cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEFLUX_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90a}" -DMOEFLUX_BENCH=$([ "${BENCH:-0}" = 1 ] && echo ON || echo OFF) "${prefix[@]}" \
    >"$OUT/configure.log" 2>&1; then
  tail -30 "$OUT/configure.log"
  exit 1
fi
if ! cmake --build build-gpu -j "$(nproc)" --target moeflux moeflux_tests \
    $([ "${BENCH:-0}" = 1 ] && echo moeflux_bench_cuda) >"$OUT/build.log" 2>&1; then
  grep -B2 -A12 -E "error|FAILED" "$OUT/build.log" | head -80
  exit 1
fi
echo "built in $(($(date +%s) - t0)) s"
if [ "${BENCH:-0}" = 1 ]; then
  ./build-gpu/bench/moeflux_bench_cuda | tee "$OUT/bench_matmul.md"
  pkg=build-gpu/synth-35b-l${SYNTH_LAYERS:-8}
  [ -d "$pkg" ] || ./build-gpu/moeflux synth -q --preset qwen3.5-35b-a3b --layers "${SYNTH_LAYERS:-8}" "$pkg"
  ./build-gpu/moeflux bench -m "$pkg" --backend cuda -p 512,2048 -n 128 -r 3 2>&1 | tee "$OUT/bench_model.md"
  ./build-gpu/moeflux bench -m "$pkg" --backend cuda -p 0 -n 128 -d 4096 -r 3 --no-floor 2>&1 | tee -a "$OUT/bench_model.md"
fi
if [ "${PROFILE:-0}" = 1 ]; then
  # Per-kernel device time of a short decode (one pass per kernel: only its duration), for
  # where a token's time goes; launch gaps = the measured step time minus the kernels' sum.
  pkg=build-gpu/synth-35b-l${SYNTH_LAYERS:-8}
  [ -d "$pkg" ] || ./build-gpu/moeflux synth -q --preset qwen3.5-35b-a3b --layers "${SYNTH_LAYERS:-8}" "$pkg"
  ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
    ./build-gpu/moeflux bench -m "$pkg" --backend cuda -p 0 -n 8 -r 1 --no-floor \
    >"$OUT/profile.txt" 2>&1
  echo "profile exit $?"
  # And of one 512-token prefill.
  ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
    ./build-gpu/moeflux bench -m "$pkg" --backend cuda -p 512 -n 0 -r 1 --no-floor \
    >"$OUT/profile_pp.txt" 2>&1
  echo "prefill profile exit $?"
fi
[ "${TESTS:-1}" = 0 ] && exit 0
t0=$(date +%s)
filter=${FILTER:-'*Cuda*:*cuda*'}
./build-gpu/tests/moeflux_tests --gtest_filter="$filter" --gtest_output=xml:"$OUT/tests.xml" \
  >"$OUT/tests.log" 2>&1
rc=$?
echo "tests ran in $(($(date +%s) - t0)) s, exit $rc"
if [ "${MEMCHECK:-0}" = 1 ]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 ./build-gpu/tests/moeflux_tests \
    --gtest_filter='Cuda.*' >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit $? ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses)"
fi
# Summary: failures with their first lines, then the totals.
grep -E "Failure|error:|cuda .* cpu |got .* want" "$OUT/tests.log" | head -40
grep -E "^\[  (FAILED|SKIPPED) |^\[==========\]|^\[  PASSED" "$OUT/tests.log" | tail -40
exit $rc
