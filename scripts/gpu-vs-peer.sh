#!/usr/bin/env bash
# moeflux on CUDA beside llama.cpp on the same GPU, in one command (issue 13): builds llama.cpp's
# llama-bench with CUDA from a source tarball and moeflux with its CUDA backend, writes the same
# random model both ways (moeflux synth --preset qwen3.5-35b-a3b --quant q4; the peer's
# synth_gguf.py: Q4_0, Q8_0 output), runs the CUDA tests, then the benchmarks one after the
# other on the idle GPU: pp512/tg128 (3 runs each), then pp2048 and tg128 at depth 4096 (one
# run each), ours first.
#
# The GPU machine reaches no registry: take along (carry) the peer's sources, made here as
# ../shared/tools/peer/README.md says (llama-src.tar.xz) plus its synth_gguf.py, and
# .device-deps (scripts/device-deps-env.sh).
# Environment: OUT (results: side_by_side.md, logs.tar), PEER_SRC (default
# .peer/llama-src.tar.xz), PEER_GGUF_PY (default .peer/synth_gguf.py), LAYERS (default 40),
# WORK (default /tmp/peer: the models, ~40 GB at 40 layers), TESTS=0 skips the tests, CHECKS=0
# the demo model's checks (perplexity on CUDA and on the CPU, memcheck on a generation).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/build-gpu/peer-out}
WORK=${WORK:-/tmp/peer}
L=${LAYERS:-40}
mkdir -p "$OUT" "$WORK"
md=$OUT/side_by_side.md
source scripts/device-deps-env.sh
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*"; }

say "unpacking the peer"
rm -rf "$WORK/llama" && mkdir -p "$WORK/llama" &&
  tar -C "$WORK/llama" -xJf "${PEER_SRC:-.peer/llama-src.tar.xz}" || exit 1
(cmake -S "$WORK/llama" -B "$WORK/llama/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
   -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=ON \
   -DCMAKE_CUDA_ARCHITECTURES=90 &&
   cmake --build "$WORK/llama/b" --target llama-bench -j "$(($(nproc) * 3 / 4))") \
  >"$WORK/llama-build.log" 2>&1 &
peer_build=$!
python3 "${PEER_GGUF_PY:-.peer/synth_gguf.py}" --gguf-py "$WORK/llama/gguf-py" --layers "$L" \
  --qtype Q4_0 --out "$WORK/q35.gguf" >"$WORK/gguf.log" 2>&1 &
gguf=$!

say "building moeflux"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEFLUX_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90a -DMOEFLUX_BENCH=OFF "${prefix[@]}" >"$WORK/configure.log" 2>&1 &&
  cmake --build build-gpu -j "$(($(nproc) / 4 + 1))" --target moeflux moeflux_tests \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
mf=$root/build-gpu/moeflux
if [ "${TESTS:-1}" = 1 ]; then
  say "CUDA tests"
  ./build-gpu/tests/moeflux_tests --gtest_filter='*Cuda*:*cuda*' >"$WORK/tests.log" 2>&1
  say "tests exit $?: $(grep -E '^\[  (PASSED|FAILED) ' "$WORK/tests.log" | tr '\n' ' ')"
fi
if [ "${CHECKS:-1}" = 1 ]; then
  # The demo model on CUDA against the CPU: perplexity over the first 16 windows of its
  # validation text, and compute-sanitizer's memcheck on a 32-token generation.
  say "demo checks"
  for be in cuda cpu; do
    "$mf" perplexity -m models/demo --backend "$be" -f tests/data/demo/valid.txt --ctx 512 \
      --chunks 16 >"$WORK/ppl-$be.log" 2>&1
  done
  compute-sanitizer --tool memcheck --error-exitcode 3 "$mf" run -m models/demo --backend cuda \
    -p "And it came to pass" -n 32 --temp 0 >"$WORK/memcheck.log" 2>&1
  say "memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$WORK/memcheck.log")"
  say "perplexity cuda: $(grep -iE 'perplexity|ppl' "$WORK/ppl-cuda.log" | tail -1)"
  say "perplexity cpu:  $(grep -iE 'perplexity|ppl' "$WORK/ppl-cpu.log" | tail -1)"
fi
say "synth ($L layers)"
"$mf" synth -q --preset qwen3.5-35b-a3b --quant q4 --layers "$L" "$WORK/synth" >"$WORK/synth.log" 2>&1 ||
  { cat "$WORK/synth.log"; exit 1; }
wait "$gguf" || { tail "$WORK/gguf.log"; exit 1; }
wait "$peer_build" || { tail -30 "$WORK/llama-build.log"; exit 1; }
peer=$WORK/llama/b/bin/llama-bench
say "peer built; benchmarks"

{
  echo "# moeflux (CUDA) beside llama.cpp, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  echo
  echo "Model: $L layers of the qwen3.5-35b-a3b shape, random weights; moeflux q4 (group 64, lm_head q8)"
  echo "vs GGUF Q4_0 with Q8_0 output. moeflux at $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
  echo "llama.cpp from $(basename "${PEER_SRC:-.peer/llama-src.tar.xz}")."
} >"$md"
bench_ours() {
  echo; echo "\$ moeflux bench $*"; echo
  "$mf" bench -m "$WORK/synth" --backend cuda "$@" 2>"$WORK/last-bench.err" || tail -5 "$WORK/last-bench.err"
}
bench_peer() {
  echo; echo "\$ llama-bench $*"; echo
  "$peer" -m "$WORK/q35.gguf" -ngl 99 -o md "$@" 2>"$WORK/last-peer.err" || tail -5 "$WORK/last-peer.err"
}
bench_ours -p 512 -n 128 -r 3 >>"$md"
say "ours done"
bench_peer -p 512 -n 128 -r 3 >>"$md"
say "peer done"
# Longer prompts and a deep context: one timed run each (a 4096-token prefill precedes every
# depth run, warm-up included).
bench_ours -p 2048 -n 0 -r 1 --no-floor >>"$md"
bench_ours -p 0 -n 128 -d 4096 -r 1 --no-floor >>"$md"
bench_peer -p 2048 -n 0 -r 1 >>"$md"
bench_peer -p 0 -n 128 -d 4096 -r 1 >>"$md"
say "all done"
cat "$md"
tar -C "$WORK" -cf "$OUT/logs.tar" tests.log build.log llama-build.log gguf.log synth.log \
  ppl-cuda.log ppl-cpu.log memcheck.log 2>/dev/null
