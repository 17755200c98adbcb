// Gated DeltaNet: the causal conv1d + SiLU, the gates, the delta rule and the gated norm, with
// the operations of cpu/cpu_backend.cpp and cpu/deltanet.cpp in the same order per element.
#include "cuda/common.cuh"

namespace moeflux::cuda {

namespace {

constexpr int kMaxConvK = 16;

// One thread per channel, tokens in order; window = the last K-1 inputs then the current one.
__global__ void conv1d_silu_kernel(const float* __restrict__ x, float* state,
                                   const float* __restrict__ w, float* __restrict__ y, int T,
                                   int C, int K) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float win[kMaxConvK];
  const float* wc = w + int64_t(c) * K;
  for (int i = 0; i < K - 1; i++) win[i] = state[int64_t(i) * C + c];
  for (int t = 0; t < T; t++) {
    win[K - 1] = x[int64_t(t) * C + c];
    float s = 0;
    for (int i = 0; i < K; i++) s += wc[i] * win[i];
    y[int64_t(t) * C + c] = siluf_(s);
    for (int i = 0; i + 1 < K; i++) win[i] = win[i + 1];
  }
  for (int i = 0; i < K - 1; i++) state[int64_t(i) * C + c] = win[i];
}

__global__ void deltanet_gates_kernel(float* a, float* b, const float* __restrict__ A_log,
                                      const float* __restrict__ dt_bias, int64_t n, int nv) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int h = int(i % nv);
  const float x = a[i] + dt_bias[h];
  const float sp = x > 20.0f ? x : log1pf(expf(x));
  a[i] = -expf(A_log[h]) * sp;
  b[i] = sigmoidf_(b[i]);
}

// One block per v-head; thread j owns column j of the head's state S [dk, dv] (in global
// memory: coalesced across j, L1/L2-resident over a call). Per token: q and k of the head's
// k-head L2-normalised (sum of squares in double, as cpu/kernels.cpp's l2norm), q scaled by
// 1/sqrt(dk); then per column S *= decay, delta = (v - S^T k) * beta, S += k delta, o = S^T q,
// each sum in increasing i with a separate multiply and add (the CPU's order, no FMA).
__global__ void deltanet_kernel(const float* __restrict__ qkv, const float* __restrict__ g,
                                const float* __restrict__ beta, float* state,
                                float* __restrict__ out, int T, int nk, int nv, int dk, int dv) {
  extern __shared__ double smem[];
  double* red = smem;                                   // [blockDim.x]
  float* qn = reinterpret_cast<float*>(red + blockDim.x);  // [dk]
  float* kn = qn + dk;                                  // [dk]
  const int h = blockIdx.x, tid = threadIdx.x;
  const int C = 2 * nk * dk + nv * dv, kh = h / (nv / nk);
  const float scale = 1.0f / sqrtf(float(dk));
  float* S = state + int64_t(h) * dk * dv;
  for (int t = 0; t < T; t++) {
    const float* row = qkv + int64_t(t) * C;
    const float qi = tid < dk ? row[int64_t(kh) * dk + tid] : 0.0f;
    const float ki = tid < dk ? row[int64_t(nk + kh) * dk + tid] : 0.0f;
    const double ssq = block_sum_double(double(qi) * qi, red);
    const double ssk = block_sum_double(double(ki) * ki, red);
    if (tid < dk) {
      qn[tid] = (qi * float(1.0 / sqrt(ssq + 1e-6))) * scale;
      kn[tid] = ki * float(1.0 / sqrt(ssk + 1e-6));
    }
    __syncthreads();
    if (tid < dv) {
      const float decay = expf(g[int64_t(t) * nv + h]), bt = beta[int64_t(t) * nv + h];
      float d = 0;
      for (int i = 0; i < dk; i++) {
        const float x = S[int64_t(i) * dv + tid] * decay;
        S[int64_t(i) * dv + tid] = x;
        d = d + kn[i] * x;
      }
      d = (row[int64_t(2 * nk) * dk + int64_t(h) * dv + tid] - d) * bt;
      float acc = 0;
      for (int i = 0; i < dk; i++) {
        const float x = S[int64_t(i) * dv + tid] + kn[i] * d;
        S[int64_t(i) * dv + tid] = x;
        acc = acc + qn[i] * x;
      }
      out[int64_t(t) * nv * dv + int64_t(h) * dv + tid] = acc;
    }
    __syncthreads();  // qn/kn are rewritten by the next token
  }
}

// deltanet_kernel with the column in registers (dk == DK, known when compiling): read once,
// kept over all T tokens, written once; the same operations in the same order.
template <int DK>
__global__ void __launch_bounds__(DK) deltanet_reg_kernel(const float* __restrict__ qkv,
                                                          const float* __restrict__ g,
                                                          const float* __restrict__ beta,
                                                          float* state, float* __restrict__ out,
                                                          int T, int nk, int nv, int dv) {
  __shared__ double red[32];
  __shared__ float qn[DK], kn[DK];
  const int h = blockIdx.x, tid = threadIdx.x;
  const int C = 2 * nk * DK + nv * dv, kh = h / (nv / nk);
  const float scale = 1.0f / sqrtf(float(DK));
  float* S = state + int64_t(h) * DK * dv;
  const bool col_ok = tid < dv;
  float col[DK];
#pragma unroll
  for (int i = 0; i < DK; i++) col[i] = col_ok ? S[int64_t(i) * dv + tid] : 0.0f;
  for (int t = 0; t < T; t++) {
    const float* row = qkv + int64_t(t) * C;
    const float qi = row[int64_t(kh) * DK + tid];
    const float ki = row[int64_t(nk + kh) * DK + tid];
    const double ssq = block_sum_double(double(qi) * qi, red);
    const double ssk = block_sum_double(double(ki) * ki, red);
    qn[tid] = (qi * float(1.0 / sqrt(ssq + 1e-6))) * scale;
    kn[tid] = ki * float(1.0 / sqrt(ssk + 1e-6));
    __syncthreads();
    if (col_ok) {
      const float decay = expf(g[int64_t(t) * nv + h]), bt = beta[int64_t(t) * nv + h];
      float d = 0;
#pragma unroll
      for (int i = 0; i < DK; i++) {
        col[i] = col[i] * decay;
        d = d + kn[i] * col[i];
      }
      d = (row[int64_t(2 * nk) * DK + int64_t(h) * dv + tid] - d) * bt;
      float acc = 0;
#pragma unroll
      for (int i = 0; i < DK; i++) {
        col[i] = col[i] + kn[i] * d;
        acc = acc + qn[i] * col[i];
      }
      out[int64_t(t) * nv * dv + int64_t(h) * dv + tid] = acc;
    }
    __syncthreads();  // qn/kn are rewritten by the next token
  }
  if (col_ok)
#pragma unroll
    for (int i = 0; i < DK; i++) S[int64_t(i) * dv + tid] = col[i];
}

// One block per row: sum of squares in double (fixed tree), then x * inv * w * silu(z).
__global__ void gated_rmsnorm_kernel(float* x, const float* __restrict__ z,
                                     const float* __restrict__ w, int n, float eps) {
  __shared__ double red[256];
  float* xr = x + int64_t(blockIdx.x) * n;
  const float* zr = z + int64_t(blockIdx.x) * n;
  double ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += double(xr[i]) * xr[i];
  ss = block_sum_double(ss, red);
  const float inv = float(1.0 / sqrt(ss / n + eps));
  for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = xr[i] * inv * w[i] * siluf_(zr[i]);
}

}  // namespace

void conv1d_silu(cudaStream_t s, const float* x, float* state, const float* w, float* y, int T,
                 int C, int K) {
  if (C <= 0 || T <= 0) return;
  conv1d_silu_kernel<<<unsigned(ceil_div(C, 128)), 128, 0, s>>>(x, state, w, y, T, C, K);
}

void deltanet_gates(cudaStream_t s, float* a, float* b, const float* A_log, const float* dt_bias,
                    int T, int nv) {
  const int64_t n = int64_t(T) * nv;
  if (n <= 0) return;
  deltanet_gates_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, s>>>(a, b, A_log, dt_bias, n, nv);
}

bool deltanet(cudaStream_t s, const float* qkv, const float* g, const float* beta, float* state,
              float* out, int T, int nk, int nv, int dk, int dv) {
  const int need = dk > dv ? dk : dv;
  if (need > 1024) return false;
  if (T <= 0 || nv <= 0) return true;
  if (dk == 128 && dv <= 128) {  // Qwen3.5 / Qwen3-Next: the column in registers
    deltanet_reg_kernel<128><<<unsigned(nv), 128, 0, s>>>(qkv, g, beta, state, out, T, nk, nv, dv);
    return true;
  }
  int threads = 32;
  while (threads < need) threads *= 2;  // a power of two for the tree sums
  const size_t smem = size_t(threads) * sizeof(double) + 2 * size_t(dk) * sizeof(float);
  deltanet_kernel<<<unsigned(nv), unsigned(threads), smem, s>>>(qkv, g, beta, state, out, T, nk,
                                                                 nv, dk, dv);
  return true;
}

void gated_rmsnorm(cudaStream_t s, float* x, const float* z, const float* w, int rows, int n,
                   float eps) {
  if (rows <= 0) return;
  gated_rmsnorm_kernel<<<unsigned(rows), 256, 0, s>>>(x, z, w, n, eps);
}

bool conv_kernel_supported(int K) { return K >= 1 && K <= kMaxConvK; }

}  // namespace moeflux::cuda
