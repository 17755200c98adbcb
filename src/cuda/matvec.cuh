// The dequantising row dot product every weight read goes through (nvcc only): matmul.cu's
// mat-vec / mat-mul and moe.cu's expert kernels share it, so an expert's output has the same
// bits whichever kernel computed it.
//
// A weight is made exact in f32 first, as cpu/matmul.h: bf16/f16 widen exactly; a quantised
// weight is float(q) * scale + bias, a product then a sum, never fused (format/quant.h's
// dequantize_row). A row's 32*ks lanes (ks = 1 or 4 warps, chosen from W's shape alone:
// matvec_ks) split its words: lane li takes words li*VEC.. of every 32*ks*VEC (16-byte loads
// when rows allow: VEC = 4), accumulating each token's sum with fmaf in increasing column order;
// the lane sums meet in a fixed xor-shuffle tree, then the ks warps' sums are added in warp
// order. That is the order of one (row, token) sum, and nothing else changes it: a warp runs RR
// rows and TT tokens side by side (RR·TT sums, each x element loaded once for the RR rows),
// and RR and TT are chosen per launch for speed alone, so a token's bits depend on neither T,
// the launch nor the kernel.
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
template <int WT>
constexpr bool kQuant = WT == kWQ8 || WT == kWQ4 || WT == kWQ2;

// float(q) for an unsigned q < 2^23 without a conversion instruction (a quarter-rate unit):
// 2^23 + q is exact as a float's bit pattern, and subtracting 2^23 is exact.
__device__ __forceinline__ float small_uint_to_float(uint32_t q) {
  return __fsub_rn(__uint_as_float(0x4B000000u | q), 8388608.0f);
}

// Element j of a word: a quantised weight q * s + b, a product then a sum (format/quant.h's
// dequantize_row); a float weight as it is stored (s, b unused).
// A quantised code q is placed as the low byte of 2^23's bit pattern with one byte permute
// (after splitting a q4/q2 word into bytes of codes, shared by the word's elements): the same
// float 2^23 + q as small_uint_to_float, fewer integer instructions.
template <int WT>
__device__ __forceinline__ float word_element(uint32_t word, int j, float s, float b) {
  if constexpr (kQuant<WT>) {
    uint32_t bytes;  // code j is byte `at` of it
    int at;
    if constexpr (WT == kWQ8) {
      bytes = word, at = j;
    } else if constexpr (WT == kWQ4) {  // even codes in word's low nibbles, odd in its high
      bytes = (j & 1) ? (word >> 4) & 0x0F0F0F0Fu : word & 0x0F0F0F0Fu, at = j >> 1;
    } else {  // q2: code j at bits 2j: byte j/4 of (word >> 2(j%4)) & 0x03030303
      bytes = (word >> (2 * (j & 3))) & 0x03030303u, at = j >> 2;
    }
    const float q = __fsub_rn(__uint_as_float(__byte_perm(bytes, 0x4B000000u, 0x7540u | at)),
                              8388608.0f);
    return __fadd_rn(__fmul_rn(q, s), b);
  } else if constexpr (WT == kWF32) {
    return __uint_as_float(word);
  } else if constexpr (WT == kWBF16) {
    return bf16_to_f32(uint16_t(j == 0 ? word & 0xffffu : word >> 16));
  } else {
    return f16_to_f32(uint16_t(j == 0 ? word & 0xffffu : word >> 16));
  }
}

// The `per` weights of word `word` (column c0 of its row); `gbase` = the row's first group
// index, gshift = log2(group) (integer division costs dozens of instructions on a GPU).
template <int WT>
__device__ __forceinline__ void decode_word(const WMat& W, int64_t gbase, int gshift, int64_t c0,
                                            uint32_t word, float* w) {
  float s = 0.0f, b = 0.0f;
  if constexpr (kQuant<WT>) {
    // A word never straddles groups (group is a multiple of 32 elements).
    const int64_t gi = gbase + (c0 >> gshift);
    s = bf16_to_f32(W.scales[gi]);
    b = bf16_to_f32(W.biases[gi]);
  }
#pragma unroll
  for (int j = 0; j < WTraits<WT>::per; j++) w[j] = word_element<WT>(word, j, s, b);
}

// One weight row as the dot product reads it: its words, and (quantised) its groups' scales
// and biases.
struct RowRef {
  const uint32_t* w;
  const uint16_t* s;
  const uint16_t* b;
};
// Row r of W (0 <= r < W.rows).
__device__ __forceinline__ RowRef row_ref(const WMat& W, int64_t r, int gshift) {
  RowRef a;
  a.w = static_cast<const uint32_t*>(W.data) + r * (W.cols / elements_per_word(W.type));
  a.s = W.scales ? W.scales + r * (W.cols >> gshift) : nullptr;
  a.b = W.biases ? W.biases + r * (W.cols >> gshift) : nullptr;
  return a;
}
__device__ __forceinline__ int group_shift(const WMat& W) {
  return W.group > 0 ? __ffs(W.group) - 1 : 0;
}

// RR rows of `cols` columns (one shape: the same ks) times TT token rows, side by side: this
// thread's share of each (row, token) sum, the warp's tree, then (ks > 1) the ks warps' sums in
// warp order through `part` (kWarps*RR*TT shared floats). XS: every row reads the same token
// rows xt[0][tt]; otherwise row i reads xt[i][tt]. XV: every x row is 16-byte aligned (float4
// loads; the same products in the same order). Every thread of the block calls it with the
// same ks (it waits at barriers when ks > 1); `active` must be the same across a row's ks
// warps. Returns true in the one thread that holds the sums in acc (lane 0 of the rows' first
// warp, when active).
template <int WT, int VEC, int TT, int RR, bool XS, bool XV>
__device__ __forceinline__ bool rows_sums(int64_t cols, int gshift, int ks,
                                          const RowRef (&rows)[RR], bool active,
                                          const float* const (&xt)[XS ? 1 : RR][TT],
                                          float (&acc)[RR][TT], float* part) {
  constexpr int per = WTraits<WT>::per;
  constexpr int CH = per >= 4 ? 4 : per;  // elements decoded at a time
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int li = (warp % ks) * 32 + lane;
  const int64_t row_words = cols / per;
#pragma unroll
  for (int i = 0; i < RR; i++)
#pragma unroll
    for (int tt = 0; tt < TT; tt++) acc[i][tt] = 0.0f;
  // The next step's words are loaded before this step's are used (more loads in flight).
  auto load = [&](const uint32_t* w, int64_t at, uint32_t* words) {
    if constexpr (VEC == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(w + at));
      words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
    } else {
      words[0] = __ldg(w + at);
    }
  };
  const int64_t step = 32 * ks * VEC;
  uint32_t next[RR][VEC];
  if (active && int64_t(li) * VEC < row_words)
#pragma unroll
    for (int i = 0; i < RR; i++) load(rows[i].w, int64_t(li) * VEC, next[i]);
  for (int64_t w0 = int64_t(li) * VEC; active && w0 < row_words; w0 += step) {
    uint32_t words[RR][VEC];
#pragma unroll
    for (int i = 0; i < RR; i++)
#pragma unroll
      for (int u = 0; u < VEC; u++) words[i][u] = next[i][u];
    if (w0 + step < row_words)
#pragma unroll
      for (int i = 0; i < RR; i++) load(rows[i].w, w0 + step, next[i]);
    // Quantised: one scale/bias load per VEC words when they share a group (always for q8 and
    // q4; q2 with groups of 64 or more): w0 is a multiple of VEC, groups powers of two.
    constexpr bool quant = kQuant<WT>;
    const bool one_group = quant && VEC * per <= (1 << gshift);
    float gs[RR], gb[RR];
#pragma unroll
    for (int i = 0; i < RR; i++) {
      gs[i] = gb[i] = 0.0f;
      if constexpr (quant) {
        const int64_t gi = (w0 * per) >> gshift;
        gs[i] = bf16_to_f32(rows[i].s[gi]);
        gb[i] = bf16_to_f32(rows[i].b[gi]);
      }
    }
#pragma unroll
    for (int u = 0; u < VEC; u++) {
      const int64_t c0 = (w0 + u) * per;
      float us[RR], ub[RR];
#pragma unroll
      for (int i = 0; i < RR; i++) {
        us[i] = gs[i], ub[i] = gb[i];
        if constexpr (quant) {
          if (!one_group) {
            const int64_t gi = c0 >> gshift;
            us[i] = bf16_to_f32(rows[i].s[gi]);
            ub[i] = bf16_to_f32(rows[i].b[gi]);
          }
        }
      }
#pragma unroll
      for (int jc = 0; jc < per; jc += CH) {
        float w[RR][CH];
#pragma unroll
        for (int i = 0; i < RR; i++)
#pragma unroll
          for (int j = 0; j < CH; j++) w[i][j] = word_element<WT>(words[i][u], jc + j, us[i], ub[i]);
#pragma unroll
        for (int tt = 0; tt < TT; tt++) {
          if constexpr (XV && CH == 4) {
            if constexpr (XS) {
              const float4 xv = __ldg(reinterpret_cast<const float4*>(xt[0][tt] + c0 + jc));
#pragma unroll
              for (int i = 0; i < RR; i++) {
                acc[i][tt] = fmaf(w[i][0], xv.x, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][1], xv.y, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][2], xv.z, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][3], xv.w, acc[i][tt]);
              }
            } else {
#pragma unroll
              for (int i = 0; i < RR; i++) {
                const float4 xv = __ldg(reinterpret_cast<const float4*>(xt[XS ? 0 : i][tt] + c0 + jc));
                acc[i][tt] = fmaf(w[i][0], xv.x, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][1], xv.y, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][2], xv.z, acc[i][tt]);
                acc[i][tt] = fmaf(w[i][3], xv.w, acc[i][tt]);
              }
            }
          } else {
#pragma unroll
            for (int j = 0; j < CH; j++) {
              if constexpr (XS) {
                const float xv = __ldg(xt[0][tt] + c0 + jc + j);
#pragma unroll
                for (int i = 0; i < RR; i++) acc[i][tt] = fmaf(w[i][j], xv, acc[i][tt]);
              } else {
#pragma unroll
                for (int i = 0; i < RR; i++)
                  acc[i][tt] = fmaf(w[i][j], __ldg(xt[XS ? 0 : i][tt] + c0 + jc + j), acc[i][tt]);
              }
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RR; i++)
#pragma unroll
    for (int tt = 0; tt < TT; tt++)
#pragma unroll
      for (int off = 16; off >= 1; off /= 2)
        acc[i][tt] += __shfl_xor_sync(0xffffffffu, acc[i][tt], off);
  if (ks > 1) {
    if (lane == 0)
#pragma unroll
      for (int i = 0; i < RR; i++)
#pragma unroll
        for (int tt = 0; tt < TT; tt++) part[(warp * RR + i) * TT + tt] = acc[i][tt];
    __syncthreads();
    if (warp % ks == 0)
#pragma unroll
      for (int i = 0; i < RR; i++)
#pragma unroll
        for (int tt = 0; tt < TT; tt++)
          for (int w = 1; w < ks; w++) acc[i][tt] += part[((warp + w) * RR + i) * TT + tt];
    __syncthreads();  // `part` is free again for the next call
  }
  return lane == 0 && warp % ks == 0 && active;
}

// ---- A block's rows of one matrix, one token ------------------------------------------------
// For kernels whose blocks each take kWarps*RR consecutive rows r0.. of a matrix chosen per
// block (matmul_n's projections): with ks = 1 warp w takes rows r0 + w*RR.., with ks = 4 the
// block takes RR rows per pass, kWarps passes; either way each row in rows_sums' order.
// res[i] = row r0 + i times x for the rows < W.rows, visible to the whole block on return.
// Every thread of the block calls it; `part` holds kWarps*RR floats.
template <int WT, int VEC, int RR, bool XV>
__device__ inline void block_rows_t(const WMat& W, int ks, int64_t r0, const float* x, float* res,
                                    float* part) {
  const int warp = threadIdx.x >> 5;
  const int gshift = group_shift(W);
  const float* const xt[1][1] = {{x}};
  float acc[RR][1];
  RowRef rows[RR];
  const int passes = ks == 1 ? 1 : kWarps;
  for (int p = 0; p < passes; p++) {
    const int64_t rb = r0 + (ks == 1 ? warp * RR : p * RR);
#pragma unroll
    for (int i = 0; i < RR; i++) rows[i] = row_ref(W, min(rb + i, W.rows - 1), gshift);
    if (rows_sums<WT, VEC, 1, RR, true, XV>(W.cols, gshift, ks, rows, rb < W.rows, xt, acc, part))
#pragma unroll
      for (int i = 0; i < RR; i++) res[rb - r0 + i] = acc[i][0];
  }
  __syncthreads();
}

template <int WT, int RR>
__device__ inline void block_rows_x(const WMat& W, int ks, int64_t r0, const float* x, float* res,
                                    float* part) {
  const bool xv = reinterpret_cast<uintptr_t>(x) % 16 == 0 && W.cols % 4 == 0;
  if (matvec_vec4(W)) {
    if (xv) block_rows_t<WT, 4, RR, true>(W, ks, r0, x, res, part);
    else block_rows_t<WT, 4, RR, false>(W, ks, r0, x, res, part);
  } else {
    if (xv) block_rows_t<WT, 1, RR, true>(W, ks, r0, x, res, part);
    else block_rows_t<WT, 1, RR, false>(W, ks, r0, x, res, part);
  }
}

// The type dispatched at run time (matmul_n: a block's matrix is known only there).
template <int RR>
__device__ inline void block_rows(const WMat& W, int64_t r0, const float* x, float* res,
                                  float* part) {
  const int ks = matvec_ks(W);
  switch (W.type) {
    case kWF32: return block_rows_x<kWF32, RR>(W, ks, r0, x, res, part);
    case kWBF16: return block_rows_x<kWBF16, RR>(W, ks, r0, x, res, part);
    case kWF16: return block_rows_x<kWF16, RR>(W, ks, r0, x, res, part);
    case kWQ8: return block_rows_x<kWQ8, RR>(W, ks, r0, x, res, part);
    case kWQ4: return block_rows_x<kWQ4, RR>(W, ks, r0, x, res, part);
    case kWQ2: return block_rows_x<kWQ2, RR>(W, ks, r0, x, res, part);
  }
}

}  // namespace moeflux::cuda
