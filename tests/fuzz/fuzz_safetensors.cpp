// libFuzzer target: the safetensors header parser (SafetensorsFile). Every input must either
// parse into tensors whose bytes lie inside the file, or throw moeflux::Error; anything else
// (a crash, a sanitizer report, another exception type) is a finding.
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 60 s, seeded with a small file:
//   mkdir -p corpus && ./build/moeflux convert -q tests/data/qwen3_moe /tmp/pkg &&
//   ./build/moeflux eval -m /tmp/pkg --tokens 1 --dump-logits corpus/seed.safetensors
//   ./build/tests/fuzz_safetensors -max_total_time=60 -dict=tests/fuzz/json.dict corpus/
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "format/safetensors.h"
#include "util/error.h"

namespace {

// The input lives in a memfd, opened by path through /proc, so no disk writes per input.
const std::string& input_path() {
  static const std::string path = [] {
    int fd = ::memfd_create("fuzz_safetensors", 0);
    if (fd < 0) __builtin_trap();
    return "/proc/self/fd/" + std::to_string(fd);
  }();
  return path;
}

void set_input(const uint8_t* data, size_t size) {
  const int fd = std::stoi(input_path().substr(14));
  if (::ftruncate(fd, 0) != 0) __builtin_trap();
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(fd, data + done, size - done, off_t(done));
    if (n <= 0) __builtin_trap();
    done += size_t(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  set_input(data, size);
  try {
    moeflux::SafetensorsFile f(input_path());
    uint8_t sum = 0;
    for (const auto& [name, t] : f.tensors()) {
      if (t.nbytes != uint64_t(t.numel()) * moeflux::dtype_size(t.dtype)) __builtin_trap();
      for (uint64_t i = 0; i < t.nbytes; i++) sum ^= t.data[i];  // must all be readable
    }
    volatile uint8_t sink = sum;
    (void)sink;
  } catch (const moeflux::Error& e) {
    if (e.kind() == moeflux::ErrorKind::kInternal) __builtin_trap();
  }
  return 0;
}
