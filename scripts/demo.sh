#!/usr/bin/env bash
# Set-up, build, and the main job on the embedded default: convert the bundled Qwen3.5-MoE
# checkpoint (a tiny random-weight model, tests/data/qwen3_5_moe) into a moeflux package,
# inspect it, and run a prompt of token ids with a greedy continuation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=build scripts/build.sh
pkg=build/packages/qwen3_5_moe
./build/moeflux convert tests/data/qwen3_5_moe "$pkg"
./build/moeflux inspect "$pkg"
echo
echo "greedy continuation of tokens 3,17,250,999,4,4,512:"
./build/moeflux eval -m "$pkg" --tokens 3,17,250,999,4,4,512 --greedy 24
