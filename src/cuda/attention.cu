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

// One block per (head, token): warp w takes cache positions w, w+4, ...; lane l holds dims
// l, l+32, ... of q and of its output sums. Two passes (the max of the scores, then exp, the
// sum and the weighted values), the four warps' partial sums combined in warp order: a fixed
// order that depends only on the position.
// TODO(perf): decode over a long context wants split-K across blocks; prefill a flash kernel.
template <int DPL>  // dims per lane: head_dim <= 32 * DPL
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention_kernel(const float* __restrict__ q, const float* __restrict__ k,
                     const float* __restrict__ v, float* __restrict__ out, int n_heads, int group,
                     int d, int q_stride, int q_head_stride, int kv_stride, float scale,
                     const int* pos) {
  const int h = blockIdx.x, t = blockIdx.y, kvh = h / group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = *pos + t + 1;
  const float* qv = q + int64_t(t) * q_stride + int64_t(h) * q_head_stride;
  float qr[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) qr[i] = lane + 32 * i < d ? qv[lane + 32 * i] : 0.0f;
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
  __shared__ float red_max[kAttnWarps], red_sum[kAttnWarps];
  __shared__ float red_o[kAttnWarps][32 * DPL];
  float mx = -INFINITY;
  for (int j = warp; j < n; j += kAttnWarps) mx = fmaxf(mx, score(j));
  if (lane == 0) red_max[warp] = mx;
  __syncthreads();
  mx = red_max[0];
#pragma unroll
  for (int w = 1; w < kAttnWarps; w++) mx = fmaxf(mx, red_max[w]);
  float sum = 0, o[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) o[i] = 0.0f;
  for (int j = warp; j < n; j += kAttnWarps) {
    const float p = expf(score(j) - mx);
    sum += p;
    const float* vv = v + int64_t(j) * kv_stride + int64_t(kvh) * d;
#pragma unroll
    for (int i = 0; i < DPL; i++)
      if (lane + 32 * i < d) o[i] = fmaf(p, vv[lane + 32 * i], o[i]);
  }
  if (lane == 0) red_sum[warp] = sum;
#pragma unroll
  for (int i = 0; i < DPL; i++) red_o[warp][lane + 32 * i] = o[i];
  __syncthreads();
  if (warp != 0) return;
  float total = red_sum[0];
#pragma unroll
  for (int w = 1; w < kAttnWarps; w++) total += red_sum[w];
  const float inv = 1.0f / total;
  float* dst = out + int64_t(t) * n_heads * d + int64_t(h) * d;
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    const int c = lane + 32 * i;
    if (c >= d) continue;
    float acc = red_o[0][c];
#pragma unroll
    for (int w = 1; w < kAttnWarps; w++) acc += red_o[w][c];
    dst[c] = acc * inv;
  }
}

__global__ void mul_sigmoid_gate_kernel(float* out, const float* __restrict__ gate, int n_heads,
                                        int d, int gate_stride, int gate_head_stride) {
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i < n_heads * d; i += blockDim.x) {
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

bool attention(cudaStream_t s, const float* q, const float* k, const float* v, float* out, int T,
               int n_heads, int n_kv_heads, int head_dim, int q_stride, int q_head_stride,
               int kv_stride, float scale, const int* pos) {
  if (T <= 0) return true;
  const dim3 grid{unsigned(n_heads), unsigned(T)}, block{kAttnWarps * 32};
  const int group = n_heads / n_kv_heads;
#define MF_ATTN(DPL)                                                                      \
  attention_kernel<DPL><<<grid, block, 0, s>>>(q, k, v, out, n_heads, group, head_dim,    \
                                               q_stride, q_head_stride, kv_stride, scale, \
                                               pos)
  if (head_dim <= 64)
    MF_ATTN(2);
  else if (head_dim <= 128)
    MF_ATTN(4);
  else if (head_dim <= 256)
    MF_ATTN(8);
  else if (head_dim <= 512)
    MF_ATTN(16);
  else
    return false;
#undef MF_ATTN
  return true;
}

void mul_sigmoid_gate(cudaStream_t s, float* out, const float* gate, int T, int n_heads, int d,
                      int gate_stride, int gate_head_stride) {
  if (T <= 0) return;
  mul_sigmoid_gate_kernel<<<unsigned(T), 256, 0, s>>>(out, gate, n_heads, d, gate_stride,
                                                      gate_head_stride);
}

}  // namespace moeflux::cuda
