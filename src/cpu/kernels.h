// CPU inner loops of attention and DeltaNet (weight matrices go through cpu/matmul.h). Each has
// one fixed summation order (16 partial sums, then a fixed tree), so a result does not depend on
// which caller or thread computes it.
#pragma once

#include <cstdint>

namespace moeflux {

float dot_f32(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t n);
// out = x * rsqrt(sum(x^2) + 1e-6), as HF's l2norm (the FLA convention)
void l2norm(const float* x, float* out, int64_t n);

}  // namespace moeflux
