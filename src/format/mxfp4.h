// OCP MXFP4 (Microscaling FP4), the format gpt-oss ships its experts in: each group of 32
// consecutive elements of a row shares one e8m0 scale, each element is a 4-bit e2m1 code.
//
//   e2m1 code (bit 3 sign, bits 2-1 exponent, bit 0 mantissa) -> value:
//     0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6;  8..15: the same negated (8 is -0)
//   e8m0 scale byte e -> 2^(e - 127); 255 is NaN (OCP MX spec)
//   element = e2m1 value * scale, exact in f32 (ldexp)
//
// Checkpoint layout (transformers' Mxfp4 integration, openai/gpt-oss-*): <name>_blocks u8
// [..., rows, cols/32, 16] with element 2j of a block in the low nibble of byte j and 2j+1 in
// the high nibble; <name>_scales u8 [..., rows, cols/32].
//
// Package layout (dtype "mxfp4", a [rows, cols] matrix, cols % 32 == 0): one region, the packed
// nibbles [rows, cols/2] bytes exactly as the checkpoint's blocks (row-major), then the scales
// [rows, cols/32] bytes. Nothing is requantised on import.
#pragma once

#include <cstdint>

namespace moeflux {

constexpr int kMxfp4Group = 32;

// The 16 e2m1 values.
extern const float kE2m1Values[16];
// 2^(e - 127) as f32 (NaN for 255).
float e8m0_scale(uint8_t e);
// Bytes of a [rows, cols] MXFP4 matrix: nibbles, then scales.
inline uint64_t mxfp4_packed_bytes(int64_t rows, int64_t cols) { return uint64_t(rows * cols / 2); }
inline uint64_t mxfp4_bytes(int64_t rows, int64_t cols) {
  return uint64_t(rows * cols / 2) + uint64_t(rows * (cols / kMxfp4Group));
}
// Decodes one row of `cols` elements (cols % 32 == 0): packed [cols/2], scales [cols/32].
void mxfp4_dequantize_row(const uint8_t* packed, const uint8_t* scales, int64_t cols, float* out);

// Quantises rows of `cols` floats (cols % 32 == 0) to MXFP4 (`--quant mxfp4`): per group the
// smallest scale 2^k with max|w| <= 6 * 2^k, then each element to the nearest e2m1 value of
// w / 2^k, ties to the even code (the OCP spec's round-to-nearest-even); k in [-127, 127]; an
// all-zero group gets k = 0. packed: [rows, cols/2], scales: [rows, cols/32]. A value that is
// already an MXFP4 value under its group's scale comes back exactly.
void mxfp4_quantize_rows(const float* w, int64_t rows, int64_t cols, uint8_t* packed,
                         uint8_t* scales);

}  // namespace moeflux
