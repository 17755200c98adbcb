#include "engine/backend.h"

#include "util/error.h"

namespace moeflux {

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
  if (kind == BackendKind::kCuda)
    fail(ErrorKind::kUnsupported,
         "backend cuda: this build of moeflux has no CUDA backend yet; use --backend cpu (or auto)");
  return BackendKind::kCpu;  // auto: the only backend built
}

std::unique_ptr<Backend> make_backend(BackendKind kind, int threads) {
  resolve_backend_kind(kind);
  return make_cpu_backend(threads);
}

}  // namespace moeflux
