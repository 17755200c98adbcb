// Dequantising mat-vec / mat-mul and embedding rows, for every weight type. The row dot product
// and its fixed order are matvec.cuh's; here a warp takes 1, 2 or 4 rows (four warps share each
// row of a small matrix), tokens 4 at a time in a batch (the weights read once per 4 tokens).
// TODO(perf): prefill re-reads the weights once per 4 tokens; a tensor-core GEMM belongs here.
#include "cuda/matvec.cuh"

namespace moeflux::cuda {

namespace {

// Rows per warp for a launch of `warps` row-warps at T = 1: more rows per warp load each x
// element once for all of them (the x reads, not the weights, limited the one-row kernel), but
// a matrix should still give the GPU a few waves of warps. Speed only: bits do not depend on it.
int rows_per_warp(int64_t row_warps, int T) {
  if (T > 1) return 4;
  constexpr int64_t kEnough = 132 * 16;  // warps to fill an H100/H200 a few times over
  if (row_warps >= 4 * kEnough) return 4;
  if (row_warps >= 2 * kEnough) return 2;
  return 1;
}

template <int WT, int VEC, int TT, int RR, bool XV>  // XV: x rows 16-byte aligned, float4 loads
__global__ void __launch_bounds__(kWarps * 32)
    matmul_kernel(WMat W, int gshift, int ks, const float* __restrict__ x,
                  float* __restrict__ y, int T, int64_t y_stride) {
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = (int64_t(blockIdx.x) * (kWarps / ks) + warp / ks) * RR;
  __shared__ float part[kWarps * RR * TT];
  const bool active = r0 < W.rows;
  if (!active && ks == 1) return;  // no barrier ahead when a warp has its rows alone
  const int t0 = blockIdx.y * TT;
  const float* xt[1][TT];
#pragma unroll
  for (int tt = 0; tt < TT; tt++) xt[0][tt] = x + int64_t(min(t0 + tt, T - 1)) * W.cols;
  RowRef rows[RR];
#pragma unroll
  for (int i = 0; i < RR; i++) rows[i] = row_ref(W, min(r0 + i, W.rows - 1), gshift);
  float acc[RR][TT];
  if (rows_sums<WT, VEC, TT, RR, true, XV>(W.cols, gshift, ks, rows, active, xt, acc, part))
#pragma unroll
    for (int i = 0; i < RR; i++)
#pragma unroll
      for (int tt = 0; tt < TT; tt++)
        if (r0 + i < W.rows && t0 + tt < T) y[int64_t(t0 + tt) * y_stride + r0 + i] = acc[i][tt];
}

template <int WT, int VEC, int TT, int RR, bool XV>
void launch_rr(cudaStream_t s, const WMat& W, int gshift, int ks, const float* x, float* y,
               int T, int64_t y_stride) {
  const unsigned row_blocks = unsigned(ceil_div(W.rows, int64_t(kWarps / ks) * RR));
  matmul_kernel<WT, VEC, TT, RR, XV><<<dim3(row_blocks, unsigned(ceil_div(T, TT))),
                                       kWarps * 32, 0, s>>>(W, gshift, ks, x, y, T, y_stride);
}

template <int WT, int VEC, bool XV>
void launch_vec(cudaStream_t s, const WMat& W, int gshift, const float* x, float* y, int T,
                int64_t y_stride) {
  // Few rows of many words: 4 warps share a row, so small matrices still fill the GPU.
  const int ks = matvec_ks(W);
  // T == 1 keeps one sum per row (decode); a batch runs 4 tokens by 4 rows per warp (measured
  // on the H200, 8-layer synth q4, pp512: 4x4 5668 t/s, 8x4 5418, 8x2 4139, 16x2 4035, 16x1 2637).
  if (T > 1) return launch_rr<WT, VEC, 4, 4, XV>(s, W, gshift, ks, x, y, T, y_stride);
  switch (rows_per_warp(W.rows * ks, T)) {
    case 4: return launch_rr<WT, VEC, 1, 4, XV>(s, W, gshift, ks, x, y, T, y_stride);
    case 2: return launch_rr<WT, VEC, 1, 2, XV>(s, W, gshift, ks, x, y, T, y_stride);
    default: return launch_rr<WT, VEC, 1, 1, XV>(s, W, gshift, ks, x, y, T, y_stride);
  }
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
  const int gshift = W.group > 0 ? __builtin_ctz(unsigned(W.group)) : 0;
  if (matvec_vec4(W))
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

// blockIdx.x runs over the matrices' 4-row blocks in order; each block finds its matrix.
// Rows per warp of matmul_n: its blocks take kWarps * RR rows of one matrix.
constexpr int kNRowsTyped = 4;  // every matrix of one type and load width: typed kernels
constexpr int kNRowsAny = 2;    // else the type is read per block (every variant inlined)

template <int RR, int WT, int VEC, bool XV>  // WT < 0: the type read per block
__global__ void __launch_bounds__(kWarps * 32) matmul_n_kernel(MatmulN a, const float* x) {
  __shared__ float part[kWarps * RR];
  __shared__ float res[kWarps * RR];
  int i = 0;
  while (i + 1 < a.n && int(blockIdx.x) >= a.first_block[i + 1]) i++;
  // A constant index into the parameter array keeps W in registers (a variable one makes a
  // local-memory copy that every use in the row loop reads again).
  WMat W;
  switch (i) {
    case 0: W = a.W[0]; break;
    case 1: W = a.W[1]; break;
    case 2: W = a.W[2]; break;
    default: W = a.W[3]; break;
  }
  float* y = i == 0 ? a.y[0] : i == 1 ? a.y[1] : i == 2 ? a.y[2] : a.y[3];
  const int64_t r0 = int64_t(int(blockIdx.x) - a.first_block[i]) * (kWarps * RR);
  if constexpr (WT < 0)
    block_rows<RR>(W, r0, x, res, part);
  else
    block_rows_t<WT, VEC, RR, XV>(W, matvec_ks(W), r0, x, res, part);
  if (threadIdx.x < kWarps * RR && r0 + threadIdx.x < W.rows)
    y[r0 + threadIdx.x] = res[threadIdx.x];
}

template <int RR, int WT, int VEC, bool XV>
void launch_n(cudaStream_t s, const MatmulN& a, const float* x) {
  MatmulN b = a;
  int blocks = 0;
  for (int i = 0; i < a.n; i++) {
    b.first_block[i] = blocks;
    blocks += ceil_div(a.W[i].rows, kWarps * RR);
  }
  if (blocks) matmul_n_kernel<RR, WT, VEC, XV><<<unsigned(blocks), kWarps * 32, 0, s>>>(b, x);
}

template <int WT>
void launch_n_typed(cudaStream_t s, const MatmulN& a, const float* x, bool vec4, bool xv) {
  if (vec4) {
    if (xv) launch_n<kNRowsTyped, WT, 4, true>(s, a, x);
    else launch_n<kNRowsTyped, WT, 4, false>(s, a, x);
  } else {
    if (xv) launch_n<kNRowsTyped, WT, 1, true>(s, a, x);
    else launch_n<kNRowsTyped, WT, 1, false>(s, a, x);
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

void matmul_n(cudaStream_t s, const MatmulN& a, const float* x) {
  // The kernel's choices (load width, x loads) are block_rows_x's, made per matrix: typed
  // kernels when every matrix makes the same ones.
  bool same = a.n > 0;
  const bool vec4 = a.n > 0 && matvec_vec4(a.W[0]);
  const bool xv = a.n > 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && a.W[0].cols % 4 == 0;
  for (int i = 0; i < a.n; i++)
    same &= a.W[i].type == a.W[0].type && matvec_vec4(a.W[i]) == vec4 &&
            (reinterpret_cast<uintptr_t>(x) % 16 == 0 && a.W[i].cols % 4 == 0) == xv;
  if (!same) return launch_n<kNRowsAny, -1, 1, false>(s, a, x);
  switch (a.W[0].type) {
    case kWF32: return launch_n_typed<kWF32>(s, a, x, vec4, xv);
    case kWBF16: return launch_n_typed<kWBF16>(s, a, x, vec4, xv);
    case kWF16: return launch_n_typed<kWF16>(s, a, x, vec4, xv);
    case kWQ8: return launch_n_typed<kWQ8>(s, a, x, vec4, xv);
    case kWQ4: return launch_n_typed<kWQ4>(s, a, x, vec4, xv);
    case kWQ2: return launch_n_typed<kWQ2>(s, a, x, vec4, xv);
  }
}

}  // namespace moeflux::cuda
