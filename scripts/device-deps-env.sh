# Sourced by the scripts that run on the GPU machine: that machine has none of our Debian
# packages, so when .device-deps (../shared/tools/device-deps.sh) travelled along it is unpacked
# into /opt/deps and pkg-config/CMake/the loader are pointed there. Sets `prefix`, the CMake
# arguments to add (empty elsewhere).
prefix=()
if [ -d .device-deps ]; then
  deps=/opt/deps
  mkdir -p "$deps"
  for f in .device-deps/*.deb; do dpkg -x "$f" "$deps"; done
  export PKG_CONFIG_SYSROOT_DIR=$deps
  export PKG_CONFIG_PATH=$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig
  export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  prefix=(-DCMAKE_PREFIX_PATH=$deps/usr)
fi
