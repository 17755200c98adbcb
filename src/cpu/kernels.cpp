#include "cpu/kernels.h"

#include <cmath>

// Vectorised by the compiler per target (MF_CLONES, kernels.h); the loops are written with
// explicit independent partial sums so vectorising does not reorder any addition.

namespace moeflux {

namespace {
template <typename Load>
inline float dot_impl(const Load& load, const float* x, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += load(i + j) * x[i + j];
  for (int j = 0; i < n; i++, j++) acc[j] += load(i) * x[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; j++) acc[j] += acc[j + w];
  return acc[0];
}
}  // namespace

MF_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  return dot_impl([a](int64_t i) { return a[i]; }, b, n);
}

MF_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void l2norm(const float* x, float* out, int64_t n) {
  double ss = 0;
  for (int64_t i = 0; i < n; i++) ss += double(x[i]) * x[i];
  const float inv = float(1.0 / std::sqrt(ss + 1e-6));
  for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv;
}

}  // namespace moeflux
