// CPU backend: f32 compute over f32/bf16/f16 and q8/q4/q2 weights. Work is split by output rows
// (or heads), never inside a reduction, so results are bit-identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/deltanet.h"
#include "cpu/kernels.h"
#include "cpu/matmul.h"
#include "engine/backend.h"
#include "util/error.h"
#include "util/thread_pool.h"

namespace moeflux {

namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  const char* name() const override { return "cpu"; }
  int threads() const override { return pool_.size(); }

  float* alloc(size_t n) override {
    void* p = std::calloc(std::max<size_t>(n, 1), sizeof(float));
    if (!p) fail(ErrorKind::kOutOfMemory, "out of memory: cannot allocate {} floats ({} bytes)", n,
                 n * sizeof(float));
    return static_cast<float*>(p);
  }
  void release(float* p) override { std::free(p); }
  void upload(float* dst, const float* host, size_t n) override {
    std::memcpy(dst, host, n * sizeof(float));
  }
  void download(float* host, const float* src, size_t n) override {
    std::memcpy(host, src, n * sizeof(float));
  }
  void copy(float* dst, const float* src, size_t n) override {
    std::memmove(dst, src, n * sizeof(float));
  }

  void embed(const Mat& E, const int32_t* tokens, int T, float* out) override {
    for (int t = 0; t < T; t++) mat_row_f32(E, tokens[t], out + size_t(t) * E.cols);
  }

  void matmul(const Mat& W, const float* x, float* y, int T) override {
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

  void rope(float* x, int T, int n_heads, int row_stride, int head_stride, int rot_dim, int pos0,
            double theta) override {
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
      for (int h = 0; h < n_heads; h++) {
        float* v = x + size_t(t) * row_stride + size_t(h) * head_stride;
        for (int i = 0; i < half; i++) {
          float a = v[i], b = v[i + half];
          v[i] = a * cs[size_t(i)] - b * sn[size_t(i)];
          v[i + half] = b * cs[size_t(i)] + a * sn[size_t(i)];
        }
      }
    }
  }

  void attention(const float* q, const float* k, const float* v, float* out, int T, int pos0,
                 const AttentionParams& p) override {
    const int group = p.n_heads / p.n_kv_heads, d = p.head_dim;
    pool_.parallel_for(int64_t(T) * p.n_heads, [&](int64_t i0, int64_t i1) {
      std::vector<float> sc;
      for (int64_t i = i0; i < i1; i++) {
        const int t = int(i / p.n_heads), h = int(i % p.n_heads), kvh = h / group;
        const int n = pos0 + t + 1;
        const float* qv = q + size_t(t) * p.q_stride + size_t(h) * p.q_head_stride;
        sc.resize(size_t(n));
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
          const float* kv = k + size_t(j) * p.kv_stride + size_t(kvh) * d;
          float s = dot_f32(qv, kv, d) * p.scale;
          sc[size_t(j)] = s;
          mx = std::max(mx, s);
        }
        float sum = 0;
        for (int j = 0; j < n; j++) sum += (sc[size_t(j)] = std::exp(sc[size_t(j)] - mx));
        const float inv = 1.0f / sum;
        float* o = out + size_t(t) * p.n_heads * d + size_t(h) * d;
        std::fill(o, o + d, 0.0f);
        for (int j = 0; j < n; j++) {
          const float* vv = v + size_t(j) * p.kv_stride + size_t(kvh) * d;
          axpy(sc[size_t(j)] * inv, vv, o, d);
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
  void gather_rows(const float* src, const int32_t* idx, int rows, int n, float* dst) override {
    for (int r = 0; r < rows; r++)
      std::memcpy(dst + size_t(r) * n, src + size_t(idx[r]) * n, size_t(n) * sizeof(float));
  }
  void scatter_rows_scaled(const float* src, const int32_t* idx, const float* scale, int rows,
                           int n, float* dst) override {
    for (int r = 0; r < rows; r++) {
      float* d = dst + size_t(idx[r]) * n;
      const float* s = src + size_t(r) * n;
      for (int i = 0; i < n; i++) d[i] = s[i] * scale[r];
    }
  }
  void sum_slots(const float* slots, int T, int k, int n, float* out) override {
    for (int t = 0; t < T; t++) {
      float* o = out + size_t(t) * n;
      std::memcpy(o, slots + size_t(t) * k * n, size_t(n) * sizeof(float));
      for (int j = 1; j < k; j++) add(o, slots + (size_t(t) * k + j) * n, size_t(n));
    }
  }
  void scale_rows_sigmoid(float* y, const float* s, int T, int n) override {
    for (int t = 0; t < T; t++) {
      const float g = sigmoid(s[t]);
      for (int i = 0; i < n; i++) y[size_t(t) * n + i] *= g;
    }
  }

  size_t first_nonfinite(const float* x, size_t n) override {
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

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace moeflux
