// CPU inner loops. Each has one fixed summation order (16 partial sums, then a fixed tree),
// so a result does not depend on which caller or thread computes it.
#pragma once

#include <cstdint>

#include "model/model.h"

namespace moeflux {

float dot_f32(const float* a, const float* b, int64_t n);
float dot_bf16(const uint16_t* w, const float* x, int64_t n);
float dot_f16(const uint16_t* w, const float* x, int64_t n);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t n);
// out = x * rsqrt(sum(x^2) + 1e-6), as HF's l2norm (the FLA convention)
void l2norm(const float* x, float* out, int64_t n);

// Row r of W (any float dtype) dotted with x.
inline float dot_row(const Mat& W, int64_t r, const float* x) {
  switch (W.dtype) {
    case DType::kBF16:
      return dot_bf16(static_cast<const uint16_t*>(W.data) + r * W.cols, x, W.cols);
    case DType::kF16:
      return dot_f16(static_cast<const uint16_t*>(W.data) + r * W.cols, x, W.cols);
    default:
      return dot_f32(static_cast<const float*>(W.data) + r * W.cols, x, W.cols);
  }
}

}  // namespace moeflux
