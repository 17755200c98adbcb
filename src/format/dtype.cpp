#include "format/dtype.h"

#include <cstring>

#include "util/error.h"
#include "util/half.h"

namespace moeflux {

namespace {
struct Entry {
  DType t;
  size_t size;
  const char* st;
  const char* name;
};
constexpr Entry kTable[] = {
    {DType::kF32, 4, "F32", "f32"},
    {DType::kBF16, 2, "BF16", "bf16"},
    {DType::kF16, 2, "F16", "f16"},
    {DType::kU32, 4, "U32", "u32"},
    {DType::kI32, 4, "I32", "i32"},
    {DType::kI64, 8, "I64", "i64"},
    {DType::kU8, 1, "U8", "u8"},
    {DType::kF64, 8, "F64", "f64"},
    {DType::kBool, 1, "BOOL", "bool"},
    {DType::kQ8, 0, "", "q8"},
    {DType::kQ4, 0, "", "q4"},
    {DType::kQ2, 0, "", "q2"},
    {DType::kF8E4M3, 1, "F8_E4M3", "f8_e4m3"},
    {DType::kMxfp4, 0, "", "mxfp4"},
};
const Entry& entry(DType t) { return kTable[size_t(t)]; }
}  // namespace

size_t dtype_size(DType t) { return entry(t).size; }
std::string_view dtype_st_name(DType t) { return entry(t).st; }
std::string_view dtype_name(DType t) { return entry(t).name; }

bool dtype_from_st_name(std::string_view s, DType* out) {
  for (const auto& e : kTable)
    if (!s.empty() && s == e.st) return *out = e.t, true;
  return false;
}

bool dtype_from_name(std::string_view s, DType* out) {
  for (const auto& e : kTable)
    if (s == e.name) return *out = e.t, true;
  return false;
}

void to_f32(DType src, const void* in, float* out, size_t n) {
  switch (src) {
    case DType::kF32:
      std::memcpy(out, in, n * 4);
      return;
    case DType::kBF16: {
      auto p = static_cast<const uint16_t*>(in);
      for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::kF16: {
      auto p = static_cast<const uint16_t*>(in);
      for (size_t i = 0; i < n; i++) out[i] = f16_to_f32(p[i]);
      return;
    }
    case DType::kF64: {
      auto p = static_cast<const double*>(in);
      for (size_t i = 0; i < n; i++) out[i] = float(p[i]);
      return;
    }
    case DType::kF8E4M3: {
      auto p = static_cast<const uint8_t*>(in);
      for (size_t i = 0; i < n; i++) out[i] = e4m3_to_f32(p[i]);
      return;
    }
    default:
      fail(ErrorKind::kUnsupported, "cannot convert dtype {} to f32", dtype_name(src));
  }
}

void from_f32(DType dst, const float* in, void* out, size_t n) {
  switch (dst) {
    case DType::kF32:
      std::memcpy(out, in, n * 4);
      return;
    case DType::kBF16: {
      auto p = static_cast<uint16_t*>(out);
      for (size_t i = 0; i < n; i++) p[i] = f32_to_bf16(in[i]);
      return;
    }
    case DType::kF16: {
      auto p = static_cast<uint16_t*>(out);
      for (size_t i = 0; i < n; i++) p[i] = f32_to_f16(in[i]);
      return;
    }
    default:
      fail(ErrorKind::kUnsupported, "cannot convert f32 to dtype {}", dtype_name(dst));
  }
}

}  // namespace moeflux
