// Norms, elementwise ops, the router, moe_experts' row moves, the position and the NaN check.
#include "cuda/common.cuh"

namespace moeflux::cuda {

namespace {

// One block per row (norm_threads(n) threads: about two elements each, so a row's loads are
// in flight at once): sum of squares in double in block_sum_double's fixed order.
__global__ void rmsnorm_kernel(const float* x, const float* __restrict__ w, float* y, int n,
                               int stride, float eps) {
  __shared__ double red[32];
  const float* xr = x + int64_t(blockIdx.x) * stride;
  float* yr = y + int64_t(blockIdx.x) * stride;
  double ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += double(xr[i]) * xr[i];
  ss = block_sum_double(ss, red);  // ends with a barrier: x == y is safe below
  const float inv = float(1.0 / sqrt(ss / n + eps));
  for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * (w ? w[i] : 1.0f);
}

// add_kernel then rmsnorm_kernel on the row (the same threads per row): each thread adds the
// elements it then squares.
__global__ void add_rmsnorm_kernel(float* x, const float* __restrict__ d,
                                   const float* __restrict__ w, float* __restrict__ y, int n,
                                   float eps) {
  __shared__ double red[32];
  float* xr = x + int64_t(blockIdx.x) * n;
  const float* dr = d + int64_t(blockIdx.x) * n;
  float* yr = y + int64_t(blockIdx.x) * n;
  double ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i] + dr[i];
    xr[i] = v;
    ss += double(v) * v;
  }
  ss = block_sum_double(ss, red);
  const float inv = float(1.0 / sqrt(ss / n + eps));
  for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * (w ? w[i] : 1.0f);
}

__global__ void add_kernel(float* y, const float* __restrict__ x, size_t n) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void silu_mul_kernel(float* gate, const float* __restrict__ up, size_t n) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) gate[i] = siluf_(gate[i]) * up[i];
}

// The experts' order (cpu_backend.cpp's): best score first, equal scores to the lower index,
// NaN last; -0 and +0 are equal scores. As one integer order: a larger key is better.
__device__ __forceinline__ uint64_t route_key(float s, int e) {
  const uint32_t u = __float_as_uint(s == 0.0f ? 0.0f : s);
  const uint32_t o = isnan(s) ? 0u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(o) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(e));
}

constexpr int kRouteThreads = 256;

// One block per token. The k best are found by rank (how many keys beat each expert's), not
// by k rounds of argmax: one pass, no serial rounds.
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const float* __restrict__ logits, int E, int K, int scoring, bool norm,
                 const float* __restrict__ bias, float scale, int32_t* ids, float* weights) {
  extern __shared__ double rsm[];
  double* prob = rsm;                                            // [E]
  double* red = prob + E;                                        // [threads]
  uint64_t* key = reinterpret_cast<uint64_t*>(red + blockDim.x);  // [E]
  float* bs = reinterpret_cast<float*>(key + E);                  // [threads]
  int* chosen = reinterpret_cast<int*>(bs + blockDim.x);          // [K]
  const int t = blockIdx.x, tid = threadIdx.x;
  const float* lg = logits + int64_t(t) * E;
  double sum = 0;
  if (scoring == 0) {
    float mx = -INFINITY;
    for (int e = tid; e < E; e += blockDim.x) mx = fmaxf(mx, lg[e]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if ((tid & 31) == 0) bs[tid >> 5] = mx;
    __syncthreads();
    for (int w = 1; w < int(blockDim.x >> 5); w++) mx = fmaxf(mx, bs[w]);  // max: any order
    mx = fmaxf(mx, bs[0]);
    __syncthreads();
    double part = 0;
    for (int e = tid; e < E; e += blockDim.x) {
      prob[e] = exp(double(lg[e]) - double(mx));
      part += prob[e];
      key[e] = route_key(lg[e], e);
    }
    sum = block_sum_double(part, red);  // ends with a barrier
  } else {
    for (int e = tid; e < E; e += blockDim.x) {
      prob[e] = 1.0 / (1.0 + exp(-double(lg[e])));
      key[e] = route_key(float(prob[e]) + (bias ? bias[e] : 0.0f), e);
    }
    __syncthreads();
  }
  for (int e = tid; e < E; e += blockDim.x) {
    // Every key counted, four counts side by side: independent loads and short add chains
    // (a count that stopped at k made one long dependent chain of the top experts' warps).
    const uint64_t k = key[e];
    int r0 = 0, r1 = 0, r2 = 0, r3 = 0, e2 = 0;
    for (; e2 + 4 <= E; e2 += 4) {
      r0 += key[e2] > k;
      r1 += key[e2 + 1] > k;
      r2 += key[e2 + 2] > k;
      r3 += key[e2 + 3] > k;
    }
    for (; e2 < E; e2++) r0 += key[e2] > k;
    const int rank = (r0 + r1) + (r2 + r3);
    if (rank < K) chosen[rank] = e;
  }
  __syncthreads();
  if (tid >= K) return;
  double top = 0;
  for (int j = 0; j < K; j++) top += prob[chosen[j]];
  const int e = chosen[tid];
  ids[int64_t(t) * K + tid] = e;
  if (!weights) return;
  const double w = norm ? prob[e] / top : scoring == 0 ? prob[e] / sum : prob[e];
  weights[int64_t(t) * K + tid] = float(w) * scale;
}

__global__ void gather_slot_rows_kernel(const float* __restrict__ src,
                                        const int32_t* __restrict__ slots, int k, int cols,
                                        float* __restrict__ dst) {
  const int r = blockIdx.x;
  const float* s = src + int64_t(slots[r] / k) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[int64_t(r) * cols + c] = s[c];
}

__global__ void scatter_slot_rows_kernel(const float* __restrict__ src,
                                         const int32_t* __restrict__ slots,
                                         const float* __restrict__ weights, int cols,
                                         float* __restrict__ dst) {
  const int r = blockIdx.x, sl = slots[r];
  const float w = weights[sl];
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    dst[int64_t(sl) * cols + c] = src[int64_t(r) * cols + c] * w;
}

__global__ void sum_slots_kernel(const float* __restrict__ slots, int k, int cols,
                                 float* __restrict__ out) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float s = slots[int64_t(t) * k * cols + c];
    for (int j = 1; j < k; j++) s += slots[(int64_t(t) * k + j) * cols + c];
    out[int64_t(t) * cols + c] = s;
  }
}

__global__ void add_gated_rows_kernel(float* out, const float* __restrict__ y,
                                      const float* __restrict__ r, int cols) {
  const int t = blockIdx.x;
  const float gt = r ? sigmoidf_(r[t]) : 1.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = r ? y[int64_t(t) * cols + c] * gt : y[int64_t(t) * cols + c];
    out[int64_t(t) * cols + c] += v;
  }
}

__global__ void set_int_kernel(int* dst, int value) { *dst = value; }

// Each thread notes the first non-finite element of its stride under this check's key; the
// lowest key wins. Skipped once a lower tag holds a result.
__global__ void check_finite_kernel(const float* __restrict__ x, size_t n, unsigned long long base,
                                    NonfiniteFlag* f) {
  if (f->key < base) return;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    if (!isfinite(x[i])) {
      atomicMin(&f->key, base | (unsigned long long)i);
      return;
    }
}

unsigned blocks_for(size_t n, unsigned threads) {
  return unsigned((n + threads - 1) / threads);
}

}  // namespace

// Threads per row of the norms: the order of their sums depends on it, so it depends on n alone.
unsigned norm_threads(int n) {
  const int t = (n / 2 + 31) / 32 * 32;
  return unsigned(t < 32 ? 32 : t > 1024 ? 1024 : t);
}

void rmsnorm(cudaStream_t s, const float* x, const float* w, float* y, int rows, int n,
             int stride, float eps) {
  if (rows <= 0) return;
  rmsnorm_kernel<<<unsigned(rows), norm_threads(n), 0, s>>>(x, w, y, n, stride, eps);
}

void add_rmsnorm(cudaStream_t s, float* x, const float* d, const float* w, float* y, int rows,
                 int n, float eps) {
  if (rows > 0) add_rmsnorm_kernel<<<unsigned(rows), norm_threads(n), 0, s>>>(x, d, w, y, n, eps);
}

void add(cudaStream_t s, float* y, const float* x, size_t n) {
  if (n) add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(y, x, n);
}

void silu_mul(cudaStream_t s, float* gate, const float* up, size_t n) {
  if (n) silu_mul_kernel<<<blocks_for(n, 256), 256, 0, s>>>(gate, up, n);
}

void route(cudaStream_t s, const float* logits, int T, int n_experts, int k, int scoring,
           bool norm_topk_prob, const float* bias, float scale, int32_t* ids, float* weights) {
  if (T <= 0) return;
  const int th = kRouteThreads;
  const size_t smem = size_t(n_experts + th) * sizeof(double) +
                      size_t(n_experts) * sizeof(uint64_t) + size_t(th) * sizeof(float) +
                      size_t(k) * sizeof(int);
  route_kernel<<<unsigned(T), unsigned(th), smem, s>>>(logits, n_experts, k, scoring,
                                                       norm_topk_prob, bias, scale, ids, weights);
}

void gather_slot_rows(cudaStream_t s, const float* src, const int32_t* slots, int n, int k,
                      int cols, float* dst) {
  if (n > 0) gather_slot_rows_kernel<<<unsigned(n), 256, 0, s>>>(src, slots, k, cols, dst);
}

void scatter_slot_rows(cudaStream_t s, const float* src, const int32_t* slots,
                       const float* weights, int n, int cols, float* dst) {
  if (n > 0) scatter_slot_rows_kernel<<<unsigned(n), 256, 0, s>>>(src, slots, weights, cols, dst);
}

void sum_slots(cudaStream_t s, const float* slots, int T, int k, int cols, float* out) {
  if (T > 0) sum_slots_kernel<<<unsigned(T), 256, 0, s>>>(slots, k, cols, out);
}

void add_gated_rows(cudaStream_t s, float* out, const float* y, const float* r, int T,
                    int cols) {
  if (T > 0) add_gated_rows_kernel<<<unsigned(T), 256, 0, s>>>(out, y, r, cols);
}

void set_int(cudaStream_t s, int* dst, int value) { set_int_kernel<<<1, 1, 0, s>>>(dst, value); }

void check_finite(cudaStream_t s, const float* x, size_t n, int tag, NonfiniteFlag* flag) {
  if (!n) return;
  const unsigned blocks = blocks_for(n, 256) < 1024 ? blocks_for(n, 256) : 1024;
  const unsigned long long base = (unsigned long long)(tag + 1) << kNonfiniteIndexBits;
  check_finite_kernel<<<blocks, 256, 0, s>>>(x, n, base, flag);
}

const char* built_architectures() {
#ifdef MOEFLUX_CUDA_ARCHS
  return MOEFLUX_CUDA_ARCHS;
#else
  return "see CMAKE_CUDA_ARCHITECTURES";
#endif
}

}  // namespace moeflux::cuda
