// CPU backend: f32 compute over f32/bf16/f16 and q8/q4/q2 weights. Work is split by output rows
// (or heads), never inside a reduction, so results are bit-identical for any thread count.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <vector>

#include "cpu/deltanet.h"
#include "cpu/kernels.h"
#include "cpu/matmul.h"
#include "cpu/qdot.h"
#include "format/quant.h"
#include "engine/backend.h"
#include "util/error.h"
#include "util/thread_pool.h"

namespace moeflux {

namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// Matrices with fewer rows stay on the exact path in fast mode: the per-head gate projections
// of Gated DeltaNet (rows = value heads), whose outputs go through exp and softplus into every
// step of the recurrence. They are a negligible share of the bytes and time; on the trained
// demo, q8, keeping them exact took the KL against --exact from 0.0067 to 0.0050
// (docs/2026-12-03-cpu-int8.md).
constexpr int64_t kQdotMinRows = 64;

class CpuContext final : public Context {
 public:
  CpuContext(Device& device, const ContextOptions& o)
      : device_(device), pool_(o.threads), exact_(o.exact) {}

  Device& device() override { return device_; }
  int threads() const override { return pool_.size(); }
  bool exact() const override { return exact_; }

  // calloc (large blocks come zeroed from mmap and are committed only as they are written, so
  // RSS follows use), aligned to 256 bytes by hand: the block's own pointer is kept just before.
  void* alloc_bytes(size_t bytes) override {
    constexpr size_t kAlign = 256;
    void* raw = std::calloc(bytes + kAlign, 1);
    if (!raw) fail(ErrorKind::kOutOfMemory, "out of memory: cannot allocate {} bytes", bytes);
    const uintptr_t at = (reinterpret_cast<uintptr_t>(raw) + kAlign) & ~uintptr_t(kAlign - 1);
    void* p = reinterpret_cast<void*>(at);
    std::memcpy(static_cast<char*>(p) - sizeof(void*), &raw, sizeof raw);
    return p;
  }
  void release(void* p) override {
    if (!p) return;
    void* raw;
    std::memcpy(&raw, static_cast<char*>(p) - sizeof(void*), sizeof raw);
    std::free(raw);
  }
  void upload_bytes(void* dst, const void* host, size_t bytes) override {
    std::memcpy(dst, host, bytes);
  }
  void download_bytes_async(void* host, const void* src, size_t bytes) override {
    std::memcpy(host, src, bytes);
  }
  void copy_bytes(void* dst, const void* src, size_t bytes) override {
    std::memmove(dst, src, bytes);
  }
  void sync() override {}
  void set_pos(int pos) override { pos_ = pos; }

  void embed(const Mat& E, const int32_t* tokens, int T, float* out) override {
    for (int t = 0; t < T; t++) mat_row_f32(E, tokens[t], out + size_t(t) * E.cols);
  }

  void matmul(const Mat& W, const float* x, float* y, int T) override {
    if (!exact_ && is_quant_dtype(W.dtype) && qdot_group_supported(W.group) &&
        W.rows >= kQdotMinRows) {
      // The int8 path (cpu/qdot.h): x quantised once per call, here on the calling thread,
      // so every row split sees the same bytes.
      quantize_acts(x, T, W.cols, W.group, quant_bits(W.dtype), qx_);
      pool_.parallel_for(W.rows, [&](int64_t r0, int64_t r1) {
        qmatmul_rows(W, r0, r1, qx_, y, W.rows);
      }, 16);
      return;
    }
    matmul_exact(W, x, y, T);
  }

  void matmul_exact(const Mat& W, const float* x, float* y, int T) override {
    // Rows split over threads in blocks of 16 (the kernels take rows 4 at a time); each
    // output's bits do not depend on the split or on T (cpu/matmul.h).
    pool_.parallel_for(W.rows, [&](int64_t r0, int64_t r1) {
      matmul_rows(W, r0, r1, x, T, y, W.rows);
    }, 16);
  }

  void rmsnorm(const float* x, const float* w, float* y, int rows, int n, int stride,
               float eps) override {
    for (int r = 0; r < rows; r++) {
      const float* xr = x + size_t(r) * stride;
      float* yr = y + size_t(r) * stride;
      double ss = 0;
      for (int i = 0; i < n; i++) ss += double(xr[i]) * xr[i];
      const float inv = float(1.0 / std::sqrt(ss / n + eps));
      for (int i = 0; i < n; i++) yr[i] = xr[i] * inv * (w ? w[i] : 1.0f);
    }
  }

  // Rotate-half of one token's heads by the angles' cos/sin (rope and rope_freq).
  static void rotate_half(float* row, int n_heads, int head_stride, int half, const float* cs,
                          const float* sn) {
    for (int h = 0; h < n_heads; h++) {
      float* v = row + size_t(h) * head_stride;
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }

  void rope(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
            double theta) override {
    const int pos0 = pos_;
    const int half = rot_dim / 2;
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int t = 0; t < T; t++) {
      // As HF computes it: f32 inverse frequencies times an f32 position, then cos/sin.
      for (int i = 0; i < half; i++) {
        float inv = 1.0f / std::pow(float(theta), float(2 * i) / float(rot_dim));
        float ang = inv * float(pos0 + t);
        cs[size_t(i)] = float(std::cos(double(ang)));
        sn[size_t(i)] = float(std::sin(double(ang)));
      }
      rotate_half(x + size_t(t) * row_stride, n_heads, head_stride, half, cs.data(), sn.data());
    }
  }

  void rope_freq(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim,
                 const float* inv_freq, float cs_scale) override {
    const int pos0 = pos_;
    const int half = rot_dim / 2;
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int t = 0; t < T; t++) {
      // As HF: an f32 angle, f32 cos/sin, times attention_scaling in f32.
      for (int i = 0; i < half; i++) {
        const float ang = inv_freq[i] * float(pos0 + t);
        cs[size_t(i)] = float(std::cos(double(ang))) * cs_scale;
        sn[size_t(i)] = float(std::sin(double(ang))) * cs_scale;
      }
      rotate_half(x + size_t(t) * row_stride, n_heads, head_stride, half, cs.data(), sn.data());
    }
  }

  void matmul_heads(const Mat& W, int n_heads, const float* x, int x_stride, int x_head_stride,
                    float* y, int y_stride, int y_head_stride, int T) override {
    if (n_heads < 1 || W.rows % n_heads)
      fail(ErrorKind::kInvalidArgument, "matmul_heads: {} rows do not split into {} heads", W.rows,
           n_heads);
    const int64_t R = W.rows / n_heads, C = W.cols;
    // One head per task: its inputs gathered into a contiguous [T, C] block, then matmul's
    // kernel over the head's rows (bits independent of the split, as matmul).
    pool_.parallel_for(
        n_heads,
        [&](int64_t h0, int64_t h1) {
          std::vector<float> xh(size_t(T) * size_t(C)), yh(size_t(T) * size_t(R));
          for (int64_t h = h0; h < h1; h++) {
            for (int t = 0; t < T; t++)
              std::memcpy(xh.data() + size_t(t) * C,
                          x + size_t(t) * x_stride + size_t(h) * x_head_stride,
                          size_t(C) * sizeof(float));
            matmul_rows(mat_rows(W, h * R, R), 0, R, xh.data(), T, yh.data(), R);
            for (int t = 0; t < T; t++)
              std::memcpy(y + size_t(t) * y_stride + size_t(h) * y_head_stride,
                          yh.data() + size_t(t) * R, size_t(R) * sizeof(float));
          }
        },
        1);
  }

  void copy_rows(float* dst, int dst_stride, const float* src, int src_stride, int rows,
                 int n) override {
    for (int r = 0; r < rows; r++)
      std::memcpy(dst + size_t(r) * dst_stride, src + size_t(r) * src_stride,
                  size_t(n) * sizeof(float));
  }

  void kv_append(float* cache, const float* src, int T, int row) override {
    std::memcpy(cache + size_t(pos_) * row, src, size_t(T) * row * sizeof(float));
  }

  void attention(const float* q, const float* k, const float* v, float* out, int T,
                 const AttentionParams& p) override {
    const int pos0 = pos_;
    const int group = p.n_heads / p.n_kv_heads, d = p.head_dim;
    const int vd = p.v_dim > 0 ? p.v_dim : d, vs = p.v_stride > 0 ? p.v_stride : p.kv_stride;
    pool_.parallel_for(int64_t(T) * p.n_heads, [&](int64_t i0, int64_t i1) {
      std::vector<float> sc;
      for (int64_t i = i0; i < i1; i++) {
        const int t = int(i / p.n_heads), h = int(i % p.n_heads), kvh = h / group;
        const int n = pos0 + t + 1;
        // A sliding-window layer (gpt-oss) sees positions (pos - window, pos] only.
        const int j0 = p.window > 0 ? std::max(0, n - p.window) : 0;
        const float* qv = q + size_t(t) * p.q_stride + size_t(h) * p.q_head_stride;
        sc.resize(size_t(n));
        float mx = p.sinks ? p.sinks[h] : -INFINITY;  // a sink joins the max and the sum
        for (int j = j0; j < n; j++) {
          const float* kv = k + size_t(j) * p.kv_stride + size_t(kvh) * d;
          float s = dot_f32(qv, kv, d) * p.scale;
          sc[size_t(j)] = s;
          mx = std::max(mx, s);
        }
        float sum = 0;
        for (int j = j0; j < n; j++) sum += (sc[size_t(j)] = std::exp(sc[size_t(j)] - mx));
        if (p.sinks) sum += std::exp(p.sinks[h] - mx);
        const float inv = 1.0f / sum;
        float* o = out + size_t(t) * p.n_heads * vd + size_t(h) * vd;
        std::fill(o, o + vd, 0.0f);
        for (int j = j0; j < n; j++) {
          const float* vv = v + size_t(j) * vs + size_t(kvh) * vd;
          axpy(sc[size_t(j)] * inv, vv, o, vd);
        }
      }
    });
  }

  void mul_sigmoid_gate(float* out, const float* gate, int T, int n_heads, int d, int gate_stride,
                        int gate_head_stride) override {
    for (int t = 0; t < T; t++)
      for (int h = 0; h < n_heads; h++) {
        float* o = out + size_t(t) * n_heads * d + size_t(h) * d;
        const float* g = gate + size_t(t) * gate_stride + size_t(h) * gate_head_stride;
        for (int i = 0; i < d; i++) o[i] *= sigmoid(g[i]);
      }
  }

  void conv1d_silu(const float* x, float* state, const float* w, float* y, int T, int C,
                   int K) override {
    pool_.parallel_for(C, [&](int64_t c0, int64_t c1) {
      std::vector<float> win(static_cast<size_t>(K));
      for (int64_t c = c0; c < c1; c++) {
        const float* wc = w + size_t(c) * K;
        // window = the last K-1 inputs then the current one, oldest first
        for (int i = 0; i < K - 1; i++) win[size_t(i)] = state[size_t(i) * C + c];
        for (int t = 0; t < T; t++) {
          win[size_t(K - 1)] = x[size_t(t) * C + c];
          float s = 0;
          for (int i = 0; i < K; i++) s += wc[i] * win[size_t(i)];
          y[size_t(t) * C + c] = silu(s);
          for (int i = 0; i + 1 < K; i++) win[size_t(i)] = win[size_t(i + 1)];
        }
        for (int i = 0; i < K - 1; i++) state[size_t(i) * C + c] = win[size_t(i)];
      }
    });
  }

  void deltanet_gates(float* a, float* b, const float* A_log, const float* dt_bias, int T,
                      int nv) override {
    for (int t = 0; t < T; t++)
      for (int h = 0; h < nv; h++) {
        float& av = a[size_t(t) * nv + h];
        av = -std::exp(A_log[h]) * softplus(av + dt_bias[h]);
        float& bv = b[size_t(t) * nv + h];
        bv = sigmoid(bv);
      }
  }

  void deltanet(const float* qkv, const float* g, const float* beta, float* state, float* out,
                int T, const DeltaNetParams& p) override {
    pool_.parallel_for(p.v_heads, [&](int64_t h0, int64_t h1) {
      deltanet_recurrent_heads(qkv, g, beta, state, out, T, p.k_heads, p.v_heads, p.k_dim,
                               p.v_dim, int(h0), int(h1));
    });
  }

  void deltanet_chunked(const float* qkv, const float* g, const float* beta, float* state,
                        float* out, int T, const DeltaNetParams& p, int chunk) override {
    if (chunk < 1) fail(ErrorKind::kInvalidArgument, "DeltaNet chunk size {} < 1", chunk);
    pool_.parallel_for(p.v_heads, [&](int64_t h0, int64_t h1) {
      deltanet_chunked_heads(qkv, g, beta, state, out, T, p.k_heads, p.v_heads, p.k_dim,
                             p.v_dim, chunk, int(h0), int(h1));
    });
  }

  void gated_rmsnorm(float* x, const float* z, const float* w, int rows, int n,
                     float eps) override {
    for (int r = 0; r < rows; r++) {
      float* xr = x + size_t(r) * n;
      const float* zr = z + size_t(r) * n;
      double ss = 0;
      for (int i = 0; i < n; i++) ss += double(xr[i]) * xr[i];
      const float inv = float(1.0 / std::sqrt(ss / n + eps));
      for (int i = 0; i < n; i++) xr[i] = xr[i] * inv * w[i] * silu(zr[i]);
    }
  }

  void add(float* y, const float* x, size_t n) override {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
  }
  void silu_mul(float* gate, const float* up, size_t n) override {
    for (size_t i = 0; i < n; i++) gate[i] = silu(gate[i]) * up[i];
  }
  // gpt-oss's expert activation, in HF's order: g = min(gate, limit), u = clamp(up, -limit,
  // limit), gate = (u + 1) * (g * sigmoid(alpha * g)).
  static void clamped_swiglu(float* gate, const float* up, size_t n, float limit, float alpha) {
    for (size_t i = 0; i < n; i++) {
      const float g = std::min(gate[i], limit);
      const float u = std::clamp(up[i], -limit, limit);
      gate[i] = (u + 1.0f) * (g * sigmoid(alpha * g));
    }
  }

  void route(const float* logits, int T, const RouteParams& p, int32_t* ids,
             float* weights) override {
    const int E = p.n_experts, K = p.k, G = p.n_group;
    if (K < 1 || K > E) fail(ErrorKind::kInvalidArgument, "route: k = {} of {} experts", K, E);
    if (G < 1 || E % G || p.topk_group < 1 || p.topk_group > G ||
        (G > 1 && (E / G < 2 || K > p.topk_group * (E / G))))
      fail(ErrorKind::kInvalidArgument,
           "route: {} experts in {} groups, {} groups kept, k = {}: not a valid grouping", E, G,
           p.topk_group, K);
    const int per_group = E / G;
    std::vector<int> order(static_cast<size_t>(E)), gorder(static_cast<size_t>(G));
    std::vector<double> prob(static_cast<size_t>(E));
    std::vector<float> score(static_cast<size_t>(E)), gscore(static_cast<size_t>(G));
    std::vector<char> allowed(static_cast<size_t>(E));
    // Best first, equal scores to the lower index, NaN last (a strict weak order).
    auto better = [](const std::vector<float>& v) {
      return [&v](int a, int b) {
        const float sa = v[size_t(a)], sb = v[size_t(b)];
        if (std::isnan(sa) || std::isnan(sb))
          return std::isnan(sa) == std::isnan(sb) ? a < b : std::isnan(sb);
        return sa != sb ? sa > sb : a < b;
      };
    };
    for (int t = 0; t < T; t++) {
      const float* lg = logits + size_t(t) * E;
      double sum = 0;
      if (p.scoring == RouteScoring::kSoftmax) {
        // Softmax in double; the order is the logits' (exp is monotonic).
        float mx = -INFINITY;
        for (int e = 0; e < E; e++) mx = std::max(mx, lg[e]);
        for (int e = 0; e < E; e++) sum += (prob[size_t(e)] = std::exp(double(lg[e]) - mx));
        for (int e = 0; e < E; e++) score[size_t(e)] = lg[e];
      } else {
        for (int e = 0; e < E; e++) {
          prob[size_t(e)] = 1.0 / (1.0 + std::exp(-double(lg[e])));
          score[size_t(e)] = float(prob[size_t(e)]) + (p.bias ? p.bias[e] : 0.0f);
        }
      }
      int n_cand = E;
      std::iota(order.begin(), order.end(), 0);
      if (G > 1) {
        // Each group scored by the sum of its two best scores (a NaN among them makes the
        // group's score NaN: last); the topk_group best groups keep their experts.
        const auto cmp = better(score);
        for (int g = 0; g < G; g++) {
          int i1 = -1, i2 = -1;  // the group's best and second best expert
          for (int e = g * per_group; e < (g + 1) * per_group; e++) {
            if (i1 < 0 || cmp(e, i1)) {
              i2 = i1;
              i1 = e;
            } else if (i2 < 0 || cmp(e, i2)) {
              i2 = e;
            }
          }
          gscore[size_t(g)] = score[size_t(i1)] + score[size_t(i2)];
        }
        std::iota(gorder.begin(), gorder.end(), 0);
        std::partial_sort(gorder.begin(), gorder.begin() + p.topk_group, gorder.end(),
                          better(gscore));
        std::fill(allowed.begin(), allowed.end(), 0);
        for (int j = 0; j < p.topk_group; j++) {
          const int g = gorder[size_t(j)];
          std::fill(allowed.begin() + g * per_group, allowed.begin() + (g + 1) * per_group, 1);
        }
        n_cand = 0;
        for (int e = 0; e < E; e++)
          if (allowed[size_t(e)]) order[size_t(n_cand++)] = e;
      }
      std::partial_sort(order.begin(), order.begin() + K, order.begin() + n_cand, better(score));
      double top = 0;
      for (int j = 0; j < K; j++) top += prob[size_t(order[size_t(j)])];
      for (int j = 0; j < K; j++) {
        const int e = order[size_t(j)];
        ids[size_t(t) * K + j] = e;
        if (!weights) continue;
        const double w = p.norm_topk_prob ? prob[size_t(e)] / top
                         : p.scoring == RouteScoring::kSoftmax ? prob[size_t(e)] / sum
                                                               : prob[size_t(e)];
        weights[size_t(t) * K + j] = float(w) * p.scale;
      }
    }
  }

  void moe_experts(const float* xn, const int32_t* ids, const float* weights,
                   ExpertSource& experts, const SharedExpert* shared, float* out,
                   const MoeParams& p) override {
    const int T = p.T, K = p.k, H = p.hidden, I = p.inter;
    // The (token, choice) slots of each expert, in slot order.
    std::vector<std::vector<int32_t>> slots_of(experts.size());
    {
      std::vector<int> req_of_id;
      for (size_t i = 0; i < experts.size(); i++) {
        const int e = experts.id(i);
        if (size_t(e) >= req_of_id.size()) req_of_id.resize(size_t(e) + 1, -1);
        req_of_id[size_t(e)] = int(i);
      }
      for (int s = 0; s < T * K; s++) {
        const int e = ids[s];
        MF_CHECK(e >= 0 && size_t(e) < req_of_id.size() && req_of_id[size_t(e)] >= 0);
        slots_of[size_t(req_of_id[size_t(e)])].push_back(s);
      }
    }
    float* slots = grow(moe_slots_, size_t(T) * K * H);
    float* xe = grow(moe_x_, size_t(T) * H);
    float* g = grow(moe_g_, size_t(T) * std::max(I, shared ? shared->inter : 0));
    float* u = grow(moe_u_, size_t(T) * std::max(I, shared ? shared->inter : 0));
    float* y = grow(moe_y_, size_t(T) * H);
    std::vector<int32_t> rows;
    std::vector<float> scale;
    // Experts in arrival order; each writes only its own slots and the K slots of a token are
    // added in a fixed order, so the result does not depend on the order they came in.
    for (size_t done = 0; done < experts.size(); done++) {
      const size_t i = experts.next();
      const ExpertWeights& ew = experts.weights(i);
      const std::vector<int32_t>& sl = slots_of[i];
      const int n = int(sl.size());
      if (n == 0) continue;  // a resident expert no token chose
      rows.clear();
      scale.clear();
      for (int32_t s : sl) {
        rows.push_back(s / K);
        scale.push_back(weights[s]);
      }
      for (int r = 0; r < n; r++)
        std::memcpy(xe + size_t(r) * H, xn + size_t(rows[size_t(r)]) * H, size_t(H) * sizeof(float));
      matmul(ew.gate, xe, g, n);
      matmul(ew.up, xe, u, n);
      const int e = experts.id(i);
      if (p.gate_bias)  // gpt-oss: per-expert biases
        for (int r = 0; r < n; r++) add(g + size_t(r) * I, p.gate_bias + size_t(e) * I, size_t(I));
      if (p.up_bias)
        for (int r = 0; r < n; r++) add(u + size_t(r) * I, p.up_bias + size_t(e) * I, size_t(I));
      if (p.swiglu_limit > 0)
        clamped_swiglu(g, u, size_t(n) * I, p.swiglu_limit, p.swiglu_alpha);
      else
        silu_mul(g, u, size_t(n) * I);
      matmul(ew.down, g, y, n);
      if (p.down_bias)
        for (int r = 0; r < n; r++) add(y + size_t(r) * H, p.down_bias + size_t(e) * H, size_t(H));
      for (int r = 0; r < n; r++) {
        float* d = slots + size_t(sl[size_t(r)]) * H;
        const float* src = y + size_t(r) * H;
        for (int c = 0; c < H; c++) d[c] = src[c] * scale[size_t(r)];
      }
    }
    for (int t = 0; t < T; t++) {
      float* o = out + size_t(t) * H;
      std::memcpy(o, slots + size_t(t) * K * H, size_t(H) * sizeof(float));
      for (int j = 1; j < K; j++) add(o, slots + (size_t(t) * K + j) * H, size_t(H));
    }
    if (shared && shared->gate && *shared->gate) {
      const int S = shared->inter;
      matmul(*shared->gate, xn, g, T);
      matmul(*shared->up, xn, u, T);
      silu_mul(g, u, size_t(T) * S);
      matmul(*shared->down, g, y, T);
      if (shared->router && *shared->router) {
        float* sr = grow(moe_r_, size_t(T));
        matmul(*shared->router, xn, sr, T);
        for (int t = 0; t < T; t++) {
          const float gt = sigmoid(sr[t]);
          for (int c = 0; c < H; c++) y[size_t(t) * H + c] *= gt;
        }
      }
      add(out, y, size_t(T) * H);
    }
  }

  void check_finite(const float* x, size_t n, int tag) override {
    if (nonfinite_) return;
    const size_t i = first_nonfinite(x, n);
    if (i == n) return;
    nonfinite_ = true;
    nonfinite_tag_ = tag;
    nonfinite_index_ = i;
  }
  bool take_nonfinite(int* tag, size_t* index) override {
    if (!nonfinite_) return false;
    nonfinite_ = false;
    if (tag) *tag = nonfinite_tag_;
    if (index) *index = nonfinite_index_;
    return true;
  }

 private:
  static size_t first_nonfinite(const float* x, size_t n) {
    // NaN and Inf are the floats whose exponent bits are all set: then (u & kExp) + kExpLsb
    // carries into bit 31. Whole blocks OR that (integer and/add/or only, so -O2 vectorises it:
    // 3 GB/s on one loaded core, docs/2026-12-03-hostile-inputs.md); the block with a hit and
    // the tail are searched one float at a time.
    constexpr uint32_t kExp = 0x7f800000u, kExpLsb = 0x00800000u;
    constexpr size_t kBlock = 1024;  // a fixed trip count: GCC's -O2 cost model vectorises it
    auto bits = [](const float* v, size_t i) {
      uint32_t u;
      std::memcpy(&u, v + i, sizeof u);
      return u;
    };
    size_t b = 0;
    for (; b + kBlock <= n; b += kBlock) {
      uint32_t acc = 0;
      for (size_t i = 0; i < kBlock; i++) acc |= (bits(x + b, i) & kExp) + kExpLsb;
      if (acc >> 31) break;
    }
    for (size_t i = b; i < n; i++)
      if ((bits(x, i) & kExp) == kExp) return i;
    return n;
  }

  // Scratch of moe_experts, grown on demand (its size is set by the first micro-batch).
  static float* grow(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  Device& device_;
  ThreadPool pool_;
  bool exact_;
  QuantizedActs qx_;  // matmul's quantised activations (the fast path)
  int pos_ = 0;
  std::vector<float> moe_slots_, moe_x_, moe_g_, moe_u_, moe_y_, moe_r_;
  bool nonfinite_ = false;
  int nonfinite_tag_ = 0;
  size_t nonfinite_index_ = 0;
};

// Expert slots in host memory: anonymous, committed page by page as slots fill (RSS follows
// what is cached), on transparent huge pages where the kernel gives them.
class HostExpertMemory final : public ExpertMemory {
 public:
  explicit HostExpertMemory(Device& device) : device_(device) {}
  Device& device() override { return device_; }
  uint8_t* alloc(size_t bytes) override {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
      fail(ErrorKind::kOutOfMemory, "cannot reserve {} bytes of host memory for the expert "
           "cache: {} (a smaller --expert-cache helps)", bytes, std::strerror(errno));
    ::madvise(p, bytes, MADV_HUGEPAGE);  // fewer faults and TLB misses; advice only
    return static_cast<uint8_t*>(p);
  }
  void release(uint8_t* p, size_t bytes) override {
    if (p) ::munmap(p, bytes);
  }
  bool host_visible() const override { return true; }
  void write(uint8_t* dst, const uint8_t* host, size_t n) override { std::memcpy(dst, host, n); }

 private:
  Device& device_;
};

// The CPU reads the package's memory directly: binding a model copies nothing.
class CpuDevice final : public Device {
 public:
  const char* name() const override { return "cpu"; }
  std::shared_ptr<const ModelWeights> bind(const Model& model) override {
    return std::make_shared<const ModelWeights>(model.host_weights());
  }
  ExpertMemory& expert_memory() override { return memory_; }
  std::unique_ptr<Context> context(int threads) override {
    ContextOptions o;
    o.threads = threads;
    o.exact = true;
    return context(o);
  }
  std::unique_ptr<Context> context(const ContextOptions& o) override {
    return std::make_unique<CpuContext>(*this, o);
  }

 private:
  HostExpertMemory memory_{*this};
};

}  // namespace

Device& cpu_device() {
  static CpuDevice device;
  return device;
}

std::unique_ptr<Context> make_cpu_context(int threads) { return cpu_device().context(threads); }
std::unique_ptr<Context> make_cpu_context(const ContextOptions& o) {
  return cpu_device().context(o);
}

}  // namespace moeflux
