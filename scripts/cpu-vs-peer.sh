#!/usr/bin/env bash
# moeflux on the CPU beside llama.cpp (the peer, ../shared/tools/peer/README.md), in one run on
# one machine: builds both (CPU only), writes the same random Qwen3.5-35B-A3B-shaped model for
# each (`moeflux synth --preset qwen3.5-35b-a3b --quant q4`, synth_gguf.py Q4_0), then ROUNDS
# times, for each thread count, runs `moeflux bench` and `llama-bench` (pp512, tg128) one after
# the other, and prints one markdown table: both t/s (mean ± stddev over the rounds' runs), the
# ratio, and the RAM floor beside each figure (bytes a token must read ÷ the read bandwidth
# `moeflux bench` measures with that many threads; pp: every weight once per 512-token batch).
#
#   LLAMA_SRC=.peer/llama-src.tar.xz scripts/cpu-vs-peer.sh
#
# Environment:
#   LLAMA_SRC   llama.cpp source tarball (README above: node-llama-cpp's bundle, commit de3ff815)
#               unless $WORK/llama.cpp/b/bin/llama-bench is already built
#   SYNTH_GGUF  synth_gguf.py (default: the first of .peer/, ../shared/tools/peer/, shared/tools/peer/)
#   THREADS     thread counts, space-separated (default: nproc)
#   LAYERS      model layers (default 8; 40 needs ~20 GB per model on disk and in RAM)
#   ROUNDS      interleaved rounds (default 2), REPS runs per bench call (default 3)
#   MODES       moeflux numerics to run, space-separated (default "exact int8": --exact, --int8)
#   PYTHON      a python3 with numpy for synth_gguf.py (default python3; here /usr/bin/python3)
#   WORK        build and model folder (default build-peer), OUT outputs (default $WORK/out)
#   MOEFLUX_BIN a moeflux binary to use instead of building one (CUDA off, Release)
#   PREPARE_ONLY=1  stop after the builds and the models (a second call then only benches)
# Outputs (under $OUT): table.md, moeflux.jsonl, peer.jsonl, build.log, machine.txt.
# On the GPU machine, .device-deps is unpacked as in scripts/gpu-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
WORK=${WORK:-$root/build-peer}
OUT=${OUT:-$WORK/out}
LAYERS=${LAYERS:-8}
ROUNDS=${ROUNDS:-2}
REPS=${REPS:-3}
THREADS=${THREADS:-$(nproc)}
mkdir -p "$WORK" "$OUT"
source scripts/device-deps-env.sh  # sets prefix=(CMake flags) on the GPU machine
log=$OUT/build.log
: >"$log"
{
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L3|NUMA node\(s\)' || true
  free -g | head -2
  echo "threads: $THREADS; layers: $LAYERS; rounds: $ROUNDS x $REPS runs"
} | tee "$OUT/machine.txt"

t0=$(date +%s)
mf=${MOEFLUX_BIN:-}
if [ -z "$mf" ]; then
  echo "building moeflux..."
  cmake -S . -B "$WORK/moeflux" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFLUX_TESTS=OFF \
    -DMOEFLUX_BENCH=OFF -DMOEFLUX_CUDA=OFF "${prefix[@]}" >>"$log" 2>&1
  cmake --build "$WORK/moeflux" -j "$(nproc)" --target moeflux >>"$log" 2>&1
  mf=$WORK/moeflux/moeflux
fi

peer=$WORK/llama.cpp
if [ ! -x "$peer/b/bin/llama-bench" ]; then
  echo "building llama.cpp..."
  [ -n "${LLAMA_SRC:-}" ] || { echo "LLAMA_SRC: give the llama.cpp source tarball" >&2; exit 2; }
  mkdir -p "$peer"
  tar -C "$peer" -xJf "$LLAMA_SRC"
  cmake -S "$peer" -B "$peer/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DGGML_NATIVE=ON >>"$log" 2>&1
  cmake --build "$peer/b" -j "$(nproc)" --target llama-bench >>"$log" 2>&1
fi
echo "built in $(($(date +%s) - t0)) s"

pkg=$WORK/q35-$LAYERS
gguf=$WORK/q35-$LAYERS.gguf
if [ ! -f "$gguf" ]; then
  sg=${SYNTH_GGUF:-}
  for c in .peer/synth_gguf.py ../shared/tools/peer/synth_gguf.py shared/tools/peer/synth_gguf.py; do
    [ -z "$sg" ] && [ -f "$c" ] && sg=$c
  done
  [ -n "$sg" ] || { echo "SYNTH_GGUF: synth_gguf.py not found" >&2; exit 2; }
  echo "writing $gguf..."
  "${PYTHON:-python3}" "$sg" --gguf-py "$peer/gguf-py" --layers "$LAYERS" --qtype Q4_0 --out "$gguf.tmp" >>"$log" 2>&1
  mv "$gguf.tmp" "$gguf"
fi
if [ ! -f "$pkg/moeflux.json" ]; then
  echo "writing $pkg..."
  rm -rf "$pkg"
  "$mf" synth -q --preset qwen3.5-35b-a3b --quant q4 --layers "$LAYERS" "$pkg" >>"$log" 2>&1
fi
[ "${PREPARE_ONLY:-0}" = 1 ] && { echo "prepared: $mf, $peer/b/bin/llama-bench, $pkg, $gguf"; exit 0; }

: >"$OUT/moeflux.jsonl"
: >"$OUT/peer.jsonl"
read -r -a modes <<<"${MODES:-exact int8}"
for r in $(seq "$ROUNDS"); do
  for t in $THREADS; do
    for m in "${modes[@]}"; do
      echo "round $r, $t threads: moeflux ($m)..."
      "$mf" bench -m "$pkg" -p 512 -n 128 -r "$REPS" -t "$t" --expert-cache all -o json \
        "--$m" 2>>"$log" |
        python3 -c 'import json,sys; [print(json.dumps(dict(x, mode=sys.argv[1], round=int(sys.argv[2])))) for x in json.load(sys.stdin)]' "$m" "$r" \
        >>"$OUT/moeflux.jsonl"
    done
    echo "round $r, $t threads: llama.cpp..."
    "$peer/b/bin/llama-bench" -m "$gguf" -p 512 -n 128 -r "$REPS" -t "$t" -o jsonl 2>>"$log" \
      >>"$OUT/peer.jsonl"
  done
done

python3 - "$OUT" "$LAYERS" <<'EOF' | tee "$OUT/table.md"
import json, math, sys
out, layers = sys.argv[1], sys.argv[2]
mf = [json.loads(l) for l in open(f"{out}/moeflux.jsonl") if l.strip()]
pe = [json.loads(l) for l in open(f"{out}/peer.jsonl") if l.strip()]
def stats(v):
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd
print(f"| layers | threads | test | moeflux t/s | mode | llama.cpp t/s | ratio | RAM floor t/s |")
print("|---:|---:|---|---:|---|---:|---:|---:|")
keys = sorted({(x["threads"], x["test"], x["mode"]) for x in mf}, key=lambda k: (-k[0], k[1], k[2]))
for t, test, mode in keys:
    rows = [x for x in mf if x["threads"] == t and x["test"] == test and x["mode"] == mode]
    ours = stats([v for x in rows for v in x["tps"]])
    n_p, n_g = rows[0]["n_prompt"], rows[0]["n_gen"]
    peer_rows = [x for x in pe if x["n_threads"] == t and x["n_prompt"] == n_p and x["n_gen"] == n_g]
    theirs = stats([v for x in peer_rows for v in x["samples_ts"]]) if peer_rows else None
    bw = max(x["memory_gbps"] for x in mf if x["threads"] == t) * 1e9  # best seen at t threads
    # decode: the weights a token reads; prompt: every weight once per batch of n_prompt.
    floor = bw / rows[0]["weight_bytes_per_token"] if n_g else n_p * bw / rows[0]["size_bytes"]
    fmt = lambda s: f"{s[0]:.2f} ± {s[1]:.2f}"
    print(f"| {layers} | {t} | {test} | {fmt(ours)} | {mode} | {fmt(theirs) if theirs else '-'} | "
          f"{ours[0] / theirs[0]:.2f}x | {floor:.0f} |" if theirs else
          f"| {layers} | {t} | {test} | {fmt(ours)} | {mode} | - | - | {floor:.0f} |")
bwl = ", ".join(f"{t} threads {max(x['memory_gbps'] for x in mf if x['threads'] == t):.1f} GB/s"
                for t in sorted({x['threads'] for x in mf}, reverse=True))
w = mf[0]["weight_bytes_per_token"] / 1e9
print(f"\nRAM read bandwidth (moeflux bench, 1 GiB summed): {bwl}; weights read per decoded "
      f"token {w:.3f} GB; package {mf[0]['size_bytes'] / 1e9:.2f} GB. Peer: llama.cpp "
      f"{pe[0].get('build_commit', '?') if pe else '?'}, {pe[0].get('cpu_info', '') if pe else ''}.")
EOF
