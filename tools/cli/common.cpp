#include "cli/common.h"

#include <fmt/format.h>

#include <cerrno>
#include <climits>
#include <filesystem>
#include <cstdlib>

#include "experts/cache_policy.h"
#include "util/error.h"
#include "util/progress.h"
#include "util/thread_pool.h"

namespace moeflux::cli {

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required) {
  auto* m = app->add_option("-m,--model", o.model, "package directory");
  if (model_required) m->required();
  app->add_option("-t,--threads", o.threads,
                  "CPU threads (0: one per core; more than 4x the cores is refused)");
  app->add_option("-c,--ctx", o.ctx, "context size in tokens (0: min(trained context, 4096))");
  app->add_option("--expert-cache", o.expert_cache,
                  "expert cache budget: bytes (2GiB, 512MiB), a share of all experts (25%), "
                  "all, 0 (read every expert every time) or auto (half of free RAM)");
  app->add_option("--host-cache", o.host_cache,
                  "with a GPU backend and experts that do not all fit in --expert-cache: "
                  "host memory keeping the experts read most recently (a GPU miss found there is "
                  "one copy and no read); same forms as --expert-cache; auto: half of free RAM, "
                  "at most all experts; default 0 (none)");
  app->add_option("--cache-policy", o.cache_policy,
                  "expert cache policy: default (" + std::string(kDefaultCachePolicy) +
                      "), lru, lru-layer, lfu, lrfu, tinylfu, tinylfu-shared (results do not change, hit rates do)");
  app->add_option("--readers", o.readers, "expert reader threads (io_uring: queue depth)");
  app->add_flag("--direct-io", o.direct_io, "read experts with O_DIRECT (bypass the page cache)");
  app->add_option("--io", o.io, "expert reads: auto, pread or uring");
  app->add_flag("--prefetch", o.prefetch,
                "speculate the next layer's experts with its router and warm the cache");
  app->add_flag("--stats", o.stats, "print expert-store statistics per layer");
  app->add_flag("--mmap", o.mmap,
                "map the resident weights instead of reading them into (huge-page) memory");
  app->add_option("--experts-per-token", o.experts_per_token,
                  "routed experts per token (0: the model's top-k; fewer reads less, costs quality)");
  app->add_option("--backend", o.backend,
                  "compute backend: auto (CUDA when built and a GPU is present, else CPU), cpu, "
                  "cuda");
  app->add_flag("--exact,!--int8", o.exact,
                "CPU numerics on quantised weights: --exact (default) f32 activations, the "
                "reference; --int8 activations quantised to int8 per 32 columns and integer dot "
                "products (within the quantised tolerance: KL 0.004 on q8; prefill ~2x faster, "
                "decode about the same)");
  app->add_option("--ubatch", o.ubatch,
                  "prompt micro-batch in tokens: prompts are evaluated this many tokens at a time "
                  "(memory grows with it; results do not change)");
}

std::string default_model_dir() {
  namespace fs = std::filesystem;
  std::vector<fs::path> places = {fs::path(MOEFLUX_SOURCE_DIR) / "models" / "demo"};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) places.push_back(exe.parent_path().parent_path() / "share" / "moeflux" / "models" / "demo");
  for (const auto& p : places)
    if (fs::exists(p / "moeflux.json")) return p.string();
  fail(ErrorKind::kIo, "no model given (-m) and the built-in demo model is not at {} or {}",
       places[0].string(), places.size() > 1 ? places[1].string() : std::string("-"));
}

Loaded open_model(const ModelOptions& o_in) {
  ModelOptions o = o_in;
  if (o.model.empty()) o.model = default_model_dir();
  if (o.threads < 0)
    fail(ErrorKind::kInvalidArgument, "--threads: {} is negative (0: one per core)", o.threads);
  resolve_threads(o.threads, "--threads");
  if (o.ctx < 0)
    fail(ErrorKind::kInvalidArgument, "--ctx: {} is negative (0: min(trained context, 4096))",
         o.ctx);
  if (o.ubatch < 1) fail(ErrorKind::kInvalidArgument, "--ubatch: {} is not >= 1", o.ubatch);
  if (o.readers < 1 || o.readers > 256)
    fail(ErrorKind::kInvalidArgument, "--readers: {} is not in [1, 256]", o.readers);
  ExpertStoreOptions so;
  so.readers = o.readers;
  so.direct_io = o.direct_io;
  so.prefetch = o.prefetch;
  so.policy = o.cache_policy;
  try {
    make_cache_policy(o.cache_policy);  // an unknown name fails before the model loads
  } catch (const Error& e) {
    fail(ErrorKind::kInvalidArgument, "--cache-policy: {}", e.what());
  }
  if (o.io == "auto") so.io = IoEngine::kAuto;
  else if (o.io == "pread") so.io = IoEngine::kPread;
  else if (o.io == "uring") so.io = IoEngine::kUring;
  else fail(ErrorKind::kInvalidArgument, "--io: '{}' is not one of auto, pread, uring", o.io);
  const BackendKind backend = resolve_backend_kind(parse_backend_kind(o.backend, "--backend"));
  Loaded l;
  l.model = Model::load(o.model, o.mmap);
  const auto& ex = l.model->manifest().experts;
  const uint64_t all = ex.stride * uint64_t(ex.count) * ex.layers.size();
  so.cache_bytes = o.expert_cache == "auto" ? default_cache_bytes(*l.model)
                                            : parse_cache_size(o.expert_cache, all, "--expert-cache");
  Device& device = get_device(backend);
  so.memory = &device.expert_memory();
  if (!so.memory->host_visible() && uint64_t(so.cache_bytes) < all)
    so.host_cache_bytes = o.host_cache == "auto"
                              ? default_cache_bytes(*l.model)
                              : parse_cache_size(o.host_cache, all, "--host-cache");
  else if (o.host_cache != "auto")
    parse_cache_size(o.host_cache, all, "--host-cache");  // checked; unused on this device
  l.backend = device.context(ContextOptions{o.threads, o.exact});
  l.store = std::make_unique<ExpertStore>(*l.model, so);
  // On a device whose expert memory the host cannot read (a GPU), experts that all fit are
  // loaded now and stay: a token then needs no host round trip per layer.
  if (!device.expert_memory().host_visible() && uint64_t(so.cache_bytes) >= all)
    l.store->load_all();
  return l;
}

SessionParams session_params(const ModelOptions& o) {
  SessionParams p;
  p.ctx = o.ctx;
  p.experts_per_token = o.experts_per_token;
  p.ubatch = o.ubatch;
  return p;
}

std::string store_summary(const ExpertStore& store, int tokens) {
  const ExpertStats st = store.stats();
  const auto& t = st.total;
  std::string s = fmt::format("experts: {:.1f}% hits ({} of {}), {} read", 100.0 * st.hit_rate(),
                              t.hits, t.requests, format_bytes(t.bytes_read));
  if (tokens > 0) s += fmt::format(" ({:.3f} GB/token)", double(t.bytes_read) / 1e9 / tokens);
  if (t.read_seconds > 0)
    s += fmt::format(", {:.2f} GB/s per reader", double(t.bytes_read) / 1e9 / t.read_seconds);
  if (st.host_cache_bytes)
    s += fmt::format(", {} host-tier hits", t.host_hits);
  if (t.copy_seconds > 0)
    s += fmt::format(", {} copied at {:.1f} GB/s per copy", format_bytes(t.bytes_copied),
                     double(t.bytes_copied) / 1e9 / t.copy_seconds);
  s += fmt::format(", stall {:.0f} ms", t.stall_seconds * 1e3);
  if (t.scored) s += fmt::format(", prefetch recall {:.1f}%", 100.0 * st.recall());
  return s;
}

void print_store_stats(const ExpertStore& store, std::FILE* out) {
  const ExpertStats st = store.stats();
  fmt::print(out, "expert store: {} (readers {}), cache {} = {} slots ({}), {} cached\n",
             store.io_name(), store.options().readers, format_bytes(st.cache_bytes),
             st.cache_slots, store.policy_name(), st.cached);
  if (st.host_cache_bytes)
    fmt::print(out, "host tier: {} = {} experts, {} cached\n", format_bytes(st.host_cache_bytes),
               st.host_cache_bytes / std::max<uint64_t>(store.expert_stride(), 1), st.host_cached);
  fmt::print(out, "{:>5} {:>8} {:>8} {:>8} {:>7} {:>11} {:>9} {:>9} {:>9} {:>8} {:>9} {:>11} {:>8}\n",
             "layer", "requests", "hits", "misses", "hit%", "read", "read ms", "stall ms",
             "pf reads", "recall%", "host hits", "copied", "copy GB/s");
  auto line = [&](const std::string& name, const ExpertLayerStats& l) {
    fmt::print(out, "{:>5} {:>8} {:>8} {:>8} {:>7.1f} {:>11} {:>9.1f} {:>9.1f} {:>9} {:>8} {:>9} {:>11} {:>8}\n",
               name, l.requests, l.hits, l.misses,
               l.requests ? 100.0 * double(l.hits) / double(l.requests) : 0.0,
               format_bytes(l.bytes_read), l.read_seconds * 1e3, l.stall_seconds * 1e3,
               l.prefetch_reads,
               l.scored ? fmt::format("{:.1f}", 100.0 * double(l.predicted_hit) / double(l.scored))
                        : std::string("-"),
               l.host_hits, format_bytes(l.bytes_copied),
               l.copy_seconds > 0 ? fmt::format("{:.1f}", double(l.bytes_copied) / 1e9 / l.copy_seconds)
                                  : std::string("-"));
  };
  for (size_t i = 0; i < st.layers.size(); i++) line(std::to_string(i), st.layers[i]);
  line("all", st.total);
}

std::vector<int32_t> parse_tokens(const std::string& s, const std::string& flag) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    item.erase(0, item.find_first_not_of(" \t\n"));
    item.erase(item.find_last_not_of(" \t\n") + 1);
    if (item.empty())
      fail(ErrorKind::kInvalidArgument, "{}: empty item at position {}", flag, out.size());
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (*end || errno || v < INT32_MIN || v > INT32_MAX)
      fail(ErrorKind::kInvalidArgument, "{}: '{}' at position {} is not a token id", flag, item,
           out.size());
    out.push_back(int32_t(v));
    i = j + 1;
  }
  return out;
}

}  // namespace moeflux::cli
