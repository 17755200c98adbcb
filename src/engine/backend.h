// The backend boundary (DESIGN.md §3; docs/2026-12-03-backend-boundary.md): every numeric
// operation of the forward pass, in two parts.
//
//  * Device: one per process, shared by every session, C API model and server slot. It binds a
//    loaded Model once (its resident weights as the device's ops read them, in the LayerWeights
//    shape), provides the memory expert-cache slots live in, and makes Contexts.
//  * Context: one per session (one per thread using it). Its queue (CUDA: a stream), the
//    memory it hands out (KV, recurrent state, checkpoints, the session's workspace), the
//    current position, and the ops. Ops run in the order they are called; on a device backend
//    they are queued and return at once, and only download(), sync() and take_nonfinite()
//    wait.
//
// Conventions: activations are row-major f32 `[T, n]` (T tokens). "Context memory" is memory
// from Context::alloc; weights (Mat, const float*) come from Device::bind or from expert slots
// in Device::expert_memory(). Nothing an op reads or writes is host memory unless it says so.
// Determinism: every op computes each output element in one fixed order whatever the thread
// count, and each op gives the same bits for a token whether it runs alone or in a batch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "model/model.h"

namespace moeflux {

class Context;
class Device;

struct AttentionParams {
  int n_heads, n_kv_heads, head_dim;  // head_dim: of q and k
  int q_stride;       // floats between consecutive tokens' q rows
  int q_head_stride;  // floats between consecutive heads inside a q row
  int kv_stride;      // floats between positions in the caches (n_kv_heads * head_dim)
  float scale;
  // Values of another width than the keys (MLA's absorbed form attends over [latent | rope key]
  // rows and takes the latent alone as the value: v_dim = kv_lora_rank, v == k): v_dim floats
  // per kv head, v_stride floats between positions of v. 0: head_dim and kv_stride.
  int v_dim = 0;
  int v_stride = 0;
  // gpt-oss. sinks: [n_heads] context memory, or null: head h's softmax also holds the logit
  // sinks[h] (no value), i.e. with m = max(scores, sinks[h]) the weights are
  // exp(s_j - m) / (sum_j exp(s_j - m) + exp(sinks[h] - m)). window > 0: the query at position
  // p sees cache positions (p - window, p] only (a sliding-window layer); 0: [0, p].
  const float* sinks = nullptr;
  int window = 0;
};

struct DeltaNetParams {
  int k_heads, v_heads, k_dim, v_dim;
};

// How router logits become expert choices.
enum class RouteScoring : uint8_t {
  kSoftmax,  // p = softmax(logits) over all experts; top-k of p
  kSigmoid,  // p = sigmoid(logits); top-k of p + bias (bias only chooses, DeepSeek-V3)
};

// Group-limited selection (DeepSeek-V3, n_group > 1): the experts fall into n_group groups of
// n_experts / n_group consecutive ids; a group's score is the sum of its two best selection
// scores (p + bias); the topk_group best groups are kept (equal scores to the lower group, NaN
// last) and the top-k is taken among their experts only. n_group = topk_group = 1: all experts.
struct RouteParams {
  int n_experts = 0, k = 0;
  RouteScoring scoring = RouteScoring::kSoftmax;
  bool norm_topk_prob = true;   // weights = p / sum of the k chosen p (else p as is)
  const float* bias = nullptr;  // kSigmoid: [n_experts] selection bias (device memory) or null
  float scale = 1.0f;           // weights *= scale (routed_scaling_factor)
  int n_group = 1, topk_group = 1;
};

struct MoeParams {
  int T = 0, k = 0;       // tokens, experts per token
  int hidden = 0, inter = 0;
  // gpt-oss. Per-expert biases (context memory, rows indexed by expert id, or null):
  // gate += gate_bias[e], up += up_bias[e] after their products, down's output += down_bias[e]
  // before the routing weight. swiglu_limit > 0: the activation is
  // (clamp(up, -limit, limit) + 1) * g * sigmoid(swiglu_alpha * g), g = min(gate, limit),
  // instead of silu(gate) * up.
  const float* gate_bias = nullptr;  // [n_experts, inter]
  const float* up_bias = nullptr;    // [n_experts, inter]
  const float* down_bias = nullptr;  // [n_experts, hidden]
  float swiglu_limit = 0.0f, swiglu_alpha = 0.0f;
};

// The shared expert of a MoE layer (Qwen2-MoE style): y = sigmoid(router·x) · down(silu(gate
// x) * up x), added to the routed sum. Null mats: no shared expert.
struct SharedExpert {
  const Mat* gate = nullptr;
  const Mat* up = nullptr;
  const Mat* down = nullptr;
  const Mat* router = nullptr;  // [1, hidden] f32, or null: no gate
  int inter = 0;
};

// The routed experts one MoE layer needs for a micro-batch, as they become readable by the
// device (ExpertBatch adapts to it): the op takes them in arrival order, so compute on the
// first overlaps the reads of the rest.
class ExpertSource {
 public:
  virtual ~ExpertSource() = default;
  virtual size_t size() const = 0;    // distinct experts
  virtual int id(size_t i) const = 0;  // expert id of request i
  // The next request to become readable (each index once); blocks until then; throws Error
  // if its read failed.
  virtual size_t next() = 0;
  virtual const ExpertWeights& weights(size_t i) const = 0;  // after next() returned i
  // Every expert of the layer resident for good (ExpertStore::load_all): size() is the layer's
  // expert count, id(i) == i, next() never waits, and weights(e) is expert e's. A device
  // backend may then read the ids where route left them, with no host round trip.
  virtual bool all_resident() const { return false; }
};

// Memory for the ExpertStore's cache slots, provided by the device: host memory (transparent
// huge pages) on the CPU, device memory on CUDA. Expert files are read into host-visible
// memory directly; into other memory through a host staging buffer and write().
class ExpertMemory {
 public:
  virtual ~ExpertMemory() = default;
  virtual Device& device() = 0;  // whose ops read it
  // `bytes` of slot memory (committed as it is first written where the device allows);
  // throws Error kOutOfMemory saying what was asked and what is free.
  virtual uint8_t* alloc(size_t bytes) = 0;
  virtual void release(uint8_t* p, size_t bytes) = 0;
  virtual bool host_visible() const = 0;
  // Copies n bytes of host memory into slot memory; complete when it returns.
  virtual void write(uint8_t* dst, const uint8_t* host, size_t n) = 0;
  // Host memory that write() copies from fastest, for the store's staging buffers and its
  // host tier when the slots are not host-visible (on a GPU: page-locked memory, so that a
  // copy is one DMA at the link's speed; the CUDA device does not override it yet). Aligned
  // to 4 KiB; throws Error kOutOfMemory naming `what`. The default is plain aligned memory.
  virtual uint8_t* host_alloc(size_t bytes, const char* what);
  virtual void host_release(uint8_t* p, size_t bytes);
};

// How a new context computes.
struct ContextOptions {
  int threads = 0;  // CPU threads for its ops (0: one per core)
  // true: f32 activations throughout (cpu/matmul.h), what the oracle tests check. false
  // (--int8): the CPU multiplies quantised (q8/q4/q2) weights by activations quantised to int8
  // per 32 columns (cpu/qdot.h; each output still one fixed sequence of operations, so results
  // stay bit-identical across thread counts, batch shapes, cache and prefetch, but differ from
  // the exact path within the quantised tolerance; lm_head and the attention / linear
  // attention output projections stay exact, Context::matmul_exact). Exact stays the default of
  // every front end: int8 prefill is ~2x faster, decode not yet (docs/2026-12-03-cpu-int8.md).
  // The CUDA backend is exact either way.
  bool exact = true;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual const char* name() const = 0;
  // The model's weights as this device's ops read them: made once per Model and shared by
  // every caller while any holds it (CPU: views of the Model's own memory, nothing copied;
  // CUDA: uploaded once). The Model must outlive the returned weights. Thread-safe.
  virtual std::shared_ptr<const ModelWeights> bind(const Model& model) = 0;
  virtual ExpertMemory& expert_memory() = 0;
  // A new context; `threads` CPU threads for its ops (0: one per core), exact numerics.
  virtual std::unique_ptr<Context> context(int threads) = 0;
  // A new context as `o` says (a device with one numerics path ignores o.exact).
  virtual std::unique_ptr<Context> context(const ContextOptions& o) { return context(o.threads); }
};

class Context {
 public:
  virtual ~Context() = default;
  virtual Device& device() = 0;
  const char* name() { return device().name(); }
  virtual int threads() const = 0;
  // False when the context uses the fast int8 path (ContextOptions::exact).
  virtual bool exact() const { return true; }

  // ---- Memory and copies ------------------------------------------------------------------
  // `bytes` of context memory, zeroed, aligned to 256 bytes; Error kOutOfMemory when there is
  // not that much (the message says what is free).
  virtual void* alloc_bytes(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  // Queued; `host` may be reused as soon as upload returns.
  virtual void upload_bytes(void* dst, const void* host, size_t bytes) = 0;
  // Queued; `host` holds the data once sync() returns.
  virtual void download_bytes_async(void* host, const void* src, size_t bytes) = 0;
  // Queued context-to-context copy (regions may overlap).
  virtual void copy_bytes(void* dst, const void* src, size_t bytes) = 0;
  // Waits for everything queued so far.
  virtual void sync() = 0;

  float* alloc(size_t n) { return static_cast<float*>(alloc_bytes(n * sizeof(float))); }
  void upload(float* dst, const float* host, size_t n) {
    upload_bytes(dst, host, n * sizeof(float));
  }
  void download(void* host, const void* src, size_t bytes) {
    download_bytes_async(host, src, bytes);
    sync();
  }
  void download(float* host, const float* src, size_t n) {
    download(static_cast<void*>(host), static_cast<const void*>(src), n * sizeof(float));
  }
  void copy(float* dst, const float* src, size_t n) { copy_bytes(dst, src, n * sizeof(float)); }

  // ---- Position ---------------------------------------------------------------------------
  // The position of the first token of the ops that follow (rope, kv_append, attention). Queued
  // like an op (CUDA: written to device memory in stream order), so a captured decode graph
  // reads the position of each replay.
  virtual void set_pos(int pos) = 0;

  // ---- Ops --------------------------------------------------------------------------------
  // out[t] = E[tokens[t]]; tokens in context memory.            out: [T, E.cols]
  virtual void embed(const Mat& E, const int32_t* tokens, int T, float* out) = 0;
  // y[t, r] = sum_c W[r, c] * x[t, c]                            x: [T, W.cols]  y: [T, W.rows]
  virtual void matmul(const Mat& W, const float* x, float* y, int T) = 0;
  // As matmul, but on the exact path in a context whose exact() is false: the output
  // projections of attention and linear attention, whose inputs lose the most to int8
  // activations (KL on the demo's q8, all 186 windows: 0.0053 with them int8, 0.0044 without),
  // and lm_head (read from RAM at T = 1, where int8 gains nothing). A device with one numerics
  // path: matmul.
  virtual void matmul_exact(const Mat& W, const float* x, float* y, int T) {
    matmul(W, x, y, T);
  }
  // For each of `rows` rows of n floats at `stride`: y = x * rsqrt(mean(x^2) + eps) * w
  // (w null: no weight, 1). x == y allowed; floats between rows are not written.
  virtual void rmsnorm(const float* x, const float* w, float* y, int rows, int n, int stride,
                       float eps) = 0;
  // rotate-half RoPE on the first rot_dim dims of each head; x [T, row_stride], heads of
  // head_dim at head_stride; token t sits at position pos + t.
  virtual void rope(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
                    double theta) = 0;
  // The same rotation with given inverse frequencies (context memory, [rot_dim / 2]) and cos
  // and sin multiplied by cs_scale: YaRN (engine/rope.h makes the table). Angles are
  // float(inv_freq[i] * float(pos + t)), as rope computes them.
  virtual void rope_freq(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
                         const float* inv_freq, float cs_scale) = 0;
  // Per-head products with one matrix per head: W is [n_heads * R, C] (head h: rows
  // [h*R, (h+1)*R)), y[t*y_stride + h*y_head_stride + r] = sum_c W[h*R + r, c] *
  // x[t*x_stride + h*x_head_stride + c]. Each output has matmul's bits (MLA: kv_b_proj
  // absorbed into queries and outputs, one small matrix per head).
  virtual void matmul_heads(const Mat& W, int n_heads, const float* x, int x_stride,
                            int x_head_stride, float* y, int y_stride, int y_head_stride,
                            int T) = 0;
  // dst[r*dst_stride + i] = src[r*src_stride + i] for i < n, r < rows (regions disjoint).
  virtual void copy_rows(float* dst, int dst_stride, const float* src, int src_stride, int rows,
                         int n) = 0;
  // cache[pos + t] = src[t] for rows of `row` floats.
  virtual void kv_append(float* cache, const float* src, int T, int row) = 0;
  // Causal attention of T queries at positions pos.. over cache positions [0, pos + t].
  // k: [ctx, kv_stride], v: [ctx, v_stride]; out: [T, n_heads * v_dim].
  virtual void attention(const float* q, const float* k, const float* v, float* out, int T,
                         const AttentionParams& p) = 0;
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

  // ---- Fused forms (defaults compose the ops above; a backend may fuse them, same bits) ----
  // x += d, then y = rmsnorm(x) * w, for `rows` rows of n floats (stride n).
  virtual void add_rmsnorm(float* x, const float* d, const float* w, float* y, int rows, int n,
                           float eps) {
    add(x, d, size_t(rows) * size_t(n));
    rmsnorm(x, w, y, rows, n, n, eps);
  }
  // ys[i] = Ws[i] x for i < n, each as matmul (the projections of one input).
  virtual void matmul_n(const Mat* const* Ws, float* const* ys, int n, const float* x, int T) {
    for (int i = 0; i < n; i++) matmul(*Ws[i], x, ys[i], T);
  }
  // gate = silu(gate) * up, n floats.
  virtual void silu_mul(float* gate, const float* up, size_t n) = 0;

  // Router: logits [T, n_experts] -> ids [T, k] (int32, best first; equal scores go to the
  // lower index; NaN scores last) and weights [T, k] (null: ids only, e.g. for prefetch).
  // Softmax probabilities are computed in double and rounded once.
  virtual void route(const float* logits, int T, const RouteParams& p, int32_t* ids,
                     float* weights) = 0;
  // The routed experts of a MoE layer over T tokens, shaped like ggml's mul_mat_id: for every
  // (token t, choice j), slot[t, j] = weights[t, j] * down(silu(gate x_t) * up x_t) with the
  // weights of expert ids[t, j] from `experts` (which holds every id in ids); then
  // out[t] = sum over j = 0..k-1, in that order, plus the shared expert's gated output when
  // `shared` is given. xn, ids, weights, out: context memory. The result does not depend on
  // the order experts arrive in.
  virtual void moe_experts(const float* xn, const int32_t* ids, const float* weights,
                           ExpertSource& experts, const SharedExpert* shared, float* out,
                           const MoeParams& p) = 0;

  // ---- Recorded op sequences (optional) ----------------------------------------------------
  // A device backend may record the ops queued between record_begin() and record_end() instead
  // of running them, and queue them again, all at once, with replay() (CUDA: a graph): the
  // same ops with the same arguments, reading memory as it is at each replay, so whatever
  // changes between replays must be context memory (the position set_pos wrote, tokens
  // uploaded before). Nothing that waits (download, sync, take_nonfinite, a moe_experts whose
  // source is not all_resident) and nothing that allocates may be recorded; op arguments that
  // are host memory are read once, when recorded. record_end() must follow record_begin() also
  // when an op in between threw (the recording is then discarded: null). The CPU records
  // nothing: record_begin() returns false and ops run as they are called.
  class Recording {
   public:
    virtual ~Recording() = default;
  };
  virtual bool record_begin() { return false; }
  virtual std::unique_ptr<Recording> record_end() { return nullptr; }
  virtual void replay(Recording& r) { (void)r; }

  // ---- Checks -----------------------------------------------------------------------------
  // Notes the first NaN/Inf among x[0..n) under `tag` (>= -1) unless one is already noted
  // (read-only, one pass; the engine runs it on the residual stream after every layer, tags
  // rising: -1 for the embedding, then the layer). Queued: the result is read by
  // take_nonfinite, once per evaluation, so no op waits for it. As tags rise, "already noted"
  // may be kept as "noted under a lower tag" (CUDA: one atomicMin over (tag, index)).
  virtual void check_finite(const float* x, size_t n, int tag) = 0;
  // Waits; true (with the first noted tag and index) when check_finite found a NaN/Inf since
  // the last call, which clears it.
  virtual bool take_nonfinite(int* tag, size_t* index) = 0;
};

// The CPU device (a process-wide one: it holds nothing a context needs but the model views).
Device& cpu_device();
// A context of the CPU device with `threads` threads (0: one per core), exact numerics.
std::unique_ptr<Context> make_cpu_context(int threads);
std::unique_ptr<Context> make_cpu_context(const ContextOptions& o);

// Which backend a front end asked for (--backend, mf_model_params::backend).
enum class BackendKind { kAuto, kCpu, kCuda };
// Parses "auto", "cpu", "cuda"; an error names `what` (the flag) and the choices.
BackendKind parse_backend_kind(const std::string& text, const std::string& what);
const char* backend_kind_name(BackendKind kind);
// Fails with one clear line when `kind` cannot run here (no CUDA in this build, no GPU, no
// driver); kAuto resolves to CUDA when a GPU is usable, else the CPU. Front ends call it before
// loading anything.
BackendKind resolve_backend_kind(BackendKind kind);
// The process's device of `kind` (resolved): made on first use, shared afterwards.
Device& get_device(BackendKind kind);

}  // namespace moeflux
