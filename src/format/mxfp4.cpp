#include "format/mxfp4.h"

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

}  // namespace moeflux
