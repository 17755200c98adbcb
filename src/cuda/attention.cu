// Full attention: partial RoPE, the KV append and causal GQA softmax attention, all reading the
// position from device memory (Context::set_pos) so a captured graph replays at any position.
#include "cuda/common.cuh"

namespace moeflux::cuda {

namespace {

// One thread per (t, head, i < rot_dim/2). As cpu_backend.cpp: f32 inverse frequency (from
// the host, same bits as the CPU's) times an f32 position, cos/sin in double, rounded once.
__global__ void rope_kernel(float* x, int T, int n_heads, int row_stride, int head_stride,
                            int half, const float* __restrict__ inv_freq, const int* pos) {
  const int i = threadIdx.x, h = blockIdx.y, t = blockIdx.x;
  if (i >= half) return;
  const float ang = inv_freq[i] * float(*pos + t);
  const float cs = float(cos(double(ang))), sn = float(sin(double(ang)));
  float* v = x + int64_t(t) * row_stride + int64_t(h) * head_stride;
  const float a = v[i], b = v[i + half];
  v[i] = a * cs - b * sn;
  v[i + half] = b * cs + a * sn;
}

__global__ void kv_append_kernel(float* cache, const float* __restrict__ src, int64_t n,
                                 int row, const int* pos) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) cache[int64_t(*pos) * row + i] = src[i];
}

constexpr int kAttnWarps = 4;

// The order of the sums: the positions [0, n) of a query (n = pos + t + 1) fall in chunks of
// kAttnChunk; chunk c belongs to split c % kAttnSplits. Inside a chunk, warp w takes positions
// w, w+4, ... in two passes (the max of the scores, then exp, the sum and the weighted values)
// and the warps' results are combined in warp order; a split merges its chunks in increasing
// order into a running (max, sum, values) by rescaling; the splits are merged in split order;
// the output is values / sum. All of it depends only on n, never on T or on which of the two
// launch forms ran: decode (few tokens) gives each split a block and merges the splits in a
// second kernel; a batch runs the splits one after another in one block per (head, token).
constexpr int kAttnChunk = 256;
constexpr int kAttnSplits = 32;
constexpr int kAttnSplitMaxT = 4;  // tokens up to which decode's form runs

// A (max, sum, values) triple: lane l of warp 0 keeps dims l, l+32, ... in o.
template <int DPL>
struct Acc {
  float m, l, o[DPL];
  bool any;
};

template <int DPL>
__device__ __forceinline__ void merge(Acc<DPL>& a, float m, float l, const float* o) {
  if (!a.any) {
    a.m = m, a.l = l, a.any = true;
#pragma unroll
    for (int i = 0; i < DPL; i++) a.o[i] = o[i];
    return;
  }
  const float mm = fmaxf(a.m, m), ea = expf(a.m - mm), eb = expf(m - mm);
  a.l = a.l * ea + l * eb;
#pragma unroll
  for (int i = 0; i < DPL; i++) a.o[i] = a.o[i] * ea + o[i] * eb;
  a.m = mm;
}

template <int DPL>
struct AttnSmem {
  float red_max[kAttnWarps], red_sum[kAttnWarps];
  float red_o[kAttnWarps][32 * DPL];
};

// Chunk [j0, j1) of query (h, t) merged into warp 0's `acc` (every warp calls it).
template <int DPL>
__device__ void attend_chunk(const float* qr, const float* __restrict__ k,
                             const float* __restrict__ v, int kvh, int d, int kv_stride,
                             float scale, int j0, int j1, AttnSmem<DPL>& sm, Acc<DPL>& acc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  auto score = [&](int j) {
    const float* kv = k + int64_t(j) * kv_stride + int64_t(kvh) * d;
    float s = 0;
#pragma unroll
    for (int i = 0; i < DPL; i++)
      if (lane + 32 * i < d) s = fmaf(qr[i], kv[lane + 32 * i], s);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s * scale;
  };
  float mx = -INFINITY;
  for (int j = j0 + warp; j < j1; j += kAttnWarps) mx = fmaxf(mx, score(j));
  if (lane == 0) sm.red_max[warp] = mx;
  __syncthreads();
  mx = sm.red_max[0];
#pragma unroll
  for (int w = 1; w < kAttnWarps; w++) mx = fmaxf(mx, sm.red_max[w]);
  float sum = 0, o[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) o[i] = 0.0f;
  for (int j = j0 + warp; j < j1; j += kAttnWarps) {
    const float p = expf(score(j) - mx);
    sum += p;
    const float* vv = v + int64_t(j) * kv_stride + int64_t(kvh) * d;
#pragma unroll
    for (int i = 0; i < DPL; i++)
      if (lane + 32 * i < d) o[i] = fmaf(p, vv[lane + 32 * i], o[i]);
  }
  if (lane == 0) sm.red_sum[warp] = sum;
#pragma unroll
  for (int i = 0; i < DPL; i++) sm.red_o[warp][lane + 32 * i] = o[i];
  __syncthreads();
  if (warp == 0) {
    float total = sm.red_sum[0];
#pragma unroll
    for (int w = 1; w < kAttnWarps; w++) total += sm.red_sum[w];
    float oc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) {
      float a = sm.red_o[0][lane + 32 * i];
#pragma unroll
      for (int w = 1; w < kAttnWarps; w++) a += sm.red_o[w][lane + 32 * i];
      oc[i] = a;
    }
    merge(acc, mx, total, oc);
  }
  __syncthreads();  // the shared sums are free for the next chunk
}

// Split p of query (h, t): its chunks p, p + kAttnSplits, ... merged in order.
template <int DPL>
__device__ void attend_split(const float* qr, const float* k, const float* v, int kvh, int d,
                             int kv_stride, float scale, int n, int p, AttnSmem<DPL>& sm,
                             Acc<DPL>& acc) {
  acc.any = false;
  for (int c = p; c * kAttnChunk < n; c += kAttnSplits)
    attend_chunk<DPL>(qr, k, v, kvh, d, kv_stride, scale, c * kAttnChunk,
                      min(n, (c + 1) * kAttnChunk), sm, acc);
}

template <int DPL>
__device__ void load_q(const float* q, int t, int h, int d, int q_stride, int q_head_stride,
                       float* qr) {
  const int lane = threadIdx.x & 31;
  const float* qv = q + int64_t(t) * q_stride + int64_t(h) * q_head_stride;
#pragma unroll
  for (int i = 0; i < DPL; i++) qr[i] = lane + 32 * i < d ? qv[lane + 32 * i] : 0.0f;
}

template <int DPL>
__device__ void write_out(const Acc<DPL>& a, float* out, int t, int h, int n_heads, int d) {
  const int lane = threadIdx.x & 31;
  const float inv = 1.0f / a.l;
  float* dst = out + int64_t(t) * n_heads * d + int64_t(h) * d;
#pragma unroll
  for (int i = 0; i < DPL; i++)
    if (lane + 32 * i < d) dst[lane + 32 * i] = a.o[i] * inv;
}

// A batch: one block per (head, token), the splits in order.
template <int DPL>  // dims per lane: head_dim <= 32 * DPL
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention_kernel(const float* __restrict__ q, const float* __restrict__ k,
                     const float* __restrict__ v, float* __restrict__ out, int n_heads, int group,
                     int d, int q_stride, int q_head_stride, int kv_stride, float scale,
                     const int* pos) {
  const int h = blockIdx.x, t = blockIdx.y, kvh = h / group;
  const int n = *pos + t + 1;
  __shared__ AttnSmem<DPL> sm;
  float qr[DPL];
  load_q<DPL>(q, t, h, d, q_stride, q_head_stride, qr);
  Acc<DPL> total, part;
  total.any = false;
  for (int p = 0; p < kAttnSplits && p * kAttnChunk < n; p++) {
    attend_split<DPL>(qr, k, v, kvh, d, kv_stride, scale, n, p, sm, part);
    if ((threadIdx.x >> 5) == 0) merge(total, part.m, part.l, part.o);
  }
  if ((threadIdx.x >> 5) == 0) write_out(total, out, t, h, n_heads, d);
}

// Decode: block (head, token, split) writes its split's triple to `part` ([n_heads, T,
// kAttnSplits] of (m, l, o[d])); splits with no chunk write nothing.
template <int DPL>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention_split_kernel(const float* __restrict__ q, const float* __restrict__ k,
                           const float* __restrict__ v, float* __restrict__ part, int n_heads,
                           int group, int d, int q_stride, int q_head_stride, int kv_stride,
                           float scale, const int* pos) {
  const int h = blockIdx.x, t = blockIdx.y, p = blockIdx.z, kvh = h / group;
  const int n = *pos + t + 1;
  if (p * kAttnChunk >= n) return;
  __shared__ AttnSmem<DPL> sm;
  float qr[DPL];
  load_q<DPL>(q, t, h, d, q_stride, q_head_stride, qr);
  Acc<DPL> a;
  attend_split<DPL>(qr, k, v, kvh, d, kv_stride, scale, n, p, sm, a);
  if ((threadIdx.x >> 5) != 0) return;
  const int lane = threadIdx.x & 31;
  float* dst = part + ((int64_t(h) * gridDim.y + t) * kAttnSplits + p) * (2 + 32 * DPL);
  if (lane == 0) dst[0] = a.m, dst[1] = a.l;
#pragma unroll
  for (int i = 0; i < DPL; i++) dst[2 + lane + 32 * i] = a.o[i];
}

// Decode's second step: one warp per (head, token) merges the splits in order.
template <int DPL>
__global__ void attention_merge_kernel(const float* __restrict__ part, float* __restrict__ out,
                                       int n_heads, int T, int d, const int* pos) {
  const int h = blockIdx.x, t = blockIdx.y, lane = threadIdx.x;
  const int n = *pos + t + 1;
  Acc<DPL> total;
  total.any = false;
  for (int p = 0; p < kAttnSplits && p * kAttnChunk < n; p++) {
    const float* src = part + ((int64_t(h) * T + t) * kAttnSplits + p) * (2 + 32 * DPL);
    float o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) o[i] = src[2 + lane + 32 * i];
    merge(total, src[0], src[1], o);
  }
  write_out(total, out, t, h, n_heads, d);
}

__global__ void mul_sigmoid_gate_kernel(float* out, const float* __restrict__ gate, int n_heads,
                                        int d, int gate_stride, int gate_head_stride) {
  const int t = blockIdx.y;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_heads * d; i += gridDim.x * blockDim.x) {
    const int h = i / d, c = i % d;
    out[int64_t(t) * n_heads * d + i] *=
        sigmoidf_(gate[int64_t(t) * gate_stride + int64_t(h) * gate_head_stride + c]);
  }
}

}  // namespace

void rope(cudaStream_t s, float* x, int T, int n_heads, int row_stride, int head_stride,
          int rot_dim, const float* inv_freq, const int* pos) {
  const int half = rot_dim / 2;
  if (T <= 0 || n_heads <= 0 || half <= 0) return;
  rope_kernel<<<dim3(unsigned(T), unsigned(n_heads)), unsigned((half + 31) / 32 * 32), 0, s>>>(
      x, T, n_heads, row_stride, head_stride, half, inv_freq, pos);
}

void kv_append(cudaStream_t s, float* cache, const float* src, int T, int row, const int* pos) {
  const int64_t n = int64_t(T) * row;
  if (n <= 0) return;
  kv_append_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, s>>>(cache, src, n, row, pos);
}

size_t attention_scratch_floats(int T, int n_heads, int head_dim) {
  if (T > kAttnSplitMaxT) return 0;
  const int dpl = head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : head_dim <= 256 ? 8 : 16;
  return size_t(n_heads) * T * kAttnSplits * (2 + 32 * dpl);
}

bool attention(cudaStream_t s, const float* q, const float* k, const float* v, float* out, int T,
               int n_heads, int n_kv_heads, int head_dim, int q_stride, int q_head_stride,
               int kv_stride, float scale, const int* pos, float* scratch) {
  if (T <= 0) return true;
  const int group = n_heads / n_kv_heads;
  const bool split = T <= kAttnSplitMaxT;
#define MF_ATTN(DPL)                                                                            \
  if (split) {                                                                                  \
    attention_split_kernel<DPL>                                                                 \
        <<<dim3(unsigned(n_heads), unsigned(T), kAttnSplits), kAttnWarps * 32, 0, s>>>(         \
            q, k, v, scratch, n_heads, group, head_dim, q_stride, q_head_stride, kv_stride,     \
            scale, pos);                                                                        \
    attention_merge_kernel<DPL><<<dim3(unsigned(n_heads), unsigned(T)), 32, 0, s>>>(            \
        scratch, out, n_heads, T, head_dim, pos);                                               \
  } else {                                                                                      \
    attention_kernel<DPL><<<dim3(unsigned(n_heads), unsigned(T)), kAttnWarps * 32, 0, s>>>(     \
        q, k, v, out, n_heads, group, head_dim, q_stride, q_head_stride, kv_stride, scale,      \
        pos);                                                                                   \
  }
  if (head_dim <= 64) {
    MF_ATTN(2)
  } else if (head_dim <= 128) {
    MF_ATTN(4)
  } else if (head_dim <= 256) {
    MF_ATTN(8)
  } else if (head_dim <= 512) {
    MF_ATTN(16)
  } else {
    return false;
  }
#undef MF_ATTN
  return true;
}

void mul_sigmoid_gate(cudaStream_t s, float* out, const float* gate, int T, int n_heads, int d,
                      int gate_stride, int gate_head_stride) {
  if (T <= 0) return;
  mul_sigmoid_gate_kernel<<<dim3(unsigned(ceil_div(int64_t(n_heads) * d, 256)), unsigned(T)), 256,
                            0, s>>>(out, gate, n_heads, d, gate_stride, gate_head_stride);
}

}  // namespace moeflux::cuda
