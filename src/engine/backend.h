// The backend boundary (DESIGN.md §3): every numeric operation of the forward pass. The
// engine (engine/forward.cpp) holds no arithmetic of its own; a backend owns the memory that
// activations and state live in (host RAM for CPU, device memory for CUDA) and implements
// these ops. CPU and CUDA implement the same signatures so tests can compare them op by op.
//
// Conventions: activations are row-major f32 `[T, n]` (T tokens); pointers marked "backend
// memory" come from Backend::alloc. Weights (Mat, const float*) point into the package mapping
// or into expert buffers from the ExpertStore.
// Determinism: every op computes each output element in one fixed order whatever the thread
// count, and each op gives the same bits for a token whether it runs alone or in a batch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "model/model.h"

namespace moeflux {

struct AttentionParams {
  int n_heads, n_kv_heads, head_dim;
  int q_stride;       // floats between consecutive tokens' q rows
  int q_head_stride;  // floats between consecutive heads inside a q row
  int kv_stride;      // floats between positions in the caches (n_kv_heads * head_dim)
  float scale;
};

struct DeltaNetParams {
  int k_heads, v_heads, k_dim, v_dim;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int threads() const = 0;

  // Memory.
  virtual float* alloc(size_t n) = 0;  // n floats, zeroed
  virtual void release(float* p) = 0;
  virtual void upload(float* dst, const float* host, size_t n) = 0;
  virtual void download(float* host, const float* src, size_t n) = 0;
  virtual void copy(float* dst, const float* src, size_t n) = 0;

  // out[t] = E[tokens[t]]                                  out: [T, E.cols]
  virtual void embed(const Mat& E, const int32_t* tokens, int T, float* out) = 0;
  // y[t, r] = sum_c W[r, c] * x[t, c]                      x: [T, W.cols]  y: [T, W.rows]
  virtual void matmul(const Mat& W, const float* x, float* y, int T) = 0;
  // For each of `rows` rows of n floats at `stride`: y = x * rsqrt(mean(x^2) + eps) * w
  // (w null: no weight, 1). x == y allowed; floats between rows are not written.
  virtual void rmsnorm(const float* x, const float* w, float* y, int rows, int n, int stride,
                       float eps) = 0;
  // rotate-half RoPE on the first rot_dim dims of each head; x [T, row_stride], heads of
  // head_dim at head_stride; token t sits at position pos0 + t.
  virtual void rope(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
                    int pos0, double theta) = 0;
  // Causal attention of T queries at positions pos0.. over cache positions [0, pos0 + t].
  // k, v: [ctx, kv_stride]; out: [T, n_heads * head_dim].
  virtual void attention(const float* q, const float* k, const float* v, float* out, int T,
                         int pos0, const AttentionParams& p) = 0;
  // out[t, h*d + i] *= sigmoid(gate[t * gate_stride + h * gate_head_stride + i]).
  virtual void mul_sigmoid_gate(float* out, const float* gate, int T, int n_heads, int d,
                                int gate_stride, int gate_head_stride) = 0;

  // Causal depthwise conv over time + SiLU. x: [T, C]; state: [K-1, C] (the previous K-1
  // inputs, oldest first), updated; w: [C, K]; y: [T, C].
  virtual void conv1d_silu(const float* x, float* state, const float* w, float* y, int T, int C,
                           int K) = 0;
  // g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), in place on a [T, nv] and
  // b [T, nv].
  virtual void deltanet_gates(float* a, float* b, const float* A_log, const float* dt_bias, int T,
                              int nv) = 0;
  // Gated delta rule over T tokens. qkv: [T, 2*nk*dk + nv*dv] (conv output), g/beta: [T, nv],
  // state: [nv, dk, dv] updated; out: [T, nv*dv]. q and k are L2-normalised per head inside
  // and q scaled by 1/sqrt(dk).
  virtual void deltanet(const float* qkv, const float* g, const float* beta, float* state,
                        float* out, int T, const DeltaNetParams& p) = 0;
  // The same gated delta rule by the chunked (WY) form, `chunk` tokens at a time (the UT
  // transform of HF's torch_chunk_gated_delta_rule; cpu/deltanet.h): same arguments and result
  // as deltanet up to float rounding, NOT bit-identical to it (sums run in another order).
  virtual void deltanet_chunked(const float* qkv, const float* g, const float* beta,
                                float* state, float* out, int T, const DeltaNetParams& p,
                                int chunk) = 0;
  // x[r] = rms(x[r]) * w * silu(z[r]) for rows of n.
  virtual void gated_rmsnorm(float* x, const float* z, const float* w, int rows, int n,
                             float eps) = 0;

  // y += x (n floats).
  virtual void add(float* y, const float* x, size_t n) = 0;
  // gate = silu(gate) * up, n floats.
  virtual void silu_mul(float* gate, const float* up, size_t n) = 0;
  // dst[i] = src[idx[i]] rows of n floats (idx in host memory).
  virtual void gather_rows(const float* src, const int32_t* idx, int rows, int n, float* dst) = 0;
  // dst[idx[i]] = src[i] * scale[i] rows of n floats (idx, scale in host memory).
  virtual void scatter_rows_scaled(const float* src, const int32_t* idx, const float* scale,
                                   int rows, int n, float* dst) = 0;
  // out[t] = sum_j slots[t * k + j] for j = 0..k-1, in that order.       slots: [T*k, n]
  virtual void sum_slots(const float* slots, int T, int k, int n, float* out) = 0;
  // y[t] *= sigmoid(s[t]) for rows of n.                                   s: [T]
  virtual void scale_rows_sigmoid(float* y, const float* s, int T, int n) = 0;

  // Checks. The index of the first NaN/Inf among x[0..n), or n when all are finite. Read-only
  // and cheap (one pass, no arithmetic on the values): the engine runs it on the residual
  // stream after every layer.
  virtual size_t first_nonfinite(const float* x, size_t n) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int threads);

// Which backend a front end asked for (--backend, mf_model_params::backend).
enum class BackendKind { kAuto, kCpu, kCuda };
// Parses "auto", "cpu", "cuda"; an error names `what` (the flag) and the choices.
BackendKind parse_backend_kind(const std::string& text, const std::string& what);
const char* backend_kind_name(BackendKind kind);
// Fails with one clear line when `kind` cannot run here (this build has no CUDA backend yet);
// kAuto resolves to what runs. Front ends call it before loading anything.
BackendKind resolve_backend_kind(BackendKind kind);
// The backend of `kind` (resolved) with `threads` CPU threads (0: one per core).
std::unique_ptr<Backend> make_backend(BackendKind kind, int threads);

}  // namespace moeflux
