#!/usr/bin/env bash
# Fetches the demo model's public-domain English corpus from Debian packages and writes
# <out>/train.txt and <out>/valid.txt (default out: build/demo/corpus).
#
#   bible-kjv-text, bible-kjv   King James Bible (1611; public domain), stored in the Bible
#                               Retrieval System's compressed format; the package's own `bible`
#                               reader dumps it.
#   r-cran-janeaustenr          Jane Austen's six novels (public domain; package MIT), stored as
#                               an R lazy-load database; tools/demo/rdata.py reads it (no R).
#
# Needs only apt-get download + dpkg-deb -x (no root), coreutils and python3's standard library.
# The split is deterministic (tools/demo/extract_corpus.py: every 20th chapter of each source
# goes to valid.txt). The package versions and the files' sha256 are recorded in SOURCES.txt.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build/demo/corpus}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$out/debs"
rm -rf "$work"
mkdir -p "$work/x"

pkgs=(bible-kjv-text bible-kjv r-cran-janeaustenr)
# Debian 12 (bookworm) versions the corpus was built from; others are used with a warning.
declare -A want=([bible-kjv-text]=4.38 [bible-kjv]=4.38 [r-cran-janeaustenr]=1.0.0-1)

if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
  else
    echo "fetch_corpus: apt does not know ${pkgs[*]}; run 'sudo apt-get update' first" >&2
    exit 1
  fi
fi

cd "$work"
apt-get download -q "${pkgs[@]}" >/dev/null
for p in "${pkgs[@]}"; do
  deb=$(ls "$work"/"${p}"_*.deb)
  ver=$(dpkg-deb -f "$deb" Version)
  [ "$ver" = "${want[$p]}" ] ||
    echo "fetch_corpus: warning: $p is version $ver, the corpus was made from ${want[$p]}" >&2
  dpkg-deb -x "$deb" "$work/x"
done

bible="$work/x/usr/bin/bible"
# libreadline8 is in most Debian 12 installs; fetch it beside the program when it is not.
if ldd "$bible" | grep -q 'not found'; then
  apt-get download -q libreadline8 >/dev/null
  dpkg-deb -x "$work"/libreadline8_*.deb "$work/x"
  export LD_LIBRARY_PATH="$work/x/lib/$(uname -m)-linux-gnu:$work/x/usr/lib/$(uname -m)-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# Pretty-printed (book and chapter headers, one numbered verse per line), no line wrapping.
HOME="$work" "$bible" -l 100000 -p "$work/x/usr/lib" 'Gen1:1-Rev22:21' </dev/null >"$work/kjv.txt"
nverses=$(grep -c '^  *[0-9][0-9]* ' "$work/kjv.txt")
[ "$nverses" = 31102 ] || { echo "fetch_corpus: expected 31102 verses, got $nverses" >&2; exit 1; }

data="$work/x/usr/lib/R/site-library/janeaustenr/data"
python3 -B "$root/tools/demo/extract_corpus.py" --kjv "$work/kjv.txt" \
  --austen-rdx "$data/Rdata.rdx" --austen-rdb "$data/Rdata.rdb" --out "$out" >"$work/stats.txt"

{
  echo "# Demo corpus, written by scripts/fetch_corpus.sh"
  for p in "${pkgs[@]}"; do
    deb=$(ls "$work"/"${p}"_*.deb)
    echo "$p $(dpkg-deb -f "$deb" Version) $(sha256sum "$deb" | cut -d' ' -f1)"
  done
  cat "$work/stats.txt"
  echo
  echo "## Licences (the packages' copyright files)"
  for p in bible-kjv-text r-cran-janeaustenr; do
    echo "### $p"
    cat "$work/x/usr/share/doc/$p/copyright"
  done
} >"$out/SOURCES.txt"
cat "$work/stats.txt"
echo "fetch_corpus: wrote $out/train.txt $out/valid.txt $out/SOURCES.txt"
