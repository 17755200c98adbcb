// Every op of the backend boundary (engine/backend.h) against an independent float64 reference
// written here from the maths (DESIGN.md §1, the comments in backend.h), for every backend in
// backends(): random inputs from fixed seeds, moved only through the backend's own
// alloc/upload/download (backend memory is never read on the host). Then the same forward pass
// layer by layer: Session::eval with each backend against HF's float64 hidden states.
//
// Tolerances follow f32 rounding: an output that sums terms may be off by c·eps32·Σ|terms|
// (c stated per op; eps32 = 2^-23), an elementwise op by c·eps32·|result|. Quantised weights
// are dequantised exactly in double, so only the f32 realisation of each weight (two roundings)
// and the accumulation remain. A CUDA backend joins by one line in backends().
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "format/quant.h"
#include "test_util.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

struct BackendKind {
  std::string name;
  moeflux::BackendKind kind;
  // Whether this machine runs it (a CUDA build on a machine without a GPU does not: skipped).
  bool usable() const {
    try {
      resolve_backend_kind(kind);
      return true;
    } catch (const Error&) {
      return false;
    }
  }
  std::unique_ptr<Context> make(int threads) const { return get_device(kind).context(threads); }
};

// The backends under test. A new one is one line here.
std::vector<BackendKind> backends() {
  std::vector<BackendKind> out;
  out.push_back({"cpu", moeflux::BackendKind::kCpu});
#ifdef MOEFLUX_HAVE_CUDA
  out.push_back({"cuda", moeflux::BackendKind::kCuda});
#endif
  return out;
}

void PrintTo(const BackendKind& k, std::ostream* os) {
  *os << k.name;
}

constexpr double kEps = 1.0 / (1 << 23);  // eps32: one ulp at 1, twice the unit roundoff

// Host-side random numbers, fixed seed per use.
struct Rng {
  explicit Rng(uint32_t seed) : g(seed) {}
  float uni(float lo = -1, float hi = 1) {
    return std::uniform_real_distribution<float>(lo, hi)(g);
  }
  std::vector<float> vec(size_t n, float lo = -1, float hi = 1) {
    std::vector<float> v(n);
    for (auto& x : v) x = uni(lo, hi);
    return v;
  }
  std::mt19937 g;
};

// Context memory owned by a test; released with it.
class Buffers {
 public:
  explicit Buffers(Context& be) : be_(be) {}
  ~Buffers() {
    for (void* p : ptrs_) be_.release(p);
  }
  void* bytes(const void* h, size_t n) {
    ptrs_.push_back(be_.alloc_bytes(n));
    be_.upload_bytes(ptrs_.back(), h, n);
    return ptrs_.back();
  }
  int32_t* put(const std::vector<int32_t>& h) {
    return static_cast<int32_t*>(bytes(h.data(), h.size() * sizeof(int32_t)));
  }
  // A weight matrix in context memory (where the device's ops read weights).
  Mat put(const Mat& h) {
    Mat m = h;
    if (is_quant_dtype(h.dtype)) {
      const QuantLayout L = quant_layout(h.rows, h.cols, quant_bits(h.dtype), h.group);
      m.data = bytes(h.data, L.packed_bytes);
      m.scales = static_cast<const uint16_t*>(bytes(h.scales, L.scales_bytes));
      m.biases = static_cast<const uint16_t*>(bytes(h.biases, L.biases_bytes));
    } else {
      m.data = bytes(h.data, size_t(h.rows * h.cols) * (h.dtype == DType::kF32 ? 4 : 2));
    }
    return m;
  }
  float* put(const std::vector<float>& h) {
    float* p = zeros(h.size());
    be_.upload(p, h.data(), h.size());
    return p;
  }
  float* zeros(size_t n) {
    ptrs_.push_back(be_.alloc(n));
    return static_cast<float*>(ptrs_.back());
  }
  std::vector<float> get(const float* p, size_t n) {
    std::vector<float> h(n);
    be_.download(h.data(), p, n);
    return h;
  }

 private:
  Context& be_;
  std::vector<void*> ptrs_;
};

// |got - want| <= tol elementwise; reports the first violation and returns the worst
// |got - want| / tol (recorded as a test property so the margin is visible).
double expect_close(const std::string& what, const std::vector<float>& got,
                    const std::vector<double>& want, const std::vector<double>& tol) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  int bad = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); i++) {
    const double d = std::fabs(double(got[i]) - want[i]);
    const double r = tol[i] > 0 ? d / tol[i] : (d == 0 ? 0 : INFINITY);
    if (!(r <= 1) && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << " want " << want[i] << " |d| "
                    << d << " tol " << tol[i];
    if (!(r <= worst)) worst = r;
  }
  ::testing::Test::RecordProperty(what, fmt::format("{:.3g}", worst));
  return worst;
}

void expect_bits(const std::string& what, const std::vector<float>& a,
                 const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
}

double sigmoid(double x) {
  return 1 / (1 + std::exp(-x));
}
double silu(double x) {
  return x * sigmoid(x);
}
double softplus(double x) {
  return x > 30 ? x : std::log1p(std::exp(x));
}

// ---- Weight matrices of every dtype, with their exact values in double ----------------------

struct HostMat {
  Mat m;
  std::vector<double> w;    // [rows, cols] the exact weight the dtype stores
  std::vector<double> mag;  // [rows, cols] bound on |terms| of its f32 realisation
  std::vector<float> f32;
  std::vector<uint16_t> half, scales, biases;
  std::vector<uint32_t> packed;
};

std::unique_ptr<HostMat> make_mat(DType dt, int64_t rows, int64_t cols, uint32_t seed) {
  auto h = std::make_unique<HostMat>();
  Rng rng(seed);
  std::vector<float> src = rng.vec(size_t(rows * cols));
  const size_t n = src.size();
  h->w.resize(n);
  h->mag.resize(n);
  h->m.dtype = dt;
  h->m.rows = rows;
  h->m.cols = cols;
  if (dt == DType::kF32) {
    h->f32 = src;
    h->m.data = h->f32.data();
    for (size_t i = 0; i < n; i++) h->w[i] = src[i];
  } else if (dt == DType::kBF16 || dt == DType::kF16) {
    h->half.resize(n);
    for (size_t i = 0; i < n; i++) {
      h->half[i] = dt == DType::kBF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
      h->w[i] = dt == DType::kBF16 ? bf16_to_f32(h->half[i]) : f16_to_f32(h->half[i]);
    }
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
    // Unpacked here (LSB-first, DESIGN.md §2), not by format/quant.h's dequantiser.
    const int64_t words = cols * bits / 32, per = 32 / bits;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c = 0; c < cols; c++) {
        const uint32_t word = h->packed[size_t(r * words + c / per)];
        const double q = double((word >> ((c % per) * bits)) & ((1u << bits) - 1));
        const double s = bf16_to_f32(h->scales[size_t(r * (cols / group) + c / group)]);
        const double b = bf16_to_f32(h->biases[size_t(r * (cols / group) + c / group)]);
        h->w[size_t(r * cols + c)] = q * s + b;
        // float(q)*scale + bias in f32 rounds a product and a sum.
        h->mag[size_t(r * cols + c)] = std::fabs(q * s) + std::fabs(b);
      }
    return h;
  }
  for (size_t i = 0; i < n; i++) h->mag[i] = std::fabs(h->w[i]);
  return h;
}

const DType kWeightTypes[] = {DType::kF32, DType::kBF16, DType::kF16,
                              DType::kQ8,  DType::kQ4,   DType::kQ2};

// ---- The op checks. Each runs its op on `be`, checks it against the reference and returns
// every output it downloaded, so a second run with other threads can be compared bit for bit.

using Outputs = std::vector<float>;

void append(Outputs& o, const std::vector<float>& v) {
  o.insert(o.end(), v.begin(), v.end());
}

Outputs check_memory(Context& be) {
  Buffers B(be);
  Outputs out;
  const size_t n = 1000;
  float* z = B.zeros(n);
  const auto zs = B.get(z, n);
  for (size_t i = 0; i < n; i++) EXPECT_EQ(zs[i], 0.0f) << "alloc not zeroed at " << i;
  Rng rng(1);
  const auto h = rng.vec(n);
  float* a = B.put(h);
  expect_bits("upload/download", B.get(a, n), h);
  be.copy(z + 10, a + 20, 500);
  const auto c = B.get(z, n);
  for (size_t i = 0; i < n; i++)
    EXPECT_EQ(c[i], i >= 10 && i < 510 ? h[i + 10] : 0.0f) << "copy at " << i;
  append(out, c);
  return out;
}

// out[t] = E[tokens[t]]: exact for float dtypes; dequantised rows are q*s + b in f32.
Outputs check_embed(Context& be) {
  Outputs out;
  const int64_t V = 37, H = 128;
  const std::vector<int32_t> tokens = {5, 0, 36, 5, 17};
  const int T = int(tokens.size());
  for (DType dt : kWeightTypes) {
    auto E = make_mat(dt, V, H, 100 + uint32_t(dt));
    Buffers B(be);
    float* y = B.zeros(size_t(T * H));
    be.embed(B.put(E->m), B.put(tokens), T, y);
    std::vector<double> want(size_t(T * H)), tol(size_t(T * H));
    for (int t = 0; t < T; t++)
      for (int64_t c = 0; c < H; c++) {
        const size_t i = size_t(tokens[size_t(t)] * H + c);
        want[size_t(t * H + c)] = E->w[i];
        tol[size_t(t * H + c)] = is_quant_dtype(dt) ? 2 * kEps * E->mag[i] : 0;
      }
    const auto got = B.get(y, size_t(T * H));
    expect_close(fmt::format("embed_{}", dtype_name(dt)), got, want, tol);
    append(out, got);
  }
  return out;
}

// y[t, r] = Σ_c W[r, c] x[t, c]. Tolerance 4·eps·Σ_c mag(W[r, c])·|x[t, c]|: the weight's f32
// realisation (exact for float dtypes, two roundings for quantised ones) plus accumulation, which
// for random signs stays far below the Σ|terms| bound. Also: a token's bits do not depend on T.
Outputs check_matmul(Context& be) {
  Outputs out;
  const int64_t rows = 40, cols = 192;  // rows not a multiple of 16, cols not of 128
  for (DType dt : kWeightTypes) {
    auto W = make_mat(dt, rows, cols, 200 + uint32_t(dt));
    std::vector<float> row17;
    for (int T : {1, 3, 17}) {
      Buffers B(be);
      Rng rng(300 + uint32_t(T));
      const auto x = rng.vec(size_t(T * cols), -2, 2);
      float* xd = B.put(x);
      float* yd = B.zeros(size_t(T * rows));
      const Mat Wd = B.put(W->m);
      be.matmul(Wd, xd, yd, T);
      std::vector<double> want(size_t(T * rows)), tol(size_t(T * rows));
      for (int t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) {
          double s = 0, m = 0;
          for (int64_t c = 0; c < cols; c++) {
            s += W->w[size_t(r * cols + c)] * x[size_t(t * cols + c)];
            m += W->mag[size_t(r * cols + c)] * std::fabs(x[size_t(t * cols + c)]);
          }
          want[size_t(t * rows + r)] = s;
          tol[size_t(t * rows + r)] = 4 * kEps * m;
        }
      const auto got = B.get(yd, size_t(T * rows));
      expect_close(fmt::format("matmul_{}_T{}", dtype_name(dt), T), got, want, tol);
      append(out, got);
      if (T == 17) {
        // Token 5 of the batch alone: same bits (prefill == decode).
        float* x1 = B.put(std::vector<float>(x.begin() + 5 * cols, x.begin() + 6 * cols));
        float* y1 = B.zeros(size_t(rows));
        be.matmul(Wd, x1, y1, 1);
        expect_bits(fmt::format("matmul_{} token alone vs in batch", dtype_name(dt)),
                    B.get(y1, size_t(rows)),
                    std::vector<float>(got.begin() + 5 * rows, got.begin() + 6 * rows));
      }
    }
  }
  return out;
}

// y = x·rsqrt(mean x² + eps)·w over n of each stride; floats between rows untouched.
// Tolerance c·eps·|y| with c = 4 + log2(n): a few roundings for rsqrt and the products plus the
// sum of squares (a tree-order f32 sum is within log2(n)·eps of it). Rows of tiny values make
// eps matter (a wrong eps fails them).
Outputs check_rmsnorm(Context& be) {
  Outputs out;
  const int rows = 6, n = 96, stride = 131;
  const float eps = 1e-6f;
  for (bool with_w : {true, false})
    for (bool in_place : {false, true}) {
      Rng rng(400 + 2 * with_w + in_place);
      auto x = rng.vec(size_t(rows) * stride, -3, 3);
      for (int i = 0; i < n; i++) x[size_t(4 * stride + i)] *= 1e-3f;  // mean x² ~ 3e-6
      for (int i = 0; i < n; i++) x[size_t(5 * stride + i)] *= 1e-4f;  // eps dominates
      const auto w = rng.vec(size_t(n), 0.5f, 1.5f);
      Buffers B(be);
      float* xd = B.put(x);
      float* wd = with_w ? B.put(w) : nullptr;
      float* yd = in_place ? xd : B.put(std::vector<float>(x.size(), 7.0f));
      be.rmsnorm(xd, wd, yd, rows, n, stride, eps);
      std::vector<double> want(x.size()), tol(x.size(), 0);
      for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < n; i++)
          ss += double(x[size_t(r * stride + i)]) * x[size_t(r * stride + i)];
        const double inv = 1 / std::sqrt(ss / n + double(eps));
        for (int i = 0; i < stride; i++) {
          const size_t j = size_t(r * stride + i);
          if (i >= n) {  // the gap between rows is not written
            want[j] = in_place ? x[j] : 7.0;
            continue;
          }
          want[j] = x[j] * inv * (with_w ? w[size_t(i)] : 1.0);
          tol[j] = (4 + std::log2(double(n))) * kEps * std::fabs(want[j]);
        }
      }
      const auto got = B.get(yd, x.size());
      expect_close(fmt::format("rmsnorm_w{}_inplace{}", int(with_w), int(in_place)), got, want,
                   tol);
      append(out, got);
    }
  return out;
}

// Rotate-half on the first rot_dim dims of each head at position pos0 + t. The angle is the
// contract's f32 pos·theta^(-2i/rot) (as HF): its own rounding is (2 + ln theta)·eps relative,
// so tolerance 4·eps·(|a| + |b|)·(2 + (2 + ln theta)·|angle|). Unrotated floats are bit-exact.
Outputs check_rope(Context& be) {
  Outputs out;
  const int n_heads = 3, head_dim = 32, head_stride = 2 * head_dim, rot = 8;  // partial: 1/4
  const int row_stride = n_heads * head_stride + 5;
  const double theta = 1e7;
  for (auto [T, pos0] : {std::pair{1, 0}, std::pair{17, 7}, std::pair{3, 1000}}) {
    Rng rng(500 + uint32_t(T));
    const auto x = rng.vec(size_t(T) * row_stride);
    Buffers B(be);
    float* xd = B.put(x);
    be.set_pos(pos0);
    be.rope(xd, T, n_heads, row_stride, head_stride, rot, theta);
    std::vector<double> want(x.begin(), x.end()), tol(x.size(), 0);
    const int half = rot / 2;
    for (int t = 0; t < T; t++)
      for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < half; i++) {
          const size_t ia = size_t(t * row_stride + h * head_stride + i), ib = ia + size_t(half);
          const double ang = (pos0 + t) * std::pow(theta, -2.0 * i / rot);
          const double a = x[ia], b = x[ib];
          want[ia] = a * std::cos(ang) - b * std::sin(ang);
          want[ib] = b * std::cos(ang) + a * std::sin(ang);
          tol[ia] = tol[ib] =
              4 * kEps * (std::fabs(a) + std::fabs(b)) * (2 + (2 + std::log(theta)) * ang);
        }
    const auto got = B.get(xd, x.size());
    expect_close(fmt::format("rope_T{}_pos{}", T, pos0), got, want, tol);
    append(out, got);
  }
  return out;
}

// Causal softmax attention, GQA (query head h reads kv head h / group), q rows as gated
// attention lays them out (head_dim queries then head_dim gates per head). With
// A = max_j scale·Σ|q·k_j| (the score's terms), a score is off by ~A·eps, a softmax weight by
// ~(2A + n)·eps relative (n cache positions summed), so tolerance
// 4·eps·(n + 2 + 2A)·Σ_j p_j·|v_j|. Cache rows past the last position hold huge values: reading
// them fails.
Outputs check_attention(Context& be) {
  Outputs out;
  AttentionParams p;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.head_dim = 16;
  p.q_head_stride = 2 * p.head_dim;
  p.q_stride = p.n_heads * p.q_head_stride;
  p.kv_stride = p.n_kv_heads * p.head_dim;
  p.scale = 1.0f / std::sqrt(float(p.head_dim));
  const int d = p.head_dim, group = p.n_heads / p.n_kv_heads;
  for (auto [T, pos0] : {std::pair{1, 0}, std::pair{1, 9}, std::pair{3, 5}, std::pair{17, 4}}) {
    const int ctx = pos0 + T + 3;
    Rng rng(600 + uint32_t(T * 31 + pos0));
    const auto q = rng.vec(size_t(T) * p.q_stride, -2, 2);
    auto k = rng.vec(size_t(ctx) * p.kv_stride, -2, 2);
    auto v = rng.vec(size_t(ctx) * p.kv_stride);
    for (size_t i = size_t(pos0 + T) * p.kv_stride; i < k.size(); i++) k[i] = v[i] = 1e4f;
    Buffers B(be);
    float* qd = B.put(q);
    float* kd = B.put(k);
    float* vd = B.put(v);
    const size_t n_out = size_t(T) * p.n_heads * d;
    float* od = B.put(std::vector<float>(n_out, 3.0f));
    be.set_pos(pos0);
    be.attention(qd, kd, vd, od, T, p);
    std::vector<double> want(n_out), tol(n_out);
    for (int t = 0; t < T; t++)
      for (int h = 0; h < p.n_heads; h++) {
        const int kvh = h / group, n = pos0 + t + 1;
        const float* qv = q.data() + size_t(t) * p.q_stride + size_t(h) * p.q_head_stride;
        std::vector<double> s(static_cast<size_t>(n));
        double mx = -INFINITY, A = 0;
        for (int j = 0; j < n; j++) {
          double dot = 0, m = 0;
          for (int i = 0; i < d; i++) {
            const double kv = k[size_t(j) * p.kv_stride + size_t(kvh * d + i)];
            dot += qv[i] * kv;
            m += std::fabs(qv[i] * kv);
          }
          s[size_t(j)] = dot * p.scale;
          mx = std::max(mx, s[size_t(j)]);
          A = std::max(A, m * p.scale);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int i = 0; i < d; i++) {
          double o = 0, m = 0;
          for (int j = 0; j < n; j++) {
            const double vv = v[size_t(j) * p.kv_stride + size_t(kvh * d + i)];
            o += s[size_t(j)] / sum * vv;
            m += s[size_t(j)] / sum * std::fabs(vv);
          }
          const size_t idx = size_t(t) * p.n_heads * d + size_t(h * d + i);
          want[idx] = o;
          tol[idx] = 4 * kEps * (n + 2 + 2 * A) * m;
        }
      }
    const auto got = B.get(od, n_out);
    expect_close(fmt::format("attention_T{}_pos{}", T, pos0), got, want, tol);
    append(out, got);
  }
  return out;
}

// out *= sigmoid(gate) with the gate interleaved in q rows (gated attention). 4·eps·|result|.
Outputs check_mul_sigmoid_gate(Context& be) {
  const int T = 5, nh = 3, d = 16, gate_head_stride = 2 * d, gate_stride = nh * 2 * d + 3;
  Rng rng(700);
  const auto o = rng.vec(size_t(T * nh * d), -2, 2);
  const auto q = rng.vec(size_t(T * gate_stride), -6, 6);
  Buffers B(be);
  float* od = B.put(o);
  float* qd = B.put(q);
  be.mul_sigmoid_gate(od, qd + d, T, nh, d, gate_stride, gate_head_stride);
  std::vector<double> want(o.size()), tol(o.size());
  for (int t = 0; t < T; t++)
    for (int h = 0; h < nh; h++)
      for (int i = 0; i < d; i++) {
        const size_t j = size_t(t * nh * d + h * d + i);
        want[j] = o[j] * sigmoid(q[size_t(t * gate_stride + h * gate_head_stride + d + i)]);
        tol[j] = 4 * kEps * std::fabs(want[j]);
      }
  const auto got = B.get(od, o.size());
  expect_close("mul_sigmoid_gate", got, want, tol);
  return got;
}

// Causal depthwise conv (window = state then inputs, oldest first) + SiLU, twice in a row so
// the state written by the first call feeds the second. 4·eps·(Σ|w·x| + |y|); the state is
// a copy of inputs, bit-exact.
Outputs check_conv1d_silu(Context& be) {
  Outputs out;
  const int C = 40, K = 4;
  Rng rng(800);
  const auto w = rng.vec(size_t(C * K));
  std::vector<float> state = rng.vec(size_t((K - 1) * C), -2, 2);
  Buffers B(be);
  float* wd = B.put(w);
  float* sd = B.put(state);
  for (int T : {5, 1, 2}) {
    const auto x = rng.vec(size_t(T * C), -2, 2);
    float* xd = B.put(x);
    float* yd = B.zeros(size_t(T * C));
    be.conv1d_silu(xd, sd, wd, yd, T, C, K);
    std::vector<double> want(size_t(T * C)), tol(size_t(T * C));
    // history = state rows then x rows
    std::vector<float> hist(state);
    hist.insert(hist.end(), x.begin(), x.end());
    for (int t = 0; t < T; t++)
      for (int c = 0; c < C; c++) {
        double s = 0, m = 0;
        for (int i = 0; i < K; i++) {
          const double term = double(w[size_t(c * K + i)]) * hist[size_t((t + i) * C + c)];
          s += term;
          m += std::fabs(term);
        }
        want[size_t(t * C + c)] = silu(s);
        tol[size_t(t * C + c)] = 4 * kEps * (1.1 * m + std::fabs(silu(s)));
      }
    const auto got = B.get(yd, size_t(T * C));
    expect_close(fmt::format("conv1d_silu_T{}", T), got, want, tol);
    append(out, got);
    state.assign(hist.end() - (K - 1) * C, hist.end());
    expect_bits(fmt::format("conv1d_silu_T{} state", T), B.get(sd, state.size()), state);
  }
  return out;
}

// g = -exp(A_log)·softplus(a + dt_bias): the sum a + dt_bias rounds in f32 (relative error of
// softplus up to eps·|a + dt|), then exp and log1p: 4·eps·|g|·(2 + |a + dt|).
// beta = sigmoid(b): 4·eps·|beta|·(1 + |b|·(1 - beta)) ~ exp's relative error.
Outputs check_deltanet_gates(Context& be) {
  const int T = 7, nv = 6;
  Rng rng(900);
  auto a = rng.vec(size_t(T * nv), -8, 8);
  a[0] = 40;   // softplus's linear region
  a[1] = -40;  // and its exponential tail
  const auto b = rng.vec(size_t(T * nv), -10, 10);
  const auto A_log = rng.vec(size_t(nv), -2, 2), dt = rng.vec(size_t(nv));
  Buffers B(be);
  float* ad = B.put(a);
  float* bd = B.put(b);
  be.deltanet_gates(ad, bd, B.put(A_log), B.put(dt), T, nv);
  std::vector<double> wa(a.size()), ta(a.size()), wb(b.size()), tb(b.size());
  for (int t = 0; t < T; t++)
    for (int h = 0; h < nv; h++) {
      const size_t i = size_t(t * nv + h);
      const double x = double(a[i]) + dt[size_t(h)];
      wa[i] = -std::exp(double(A_log[size_t(h)])) * softplus(x);
      ta[i] = 4 * kEps * std::fabs(wa[i]) * (2 + std::fabs(x));
      wb[i] = sigmoid(b[i]);
      tb[i] = 4 * kEps * wb[i] * (1 + std::fabs(b[i]) * (1 - wb[i]));
    }
  Outputs out = B.get(ad, a.size());
  expect_close("deltanet_gates_g", out, wa, ta);
  const auto gb = B.get(bd, b.size());
  expect_close("deltanet_gates_beta", gb, wb, tb);
  append(out, gb);
  return out;
}

// The gated delta rule per v-head h (k-head h / (nv/nk)), in double, carrying beside every value
// of S and o the same recurrence on magnitudes (|S|, |k|, |v|, ... with every difference
// turned into a sum): the Σ|terms| each value is built from. Each token adds a few roundings of
// that size and carries the earlier ones (the update is a contraction), so tolerance
// c·eps·(t + 2)·mag with c = 8, for the recurrence and for the chunked (WY) form alike (which
// reorders every sum). Measured on the CPU: the recurrence uses 1/10 of it, the chunked 1/17.
struct DeltaRef {
  std::vector<double> out, out_mag, state, state_mag;
};

DeltaRef deltanet_reference(const std::vector<float>& qkv, const std::vector<float>& g,
                            const std::vector<float>& beta, const std::vector<float>& S0, int T,
                            const DeltaNetParams& p) {
  const int nk = p.k_heads, nv = p.v_heads, dk = p.k_dim, dv = p.v_dim;
  const int C = 2 * nk * dk + nv * dv;
  DeltaRef r;
  r.state.assign(S0.begin(), S0.end());
  r.state_mag.resize(S0.size());
  for (size_t i = 0; i < S0.size(); i++) r.state_mag[i] = std::fabs(S0[i]);
  r.out.resize(size_t(T * nv * dv));
  r.out_mag.resize(r.out.size());
  auto l2 = [&](const float* x, double scale) {
    double ss = 0;
    for (int i = 0; i < dk; i++) ss += double(x[i]) * x[i];
    std::vector<double> y(static_cast<size_t>(dk));
    for (int i = 0; i < dk; i++) y[size_t(i)] = x[i] / std::sqrt(ss + 1e-6) * scale;
    return y;
  };
  for (int h = 0; h < nv; h++) {
    const int kh = h / (nv / nk);
    double* S = r.state.data() + size_t(h) * dk * dv;
    double* M = r.state_mag.data() + size_t(h) * dk * dv;
    for (int t = 0; t < T; t++) {
      const float* row = qkv.data() + size_t(t) * C;
      const auto q = l2(row + kh * dk, 1 / std::sqrt(double(dk)));
      const auto k = l2(row + (nk + kh) * dk, 1);
      const float* v = row + 2 * nk * dk + h * dv;
      const double decay = std::exp(double(g[size_t(t * nv + h)]));
      const double bt = beta[size_t(t * nv + h)];
      for (int i = 0; i < dk * dv; i++) S[i] *= decay, M[i] *= decay;
      for (int j = 0; j < dv; j++) {
        double ks = 0, km = 0;
        for (int i = 0; i < dk; i++) {
          ks += k[size_t(i)] * S[i * dv + j];
          km += std::fabs(k[size_t(i)]) * M[i * dv + j];
        }
        const double delta = (v[j] - ks) * bt, dm = (std::fabs(v[j]) + km) * bt;
        double o = 0, om = 0;
        for (int i = 0; i < dk; i++) {
          S[i * dv + j] += k[size_t(i)] * delta;
          M[i * dv + j] += std::fabs(k[size_t(i)]) * dm;
          o += q[size_t(i)] * S[i * dv + j];
          om += std::fabs(q[size_t(i)]) * M[i * dv + j];
        }
        r.out[size_t(t * nv * dv + h * dv + j)] = o;
        r.out_mag[size_t(t * nv * dv + h * dv + j)] = om;
      }
    }
  }
  return r;
}

// chunk = 0: the recurrence (Context::deltanet); else deltanet_chunked with that chunk.
Outputs check_deltanet(Context& be, int chunk) {
  Outputs out;
  DeltaNetParams p;
  p.k_heads = 2;
  p.v_heads = 4;
  p.k_dim = 32;
  p.v_dim = 80;  // a block of 64 columns and a remainder
  const int C = 2 * p.k_heads * p.k_dim + p.v_heads * p.v_dim, nv = p.v_heads;
  const double c = 8;
  Rng rng(1000 + uint32_t(chunk));
  std::vector<float> S0 = rng.vec(size_t(nv * p.k_dim * p.v_dim), -0.3f, 0.3f);
  Buffers B(be);
  float* sd = B.put(S0);
  // Two calls in a row: the state left by the first is the second's input.
  for (int T : {17, 3}) {
    const auto qkv = rng.vec(size_t(T * C));
    const auto g = rng.vec(size_t(T * nv), -1.5f, -0.01f);
    const auto beta = rng.vec(size_t(T * nv), 0.05f, 0.95f);
    float* od = B.zeros(size_t(T * nv * p.v_dim));
    if (chunk)
      be.deltanet_chunked(B.put(qkv), B.put(g), B.put(beta), sd, od, T, p, chunk);
    else
      be.deltanet(B.put(qkv), B.put(g), B.put(beta), sd, od, T, p);
    const DeltaRef r = deltanet_reference(qkv, g, beta, S0, T, p);
    std::vector<double> tol(r.out.size()), stol(r.state.size());
    const int per_t = nv * p.v_dim;
    for (size_t i = 0; i < tol.size(); i++) tol[i] = c * kEps * (int(i) / per_t + 2) * r.out_mag[i];
    for (size_t i = 0; i < stol.size(); i++) stol[i] = c * kEps * (T + 1) * r.state_mag[i];
    const std::string name =
        chunk ? fmt::format("deltanet_chunked{}_T{}", chunk, T) : fmt::format("deltanet_T{}", T);
    const auto got = B.get(od, r.out.size());
    expect_close(name, got, r.out, tol);
    S0 = B.get(sd, S0.size());
    expect_close(name + "_state", S0, r.state, stol);
    append(out, got);
    append(out, S0);
  }
  return out;
}

// x = x·rsqrt(mean x² + eps)·w·silu(z) per row of n: as rmsnorm plus silu's few roundings,
// (6 + log2 n)·eps·|result|.
Outputs check_gated_rmsnorm(Context& be) {
  const int rows = 5, n = 80;
  const float eps = 1e-6f;
  Rng rng(1100);
  auto x = rng.vec(size_t(rows * n), -2, 2);
  for (int i = 0; i < n; i++) x[size_t(4 * n + i)] *= 1e-4f;  // eps dominates
  const auto z = rng.vec(size_t(rows * n), -5, 5), w = rng.vec(size_t(n), 0.5f, 1.5f);
  Buffers B(be);
  float* xd = B.put(x);
  be.gated_rmsnorm(xd, B.put(z), B.put(w), rows, n, eps);
  std::vector<double> want(x.size()), tol(x.size());
  for (int r = 0; r < rows; r++) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
    const double inv = 1 / std::sqrt(ss / n + double(eps));
    for (int i = 0; i < n; i++) {
      const size_t j = size_t(r * n + i);
      want[j] = x[j] * inv * w[size_t(i)] * silu(z[j]);
      tol[j] = (6 + std::log2(double(n))) * kEps * std::fabs(want[j]);
    }
  }
  const auto got = B.get(xd, x.size());
  expect_close("gated_rmsnorm", got, want, tol);
  return got;
}

// The elementwise ops: add is one rounding (eps·|y + x|... within half an ulp), silu_mul a
// few (4·eps·|result|).
Outputs check_elementwise(Context& be) {
  Outputs out;
  const size_t n = 1001;
  Rng rng(1200);
  const auto y = rng.vec(n, -4, 4), x = rng.vec(n, -4, 4);
  Buffers B(be);
  {
    float* yd = B.put(y);
    be.add(yd, B.put(x), n);
    std::vector<double> want(n), tol(n);
    for (size_t i = 0; i < n; i++) {
      want[i] = double(y[i]) + x[i];
      tol[i] = 0.5 * kEps * std::fabs(want[i]);
    }
    append(out, B.get(yd, n));
    expect_close("add", B.get(yd, n), want, tol);
  }
  {
    float* gd = B.put(y);
    be.silu_mul(gd, B.put(x), n);
    std::vector<double> want(n), tol(n);
    for (size_t i = 0; i < n; i++) {
      want[i] = silu(y[i]) * x[i];
      tol[i] = 4 * kEps * std::fabs(want[i]);
    }
    append(out, B.get(gd, n));
    expect_close("silu_mul", B.get(gd, n), want, tol);
  }
  return out;
}

// kv_append writes rows [pos, pos + T) of a cache and nothing else (a copy: bit-exact).
Outputs check_kv_append(Context& be) {
  const int ctx = 20, row = 24, T = 5, pos = 9;
  Rng rng(1300);
  const auto cache = rng.vec(size_t(ctx * row), 10, 20), src = rng.vec(size_t(T * row));
  Buffers B(be);
  float* cd = B.put(cache);
  be.set_pos(pos);
  be.kv_append(cd, B.put(src), T, row);
  std::vector<float> want = cache;
  std::copy(src.begin(), src.end(), want.begin() + pos * row);
  const auto got = B.get(cd, cache.size());
  expect_bits("kv_append", got, want);
  return got;
}

// The router: ids must be exactly the reference's (best first, equal scores to the lower index,
// NaN last); weights within (8 + log2 E)·eps relative (an f32 exp and sum on a device; the CPU
// computes in double and rounds once).
Outputs check_route(Context& be) {
  Outputs out;
  const int T = 6, E = 40, K = 6;
  Rng rng(1400);
  auto logits = rng.vec(size_t(T * E), -4, 4);
  // Token 1: a tie for first place (experts 7 and 3) and for the 6th (11 and 30 equal).
  logits[size_t(1 * E + 3)] = logits[size_t(1 * E + 7)] = 9.0f;
  for (int e : {11, 30}) logits[size_t(1 * E + e)] = 5.0f;
  for (int e : {0, 1, 2}) logits[size_t(1 * E + e)] = 6.0f + float(e) * 0.5f;
  // Token 2: NaN scores rank last.
  logits[size_t(2 * E + 5)] = NAN;
  logits[size_t(2 * E + 6)] = NAN;
  const auto bias = rng.vec(size_t(E), -0.2f, 0.2f);
  for (auto scoring : {RouteScoring::kSoftmax, RouteScoring::kSigmoid})
    for (bool norm : {true, false}) {
      Buffers B(be);
      RouteParams p;
      p.n_experts = E;
      p.k = K;
      p.scoring = scoring;
      p.norm_topk_prob = norm;
      p.bias = scoring == RouteScoring::kSigmoid ? B.put(bias) : nullptr;
      p.scale = norm ? 1.0f : 2.5f;
      auto* ids = static_cast<int32_t*>(B.bytes(std::vector<int32_t>(T * K, -1).data(),
                                                size_t(T * K) * sizeof(int32_t)));
      float* w = B.zeros(size_t(T * K));
      const bool softmax = scoring == RouteScoring::kSoftmax;
      // Token 2 has NaN logits: a softmax over them is NaN, so it is routed but not weighed.
      be.route(B.put(logits), T, p, ids, w);
      std::vector<int32_t> got_ids(size_t(T * K));
      be.download(got_ids.data(), ids, got_ids.size() * sizeof(int32_t));
      const auto got_w = B.get(w, size_t(T * K));
      std::vector<double> want_w, tol_w;
      std::vector<float> got_w_checked;
      for (int t = 0; t < T; t++) {
        const float* lg = logits.data() + size_t(t) * E;
        std::vector<double> prob(static_cast<size_t>(E)), score(static_cast<size_t>(E));
        double mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++)
          if (!std::isnan(lg[e])) mx = std::max(mx, double(lg[e]));
        for (int e = 0; e < E; e++) {
          prob[size_t(e)] = softmax ? std::exp(double(lg[e]) - mx) : sigmoid(lg[e]);
          sum += prob[size_t(e)];
          score[size_t(e)] = softmax ? lg[e] : prob[size_t(e)] + bias[size_t(e)];
        }
        std::vector<int> order(static_cast<size_t>(E));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
          const bool na = std::isnan(score[size_t(a)]), nb = std::isnan(score[size_t(b)]);
          if (na || nb) return !na && nb;
          return score[size_t(a)] > score[size_t(b)];
        });
        double top = 0;
        for (int j = 0; j < K; j++) top += prob[size_t(order[size_t(j)])];
        for (int j = 0; j < K; j++) {
          const int e = order[size_t(j)];
          EXPECT_EQ(got_ids[size_t(t * K + j)], e)
              << "token " << t << " choice " << j << " softmax " << softmax << " norm " << norm;
          if (t == 2 && softmax) continue;
          const double want = (norm ? prob[size_t(e)] / top : softmax ? prob[size_t(e)] / sum
                                                                       : prob[size_t(e)]) *
                              p.scale;
          want_w.push_back(want);
          tol_w.push_back((8 + std::log2(double(E))) * kEps * std::fabs(want));
          got_w_checked.push_back(got_w[size_t(t * K + j)]);
        }
      }
      expect_close(fmt::format("route_{}_norm{}", softmax ? "softmax" : "sigmoid", int(norm)),
                   got_w_checked, want_w, tol_w);
      append(out, got_w);
      for (int32_t i : got_ids) out.push_back(float(i));
      // Ids only (prefetch): the same ids.
      auto* ids2 = static_cast<int32_t*>(B.bytes(std::vector<int32_t>(T * K, -1).data(),
                                                 size_t(T * K) * sizeof(int32_t)));
      be.route(B.put(logits), T, p, ids2, nullptr);
      std::vector<int32_t> got_ids2(size_t(T * K));
      be.download(got_ids2.data(), ids2, got_ids2.size() * sizeof(int32_t));
      EXPECT_EQ(got_ids2, got_ids) << "route without weights";
    }
  return out;
}

// Group-limited routing (DeepSeek-V3): a reference written from the definition in backend.h,
// over hand-made corner cases: groups tied on their top-2 sum (the lower group wins), a tie
// across the group boundary for the last choice, a NaN score inside a kept group and a NaN
// that empties a group's second place, topk_group = n_group (plain top-k), and the bias
// deciding which group is kept.
Outputs check_route_groups(Context& be) {
  Outputs out;
  const int E = 16, K = 4;
  struct Case {
    int n_group, topk_group;
  };
  // Logits are chosen through the sigmoid's inverse so the scores are the round numbers below.
  auto logit = [](double p) { return float(std::log(p / (1 - p))); };
  const int T = 5;
  std::vector<float> logits(size_t(T * E));
  Rng rng(1700);
  for (auto& x : logits) x = logit(0.05 + 0.3 * rng.uni(0, 1));  // background in (0.05, 0.35)
  // Token 0: groups of 4; group 2 = {8..11} and group 0 = {0..3} tie on their top-2 sum (0.9 +
  // 0.8) and beat the rest; group 3 has the single best expert (0.95) but a weak second.
  for (auto [e, v] : {std::pair{0, 0.9}, {1, 0.8}, {8, 0.8}, {9, 0.9}, {12, 0.95}})
    logits[size_t(0 * E + e)] = logit(v);
  // Token 1: a NaN in group 1, which its two best (4, 6) still keep first; NaN expert 5 must
  // not be chosen.
  logits[size_t(1 * E + 5)] = NAN;
  for (auto [e, v] : {std::pair{4, 0.99}, {6, 0.98}}) logits[size_t(1 * E + e)] = logit(v);
  // Token 2: equal scores across kept groups for the 4th place (lower id wins).
  for (auto [e, v] : {std::pair{0, 0.9}, {1, 0.7}, {4, 0.9}, {5, 0.7}, {2, 0.6}, {6, 0.6}})
    logits[size_t(2 * E + e)] = logit(v);
  // Token 3: every score NaN in group 3 but one: its top-2 sum is NaN, the group ranks last.
  for (int e : {12, 13, 14}) logits[size_t(3 * E + e)] = NAN;
  // Token 4: background only.
  std::vector<float> bias(static_cast<size_t>(E), 0.0f);
  bias[10] = 0.5f;  // lifts group 2 in every token but 0 (where it is already kept)
  for (Case c : {Case{4, 2}, Case{4, 4}, Case{2, 1}, Case{8, 3}, Case{1, 1}})
    for (bool with_bias : {false, true}) {
      Buffers B(be);
      RouteParams p;
      p.n_experts = E;
      p.k = K;
      p.scoring = RouteScoring::kSigmoid;
      p.norm_topk_prob = true;
      p.bias = with_bias ? B.put(bias) : nullptr;
      p.scale = 2.5f;
      p.n_group = c.n_group;
      p.topk_group = c.topk_group;
      auto* ids = static_cast<int32_t*>(
          B.bytes(std::vector<int32_t>(T * K, -1).data(), size_t(T * K) * sizeof(int32_t)));
      float* w = B.zeros(size_t(T * K));
      be.route(B.put(logits), T, p, ids, w);
      std::vector<int32_t> got_ids(size_t(T * K));
      be.download(got_ids.data(), ids, got_ids.size() * sizeof(int32_t));
      const auto got_w = B.get(w, size_t(T * K));
      std::vector<double> want_w, tol_w;
      std::vector<float> got_w_checked;
      const std::string what =
          fmt::format("route_groups_G{}_kept{}_bias{}", c.n_group, c.topk_group, int(with_bias));
      for (int t = 0; t < T; t++) {
        const float* lg = logits.data() + size_t(t) * E;
        std::vector<double> prob(static_cast<size_t>(E)), score(static_cast<size_t>(E));
        for (int e = 0; e < E; e++) {
          prob[size_t(e)] = sigmoid(lg[e]);
          // the score the op compares: f32 sigmoid + f32 bias
          score[size_t(e)] = double(float(prob[size_t(e)]) + (with_bias ? bias[size_t(e)] : 0.0f));
        }
        auto before = [&](const std::vector<double>& v) {
          return [&v](int a, int b) {
            const bool na = std::isnan(v[size_t(a)]), nb = std::isnan(v[size_t(b)]);
            if (na || nb) return !na && nb;
            return v[size_t(a)] > v[size_t(b)];
          };
        };
        const int per = E / c.n_group;
        std::vector<double> gs(static_cast<size_t>(c.n_group));
        for (int g = 0; g < c.n_group; g++) {
          std::vector<int> m(static_cast<size_t>(per));
          std::iota(m.begin(), m.end(), g * per);
          std::stable_sort(m.begin(), m.end(), before(score));
          gs[size_t(g)] = double(float(score[size_t(m[0])]) + float(score[size_t(m[1])]));
        }
        std::vector<int> groups(static_cast<size_t>(c.n_group));
        std::iota(groups.begin(), groups.end(), 0);
        std::stable_sort(groups.begin(), groups.end(), before(gs));
        std::vector<int> cand;
        for (int e = 0; e < E; e++)
          for (int j = 0; j < c.topk_group; j++)
            if (e / per == groups[size_t(j)]) cand.push_back(e);
        std::stable_sort(cand.begin(), cand.end(), before(score));
        double top = 0;
        for (int j = 0; j < K; j++) top += prob[size_t(cand[size_t(j)])];
        for (int j = 0; j < K; j++) {
          const int e = cand[size_t(j)];
          EXPECT_EQ(got_ids[size_t(t * K + j)], e) << what << " token " << t << " choice " << j;
          if (std::isnan(top)) continue;
          want_w.push_back(prob[size_t(e)] / top * p.scale);
          tol_w.push_back(16 * kEps * want_w.back());
          got_w_checked.push_back(got_w[size_t(t * K + j)]);
        }
      }
      expect_close(what, got_w_checked, want_w, tol_w);
      append(out, got_w);
      for (int32_t i : got_ids) out.push_back(float(i));
    }
  // The hand-worked answers the reference above must also give (groups of 4, two kept, no
  // bias): token 0 keeps groups 0 and 2 (tied at 1.7, above group 3's 0.95 + background), so
  // expert 12 is not chosen despite the best score; token 1 never chooses NaN expert 5.
  {
    Buffers B(be);
    RouteParams p;
    p.n_experts = E;
    p.k = K;
    p.scoring = RouteScoring::kSigmoid;
    p.n_group = 4;
    p.topk_group = 2;
    auto* ids = static_cast<int32_t*>(
        B.bytes(std::vector<int32_t>(T * K, -1).data(), size_t(T * K) * sizeof(int32_t)));
    be.route(B.put(logits), T, p, ids, nullptr);
    std::vector<int32_t> got(size_t(T * K));
    be.download(got.data(), ids, got.size() * sizeof(int32_t));
    EXPECT_EQ(std::vector<int32_t>(got.begin(), got.begin() + 4),
              (std::vector<int32_t>{0, 9, 1, 8}));
    for (int j = 0; j < K; j++) EXPECT_NE(got[size_t(K + j)], 5);
  }
  // A grouping that cannot give k experts is refused.
  {
    Buffers B(be);
    RouteParams p;
    p.n_experts = E;
    p.k = 5;
    p.scoring = RouteScoring::kSigmoid;
    p.n_group = 4;
    p.topk_group = 1;
    auto* ids = static_cast<int32_t*>(
        B.bytes(std::vector<int32_t>(T * 5, -1).data(), size_t(T * 5) * sizeof(int32_t)));
    EXPECT_THROW(be.route(B.put(logits), T, p, ids, nullptr), Error);
  }
  return out;
}

// rope_freq against the same rotation in double with the given frequencies and scale.
Outputs check_rope_freq(Context& be) {
  Outputs out;
  const int n_heads = 3, head_stride = 20, rot = 8, row_stride = n_heads * head_stride + 3;
  const std::vector<float> inv = {1.0f, 0.3f, 0.0123f, 1e-4f};
  for (float cs : {1.0f, 1.0249f})
    for (auto [T, pos0] : {std::pair{1, 0}, std::pair{9, 3}, std::pair{2, 500}}) {
      Rng rng(1800 + uint32_t(T));
      const auto x = rng.vec(size_t(T) * row_stride);
      Buffers B(be);
      float* xd = B.put(x);
      be.set_pos(pos0);
      be.rope_freq(xd, T, n_heads, row_stride, head_stride, rot, B.put(inv), cs);
      std::vector<double> want(x.begin(), x.end()), tol(x.size(), 0);
      for (int t = 0; t < T; t++)
        for (int h = 0; h < n_heads; h++)
          for (int i = 0; i < rot / 2; i++) {
            const size_t ia = size_t(t * row_stride + h * head_stride + i), ib = ia + rot / 2;
            const double ang = double(inv[size_t(i)]) * (pos0 + t);
            const double a = x[ia], b = x[ib];
            want[ia] = cs * (a * std::cos(ang) - b * std::sin(ang));
            want[ib] = cs * (b * std::cos(ang) + a * std::sin(ang));
            tol[ia] = tol[ib] = 4 * kEps * (std::fabs(a) + std::fabs(b)) * (3 + ang);
          }
      const auto got = B.get(xd, x.size());
      expect_close(fmt::format("rope_freq_T{}_pos{}_cs{}", T, pos0, cs), got, want, tol);
      append(out, got);
    }
  return out;
}

// matmul_heads: per head its own rows of W over strided inputs into strided outputs; each
// output the bits of matmul of that head's rows alone.
Outputs check_matmul_heads(Context& be) {
  Outputs out;
  const int nh = 3, R = 5, C = 64;
  for (DType dt : {DType::kBF16, DType::kQ4}) {
    auto W = make_mat(dt, nh * R, C, 1900 + uint32_t(dt));
    const int T = 4, xs = nh * (C + 3) + 1, xhs = C + 3, ys = nh * (R + 2) + 2, yhs = R + 2;
    Rng rng(1950);
    const auto x = rng.vec(size_t(T * xs), -2, 2);
    Buffers B(be);
    const Mat Wd = B.put(W->m);
    float* xd = B.put(x);
    float* yd = B.put(std::vector<float>(size_t(T * ys), 7.0f));
    be.matmul_heads(Wd, nh, xd, xs, xhs, yd, ys, yhs, T);
    const auto got = B.get(yd, size_t(T * ys));
    std::vector<double> want(got.begin(), got.end()), tol(got.size(), 0);
    for (int t = 0; t < T; t++)
      for (int h = 0; h < nh; h++)
        for (int r = 0; r < R; r++) {
          double s = 0, m = 0;
          for (int c = 0; c < C; c++) {
            const double xv = x[size_t(t * xs + h * xhs + c)];
            s += W->w[size_t((h * R + r) * C + c)] * xv;
            m += W->mag[size_t((h * R + r) * C + c)] * std::fabs(xv);
          }
          const size_t i = size_t(t * ys + h * yhs + r);
          want[i] = s;
          tol[i] = 4 * kEps * m;
        }
    // untouched outputs stay 7 (want = got there, tol 0: compared exactly)
    for (int t = 0; t < T; t++)
      for (int h = 0; h < nh; h++)
        for (int r = R; r < yhs && h * yhs + r < ys; r++) want[size_t(t * ys + h * yhs + r)] = 7.0;
    expect_close(fmt::format("matmul_heads_{}", dtype_name(dt)), got, want, tol);
    // Head 1 through matmul on its own rows: the same bits.
    std::vector<float> x1(size_t(T * C));
    for (int t = 0; t < T; t++) std::copy_n(x.begin() + t * xs + xhs, C, x1.begin() + t * C);
    float* x1d = B.put(x1);
    float* y1d = B.zeros(size_t(T * R));
    be.matmul(mat_rows(Wd, R, R), x1d, y1d, T);
    const auto y1 = B.get(y1d, size_t(T * R));
    for (int t = 0; t < T; t++)
      for (int r = 0; r < R; r++)
        EXPECT_EQ(std::memcmp(&y1[size_t(t * R + r)], &got[size_t(t * ys + yhs + r)], 4), 0)
            << "matmul_heads vs matmul, token " << t << " row " << r;
    append(out, got);
  }
  return out;
}

Outputs check_copy_rows(Context& be) {
  Buffers B(be);
  Rng rng(2000);
  const auto src = rng.vec(5 * 9);
  float* sd = B.put(src);
  float* dd = B.put(std::vector<float>(5 * 7, -1.0f));
  be.copy_rows(dd, 7, sd + 2, 9, 5, 4);
  const auto got = B.get(dd, 5 * 7);
  std::vector<float> want(5 * 7, -1.0f);
  for (int r = 0; r < 5; r++)
    for (int i = 0; i < 4; i++) want[size_t(r * 7 + i)] = src[size_t(r * 9 + 2 + i)];
  expect_bits("copy_rows", got, want);
  return got;
}

// Attention with values narrower than keys, read from the keys' own rows (MLA's absorbed form:
// one kv head, rows [latent | rope key], the value is the latent).
Outputs check_attention_latent(Context& be) {
  Outputs out;
  AttentionParams p;
  p.n_heads = 4;
  p.n_kv_heads = 1;
  p.head_dim = 24;  // latent 16 + rope 8
  p.v_dim = 16;
  p.q_head_stride = p.head_dim;
  p.q_stride = p.n_heads * p.head_dim;
  p.kv_stride = p.v_stride = p.head_dim;
  p.scale = 0.3f;
  const int d = p.head_dim, vd = p.v_dim;
  for (auto [T, pos0] : {std::pair{1, 0}, std::pair{1, 7}, std::pair{5, 3}}) {
    const int ctx = pos0 + T + 2;
    Rng rng(2100 + uint32_t(T * 13 + pos0));
    const auto q = rng.vec(size_t(T) * p.q_stride, -2, 2);
    auto kv = rng.vec(size_t(ctx) * p.kv_stride, -2, 2);
    for (size_t i = size_t(pos0 + T) * p.kv_stride; i < kv.size(); i++) kv[i] = 1e4f;
    Buffers B(be);
    float* qd = B.put(q);
    float* kvd = B.put(kv);
    const size_t n_out = size_t(T) * p.n_heads * vd;
    float* od = B.put(std::vector<float>(n_out, 3.0f));
    be.set_pos(pos0);
    be.attention(qd, kvd, kvd, od, T, p);
    std::vector<double> want(n_out), tol(n_out);
    for (int t = 0; t < T; t++)
      for (int h = 0; h < p.n_heads; h++) {
        const int n = pos0 + t + 1;
        const float* qv = q.data() + size_t(t) * p.q_stride + size_t(h) * p.q_head_stride;
        std::vector<double> s(static_cast<size_t>(n));
        double mx = -INFINITY, A = 0;
        for (int j = 0; j < n; j++) {
          double dot = 0, m = 0;
          for (int i = 0; i < d; i++) {
            dot += qv[i] * kv[size_t(j) * p.kv_stride + size_t(i)];
            m += std::fabs(qv[i] * kv[size_t(j) * p.kv_stride + size_t(i)]);
          }
          s[size_t(j)] = dot * p.scale;
          mx = std::max(mx, s[size_t(j)]);
          A = std::max(A, m * p.scale);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int i = 0; i < vd; i++) {
          double o = 0, m = 0;
          for (int j = 0; j < n; j++) {
            const double vv = kv[size_t(j) * p.v_stride + size_t(i)];
            o += s[size_t(j)] / sum * vv;
            m += s[size_t(j)] / sum * std::fabs(vv);
          }
          const size_t idx = size_t(t) * p.n_heads * vd + size_t(h * vd + i);
          want[idx] = o;
          tol[idx] = 4 * kEps * (n + 2 + 2 * A) * m;
        }
      }
    const auto got = B.get(od, n_out);
    expect_close(fmt::format("attention_latent_T{}_pos{}", T, pos0), got, want, tol);
    append(out, got);
  }
  return out;
}

// Experts handed over in a chosen arrival order, as an ExpertStore's batch does.
class TestExperts final : public ExpertSource {
 public:
  TestExperts(std::vector<int> ids, std::vector<ExpertWeights> w, std::vector<size_t> arrival)
      : ids_(std::move(ids)), w_(std::move(w)), arrival_(std::move(arrival)) {}
  size_t size() const override { return ids_.size(); }
  int id(size_t i) const override { return ids_[i]; }
  size_t next() override { return arrival_.at(taken_++); }
  const ExpertWeights& weights(size_t i) const override { return w_[i]; }

 private:
  std::vector<int> ids_;
  std::vector<ExpertWeights> w_;
  std::vector<size_t> arrival_;
  size_t taken_ = 0;
};

// y = W x in double with its bound Σ|W||x| (the f32 realisation of W: mag).
void ref_matvec(const HostMat& W, const std::vector<double>& x, const std::vector<double>& xerr,
                std::vector<double>& y, std::vector<double>& err) {
  const size_t R = size_t(W.m.rows), C = size_t(W.m.cols);
  y.assign(R, 0);
  err.assign(R, 0);
  for (size_t r = 0; r < R; r++) {
    double s = 0, m = 0, e = 0;
    for (size_t c = 0; c < C; c++) {
      s += W.w[r * C + c] * x[c];
      m += W.mag[r * C + c] * std::fabs(x[c]);
      e += std::fabs(W.w[r * C + c]) * xerr[c];
    }
    y[r] = s;
    err[r] = 4 * kEps * m + e;  // this product's rounding plus the input's error carried
  }
}

// One expert FFN on x in double: down(silu(gate x) * up x), with a propagated error bound
// (silu' is within [-0.1, 1.1]).
void ref_ffn(const HostMat& gate, const HostMat& up, const HostMat& down,
             const std::vector<double>& x, std::vector<double>& y, std::vector<double>& err) {
  const std::vector<double> zero(x.size(), 0);
  std::vector<double> g, ge, u, ue;
  ref_matvec(gate, x, zero, g, ge);
  ref_matvec(up, x, zero, u, ue);
  std::vector<double> h(g.size()), he(g.size());
  for (size_t i = 0; i < g.size(); i++) {
    h[i] = silu(g[i]) * u[i];
    he[i] = 1.1 * ge[i] * std::fabs(u[i]) + std::fabs(silu(g[i])) * ue[i] + 4 * kEps * std::fabs(h[i]);
  }
  ref_matvec(down, h, he, y, err);
}

// The grouped expert FFN: every (token, choice) against the double reference, the shared expert
// with its sigmoid gate, and the same bits whatever order the experts arrive in.
Outputs check_moe_experts(Context& be) {
  Outputs out;
  const int T = 5, K = 3, H = 128, I = 64, S = 64, E = 7;
  Rng rng(1500);
  std::vector<std::unique_ptr<HostMat>> gate, up, down;
  for (int e = 0; e < E; e++) {
    const DType dt = e % 2 ? DType::kQ4 : DType::kBF16;
    gate.push_back(make_mat(dt, I, H, 1510 + uint32_t(e)));
    up.push_back(make_mat(dt, I, H, 1530 + uint32_t(e)));
    down.push_back(make_mat(dt, H, I, 1550 + uint32_t(e)));
  }
  auto sg = make_mat(DType::kQ8, S, H, 1570), su = make_mat(DType::kQ8, S, H, 1571);
  auto sd = make_mat(DType::kQ8, H, S, 1572), sr = make_mat(DType::kF32, 1, H, 1573);
  // [T, K]: a token's k choices are distinct experts.
  const std::vector<int32_t> ids = {4, 0, 6, 0, 4, 2, 6, 2, 5, 2, 0, 4, 5, 6, 0};
  const std::vector<int> used = {0, 2, 4, 5, 6};  // expert 1 and 3 unused
  const auto wts = rng.vec(size_t(T * K), 0.05f, 0.6f);
  const auto x = rng.vec(size_t(T * H), -1.5f, 1.5f);

  for (bool with_shared : {false, true}) {
    std::vector<float> first;
    for (const std::vector<size_t>& arrival :
         {std::vector<size_t>{0, 1, 2, 3, 4}, std::vector<size_t>{3, 0, 4, 2, 1}}) {
      Buffers B(be);
      std::vector<ExpertWeights> w;
      for (int e : used)
        w.push_back({B.put(gate[size_t(e)]->m), B.put(up[size_t(e)]->m), B.put(down[size_t(e)]->m)});
      TestExperts src(used, std::move(w), arrival);
      const Mat g = B.put(sg->m), u = B.put(su->m), d = B.put(sd->m), r = B.put(sr->m);
      SharedExpert shared{&g, &u, &d, &r, S};
      MoeParams p;
      p.T = T;
      p.k = K;
      p.hidden = H;
      p.inter = I;
      float* od = B.put(std::vector<float>(size_t(T * H), 9.0f));
      be.moe_experts(B.put(x), B.put(ids), B.put(wts), src, with_shared ? &shared : nullptr, od,
                     p);
      const auto got = B.get(od, size_t(T * H));
      if (first.empty()) {
        std::vector<double> want(size_t(T * H), 0), tol(size_t(T * H), 0);
        for (int t = 0; t < T; t++) {
          const std::vector<double> xt(x.begin() + t * H, x.begin() + (t + 1) * H);
          std::vector<double> y, err;
          for (int j = 0; j < K; j++) {
            const int e = ids[size_t(t * K + j)];
            ref_ffn(*gate[size_t(e)], *up[size_t(e)], *down[size_t(e)], xt, y, err);
            const double wj = wts[size_t(t * K + j)];
            for (int c = 0; c < H; c++) {
              want[size_t(t * H + c)] += wj * y[size_t(c)];
              // the weighting and the K-term sum: a rounding each
              tol[size_t(t * H + c)] += wj * (err[size_t(c)] + 4 * kEps * std::fabs(y[size_t(c)]));
            }
          }
          if (with_shared) {
            ref_ffn(*sg, *su, *sd, xt, y, err);
            double z = 0, zm = 0;
            for (int c = 0; c < H; c++) {
              z += sr->w[size_t(c)] * xt[size_t(c)];
              zm += std::fabs(sr->w[size_t(c)] * xt[size_t(c)]);
            }
            const double gz = sigmoid(z);
            for (int c = 0; c < H; c++) {
              want[size_t(t * H + c)] += gz * y[size_t(c)];
              tol[size_t(t * H + c)] += gz * err[size_t(c)] +
                                        (4 * kEps * zm * 0.25 + 4 * kEps * gz) * std::fabs(y[size_t(c)]);
            }
          }
          for (int c = 0; c < H; c++)
            tol[size_t(t * H + c)] += 4 * kEps * std::fabs(want[size_t(t * H + c)]);
        }
        expect_close(fmt::format("moe_experts_shared{}", int(with_shared)), got, want, tol);
        first = got;
        append(out, got);
      } else {
        expect_bits(fmt::format("moe_experts_shared{}: arrival order", int(with_shared)), got,
                    first);
      }
    }
  }
  return out;
}

// check_finite notes the first NaN/Inf and its tag; take_nonfinite reads and clears it.
Outputs check_nonfinite(Context& be) {
  const size_t n = 5000;
  Rng rng(1600);
  auto x = rng.vec(n, -1e30f, 1e30f);
  Buffers B(be);
  float* clean = B.put(x);
  x[3333] = INFINITY;
  x[4000] = NAN;
  float* inf = B.put(x);
  x[100] = -NAN;
  float* nan = B.put(x);
  int tag = -7;
  size_t index = 0;
  be.check_finite(clean, n, 1);
  EXPECT_FALSE(be.take_nonfinite(&tag, &index)) << "finite values flagged";
  be.check_finite(clean, n, 1);
  be.check_finite(inf, n, 2);
  be.check_finite(nan, n, 3);  // a later one does not replace the first
  EXPECT_TRUE(be.take_nonfinite(&tag, &index));
  EXPECT_EQ(tag, 2);
  EXPECT_EQ(index, 3333u);
  EXPECT_FALSE(be.take_nonfinite(&tag, &index)) << "not cleared";
  be.check_finite(nan, 4000, -1);
  EXPECT_TRUE(be.take_nonfinite(&tag, &index));
  EXPECT_EQ(tag, -1);
  EXPECT_EQ(index, 100u);
  be.check_finite(inf, 3333, 9);  // the Inf is just past the range
  EXPECT_FALSE(be.take_nonfinite(&tag, &index));
  return {float(tag), float(index)};
}

// ---- The parametrised suite ------------------------------------------------------------------

class BackendOps : public ::testing::TestWithParam<BackendKind> {
 protected:
  // Runs `check` on the backend with 1 thread and with 3 (both against the reference) and
  // requires the same bits: the boundary promises results independent of the thread count.
  void run(const std::function<Outputs(Context&)>& check) {
    if (!GetParam().usable()) GTEST_SKIP() << GetParam().name << " does not run on this machine";
    auto one = GetParam().make(1);
    const Outputs a = check(*one);
    if (HasFailure()) return;
    auto three = GetParam().make(3);
    ASSERT_EQ(three->threads(), 3);
    const Outputs b = check(*three);
    expect_bits(std::string(GetParam().name) + ": threads 1 vs 3", a, b);
  }
  // An op the backend named `missing_on` does not have yet (DeepSeek-V3's MLA ops on CUDA,
  // issue 17): there it must refuse with kUnsupported and a message saying so, elsewhere run.
  void run_unless_missing(const std::function<Outputs(Context&)>& check, const char* missing_on) {
    if (std::string(GetParam().name) != missing_on) return run(check);
    if (!GetParam().usable()) GTEST_SKIP() << GetParam().name << " does not run on this machine";
    auto be = GetParam().make(1);
    try {
      check(*be);
      ADD_FAILURE() << GetParam().name << " ran an op it is expected to refuse: update the test";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUnsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find("not implemented yet"), std::string::npos) << e.what();
    }
  }
};

TEST_P(BackendOps, Memory) {
  run(check_memory);
}
TEST_P(BackendOps, Embed) {
  run(check_embed);
}
TEST_P(BackendOps, Matmul) {
  run(check_matmul);
}
TEST_P(BackendOps, Rmsnorm) {
  run(check_rmsnorm);
}
TEST_P(BackendOps, Rope) {
  run(check_rope);
}
TEST_P(BackendOps, Attention) {
  run(check_attention);
}
TEST_P(BackendOps, MulSigmoidGate) {
  run(check_mul_sigmoid_gate);
}
TEST_P(BackendOps, Conv1dSilu) {
  run(check_conv1d_silu);
}
TEST_P(BackendOps, DeltanetGates) {
  run(check_deltanet_gates);
}
TEST_P(BackendOps, Deltanet) {
  run([](Context& be) { return check_deltanet(be, 0); });
}
TEST_P(BackendOps, DeltanetChunked) {
  run([](Context& be) {
    Outputs o = check_deltanet(be, 4);  // 17 = four chunks and one token
    append(o, check_deltanet(be, 64));  // one partial chunk
    return o;
  });
}
TEST_P(BackendOps, GatedRmsnorm) {
  run(check_gated_rmsnorm);
}
TEST_P(BackendOps, Elementwise) {
  run(check_elementwise);
}
TEST_P(BackendOps, KvAppend) {
  run(check_kv_append);
}
TEST_P(BackendOps, Route) {
  run(check_route);
}
TEST_P(BackendOps, RouteGroups) {
  run_unless_missing(check_route_groups, "cuda");
}
TEST_P(BackendOps, RopeFreq) {
  run_unless_missing(check_rope_freq, "cuda");
}
TEST_P(BackendOps, MatmulHeads) {
  run_unless_missing(check_matmul_heads, "cuda");
}
TEST_P(BackendOps, CopyRows) {
  run_unless_missing(check_copy_rows, "cuda");
}
TEST_P(BackendOps, AttentionLatent) {
  run_unless_missing(check_attention_latent, "cuda");
}
TEST_P(BackendOps, MoeExperts) {
  run(check_moe_experts);
}
TEST_P(BackendOps, Nonfinite) {
  run(check_nonfinite);
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::ValuesIn(backends()),
                         [](const auto& info) { return info.param.name; });

// ---- Layer by layer through the hidden-state sink ----------------------------------------------

struct LayerCase {
  BackendKind backend;
  std::string fixture, tokens;
  enum Mode { kPrefill, kPrefillChunked, kDecode } mode;
};

void PrintTo(const LayerCase& c, std::ostream* os) {
  *os << c.backend.name << "/" << c.fixture;
}

std::vector<LayerCase> layer_cases() {
  std::vector<LayerCase> out;
  for (const auto& b : backends()) {
    out.push_back({b, "qwen3_5_moe", "chunk", LayerCase::kPrefill});
    out.push_back({b, "qwen3_5_moe", "chunk", LayerCase::kPrefillChunked});
    out.push_back({b, "qwen3_5_moe", "short", LayerCase::kDecode});
    out.push_back({b, "qwen3_moe", "short", LayerCase::kPrefill});
  }
  return out;
}

class BackendLayers : public ::testing::TestWithParam<LayerCase> {};

// Every HF-numbered hidden state (0 = embeddings, i = after layer i-1, L = final norm) of every
// position against the float64 reference at the oracle's tolerance (DESIGN.md §4).
TEST_P(BackendLayers, HiddenStatesMatchReference) {
  const LayerCase& c = GetParam();
  SafetensorsFile ref(fixture_dir(c.fixture) + "/reference.safetensors");
  const auto tokens = read_i32(ref, "tokens_" + c.tokens);
  const int T = int(tokens.size());
  if (!c.backend.usable()) GTEST_SKIP() << c.backend.name << " does not run on this machine";
  auto model = Model::load(converted_fixture(c.fixture));
  auto be = c.backend.make(2);
  ExpertStoreOptions so;
  so.memory = &be->device().expert_memory();
  ExpertStore store(*model, so);
  SessionParams sp;
  if (c.mode == LayerCase::kPrefillChunked) {
    sp.deltanet_chunked_min_tokens = 2;
    sp.deltanet_chunk = 16;
  }
  Session s(*model, *be, store, sp);
  const int H = model->spec().hidden_size;
  std::map<int, std::vector<float>> hidden;
  HiddenSink sink = [&](int i, const float* h, int n) {
    hidden[i].insert(hidden[i].end(), h, h + size_t(n) * H);
  };
  if (c.mode == LayerCase::kDecode)
    for (int t = 0; t < T; t++) s.eval(&tokens[size_t(t)], 1, nullptr, false, sink);
  else
    s.eval(tokens.data(), T, nullptr, false, sink);

  int n = 0;
  for (;; n++) {
    const std::string name = fmt::format("hidden_{}_{}", c.tokens, n);
    if (!ref.find(name)) break;
    const auto want = read_f32(ref, name);
    ASSERT_EQ(hidden[n].size(), want.size()) << "hidden " << n;
    double worst = 1;
    for (int t = 0; t < T; t++) {
      const double cs =
          cosine(hidden[n].data() + size_t(t) * H, want.data() + size_t(t) * H, size_t(H));
      EXPECT_GE(cs, 0.99999) << "hidden " << n << " position " << t;
      worst = std::min(worst, cs);
    }
    RecordProperty(fmt::format("one_minus_min_cosine_{}", n), fmt::format("{:.3g}", 1 - worst));
  }
  EXPECT_EQ(n, model->spec().n_layers + 1);
  EXPECT_EQ(int(hidden.size()), n) << "the sink saw hidden states the reference lacks";
}

std::string layer_case_name(const ::testing::TestParamInfo<LayerCase>& info) {
  const LayerCase& c = info.param;
  const char* mode[] = {"prefill", "prefill_chunked", "decode"};
  return c.backend.name + "_" + c.fixture + "_" + mode[c.mode];
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendLayers, ::testing::ValuesIn(layer_cases()),
                         layer_case_name);

}  // namespace
}  // namespace moeflux::test
