# Sourced by the scripts that run on the GPU machine: that machine has none of our Debian
# packages, so when .device-deps (../shared/tools/device-deps.sh; another folder with
# DEVICE_DEPS=DIR) travelled along it is unpacked into /opt/deps and pkg-config/CMake/the loader
# are pointed there. Sets `prefix`, the CMake arguments to add (empty elsewhere).
prefix=()
deps_src=${DEVICE_DEPS:-.device-deps}
if [ -n "$(ls "$deps_src"/*.deb 2>/dev/null)" ]; then
  deps=/opt/deps
  mkdir -p "$deps"
  for f in "$deps_src"/*.deb; do dpkg -x "$f" "$deps"; done
  export PKG_CONFIG_SYSROOT_DIR=$deps
  export PKG_CONFIG_PATH=$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig
  export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  prefix=(-DCMAKE_PREFIX_PATH=$deps/usr)
fi
