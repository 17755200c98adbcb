// matmul_rows (cpu/matmul.h) on each kernel path (scalar, AVX2, AVX-512), and the quantiser round
// trip. Every property test is instantiated once per path and forces it (set_kernel_path); a
// path this CPU lacks is a skip that says so, so the log records which paths ran here.
//
// Properties, each on random data (never zeros) with y poisoned before each run:
//   (a) batch invariance: a token alone, in any batch, with any row split gives the same bits;
//   (b) f32 / bf16 / f16 matrices holding the same values give the same bits (and so does a
//       quantised matrix and its dequantised f32 copy);
//   (c) every path is within the summation error bound of an exact (double) reference, and in
//       fact bit-identical to the scalar path (same order, same FMAs by design);
//   (d) repeated and multi-threaded runs give the same bits.
//
// Tolerance for (c): each output is 16 lane sums of m = ceil(cols/16) fused multiply-adds (one
// rounding each) followed by 4 tree additions, so the classic recursive-summation bound gives
// |y - exact| <= gamma_{m+4} * sum_c |W[r,c] x[c]|, gamma_k = k u / (1 - k u), u = 2^-24. The
// weights themselves are exact (dequantize_row values), so nothing else enters. For cols = 2048
// that is 7.9e-6 * sum|w x|.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/matmul.h"
#include "format/dtype.h"
#include "format/quant.h"
#include "util/error.h"
#include "util/half.h"
#include "util/thread_pool.h"

namespace moeflux::test {
namespace {

constexpr uint32_t kPoison = 0x7fc0dead;  // a NaN no kernel produces from finite data

float poison() {
  float f;
  std::memcpy(&f, &kPoison, 4);
  return f;
}
bool is_poison(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u == kPoison;
}
bool same_bits(float a, float b) {
  return std::memcmp(&a, &b, 4) == 0;
}

constexpr KernelPath kPaths[] = {KernelPath::kScalar, KernelPath::kAvx2, KernelPath::kAvx512};

std::vector<KernelPath> paths() {
  std::vector<KernelPath> p;
  for (KernelPath k : kPaths)
    if (kernel_path_supported(k)) p.push_back(k);
  return p;
}

// What a path needs of the CPU (best_kernel_path's cpuid checks).
const char* path_needs(KernelPath p) {
  switch (p) {
    case KernelPath::kAvx2:
      return "AVX2, FMA and F16C";
    case KernelPath::kAvx512:
      return "AVX-512 F and BW";
    default:
      return "nothing";
  }
}

// Restores the automatic path when a test ends, whatever it forced.
struct PathGuard {
  ~PathGuard() { set_kernel_path(KernelPath::kAuto); }
};

// A test run with one kernel path forced: skipped, with the reason, when this CPU lacks it.
class OnKernelPath : public ::testing::TestWithParam<KernelPath> {
 protected:
  void SetUp() override {
    const KernelPath p = GetParam();
    if (!kernel_path_supported(p))
      GTEST_SKIP() << kernel_path_name(p) << " path not run: this CPU lacks " << path_needs(p)
                   << " (best path here: " << kernel_path_name(best_kernel_path()) << ")";
    set_kernel_path(p);
    std::printf("[ kernel ] path %s forced (best here: %s)\n", kernel_path_name(p),
                kernel_path_name(best_kernel_path()));
  }
  void TearDown() override { set_kernel_path(KernelPath::kAuto); }
};

std::string path_param_name(const ::testing::TestParamInfo<KernelPath>& info) {
  return kernel_path_name(info.param);
}

// A weight matrix with its storage and its exact f32 values ([rows, cols]).
struct TestMat {
  std::vector<float> f32;        // the data of an f32 Mat
  std::vector<uint16_t> half;    // bf16/f16 data
  std::vector<uint32_t> packed;  // quantised data
  std::vector<uint16_t> scales, biases;
  std::vector<float> exact;  // what W[r, c] means
  Mat shape;                 // dtype, rows, cols, group (pointers set by mat())

  // The Mat over this object's storage (taken when needed, so copies stay valid).
  Mat mat() const {
    Mat m = shape;
    if (!packed.empty()) {
      m.data = packed.data();
      m.scales = scales.data();
      m.biases = biases.data();
    } else {
      m.data = half.empty() ? static_cast<const void*>(f32.data()) : half.data();
    }
    return m;
  }
};

// Random values with a spread of magnitudes per row (rows of a trained matrix differ in scale).
std::vector<float> random_values(int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(-3.0f, 1.0f);
  std::vector<float> v(size_t(rows * cols));
  for (int64_t r = 0; r < rows; r++) {
    const float s = std::pow(10.0f, ud(rng));
    for (int64_t c = 0; c < cols; c++) {
      float x = nd(rng) * s;
      if (x == 0.0f) x = s;  // never zeros
      v[size_t(r * cols + c)] = x;
    }
  }
  return v;
}

TestMat make_float(DType dt, int64_t rows, int64_t cols, const std::vector<float>& vals) {
  TestMat t;
  t.shape.dtype = dt;
  t.shape.rows = rows;
  t.shape.cols = cols;
  const size_t n = size_t(rows * cols);
  t.exact.resize(n);
  if (dt == DType::kF32) {
    t.f32 = vals;
    t.exact = vals;
  } else {
    t.half.resize(n);
    from_f32(dt, vals.data(), t.half.data(), n);
    to_f32(dt, t.half.data(), t.exact.data(), n);
  }
  return t;
}

TestMat make_quant(int bits, int group, int64_t rows, int64_t cols,
                   const std::vector<float>& vals) {
  TestMat t;
  t.shape.dtype = bits == 8 ? DType::kQ8 : bits == 4 ? DType::kQ4 : DType::kQ2;
  t.shape.rows = rows;
  t.shape.cols = cols;
  t.shape.group = group;
  const QuantLayout L = quant_layout(rows, cols, bits, group);
  t.packed.resize(L.packed_bytes / 4);
  t.scales.resize(L.scales_bytes / 2);
  t.biases.resize(L.biases_bytes / 2);
  quantize_rows(vals.data(), rows, cols, bits, group, t.packed.data(), t.scales.data(),
                t.biases.data());
  t.exact.resize(size_t(rows * cols));
  const int64_t wpr = cols * bits / 32, gpr = cols / group;
  for (int64_t r = 0; r < rows; r++)
    dequantize_row(t.packed.data() + r * wpr, t.scales.data() + r * gpr, t.biases.data() + r * gpr,
                   cols, bits, group, t.exact.data() + r * cols);
  return t;
}

// y [T, ys] poisoned, then matmul_rows over [r0, r1); checks every output in the range was
// written and nothing else was.
std::vector<float> run(const Mat& W, const std::vector<float>& x, int T, int64_t ys, int64_t r0,
                       int64_t r1) {
  std::vector<float> y(size_t(T) * size_t(ys), poison());
  matmul_rows(W, r0, r1, x.data(), T, y.data(), ys);
  for (int t = 0; t < T; t++)
    for (int64_t r = 0; r < ys; r++) {
      const bool inside = r >= r0 && r < r1;
      const float v = y[size_t(t * ys + r)];
      if (inside && (is_poison(v) || !std::isfinite(v))) {
        ADD_FAILURE() << "y[" << t << ", " << r << "] not written (" << v << ")";
        return y;
      }
      if (!inside && !is_poison(v)) {
        ADD_FAILURE() << "y[" << t << ", " << r << "] outside [" << r0 << ", " << r1
                      << ") was written";
        return y;
      }
    }
  return y;
}

struct Shape {
  int64_t rows, cols;
};

// Checks path p against the double reference (bound above) and against the scalar path (bits),
// for each T. Leaves p forced.
void check_path(KernelPath p, const TestMat& tm, const std::vector<int>& Ts, std::mt19937& rng,
                const std::string& what) {
  const Mat W = tm.mat();
  const int64_t rows = W.rows, cols = W.cols, ys = rows + 3;  // stride past the rows
  const double u = std::ldexp(1.0, -24);
  const double m = double((cols + 15) / 16) + 4;
  const double gamma = m * u / (1 - m * u);
  for (int T : Ts) {
    const auto x = random_values(T, cols, rng);
    // exact reference (double) and the bound
    std::vector<double> ref(size_t(T * rows)), bound(size_t(T * rows));
    for (int t = 0; t < T; t++)
      for (int64_t r = 0; r < rows; r++) {
        double s = 0, a = 0;
        for (int64_t c = 0; c < cols; c++) {
          const double p = double(tm.exact[size_t(r * cols + c)]) * x[size_t(t * cols + c)];
          s += p;
          a += std::fabs(p);
        }
        ref[size_t(t * rows + r)] = s;
        bound[size_t(t * rows + r)] = gamma * a;
      }
    std::vector<float> scalar_y;
    if (p != KernelPath::kScalar) {
      set_kernel_path(KernelPath::kScalar);
      scalar_y = run(W, x, T, ys, 0, rows);
      set_kernel_path(p);
      if (::testing::Test::HasFailure()) return;
    }
    const auto y = run(W, x, T, ys, 0, rows);
    if (::testing::Test::HasFailure()) return;
    int bad = 0;
    for (int t = 0; t < T && bad < 5; t++)
      for (int64_t r = 0; r < rows && bad < 5; r++) {
        const double got = y[size_t(t * ys + r)], want = ref[size_t(t * rows + r)];
        const double tol = bound[size_t(t * rows + r)];
        if (!(std::fabs(got - want) <= tol)) {
          ADD_FAILURE() << what << " path " << kernel_path_name(p) << " T=" << T << " y[" << t
                        << "," << r << "] = " << got << ", exact " << want << ", |err| "
                        << std::fabs(got - want) << " > bound " << tol;
          bad++;
        }
      }
    if (p != KernelPath::kScalar) {
      for (size_t i = 0; i < y.size() && bad < 5; i++)
        if (!same_bits(y[i], scalar_y[i])) {
          ADD_FAILURE() << what << " path " << kernel_path_name(p) << " T=" << T
                        << " differs from scalar at " << i << ": " << y[i] << " vs " << scalar_y[i];
          bad++;
        }
    }
    if (bad) return;
  }
}

const std::vector<int> kTs = {1, 2, 3, 7, 64, 513};

// ---------------------------------------------------------------------------------------------

TEST(QKernelQuant, RoundTripWithinHalfScale) {
  std::mt19937 rng(1);
  for (int bits : {8, 4, 2})
    for (int group : {32, 64, 128}) {
      const int64_t rows = 13, cols = group * 5;
      auto w = random_values(rows, cols, rng);
      // a constant group (scale 0) and a group with one outlier
      for (int c = 0; c < group; c++) w[size_t(c)] = 0.37f;
      w[size_t(cols + 3)] = 50.0f;
      const TestMat t = make_quant(bits, group, rows, cols, w);
      const float qmax = float((1 << bits) - 1);
      for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
          const int64_t g = r * (cols / group) + c / group;
          const float s = bf16_to_f32(t.scales[size_t(g)]);
          const float b = bf16_to_f32(t.biases[size_t(g)]);
          const float e = std::fabs(w[size_t(r * cols + c)] - t.exact[size_t(r * cols + c)]);
          // scale/2 from rounding q, plus the bf16 rounding of bias and scale (relative 2^-9,
          // scale's multiplied by up to qmax), plus f32 rounding of the dequantisation
          const float range = std::fabs(b) + qmax * s;
          const float tol = 0.5f * s + std::ldexp(range, -8) + std::ldexp(range, -20);
          ASSERT_LE(e, tol) << "bits " << bits << " group " << group << " [" << r << "," << c
                            << "] scale " << s << " bias " << b;
        }
    }
}

TEST(QKernelPaths, ActivePathCanBeForcedAndRestored) {
  PathGuard guard;
  EXPECT_NE(best_kernel_path(), KernelPath::kAuto);
  EXPECT_EQ(active_kernel_path(), best_kernel_path());
  for (KernelPath p : paths()) {
    set_kernel_path(p);
    EXPECT_EQ(active_kernel_path(), p);
  }
  set_kernel_path(KernelPath::kAuto);
  EXPECT_EQ(active_kernel_path(), best_kernel_path());
  for (KernelPath p : {KernelPath::kAvx2, KernelPath::kAvx512})
    if (!kernel_path_supported(p)) {
      EXPECT_THROW(set_kernel_path(p), Error);
    }
  std::printf("kernel paths on this CPU:");
  for (KernelPath p : paths()) std::printf(" %s", kernel_path_name(p));
  std::printf(" (best %s)\n", kernel_path_name(best_kernel_path()));
}

// (c) float dtypes: odd rows, cols of every residue mod 16.
class QKernelAccuracy : public OnKernelPath {};
TEST_P(QKernelAccuracy, FloatDtypesMatchReferenceAndScalar) {
  std::mt19937 rng(2);
  const std::vector<Shape> shapes = {{1, 1},  {3, 5},    {7, 16},  {17, 31},
                                     {5, 33}, {37, 100}, {9, 257}, {11, 520}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16})
    for (const Shape& s : shapes) {
      const TestMat t = make_float(dt, s.rows, s.cols, random_values(s.rows, s.cols, rng));
      check_path(GetParam(), t, s.cols > 300 ? std::vector<int>{1, 2, 3, 7, 64} : kTs, rng,
                 std::string(dtype_name(dt)) + " " + std::to_string(s.rows) + "x" +
                     std::to_string(s.cols));
      if (HasFailure()) return;
    }
}

// (c) quantised: every bits x group, cols = group * k with odd k, odd rows, quantize_rows data.
TEST_P(QKernelAccuracy, QuantisedMatchReferenceAndScalar) {
  std::mt19937 rng(3);
  for (int bits : {8, 4, 2})
    for (int group : {32, 64, 128})
      for (const Shape& s : {Shape{1, group}, Shape{7, group * 3}, Shape{19, group * 5},
                             Shape{3, 1056 / group * group}}) {
        const TestMat t =
            make_quant(bits, group, s.rows, s.cols, random_values(s.rows, s.cols, rng));
        check_path(GetParam(), t, kTs, rng,
                   "q" + std::to_string(bits) + " g" + std::to_string(group) + " " +
                       std::to_string(s.rows) + "x" + std::to_string(s.cols));
        if (HasFailure()) return;
      }
}

// (a) batch invariance: every token of a 513-token batch equals that token alone, and any
// split of the rows and of the batch gives the same bits.
class QKernelBatchInvariance : public OnKernelPath {};
TEST_P(QKernelBatchInvariance, TokenAloneEqualsBatchForAnySplit) {
  const KernelPath p = GetParam();
  std::mt19937 rng(4);
  const int T = 513;
  struct Case {
    DType dt;
    int bits, group;
    Shape s;
  };
  const std::vector<Case> cases = {{DType::kF32, 0, 0, {37, 100}}, {DType::kBF16, 0, 0, {45, 129}},
                                   {DType::kF16, 0, 0, {21, 64}},  {DType::kQ8, 8, 32, {33, 96}},
                                   {DType::kQ4, 4, 64, {41, 320}}, {DType::kQ4, 4, 128, {19, 384}},
                                   {DType::kQ2, 2, 32, {27, 160}}};
  for (const Case& cs : cases) {
    const auto vals = random_values(cs.s.rows, cs.s.cols, rng);
    const TestMat t = cs.bits ? make_quant(cs.bits, cs.group, cs.s.rows, cs.s.cols, vals)
                              : make_float(cs.dt, cs.s.rows, cs.s.cols, vals);
    const Mat W = t.mat();
    const int64_t rows = W.rows, cols = W.cols, ys = rows;
    const auto x = random_values(T, cols, rng);
    const std::string what = std::string(dtype_name(cs.dt)) + " " + kernel_path_name(p);
    const auto full = run(W, x, T, ys, 0, rows);
    if (HasFailure()) return;
    // every token alone, all rows
    for (int t = 0; t < T; t++) {
      std::vector<float> one(size_t(rows), poison());
      matmul_rows(W, 0, rows, x.data() + size_t(t) * cols, 1, one.data(), rows);
      for (int64_t r = 0; r < rows; r++)
        ASSERT_TRUE(same_bits(one[size_t(r)], full[size_t(t * ys + r)]))
            << what << ": token " << t << " alone differs at row " << r;
    }
    // random row chunks x random token batches (sizes 1..70), written into one y
    std::vector<float> y(full.size(), poison());
    std::uniform_int_distribution<int> rd(1, 23), td(1, 70);
    for (int64_t r0 = 0; r0 < rows;) {
      const int64_t r1 = std::min<int64_t>(rows, r0 + rd(rng));
      for (int t0 = 0; t0 < T;) {
        const int n = std::min(T - t0, td(rng));
        matmul_rows(W, r0, r1, x.data() + size_t(t0) * cols, n, y.data() + size_t(t0) * ys, ys);
        t0 += n;
      }
      r0 = r1;
    }
    for (size_t i = 0; i < y.size(); i++)
      ASSERT_TRUE(same_bits(y[i], full[i])) << what << ": split run differs at " << i;
  }
}

// (b) f32, bf16 and f16 matrices with the same values give the same bits on each path; and so
// do a quantised matrix and its dequantised f32 copy.
class QKernelDtypes : public OnKernelPath {};
TEST_P(QKernelDtypes, SameValuesSameBitsAcrossDtypes) {
  const KernelPath p = GetParam();
  std::mt19937 rng(5);
  for (const Shape& s : {Shape{1, 7}, Shape{13, 48}, Shape{29, 133}, Shape{8, 2048}}) {
    // m * 2^e, |m| < 256, e in [-14, -4]: exact in bf16 and f16 alike
    std::uniform_int_distribution<int> md(1, 255), ed(-14, -4), sd(0, 1);
    std::vector<float> vals(size_t(s.rows * s.cols));
    for (float& v : vals) v = std::ldexp(float(sd(rng) ? md(rng) : -md(rng)), ed(rng));
    const TestMat f = make_float(DType::kF32, s.rows, s.cols, vals);
    const TestMat b = make_float(DType::kBF16, s.rows, s.cols, vals);
    const TestMat h = make_float(DType::kF16, s.rows, s.cols, vals);
    ASSERT_EQ(b.exact, vals);
    ASSERT_EQ(h.exact, vals);
    for (int T : kTs) {
      const auto x = random_values(T, s.cols, rng);
      const auto yf = run(f.mat(), x, T, s.rows, 0, s.rows);
      const auto yb = run(b.mat(), x, T, s.rows, 0, s.rows);
      const auto yh = run(h.mat(), x, T, s.rows, 0, s.rows);
      ASSERT_EQ(0, std::memcmp(yf.data(), yb.data(), yf.size() * 4))
          << "bf16 vs f32, " << kernel_path_name(p) << " T=" << T << " " << s.rows << "x" << s.cols;
      ASSERT_EQ(0, std::memcmp(yf.data(), yh.data(), yf.size() * 4))
          << "f16 vs f32, " << kernel_path_name(p) << " T=" << T << " " << s.rows << "x" << s.cols;
    }
  }
  for (int bits : {8, 4, 2}) {
    const int64_t rows = 21, cols = 192;
    const TestMat q = make_quant(bits, 64, rows, cols, random_values(rows, cols, rng));
    const TestMat f = make_float(DType::kF32, rows, cols, q.exact);
    for (int T : {1, 3, 64}) {
      const auto x = random_values(T, cols, rng);
      const auto yq = run(q.mat(), x, T, rows, 0, rows);
      const auto yf = run(f.mat(), x, T, rows, 0, rows);
      ASSERT_EQ(0, std::memcmp(yq.data(), yf.data(), yq.size() * 4))
          << "q" << bits << " vs its f32 copy, " << kernel_path_name(p) << " T=" << T;
    }
  }
}

// (d) repeated runs and runs split over threads give the same bits.
class QKernelDeterminism : public OnKernelPath {};
TEST_P(QKernelDeterminism, RepeatedAndThreadedRunsAgree) {
  const KernelPath p = GetParam();
  std::mt19937 rng(6);
  const int64_t rows = 203, cols = 512;
  const auto vals = random_values(rows, cols, rng);
  const std::vector<TestMat> mats = {make_quant(4, 64, rows, cols, vals),
                                     make_quant(8, 128, rows, cols, vals),
                                     make_float(DType::kBF16, rows, cols, vals)};
  ThreadPool pool(3);
  for (const TestMat& t : mats)
    for (int T : {1, 5, 64}) {
      const auto x = random_values(T, cols, rng);
      const auto first = run(t.mat(), x, T, rows, 0, rows);
      for (int rep = 0; rep < 3; rep++) {
        const auto again = run(t.mat(), x, T, rows, 0, rows);
        ASSERT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * 4))
            << kernel_path_name(p) << " repeat " << rep;
      }
      for (int64_t grain : {1, 8, 16}) {
        std::vector<float> y(first.size(), poison());
        pool.parallel_for(
            rows,
            [&](int64_t r0, int64_t r1) {
              matmul_rows(t.mat(), r0, r1, x.data(), T, y.data(), rows);
            },
            grain);
        ASSERT_EQ(0, std::memcmp(first.data(), y.data(), first.size() * 4))
            << kernel_path_name(p) << " threaded, grain " << grain;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Paths, QKernelAccuracy, ::testing::ValuesIn(kPaths), path_param_name);
INSTANTIATE_TEST_SUITE_P(Paths, QKernelBatchInvariance, ::testing::ValuesIn(kPaths),
                         path_param_name);
INSTANTIATE_TEST_SUITE_P(Paths, QKernelDtypes, ::testing::ValuesIn(kPaths), path_param_name);
INSTANTIATE_TEST_SUITE_P(Paths, QKernelDeterminism, ::testing::ValuesIn(kPaths), path_param_name);

}  // namespace
}  // namespace moeflux::test
