#include "engine/backend.h"

#include <cstdlib>

#include "util/error.h"
#include "util/progress.h"

#ifdef MOEFLUX_HAVE_CUDA
#include "cuda/cuda_device.h"
#endif

namespace moeflux {

uint8_t* ExpertMemory::host_alloc(size_t bytes, const char* what) {
  constexpr size_t kAlign = 4096;
  void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  if (!p) fail(ErrorKind::kOutOfMemory, "out of host memory for {}: {} wanted", what, format_bytes(bytes));
  return static_cast<uint8_t*>(p);
}

void ExpertMemory::host_release(uint8_t* p, size_t) { std::free(p); }

BackendKind parse_backend_kind(const std::string& text, const std::string& what) {
  if (text == "auto") return BackendKind::kAuto;
  if (text == "cpu") return BackendKind::kCpu;
  if (text == "cuda") return BackendKind::kCuda;
  fail(ErrorKind::kInvalidArgument, "{}: '{}' is not one of auto, cpu, cuda", what, text);
}

const char* backend_kind_name(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto: return "auto";
    case BackendKind::kCpu: return "cpu";
    case BackendKind::kCuda: return "cuda";
  }
  return "?";
}

BackendKind resolve_backend_kind(BackendKind kind) {
#ifdef MOEFLUX_HAVE_CUDA
  if (kind == BackendKind::kCuda) {
    cuda_device();  // throws one line: no GPU, no driver, ...
    return kind;
  }
  if (kind == BackendKind::kAuto) return cuda_usable(nullptr) ? BackendKind::kCuda : BackendKind::kCpu;
  return kind;
#else
  if (kind == BackendKind::kCuda)
    fail(ErrorKind::kUnsupported,
         "backend cuda: this build of moeflux has no CUDA backend (built without nvcc); use "
         "--backend cpu (or auto)");
  return BackendKind::kCpu;
#endif
}

Device& get_device(BackendKind kind) {
  kind = resolve_backend_kind(kind);
#ifdef MOEFLUX_HAVE_CUDA
  if (kind == BackendKind::kCuda) return cuda_device();
#endif
  return cpu_device();
}

}  // namespace moeflux
