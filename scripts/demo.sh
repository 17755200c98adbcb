#!/usr/bin/env bash
# Set-up, build, and the main job on the embedded default: generate text with the shipped demo
# model (models/demo, a small Qwen3.5-MoE trained on the KJV Bible and Jane Austen; no -m picks
# it), streaming experts through the expert cache, then print what the store did.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=build scripts/build.sh
./build/moeflux inspect models/demo
echo
./build/moeflux run -p "And it came to pass" -n 96 --seed 1 --stats
echo
