#!/usr/bin/env bash
# CPU speed of this tree beside another (a "before" checkout), interleaved in one run so both
# see the same machine state: builds both `moeflux` binaries (CUDA off), makes the package once
# (default: `synth --preset qwen3.5-35b-a3b --quant q4 --layers 8`), then ROUNDS times runs
# `bench -p 512 -n 128` with each, base first. Table rows go to ${OUT:-build-ab}/ab.md, each
# prefixed with the tree it came from; then one run with the bandwidth floor -> floor.md.
#   scripts/ab-bench.sh BASE_SRC [ROUNDS]      (e.g. BASE_SRC from `git worktree add`)
# Environment: THREADS (bench -t; default 0 = one per core), PKG (a package to use instead),
# BENCH_ARGS (extra bench flags). On the GPU machine, .device-deps is unpacked as in
# scripts/gpu-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1
rounds=${2:-3}
OUT=${OUT:-$PWD/build-ab}
mkdir -p "$OUT"
source scripts/device-deps-env.sh  # sets prefix=(CMake flags) on the GPU machine
for side in base new; do
  src=$([ $side = base ] && echo "$base" || echo .)
  cmake -S "$src" -B "build-ab-$side" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOEFLUX_TESTS=OFF -DMOEFLUX_BENCH=OFF -DMOEFLUX_CUDA=OFF "${prefix[@]}" >"$OUT/configure-$side.log" 2>&1
  cmake --build "build-ab-$side" -j "$(nproc)" --target moeflux >"$OUT/build-$side.log" 2>&1
done
pkg=${PKG:-build-ab-new/q35-8}
[ -d "$pkg" ] || ./build-ab-new/moeflux synth -q --preset qwen3.5-35b-a3b --quant q4 --layers 8 "$pkg"
: >"$OUT/ab.md"
for r in $(seq "$rounds"); do
  for side in base new; do
    "./build-ab-$side/moeflux" bench -m "$pkg" -p 512 -n 128 -r 3 -t "${THREADS:-0}" \
      --expert-cache all --no-floor ${BENCH_ARGS:-} 2>/dev/null | grep '^| ' | grep -v -- '---' |
      grep -v '^| model' | sed "s/^/| $side round $r /" | tee -a "$OUT/ab.md"
  done
done
# The floor (bytes moved per token / measured bandwidth) once, with the new binary.
./build-ab-new/moeflux bench -m "$pkg" -p 512 -n 128 -r 1 -t "${THREADS:-0}" --expert-cache all \
  ${BENCH_ARGS:-} 2>/dev/null | tee "$OUT/floor.md"
