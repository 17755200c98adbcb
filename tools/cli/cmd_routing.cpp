// `moeflux routing`: how a model routes a text — the numbers that decide the expert cache and
// prefetch defaults (DESIGN.md §3):
//   - per MoE layer: popularity entropy of the experts (bits; log2(E) = uniform), the share of
//     routings that go to the most popular 10% of experts, the fraction of a token's experts
//     that the previous token also used (temporal locality), and the recall of predicting the
//     layer's experts by applying its router to the previous layer's residual (the --prefetch
//     heuristic);
//   - hit-rate curves against cache size of LRU and of the store's default policy, simulated on
//     the same trace (experts/cache_sim.h: the store's own policy code);
//   - --trace FILE writes the routing (experts/routing_trace.h) for `moeflux cache-sim`.
// Two ways to run the text: by default it is decoded one token at a time (windows of ctx
// tokens); with --prompt N, each of --turns turns evaluates the next N tokens of the text as a
// prompt (batched prefill, as chat does) and then samples --generate tokens (--temp, --seed).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "cli/commands.h"
#include "cli/common.h"
#include "experts/cache_sim.h"
#include "experts/routing_trace.h"
#include "text/sampler.h"
#include "text/tokenizer.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/mapped_file.h"
#include "util/progress.h"

namespace moeflux::cli {
namespace {

struct Step {
  int moe_index;
  std::vector<int> experts;
};

struct RoutingArgs {
  std::string file, tokenizer, trace;
  int tokens = 4096;  // token-by-token mode: decode at most this many tokens of the text
  int prompt = 0;     // > 0: prompt + generate mode, this many text tokens a turn
  int generate = 128;
  int turns = 1;
  float temp = 0.8f;  // sampling of the generated tokens (<= 0: greedy, which tends to loop)
  uint64_t seed = 1;
};

int cmd_routing(ModelOptions mo, const RoutingArgs& a) {
  const std::string& file = a.file;
  const std::string& tok_path = a.tokenizer;
  if (a.prompt < 0) fail(ErrorKind::kInvalidArgument, "--prompt: {} is negative", a.prompt);
  if (a.generate < 0) fail(ErrorKind::kInvalidArgument, "--generate: {} is negative", a.generate);
  if (a.turns < 1) fail(ErrorKind::kInvalidArgument, "--turns: {} is not >= 1", a.turns);
  const bool chat = a.prompt > 0;
  const int ctx = mo.ctx > 0 ? mo.ctx : chat ? a.turns * (a.prompt + a.generate) : 512;
  if (!a.trace.empty()) check_output_file(a.trace, "--trace", /*force=*/true, mo.model);
  mo.prefetch = true;  // measures the prediction recall
  mo.expert_cache = "all";
  Loaded L = open_model(mo);
  const Model& model = *L.model;
  const ModelSpec& s = model.spec();
  if (s.n_moe_layers() == 0) fail(ErrorKind::kInvalidArgument, "{}: the model has no MoE layers", mo.model);
  const std::string tp = tok_path.empty() ? model.dir() + "/tokenizer.json" : tok_path;
  const std::vector<int32_t> ids = Tokenizer::load(tp).encode(read_text_file(file), false);
  const int n = chat ? a.turns * a.prompt : std::min<int>(int(ids.size()), a.tokens);
  if (n < 2) fail(ErrorKind::kInvalidArgument, "{}: fewer than 2 tokens", file);
  if (chat && int(ids.size()) < n)
    fail(ErrorKind::kInvalidArgument, "{}: {} tokens, --turns {} x --prompt {} needs {}", file,
         ids.size(), a.turns, a.prompt, n);

  // layer index -> MoE index
  std::vector<int> moe_of(size_t(s.n_layers), -1);
  for (int l = 0; l < s.n_layers; l++) moe_of[size_t(l)] = model.layers[size_t(l)].moe_index;
  const int M = s.n_moe_layers(), E = s.n_experts;
  int K = s.top_k;
  std::vector<Step> trace;  // per token
  RoutingTrace rt;           // per evaluation, for --trace
  rt.model = std::filesystem::path(model.dir()).filename().string();
  rt.n_moe_layers = M;
  rt.n_experts = E;
  for (int l = 0; l < s.n_layers; l++)
    if (moe_of[size_t(l)] >= 0) rt.layers.push_back(l);
  SessionParams sp = session_params(mo);
  sp.ctx = ctx;
  sp.on_route = [&](int layer, int T, int k, const int* experts) {
    K = k;
    for (int t = 0; t < T; t++)
      trace.push_back({moe_of[size_t(layer)], std::vector<int>(experts + size_t(t) * k,
                                                               experts + size_t(t + 1) * k)});
    TraceRecord r;
    r.phase = T > 1 ? TraceRecord::kPrompt : TraceRecord::kDecode;
    r.moe_index = moe_of[size_t(layer)];
    r.tokens = T;
    r.experts.assign(experts, experts + size_t(T) * size_t(k));
    rt.records.push_back(std::move(r));
  };
  Session session(model, *L.backend, *L.store, sp);
  std::vector<float> logits(static_cast<size_t>(s.vocab_size));
  if (chat) {
    Progress prog("routing", uint64_t(a.turns) * uint64_t(a.prompt + a.generate));
    uint64_t done = 0;
    SamplerParams smp;
    smp.temperature = a.temp;
    smp.seed = a.seed;
    smp.validate();
    Sampler sampler(smp, s.vocab_size);
    for (int turn = 0; turn < a.turns; turn++) {
      session.eval(&ids[size_t(turn) * size_t(a.prompt)], a.prompt, logits.data(), false);
      prog.update(done += uint64_t(a.prompt));
      for (int g = 0; g < a.generate; g++) {
        const int32_t tok = sampler.sample(logits.data());
        sampler.accept(tok);
        session.eval(&tok, 1, logits.data(), false);
        prog.update(++done);
      }
    }
    prog.finish();
  } else {
    Progress prog("routing", uint64_t(n));
    for (int i = 0; i < n; i++) {
      if (session.pos() == ctx) session.clear();  // windows of ctx tokens, decoded one at a time
      session.eval(&ids[size_t(i)], 1, logits.data(), false);
      prog.update(uint64_t(i + 1));
    }
    prog.finish();
  }
  rt.k = K;
  if (!a.trace.empty()) rt.save(a.trace);

  // Per layer: popularity, top-10% share, overlap with the previous token.
  const size_t nm = static_cast<size_t>(M), ne = static_cast<size_t>(E);
  std::vector<std::vector<uint64_t>> count(nm, std::vector<uint64_t>(ne));
  std::vector<uint64_t> overlap(nm), overlap_n(nm);
  std::vector<const std::vector<int>*> prev(nm, nullptr);
  for (const Step& st : trace) {
    for (int e : st.experts) count[size_t(st.moe_index)][size_t(e)]++;
    const auto* p = prev[size_t(st.moe_index)];
    if (p) {
      for (int e : st.experts) overlap[size_t(st.moe_index)] += std::count(p->begin(), p->end(), e);
      overlap_n[size_t(st.moe_index)] += st.experts.size();
    }
    prev[size_t(st.moe_index)] = &st.experts;
  }
  const ExpertStats stats = L.store->stats();
  if (chat)
    fmt::print("routing of {} turns of {} prompt tokens of {} + {} generated ({} MoE layers x {} "
               "experts, top-{})\n\n",
               a.turns, a.prompt, file, a.generate, M, E, K);
  else
    fmt::print("routing of {} tokens of {} ({} MoE layers x {} experts, top-{})\n\n", n, file, M,
               E, K);
  fmt::print("| MoE layer | layer | entropy (bits, max {:.2f}) | top 10% share | shared with previous token | next-layer recall |\n", std::log2(double(E)));
  fmt::print("|---:|---:|---:|---:|---:|---:|\n");
  double sum_h = 0, sum_top = 0, sum_ov = 0;
  for (int m = 0; m < M; m++) {
    auto c = count[size_t(m)];
    const double total = double(std::accumulate(c.begin(), c.end(), uint64_t(0)));
    double h = 0;
    for (uint64_t v : c)
      if (v) h -= double(v) / total * std::log2(double(v) / total);
    std::sort(c.begin(), c.end(), std::greater<>());
    const size_t top_n = std::max<size_t>(1, size_t(E) / 10);
    double top = 0;
    for (size_t i = 0; i < top_n; i++) top += double(c[i]);
    top /= total;
    const double ov = overlap_n[size_t(m)] ? double(overlap[size_t(m)]) / double(overlap_n[size_t(m)]) : 0.0;
    const auto& ls = stats.layers[size_t(m)];
    int layer = 0;
    for (int l = 0; l < s.n_layers; l++)
      if (moe_of[size_t(l)] == m) layer = l;
    fmt::print("| {} | {} | {:.3f} | {:.1f}% | {:.1f}% | {} |\n", m, layer, h, 100 * top, 100 * ov,
               ls.scored ? fmt::format("{:.1f}%", 100.0 * double(ls.predicted_hit) / double(ls.scored))
                         : std::string("-"));
    sum_h += h;
    sum_top += top;
    sum_ov += ov;
  }
  fmt::print("| mean | | {:.3f} | {:.1f}% | {:.1f}% | {:.1f}% |\n\n", sum_h / M, 100 * sum_top / M,
             100 * sum_ov / M, 100.0 * stats.recall());
  fmt::print("(uniform random routing would share {:.1f}% with the previous token and give a "
             "top-10% share of {:.1f}%)\n\n",
             100.0 * K / E, 100.0 * double(std::max(1, E / 10)) / E);

  const size_t all = size_t(M) * size_t(E);
  const std::vector<std::vector<int>> requests = trace_requests(rt);
  const std::vector<std::vector<uint32_t>> uses = trace_uses(rt);
  fmt::print("| cache (experts) | share of all | LRU hit rate | default ({}) hit rate |\n"
             "|---:|---:|---:|---:|\n",
             kDefaultCachePolicy);
  for (int pct : {1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100}) {
    const size_t slots = std::max<size_t>(1, all * size_t(pct) / 100);
    auto lru = make_cache_policy("lru");
    auto def = make_cache_policy("default");
    fmt::print("| {} | {}% | {:.1f}% | {:.1f}% |\n", slots, pct,
               100.0 * simulate_cache(rt, requests, uses, *lru, slots).hit_rate(),
               100.0 * simulate_cache(rt, requests, uses, *def, slots).hit_rate());
  }
  if (!a.trace.empty())
    fmt::print("\ntrace: {} ({} records)\n", a.trace, rt.records.size());
  return 0;
}

}  // namespace

Command add_routing(CLI::App& app) {
  struct Args {
    ModelOptions mo;
    RoutingArgs r;
  };
  auto a = std::make_shared<Args>();
  auto* r = app.add_subcommand("routing", "expert routing statistics of a text: popularity, "
                                          "locality, prefetch recall, cache curves; --trace");
  add_model_options(r, a->mo);
  r->add_option("-f,--file", a->r.file, "text file")->required();
  r->add_option("--tokenizer", a->r.tokenizer, "tokenizer.json (default: the package's)");
  r->add_option("-n,--tokens", a->r.tokens,
                "decode at most this many tokens of the text (without --prompt)");
  r->add_option("--prompt", a->r.prompt,
                "evaluate this many tokens of the text as one prompt per turn, then generate");
  r->add_option("--generate", a->r.generate,
                "with --prompt: tokens generated (sampled, --temp) per turn");
  r->add_option("--temp", a->r.temp, "with --prompt: sampling temperature (<= 0: greedy)");
  r->add_option("--seed", a->r.seed, "with --prompt: sampling seed");
  r->add_option("--turns", a->r.turns, "with --prompt: turns in one session, each taking the "
                                       "next --prompt tokens of the text");
  r->add_option("--trace", a->r.trace,
                "write the routing trace (every MoE layer's experts per token) for cache-sim");
  return {r, [a] { return cmd_routing(a->mo, a->r); }};
}

}  // namespace moeflux::cli
