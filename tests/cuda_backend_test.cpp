// The CUDA backend against the CPU backend, op by op on random inputs (the CPU backend is the
// spec; tests/backend_test.cpp checks both against float64), then whole models against HF's
// float64 references at the oracle's tolerance (DESIGN.md §4), plus the bit-identity promises:
// a token alone or in a batch, repeated runs, cache budgets. Every test skips where
// cuda_usable() is false (no GPU: this machine, CI) and says why.
#ifdef MOEFLUX_HAVE_CUDA

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>

#include "cuda/cuda_device.h"
#include "format/quant.h"
#include "test_util.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

#define SKIP_WITHOUT_GPU()                                      \
  do {                                                          \
    std::string why_;                                           \
    if (!cuda_usable(&why_)) GTEST_SKIP() << "no CUDA: " << why_; \
  } while (0)

std::vector<float> rand_vec(size_t n, uint32_t seed, float lo = -1, float hi = 1) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// One op run on a context: host inputs in, host outputs back.
struct Side {
  std::unique_ptr<Context> ctx;
  std::vector<void*> ptrs;
  explicit Side(Device& d) : ctx(d.context(1)) {}
  ~Side() {
    for (void* p : ptrs) ctx->release(p);
  }
  template <typename V>
  auto* put(const std::vector<V>& h) {
    void* p = ctx->alloc_bytes(h.size() * sizeof(V));
    ctx->upload_bytes(p, h.data(), h.size() * sizeof(V));
    ptrs.push_back(p);
    return static_cast<V*>(p);
  }
  float* zeros(size_t n) {
    ptrs.push_back(ctx->alloc(n));
    return static_cast<float*>(ptrs.back());
  }
  std::vector<float> get(const float* p, size_t n) {
    std::vector<float> h(n);
    ctx->download(h.data(), p, n);
    return h;
  }
  std::vector<int32_t> get_i(const int32_t* p, size_t n) {
    std::vector<int32_t> h(n);
    ctx->download(static_cast<void*>(h.data()), p, n * sizeof(int32_t));
    return h;
  }
};

// A weight matrix on the host, and its copy in a context's memory.
struct HostMat {
  Mat m;
  std::vector<float> f32;
  std::vector<uint16_t> half, scales, biases;
  std::vector<uint32_t> packed;
};

std::unique_ptr<HostMat> make_mat(DType dt, int64_t rows, int64_t cols, uint32_t seed) {
  auto h = std::make_unique<HostMat>();
  auto src = rand_vec(size_t(rows * cols), seed);
  h->m.dtype = dt;
  h->m.rows = rows;
  h->m.cols = cols;
  if (dt == DType::kF32) {
    h->f32 = src;
    h->m.data = h->f32.data();
  } else if (dt == DType::kBF16 || dt == DType::kF16) {
    for (float x : src) h->half.push_back(dt == DType::kBF16 ? f32_to_bf16(x) : f32_to_f16(x));
    h->m.data = h->half.data();
  } else {
    const int bits = quant_bits(dt), group = 64;
    const QuantLayout L = quant_layout(rows, cols, bits, group);
    h->packed.resize(L.packed_bytes / 4);
    h->scales.resize(L.scales_bytes / 2);
    h->biases.resize(L.biases_bytes / 2);
    quantize_rows(src.data(), rows, cols, bits, group, h->packed.data(), h->scales.data(),
                  h->biases.data());
    h->m.data = h->packed.data();
    h->m.scales = h->scales.data();
    h->m.biases = h->biases.data();
    h->m.group = group;
  }
  return h;
}

Mat on(Side& s, const HostMat& h) {
  Mat m = h.m;
  if (!h.f32.empty()) m.data = s.put(h.f32);
  if (!h.half.empty()) m.data = s.put(h.half);
  if (!h.packed.empty()) {
    m.data = s.put(h.packed);
    m.scales = s.put(h.scales);
    m.biases = s.put(h.biases);
  }
  return m;
}

const DType kTypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kQ8, DType::kQ4, DType::kQ2};

// |cuda - cpu| <= rtol * max(1, max|cpu|) elementwise: far above f32 rounding in a reordered
// sum, far below any indexing or formula mistake.
void expect_near(const std::string& what, const std::vector<float>& got,
                 const std::vector<float>& want, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double m = 1;
  for (float x : want)
    if (std::isfinite(x)) m = std::max(m, double(std::fabs(x)));
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); i++) {
    if (std::isnan(got[i]) && std::isnan(want[i])) continue;  // NaN in, NaN out on both
    const double d = std::fabs(double(got[i]) - double(want[i]));
    if (!(d <= rtol * m) && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "]: cuda " << got[i] << " cpu " << want[i];
    if (!(d <= worst)) worst = d;
  }
  ::testing::Test::RecordProperty(what, fmt::format("{:.3g}", worst / m));
}

void expect_bits(const std::string& what, const std::vector<float>& a,
                 const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << what;
}

// Runs `op` on a CPU and a CUDA side, each returning its outputs; compares them, and runs the
// CUDA side a second time for the same bits.
void both(const std::string& what, double rtol,
          const std::function<std::vector<float>(Side&)>& op) {
  Side cpu(cpu_device()), gpu(cuda_device()), gpu2(cuda_device());
  const auto want = op(cpu);
  const auto got = op(gpu);
  expect_near(what, got, want, rtol);
  expect_bits(what + " repeated", op(gpu2), got);
}

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};

TEST(CudaDevice, UsableOrClearError) {
  std::string why;
  if (cuda_usable(&why)) {
    EXPECT_STREQ(cuda_device().name(), "cuda");
    return;
  }
  EXPECT_FALSE(why.empty());
  try {
    cuda_device();
    FAIL() << "cuda_device() did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--backend cpu"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
  GTEST_SKIP() << "no CUDA: " << why;
}

TEST_F(Cuda, Memory) {
  Side s(cuda_device());
  const size_t n = 1000;
  float* z = s.zeros(n);
  for (float x : s.get(z, n)) ASSERT_EQ(x, 0.0f);
  const auto h = rand_vec(n, 1);
  float* a = s.put(h);
  expect_bits("upload/download", s.get(a, n), h);
  s.ctx->copy(z + 10, a + 20, 500);
  const auto c = s.get(z, n);
  for (size_t i = 0; i < n; i++) EXPECT_EQ(c[i], i >= 10 && i < 510 ? h[i + 10] : 0.0f) << i;
  s.ctx->copy(a + 5, a, 600);  // overlapping: memmove
  const auto m = s.get(a, n);
  for (size_t i = 0; i < n; i++) EXPECT_EQ(m[i], i < 5 ? h[i] : i < 605 ? h[i - 5] : h[i]) << i;
}

TEST_F(Cuda, EmbedAndMatmul) {
  for (DType dt : kTypes) {
    auto E = make_mat(dt, 37, 128, 100 + uint32_t(dt));
    const std::vector<int32_t> tokens = {5, 0, 36, 5, 17};
    both(fmt::format("embed_{}", dtype_name(dt)), 0, [&](Side& s) {
      float* y = s.zeros(5 * 128);
      s.ctx->embed(on(s, *E), s.put(tokens), 5, y);
      return s.get(y, 5 * 128);
    });
    // The last two take the kernels' other row splits: 4 rows per warp at T = 1 (many rows),
    // and four warps per row with 2 rows each (few rows of many columns).
    for (auto [rows, cols] : {std::pair{40, 192}, std::pair{129, 512}, std::pair{3, 64},
                              std::pair{20000, 256}, std::pair{2048, 4096}}) {
      auto W = make_mat(dt, rows, cols, 200 + uint32_t(dt) + uint32_t(rows));
      for (int T : {1, 3, 17}) {
        const auto x = rand_vec(size_t(T * cols), 300 + uint32_t(T), -2, 2);
        both(fmt::format("matmul_{}_{}x{}_T{}", dtype_name(dt), rows, cols, T), 4e-6,
             [&](Side& s) {
               float* y = s.zeros(size_t(T * rows));
               s.ctx->matmul(on(s, *W), s.put(x), y, T);
               return s.get(y, size_t(T * rows));
             });
      }
      // A token alone and in a batch: the same bits.
      Side s(cuda_device());
      const Mat m = on(s, *W);
      const auto x = rand_vec(size_t(17 * cols), 7, -2, 2);
      float* y = s.zeros(size_t(17 * rows));
      s.ctx->matmul(m, s.put(x), y, 17);
      const auto all = s.get(y, size_t(17 * rows));
      float* y1 = s.zeros(size_t(rows));
      s.ctx->matmul(m, s.put(std::vector<float>(x.begin() + 9 * cols, x.begin() + 10 * cols)),
                    y1, 1);
      expect_bits(fmt::format("matmul_{} token alone vs batch", dtype_name(dt)),
                  s.get(y1, size_t(rows)),
                  std::vector<float>(all.begin() + 9 * rows, all.begin() + 10 * rows));
    }
  }
}

TEST_F(Cuda, NormsAndElementwise) {
  const int rows = 6, n = 96, stride = 131;
  for (bool with_w : {true, false})
    for (bool in_place : {false, true})
      both(fmt::format("rmsnorm_w{}_inplace{}", with_w, in_place), 4e-6, [&](Side& s) {
        auto x = rand_vec(size_t(rows * stride), 400, -3, 3);
        for (int i = 0; i < n; i++) x[size_t(5 * stride + i)] *= 1e-4f;
        float* xd = s.put(x);
        float* w = with_w ? s.put(rand_vec(n, 401, 0.5f, 1.5f)) : nullptr;
        float* y = in_place ? xd : s.put(std::vector<float>(x.size(), 7.0f));
        s.ctx->rmsnorm(xd, w, y, rows, n, stride, 1e-6f);
        return s.get(y, x.size());
      });
  both("gated_rmsnorm", 4e-6, [&](Side& s) {
    float* x = s.put(rand_vec(5 * 80, 1100, -2, 2));
    s.ctx->gated_rmsnorm(x, s.put(rand_vec(5 * 80, 1101, -5, 5)), s.put(rand_vec(80, 1102)), 5,
                         80, 1e-6f);
    return s.get(x, 5 * 80);
  });
  both("add_silu_mul", 4e-6, [&](Side& s) {
    float* y = s.put(rand_vec(1001, 1200, -4, 4));
    float* g = s.put(rand_vec(1001, 1201, -6, 6));
    s.ctx->add(y, g, 1001);
    s.ctx->silu_mul(g, y, 1001);
    auto out = s.get(y, 1001);
    const auto gg = s.get(g, 1001);
    out.insert(out.end(), gg.begin(), gg.end());
    return out;
  });
  both("mul_sigmoid_gate", 4e-6, [&](Side& s) {
    const int T = 5, nh = 3, d = 16, gs = nh * 2 * d + 3;
    float* o = s.put(rand_vec(size_t(T * nh * d), 700, -2, 2));
    float* q = s.put(rand_vec(size_t(T * gs), 701, -6, 6));
    s.ctx->mul_sigmoid_gate(o, q + d, T, nh, d, gs, 2 * d);
    return s.get(o, size_t(T * nh * d));
  });
}

TEST_F(Cuda, RopeKvAttention) {
  AttentionParams p;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.head_dim = 64;
  p.q_head_stride = 2 * p.head_dim;
  p.q_stride = p.n_heads * p.q_head_stride;
  p.kv_stride = p.n_kv_heads * p.head_dim;
  p.scale = 1.0f / std::sqrt(float(p.head_dim));
  for (auto [T, pos0] : {std::pair{1, 0}, std::pair{1, 9}, std::pair{17, 4}, std::pair{3, 1000},
                         std::pair{1, 3000}}) {
    const int ctx = pos0 + T + 3;
    both(fmt::format("rope_kv_attention_T{}_pos{}", T, pos0), 2e-5, [&](Side& s) {
      float* q = s.put(rand_vec(size_t(T * p.q_stride), 600 + uint32_t(T), -2, 2));
      auto kh = rand_vec(size_t(ctx * p.kv_stride), 601, -2, 2);
      auto vh = rand_vec(size_t(ctx * p.kv_stride), 602);
      for (size_t i = size_t(pos0) * p.kv_stride; i < kh.size(); i++) kh[i] = vh[i] = 1e4f;
      float* k = s.put(kh);
      float* v = s.put(vh);
      float* kn = s.put(rand_vec(size_t(T * p.kv_stride), 603, -2, 2));
      float* vn = s.put(rand_vec(size_t(T * p.kv_stride), 604));
      s.ctx->set_pos(pos0);
      s.ctx->rope(q, T, p.n_heads, p.q_stride, p.q_head_stride, p.head_dim / 4, 1e7);
      s.ctx->rope(kn, T, p.n_kv_heads, p.kv_stride, p.head_dim, p.head_dim / 4, 1e7);
      s.ctx->kv_append(k, kn, T, p.kv_stride);
      s.ctx->kv_append(v, vn, T, p.kv_stride);
      float* o = s.put(std::vector<float>(size_t(T * p.n_heads * p.head_dim), 3.0f));
      s.ctx->attention(q, k, v, o, T, p);
      auto out = s.get(o, size_t(T * p.n_heads * p.head_dim));
      const auto qq = s.get(q, size_t(T * p.q_stride));
      out.insert(out.end(), qq.begin(), qq.end());
      return out;
    });
  }
}

TEST_F(Cuda, DeltaNet) {
  both("conv1d_silu", 4e-6, [&](Side& s) {
    const int C = 40, K = 4;
    float* w = s.put(rand_vec(size_t(C * K), 800));
    float* st = s.put(rand_vec(size_t((K - 1) * C), 801, -2, 2));
    std::vector<float> out;
    for (int T : {5, 1, 2}) {
      float* y = s.zeros(size_t(T * C));
      s.ctx->conv1d_silu(s.put(rand_vec(size_t(T * C), 802 + uint32_t(T), -2, 2)), st, w, y, T, C,
                         K);
      const auto yy = s.get(y, size_t(T * C));
      out.insert(out.end(), yy.begin(), yy.end());
    }
    const auto ss = s.get(st, size_t((K - 1) * C));
    out.insert(out.end(), ss.begin(), ss.end());
    return out;
  });
  both("deltanet_gates", 4e-6, [&](Side& s) {
    auto a = rand_vec(42, 900, -8, 8);
    a[0] = 40, a[1] = -40;
    float* ad = s.put(a);
    float* bd = s.put(rand_vec(42, 901, -10, 10));
    s.ctx->deltanet_gates(ad, bd, s.put(rand_vec(6, 902, -2, 2)), s.put(rand_vec(6, 903)), 7, 6);
    auto out = s.get(ad, 42);
    const auto b = s.get(bd, 42);
    out.insert(out.end(), b.begin(), b.end());
    return out;
  });
  for (int chunk : {0, 4})
    for (DeltaNetParams p : {DeltaNetParams{2, 4, 32, 80}, DeltaNetParams{2, 4, 128, 128},
                             DeltaNetParams{2, 4, 128, 64}})
      both(fmt::format("deltanet_chunk{}_{}x{}", chunk, p.k_dim, p.v_dim), 2e-5, [&](Side& s) {
        const int C = 2 * p.k_heads * p.k_dim + p.v_heads * p.v_dim, nv = p.v_heads;
        float* st = s.put(rand_vec(size_t(nv * p.k_dim * p.v_dim), 1000, -0.3f, 0.3f));
        std::vector<float> out;
        for (int T : {17, 1, 3}) {
          float* qkv = s.put(rand_vec(size_t(T * C), 1001 + uint32_t(T)));
          float* g = s.put(rand_vec(size_t(T * nv), 1002 + uint32_t(T), -1.5f, -0.01f));
          float* b = s.put(rand_vec(size_t(T * nv), 1003 + uint32_t(T), 0.05f, 0.95f));
          float* o = s.zeros(size_t(T * nv * p.v_dim));
          if (chunk)
            s.ctx->deltanet_chunked(qkv, g, b, st, o, T, p, chunk);
          else
            s.ctx->deltanet(qkv, g, b, st, o, T, p);
          const auto oo = s.get(o, size_t(T * nv * p.v_dim));
          out.insert(out.end(), oo.begin(), oo.end());
        }
        const auto ss = s.get(st, size_t(nv * p.k_dim * p.v_dim));
        out.insert(out.end(), ss.begin(), ss.end());
        return out;
      });
}

TEST_F(Cuda, Route) {
  for (int E : {8, 256, 512})
    for (int k : {1, 8, 16})
      for (RouteScoring sc : {RouteScoring::kSoftmax, RouteScoring::kSigmoid})
        for (bool norm : {true, false}) {
          if (k > E) continue;
          const int T = 5;
          auto logits = rand_vec(size_t(T * E), 1400 + uint32_t(E + k), -4, 4);
          logits[3] = logits[7 % E];  // a tie
          logits[size_t(E) + 1] = NAN;
          // Token 3: -0 and +0 are the best scores and equal: the lower index comes first.
          for (int e = 0; e < E; e++) logits[size_t(3 * E + e)] = -std::fabs(logits[size_t(3 * E + e)]) - 0.5f;
          logits[size_t(3 * E + 5)] = 0.0f;
          logits[size_t(3 * E + 1)] = -0.0f;
          std::vector<int32_t> ids_cpu, ids_gpu;
          const std::string what =
              fmt::format("route_E{}_k{}_{}_norm{}", E, k, int(sc), int(norm));
          both(what, 1e-6, [&](Side& s) {
            RouteParams p;
            p.n_experts = E;
            p.k = k;
            p.scoring = sc;
            p.norm_topk_prob = norm;
            p.scale = 1.5f;
            if (sc == RouteScoring::kSigmoid) p.bias = s.put(rand_vec(size_t(E), 1500, -0.1f, 0.1f));
            int32_t* ids = static_cast<int32_t*>(s.ctx->alloc_bytes(size_t(T * k) * 4));
            s.ptrs.push_back(ids);
            float* w = s.zeros(size_t(T * k));
            s.ctx->route(s.put(logits), T, p, ids, w);
            auto out = s.get(w, size_t(T * k));
            for (int32_t id : s.get_i(ids, size_t(T * k))) out.push_back(float(id));
            return out;
          });
        }
}

// ---- moe_experts: experts from a host table, uploaded to the GPU side -----------------------

class TableSource final : public ExpertSource {
 public:
  TableSource(std::vector<int> ids, std::vector<ExpertWeights> w, std::vector<size_t> order)
      : ids_(std::move(ids)), w_(std::move(w)), order_(std::move(order)) {}
  size_t size() const override { return ids_.size(); }
  int id(size_t i) const override { return ids_[i]; }
  size_t next() override { return order_[at_++]; }
  const ExpertWeights& weights(size_t i) const override { return w_[i]; }

 private:
  std::vector<int> ids_;
  std::vector<ExpertWeights> w_;
  std::vector<size_t> order_;
  size_t at_ = 0;
};

TEST_F(Cuda, MoeExperts) {
  const int E = 6, K = 3, H = 128, I = 64, S = 64;
  for (DType dt : {DType::kF32, DType::kQ4}) {
    std::vector<std::unique_ptr<HostMat>> mats;
    for (int e = 0; e < E; e++) {
      mats.push_back(make_mat(dt, I, H, 2000 + uint32_t(e)));
      mats.push_back(make_mat(dt, I, H, 2100 + uint32_t(e)));
      mats.push_back(make_mat(dt, H, I, 2200 + uint32_t(e)));
    }
    auto sg = make_mat(dt, S, H, 2300), su = make_mat(dt, S, H, 2301), sd = make_mat(dt, H, S, 2302);
    auto sr = make_mat(DType::kF32, 1, H, 2303);
    for (int T : {1, 7}) {
      // ids: per token K distinct experts; expert 4 is never used (a request with no slots).
      std::vector<int32_t> ids;
      for (int t = 0; t < T; t++)
        for (int j = 0; j < K; j++) ids.push_back(int32_t(std::vector<int>{0, 1, 2, 3, 5}[size_t((t + 2 * j) % 5)]));
      const auto x = rand_vec(size_t(T * H), 2400 + uint32_t(T), -2, 2);
      const auto w = rand_vec(size_t(T * K), 2401, 0.1f, 1);
      std::vector<float> first;
      for (bool reversed : {false, true})
        both(fmt::format("moe_experts_{}_T{}_rev{}", dtype_name(dt), T, int(reversed)), 4e-6,
             [&](Side& s) {
               std::vector<int> req = {5, 3, 0, 1, 2, 4};
               std::vector<ExpertWeights> ew;
               for (int e : req)
                 ew.push_back({on(s, *mats[size_t(3 * e)]), on(s, *mats[size_t(3 * e + 1)]),
                               on(s, *mats[size_t(3 * e + 2)])});
               std::vector<size_t> order = {0, 1, 2, 3, 4, 5};
               if (reversed) std::reverse(order.begin(), order.end());
               TableSource src(req, ew, order);
               const Mat g = on(s, *sg), u = on(s, *su), d = on(s, *sd), r = on(s, *sr);
               SharedExpert sh{&g, &u, &d, &r, S};
               MoeParams p{T, K, H, I};
               float* out = s.zeros(size_t(T * H));
               s.ctx->moe_experts(s.put(x), s.put(ids), s.put(w), src, &sh, out, p);
               return s.get(out, size_t(T * H));
             });
    }
  }
}

// Every expert resident (ids read on the device: moe.cu for few slots, the grouped path for
// many): the same bits as the grouped path with the experts in request order, for every weight
// type, with and without a shared expert and its router.
class ResidentTable final : public ExpertSource {
 public:
  explicit ResidentTable(std::vector<ExpertWeights> w) : w_(std::move(w)) {}
  size_t size() const override { return w_.size(); }
  int id(size_t i) const override { return int(i); }
  size_t next() override { return at_++; }
  const ExpertWeights& weights(size_t i) const override { return w_[i]; }
  bool all_resident() const override { return true; }

 private:
  std::vector<ExpertWeights> w_;
  size_t at_ = 0;
};

TEST_F(Cuda, MoeExpertsResidentSameBits) {
  const int E = 12, K = 6, H = 256, I = 128, S = 192;  // K + 1 > kDownSlots: two rounds
  for (DType dt : kTypes) {
    std::vector<std::unique_ptr<HostMat>> mats;
    for (int e = 0; e < E; e++) {
      mats.push_back(make_mat(dt, I, H, 5000 + uint32_t(e)));
      mats.push_back(make_mat(dt, I, H, 5100 + uint32_t(e)));
      mats.push_back(make_mat(dt, H, I, 5200 + uint32_t(e)));
    }
    auto sg = make_mat(dt, S, H, 5300), su = make_mat(dt, S, H, 5301), sd = make_mat(dt, H, S, 5302);
    auto sr = make_mat(DType::kF32, 1, H, 5303);
    // A shared expert of the routed experts' shape: the per-slot kernels take it as one more job.
    auto fg = make_mat(dt, I, H, 5304), fu = make_mat(dt, I, H, 5305), fd = make_mat(dt, H, I, 5306);
    // none, no router, router; 3, 4: of the routed shape, no router, router
    for (int shared_kind : {0, 1, 2, 3, 4}) {
      for (int T : {1, 3, 10, 40, 130}) {  // T*K <= 64: per slot; above: grouped on the device
        std::mt19937 g(uint32_t(77 + T));
        std::vector<int32_t> ids;
        for (int t = 0; t < T; t++) {
          std::vector<int32_t> perm(E);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), g);
          ids.insert(ids.end(), perm.begin(), perm.begin() + K);
        }
        const auto x = rand_vec(size_t(T * H), 5400 + uint32_t(T), -2, 2);
        const auto w = rand_vec(size_t(T * K), 5401, 0.1f, 1);
        Side s(cuda_device());
        std::vector<ExpertWeights> ew;
        for (int e = 0; e < E; e++)
          ew.push_back({on(s, *mats[size_t(3 * e)]), on(s, *mats[size_t(3 * e + 1)]),
                        on(s, *mats[size_t(3 * e + 2)])});
        const bool routed_shape = shared_kind >= 3;
        const Mat sgm = on(s, routed_shape ? *fg : *sg), sum = on(s, routed_shape ? *fu : *su),
                  sdm = on(s, routed_shape ? *fd : *sd), srm = on(s, *sr);
        SharedExpert sh{&sgm, &sum, &sdm, shared_kind == 2 || shared_kind == 4 ? &srm : nullptr,
                        routed_shape ? I : S};
        const SharedExpert* shp = shared_kind ? &sh : nullptr;
        MoeParams p{T, K, H, I};
        const float *xd = s.put(x), *wd = s.put(w);
        const int32_t* idd = s.put(ids);
        // Grouped: the experts the ids use, in reverse id order.
        std::vector<int> req;
        std::vector<ExpertWeights> rw;
        for (int e = E - 1; e >= 0; e--)
          if (std::find(ids.begin(), ids.end(), e) != ids.end()) {
            req.push_back(e);
            rw.push_back(ew[size_t(e)]);
          }
        std::vector<size_t> order(req.size());
        std::iota(order.begin(), order.end(), size_t(0));
        TableSource grouped(req, rw, order);
        float* out_g = s.zeros(size_t(T * H));
        s.ctx->moe_experts(xd, idd, wd, grouped, shp, out_g, p);
        ResidentTable resident(ew);
        float* out_r = s.zeros(size_t(T * H));
        s.ctx->moe_experts(xd, idd, wd, resident, shp, out_r, p);
        const auto a = s.get(out_g, size_t(T * H)), b = s.get(out_r, size_t(T * H));
        bool finite = true;
        for (float v : b) finite &= std::isfinite(v);
        EXPECT_TRUE(finite);
        expect_bits(fmt::format("resident {} shared {} T {}", dtype_name(dt), shared_kind, T), b, a);
      }
    }
  }
}

// The fused forms give the ops' own bits: add_rmsnorm = add then rmsnorm; matmul_n (one launch
// for a token) = a matmul per matrix, for every weight type and both row splits (ks 1 and 4).
TEST_F(Cuda, FusedFormsSameBits) {
  Side s(cuda_device());
  const int rows = 3, n = 2048 + 96;
  const auto x0 = rand_vec(size_t(rows * n), 6000, -3, 3), d = rand_vec(size_t(rows * n), 6001);
  const auto w = rand_vec(size_t(n), 6002, 0.5f, 1.5f);
  float *xa = s.put(x0), *xb = s.put(x0), *dd = s.put(d), *wd = s.put(w);
  float *ya = s.zeros(size_t(rows * n)), *yb = s.zeros(size_t(rows * n));
  s.ctx->add(xa, dd, size_t(rows * n));
  s.ctx->rmsnorm(xa, wd, ya, rows, n, n, 1e-6f);
  s.ctx->add_rmsnorm(xb, dd, wd, yb, rows, n, 1e-6f);
  expect_bits("add_rmsnorm x", s.get(xb, size_t(rows * n)), s.get(xa, size_t(rows * n)));
  expect_bits("add_rmsnorm y", s.get(yb, size_t(rows * n)), s.get(ya, size_t(rows * n)));

  for (DType dt : kTypes) {
    // [8192, 2048]: one warp per row; [1000, 2048] f32/bf16: four; tiny [37, 2048] and [5, 2048].
    std::vector<std::unique_ptr<HostMat>> hm;
    for (int64_t r : {8192, 1000, 37, 5}) hm.push_back(make_mat(dt, r, 2048, 6100 + uint32_t(r)));
    const auto xv = rand_vec(2048, 6200);
    const float* xd = s.put(xv);
    std::vector<Mat> ms;
    std::vector<float*> a, b;
    for (auto& h : hm) {
      ms.push_back(on(s, *h));
      a.push_back(s.zeros(size_t(h->m.rows)));
      b.push_back(s.zeros(size_t(h->m.rows)));
    }
    const Mat* ptrs[] = {&ms[0], &ms[1], &ms[2], &ms[3]};
    for (size_t i = 0; i < ms.size(); i++) s.ctx->matmul(ms[i], xd, a[i], 1);
    s.ctx->matmul_n(ptrs, b.data(), 4, xd, 1);
    for (size_t i = 0; i < ms.size(); i++)
      expect_bits(fmt::format("matmul_n {} [{}]", dtype_name(dt), ms[i].rows),
                  s.get(b[i], size_t(ms[i].rows)), s.get(a[i], size_t(ms[i].rows)));
  }
  // Mixed types in one call (the kernel that reads each block's type) and a shared expert
  // router's single row.
  {
    std::vector<std::unique_ptr<HostMat>> hm;
    hm.push_back(make_mat(DType::kQ4, 300, 2048, 6300));
    hm.push_back(make_mat(DType::kF32, 1, 2048, 6301));
    hm.push_back(make_mat(DType::kBF16, 77, 2048, 6302));
    const float* xd = s.put(rand_vec(2048, 6303));
    std::vector<Mat> ms;
    std::vector<float*> a, b;
    for (auto& h : hm) {
      ms.push_back(on(s, *h));
      a.push_back(s.zeros(size_t(h->m.rows)));
      b.push_back(s.zeros(size_t(h->m.rows)));
    }
    const Mat* ptrs[] = {&ms[0], &ms[1], &ms[2]};
    for (size_t i = 0; i < ms.size(); i++) s.ctx->matmul(ms[i], xd, a[i], 1);
    s.ctx->matmul_n(ptrs, b.data(), 3, xd, 1);
    for (size_t i = 0; i < ms.size(); i++)
      expect_bits(fmt::format("matmul_n mixed [{}]", ms[i].rows), s.get(b[i], size_t(ms[i].rows)),
                  s.get(a[i], size_t(ms[i].rows)));
  }
}

TEST_F(Cuda, CheckFinite) {
  Side s(cuda_device());
  auto h = rand_vec(5000, 3000);
  float* x = s.put(h);
  s.ctx->check_finite(x, 5000, 1);
  int tag = -1;
  size_t idx = 0;
  EXPECT_FALSE(s.ctx->take_nonfinite(&tag, &idx));
  h[4000] = INFINITY;
  h[4321] = NAN;
  float* y = s.put(h);
  s.ctx->check_finite(x, 5000, 2);
  s.ctx->check_finite(y, 5000, 3);
  s.ctx->check_finite(y, 100, 4);
  h[10] = NAN;
  s.ctx->check_finite(s.put(h), 5000, 5);  // noted after the first: ignored
  ASSERT_TRUE(s.ctx->take_nonfinite(&tag, &idx));
  EXPECT_EQ(tag, 3);
  EXPECT_EQ(idx, 4000u);
  EXPECT_FALSE(s.ctx->take_nonfinite(&tag, &idx));
}

// ---- Whole models ---------------------------------------------------------------------------

struct Run {
  std::vector<float> logits;  // [T, V]
};

// Evaluates `tokens` on `device` (prefill in one call, or one token at a time).
// resident: every expert loaded for good (ExpertStore::load_all, as the CLI does on a GPU),
// so decode steps after the second replay one recorded graph.
std::vector<float> eval_on(Device& device, const std::string& fixture,
                           const std::vector<int32_t>& tokens, bool decode,
                           int64_t cache_bytes = -1, bool resident = false,
                           int64_t* replayed = nullptr) {
  auto model = Model::load(converted_fixture(fixture));
  auto ctx = device.context(1);
  ExpertStoreOptions o;
  o.memory = &device.expert_memory();
  o.cache_bytes = cache_bytes;
  ExpertStore store(*model, o);
  if (resident) store.load_all();
  Session s(*model, *ctx, store);
  const int T = int(tokens.size()), V = model->spec().vocab_size;
  std::vector<float> logits(size_t(T) * V);
  if (decode)
    for (int t = 0; t < T; t++) s.eval(&tokens[size_t(t)], 1, logits.data() + size_t(t) * V, false);
  else
    s.eval(tokens.data(), T, logits.data(), true);
  if (replayed) *replayed = s.replayed_steps();
  return logits;
}

struct Case {
  std::string fixture, name;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << "/" << c.name; }

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const char* f : {"qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "qwen3_5_moe_v2",
                        "qwen3_5_moe_vl", "qwen3_next_v2", "qwen3_moe_v2", "mixtral_v2",
                        "glm4_moe_noqknorm"}) {  // glm4_moe: group-limited routing, refused below
    SafetensorsFile ref(fixture_dir(f) + "/reference.safetensors");
    for (const char* c : {"single", "short", "chunk"})
      if (ref.find(std::string("tokens_") + c)) out.push_back({f, c});
  }
  return out;
}

class CudaOracle : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};

// HF's float64 logits at the oracle tolerance, by prefill and by decode; the two and a second
// run bit-identical where the maths allows (prefill vs decode only with the recurrence); no
// cache gives the same bits as the default cache.
TEST_P(CudaOracle, LogitsMatchReference) {
  const Case& c = GetParam();
  SafetensorsFile ref(fixture_dir(c.fixture) + "/reference.safetensors");
  const auto tokens = read_i32(ref, "tokens_" + c.name);
  const auto want = read_f32(ref, "logits_" + c.name);
  const int T = int(tokens.size()), V = int(want.size() / size_t(T));
  const float tol = 1e-3f * max_abs(want.data(), want.size());
  for (bool decode : {false, true}) {
    const auto got = eval_on(cuda_device(), c.fixture, tokens, decode);
    ASSERT_EQ(got.size(), want.size());
    float worst = 0;
    for (int t = 0; t < T; t++) {
      const float* a = got.data() + size_t(t) * V;
      const float* b = want.data() + size_t(t) * V;
      EXPECT_EQ(argmax(a, V), argmax(b, V)) << "top-1 differs at position " << t << " decode "
                                            << decode;
      worst = std::max(worst, max_abs_diff(a, b, size_t(V)));
    }
    EXPECT_LE(worst, tol) << "decode " << decode;
    RecordProperty(fmt::format("max_dlogit_over_max_logit_decode{}", int(decode)),
                   fmt::format("{:.3g}", worst / (tol * 1e3f)));
    expect_bits("repeated run", eval_on(cuda_device(), c.fixture, tokens, decode), got);
    // Every expert resident: ids stay on the device; the second decode step records a graph
    // and replays it, every later step replays it. The same bits.
    int64_t replayed = 0;
    expect_bits("all experts resident",
                eval_on(cuda_device(), c.fixture, tokens, decode, -1, true, &replayed), got);
    if (decode) {
      EXPECT_EQ(replayed, std::max(0, T - 1)) << "decode steps replayed as a graph";
    }
    if (!decode) {
      expect_bits("no expert cache", eval_on(cuda_device(), c.fixture, tokens, decode, 0), got);
      const auto cpu = eval_on(cpu_device(), c.fixture, tokens, decode);
      RecordProperty("max_dlogit_vs_cpu", fmt::format("{:.3g}", max_abs_diff(got.data(), cpu.data(), got.size())));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaOracle, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.fixture + "_" + info.param.name; });

// GLM-4.5's q/k/v biases are not bound on CUDA yet: a GLM package is refused with
// kUnsupported naming them (not run with host pointers), and runs on the CPU instead.
// GLM-4.5 runs on CUDA (its q/k/v biases are bound with the weights: glm4_moe_noqknorm in
// CudaOracle); glm4_moe's group-limited routing (4 groups) is refused by name until the router
// has a kernel for it (issue 17).
TEST_F(Cuda, GlmGroupLimitedRoutingIsRefused) {
  auto model = Model::load(converted_fixture("glm4_moe"));
  auto ctx = cuda_device().context(1);
  ExpertStoreOptions o;
  o.memory = &cuda_device().expert_memory();
  ExpertStore store(*model, o);
  Session s(*model, *ctx, store);
  const int32_t tok = 1;
  std::vector<float> logits(size_t(model->spec().vocab_size));
  try {
    s.eval(&tok, 1, logits.data(), false);
    ADD_FAILURE() << "group-limited routing ran on CUDA";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUnsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("group-limited routing"), std::string::npos) << e.what();
  }
}

// A session that mixes batches and decode steps: prompt, decode (the graph is recorded at the
// second step), a longer batch (which grows the context's scratch), decode again (replays the
// graph), a rewind and decode. Every logit the same bits as with no expert cache (no graph),
// and the graph replayed for every decode step after the first.
TEST_F(Cuda, DecodeGraphAcrossBatchesAndRewinds) {
  for (const char* f : {"qwen3_5_moe", "qwen3_moe"}) {
    SafetensorsFile ref(fixture_dir(f) + "/reference.safetensors");
    const auto tokens = read_i32(ref, "tokens_chunk");  // 100 tokens
    auto run = [&](bool resident, int64_t* replayed) {
      auto model = Model::load(converted_fixture(f));
      auto ctx = cuda_device().context(1);
      ExpertStoreOptions o;
      o.memory = &cuda_device().expert_memory();
      o.cache_bytes = resident ? -1 : 0;
      ExpertStore store(*model, o);
      if (resident) store.load_all();
      Session s(*model, *ctx, store);
      const int V = model->spec().vocab_size;
      std::vector<float> all, l(static_cast<size_t>(V));
      auto step = [&](int a, int b) {  // tokens [a, b) in one call
        s.eval(&tokens[size_t(a)], b - a, l.data(), false);
        all.insert(all.end(), l.begin(), l.end());
      };
      step(0, 3);
      for (int t = 3; t < 10; t++) step(t, t + 1);
      step(10, 70);
      for (int t = 70; t < 80; t++) step(t, t + 1);
      s.seq_rm(75, -1);
      for (int t = 75; t < 85; t++) step(t, t + 1);
      *replayed = s.replayed_steps();
      return all;
    };
    int64_t replayed = 0, none = 0;
    const auto a = run(true, &replayed), b = run(false, &none);
    expect_bits(std::string(f) + " resident vs streamed", a, b);
    EXPECT_EQ(none, 0);
    EXPECT_EQ(replayed, 6 + 10 + 10) << f;
  }
}

// The CLI's decode path on CUDA: HF's 24 greedy tokens.
TEST_F(Cuda, CliGreedyMatchesReference) {
  for (const char* f : {"qwen3_5_moe", "qwen3_moe"}) {
    SafetensorsFile ref(fixture_dir(f) + "/reference.safetensors");
    const auto tokens = read_i32(ref, "tokens_short");
    const auto greedy = read_i32(ref, "greedy_short");
    std::string toks, want;
    for (size_t t = 0; t < tokens.size(); t++) toks += (t ? "," : "") + std::to_string(tokens[t]);
    for (size_t i = 0; i < greedy.size(); i++) want += (i ? "," : "") + std::to_string(greedy[i]);
    CliResult cli = run_cli(fmt::format("eval -m {} --backend cuda --tokens {} --greedy {}",
                                        converted_fixture(f), toks, greedy.size()));
    ASSERT_EQ(cli.code, 0) << cli.err;
    EXPECT_EQ(cli.out, want + "\n") << f;
  }
}

}  // namespace
}  // namespace moeflux::test

#endif  // MOEFLUX_HAVE_CUDA
