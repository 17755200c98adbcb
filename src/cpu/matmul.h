// Weight-matrix times activations for every weight dtype (f32, bf16, f16, q8, q4, q2): the CPU
// backend's one mat-vec / mat-mul kernel.
//
// Numerics (the same on every path, so the paths are bit-identical to each other):
//   * A weight is first made exact in f32: bf16/f16 widen exactly; a quantised weight is
//     float(q) * scale + bias with the two roundings of format/quant.h's dequantize_row (a
//     product, then a sum, never fused), so W[r, c] is exactly dequantize_row's value.
//   * Each output y[t, r] has 16 lane sums; lane j accumulates the terms of columns c ≡ j (mod
//     16) in increasing c, each step one fused multiply-add acc = fma(W[r, c], x[t, c], acc).
//   * The 16 lanes are then added in a fixed tree: j += j+8, j += j+4, j += j+2, j += j+1.
// Nothing in that order depends on T, on [r0, r1), on the thread that runs a row or on the path,
// so a token's result is the same alone or in a batch (prefill == decode), for any row split,
// and on any CPU; and a bf16/f16 matrix gives the bits of its exact f32 copy.
#pragma once

#include <cstdint>

#include "model/model.h"

namespace moeflux {

enum class KernelPath { kAuto, kScalar, kAvx2, kAvx512 };

// y[t * y_stride + r] = sum_c W[r, c] * x[t * W.cols + c] for r in [r0, r1), t in [0, T).
// x: [T, W.cols]. PRECONDITIONS: 0 <= r0 <= r1 <= W.rows; T >= 0; y_stride >= r1 when T > 1;
// y does not overlap x; quantised W has W.cols % W.group == 0 and a group that is a multiple
// of 32 (format/quant.h quantisable()).
void matmul_rows(const Mat& W, int64_t r0, int64_t r1, const float* x, int T, float* y,
                 int64_t y_stride);

// The best path this CPU supports (AVX-512 F+BW, else AVX2+FMA+F16C, else scalar), decided once
// from cpuid.
KernelPath best_kernel_path();
// Forces a path (tests, benchmarks). kAuto goes back to best_kernel_path(). Throws Error when
// the CPU lacks the instructions. Not thread-safe against concurrent matmul_rows calls.
void set_kernel_path(KernelPath p);
KernelPath active_kernel_path();
const char* kernel_path_name(KernelPath p);
// True when this CPU can run path p (kScalar and kAuto always can).
bool kernel_path_supported(KernelPath p);

}  // namespace moeflux
