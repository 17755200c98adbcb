// The fast int8 path (cpu/qdot.h): quantised weights times int8-quantised activations.
//
// Properties, on random data with y poisoned before each run:
//   (a) every path (scalar, AVX2, AVX-512 VNNI) gives the scalar path's bits, for q8/q4/q2,
//       groups 32/64/128, T = 1..9 and row counts that leave tails (a path this CPU lacks is a
//       skip that says so);
//   (b) batch invariance: a token alone gives the bits of its row in a batch; any row split
//       gives the same bits; a CPU context with 1 or 2 threads gives the same bits;
//   (c) the error against the exact product (double, dequantised weights, unrounded x) is
//       within the bound of qdot.h: only x is rounded, |x - d*xq| <= d/2 (+ the rounding of
//       x/d, below 2^-22 |x|), so |y - exact| <= sum_k |s_g| sum_c |q_c| (d_k/2 + 2^-22|x_c|)
//       + the f32 combine's rounding, bounded by gamma_{2*blocks+3} * sum_k (|s_g d_k isum_k|
//       + |b_g xs_k|) plus |b_g| * 32 u sum_c |x_c| for the f32 sum xs (blocks k of 32). A kernel that drops or
//       misplaces a block of 32 columns is off by far more than that.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/qdot.h"
#include "engine/backend.h"
#include "format/dtype.h"
#include "format/quant.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

constexpr uint32_t kPoison = 0x7fc0dead;

float poison() {
  float f;
  std::memcpy(&f, &kPoison, 4);
  return f;
}

struct QMat {
  std::vector<uint32_t> packed;
  std::vector<uint16_t> scales, biases;
  Mat shape;
  Mat mat() const {
    Mat m = shape;
    m.data = packed.data();
    m.scales = scales.data();
    m.biases = biases.data();
    return m;
  }
  std::vector<float> row(int64_t r) const {
    std::vector<float> out(size_t(shape.cols));
    const int b = quant_bits(shape.dtype);
    dequantize_row(packed.data() + r * shape.cols * b / 32, scales.data() + r * shape.cols / shape.group,
                   biases.data() + r * shape.cols / shape.group, shape.cols, b, shape.group, out.data());
    return out;
  }
};

QMat make_qmat(DType dt, int64_t rows, int64_t cols, int group, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(-3.0f, 1.0f);
  std::vector<float> w(size_t(rows * cols));
  for (int64_t r = 0; r < rows; r++) {
    const float s = std::pow(10.0f, ud(rng));
    for (int64_t c = 0; c < cols; c++) w[size_t(r * cols + c)] = nd(rng) * s + 0.3f * s;
  }
  QMat q;
  const int b = quant_bits(dt);
  q.shape.dtype = dt;
  q.shape.rows = rows;
  q.shape.cols = cols;
  q.shape.group = group;
  q.packed.resize(size_t(rows * cols * b / 32));
  q.scales.resize(size_t(rows * cols / group));
  q.biases.resize(q.scales.size());
  quantize_rows(w.data(), rows, cols, b, group, q.packed.data(), q.scales.data(), q.biases.data());
  return q;
}

// Activations like a residual stream: mostly N(0, 1) with a few large channels.
std::vector<float> make_x(int T, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(size_t(T) * cols);
  for (auto& v : x) v = nd(rng);
  for (int t = 0; t < T; t++)
    for (int64_t c = 7; c < cols; c += 97) x[size_t(t * cols + c)] *= 20.0f;
  return x;
}

std::vector<float> run(const Mat& W, const std::vector<float>& x, int T, int64_t r0, int64_t r1) {
  QuantizedActs xa;
  quantize_acts(x.data(), T, W.cols, W.group, quant_bits(W.dtype), xa);
  std::vector<float> y(size_t(T) * W.rows, poison());
  qmatmul_rows(W, r0, r1, xa, y.data(), W.rows);
  return y;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

struct PathGuard {
  ~PathGuard() { set_qdot_path(QdotPath::kAuto); }
};

struct Case {
  DType dt;
  int group;
  int64_t rows, cols;
};
const Case kCases[] = {{DType::kQ8, 64, 37, 2048}, {DType::kQ4, 64, 45, 2048},
                       {DType::kQ2, 64, 19, 512},  {DType::kQ4, 32, 13, 96},
                       {DType::kQ8, 128, 22, 640}, {DType::kQ4, 128, 9, 512},
                       {DType::kQ2, 32, 11, 288}};

TEST(Qdot, EveryPathGivesTheScalarBits) {
  PathGuard guard;
  std::mt19937 rng(7);
  for (QdotPath p : {QdotPath::kAvx2, QdotPath::kVnni}) {
    if (!qdot_path_supported(p)) {
      std::printf("[ qdot ] %s not run: this CPU lacks it (best: %s)\n", qdot_path_name(p),
                  qdot_path_name(best_qdot_path()));
      continue;
    }
    for (const Case& c : kCases)
      for (int T : {1, 2, 3, 4, 5, 9, 17}) {
        const QMat q = make_qmat(c.dt, c.rows, c.cols, c.group, rng);
        const std::vector<float> x = make_x(T, c.cols, rng);
        set_qdot_path(QdotPath::kScalar);
        const auto ref = run(q.mat(), x, T, 0, c.rows);
        set_qdot_path(p);
        const auto got = run(q.mat(), x, T, 0, c.rows);
        EXPECT_TRUE(same_bits(ref, got)) << qdot_path_name(p) << " " << dtype_name(c.dt) << " g"
                                         << c.group << " cols " << c.cols << " T " << T;
      }
    std::printf("[ qdot ] %s matches scalar bit for bit\n", qdot_path_name(p));
  }
}

TEST(Qdot, TokenAloneEqualsBatchAndAnyRowSplit) {
  PathGuard guard;
  std::mt19937 rng(11);
  for (QdotPath p : {QdotPath::kScalar, QdotPath::kAvx2, QdotPath::kVnni}) {
    if (!qdot_path_supported(p)) continue;
    set_qdot_path(p);
    for (const Case& c : kCases) {
      const int T = 7;
      const QMat q = make_qmat(c.dt, c.rows, c.cols, c.group, rng);
      const std::vector<float> x = make_x(T, c.cols, rng);
      const auto batch = run(q.mat(), x, T, 0, c.rows);
      for (int t = 0; t < T; t++) {
        const std::vector<float> xt(x.begin() + t * c.cols, x.begin() + (t + 1) * c.cols);
        const auto alone = run(q.mat(), xt, 1, 0, c.rows);
        EXPECT_EQ(std::memcmp(alone.data(), batch.data() + t * c.rows, size_t(c.rows) * 4), 0)
            << qdot_path_name(p) << " " << dtype_name(c.dt) << " token " << t;
      }
      // Rows in uneven pieces.
      QuantizedActs xa;
      quantize_acts(x.data(), T, c.cols, c.group, quant_bits(c.dt), xa);
      std::vector<float> split(size_t(T) * c.rows, poison());
      for (int64_t r = 0; r < c.rows; r += 3)
        qmatmul_rows(q.mat(), r, std::min<int64_t>(c.rows, r + 3), xa, split.data(), c.rows);
      EXPECT_TRUE(same_bits(batch, split)) << qdot_path_name(p) << " " << dtype_name(c.dt);
    }
  }
}

TEST(Qdot, WithinTheActivationRoundingBoundOfExact) {
  std::mt19937 rng(3);
  for (const Case& c : kCases) {
    const int T = 3;
    const QMat q = make_qmat(c.dt, c.rows, c.cols, c.group, rng);
    const std::vector<float> x = make_x(T, c.cols, rng);
    const auto y = run(q.mat(), x, T, 0, c.rows);
    QuantizedActs xa;
    quantize_acts(x.data(), T, c.cols, c.group, quant_bits(c.dt), xa);
    const int b = quant_bits(c.dt);
    const int64_t gpr = c.cols / c.group, nb = c.cols / 32;
    const double u = std::ldexp(1.0, -24);
    const double gamma = (2.0 * nb + 3) * u / (1 - (2.0 * nb + 3) * u);
    double worst = 0;
    for (int64_t r = 0; r < c.rows; r++) {
      const std::vector<float> w = q.row(r);
      const uint8_t* row = reinterpret_cast<const uint8_t*>(q.packed.data()) + r * c.cols * b / 8;
      for (int t = 0; t < T; t++) {
        const float* xt = x.data() + t * c.cols;
        double exact = 0, bound = 0, terms = 0;
        for (int64_t cc = 0; cc < c.cols; cc++) exact += double(w[size_t(cc)]) * xt[cc];
        for (int64_t k = 0; k < nb; k++) {
          const int64_t g = k * 32 / c.group;
          const double s = bf16_to_f32(q.scales[size_t(r * gpr + g)]);
          const double bb = bf16_to_f32(q.biases[size_t(r * gpr + g)]);
          const double d = xa.d[size_t(t * nb + k)], xs = xa.xs[size_t(t * nb + k)];
          double qabs = 0, isum = 0, xabs = 0;
          for (int64_t cc = k * 32; cc < (k + 1) * 32; cc++) {
            const int bit = int(cc * b);
            const int code = (row[bit / 8] >> (bit % 8)) & ((1 << b) - 1);
            qabs += code * (0.5 * d + std::ldexp(std::fabs(xt[cc]), -22));
            isum += code * std::nearbyint(xt[cc] / d);
            xabs += std::fabs(xt[cc]);
          }
          bound += std::fabs(s) * qabs + std::fabs(bb) * xabs * 32 * u * 1.01;
          terms += std::fabs(s * d * isum) + std::fabs(bb * xs);
        }
        bound += gamma * terms;
        const double err = std::fabs(double(y[size_t(t * c.rows + r)]) - exact);
        EXPECT_LE(err, bound) << dtype_name(c.dt) << " row " << r << " token " << t;
        worst = std::max(worst, err / bound);
      }
    }
    std::printf("[ qdot ] %s g%d cols %ld: worst error %.3f of the bound\n", std::string(dtype_name(c.dt)).c_str(),
                c.group, long(c.cols), worst);
  }
}

// Through the backend: a fast CPU context with 1 and 2 threads, and T = 1 vs a batch.
TEST(Qdot, CpuContextThreadsAndBatchGiveTheSameBits) {
  std::mt19937 rng(5);
  const QMat q = make_qmat(DType::kQ4, 300, 1024, 64, rng);
  const int T = 6;
  const std::vector<float> x = make_x(T, 1024, rng);
  std::vector<std::vector<float>> outs;
  for (int threads : {1, 2}) {
    ContextOptions o;
    o.threads = threads;
    o.exact = false;
    auto ctx = make_cpu_context(o);
    EXPECT_FALSE(ctx->exact());
    std::vector<float> y(size_t(T) * 300, poison());
    ctx->matmul(q.mat(), x.data(), y.data(), T);
    outs.push_back(y);
    for (int t = 0; t < T; t++) {
      std::vector<float> y1(300, poison());
      ctx->matmul(q.mat(), x.data() + t * 1024, y1.data(), 1);
      EXPECT_EQ(std::memcmp(y1.data(), y.data() + t * 300, 300 * 4), 0) << threads << " " << t;
    }
  }
  EXPECT_TRUE(same_bits(outs[0], outs[1]));
  // The exact context is another path: not these bits, but near them.
  auto exact = make_cpu_context(1);
  EXPECT_TRUE(exact->exact());
  std::vector<float> ye(size_t(T) * 300);
  exact->matmul(q.mat(), x.data(), ye.data(), T);
  EXPECT_FALSE(same_bits(ye, outs[0]));
}

}  // namespace
}  // namespace moeflux::test
