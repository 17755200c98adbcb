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
    const int x = int(e) - 127;
    for (int j = 0; j < kMxfp4Group / 2; j++) {
      o[2 * j] = std::ldexp(kE2m1Values[b[j] & 0xF], x);
      o[2 * j + 1] = std::ldexp(kE2m1Values[b[j] >> 4], x);
    }
  }
}

}  // namespace moeflux
