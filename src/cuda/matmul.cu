// Dequantising mat-vec / mat-mul and embedding rows, for every weight type.
//
// A weight is made exact in f32 first, as cpu/matmul.h: bf16/f16 widen exactly; a quantised
// weight is float(q) * scale + bias, a product then a sum, never fused (format/quant.h's
// dequantize_row). One warp per row (four for small matrices): lane l takes words l*VEC.. of
// every 32*VEC (16-byte loads when the rows allow, so a warp reads 512 contiguous bytes per
// step), accumulating each
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


// The `per` weights of word `word` (column c0 of its row); `gbase` = the row's first group
// index, gshift = log2(group) (integer division costs dozens of instructions on a GPU).
template <int WT>
__device__ __forceinline__ void decode_word(const WMat& W, int64_t gbase, int gshift, int64_t c0,
                                            uint32_t word, float* w) {
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
    const int64_t gi = gbase + (c0 >> gshift);
    const float s = bf16_to_f32(W.scales[gi]), b = bf16_to_f32(W.biases[gi]);
#pragma unroll
    for (int j = 0; j < per; j++)
      w[j] = __fadd_rn(__fmul_rn(float((word >> (j * bits)) & mask), s), b);
  }
}

template <int WT, int VEC, int TT, bool XV>  // XV: x rows 16-byte aligned, float4 loads
__global__ void __launch_bounds__(kWarps * 32)
    matmul_kernel(WMat W, int gshift, int ks, const float* __restrict__ x,
                  float* __restrict__ y, int T, int64_t y_stride) {
  constexpr int per = WTraits<WT>::per;
  // ks warps per row (1 or 4; chosen from W's shape alone): lane li of the row's 32*ks lanes
  // takes words li*VEC, li*VEC + 32*ks*VEC, ...; the warps' sums are added in warp order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int li = (warp % ks) * 32 + lane;
  const int64_t r = int64_t(blockIdx.x) * (kWarps / ks) + warp / ks;
  __shared__ float part[kWarps][TT];
  const bool active = r < W.rows;
  if (!active && ks == 1) return;
  const int t0 = blockIdx.y * TT;
  const int64_t row_words = W.cols / per;
  const uint32_t* wrow = static_cast<const uint32_t*>(W.data) + (active ? r : 0) * row_words;
  const int64_t gbase = (active ? r : 0) * (W.cols >> gshift);
  const float* xt[TT];
#pragma unroll
  for (int tt = 0; tt < TT; tt++) xt[tt] = x + int64_t(min(t0 + tt, T - 1)) * W.cols;
  float acc[TT];
#pragma unroll
  for (int tt = 0; tt < TT; tt++) acc[tt] = 0.0f;
  for (int64_t w0 = int64_t(li) * VEC; active && w0 < row_words; w0 += 32 * ks * VEC) {
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
      decode_word<WT>(W, gbase, gshift, c0, words[u], w);
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
    if (warp % ks) return;
#pragma unroll
    for (int tt = 0; tt < TT; tt++)
      for (int w = 1; w < ks; w++) acc[tt] += part[warp + w][tt];
  }
  if (lane == 0 && active)
#pragma unroll
    for (int tt = 0; tt < TT; tt++)
      if (t0 + tt < T) y[int64_t(t0 + tt) * y_stride + r] = acc[tt];
}

template <int WT, int VEC, bool XV>
void launch_vec(cudaStream_t s, const WMat& W, int gshift, const float* x, float* y, int T,
                int64_t y_stride) {
  const dim3 block(kWarps * 32);
  // Few rows of many words: 4 warps share a row, so small matrices still fill the GPU.
  const int64_t row_words = W.cols / WTraits<WT>::per;
  const int ks = W.rows <= 4096 && row_words >= 4 * 32 * VEC ? 4 : 1;
  const unsigned row_blocks = unsigned(ceil_div(W.rows, kWarps / ks));
  // T == 1 keeps one sum per lane (decode); a batch runs 8 tokens per block.
  if (T == 1)
    matmul_kernel<WT, VEC, 1, XV>
        <<<dim3(row_blocks, 1), block, 0, s>>>(W, gshift, ks, x, y, T, y_stride);
  else
    matmul_kernel<WT, VEC, 8, XV><<<dim3(row_blocks, unsigned(ceil_div(T, 8))), block, 0, s>>>(
        W, gshift, ks, x, y, T, y_stride);
}

template <int WT, int VEC>
void launch_x(cudaStream_t s, const WMat& W, int gshift, const float* x, float* y, int T,
              int64_t y_stride) {
  // float4 loads of x when its rows are 16-byte aligned: the same products in the same order,
  // so the bits do not depend on this choice.
  if constexpr (WTraits<WT>::per >= 4) {
    if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && W.cols % 4 == 0)
      return launch_vec<WT, VEC, true>(s, W, gshift, x, y, T, y_stride);
  }
  launch_vec<WT, VEC, false>(s, W, gshift, x, y, T, y_stride);
}

template <int WT>
void launch(cudaStream_t s, const WMat& W, const float* x, float* y, int T, int64_t y_stride) {
  // 16-byte loads when every row starts 16-byte aligned; the choice depends only on W, so all
  // T use the same order.
  const int64_t row_words = W.cols / WTraits<WT>::per;
  const int gshift = W.group > 0 ? __builtin_ctz(unsigned(W.group)) : 0;
  if (row_words % 4 == 0 && reinterpret_cast<uintptr_t>(W.data) % 16 == 0)
    launch_x<WT, 4>(s, W, gshift, x, y, T, y_stride);
  else
    launch_x<WT, 1>(s, W, gshift, x, y, T, y_stride);
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
    const int gshift = E.group > 0 ? __ffs(E.group) - 1 : 0;
    decode_word<WT>(E, r * (E.cols >> gshift), gshift, wi * per, row[wi], w);
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
