// moeflux_bench_prefill: a prompt evaluated as one batch (Session::eval of all its tokens)
// against the same prompt fed one token at a time, on a package.
//
//   moeflux_bench_prefill -m PACKAGE [-p 512] [-r 3] [-t THREADS] [--chunked-min N]
//                         [--expert-cache BYTES|all|N%] [--direct-io] [--forms both|batched|tokens]
//
// Each form: one warm-up run (fills the expert cache), then -r runs from a cleared session; the
// median (min..max) tokens/s, the speed-up, and whether the last token's logits are the same
// bits (or their largest difference relative to the largest logit). --chunked-min N makes
// prompts of N or more tokens use the chunked Gated DeltaNet (0: the recurrence).
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
#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "util/error.h"

namespace moeflux {
namespace {

using Clock = std::chrono::steady_clock;

int run(int argc, char** argv) {
  std::string pkg, cache = "all", forms = "both";
  int P = 512, reps = 3, threads = 0, chunked_min = 0;
  bool direct = false;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "-m")
      pkg = next();
    else if (a == "-p")
      P = std::atoi(next().c_str());
    else if (a == "-r")
      reps = std::atoi(next().c_str());
    else if (a == "-t")
      threads = std::atoi(next().c_str());
    else if (a == "--chunked-min")
      chunked_min = std::atoi(next().c_str());
    else if (a == "--expert-cache")
      cache = next();
    else if (a == "--direct-io")
      direct = true;
    else if (a == "--forms")
      forms = next();  // both | batched | tokens (profiling one)
    else {
      std::fprintf(stderr,
                   "usage: moeflux_bench_prefill -m PACKAGE [-p 512] [-r 3] [-t THREADS] "
                   "[--chunked-min N] [--expert-cache BYTES|all] [--direct-io] [--forms "
                   "both|batched|tokens]\n");
      return 2;
    }
  }
  if (pkg.empty() || P < 1 || reps < 1) {
    std::fprintf(stderr, "moeflux_bench_prefill: -m PACKAGE is required; -p, -r >= 1\n");
    return 2;
  }
  auto model = Model::load(pkg);
  const ModelSpec& s = model->spec();
  const auto& ex = model->manifest().experts;
  ExpertStoreOptions so;
  so.cache_bytes =
      parse_cache_size(cache, ex.stride * uint64_t(ex.count) * ex.layers.size(), "--expert-cache");
  so.direct_io = direct;
  ExpertStore store(*model, so);
  auto be = make_cpu_context(threads);
  SessionParams sp;
  sp.ctx = P;
  sp.deltanet_chunked_min_tokens = chunked_min;
  sp.checkpoints = 0;  // measure the forward pass alone
  Session session(*model, *be, store, sp);
  std::mt19937 rng(1);
  std::vector<int32_t> prompt(static_cast<size_t>(P));
  for (auto& t : prompt) t = int32_t(rng() % uint32_t(s.vocab_size));
  const size_t V = size_t(s.vocab_size);
  std::vector<float> last[2] = {std::vector<float>(V), std::vector<float>(V)};

  std::printf("%s: %d layers, %d threads, expert cache %s%s, prompt %d tokens, DeltaNet %s\n\n",
              pkg.c_str(), s.n_layers, be->threads(), cache.c_str(), direct ? " (O_DIRECT)" : "", P,
              chunked_min > 0 ? ("chunked from " + std::to_string(chunked_min) + " tokens").c_str()
                              : "recurrence");
  std::printf("| form | t/s (median) | min..max | s per prompt |\n|---|---:|---:|---:|\n");
  double median[2] = {0, 0};
  for (int form = 0; form < 2; form++) {
    if ((form == 0 && forms == "tokens") || (form == 1 && forms == "batched")) continue;
    std::vector<double> tps;
    for (int r = 0; r <= reps; r++) {
      session.clear();
      const auto t0 = Clock::now();
      if (form == 0) {
        session.eval(prompt.data(), P, last[0].data(), false);
      } else {
        for (int t = 0; t < P; t++)
          session.eval(&prompt[size_t(t)], 1, t + 1 == P ? last[1].data() : nullptr, false);
      }
      const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
      if (r > 0) tps.push_back(P / sec);  // run 0 warms the cache
    }
    std::sort(tps.begin(), tps.end());
    median[form] = tps[tps.size() / 2];
    std::printf("| %s | %.1f | %.1f..%.1f | %.2f |\n", form ? "token by token" : "batched",
                median[form], tps.front(), tps.back(), P / median[form]);
  }
  double mx = 0, d = 0;
  for (size_t i = 0; i < V; i++) {
    mx = std::max(mx, double(std::fabs(last[1][i])));
    d = std::max(d, double(std::fabs(last[0][i] - last[1][i])));
  }
  if (forms != "both") return 0;
  std::printf("\nspeed-up %.2fx; last-token logits %s (max |diff| / max |logit| = %.3g)\n",
              median[0] / median[1],
              std::memcmp(last[0].data(), last[1].data(), V * sizeof(float)) == 0 ? "bit-identical"
                                                                                  : "differ",
              mx > 0 ? d / mx : d);
  const ExpertStats st = store.stats();
  std::printf("expert store: %.1f%% hits, %.2f GiB read\n", 100 * st.hit_rate(),
              double(st.total.bytes_read) / double(1ull << 30));
  return 0;
}

}  // namespace
}  // namespace moeflux

int main(int argc, char** argv) {
  try {
    return moeflux::run(argc, argv);
  } catch (const moeflux::Error& e) {
    std::fprintf(stderr, "moeflux_bench_prefill: %s\n", e.what());
    return 1;
  }
}
