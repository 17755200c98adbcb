#include "format/quant.h"

#include <algorithm>
#include <cmath>

#include "util/error.h"
#include "util/half.h"

namespace moeflux {

bool quantisable(int64_t cols, int bits, int group) {
  if (bits != 8 && bits != 4 && bits != 2) return false;
  if (group <= 0 || group % (32 / bits) != 0) return false;
  return cols > 0 && cols % group == 0;
}

QuantLayout quant_layout(int64_t rows, int64_t cols, int bits, int group) {
  const uint64_t r = uint64_t(rows), c = uint64_t(cols);
  return {r * c * uint64_t(bits) / 8, r * (c / uint64_t(group)) * 2,
          r * (c / uint64_t(group)) * 2};
}

void quantize_rows(const float* w, int64_t rows, int64_t cols, int bits, int group,
                   uint32_t* packed, uint16_t* scales, uint16_t* biases) {
  MF_CHECK(quantisable(cols, bits, group));
  const int per_word = 32 / bits;
  const uint32_t qmax = (1u << bits) - 1;
  const int64_t n_groups = cols / group, words_per_row = cols / per_word;
  for (int64_t r = 0; r < rows; r++) {
    const float* wr = w + r * cols;
    uint32_t* pr = packed + r * words_per_row;
    std::fill(pr, pr + words_per_row, 0u);
    for (int64_t g = 0; g < n_groups; g++) {
      const float* wg = wr + g * group;
      float mn = wg[0], mx = wg[0];
      for (int i = 1; i < group; i++) {
        mn = std::min(mn, wg[i]);
        mx = std::max(mx, wg[i]);
      }
      const uint16_t sb = f32_to_bf16((mx - mn) / float(qmax));
      const uint16_t bb = f32_to_bf16(mn);
      scales[r * n_groups + g] = sb;
      biases[r * n_groups + g] = bb;
      const float s = bf16_to_f32(sb), b = bf16_to_f32(bb);
      for (int i = 0; i < group; i++) {
        uint32_t q = 0;
        if (s > 0) {
          const float v = std::nearbyint((wg[i] - b) / s);
          q = v <= 0 ? 0u : v >= float(qmax) ? qmax : uint32_t(v);
        }
        const int64_t c = g * group + i;
        pr[c / per_word] |= q << (uint32_t(c % per_word) * uint32_t(bits));
      }
    }
  }
}

void dequantize_row(const uint32_t* packed, const uint16_t* scales, const uint16_t* biases,
                    int64_t cols, int bits, int group, float* out) {
  const int per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t c = 0; c < cols; c++) {
    const uint32_t q = (packed[c / per_word] >> (uint32_t(c % per_word) * uint32_t(bits))) & mask;
    const int64_t g = c / group;
    out[c] = float(q) * bf16_to_f32(scales[g]) + bf16_to_f32(biases[g]);
  }
}

}  // namespace moeflux
