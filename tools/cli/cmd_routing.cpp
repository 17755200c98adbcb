// `moeflux routing`: how a model routes a text, decoded token by token as generation would —
// the numbers that decide the expert cache and prefetch defaults (DESIGN.md §3):
//   - per MoE layer: popularity entropy of the experts (bits; log2(E) = uniform), the share of
//     routings that go to the most popular 10% of experts, the fraction of a token's experts
//     that the previous token also used (temporal locality), and the recall of predicting the
//     layer's experts by applying its router to the previous layer's residual (the --prefetch
//     heuristic);
//   - an LRU hit-rate curve against cache size, simulated on the same trace with the store's
//     policy (one LRU over all (layer, expert) pairs).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <list>
#include <memory>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "cli/commands.h"
#include "cli/common.h"
#include "text/tokenizer.h"
#include "util/error.h"
#include "util/mapped_file.h"
#include "util/progress.h"

namespace moeflux::cli {
namespace {

struct Step {
  int moe_index;
  std::vector<int> experts;
};

// Hit rate of an LRU cache of `slots` experts on the access trace.
double lru_hit_rate(const std::vector<Step>& trace, int n_experts, size_t slots) {
  if (slots == 0) return 0.0;
  std::list<int> order;  // front = most recent
  std::unordered_map<int, std::list<int>::iterator> where;
  uint64_t hits = 0, total = 0;
  for (const Step& s : trace) {
    for (int e : s.experts) {
      const int key = s.moe_index * n_experts + e;
      total++;
      auto it = where.find(key);
      if (it != where.end()) {
        hits++;
        order.splice(order.begin(), order, it->second);
        continue;
      }
      if (order.size() >= slots) {
        where.erase(order.back());
        order.pop_back();
      }
      order.push_front(key);
      where[key] = order.begin();
    }
  }
  return total ? double(hits) / double(total) : 0.0;
}

int cmd_routing(ModelOptions mo, const std::string& file, const std::string& tok_path,
                int max_tokens) {
  const int ctx = mo.ctx > 0 ? mo.ctx : 512;
  mo.prefetch = true;  // measures the prediction recall
  mo.expert_cache = "all";
  Loaded L = open_model(mo);
  const Model& model = *L.model;
  const ModelSpec& s = model.spec();
  if (s.n_moe_layers() == 0) fail(ErrorKind::kInvalidArgument, "{}: the model has no MoE layers", mo.model);
  const std::string tp = tok_path.empty() ? model.dir() + "/tokenizer.json" : tok_path;
  const std::vector<int32_t> ids = Tokenizer::load(tp).encode(read_text_file(file), false);
  const int n = std::min<int>(int(ids.size()), max_tokens);
  if (n < 2) fail(ErrorKind::kInvalidArgument, "{}: fewer than 2 tokens", file);

  // layer index -> MoE index
  std::vector<int> moe_of(size_t(s.n_layers), -1);
  for (int l = 0; l < s.n_layers; l++) moe_of[size_t(l)] = model.layers[size_t(l)].moe_index;
  const int M = s.n_moe_layers(), E = s.n_experts;
  int K = s.top_k;
  std::vector<Step> trace;
  SessionParams sp = session_params(mo);
  sp.ctx = ctx;
  sp.on_route = [&](int layer, int T, int k, const int* experts) {
    K = k;
    for (int t = 0; t < T; t++)
      trace.push_back({moe_of[size_t(layer)], std::vector<int>(experts + size_t(t) * k,
                                                               experts + size_t(t + 1) * k)});
  };
  Session session(model, *L.backend, *L.store, sp);
  Progress prog("routing", uint64_t(n));
  std::vector<float> logits(static_cast<size_t>(s.vocab_size));
  for (int i = 0; i < n; i++) {
    if (session.pos() == ctx) session.clear();  // windows of ctx tokens, decoded one at a time
    session.eval(&ids[size_t(i)], 1, logits.data(), false);
    prog.update(uint64_t(i + 1));
  }
  prog.finish();

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
  fmt::print("routing of {} tokens of {} ({} MoE layers x {} experts, top-{})\n\n", n, file, M, E, K);
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
  fmt::print("| LRU cache (experts) | share of all | hit rate |\n|---:|---:|---:|\n");
  for (int pct : {1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100}) {
    const size_t slots = std::max<size_t>(1, all * size_t(pct) / 100);
    fmt::print("| {} | {}% | {:.1f}% |\n", slots, pct, 100.0 * lru_hit_rate(trace, E, slots));
  }
  return 0;
}

}  // namespace

Command add_routing(CLI::App& app) {
  struct Args {
    ModelOptions mo;
    std::string file, tokenizer;
    int tokens = 4096;
  };
  auto a = std::make_shared<Args>();
  auto* r = app.add_subcommand("routing", "expert routing statistics of a text, decoded token by "
                                          "token: popularity, locality, prefetch recall, LRU curve");
  add_model_options(r, a->mo);
  r->add_option("-f,--file", a->file, "text file")->required();
  r->add_option("--tokenizer", a->tokenizer, "tokenizer.json (default: the package's)");
  r->add_option("-n,--tokens", a->tokens, "decode at most this many tokens of the text");
  return {r, [a] { return cmd_routing(a->mo, a->file, a->tokenizer, a->tokens); }};
}

}  // namespace moeflux::cli
