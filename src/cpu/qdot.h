// The fast numerics path of the CPU backend: quantised weights (q8/q4/q2) times activations
// quantised to int8, with integer dot products (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw, or a
// scalar reference). The exact f32 path (cpu/matmul.h) stays for --exact and the oracle tests.
//
// Numerics (one definition, the same on every path, so the paths are bit-identical):
//   * Weights as stored: group g of row r is w = q * s_g + b_g (format/quant.h), q unsigned.
//   * Activations, per token and per block k of 32 columns: d_k = max|x| / 127, xq =
//     nearbyint(x * (1 / d_k)) in [-127, 127] (0 when max|x| = 0), and xs_k = the sum of the
//     32 x in f32 (8 lanes over c mod 8, added j += j+4, j += j+2, j += j+1). quantize_acts
//     does this once per token per matmul (scalar or AVX2, the same operations). Blocks of 32,
//     not of the weight group: on the trained demo, q8 groups of 64 gave KL 0.0073 against
//     --exact, blocks of 32 (llama.cpp's Q8_0/Q8_1 size) less (docs/2026-12-03-cpu-int8.md).
//   * Per (row, token, block k in group g): isum_k = sum of q * xq, an exact int32 (any order).
//     One f32 chain over the blocks in increasing k: acc = 0, acc = fma(float(isum_k),
//     fl(s_g * d_k), acc). The bias: xg_g = the group's xs_k added left to right (per token,
//     in quantize_acts), bacc = 0, bacc = fma(b_g, xg_g, bacc) in increasing g. y = acc + bacc.
//     (Version 2, 2026-12-03: the first definition's 8 block lanes needed a horizontal
//     reduction per block on the SIMD paths; this one lets them keep one row per lane.)
// Nothing here depends on T, the row range, the thread or the path: a token alone or in a
// batch gives the same bits, for any thread count.
//
// Error against the exact path: only the activations are rounded (the weights are the
// package's), |x - d*xq| <= d/2 per element, so |y_fast - y_exact| <= sum_k |s_g| * d_k / 2 *
// sum_{c in k} |q_c| (+ f32 rounding). tests/qdot_test.cpp checks that bound.
// Weight groups of 32 * m columns (32, 64, 96, 128...); CpuContext takes the exact path for any
// other (qdot_group_supported).
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace moeflux {

// T tokens of activations quantised for a weight layout (bits, group).
struct QuantizedActs {
  int T = 0;
  int64_t cols = 0;
  int group = 0, bits = 0;
  int64_t blocks = 0;         // cols / 32
  std::vector<int8_t> q;      // [T, cols]; each 32-column block in the weight decoder's order
  std::vector<float> d;       // [T, blocks] scale
  std::vector<float> xs;      // [T, blocks] sum of x
  std::vector<int32_t> qs;    // [T, blocks] sum of xq (q8 on AVX2 adds 128 * it back)
  std::vector<float> gs;      // [T, cols / group] sum of xs over the group's blocks
};

// True when weights of this group size can take the int8 path.
bool qdot_group_supported(int group);

// Fills `out` (reusing its memory) with x [T, cols] quantised for a `bits`-bit weight of
// `group`. PRECONDITION: qdot_group_supported(group), cols % group == 0.
void quantize_acts(const float* x, int T, int64_t cols, int group, int bits, QuantizedActs& out);

// y[t * y_stride + r] = W[r, :] . x[t, :] by the numerics above, for r in [r0, r1), t in
// [0, xa.T). PRECONDITIONS: W is q8/q4/q2, xa made by quantize_acts for W's bits, group and
// cols; y_stride >= r1 when T > 1.
void qmatmul_rows(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                  int64_t y_stride);

enum class QdotPath { kAuto, kScalar, kAvx2, kVnni };
// AVX-512 VNNI (+VL, BW), else AVX2, else scalar; decided once from cpuid.
QdotPath best_qdot_path();
// Forces a path (tests, benchmarks); kAuto goes back to the best. Throws Error when the CPU
// lacks the instructions. Not thread-safe against concurrent qmatmul_rows calls.
void set_qdot_path(QdotPath p);
QdotPath active_qdot_path();
bool qdot_path_supported(QdotPath p);
const char* qdot_path_name(QdotPath p);

}  // namespace moeflux
