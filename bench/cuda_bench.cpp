// moeflux_bench_cuda: the CUDA backend's mat-vec / mat-mul (engine/backend.h Context::matmul)
// on the decode and prefill shapes of Qwen3.5-35B-A3B, through the Context API alone.
//
//   moeflux_bench_cuda [--runs N]
//
// Mat-vec (T = 1): GB/s = bytes of weights + scales + biases read per call / time per call,
// against the device copy bandwidth (a device-to-device copy of 1 GiB, bytes read + written).
// Mat-mul (T = 8, 512): GFLOP/s = 2·rows·cols·T / time. Time per call = one sync'd batch of N
// back-to-back calls / N (launch gaps included, as the engine sees them without graphs), the
// median of 5 batches (3 of 2 calls for T = 512) after a warm-up, on random data.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_device.h"
#include "format/quant.h"
#include "util/half.h"

namespace moeflux {
namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Seconds per call of f, N calls per batch.
template <typename F>
double time_per_call(Context& ctx, int n, F&& f, int batches = 5) {
  f();
  ctx.sync();
  std::vector<double> t;
  for (int b = 0; b < batches; b++) {
    const auto t0 = Clock::now();
    for (int i = 0; i < n; i++) f();
    ctx.sync();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / n);
  }
  return median(t);
}

struct DevMat {
  Mat m;
  size_t bytes = 0;
};

DevMat make(Context& ctx, DType dt, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> w(size_t(rows * cols));
  for (auto& x : w) x = d(g);
  DevMat r;
  r.m.dtype = dt;
  r.m.rows = rows;
  r.m.cols = cols;
  auto put = [&](const void* h, size_t n) {
    void* p = ctx.alloc_bytes(n);
    ctx.upload_bytes(p, h, n);
    r.bytes += n;
    return p;
  };
  if (dt == DType::kBF16) {
    std::vector<uint16_t> h(w.size());
    for (size_t i = 0; i < w.size(); i++) h[i] = f32_to_bf16(w[i]);
    r.m.data = put(h.data(), h.size() * 2);
  } else {
    const int bits = quant_bits(dt), group = 64;
    const QuantLayout L = quant_layout(rows, cols, bits, group);
    std::vector<uint32_t> packed(L.packed_bytes / 4);
    std::vector<uint16_t> s(L.scales_bytes / 2), b(L.biases_bytes / 2);
    quantize_rows(w.data(), rows, cols, bits, group, packed.data(), s.data(), b.data());
    r.m.data = put(packed.data(), L.packed_bytes);
    r.m.scales = static_cast<const uint16_t*>(put(s.data(), L.scales_bytes));
    r.m.biases = static_cast<const uint16_t*>(put(b.data(), L.biases_bytes));
    r.m.group = group;
  }
  ctx.sync();
  return r;
}

int run(int runs) {
  std::string why;
  if (!cuda_usable(&why)) {
    std::fprintf(stderr, "moeflux_bench_cuda: no CUDA: %s\n", why.c_str());
    return 1;
  }
  auto ctx = cuda_device().context(1);
  {
    const size_t n = size_t(1) << 30;
    void* a = ctx->alloc_bytes(n);
    void* b = ctx->alloc_bytes(n);
    const double t = time_per_call(*ctx, 10, [&] { ctx->copy_bytes(b, a, n); });
    std::printf("device copy: %.0f GB/s (read + write)\n\n", 2.0 * n / t / 1e9);
    ctx->release(a);
    ctx->release(b);
  }
  struct Shape {
    const char* what;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"expert down", 2048, 512},  {"expert gate/up", 512, 2048},
                          {"attn q (gated)", 8192, 2048}, {"lin qkv", 8192, 2048},
                          {"lin out", 2048, 4096},    {"lm_head", 248320, 2048}};
  std::printf("| shape | what | dtype | T=1 us | T=1 GB/s | T=8 us | T=512 ms | T=512 GFLOP/s |\n");
  std::printf("|---|---|---|---:|---:|---:|---:|---:|\n");
  for (DType dt : {DType::kQ4, DType::kQ8, DType::kBF16})
    for (const Shape& s : shapes) {
      DevMat W = make(*ctx, dt, s.rows, s.cols, 1);
      std::vector<float> xh(size_t(512 * s.cols), 0.5f);
      float* x = ctx->alloc(xh.size());
      ctx->upload(x, xh.data(), xh.size());
      float* y = ctx->alloc(size_t(512 * s.rows));
      const double t1 = time_per_call(*ctx, runs, [&] { ctx->matmul(W.m, x, y, 1); });
      const double t8 = time_per_call(*ctx, runs, [&] { ctx->matmul(W.m, x, y, 8); });
      // The lm_head never runs 512 rows at once (Session: 64 at a time): not timed there.
      const double tp = s.rows > 100000 ? 0.0
                                        : time_per_call(*ctx, 2, [&] { ctx->matmul(W.m, x, y, 512); }, 3);
      std::printf("| %lldx%lld | %s | %s | %.1f | %.0f | %.1f | %.2f | %.0f |\n",
                  (long long)s.rows, (long long)s.cols, s.what, std::string(dtype_name(dt)).c_str(),
                  t1 * 1e6, double(W.bytes) / t1 / 1e9, t8 * 1e6, tp * 1e3,
                  tp > 0 ? 2.0 * double(s.rows) * double(s.cols) * 512 / tp / 1e9 : 0.0);
      ctx->release(x);
      ctx->release(y);
      for (const void* p : {W.m.data, static_cast<const void*>(W.m.scales),
                            static_cast<const void*>(W.m.biases)})
        if (p) ctx->release(const_cast<void*>(p));
    }
  return 0;
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  int runs = 200;
  for (int i = 1; i < argc; i++)
    if (!std::strcmp(argv[i], "--runs") && i + 1 < argc) runs = std::atoi(argv[++i]);
  try {
    return moeflux::run(runs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeflux_bench_cuda: %s\n", e.what());
    return 1;
  }
}
