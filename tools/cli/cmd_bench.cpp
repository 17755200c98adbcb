// `moeflux bench`: llama-bench-style throughput table. For each test (ppN: one N-token prompt
// evaluated as a batch; tgN: N tokens decoded one at a time), a warm-up run, then -r timed
// runs from a cleared session (after -d tokens of depth, not timed). Beside t/s it reports what
// the expert store did over the timed runs and how close the run is to its floor: the bytes a
// token must stream (weights it touches from RAM, expert bytes it reads from disk) over the
// bandwidths measured on this machine.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>

#include "cli/commands.h"
#include "cli/common.h"
#ifdef MOEFLUX_HAVE_CUDA
#include "cuda/cuda_device.h"
#endif
#include "util/error.h"
#include "util/progress.h"
#include "util/thread_pool.h"

namespace moeflux::cli {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Read bandwidth of RAM: `threads` threads summing disjoint parts of a 1 GiB buffer; best of 3.
double measure_memory_bandwidth(int threads) {
  const size_t n = (size_t(1) << 30) / sizeof(uint64_t);
  std::vector<uint64_t> buf(n);
  ThreadPool pool(threads);
  pool.parallel_for(int64_t(n), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) buf[size_t(i)] = uint64_t(i);
  }, 1 << 16);
  double best = 1e30;
  std::vector<uint64_t> sums(size_t(pool.size()) * 8);
  for (int rep = 0; rep < 3; rep++) {
    auto t0 = Clock::now();
    pool.parallel_for(int64_t(n), [&](int64_t a, int64_t b) {
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = a;
      for (; i + 4 <= b; i += 4) {
        s0 += buf[size_t(i)];
        s1 += buf[size_t(i + 1)];
        s2 += buf[size_t(i + 2)];
        s3 += buf[size_t(i + 3)];
      }
      for (; i < b; i++) s0 += buf[size_t(i)];
      sums[size_t(a * 7 % int64_t(sums.size()))] += s0 + s1 + s2 + s3;
    }, 1 << 16);
    best = std::min(best, since(t0));
  }
  volatile uint64_t keep = std::accumulate(sums.begin(), sums.end(), uint64_t(0));
  (void)keep;
  return double(n * sizeof(uint64_t)) / best / 1e9;
}

// Read bandwidth of the expert files through the store's own readers (same I/O engine, reader
// count and direct I/O as the run, no cache): whole layers of experts, fetched and drained.
double measure_expert_read_bandwidth(const Model& model, const ModelOptions& mo) {
  ExpertStoreOptions so;
  so.cache_bytes = 0;
  so.readers = mo.readers;
  so.direct_io = mo.direct_io;
  so.io = mo.io == "pread" ? IoEngine::kPread : mo.io == "uring" ? IoEngine::kUring : IoEngine::kAuto;
  ExpertStore store(model, so);
  const int L = store.n_layers(), E = store.n_experts();
  // Up to ~1 GiB, spread over the layers (random experts, so the page cache of an earlier run
  // helps as little as it can).
  const uint64_t per = store.expert_bytes();
  const int want = int(std::clamp<uint64_t>((uint64_t(1) << 30) / std::max<uint64_t>(per, 1), 16, 4096));
  std::mt19937_64 rng(12345);
  auto t0 = Clock::now();
  int done = 0;
  while (done < want) {
    const int layer = int(rng() % uint64_t(L));
    std::vector<int> ids;
    for (int e = 0; e < E && int(ids.size()) < 16; e++)
      if (rng() % uint64_t(E) < 16) ids.push_back(e);
    if (ids.empty()) ids.push_back(int(rng() % uint64_t(E)));
    auto b = store.fetch(layer, ids);
    for (size_t i = 0; i < ids.size(); i++) b->next();
    done += int(ids.size());
  }
  const double secs = since(t0);
  return double(store.stats().total.bytes_read) / secs / 1e9;
}

// Bytes of weights one decoded token reads: every resident matrix except the embedding (one
// row), plus top-k experts in each MoE layer.
double weight_bytes_per_token(const Model& model) {
  const Manifest& m = model.manifest();
  double bytes = 0;
  for (const PackedTensor& t : m.resident) {
    if (t.name == "embed") {
      if (!model.spec().tie_embeddings) continue;  // tied: it is the lm_head too
    }
    bytes += double(t.nbytes);
  }
  bytes += double(m.experts.bytes) * model.spec().top_k * double(m.experts.layers.size());
  return bytes;
}

struct Test {
  std::string name;
  int prompt = 0, gen = 0;
};

struct Result {
  Test test;
  std::vector<double> tps;
  ExpertStats stats;
  int tokens = 0;
};

std::string model_label(const Model& model) {
  const Manifest& m = model.manifest();
  std::string name = m.provenance.value("synth_preset", std::string());
  if (name.empty()) name = std::filesystem::path(model.dir()).filename().string();
  if (name.empty()) name = std::filesystem::path(model.dir()).parent_path().filename().string();
  std::string dt = m.experts.parts.empty() ? "dense" : std::string(dtype_name(m.experts.parts[0].dtype));
  return fmt::format("{} {}L {}", name, model.spec().n_layers, dt);
}

int cmd_bench(const ModelOptions& mo, std::vector<int> prompts, std::vector<int> gens,
              int reps, int depth, const std::string& output, bool no_floor) {
  if (reps < 1) fail(ErrorKind::kInvalidArgument, "-r/--repetitions: {} < 1", reps);
  if (depth < 0) fail(ErrorKind::kInvalidArgument, "-d/--depth: {} is negative", depth);
  if (output != "md" && output != "json")
    fail(ErrorKind::kInvalidArgument, "-o/--output: '{}' is not md or json", output);
  std::vector<Test> tests;
  for (int p : prompts) {
    if (p < 0) fail(ErrorKind::kInvalidArgument, "-p: {} is negative", p);
    if (p > 0) tests.push_back({fmt::format("pp{}", p), p, 0});
  }
  for (int n : gens) {
    if (n < 0) fail(ErrorKind::kInvalidArgument, "-n: {} is negative", n);
    if (n > 0) tests.push_back({fmt::format("tg{}", n), 0, n});
  }
  if (tests.empty()) fail(ErrorKind::kInvalidArgument, "nothing to run: give -p and/or -n > 0");

  Loaded L = open_model(mo);
  const Model& model = *L.model;
  const ModelSpec& s = model.spec();
  ExpertStore& store = *L.store;
  int longest = 0;
  for (const Test& t : tests) longest = std::max(longest, t.prompt + t.gen);
  SessionParams sp = session_params(mo);
  if (sp.ctx == 0) sp.ctx = depth + longest;
  if (sp.ctx < depth + longest)
    fail(ErrorKind::kInvalidArgument, "--ctx {} is too small for depth {} + {} tokens", sp.ctx,
         depth, longest);
  Session session(model, *L.backend, store, sp);
  std::mt19937_64 rng(42);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& t : v) t = int32_t(rng() % uint64_t(s.vocab_size));
    return v;
  };
  std::vector<float> logits(static_cast<size_t>(s.vocab_size));

  auto one_run = [&](const Test& t) {
    session.clear();
    for (int d = 0; d < depth; d += 512) {
      auto toks = random_tokens(std::min(512, depth - d));
      session.eval(toks.data(), int(toks.size()), nullptr, false);
    }
    if (t.prompt) {
      auto toks = random_tokens(t.prompt);
      auto t0 = Clock::now();
      session.eval(toks.data(), t.prompt, logits.data(), false);
      return t.prompt / since(t0);
    }
    auto toks = random_tokens(t.gen);
    auto t0 = Clock::now();
    for (int i = 0; i < t.gen; i++) session.eval(&toks[size_t(i)], 1, logits.data(), false);
    return t.gen / since(t0);
  };

  std::vector<Result> results;
  for (const Test& t : tests) {
    fmt::print(stderr, "bench: {} warm-up...\n", t.name);
    one_run(t);
    store.reset_stats();
    Result r{t, {}, {}, 0};
    for (int i = 0; i < reps; i++) {
      r.tps.push_back(one_run(t));
      r.tokens += t.prompt + t.gen;
      fmt::print(stderr, "bench: {} run {}/{}: {:.2f} t/s\n", t.name, i + 1, reps, r.tps.back());
    }
    r.stats = store.stats();
    results.push_back(std::move(r));
  }

  const double wbytes = weight_bytes_per_token(model);
  double mem_bw = 0, disk_bw = 0;
  const auto& ex = model.manifest().experts;
  const uint64_t all_experts = ex.stride * uint64_t(ex.count) * ex.layers.size();
  if (!no_floor) {
    fmt::print(stderr, "bench: measuring memory bandwidth...\n");
#ifdef MOEFLUX_HAVE_CUDA
    // On the GPU the weights stream from GPU memory.
    if (std::string(L.backend->name()) == "cuda") mem_bw = cuda_copy_bandwidth();
    else
#endif
    mem_bw = measure_memory_bandwidth(L.backend->threads());
    if (!ex.layers.empty() && store.stats().cache_bytes < all_experts) {
      fmt::print(stderr, "bench: measuring expert read bandwidth ({}, {} readers)...\n",
                 store.io_name(), mo.readers);
      disk_bw = measure_expert_read_bandwidth(model, mo);
    }
  }

  const uint64_t disk_bytes = all_experts + model.manifest().resident_bytes;
  const std::string label = model_label(model);
  const std::string cache = fmt::format("{} ({:.0f}%)", format_bytes(store.stats().cache_bytes),
                                        all_experts ? 100.0 * double(store.stats().cache_bytes) /
                                                          double(all_experts)
                                                    : 0.0);
  nlohmann::json js = nlohmann::json::array();
  if (output == "md") {
    fmt::print("| model | size | backend | threads | expert cache | test | t/s | expert hits | "
               "GB read/tok | GB/s | floor t/s |\n");
    fmt::print("|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|\n");
  }
  for (const Result& r : results) {
    const double n = double(r.tps.size());
    const double mean = std::accumulate(r.tps.begin(), r.tps.end(), 0.0) / n;
    double var = 0;
    for (double v : r.tps) var += (v - mean) * (v - mean);
    const double sd = n > 1 ? std::sqrt(var / (n - 1)) : 0.0;
    const double read_per_tok = r.tokens ? double(r.stats.total.bytes_read) / r.tokens : 0.0;
    // Decode: the weights a token streams from RAM over the time per token; prompt processing
    // is compute-bound, so it reports no bandwidth or floor.
    const bool decode = r.test.gen > 0;
    const double gbs = decode ? wbytes * mean / 1e9 : 0.0;
    double floor = 0;
    if (decode && mem_bw > 0) {
      const double mem_t = wbytes / (mem_bw * 1e9);
      const double disk_t = disk_bw > 0 ? read_per_tok / (disk_bw * 1e9) : 0.0;
      floor = 1.0 / std::max(mem_t, disk_t);
    }
    const double hit = r.stats.hit_rate();
    if (output == "md") {
      fmt::print("| {} | {} | {} | {} | {} | {} | {:.2f} ± {:.2f} | {:.1f}% | {:.3f} | {} | {} |\n",
                 label, format_bytes(disk_bytes), L.backend->name(), L.backend->threads(), cache,
                 r.test.name, mean, sd, 100.0 * hit, read_per_tok / 1e9,
                 decode ? fmt::format("{:.1f}", gbs) : std::string("-"),
                 floor > 0 ? fmt::format("{:.1f}", floor) : std::string("-"));
    } else {
      js.push_back({{"model", label},
                    {"model_dir", model.dir()},
                    {"size_bytes", disk_bytes},
                    {"backend", L.backend->name()},
                    {"threads", L.backend->threads()},
                    {"expert_cache_bytes", store.stats().cache_bytes},
                    {"io", store.io_name()},
                    {"readers", mo.readers},
                    {"prefetch", mo.prefetch},
                    {"test", r.test.name},
                    {"n_prompt", r.test.prompt},
                    {"n_gen", r.test.gen},
                    {"depth", depth},
                    {"tps", r.tps},
                    {"tps_mean", mean},
                    {"tps_stddev", sd},
                    {"expert_hit_rate", hit},
                    {"expert_bytes_read_per_token", read_per_tok},
                    {"stall_seconds", r.stats.total.stall_seconds},
                    {"prefetch_recall", r.stats.recall()},
                    {"weight_bytes_per_token", wbytes},
                    {"achieved_gbps", gbs},
                    {"memory_gbps", mem_bw},
                    {"expert_read_gbps", disk_bw},
                    {"floor_tps", floor}});
    }
  }
  if (output == "json") {
    fmt::print("{}\n", js.dump(2));
  } else {
    fmt::print("\nweights per decoded token {:.3f} GB; memory read {:.1f} GB/s{}", wbytes / 1e9,
               mem_bw,
               std::string(L.backend->name()) == "cuda" ? " (GPU copy, read + write)" : "");
    if (disk_bw > 0) fmt::print("; expert reads {:.2f} GB/s ({})", disk_bw, store.io_name());
    fmt::print("; floor = 1 / max(weights / memory, expert bytes read / expert reads)\n");
  }
  if (mo.stats) print_store_stats(store, stderr);
  return 0;
}

}  // namespace

Command add_bench(CLI::App& app) {
  struct Args {
    ModelOptions mo;
    std::vector<int> prompts{512}, gens{128};
    int reps = 5, depth = 0;
    std::string output = "md";
    bool no_floor = false;
  };
  auto a = std::make_shared<Args>();
  auto* b = app.add_subcommand("bench", "throughput table (llama-bench style): ppN and tgN tests");
  add_model_options(b, a->mo);
  b->add_option("-p,--n-prompt", a->prompts, "prompt lengths to test (0: none)")->delimiter(',');
  b->add_option("-n,--n-gen", a->gens, "generation lengths to test (0: none)")->delimiter(',');
  b->add_option("-r,--repetitions", a->reps, "timed runs per test (after one warm-up)");
  b->add_option("-d,--depth", a->depth, "tokens already in the context before each test");
  b->add_option("-o,--output", a->output, "md or json");
  b->add_flag("--no-floor", a->no_floor, "skip the bandwidth measurements");
  return {b, [a] {
            return cmd_bench(a->mo, a->prompts, a->gens, a->reps, a->depth, a->output,
                             a->no_floor);
          }};
}

}  // namespace moeflux::cli
