#include "format/mxfp4.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace moeflux {

const float kE2m1Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float e8m0_scale(uint8_t e) {
  if (e == 255) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, int(e) - 127);
}

void mxfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t cols, float* out) {
  for (int64_t g = 0; g < cols / kMxfp4Group; g++) {
    const uint8_t e = scales[g];
    const uint8_t* b = packed + g * (kMxfp4Group / 2);
    float* o = out + g * kMxfp4Group;
    if (e == 255) {
      for (int i = 0; i < kMxfp4Group; i++) o[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    // value x 2^(e - 127): the product is exact in f32 (the power of two is an f32, normal or
    // subnormal, and the smallest result, 0.5 x 2^-127, is an f32 subnormal), so it equals
    // ldexp; one 16-entry table per group.
    const float scale = std::ldexp(1.0f, int(e) - 127);
    float tab[16];
    for (int c = 0; c < 16; c++) tab[c] = kE2m1Values[c] * scale;
    for (int j = 0; j < kMxfp4Group / 2; j++) {
      o[2 * j] = tab[b[j] & 0xF];
      o[2 * j + 1] = tab[b[j] >> 4];
    }
  }
}

namespace {

// The e2m1 code (0..7) nearest |x| for |x| <= 6, ties to the even code.
uint8_t nearest_magnitude(float a) {
  int best = 0;
  for (int c = 1; c < 8; c++) {
    const float d = std::fabs(a - kE2m1Values[c]), db = std::fabs(a - kE2m1Values[best]);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return uint8_t(best);
}

}  // namespace

void mxfp4_quantize_rows(const float* w, int64_t rows, int64_t cols, uint8_t* packed,
                         uint8_t* scales) {
  const int64_t groups = cols / kMxfp4Group;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t g = 0; g < groups; g++) {
      const float* x = w + r * cols + g * kMxfp4Group;
      float amax = 0;
      for (int i = 0; i < kMxfp4Group; i++)
        if (std::isfinite(x[i])) amax = std::max(amax, std::fabs(x[i]));
      int k = 0;
      if (amax > 0) {
        // smallest k with amax <= 6 * 2^k (exact: compare against the power of two itself)
        int e;
        std::frexp(amax / 6.0, &e);  // amax / 6 in [2^(e-1), 2^e)
        k = e;
        while (k - 1 >= -127 && double(amax) <= 6.0 * std::ldexp(1.0, k - 1)) k--;
        while (k < 127 && double(amax) > 6.0 * std::ldexp(1.0, k)) k++;
        k = std::clamp(k, -127, 127);
      }
      scales[r * groups + g] = uint8_t(k + 127);
      const double inv = std::ldexp(1.0, -k);
      uint8_t* out = packed + r * cols / 2 + g * (kMxfp4Group / 2);
      for (int j = 0; j < kMxfp4Group / 2; j++) {
        uint8_t c[2];
        for (int h = 0; h < 2; h++) {
          const double v = double(x[2 * j + h]) * inv;
          const float a = float(std::min(std::fabs(v), 6.0));
          c[h] = uint8_t(nearest_magnitude(std::isfinite(a) ? a : 0.0f) | (std::signbit(v) ? 8 : 0));
        }
        out[j] = uint8_t(c[0] | (c[1] << 4));
      }
    }
}

}  // namespace moeflux
