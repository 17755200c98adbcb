#!/usr/bin/env bash
# Trains a 128-expert, top-8 Qwen3.5-MoE on the demo corpus and records its routing traces for
# the expert-cache work (issue 16; docs/2026-12-03-cache-policy.md), in one command on the GPU
# machine (one CUDA GPU, torch + transformers + tokenizers; no registry reachable):
#   1. builds `moeflux` (CPU only, in the background while the GPU trains);
#   2. tools/train_demo.py --experts 128 --topk 8 ... --no-eval (time limit TRAIN_SECONDS);
#   3. `moeflux convert` (bf16) and the two traces the cache-policy note uses, on
#      tests/data/demo/valid.txt (never trained on):
#        decode.trace  one 2,000-token prompt, then 512 sampled tokens
#        chat.trace    8 turns of (300-token prompt + 200 sampled tokens) in one session
#   4. `moeflux cache-sim` on both (every policy, 10/25/50%) into summary.md.
# Writes at most 6 files to $OUT: decode.trace, chat.trace, train.log (everything the steps
# printed), train_log.json (parameter counts, loss history), summary.md, and moe128-q4.tar (the
# model converted to q4, only when under 40 MB).
#
# Everything it needs is in the repository or in .moe128/ (git-ignored, made HERE by
# `scripts/train-moe128.sh --prepare`): .moe128/corpus/{train,valid}.txt (scripts/fetch_corpus.sh)
# and .moe128/deps/*.deb (the Debian packages moeflux builds against,
# ../shared/tools/device-deps.sh). On the device: carry [".moe128"].
#
# Environment: OUT (default build-moe128/out), TRAIN_SECONDS (default 300), STEPS (default
# 1000), and for a check without a GPU, MOE128_HF=DIR: skip training and use the Hugging Face
# checkpoint in DIR (e.g. tests/data/demo), and MOEFLUX_BIN=FILE: use that binary, no build.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ "${1:-}" = --prepare ]; then
  set -e
  mkdir -p .moe128
  [ -s .moe128/corpus/train.txt ] || scripts/fetch_corpus.sh .moe128/corpus
  rm -rf .moe128/corpus/debs  # the downloaded packages: not needed on the device
  [ -n "$(ls .moe128/deps/*.deb 2>/dev/null)" ] || (mkdir -p .moe128/deps && cd .moe128/deps &&
                                                     bash "$root/../shared/tools/device-deps.sh" .)
  du -sh .moe128
  exit 0
fi

OUT=${OUT:-$root/build-moe128/out}
mkdir -p "$OUT"
work=$root/build-moe128
mkdir -p "$work"
log=$OUT/train.log
: >"$log"
say() { echo "$*" | tee -a "$log"; }
t_start=$(date +%s)
elapsed() { echo $(($(date +%s) - t_start)); }

# The model: 128 experts, top-8, 8 layers (3 DeltaNet : 1 full attention), hidden 192, expert
# intermediate 64, shared expert 192, the demo's 4096-token tokenizer (trained on the corpus).
# ~40 M parameters, of which ~38 M routed experts.
TRAIN_ARGS=(--experts 128 --topk 8 --layers 8 --hidden 192 --moe-inter 64 --shared-inter 192
            --vocab 4096 --seq 512 --batch 64 --steps "${STEPS:-1000}" --warmup 100
            --time-limit "${TRAIN_SECONDS:-300}" --log-every 50 --no-eval)

# 1. build (background; CPU only: the traces need no CUDA)
mf=${MOEFLUX_BIN:-$work/build/moeflux}
if [ -n "${MOEFLUX_BIN:-}" ]; then
  true &
else
  DEVICE_DEPS=.moe128/deps source scripts/device-deps-env.sh
  (
    cmake -S . -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFLUX_CUDA=OFF \
      -DMOEFLUX_BENCH=OFF "${prefix[@]}" &&
      nice -n 10 cmake --build "$work/build" -j "$(($(nproc) > 4 ? $(nproc) - 2 : 2))" --target moeflux
  ) >"$work/build.log" 2>&1 &
fi
build_pid=$!

# 2. train
hf=${MOE128_HF:-}
if [ -z "$hf" ]; then
  if [ ! -s .moe128/corpus/train.txt ]; then
    say "train-moe128: no .moe128/corpus/train.txt (run scripts/train-moe128.sh --prepare here first)"
    exit 1
  fi
  say "== train: python3 tools/train_demo.py --corpus .moe128/corpus --out $work/train ${TRAIN_ARGS[*]}"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
  timeout $((${TRAIN_SECONDS:-300} + 120)) python3 -u tools/train_demo.py --corpus .moe128/corpus \
    --out "$work/train" "${TRAIN_ARGS[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  cp "$work/train/train_log.json" "$OUT/" 2>/dev/null
  if [ "$rc" != 0 ] || [ ! -s "$work/train/hf/model.safetensors" ]; then
    say "train-moe128: training failed (exit $rc) after $(elapsed) s"
    wait "$build_pid"
    exit 1
  fi
  hf=$work/train/hf
  say "== trained in $(elapsed) s"
else
  say "== MOE128_HF=$hf: no training"
fi

# 3. convert, traces
if ! wait "$build_pid"; then
  tail -40 "$work/build.log" | tee -a "$log"
  say "train-moe128: build failed"
  exit 1
fi
say "== built moeflux ($(elapsed) s)"
threads=$(nproc)
run() {
  say "\$ moeflux $*"
  "$mf" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}
pkg=$work/pkg
run convert "$hf" "$pkg" --force -q || exit 1
text=tests/data/demo/valid.txt
run routing -m "$pkg" -f "$text" -t "$threads" --prompt 2000 --generate 512 \
  --trace "$OUT/decode.trace" || exit 1
run routing -m "$pkg" -f "$text" -t "$threads" --prompt 300 --generate 200 --turns 8 \
  --trace "$OUT/chat.trace" || exit 1

# 4. cache-sim and the summary
{
  echo "# 128-expert model: routing traces and cache policies ($(date -u +%F))"
  echo
  echo "Checkpoint: $hf; package: \`moeflux convert\` bf16. Text: $text."
  echo "Command: scripts/train-moe128.sh (train args: ${TRAIN_ARGS[*]})."
  echo
  grep -E "^parameters:|^trained |^time limit|valid CE" "$log" | tail -6 | sed 's/^/    /'
  for t in decode chat; do
    echo
    echo "## $t.trace ($(stat -c %s "$OUT/$t.trace") bytes)"
    echo
    echo '```'
    "$mf" cache-sim --trace "$OUT/$t.trace" --budget 10%,25%,50% --early 32 2>&1
    echo '```'
  done
} >"$OUT/summary.md" 2>&1
cat "$OUT/summary.md" >>"$log"

# The q4 package, when small enough to ship.
run convert "$hf" "$work/pkg-q4" --quant q4 --force -q &&
  tar -C "$work" -cf "$work/moe128-q4.tar" pkg-q4 &&
  size=$(stat -c %s "$work/moe128-q4.tar") &&
  if [ "$size" -lt $((40 * 1024 * 1024)) ]; then
    cp "$work/moe128-q4.tar" "$OUT/"
    say "== moe128-q4.tar: $size bytes (shipped)"
  else
    say "== moe128-q4.tar: $size bytes, over 40 MB: not copied"
  fi
say "== done in $(elapsed) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
