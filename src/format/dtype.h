// Element types of checkpoint and package tensors.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace moeflux {

enum class DType : uint8_t { kF32, kBF16, kF16, kU32, kI32, kI64, kU8, kF64, kBool };

// Bytes per element.
size_t dtype_size(DType t);
// Safetensors spelling: "F32", "BF16", ...
std::string_view dtype_st_name(DType t);
bool dtype_from_st_name(std::string_view s, DType* out);
// Lower-case spelling used in the package manifest and on the command line: "f32", "bf16", ...
std::string_view dtype_name(DType t);
bool dtype_from_name(std::string_view s, DType* out);

inline bool is_float_dtype(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || t == DType::kF64;
}

// Converts n elements of `src` (float dtype) to float32.
void to_f32(DType src, const void* in, float* out, size_t n);
// Converts n float32 values to `dst` (f32, bf16, f16).
void from_f32(DType dst, const float* in, void* out, size_t n);

}  // namespace moeflux
