// moeflux_bench_qdot: the int8 path (cpu/qdot.h) against the exact path (cpu/matmul.h) on one
// thread, on the shapes of a Qwen3.5-35B-A3B layer (expert gate/up 512 x 2048, down 2048 x 512,
// an lm_head-like 32768 x 2048 q8) at T = 1 and T = 512, random weights and activations.
//
//   moeflux_bench_qdot [--runs N] [--path scalar|avx2|avx512-vnni] [--lm-head THREADS]
//
// --lm-head T: only the lm_head-sized case below, through CPU contexts of T threads.
// --path avx2 (or scalar) also runs the exact path on AVX2 (scalar): a machine without AVX-512.
//
// Each figure: one warm-up, then the median of N runs (default 9) of the whole call, int8
// including the activation quantisation; CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID:
// on a shared machine, the time others hold the core is left out; their cache and memory
// traffic is not).
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <chrono>

#include "cpu/matmul.h"
#include "cpu/qdot.h"
#include "engine/backend.h"
#include "format/quant.h"
#include "util/half.h"

namespace moeflux {
namespace {

struct Shape {
  int64_t rows, cols;
  DType dt;
  int T;
};

double cpu_us() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return 1e6 * double(ts.tv_sec) + 1e-3 * double(ts.tv_nsec);
}

template <class F>
double median_us(int runs, F&& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < runs; i++) {
    const double a = cpu_us();
    f();
    t.push_back(cpu_us() - a);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// An lm_head-sized q8 matrix (248320 x 2048, 0.5 GB: read from RAM) at T = 1 through CPU
// contexts of `threads` threads, exact and int8 alternated `runs` times: wall-time median.
void lm_head(int threads, int runs) {
  const int64_t rows = 248320, cols = 2048;
  const int group = 64;
  std::vector<uint32_t> words(size_t(rows * cols / 4));
  std::mt19937_64 rng(2);
  for (auto& w : words) w = uint32_t(rng());
  std::vector<uint16_t> sc(size_t(rows * cols / group), f32_to_bf16(0.01f)),
      bi(sc.size(), f32_to_bf16(-1.2f));
  Mat W;
  W.dtype = DType::kQ8;
  W.rows = rows;
  W.cols = cols;
  W.group = group;
  W.data = words.data();
  W.scales = sc.data();
  W.biases = bi.data();
  std::vector<float> x(static_cast<size_t>(cols)), y(static_cast<size_t>(rows));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);
  ContextOptions oe, oi;
  oe.threads = oi.threads = threads;
  oi.exact = false;
  auto ce = make_cpu_context(oe), ci = make_cpu_context(oi);
  std::vector<double> te, ti;
  for (int i = 0; i <= runs; i++)
    for (int m = 0; m < 2; m++) {
      Context& c = m ? *ci : *ce;
      const auto a = std::chrono::steady_clock::now();
      c.matmul(W, x.data(), y.data(), 1);
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
      if (i) (m ? ti : te).push_back(us);
    }
  std::sort(te.begin(), te.end());
  std::sort(ti.begin(), ti.end());
  const double gb = double(words.size()) * 4 / 1e3;
  std::printf(
      "lm_head 248320 x 2048 q8, T = 1, %d threads, wall median (min) of %d alternated runs: "
      "exact %.0f us (%.0f) = %.1f GB/s, int8 %.0f us (%.0f) = %.1f GB/s\n",
      threads, runs, te[te.size() / 2], te[0], gb / te[te.size() / 2], ti[ti.size() / 2], ti[0],
      gb / ti[ti.size() / 2]);
}

int run(int argc, char** argv) {
  int runs = 9;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--path" && i + 1 < argc) {
      const std::string p = argv[++i];
      set_qdot_path(p == "scalar" ? QdotPath::kScalar
                    : p == "avx2" ? QdotPath::kAvx2
                                  : QdotPath::kVnni);
      // A machine without AVX-512 runs the exact path on AVX2 too.
      if (p != "avx512-vnni")
        set_kernel_path(p == "scalar" ? KernelPath::kScalar : KernelPath::kAvx2);
    } else if (a == "--lm-head" && i + 1 < argc) {
      lm_head(std::atoi(argv[++i]), runs);
      return 0;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--runs N] [--path scalar|avx2|avx512-vnni] [--lm-head THREADS]\n",
                   argv[0]);
      return 2;
    }
  }
  const Shape shapes[] = {{512, 2048, DType::kQ4, 1},   {2048, 512, DType::kQ4, 1},
                          {4096, 2048, DType::kQ8, 1},  {32768, 2048, DType::kQ8, 1},
                          {512, 2048, DType::kQ4, 16},  {512, 2048, DType::kQ4, 512},
                          {2048, 512, DType::kQ4, 512}, {4096, 2048, DType::kQ8, 512}};
  std::printf("int8 path: %s, exact path: %s, one thread, median CPU time of %d runs\n\n",
              qdot_path_name(active_qdot_path()), kernel_path_name(active_kernel_path()), runs);
  std::printf("| matrix | T | exact us | int8 us | exact / int8 | int8 GB/s (T=1) or GMAC/s |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const Shape& s : shapes) {
    const int group = 64, bits = quant_bits(s.dt);
    std::vector<uint32_t> words(size_t(s.rows * s.cols * bits / 32));
    for (auto& w : words) w = uint32_t(rng());
    std::vector<uint16_t> sc(size_t(s.rows * s.cols / group)), bi(sc.size());
    for (size_t i = 0; i < sc.size(); i++) {
      sc[i] = f32_to_bf16(0.01f * (1.0f + 0.1f * nd(rng)));
      bi[i] = f32_to_bf16(-0.08f * (1.0f + 0.1f * nd(rng)));
    }
    Mat W;
    W.dtype = s.dt;
    W.rows = s.rows;
    W.cols = s.cols;
    W.group = group;
    W.data = words.data();
    W.scales = sc.data();
    W.biases = bi.data();
    std::vector<float> x(size_t(s.T) * s.cols), y(size_t(s.T) * s.rows);
    for (auto& v : x) v = nd(rng);
    const int r = s.T > 16 ? std::max(1, runs / 3) : runs;
    const double te =
        median_us(r, [&] { matmul_rows(W, 0, s.rows, x.data(), s.T, y.data(), s.rows); });
    QuantizedActs xa;
    const double tq = median_us(r, [&] {
      quantize_acts(x.data(), s.T, s.cols, group, bits, xa);
      qmatmul_rows(W, 0, s.rows, xa, y.data(), s.rows);
    });
    const double bytes = double(words.size()) * 4 + double(sc.size()) * 4;
    const double rate = s.T == 1 ? bytes / tq / 1e3 : double(s.rows) * s.cols * s.T / tq / 1e3;
    std::printf("| %lld x %lld %s | %d | %.0f | %.0f | %.2f | %.1f |\n", (long long)s.rows,
                (long long)s.cols, std::string(dtype_name(s.dt)).c_str(), s.T, te, tq, te / tq,
                rate);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  return moeflux::run(argc, argv);
}
