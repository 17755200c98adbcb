// The CUDA backend's kernels behind plain C++ launchers: the .cu files hold nothing but these,
// so nvcc never compiles the engine's headers, and cuda_backend.cpp (host C++) calls them with
// the Context's stream. Every launcher queues work and returns; it throws nothing (launch
// errors are picked up by the caller through cudaGetLastError).
//
// Numerics follow cpu/cpu_backend.cpp, the spec: every kernel is built with --fmad=false (no
// implicit fma, as -ffp-contract=off on the host) and computes each output element in one fixed
// order that depends neither on the launch shape nor on T, so a token's bits are the same
// alone or in a batch, and repeated runs are bit-identical (no float atomics anywhere).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moeflux::cuda {

// Weight element types as the kernels know them.
enum WType : int { kWF32 = 0, kWBF16, kWF16, kWQ8, kWQ4, kWQ2 };

// A row-major [rows, cols] weight matrix in device memory (model.h's Mat, device pointers).
// Quantised: data = packed u32 words [rows, cols*bits/32], scales/biases bf16 [rows,
// cols/group] (format/quant.h).
struct WMat {
  int type = kWF32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  int group = 0;
};

#ifdef __CUDACC__
#define MF_HOST_DEVICE __host__ __device__
#else
#define MF_HOST_DEVICE
#endif

// How the mat-vec reads a row (matvec.cuh), from W alone: the kernels and the host agree.
MF_HOST_DEVICE inline int elements_per_word(int type) {
  switch (type) {
    case kWF32: return 1;
    case kWBF16:
    case kWF16: return 2;
    case kWQ8: return 4;
    case kWQ4: return 8;
    default: return 16;
  }
}
// 16-byte weight loads when every row starts 16-byte aligned and has words for all 32 lanes
// (a property of W alone).
MF_HOST_DEVICE inline bool matvec_vec4(const WMat& W) {
  const int64_t row_words = W.cols / elements_per_word(W.type);
  return row_words % 4 == 0 && row_words >= 4 * 32 &&
         reinterpret_cast<uintptr_t>(W.data) % 16 == 0;
}
// Warps per row: few rows of many words share a row among 4 warps, so small matrices still
// fill the GPU.
MF_HOST_DEVICE inline int matvec_ks(const WMat& W) {
  const int64_t row_words = W.cols / elements_per_word(W.type);
  const int vec = matvec_vec4(W) ? 4 : 1;
  return W.rows <= 4096 && row_words >= 4 * 32 * vec ? 4 : 1;
}

// y[t * y_stride + r] = sum_c W[r, c] x[t * W.cols + c]. One warp per row; each lane sums its
// fixed columns with fmaf in increasing order, then the 32 lane sums go through a fixed
// shuffle tree: the order depends only on W's shape.
void matmul(cudaStream_t s, const WMat& W, const float* x, float* y, int T, int64_t y_stride);
// y[i] = W[i] x for i < n (one token): one launch, each row as matmul computes it.
constexpr int kMatmulNMax = 4;
struct MatmulN {
  WMat W[kMatmulNMax];
  float* y[kMatmulNMax];
  int first_block[kMatmulNMax];  // set by matmul_n
  int n = 0;
};
void matmul_n(cudaStream_t s, const MatmulN& a, const float* x);
// out[t] = W[tokens[t]] (dequantised as format/quant.h's dequantize_row).
void embed(cudaStream_t s, const WMat& E, const int32_t* tokens, int T, float* out);

void rmsnorm(cudaStream_t s, const float* x, const float* w, float* y, int rows, int n,
             int stride, float eps);
// inv_freq: [rot_dim/2] device, computed on the host exactly as the CPU does; pos: device int.
void rope(cudaStream_t s, float* x, int T, int n_heads, int row_stride, int head_stride,
          int rot_dim, const float* inv_freq, const int* pos);
void kv_append(cudaStream_t s, float* cache, const float* src, int T, int row, const int* pos);
// Returns false when head_dim is larger than the kernels support (512). `scratch`: at least
// attention_scratch_floats(T, n_heads, head_dim) floats (split-K partial sums of decode).
bool attention(cudaStream_t s, const float* q, const float* k, const float* v, float* out, int T,
               int n_heads, int n_kv_heads, int head_dim, int q_stride, int q_head_stride,
               int kv_stride, float scale, const int* pos, float* scratch);
size_t attention_scratch_floats(int T, int n_heads, int head_dim);
void mul_sigmoid_gate(cudaStream_t s, float* out, const float* gate, int T, int n_heads, int d,
                      int gate_stride, int gate_head_stride);
// PRECONDITION: conv_kernel_supported(K).
void conv1d_silu(cudaStream_t s, const float* x, float* state, const float* w, float* y, int T,
                 int C, int K);
bool conv_kernel_supported(int K);
void deltanet_gates(cudaStream_t s, float* a, float* b, const float* A_log,
                    const float* dt_bias, int T, int nv);
// Returns false when the shape is beyond the kernel (dk or dv > 1024).
bool deltanet(cudaStream_t s, const float* qkv, const float* g, const float* beta, float* state,
              float* out, int T, int nk, int nv, int dk, int dv);
void gated_rmsnorm(cudaStream_t s, float* x, const float* z, const float* w, int rows, int n,
                   float eps);
void add(cudaStream_t s, float* y, const float* x, size_t n);
// x += d, then y = rmsnorm(x) * w: add then rmsnorm, the same bits, one launch.
void add_rmsnorm(cudaStream_t s, float* x, const float* d, const float* w, float* y, int rows,
                 int n, float eps);
void silu_mul(cudaStream_t s, float* gate, const float* up, size_t n);
// scoring: 0 softmax, 1 sigmoid. weights may be null.
void route(cudaStream_t s, const float* logits, int T, int n_experts, int k, int scoring,
           bool norm_topk_prob, const float* bias, float scale, int32_t* ids, float* weights);

// ---- moe_experts' pieces ---------------------------------------------------------------------
// dst[r] = src[slots[r] / k] for r < n (rows of `cols` floats): the tokens of an expert's slots.
void gather_slot_rows(cudaStream_t s, const float* src, const int32_t* slots, int n, int k,
                      int cols, float* dst);
// dst[slots[r]] = src[r] * weights[slots[r]] for r < n.
void scatter_slot_rows(cudaStream_t s, const float* src, const int32_t* slots,
                       const float* weights, int n, int cols, float* dst);
// out[t] = slots[t, 0] + ... + slots[t, k-1], added in that order.
void sum_slots(cudaStream_t s, const float* slots, int T, int k, int cols, float* out);
// out[t] += y[t] * sigmoid(r[t]) (r null: out[t] += y[t]).
void add_gated_rows(cudaStream_t s, float* out, const float* y, const float* r, int T, int cols);

// ---- moe_experts with every expert resident (moe.cu) -------------------------------------------
struct ExpertMats {
  WMat gate, up, down;
};
struct MoeDirect {
  const ExpertMats* experts = nullptr;  // [E], device memory
  int E = 0;
  // Every expert's gate and up have this type, group and matvec_vec4; every down likewise.
  int gate_up_type = 0, down_type = 0;
  bool gate_up_vec4 = false, down_vec4 = false;
  ExpertMats first;  // expert 0's matrices (host copy: their form stands for every expert's)
  const int32_t* ids = nullptr;    // [T, K]
  const float* weights = nullptr;  // [T, K]
  const float* xn = nullptr;       // [T, H]
  int T = 0, K = 0, H = 0, I = 0;
  WMat sh_gate, sh_up, sh_down, sh_router;  // the shared expert when S > 0
  int S = 0;
  bool has_router = false;
  float* h = nullptr;    // scratch [T*K, I]
  float* hs = nullptr;   // scratch [T, S]
  float* ysh = nullptr;  // scratch [T, H]
  float* r = nullptr;    // scratch [T]
  float* out = nullptr;  // [T, H]
  // moe_grouped only:
  int32_t* offsets = nullptr;  // scratch [E + 1]
  int32_t* list = nullptr;     // scratch [T * K]
  float* slots = nullptr;      // scratch [T * K, H]
  float* hs_up = nullptr;      // scratch [T, S]
  bool fuse_shared = false;    // set by moe_direct
};
// out[t] = sum over j of weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, j],
// plus the shared expert's gated output, with no host wait. The same bits as the grouped path
// (per-expert matmul, silu_mul, scatter_slot_rows, sum_slots, add_gated_rows). An id outside
// [0, E) (never from route) makes its token's rows NaN. Returns false, launching nothing, when
// the shared expert's gate and up differ in type or load width (the grouped path then runs).
bool moe_direct(cudaStream_t s, const MoeDirect& a);
// The same sums for many slots: the slots grouped by expert on the device, then each expert's
// weights read once per 4 of its slots; no host wait. The same bits as moe_direct and the
// grouped path, and the same refusal.
bool moe_grouped(cudaStream_t s, const MoeDirect& a);

// ---- position and checks ---------------------------------------------------------------------
void set_int(cudaStream_t s, int* dst, int value);
// The NaN check's result: (tag + 1) << 40 | index of the first non-finite element under the
// lowest tag noted (tags rise within an evaluation), all ones when none. One kernel per check:
// an integer atomicMin, exact and so deterministic.
struct NonfiniteFlag {
  unsigned long long key;
};
constexpr int kNonfiniteIndexBits = 40;
void check_finite(cudaStream_t s, const float* x, size_t n, int tag, NonfiniteFlag* flag);

// The kernels' build targets as text ("sm_80 sm_90a"), for error messages.
const char* built_architectures();

}  // namespace moeflux::cuda
