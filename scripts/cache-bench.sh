#!/usr/bin/env bash
# Issue 16's bench: decode speed of a synth qwen3.5-35b-a3b q4 package with the expert cache at
# 25% against no cache (every expert read every time, from the page cache), with uniform routing
# and with --routing-skew, and every cache policy at 25% on the skewed package. One command on a
# machine with enough RAM for the package in the page cache (40 layers q4: ~20 GB; the GPU
# machine's host has 128 GB and 16 cores; CPU backend).
#
# Writes $OUT/cache-bench.md (a markdown table: package, routing, budget, policy, pp/tg t/s ±
# stddev, hit rate, GB read per token) and $OUT/cache-bench.log (every command's output).
# Environment: OUT (default build-cache-bench/out), LAYERS (default 40), SKEW (default 0.25:
# the top 10% of experts take ~30% of selections), PROMPT (512), GEN (128), REPS (3), THREADS
# (0: one per core), POLICIES (the policies also run at 25% on the skewed package; default
# "lru lru-layer lfu lrfu"), MOEFLUX_BIN (default: build it into build-cache-bench/build, CPU
# only), WORK (where the packages go; default build-cache-bench), SYNTH_ONLY=1 (write the
# packages and stop).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
OUT=${OUT:-$root/build-cache-bench/out}
WORK=${WORK:-$root/build-cache-bench}
LAYERS=${LAYERS:-40}
SKEW=${SKEW:-0.25}
mkdir -p "$OUT" "$WORK"
log=$OUT/cache-bench.log
: >"$log"
t0=$(date +%s)
say() { echo "$*" | tee -a "$log"; }

mf=${MOEFLUX_BIN:-}
if [ -z "$mf" ]; then
  source scripts/device-deps-env.sh  # the GPU machine: the Debian packages from .device-deps
  say "== build"
  if ! { cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFLUX_CUDA=OFF \
           -DMOEFLUX_BENCH=OFF "${prefix[@]}" && cmake --build "$WORK/build" -j "$(nproc)" \
           --target moeflux; } >>"$log" 2>&1; then
    tail -30 "$log"
    exit 1
  fi
  mf=$WORK/build/moeflux
fi

synth() {  # synth NAME SKEW
  local pkg=$WORK/$1
  if [ ! -f "$pkg/moeflux.json" ]; then
    say "== synth $1 (layers $LAYERS, routing skew $2) at $(($(date +%s) - t0)) s"
    "$mf" synth -q --preset qwen3.5-35b-a3b --layers "$LAYERS" --quant q4 --routing-skew "$2" \
      --force "$pkg" >>"$log" 2>&1 || { say "synth $1 failed"; exit 1; }
  fi
  # Into the page cache once, so no run pays for the first read from disk.
  cat "$pkg"/experts/*.bin "$pkg"/resident.bin >/dev/null
}
synth "l$LAYERS-uniform" 0
synth "l$LAYERS-skew$SKEW" "$SKEW"
[ "${SYNTH_ONLY:-0}" = 1 ] && exit 0

md=$OUT/cache-bench.md
{
  echo "# Expert cache vs no cache: synth qwen3.5-35b-a3b q4, $LAYERS layers ($(date -u +%F))"
  echo
  echo "\`scripts/cache-bench.sh\` (LAYERS=$LAYERS SKEW=$SKEW PROMPT=${PROMPT:-512} GEN=${GEN:-128}" \
       "REPS=${REPS:-3}), CPU backend, $(nproc) cores, experts in the page cache;" \
       "$(awk '/MemTotal/ {printf "%.0f GB RAM", $2/1e6}' /proc/meminfo)."
  echo
  echo "| routing | expert cache | policy | test | t/s | expert hit rate | GB read/token |"
  echo "|---|---|---|---|---:|---:|---:|"
} >"$md"

bench() {  # bench PKG ROUTING CACHE POLICY
  local json
  say "== bench $2 cache $3 policy $4 at $(($(date +%s) - t0)) s"
  json=$("$mf" bench -m "$WORK/$1" -p "${PROMPT:-512}" -n "${GEN:-128}" -r "${REPS:-3}" \
         -t "${THREADS:-0}" --expert-cache "$3" --cache-policy "$4" --no-floor -o json 2>>"$log")
  echo "$json" >>"$log"
  python3 - "$2" "$3" "$4" "$json" >>"$md" <<'EOF'
import json, sys
routing, cache, policy, text = sys.argv[1:5]
try:
    rows = json.loads(text)
except ValueError:
    print(f"| {routing} | {cache} | {policy} | (bench failed: see cache-bench.log) | | | |")
    sys.exit(0)
for r in rows:
    print(f"| {routing} | {cache} | {policy} | {r['test']} | {r['tps_mean']:.2f} ± {r['tps_stddev']:.2f}"
          f" | {100 * r['expert_hit_rate']:.1f}% | {r['expert_bytes_read_per_token'] / 1e9:.3f} |")
EOF
}

for routing in uniform "skew$SKEW"; do
  pkg="l$LAYERS-$routing"
  bench "$pkg" "$routing" 0 default
  bench "$pkg" "$routing" 25% default
done
for policy in ${POLICIES-lru lru-layer lfu lrfu}; do bench "l$LAYERS-skew$SKEW" "skew$SKEW" 25% "$policy"; done
say "== done in $(($(date +%s) - t0)) s"
cat "$md"
