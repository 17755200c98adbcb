// The dequantising row dot product every weight read goes through (nvcc only): matmul.cu's
// mat-vec / mat-mul and moe.cu's expert kernels share it, so an expert's output has the same
// bits whichever kernel computed it.
//
// A weight is made exact in f32 first, as cpu/matmul.h: bf16/f16 widen exactly; a quantised
// weight is float(q) * scale + bias, a product then a sum, never fused (format/quant.h's
// dequantize_row). A row's 32*ks lanes (ks = 1 or 4 warps of a block, chosen from W's shape
// alone: matvec_ks) split its words: lane li takes words li*VEC.. of every 32*ks*VEC (16-byte
// loads when rows allow: VEC = 4), accumulating each token's sum with fmaf in increasing column
// order; the lane sums meet in a fixed xor-shuffle tree, then the ks warps' sums are added in
// warp order. Tokens go TT at a time; TT only changes how many sums run side by side, never an
// order, so a token's bits depend on neither T nor the kernel.
#pragma once

#include "cuda/common.cuh"

namespace moeflux::cuda {

constexpr int kWarps = 4;  // warps per block of the mat-vec kernels

template <int WT>
struct WTraits;
template <>
struct WTraits<kWF32> {
  static constexpr int per = 1;  // elements per u32 word
};
template <>
struct WTraits<kWBF16> {
  static constexpr int per = 2;
};
template <>
struct WTraits<kWF16> {
  static constexpr int per = 2;
};
template <>
struct WTraits<kWQ8> {
  static constexpr int per = 4, bits = 8;
};
template <>
struct WTraits<kWQ4> {
  static constexpr int per = 8, bits = 4;
};
template <>
struct WTraits<kWQ2> {
  static constexpr int per = 16, bits = 2;
};

// float(q) for an unsigned q < 2^23 without a conversion instruction (a quarter-rate unit):
// 2^23 + q is exact as a float's bit pattern, and subtracting 2^23 is exact.
__device__ __forceinline__ float small_uint_to_float(uint32_t q) {
  return __fsub_rn(__uint_as_float(0x4B000000u | q), 8388608.0f);
}

// The `per` quantised weights of one word with its group's scale and bias: q * s + b, a
// product then a sum (format/quant.h's dequantize_row).
template <int WT>
__device__ __forceinline__ void decode_quant(uint32_t word, float s, float b, float* w) {
  constexpr int per = WTraits<WT>::per, bits = WTraits<WT>::bits;
  constexpr uint32_t mask = (1u << bits) - 1;
#pragma unroll
  for (int j = 0; j < per; j++)
    w[j] = __fadd_rn(__fmul_rn(small_uint_to_float((word >> (j * bits)) & mask), s), b);
}

// The `per` weights of word `word` (column c0 of its row); `gbase` = the row's first group
// index, gshift = log2(group) (integer division costs dozens of instructions on a GPU).
template <int WT>
__device__ __forceinline__ void decode_word(const WMat& W, int64_t gbase, int gshift, int64_t c0,
                                            uint32_t word, float* w) {
  if constexpr (WT == kWF32) {
    w[0] = __uint_as_float(word);
  } else if constexpr (WT == kWBF16) {
    w[0] = bf16_to_f32(uint16_t(word & 0xffffu));
    w[1] = bf16_to_f32(uint16_t(word >> 16));
  } else if constexpr (WT == kWF16) {
    w[0] = f16_to_f32(uint16_t(word & 0xffffu));
    w[1] = f16_to_f32(uint16_t(word >> 16));
  } else {
    // A word never straddles groups (group is a multiple of 32 elements).
    const int64_t gi = gbase + (c0 >> gshift);
    decode_quant<WT>(word, bf16_to_f32(W.scales[gi]), bf16_to_f32(W.biases[gi]), w);
  }
}

// Row r of W times TT token rows xt[tt]: this thread's share, the warp's tree, then (ks > 1)
// the ks warps' sums in warp order through `part` ([kWarps][TT] shared floats). Every thread
// of the block calls it with the same ks (it waits at barriers when ks > 1); `li` = this
// thread's lane among the row's 32*ks. Returns true in the one thread that holds the row's
// sums in acc (lane 0 of the row's first warp, when active).
template <int WT, int VEC, int TT, bool XV>  // XV: x rows 16-byte aligned, float4 loads
__device__ __forceinline__ bool row_sums(const WMat& W, int gshift, int ks, int64_t r,
                                         bool active, const float* const* xt, float* acc,
                                         float (*part)[TT]) {
  constexpr int per = WTraits<WT>::per;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int li = (warp % ks) * 32 + lane;
  const int64_t row_words = W.cols / per;
  const uint32_t* wrow = static_cast<const uint32_t*>(W.data) + (active ? r : 0) * row_words;
  const int64_t gbase = (active ? r : 0) * (W.cols >> gshift);
#pragma unroll
  for (int tt = 0; tt < TT; tt++) acc[tt] = 0.0f;
  // The next step's words are loaded before this step's are used (more loads in flight).
  auto load = [&](int64_t at, uint32_t* words) {
    if constexpr (VEC == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(wrow + at));
      words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
    } else {
      words[0] = __ldg(wrow + at);
    }
  };
  const int64_t step = 32 * ks * VEC;
  uint32_t next[VEC];
  if (active && int64_t(li) * VEC < row_words) load(int64_t(li) * VEC, next);
  for (int64_t w0 = int64_t(li) * VEC; active && w0 < row_words; w0 += step) {
    uint32_t words[VEC];
#pragma unroll
    for (int u = 0; u < VEC; u++) words[u] = next[u];
    if (w0 + step < row_words) load(w0 + step, next);
    // Quantised: one scale/bias load per VEC words when they share a group (always for q8 and
    // q4; q2 with groups of 64 or more): w0 is a multiple of VEC, groups powers of two.
    float gs = 0.0f, gb = 0.0f;
    constexpr bool quant = WT == kWQ8 || WT == kWQ4 || WT == kWQ2;
    if constexpr (quant) {
      const int64_t gi = gbase + ((w0 * per) >> gshift);
      gs = bf16_to_f32(W.scales[gi]);
      gb = bf16_to_f32(W.biases[gi]);
    }
    const bool one_group = quant && VEC * per <= (1 << gshift);  // aligned: w0*per % (VEC*per) == 0
#pragma unroll
    for (int u = 0; u < VEC; u++) {
      const int64_t c0 = (w0 + u) * per;
      float w[per];
      if constexpr (quant) {
        if (one_group) decode_quant<WT>(words[u], gs, gb, w);
        else decode_word<WT>(W, gbase, gshift, c0, words[u], w);
      } else {
        decode_word<WT>(W, gbase, gshift, c0, words[u], w);
      }
#pragma unroll
      for (int tt = 0; tt < TT; tt++) {
        if constexpr (XV && per >= 4) {
#pragma unroll
          for (int j = 0; j < per; j += 4) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(xt[tt] + c0 + j));
            acc[tt] = fmaf(w[j], xv.x, acc[tt]);
            acc[tt] = fmaf(w[j + 1], xv.y, acc[tt]);
            acc[tt] = fmaf(w[j + 2], xv.z, acc[tt]);
            acc[tt] = fmaf(w[j + 3], xv.w, acc[tt]);
          }
        } else {
#pragma unroll
          for (int j = 0; j < per; j++) acc[tt] = fmaf(w[j], __ldg(xt[tt] + c0 + j), acc[tt]);
        }
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < TT; tt++)
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) acc[tt] += __shfl_xor_sync(0xffffffffu, acc[tt], off);
  if (ks > 1) {
    if (lane == 0)
#pragma unroll
      for (int tt = 0; tt < TT; tt++) part[warp][tt] = acc[tt];
    __syncthreads();
    if (warp % ks == 0)
#pragma unroll
      for (int tt = 0; tt < TT; tt++)
        for (int w = 1; w < ks; w++) acc[tt] += part[warp + w][tt];
    __syncthreads();  // `part` is free again for the next call
  }
  return lane == 0 && warp % ks == 0 && active;
}

// ---- Four rows per block -------------------------------------------------------------------
// For kernels whose blocks each take 4 consecutive rows of a matrix chosen per block (moe.cu's
// experts, matmul_n's projections): with ks = 1 each warp takes a row, with ks = 4 the block
// takes the rows one after another; either way each row in row_sums' order.


template <int WT, int VEC, bool XV>
__device__ inline void block_dot4_t(const WMat& W, int ks, int64_t r0, const float* x, float* res,
                             float (*part)[1]) {
  const int warp = threadIdx.x >> 5;
  const int gshift = W.group > 0 ? __ffs(W.group) - 1 : 0;
  const float* xt[1] = {x};
  float acc[1];
  if (ks == 1) {
    const int64_t r = r0 + warp;
    if (row_sums<WT, VEC, 1, XV>(W, gshift, 1, r, r < W.rows, xt, acc, part)) res[warp] = acc[0];
  } else {
    for (int i = 0; i < kWarps; i++) {
      const int64_t r = r0 + i;
      if (row_sums<WT, VEC, 1, XV>(W, gshift, ks, r, r < W.rows, xt, acc, part)) res[i] = acc[0];
    }
  }
  __syncthreads();
}

template <int WT>
__device__ inline void block_dot4_x(const WMat& W, int ks, int64_t r0, const float* x, float* res,
                             float (*part)[1]) {
  const bool xv = reinterpret_cast<uintptr_t>(x) % 16 == 0 && W.cols % 4 == 0;
  if (matvec_vec4(W)) {
    if (xv) block_dot4_t<WT, 4, true>(W, ks, r0, x, res, part);
    else block_dot4_t<WT, 4, false>(W, ks, r0, x, res, part);
  } else {
    if (xv) block_dot4_t<WT, 1, true>(W, ks, r0, x, res, part);
    else block_dot4_t<WT, 1, false>(W, ks, r0, x, res, part);
  }
}

// res[i] = row r0 + i of W times x, for the rows < W.rows, visible to the whole block on
// return. Every thread of the block calls it. The row's order is the mat-vec kernel's
// (matvec_ks and matvec_vec4 of W, as matmul.cu chooses them).
__device__ inline void block_dot4(const WMat& W, int64_t r0, const float* x, float* res,
                           float (*part)[1]) {
  const int ks = matvec_ks(W);
  switch (W.type) {
    case kWF32: return block_dot4_x<kWF32>(W, ks, r0, x, res, part);
    case kWBF16: return block_dot4_x<kWBF16>(W, ks, r0, x, res, part);
    case kWF16: return block_dot4_x<kWF16>(W, ks, r0, x, res, part);
    case kWQ8: return block_dot4_x<kWQ8>(W, ks, r0, x, res, part);
    case kWQ4: return block_dot4_x<kWQ4>(W, ks, r0, x, res, part);
    case kWQ2: return block_dot4_x<kWQ2>(W, ks, r0, x, res, part);
  }
}

}  // namespace moeflux::cuda
