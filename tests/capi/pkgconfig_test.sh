#!/bin/sh
# Installs the C API (cmake --install into a scratch prefix), then builds a C11 program against it
# twice, through pkg-config: shared (libmoeflux.so) and static (libmoeflux.a + Libs.private), and
# runs both on a package.
#   pkgconfig_test.sh <build dir> <scratch dir> <package> <libdir relative to the prefix>
set -eu
build=$1 scratch=$2 pkg=$3 libdir_rel=$4
rm -rf "$scratch"
mkdir -p "$scratch"
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
export PKG_CONFIG_PATH="$scratch/prefix/$libdir_rel/pkgconfig"
cat > "$scratch/main.c" <<'C'
#include <moeflux.h>
#include <stdio.h>
int main(int argc, char** argv) {
  mf_model* m = NULL;
  mf_session* s = NULL;
  const int32_t t[3] = {1, 2, 3};
  if (argc != 2 || mf_model_load(argv[1], NULL, &m) || mf_session_new(m, NULL, &s) ||
      mf_eval_prompt(s, t, 3, NULL) || mf_memory_seq_pos_max(s) != 2) {
    fprintf(stderr, "failed: %s\n", mf_last_error());
    return 1;
  }
  mf_session_free(s);
  mf_model_free(m);
  printf("moeflux %s ok\n", mf_version());
  return 0;
}
C
cc=${CC:-cc}
libdir=$(pkg-config --variable=libdir moeflux)
$cc -std=c11 -Wall -Werror "$scratch/main.c" $(pkg-config --cflags --libs moeflux) \
  -Wl,-rpath,"$libdir" -o "$scratch/shared"
"$scratch/shared" "$pkg"
$cc -std=c11 -Wall -Werror "$scratch/main.c" $(pkg-config --cflags moeflux) \
  -Wl,-Bstatic -lmoeflux -Wl,-Bdynamic $(pkg-config --static --libs moeflux | sed 's/-lmoeflux//') \
  -o "$scratch/static"
if ldd "$scratch/static" | grep -q libmoeflux; then
  echo "the static build links libmoeflux.so" >&2
  exit 1
fi
"$scratch/static" "$pkg"
