// moeflux_bench_matmul: this machine's memory bandwidth, then matmul_rows (cpu/matmul.h) on
// every kernel path, split over threads exactly as the CPU backend splits it.
//
//   moeflux_bench_matmul [--threads N] [--runs N] [--small-only] [--no-prefill] [--paths LIST]
//
// Bandwidth: memcpy of a 1 GiB buffer (read + write bytes counted), and the read bandwidth of
// summing a 1 GiB array on 1 and on N threads. Mat-vec (T = 1): GB/s = bytes of weights +
// scales + biases read per call / median time. Mat-mul (T = 512): GFLOP/s = 2*rows*cols*T /
// median time. Each number: a warm-up run, then the median (and min..max) of --runs runs, on
// random data.
//
// Two clocks: wall time, and "busy" time = the largest thread CPU time among the threads of a
// run (CLOCK_THREAD_CPUTIME_ID). On an idle machine they agree; on a shared one the wall time
// also counts the time other processes held our cores, and the busy time is the better estimate
// of what the kernel costs (memory bandwidth taken by the others still shows in both).
#include <immintrin.h>

#include <time.h>
#include <algorithm>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cpu/matmul.h"
#include "format/quant.h"
#include "util/half.h"
#include "util/thread_pool.h"

namespace moeflux {
namespace {

using Clock = std::chrono::steady_clock;

struct Stats {
  double median, min, max;
};

Stats stats(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  const double med = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
  return {med, t.front(), t.back()};
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// The largest thread CPU time of the threads that report into it during one run.
class Busy {
 public:
  void reset() { max_ = 0; }
  void report(double s) {
    std::lock_guard<std::mutex> lk(mu_);
    max_ = std::max(max_, s);
  }
  double get() const { return max_; }

 private:
  std::mutex mu_;
  double max_ = 0;
};

struct Timing {
  Stats wall, busy;
};

// f(busy) runs the work once; every thread that works calls busy.report(its CPU seconds).
template <class F>
Timing time_runs(int runs, F&& f) {
  Busy busy;
  f(busy);  // warm-up
  std::vector<double> wall, cpu;
  for (int i = 0; i < runs; i++) {
    busy.reset();
    const auto t0 = Clock::now();
    f(busy);
    wall.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    cpu.push_back(busy.get());
  }
  return {stats(wall), stats(cpu)};
}

// Runs g() on the calling thread and reports its CPU time.
template <class G>
void timed(Busy& busy, G&& g) {
  const double t0 = thread_cpu_seconds();
  g();
  busy.report(thread_cpu_seconds() - t0);
}

// 64-byte aligned, page-touched buffer.
struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) {
    p = std::aligned_alloc(64, (n + 63) / 64 * 64);
    std::memset(p, 1, n);
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Sum of n floats with 4 independent vector sums: as fast as loads come in.
__attribute__((target("avx2"))) float sum_avx2(const float* a, size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

float sum_scalar(const float* a, size_t n) {
  float s[8] = {};
  for (size_t i = 0; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) s[j] += a[i + j];
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

float sum_floats(const float* a, size_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 ? sum_avx2(a, n) : sum_scalar(a, n);
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A random rows x cols matrix of dtype dt (q: uniform packed bits, bf16 scales ~ 0.01 and
// biases ~ -0.08 as a trained model's; bf16: normal(0, 0.05)).
struct BenchMat {
  std::vector<uint32_t> words;
  std::vector<uint16_t> halfs, scales, biases;
  Mat m;
  uint64_t bytes = 0;

  BenchMat(DType dt, int64_t rows, int64_t cols, int group, ThreadPool& pool) {
    m.dtype = dt;
    m.rows = rows;
    m.cols = cols;
    if (is_quant_dtype(dt)) {
      const QuantLayout L = quant_layout(rows, cols, quant_bits(dt), group);
      words.resize(L.packed_bytes / 4);
      scales.resize(L.scales_bytes / 2);
      biases.resize(L.biases_bytes / 2);
      fill_parallel(pool, words.size(), [&](size_t i, uint64_t r) { words[i] = uint32_t(r); });
      fill_parallel(pool, scales.size(), [&](size_t i, uint64_t r) {
        scales[i] = f32_to_bf16(0.005f + 0.01f * float(r % 1000) / 1000.0f);
        biases[i] = f32_to_bf16(-0.08f * (1.0f + float((r >> 20) % 1000) / 1000.0f));
      });
      m.data = words.data();
      m.scales = scales.data();
      m.biases = biases.data();
      m.group = group;
      bytes = L.total();
    } else {
      halfs.resize(size_t(rows * cols));
      fill_parallel(pool, halfs.size(), [&](size_t i, uint64_t r) {
        // sum of 4 uniforms ~ normal, scaled to about 0.05
        const float u = float((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) +
                              ((r >> 48) & 0xffff)) /
                            65536.0f -
                        2.0f;
        halfs[i] = f32_to_bf16(0.05f * u);
      });
      m.data = halfs.data();
      bytes = halfs.size() * 2;
    }
  }

  template <class F>
  static void fill_parallel(ThreadPool& pool, size_t n, F&& f) {
    pool.parallel_for(
        int64_t(n),
        [&](int64_t a, int64_t b) {
          uint64_t s = uint64_t(a) * 7919 + 17;
          for (int64_t i = a; i < b; i++) f(size_t(i), splitmix(s));
        },
        4096);
  }
};

struct Row {
  std::string matrix, dtype, path;
  int T;
  Timing t;
  uint64_t bytes;
  double flops;
};

std::vector<KernelPath> parse_paths(const std::string& list) {
  std::vector<KernelPath> out;
  for (KernelPath p : {KernelPath::kScalar, KernelPath::kAvx2, KernelPath::kAvx512})
    if (kernel_path_supported(p) &&
        (list.empty() || list.find(kernel_path_name(p)) != std::string::npos))
      out.push_back(p);
  return out;
}

int main_impl(int argc, char** argv) {
  int threads = 2, runs = 10;
  bool small_only = false, prefill = true;
  std::string path_list;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--small-only") {
      small_only = true;
    } else if (a == "--no-prefill") {
      prefill = false;
    } else if (a == "--paths" && i + 1 < argc) {
      path_list = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--runs N] [--small-only] [--no-prefill] "
                   "[--paths scalar,avx2,avx512]\n",
                   argv[0]);
      return 2;
    }
  }
  ThreadPool pool(threads);
  std::printf("threads %d, runs %d (median after 1 warm-up), best path %s\n\n", threads, runs,
              kernel_path_name(best_kernel_path()));

  // ---- memory bandwidth ----
  {
    const size_t n = size_t(1) << 30;
    Buffer a(n), b(n);
    const Timing cp =
        time_runs(runs, [&](Busy& busy) { timed(busy, [&] { std::memcpy(b.p, a.p, n); }); });
    std::vector<float> partial(size_t(std::max(threads, 1)));
    const size_t nf = n / 4;
    const Timing r1 = time_runs(runs, [&](Busy& busy) {
      timed(busy, [&] { partial[0] = sum_floats(a.as<float>(), nf); });
    });
    const Timing rn = time_runs(runs, [&](Busy& busy) {
      pool.parallel_for(threads, [&](int64_t t0, int64_t t1) {
        timed(busy, [&] {
          for (int64_t t = t0; t < t1; t++)
            partial[size_t(t)] = sum_floats(a.as<float>() + nf / threads * t, nf / threads);
        });
      });
    });
    std::printf("| memory (1 GiB) | GB/s, wall (min..max) | GB/s, busy (min..max) |\n");
    std::printf("|---|---|---|\n");
    auto line = [](const char* what, double bytes, const Timing& t) {
      std::printf("| %s | %.1f (%.1f..%.1f) | %.1f (%.1f..%.1f) |\n", what,
                  bytes / t.wall.median / 1e9, bytes / t.wall.max / 1e9, bytes / t.wall.min / 1e9,
                  bytes / t.busy.median / 1e9, bytes / t.busy.max / 1e9, bytes / t.busy.min / 1e9);
    };
    line("memcpy (read+write)", 2.0 * double(n), cp);
    line("read, 1 thread", double(n), r1);
    char what[64];
    std::snprintf(what, sizeof what, "read, %d threads", threads);
    line(what, double(n), rn);
    std::printf("\n");
  }

  // ---- matmul_rows ----
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  std::vector<Shape> shapes = {{"2048x512", 2048, 512}};
  if (!small_only) shapes.push_back({"248320x2048", 248320, 2048});
  const std::vector<KernelPath> paths = parse_paths(path_list);
  const int Tbig = 512;
  std::vector<Row> rows_out;
  for (const Shape& sh : shapes) {
    const std::vector<float> x = [&] {
      std::vector<float> v(size_t(Tbig) * size_t(sh.cols));
      std::mt19937 rng(7);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (float& f : v) f = nd(rng);
      return v;
    }();
    std::vector<float> y(size_t(Tbig) * size_t(sh.rows));
    for (DType dt : {DType::kQ4, DType::kQ8, DType::kBF16}) {
      BenchMat W(dt, sh.rows, sh.cols, 64, pool);
      for (KernelPath p : paths) {
        set_kernel_path(p);
        for (int T : {1, Tbig}) {
          if (T > 1 && !prefill) continue;
          // the scalar reference at T = 512 on the big matrix would take most of an hour
          if (T > 1 && p == KernelPath::kScalar && sh.rows * sh.cols > (int64_t(1) << 22)) continue;
          // seconds-long runs (big matrix at T = 512, or on the scalar path): fewer of them
          const bool slow =
              sh.rows * sh.cols > (int64_t(1) << 22) && (T > 1 || p == KernelPath::kScalar);
          const int r = slow ? std::max(3, runs / 3) : runs;
          const Timing tm = time_runs(r, [&](Busy& busy) {
            pool.parallel_for(
                sh.rows,
                [&](int64_t r0, int64_t r1) {
                  timed(busy, [&] { matmul_rows(W.m, r0, r1, x.data(), T, y.data(), sh.rows); });
                },
                16);
          });
          rows_out.push_back({sh.name, std::string(dtype_name(dt)), kernel_path_name(p), T, tm,
                              W.bytes, 2.0 * double(sh.rows) * double(sh.cols) * T});
          const Row& o = rows_out.back();
          std::fprintf(stderr, "%s %s %s T=%d: wall %.3f ms, busy %.3f ms\n", o.matrix.c_str(),
                       o.dtype.c_str(), o.path.c_str(), T, tm.wall.median * 1e3,
                       tm.busy.median * 1e3);
        }
      }
    }
  }
  set_kernel_path(KernelPath::kAuto);
  // T = 1 rows report weight GB/s, T > 1 rows GFLOP/s; both from the median wall and busy time.
  std::printf(
      "| matrix | dtype | path | T | wall ms (min..max) | busy ms | GB/s or GFLOP/s, "
      "wall | busy |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const Row& o : rows_out) {
    const double work = o.T == 1 ? double(o.bytes) : o.flops;
    const char* unit = o.T == 1 ? "GB/s" : "GFLOP/s";
    std::printf("| %s | %s | %s | %d | %.3f (%.3f..%.3f) | %.3f | %.1f %s | %.1f %s |\n",
                o.matrix.c_str(), o.dtype.c_str(), o.path.c_str(), o.T, o.t.wall.median * 1e3,
                o.t.wall.min * 1e3, o.t.wall.max * 1e3, o.t.busy.median * 1e3,
                work / o.t.wall.median / 1e9, unit, work / o.t.busy.median / 1e9, unit);
  }
  return 0;
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  return moeflux::main_impl(argc, argv);
}
