// moeflux_bench_deltanet: the Gated DeltaNet core over T tokens, token-by-token recurrence
// (Context::deltanet) against the chunked WY form (Context::deltanet_chunked), on the CPU
// backend, at one linear-attention layer's shapes.
//
//   moeflux_bench_deltanet [--threads N] [--runs N] [--tokens T] [--chunk C]
//                          [--heads NK NV] [--dims DK DV]
//
// Defaults are Qwen3.5/3.6-35B-A3B's (16 k-heads, 32 v-heads, 128 x 128) at T = 512. Prints the
// median (min..max) wall time of each over --runs runs after a warm-up, tokens/s, and the
// largest difference of the two outputs and final states relative to their largest magnitude.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"

namespace moeflux {
namespace {

using Clock = std::chrono::steady_clock;

struct Stats {
  double median, min, max;
};

Stats stats(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  return {n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]), t.front(), t.back()};
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double mx = 0, d = 0;
  for (size_t i = 0; i < a.size(); i++) {
    mx = std::max(mx, double(std::fabs(a[i])));
    d = std::max(d, double(std::fabs(a[i] - b[i])));
  }
  return mx > 0 ? d / mx : d;
}

int run(int argc, char** argv) {
  int threads = 0, runs = 5, T = 512, chunk = 64, nk = 16, nv = 32, dk = 128, dv = 128;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto next = [&]() -> int {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return std::atoi(argv[++i]);
    };
    if (a == "--threads")
      threads = next();
    else if (a == "--runs")
      runs = next();
    else if (a == "--tokens")
      T = next();
    else if (a == "--chunk")
      chunk = next();
    else if (a == "--heads")
      nk = next(), nv = next();
    else if (a == "--dims")
      dk = next(), dv = next();
    else {
      std::fprintf(stderr,
                   "usage: moeflux_bench_deltanet [--threads N] [--runs N] [--tokens T] "
                   "[--chunk C] [--heads NK NV] [--dims DK DV]\n");
      return 2;
    }
  }
  auto be = make_cpu_context(threads);
  const int C = 2 * nk * dk + nv * dv;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<float> qkv(size_t(T) * C), g(size_t(T) * nv), beta(size_t(T) * nv);
  for (auto& x : qkv) x = nd(rng);
  // Gates as the model makes them: g = -exp(A_log) softplus(.) < 0, beta = sigmoid(.) in (0, 1).
  for (auto& x : g) x = -0.05f - 2.0f * ud(rng);
  for (auto& x : beta) x = ud(rng);
  std::vector<float> s0(size_t(nv) * dk * dv);
  for (auto& x : s0) x = 0.1f * nd(rng);

  const size_t no = size_t(T) * nv * dv;
  float* d_qkv = be->alloc(qkv.size());
  float* d_g = be->alloc(g.size());
  float* d_b = be->alloc(beta.size());
  float* d_s = be->alloc(s0.size());
  float* d_o = be->alloc(no);
  be->upload(d_qkv, qkv.data(), qkv.size());
  be->upload(d_g, g.data(), g.size());
  be->upload(d_b, beta.data(), beta.size());
  const DeltaNetParams p{nk, nv, dk, dv};

  std::vector<float> out[2], st[2];
  std::printf("deltanet: %d k-heads, %d v-heads, %d x %d, T = %d, %d threads, chunk %d\n\n", nk, nv,
              dk, dv, T, be->threads(), chunk);
  std::printf("| form | ms (median) | min..max | tokens/s |\n|---|---:|---:|---:|\n");
  for (int form = 0; form < 2; form++) {
    std::vector<double> t;
    for (int r = 0; r <= runs; r++) {
      be->upload(d_s, s0.data(), s0.size());
      const auto t0 = Clock::now();
      if (form == 0)
        be->deltanet(d_qkv, d_g, d_b, d_s, d_o, T, p);
      else
        be->deltanet_chunked(d_qkv, d_g, d_b, d_s, d_o, T, p, chunk);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (r > 0) t.push_back(s);  // run 0 is the warm-up
    }
    out[form].resize(no);
    st[form].resize(s0.size());
    be->download(out[form].data(), d_o, no);
    be->download(st[form].data(), d_s, s0.size());
    const Stats s = stats(t);
    std::printf("| %s | %.2f | %.2f..%.2f | %.0f |\n", form ? "chunked" : "recurrence",
                s.median * 1e3, s.min * 1e3, s.max * 1e3, T / s.median);
  }
  std::printf("\nmax |chunked - recurrence| / max |recurrence|: output %.3g, state %.3g\n",
              rel_diff(out[0], out[1]), rel_diff(st[0], st[1]));
  for (float* x : {d_qkv, d_g, d_b, d_s, d_o}) be->release(x);
  return 0;
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  return moeflux::run(argc, argv);
}
