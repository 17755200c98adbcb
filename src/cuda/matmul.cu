// Dequantising mat-vec / mat-mul and embedding rows, for every weight type.
//
// A weight is made exact in f32 first, as cpu/matmul.h: bf16/f16 widen exactly; a quantised
// weight is float(q) * scale + bias, a product then a sum, never fused (format/quant.h's
// dequantize_row). One warp per row: lane l takes words l*VEC.. of every 32*VEC (16-byte
// loads when the rows allow, so a warp reads 512 contiguous bytes per step), accumulating each
// token's sum with fmaf in increasing column order; the lane sums then meet in a fixed
// xor-shuffle tree. Tokens go TT at a time (the weights are read once per TT tokens); TT only
// changes how many sums run side by side, never an order, so a token's bits do not depend on T.
// TODO(perf): prefill re-reads the weights once per 8 tokens; a tensor-core GEMM belongs here.
#include "cuda/common.cuh"

namespace moeflux::cuda {

namespace {

constexpr int kWarps = 4;  // rows per block

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


// The `per` weights of word `word` (column c0 of row r).
template <int WT>
__device__ __forceinline__ void decode_word(const WMat& W, int64_t r, int64_t c0, uint32_t word,
                                            float* w) {
  constexpr int per = WTraits<WT>::per;
  if constexpr (WT == kWF32) {
    w[0] = __uint_as_float(word);
  } else if constexpr (WT == kWBF16) {
    w[0] = bf16_to_f32(uint16_t(word & 0xffffu));
    w[1] = bf16_to_f32(uint16_t(word >> 16));
  } else if constexpr (WT == kWF16) {
    w[0] = f16_to_f32(uint16_t(word & 0xffffu));
    w[1] = f16_to_f32(uint16_t(word >> 16));
  } else {
    constexpr int bits = WTraits<WT>::bits;
    constexpr uint32_t mask = (1u << bits) - 1;
    // A word never straddles groups (group is a multiple of 32 elements).
    const int64_t gi = r * (W.cols / W.group) + c0 / W.group;
    const float s = bf16_to_f32(W.scales[gi]), b = bf16_to_f32(W.biases[gi]);
#pragma unroll
    for (int j = 0; j < per; j++)
      w[j] = __fadd_rn(__fmul_rn(float((word >> (j * bits)) & mask), s), b);
  }
}

template <int WT, int VEC, int TT>
__global__ void __launch_bounds__(kWarps * 32)
    matmul_kernel(WMat W, const float* __restrict__ x, float* __restrict__ y, int T,
                  int64_t y_stride) {
  constexpr int per = WTraits<WT>::per;
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= W.rows) return;
  const int t0 = blockIdx.y * TT;
  const int64_t row_words = W.cols / per;
  const uint32_t* wrow = static_cast<const uint32_t*>(W.data) + r * row_words;
  const float* xt[TT];
#pragma unroll
  for (int tt = 0; tt < TT; tt++) xt[tt] = x + int64_t(min(t0 + tt, T - 1)) * W.cols;
  float acc[TT];
#pragma unroll
  for (int tt = 0; tt < TT; tt++) acc[tt] = 0.0f;
  for (int64_t w0 = int64_t(lane) * VEC; w0 < row_words; w0 += 32 * VEC) {
    uint32_t words[VEC];
    if constexpr (VEC == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(wrow + w0));
      words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
    } else {
      words[0] = __ldg(wrow + w0);
    }
#pragma unroll
    for (int u = 0; u < VEC; u++) {
      const int64_t c0 = (w0 + u) * per;
      float w[per];
      decode_word<WT>(W, r, c0, words[u], w);
#pragma unroll
      for (int tt = 0; tt < TT; tt++)
#pragma unroll
        for (int j = 0; j < per; j++) acc[tt] = fmaf(w[j], __ldg(xt[tt] + c0 + j), acc[tt]);
    }
  }
#pragma unroll
  for (int tt = 0; tt < TT; tt++)
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) acc[tt] += __shfl_xor_sync(0xffffffffu, acc[tt], off);
  if (lane == 0)
#pragma unroll
    for (int tt = 0; tt < TT; tt++)
      if (t0 + tt < T) y[int64_t(t0 + tt) * y_stride + r] = acc[tt];
}

template <int WT, int VEC>
void launch_vec(cudaStream_t s, const WMat& W, const float* x, float* y, int T,
                int64_t y_stride) {
  const dim3 block(kWarps * 32);
  const unsigned row_blocks = unsigned(ceil_div(W.rows, kWarps));
  // T == 1 keeps one sum per lane (decode); a batch runs 8 tokens per block.
  if (T == 1)
    matmul_kernel<WT, VEC, 1><<<dim3(row_blocks, 1), block, 0, s>>>(W, x, y, T, y_stride);
  else
    matmul_kernel<WT, VEC, 8>
        <<<dim3(row_blocks, unsigned(ceil_div(T, 8))), block, 0, s>>>(W, x, y, T, y_stride);
}

template <int WT>
void launch(cudaStream_t s, const WMat& W, const float* x, float* y, int T, int64_t y_stride) {
  // 16-byte loads when every row starts 16-byte aligned; the choice depends only on W, so all
  // T use the same order.
  const int64_t row_words = W.cols / WTraits<WT>::per;
  if (row_words % 4 == 0 && reinterpret_cast<uintptr_t>(W.data) % 16 == 0)
    launch_vec<WT, 4>(s, W, x, y, T, y_stride);
  else
    launch_vec<WT, 1>(s, W, x, y, T, y_stride);
}

template <int WT>
__global__ void embed_kernel(WMat E, const int32_t* __restrict__ tokens,
                             float* __restrict__ out) {
  constexpr int per = WTraits<WT>::per;
  const int t = blockIdx.x;
  const int64_t r = tokens[t];
  const int64_t row_words = E.cols / per;
  const uint32_t* row = static_cast<const uint32_t*>(E.data) + r * row_words;
  for (int64_t wi = threadIdx.x; wi < row_words; wi += blockDim.x) {
    float w[per];
    decode_word<WT>(E, r, wi * per, row[wi], w);
#pragma unroll
    for (int j = 0; j < per; j++) out[int64_t(t) * E.cols + wi * per + j] = w[j];
  }
}

}  // namespace

void matmul(cudaStream_t s, const WMat& W, const float* x, float* y, int T, int64_t y_stride) {
  if (T <= 0 || W.rows <= 0) return;
  switch (W.type) {
    case kWF32: return launch<kWF32>(s, W, x, y, T, y_stride);
    case kWBF16: return launch<kWBF16>(s, W, x, y, T, y_stride);
    case kWF16: return launch<kWF16>(s, W, x, y, T, y_stride);
    case kWQ8: return launch<kWQ8>(s, W, x, y, T, y_stride);
    case kWQ4: return launch<kWQ4>(s, W, x, y, T, y_stride);
    case kWQ2: return launch<kWQ2>(s, W, x, y, T, y_stride);
  }
}

void embed(cudaStream_t s, const WMat& E, const int32_t* tokens, int T, float* out) {
  if (T <= 0) return;
  const dim3 grid{unsigned(T)}, block{256};
  switch (E.type) {
    case kWF32: embed_kernel<kWF32><<<grid, block, 0, s>>>(E, tokens, out); break;
    case kWBF16: embed_kernel<kWBF16><<<grid, block, 0, s>>>(E, tokens, out); break;
    case kWF16: embed_kernel<kWF16><<<grid, block, 0, s>>>(E, tokens, out); break;
    case kWQ8: embed_kernel<kWQ8><<<grid, block, 0, s>>>(E, tokens, out); break;
    case kWQ4: embed_kernel<kWQ4><<<grid, block, 0, s>>>(E, tokens, out); break;
    case kWQ2: embed_kernel<kWQ2><<<grid, block, 0, s>>>(E, tokens, out); break;
  }
}

}  // namespace moeflux::cuda
