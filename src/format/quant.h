// MLX-compatible affine group quantisation (DESIGN.md §2).
//
// A row-major [rows, cols] matrix is cut into groups of `group` consecutive input elements. Per
// group: scale = (max - min) / (2^b - 1), bias = min, both stored as bf16; q = round((w - bias) /
// scale) clamped to [0, 2^b - 1], computed against the bf16-rounded scale and bias so that
// dequantisation w' = q * scale + bias uses exactly the values the quantiser aimed at.
// q is packed LSB-first into u32 words: element j of a word occupies bits [j*b, (j+1)*b).
//
// MLX-compatible means the storage format, not the quantiser: MLX's own `quantize` snaps the
// extreme of larger magnitude to the grid (bias = that extreme, scale negative when it is the
// max) and rounds q against the unrounded scale, so it gives other bits than quantize_rows for
// most groups; MLX checkpoints are imported as they are, never requantised. tools/refs/README.md
// and tests/quant_test.cpp (MlxReference) compare the two.
//
// In a package, a quantised tensor is one region: packed words [rows, cols*b/32] (u32), then
// scales [rows, cols/group] (bf16), then biases [rows, cols/group] (bf16).
#pragma once

#include <cstdint>

#include "format/dtype.h"

namespace moeflux {

struct QuantLayout {
  uint64_t packed_bytes, scales_bytes, biases_bytes;
  uint64_t total() const { return packed_bytes + scales_bytes + biases_bytes; }
};

// Supported group sizes, in the order the converter tries them.
constexpr int kQuantGroups[] = {64, 128, 32};

// True when a [rows, cols] matrix can be stored as `bits`-bit groups of `group`.
bool quantisable(int64_t cols, int bits, int group);
QuantLayout quant_layout(int64_t rows, int64_t cols, int bits, int group);

// Quantises `rows` rows of `cols` floats. packed: [rows, cols*bits/32], scales/biases:
// [rows, cols/group] bf16. PRECONDITION: quantisable(cols, bits, group).
void quantize_rows(const float* w, int64_t rows, int64_t cols, int bits, int group,
                   uint32_t* packed, uint16_t* scales, uint16_t* biases);

// Dequantises one row (reference implementation; kernels must agree with it).
void dequantize_row(const uint32_t* packed, const uint16_t* scales, const uint16_t* biases,
                    int64_t cols, int bits, int group, float* out);

}  // namespace moeflux
