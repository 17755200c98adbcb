// The CUDA backend's Device and Context (engine/backend.h): memory, copies, the position, and
// the ops as launches of cuda/kernels.h on the context's stream. Host C++ against the CUDA
// runtime API; the kernels live in the .cu files.
//
// Every op is queued and returns at once, except moe_experts on the host-grouped path (experts
// not all resident), which waits twice (see there).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_device.h"
#include "cuda/kernels.h"
#include "util/error.h"
#include "util/progress.h"

namespace moeflux {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    fail(ErrorKind::kInternal, "CUDA error in {}: {} ({})", what, cudaGetErrorString(e),
         cudaGetErrorName(e));
}
// After a launch: a bad configuration shows here; a fault in the kernel shows at the next sync.
void check_launch(const char* what) { check(cudaGetLastError(), what); }

std::string free_text() {
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return "unknown bytes free";
  return fmt::format("{} free of {} on the GPU", format_bytes(free), format_bytes(total));
}

// cudaMalloc, or Error kOutOfMemory naming what it was for, the bytes, what is free and `hint`.
void* device_alloc(size_t bytes, const char* what, const char* hint) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it
    fail(ErrorKind::kOutOfMemory, "out of GPU memory for {}: {} ({} bytes) needed, {}; {}", what,
         format_bytes(bytes), bytes, free_text(), hint);
  }
  check(e, "cudaMalloc");
  return p;
}

cuda::WMat wmat(const Mat& m) {
  cuda::WMat w;
  switch (m.dtype) {
    case DType::kF32: w.type = cuda::kWF32; break;
    case DType::kBF16: w.type = cuda::kWBF16; break;
    case DType::kF16: w.type = cuda::kWF16; break;
    case DType::kQ8: w.type = cuda::kWQ8; break;
    case DType::kQ4: w.type = cuda::kWQ4; break;
    case DType::kQ2: w.type = cuda::kWQ2; break;
    case DType::kMxfp4:  // gpt-oss's experts (issue 17)
      fail(ErrorKind::kUnsupported,
           "CUDA backend: mxfp4 weights (gpt-oss) are not implemented yet; use --backend cpu");
    default:
      fail(ErrorKind::kUnsupported, "CUDA backend: weights of dtype {} are not supported",
           dtype_name(m.dtype));
  }
  // Groups are powers of two (format/quant.h kQuantGroups: 32, 64, 128): the kernels shift.
  if (is_quant_dtype(m.dtype) &&
      (m.group < 32 || (m.group & (m.group - 1)) || m.cols % m.group))
    fail(ErrorKind::kUnsupported, "CUDA backend: quantised weights [{}, {}] with group {}",
         m.rows, m.cols, m.group);
  if ((m.dtype == DType::kBF16 || m.dtype == DType::kF16) && m.cols % 2)
    fail(ErrorKind::kUnsupported, "CUDA backend: 16-bit weights with an odd row length {}",
         m.cols);
  w.rows = m.rows;
  w.cols = m.cols;
  w.data = m.data;
  w.scales = m.scales;
  w.biases = m.biases;
  w.group = m.group;
  return w;
}

// ---- Whether and why not ------------------------------------------------------------------------

std::string probe_cuda() {
  int driver = 0;
  cudaDriverGetVersion(&driver);
  if (driver == 0)
    return "no NVIDIA driver found (libcuda.so.1 is not loadable on this machine)";
  if (driver < CUDART_VERSION)
    return fmt::format("the NVIDIA driver supports CUDA {}.{}, older than this build's CUDA "
                       "runtime {}.{}: update the driver",
                       driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000,
                       CUDART_VERSION % 1000 / 10);
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) {
    cudaGetLastError();
    return "no CUDA GPU found (the driver sees none)";
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fmt::format("the CUDA driver failed to start: {}", cudaGetErrorString(e));
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    return "cannot read the properties of GPU 0";
  }
  if (prop.major < 8)
    return fmt::format("GPU 0 ({}) has compute capability {}.{}; the kernels need 8.0 or newer",
                       prop.name, prop.major, prop.minor);
  return {};
}

const std::string& probe_result() {
  static const std::string why = probe_cuda();
  return why;
}

class CudaDevice;

// ---- Expert-cache slots in device memory ---------------------------------------------------------

class CudaExpertMemory final : public ExpertMemory {
 public:
  explicit CudaExpertMemory(Device& device, int ordinal) : device_(device), ordinal_(ordinal) {}
  Device& device() override { return device_; }
  uint8_t* alloc(size_t bytes) override {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    return static_cast<uint8_t*>(
        device_alloc(bytes, "the expert cache", "a smaller --expert-cache helps"));
  }
  void release(uint8_t* p, size_t bytes) override {
    if (p) cudaFree(p);
  }
  bool host_visible() const override { return false; }
  // Complete on return: a copy from pageable memory may return once staged, before the DMA
  // lands, so it goes on this thread's stream and that stream is waited for. Reader threads
  // write concurrently, each on its own per-thread stream.
  void write(uint8_t* dst, const uint8_t* host, size_t n) override {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    check(cudaMemcpyAsync(dst, host, n, cudaMemcpyHostToDevice, cudaStreamPerThread),
          "expert upload");
    check(cudaStreamSynchronize(cudaStreamPerThread), "expert upload");
  }

 private:
  Device& device_;
  int ordinal_;
};

// ---- The context ----------------------------------------------------------------------------

class CudaContext final : public Context {
 public:
  CudaContext(Device& device, int ordinal, int threads)
      : device_(device), ordinal_(ordinal), threads_(threads > 0 ? threads : 1) {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    pos_ = static_cast<int*>(device_alloc(sizeof(int), "the position", "--backend cpu"));
    flag_ = static_cast<cuda::NonfiniteFlag*>(
        device_alloc(sizeof(cuda::NonfiniteFlag), "the NaN check", "--backend cpu"));
    flag_init_.key = ~0ull;
    check(cudaMemcpy(flag_, &flag_init_, sizeof flag_init_, cudaMemcpyHostToDevice), "init");
    cuda::set_int(stream_, pos_, 0);
    check_launch("set_pos");
  }
  ~CudaContext() override {
    cudaStreamSynchronize(stream_);
    for (auto& [key, p] : inv_freq_) cudaFree(p.second);
    for (auto& [key, t] : expert_tables_) cudaFree(t.dev);
    for (void* p : retired_) cudaFree(p);
    for (void* p : {static_cast<void*>(pos_), static_cast<void*>(flag_), scratch_.p, slots_.p,
                    xe_.p, g_.p, u_.p, y_.p, r_.p, slot_idx_.p, list_.p, attn_.p})
      cudaFree(p);
    cudaStreamDestroy(stream_);
  }

  Device& device() override { return device_; }
  int threads() const override { return threads_; }

  void* alloc_bytes(size_t bytes) override {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    void* p = device_alloc(bytes, "session memory (KV cache, state, workspace)",
                           "a smaller --ctx or --ubatch helps");
    check(cudaMemsetAsync(p, 0, std::max<size_t>(bytes, 1), stream_), "cudaMemsetAsync");
    return p;
  }
  void release(void* p) override {
    if (p) cudaFree(p);  // waits for the device: nothing queued still reads p
  }
  void upload_bytes(void* dst, const void* host, size_t bytes) override {
    // From pageable memory the call returns once `host` is staged, so it may be reused.
    if (bytes)
      check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  }
  void download_bytes_async(void* host, const void* src, size_t bytes) override {
    if (bytes)
      check(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
  }
  void copy_bytes(void* dst, const void* src, size_t bytes) override {
    if (!bytes || dst == src) return;
    const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (d < s + bytes && s < d + bytes) {
      // Overlapping (memmove): through scratch, as cudaMemcpy leaves overlap undefined.
      void* tmp = grow(scratch_, bytes);
      check(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
      check(cudaMemcpyAsync(dst, tmp, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
    } else {
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
    }
  }
  void sync() override { check(cudaStreamSynchronize(stream_), "a queued op (sync)"); }

  void set_pos(int pos) override {
    // A one-thread kernel in stream order: the value travels as a launch parameter, so a
    // graph captured after it reads device memory and replays at whatever was set last.
    pos_host_ = pos;
    cuda::set_int(stream_, pos_, pos);
    check_launch("set_pos");
  }

  void embed(const Mat& E, const int32_t* tokens, int T, float* out) override {
    cuda::embed(stream_, wmat(E), tokens, T, out);
    check_launch("embed");
  }
  void matmul(const Mat& W, const float* x, float* y, int T) override {
    cuda::matmul(stream_, wmat(W), x, y, T, W.rows);
    check_launch("matmul");
  }
  void rmsnorm(const float* x, const float* w, float* y, int rows, int n, int stride,
               float eps) override {
    cuda::rmsnorm(stream_, x, w, y, rows, n, stride, eps);
    check_launch("rmsnorm");
  }
  void rope(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
            double theta) override {
    cuda::rope(stream_, x, T, n_heads, row_stride, head_stride, rot_dim,
               inv_freq(theta, rot_dim), pos_);
    check_launch("rope");
  }
  // MLA ops (issue 17): not on this backend yet.
  void rope_freq(float*, int, int, int, int, int, const float*, float) override {
    fail(ErrorKind::kUnsupported,
         "CUDA backend: rope_freq (YaRN rope scaling) is not "
         "implemented yet; use --backend cpu");
  }
  void matmul_heads(const Mat&, int, const float*, int, int, float*, int, int, int) override {
    fail(ErrorKind::kUnsupported,
         "CUDA backend: matmul_heads (multi-head latent attention) is "
         "not implemented yet; use --backend cpu");
  }
  void copy_rows(float*, int, const float*, int, int, int) override {
    fail(ErrorKind::kUnsupported,
         "CUDA backend: copy_rows (multi-head latent attention) is not "
         "implemented yet; use --backend cpu");
  }
  void kv_append(float* cache, const float* src, int T, int row) override {
    cuda::kv_append(stream_, cache, src, T, row, pos_);
    check_launch("kv_append");
  }
  void attention(const float* q, const float* k, const float* v, float* out, int T,
                 const AttentionParams& p) override {
    if (p.sinks || p.window > 0)  // gpt-oss (issue 17)
      fail(ErrorKind::kUnsupported,
           "CUDA backend: attention with sinks or a sliding window (gpt-oss) is not "
           "implemented yet; use --backend cpu");
    if ((p.v_dim && p.v_dim != p.head_dim) || (p.v_stride && p.v_stride != p.kv_stride))
      fail(ErrorKind::kUnsupported,
           "CUDA backend: attention with values of another width "
           "(v_dim {}, head_dim {}) is not implemented yet; use --backend cpu",
           p.v_dim, p.head_dim);
    const size_t scratch = cuda::attention_scratch_floats(T, p.n_heads, p.head_dim);
    float* part = scratch ? fgrow(attn_, scratch) : nullptr;
    if (!cuda::attention(stream_, q, k, v, out, T, p.n_heads, p.n_kv_heads, p.head_dim,
                         p.q_stride, p.q_head_stride, p.kv_stride, p.scale, pos_, part))
      fail(ErrorKind::kUnsupported, "CUDA backend: attention head_dim {} > 512", p.head_dim);
    check_launch("attention");
  }
  void mul_sigmoid_gate(float* out, const float* gate, int T, int n_heads, int d, int gate_stride,
                        int gate_head_stride) override {
    cuda::mul_sigmoid_gate(stream_, out, gate, T, n_heads, d, gate_stride, gate_head_stride);
    check_launch("mul_sigmoid_gate");
  }
  void conv1d_silu(const float* x, float* state, const float* w, float* y, int T, int C,
                   int K) override {
    if (!cuda::conv_kernel_supported(K))
      fail(ErrorKind::kUnsupported, "CUDA backend: conv1d kernel width {} (1..16)", K);
    cuda::conv1d_silu(stream_, x, state, w, y, T, C, K);
    check_launch("conv1d_silu");
  }
  void deltanet_gates(float* a, float* b, const float* A_log, const float* dt_bias, int T,
                      int nv) override {
    cuda::deltanet_gates(stream_, a, b, A_log, dt_bias, T, nv);
    check_launch("deltanet_gates");
  }
  void deltanet(const float* qkv, const float* g, const float* beta, float* state, float* out,
                int T, const DeltaNetParams& p) override {
    if (p.k_heads <= 0 || p.v_heads % p.k_heads)
      fail(ErrorKind::kUnsupported, "CUDA backend: DeltaNet v_heads {} not a multiple of "
           "k_heads {}", p.v_heads, p.k_heads);
    if (!cuda::deltanet(stream_, qkv, g, beta, state, out, T, p.k_heads, p.v_heads, p.k_dim,
                        p.v_dim))
      fail(ErrorKind::kUnsupported, "CUDA backend: DeltaNet head dims {}x{} (at most 1024)",
           p.k_dim, p.v_dim);
    check_launch("deltanet");
  }
  void deltanet_chunked(const float* qkv, const float* g, const float* beta, float* state,
                        float* out, int T, const DeltaNetParams& p, int chunk) override {
    if (chunk < 1) fail(ErrorKind::kInvalidArgument, "DeltaNet chunk size {} < 1", chunk);
    // NOT the chunked (WY) form yet: the recurrence, which the contract allows (the two agree
    // up to rounding; here they agree bit for bit). TODO(perf): the chunked form for prefill.
    deltanet(qkv, g, beta, state, out, T, p);
  }
  void gated_rmsnorm(float* x, const float* z, const float* w, int rows, int n,
                     float eps) override {
    cuda::gated_rmsnorm(stream_, x, z, w, rows, n, eps);
    check_launch("gated_rmsnorm");
  }
  void add(float* y, const float* x, size_t n) override {
    cuda::add(stream_, y, x, n);
    check_launch("add");
  }
  void add_rmsnorm(float* x, const float* d, const float* w, float* y, int rows, int n,
                   float eps) override {
    cuda::add_rmsnorm(stream_, x, d, w, y, rows, n, eps);
    check_launch("add_rmsnorm");
  }
  void matmul_n(const Mat* const* Ws, float* const* ys, int n, const float* x, int T) override {
    // One token: one launch for all (decode); a batch: the tiled mat-mul per matrix.
    if (T != 1 || n > cuda::kMatmulNMax) return Context::matmul_n(Ws, ys, n, x, T);
    cuda::MatmulN a;
    a.n = n;
    for (int i = 0; i < n; i++) {
      a.W[i] = wmat(*Ws[i]);
      a.y[i] = ys[i];
    }
    cuda::matmul_n(stream_, a, x);
    check_launch("matmul_n");
  }
  void silu_mul(float* gate, const float* up, size_t n) override {
    cuda::silu_mul(stream_, gate, up, n);
    check_launch("silu_mul");
  }
  void route(const float* logits, int T, const RouteParams& p, int32_t* ids,
             float* weights) override {
    if (p.k < 1 || p.k > p.n_experts)
      fail(ErrorKind::kInvalidArgument, "route: k = {} of {} experts", p.k, p.n_experts);
    if (p.n_group != 1 || p.topk_group != 1)
      fail(ErrorKind::kUnsupported,
           "CUDA backend: group-limited routing (n_group {}, topk_group "
           "{}) is not implemented yet; use --backend cpu",
           p.n_group, p.topk_group);
    cuda::route(stream_, logits, T, p.n_experts, p.k, p.scoring == RouteScoring::kSigmoid ? 1 : 0,
                p.norm_topk_prob, p.bias, p.scale, ids, weights);
    check_launch("route");
  }

  // The host orders the work: it reads the [T, k] ids (one wait), groups the (token, choice)
  // slots by expert, uploads that list once, and then per expert as it arrives gathers its
  // tokens' rows, runs gate/up/down over them and scatters the weighted rows into their slots;
  // the slots are summed in choice order. Each slot is written by one expert only, so the
  // result does not depend on arrival order. A second wait at the end: the store may reuse a
  // slot's memory once this returns, so no queued kernel may still read it.
  // With every expert resident moe_resident runs instead (no wait). TODO(perf): streamed
  // experts (issue 14) need the ids on the host; the copies should overlap the hits' compute.
  void moe_experts(const float* xn, const int32_t* ids, const float* weights,
                   ExpertSource& experts, const SharedExpert* shared, float* out,
                   const MoeParams& p) override {
    if (p.gate_bias || p.up_bias || p.down_bias || p.swiglu_limit > 0)  // gpt-oss (issue 17)
      fail(ErrorKind::kUnsupported,
           "CUDA backend: experts with biases and the clamped SwiGLU (gpt-oss) are not "
           "implemented yet; use --backend cpu");
    const int T = p.T, K = p.k, H = p.hidden, I = p.inter;
    const int S = shared && shared->gate && *shared->gate ? shared->inter : 0;
    if (T <= 0) return;
    if (experts.all_resident() && moe_resident(xn, ids, weights, experts, shared, out, p, S))
      return;
    ids_host_.resize(size_t(T) * K);
    download(ids_host_.data(), ids, ids_host_.size() * sizeof(int32_t));
    const size_t n_req = experts.size();
    std::vector<int> req_of_id;
    for (size_t i = 0; i < n_req; i++) {
      const int e = experts.id(i);
      if (e < 0) fail(ErrorKind::kInternal, "moe_experts: expert id {} in the source", e);
      if (size_t(e) >= req_of_id.size()) req_of_id.resize(size_t(e) + 1, -1);
      req_of_id[size_t(e)] = int(i);
    }
    std::vector<int> count(n_req, 0), offset(n_req + 1, 0);
    for (int s = 0; s < T * K; s++) {
      const int e = ids_host_[size_t(s)];
      if (e < 0 || size_t(e) >= req_of_id.size() || req_of_id[size_t(e)] < 0)
        fail(ErrorKind::kInternal, "moe_experts: slot {} routes to expert {}, which the "
             "expert source does not hold", s, e);
      count[size_t(req_of_id[size_t(e)])]++;
    }
    for (size_t i = 0; i < n_req; i++) offset[i + 1] = offset[i] + count[i];
    order_host_.assign(size_t(T) * K, 0);
    {
      std::vector<int> fill(offset.begin(), offset.end() - 1);
      for (int s = 0; s < T * K; s++)
        order_host_[size_t(fill[size_t(req_of_id[size_t(ids_host_[size_t(s)])])]++)] = s;
    }
    auto* slot_idx = static_cast<int32_t*>(grow(slot_idx_, order_host_.size() * sizeof(int32_t)));
    upload_bytes(slot_idx, order_host_.data(), order_host_.size() * sizeof(int32_t));
    const int F = std::max(I, S);
    float* slots = fgrow(slots_, size_t(T) * K * H);
    float* xe = fgrow(xe_, size_t(T) * H);
    float* g = fgrow(g_, size_t(T) * F);
    float* u = fgrow(u_, size_t(T) * F);
    float* y = fgrow(y_, size_t(T) * H);
    for (size_t done = 0; done < n_req; done++) {
      const size_t i = experts.next();
      const int n = count[i];
      if (n == 0) continue;
      const ExpertWeights& ew = experts.weights(i);
      const int32_t* sl = slot_idx + offset[i];
      cuda::gather_slot_rows(stream_, xn, sl, n, K, H, xe);
      check_launch("moe gather");
      matmul(ew.gate, xe, g, n);
      matmul(ew.up, xe, u, n);
      silu_mul(g, u, size_t(n) * I);
      matmul(ew.down, g, y, n);
      cuda::scatter_slot_rows(stream_, y, sl, weights, n, H, slots);
      check_launch("moe scatter");
    }
    cuda::sum_slots(stream_, slots, T, K, H, out);
    check_launch("moe sum");
    if (S) {
      matmul(*shared->gate, xn, g, T);
      matmul(*shared->up, xn, u, T);
      silu_mul(g, u, size_t(T) * S);
      matmul(*shared->down, g, y, T);
      float* r = nullptr;
      if (shared->router && *shared->router) {
        r = fgrow(r_, size_t(T));
        matmul(*shared->router, xn, r, T);
      }
      cuda::add_gated_rows(stream_, out, y, r, T, H);
      check_launch("moe shared");
    }
    sync();
  }

  // Every expert resident: moe.cu's kernels read the ids where route left them, no wait. Up
  // to kDirectSlots slots, a kernel per slot (decode); above, the slots grouped by expert on
  // the device, each expert's weights read once per 4 of its slots (prefill).
  static constexpr int kDirectSlots = 64;
  // False when the layer's experts are not uniform enough for the typed kernels (mixed
  // types, groups or load widths): the host-grouped path runs instead.
  bool moe_resident(const float* xn, const int32_t* ids, const float* weights,
                    ExpertSource& experts, const SharedExpert* shared, float* out,
                    const MoeParams& p, int S) {
    const int T = p.T, K = p.k, H = p.hidden, I = p.inter;
    const ExpertTable& tab = expert_table(experts, H, I);
    if (!tab.uniform) return false;
    cuda::MoeDirect a;
    a.experts = tab.dev;
    a.E = int(experts.size());
    a.gate_up_type = tab.gate_up_type;
    a.gate_up_vec4 = tab.gate_up_vec4;
    a.down_type = tab.down_type;
    a.down_vec4 = tab.down_vec4;
    a.first = tab.first;
    a.ids = ids;
    a.weights = weights;
    a.xn = xn;
    a.T = T, a.K = K, a.H = H, a.I = I;
    a.S = S;
    if (S) {
      a.sh_gate = wmat(*shared->gate);
      a.sh_up = wmat(*shared->up);
      a.sh_down = wmat(*shared->down);
      a.has_router = shared->router && *shared->router;
      if (a.has_router) a.sh_router = wmat(*shared->router);
    }
    a.h = fgrow(g_, size_t(T) * K * I);
    a.hs = fgrow(u_, size_t(T) * std::max(S, 1));
    a.ysh = fgrow(y_, size_t(T) * H);
    a.r = fgrow(r_, size_t(T));
    a.out = out;
    if (T * K <= kDirectSlots) {
      if (!cuda::moe_direct(stream_, a)) return false;
      check_launch("moe_direct");
      return true;
    }
    a.offsets = static_cast<int32_t*>(grow(slot_idx_, (size_t(a.E) + 1) * sizeof(int32_t)));
    a.list = static_cast<int32_t*>(grow(list_, size_t(T) * K * sizeof(int32_t)));
    a.slots = fgrow(slots_, size_t(T) * K * H);
    a.hs_up = fgrow(xe_, size_t(T) * std::max(S, 1));
    if (!cuda::moe_grouped(stream_, a)) return false;
    check_launch("moe_grouped");
    return true;
  }
  // The device table of a resident layer's experts, made on first use (keyed by the source's
  // table, which load_all keeps for good), and whether its experts share types and load widths.
  struct ExpertTable {
    cuda::ExpertMats* dev = nullptr;
    size_t n = 0;
    bool uniform = false;
    int gate_up_type = 0, down_type = 0;
    bool gate_up_vec4 = false, down_vec4 = false;
    cuda::ExpertMats first;  // expert 0's, host copy
  };
  const ExpertTable& expert_table(ExpertSource& experts, int H, int I) {
    const ExpertWeights* key = &experts.weights(0);
    auto it = expert_tables_.find(key);
    if (it != expert_tables_.end() && it->second.n == experts.size()) return it->second;
    std::vector<cuda::ExpertMats> host(experts.size());
    ExpertTable t;
    t.n = host.size();
    t.uniform = true;
    for (size_t e = 0; e < host.size(); e++) {
      const ExpertWeights& w = experts.weights(e);
      if (w.gate.rows != I || w.gate.cols != H || w.up.rows != I || w.up.cols != H ||
          w.down.rows != H || w.down.cols != I)
        fail(ErrorKind::kInternal, "moe_experts: expert {} has gate [{}, {}], up [{}, {}], down "
             "[{}, {}]; the layer's shape is hidden {}, inter {}", e, w.gate.rows, w.gate.cols,
             w.up.rows, w.up.cols, w.down.rows, w.down.cols, H, I);
      host[e] = {wmat(w.gate), wmat(w.up), wmat(w.down)};
      const cuda::ExpertMats& m = host[e];
      if (e == 0) {
        t.gate_up_type = m.gate.type;
        t.gate_up_vec4 = cuda::matvec_vec4(m.gate);
        t.down_type = m.down.type;
        t.down_vec4 = cuda::matvec_vec4(m.down);
      }
      t.uniform &= m.gate.type == t.gate_up_type && m.up.type == t.gate_up_type &&
                   cuda::matvec_vec4(m.gate) == t.gate_up_vec4 &&
                   cuda::matvec_vec4(m.up) == t.gate_up_vec4 && m.down.type == t.down_type &&
                   cuda::matvec_vec4(m.down) == t.down_vec4 && m.gate.group == host[0].gate.group &&
                   m.up.group == host[0].gate.group && m.down.group == host[0].down.group;
    }
    if (!host.empty()) t.first = host[0];
    const size_t bytes = host.size() * sizeof(cuda::ExpertMats);
    if (it != expert_tables_.end()) retired_.push_back(it->second.dev);  // see grow()
    t.dev = static_cast<cuda::ExpertMats*>(
        device_alloc(bytes, "the resident experts' table", "--backend cpu"));
    check(cudaMemcpy(t.dev, host.data(), bytes, cudaMemcpyHostToDevice), "expert table");
    return expert_tables_[key] = t;
  }

  // Recordings are CUDA graphs captured from the stream (thread-local mode: an op that would
  // wait or allocate fails the capture instead of running).
  struct Graph final : Recording {
    cudaGraphExec_t exec = nullptr;
    ~Graph() override {
      if (exec) cudaGraphExecDestroy(exec);
    }
  };
  bool record_begin() override {
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture");
    return true;
  }
  std::unique_ptr<Recording> record_end() override {
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &g);
    if (e != cudaSuccess) {
      cudaGetLastError();
      if (g) cudaGraphDestroy(g);
      check(e, "capturing a graph (an op in it waited or allocated)");
    }
    auto out = std::make_unique<Graph>();
    const cudaError_t ie = cudaGraphInstantiate(&out->exec, g, 0);
    cudaGraphDestroy(g);
    check(ie, "cudaGraphInstantiate");
    return out;
  }
  void replay(Recording& r) override {
    check(cudaGraphLaunch(static_cast<Graph&>(r).exec, stream_), "graph replay");
  }

  void check_finite(const float* x, size_t n, int tag) override {
    if (tag < -1 || n >= (size_t(1) << cuda::kNonfiniteIndexBits))
      fail(ErrorKind::kInternal, "check_finite: tag {} or {} elements out of range", tag, n);
    cuda::check_finite(stream_, x, n, tag, flag_);
    check_launch("check_finite");
  }
  bool take_nonfinite(int* tag, size_t* index) override {
    cuda::NonfiniteFlag f{};
    download(&f, flag_, sizeof f);
    if (f.key == ~0ull) return false;
    upload_bytes(flag_, &flag_init_, sizeof flag_init_);
    if (tag) *tag = int(f.key >> cuda::kNonfiniteIndexBits) - 1;
    if (index) *index = size_t(f.key & ((1ull << cuda::kNonfiniteIndexBits) - 1));
    return true;
  }

 private:
  struct Scratch {
    void* p = nullptr;
    size_t bytes = 0;
  };
  // Context scratch grown on demand (the old block is freed, which waits for the device).
  // A replaced block is kept until the context goes: a recording may still name it (a graph
  // captured at T = 1 replays after a longer batch grew the scratch).
  void* grow(Scratch& s, size_t bytes) {
    if (s.bytes < bytes) {
      void* p = device_alloc(bytes, "scratch", "a smaller --ubatch helps");
      if (s.p) retired_.push_back(s.p);
      s.p = p;
      s.bytes = bytes;
    }
    return s.p;
  }
  float* fgrow(Scratch& s, size_t n) { return static_cast<float*>(grow(s, n * sizeof(float))); }

  // The inverse frequencies of (theta, rot_dim), computed on the host as cpu_backend.cpp does
  // (the same powf, so the same bits), uploaded once per context.
  const float* inv_freq(double theta, int rot_dim) {
    auto key = std::make_pair(theta, rot_dim);
    auto it = inv_freq_.find(key);
    if (it != inv_freq_.end()) return it->second.second;
    const int half = rot_dim / 2;
    std::vector<float> inv(size_t(std::max(half, 1)));
    for (int i = 0; i < half; i++)
      inv[size_t(i)] = 1.0f / std::pow(float(theta), float(2 * i) / float(rot_dim));
    auto* d = static_cast<float*>(device_alloc(inv.size() * sizeof(float), "RoPE", "--backend cpu"));
    check(cudaMemcpy(d, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice),
          "RoPE table");
    inv_freq_[key] = {std::move(inv), d};
    return d;
  }

  Device& device_;
  int ordinal_;
  int threads_;
  cudaStream_t stream_ = nullptr;
  int* pos_ = nullptr;  // device: the position set_pos wrote last
  int pos_host_ = 0;
  cuda::NonfiniteFlag* flag_ = nullptr;  // device
  cuda::NonfiniteFlag flag_init_{};
  std::map<std::pair<double, int>, std::pair<std::vector<float>, float*>> inv_freq_;
  Scratch scratch_, slots_, xe_, g_, u_, y_, r_, slot_idx_, list_, attn_;
  std::map<const ExpertWeights*, ExpertTable> expert_tables_;
  std::vector<void*> retired_;  // replaced scratch and tables, freed with the context
  std::vector<int32_t> ids_host_, order_host_;
};

// ---- The device -------------------------------------------------------------------------------

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal) : ordinal_(ordinal), memory_(*this, ordinal) {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
  }
  const char* name() const override { return "cuda"; }

  // Uploads resident.bin whole (every resident tensor, one copy) and rebases each pointer of
  // the Model's weights onto the device copy; lm_head tied to embed stays tied.
  std::shared_ptr<const ModelWeights> bind(const Model& model) override {
    std::lock_guard<std::mutex> lock(mu_);
    const PackedTensor* embed_t = model.manifest().find("embed");
    MF_CHECK(embed_t && model.embed.data);
    const uint8_t* host = static_cast<const uint8_t*>(model.embed.data) - embed_t->offset;
    const uint64_t bytes = model.manifest().resident_bytes;
    Bound& b = bound_[&model];
    if (auto w = b.weights.lock(); w && b.host == host && b.bytes == bytes && b.dir == model.dir())
      return w;
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    auto* dev = static_cast<uint8_t*>(device_alloc(
        bytes, "the model's resident weights",
        "the resident weights must fit on the GPU: use --backend cpu, or a package with "
        "smaller (quantised) resident weights"));
    const cudaError_t e = cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
      cudaFree(dev);
      check(e, "uploading the resident weights");
    }
    auto rebase = [&](const void* p) -> const void* {
      if (!p) return nullptr;
      const auto* q = static_cast<const uint8_t*>(p);
      MF_CHECK(q >= host && q < host + bytes);
      return dev + (q - host);
    };
    auto vec = [&](const float* p) { return static_cast<const float*>(rebase(p)); };
    auto mat = [&](Mat m) {
      m.data = rebase(m.data);
      m.scales = static_cast<const uint16_t*>(rebase(m.scales));
      m.biases = static_cast<const uint16_t*>(rebase(m.biases));
      return m;
    };
    auto* w = new ModelWeights(model.host_weights());
    w->embed = mat(w->embed);
    w->lm_head = mat(w->lm_head);
    w->final_norm = vec(w->final_norm);
    for (LayerWeights& l : w->layers) {
      for (Mat* m : {&l.q,       &l.k,         &l.v,        &l.o,      &l.lin_qkv,  &l.lin_z,
                     &l.lin_b,   &l.lin_a,     &l.lin_out,  &l.router, &l.sh_gate,  &l.sh_up,
                     &l.sh_down, &l.sh_router, &l.ffn_gate, &l.ffn_up, &l.ffn_down, &l.q_a,
                     &l.q_b,     &l.kv_a,      &l.k_b,      &l.v_b})
        *m = mat(*m);
      for (const float** v : {&l.attn_norm, &l.ffn_norm, &l.q_norm, &l.k_norm, &l.conv, &l.A_log,
                              &l.dt_bias, &l.lin_norm, &l.q_a_norm, &l.kv_a_norm, &l.router_bias,
                              &l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias, &l.sinks,
                              &l.router_logit_bias, &l.gate_bias, &l.up_bias, &l.down_bias})
        *v = vec(*v);
    }
    std::shared_ptr<const ModelWeights> out(w, [dev](const ModelWeights* p) {
      cudaFree(dev);
      delete p;
    });
    b = {out, host, bytes, model.dir()};
    return out;
  }
  ExpertMemory& expert_memory() override { return memory_; }
  std::unique_ptr<Context> context(int threads) override {
    return std::make_unique<CudaContext>(*this, ordinal_, threads);
  }

 private:
  struct Bound {
    std::weak_ptr<const ModelWeights> weights;
    const uint8_t* host = nullptr;  // the Model's resident memory, as bound
    uint64_t bytes = 0;
    std::string dir;
  };
  int ordinal_;
  CudaExpertMemory memory_;
  std::mutex mu_;
  std::map<const Model*, Bound> bound_;
};

}  // namespace

bool cuda_usable(std::string* why) {
  const std::string& r = probe_result();
  if (!r.empty() && why) *why = r;
  return r.empty();
}

double cuda_copy_bandwidth() {
  cuda_device();  // the clear error when there is no usable GPU
  const size_t n = size_t(1) << 30;
  void* a = device_alloc(n, "the bandwidth probe", "use bench --no-floor");
  void* b = nullptr;
  try {
    b = device_alloc(n, "the bandwidth probe", "use bench --no-floor");
  } catch (...) {
    cudaFree(a);
    throw;
  }
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  check(cudaEventCreate(&e1), "cudaEventCreate");
  float best = 0;
  for (int i = 0; i < 4; i++) {  // the first one warms up
    check(cudaEventRecord(e0), "cudaEventRecord");
    check(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice), "bandwidth probe");
    check(cudaEventRecord(e1), "cudaEventRecord");
    check(cudaEventSynchronize(e1), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    if (i > 0 && (best == 0 || ms < best)) best = ms;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(n) / (double(best) * 1e-3) / 1e9;
}

Device& cuda_device() {
  // Made once and never destroyed: the CUDA runtime tears itself down at exit, and a device
  // freed after that would only collect errors.
  static CudaDevice* device = [] {
    std::string why;
    if (!cuda_usable(&why))
      fail(ErrorKind::kUnsupported, "backend cuda: {}; use --backend cpu", why);
    return new CudaDevice(0);
  }();
  return *device;
}

}  // namespace moeflux
