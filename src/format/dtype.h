// Element types of checkpoint and package tensors.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace moeflux {

// kQ8/kQ4/kQ2 exist only in packages: MLX-style affine group quantisation (format/quant.h).
// kF8E4M3: checkpoints only (DeepSeek-V3's FP8 weights, dequantised on import; no package holds
// it).
enum class DType : uint8_t {
  kF32,
  kBF16,
  kF16,
  kU32,
  kI32,
  kI64,
  kU8,
  kF64,
  kBool,
  kQ8,
  kQ4,
  kQ2,
  kF8E4M3,
  kMxfp4  // packages only: OCP MXFP4 (format/mxfp4.h), gpt-oss's experts as the checkpoint has them
};

// Bytes per element (0 for the quantised dtypes: use format/quant.h for their sizes).
size_t dtype_size(DType t);
// Safetensors spelling: "F32", "BF16", ...
std::string_view dtype_st_name(DType t);
bool dtype_from_st_name(std::string_view s, DType* out);
// Lower-case spelling used in the package manifest and on the command line: "f32", "bf16", ...
std::string_view dtype_name(DType t);
bool dtype_from_name(std::string_view s, DType* out);

inline bool is_quant_dtype(DType t) {
  return t == DType::kQ8 || t == DType::kQ4 || t == DType::kQ2;
}
inline int quant_bits(DType t) { return t == DType::kQ8 ? 8 : t == DType::kQ4 ? 4 : 2; }

inline bool is_float_dtype(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || t == DType::kF64;
}

// Converts n elements of `src` (float dtype, or f8_e4m3 unscaled) to float32.
void to_f32(DType src, const void* in, float* out, size_t n);
// Converts n float32 values to `dst` (f32, bf16, f16).
void from_f32(DType dst, const float* in, void* out, size_t n);

}  // namespace moeflux
