// `moeflux cache-sim`: replays a routing trace (`moeflux routing --trace`) against expert-cache
// policies and budgets, with the store's own policy code (experts/cache_policy.h), and prints
// hit rates per MoE layer and overall; Belady's MIN is the upper bound. The policy that decides
// the store's default is chosen from these numbers (docs/2026-12-03-cache-policy.md).
#include <fmt/format.h>

#include <cctype>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "experts/cache_sim.h"
#include "experts/routing_trace.h"
#include "util/error.h"

namespace moeflux::cli {
namespace {

std::vector<std::string> split_list(const std::string& s, const char* flag) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) fail(ErrorKind::kInvalidArgument, "{}: empty item in '{}'", flag, s);
    out.push_back(item);
  }
  if (out.empty()) fail(ErrorKind::kInvalidArgument, "{}: empty list", flag);
  return out;
}

// "25%" of all experts' slots (= of their bytes: every slot holds one expert), or a slot count.
size_t parse_budget(const std::string& b, size_t all) {
  const bool pct = !b.empty() && b.back() == '%';
  const std::string num = pct ? b.substr(0, b.size() - 1) : b;
  size_t i = 0;
  while (i < num.size() && (std::isdigit(static_cast<unsigned char>(num[i])) || num[i] == '.')) i++;
  if (num.empty() || i != num.size() || (!pct && num.find('.') != std::string::npos))
    fail(ErrorKind::kInvalidArgument,
         "--budget: '{}' is not a share of all experts (25%) or a slot count (64)", b);
  const double v = std::stod(num);
  if (pct && v > 100) fail(ErrorKind::kInvalidArgument, "--budget: {} is more than 100%", b);
  return pct ? size_t(double(all) * v / 100.0) : std::min(all, size_t(v));
}

int cmd_cache_sim(const std::string& trace_path, const std::string& budgets,
                  const std::string& policies, const std::string& output, int early,
                  const std::string& counting) {
  if (early < 1) fail(ErrorKind::kInvalidArgument, "--early: {} is not >= 1", early);
  if (counting != "tokens" && counting != "requests")
    fail(ErrorKind::kInvalidArgument, "--uses: '{}' is not tokens or requests", counting);
  if (output != "md" && output != "json")
    fail(ErrorKind::kInvalidArgument, "-o/--output: '{}' is not md or json", output);
  const std::vector<std::string> bl = split_list(budgets, "--budget");
  std::vector<std::string> pl = split_list(policies, "--policy");
  for (const auto& p : pl)
    if (p != "belady") make_cache_policy(p);  // an unknown name fails before the replay
  const RoutingTrace t = RoutingTrace::load(trace_path);
  const size_t all = size_t(t.n_moe_layers) * size_t(t.n_experts);
  const std::vector<std::vector<int>> requests = trace_requests(t);
  const std::vector<std::vector<uint32_t>> uses =
      counting == "tokens" ? trace_uses(t) : std::vector<std::vector<uint32_t>>{};

  nlohmann::ordered_json js = nlohmann::ordered_json::array();
  if (output == "md") {
    size_t prompt = 0, decode = 0;
    for (const auto& r : t.records) (r.phase == TraceRecord::kPrompt ? prompt : decode) += 1;
    fmt::print(
        "trace {}: {} ({} MoE layers x {} experts, top-{}), {} prompt and {} decode "
        "layer evaluations; default policy: {}; uses counted per {}\n",
        trace_path, t.model, t.n_moe_layers, t.n_experts, t.k, prompt, decode, kDefaultCachePolicy,
        counting == "tokens" ? "token" : "request");
  }
  for (const auto& b : bl) {
    const size_t slots = parse_budget(b, all);
    if (output == "md") {
      fmt::print(
          "\nbudget {} ({} of {} expert slots)\n\n| policy | hit rate | decode | first {} "
          "decodes after a prompt |",
          b, slots, all, early);
      for (int l = 0; l < t.n_moe_layers; l++) fmt::print(" L{} |", t.layers[size_t(l)]);
      fmt::print("\n|---|---:|---:|---:|");
      for (int l = 0; l < t.n_moe_layers; l++) fmt::print("---:|");
      fmt::print("\n");
    }
    for (const auto& p : pl) {
      std::unique_ptr<CachePolicy> pol =
          p == "belady" ? make_belady_policy(requests) : make_cache_policy(p);
      const SimResult r = simulate_cache(t, requests, uses, *pol, slots, early);
      const std::string name = p == "default" ? fmt::format("default ({})", pol->name()) : p;
      if (output == "md") {
        fmt::print("| {} | {:.1f}% | {:.1f}% | {} |", name, 100 * r.hit_rate(),
                   100 * r.decode_hit_rate(),
                   r.early_requests ? fmt::format("{:.1f}%", 100 * r.early_hit_rate()) : "-");
        for (int l = 0; l < t.n_moe_layers; l++)
          fmt::print(" {:.1f}% |", 100 * r.layer_hit_rate(size_t(l)));
        fmt::print("\n");
      } else {
        nlohmann::ordered_json layers = nlohmann::ordered_json::array();
        for (int l = 0; l < t.n_moe_layers; l++) layers.push_back(r.layer_hit_rate(size_t(l)));
        js.push_back({{"policy", p},
                      {"budget", b},
                      {"hit_rate", r.hit_rate()},
                      {"slots", slots},
                      {"decode_hit_rate", r.decode_hit_rate()},
                      {"early_decode_hit_rate", r.early_hit_rate()},
                      {"layer_hit_rates", layers}});
      }
    }
  }
  if (output == "json") fmt::print("{}\n", js.dump(2));
  return 0;
}

}  // namespace

Command add_cache_sim(CLI::App& app) {
  struct Args {
    std::string trace, budgets = "10%,25%,50%", policies, output = "md", uses = "tokens";
    int early = 32;
  };
  auto a = std::make_shared<Args>();
  std::string all;
  for (const auto& n : cache_policy_names()) all += n + ",";
  a->policies = all + "default,belady";
  auto* c = app.add_subcommand("cache-sim",
                               "replay a routing trace (routing --trace) against "
                               "expert-cache policies and budgets: hit rates");
  c->add_option("--trace", a->trace, "routing trace file")->required();
  c->add_option("--budget", a->budgets,
                "comma-separated budgets: a share of all experts (25%) or a slot count");
  c->add_option("--policy", a->policies,
                "comma-separated policies: " + all + "default (the store's), belady (optimum)");
  c->add_option("-o,--output", a->output, "md or json (a list of {policy, budget, hit_rate, ...})");
  c->add_option("--early", a->early,
                "also report decode hits over the first N decode tokens after each prompt");
  c->add_option("--uses", a->uses,
                "how a prompt micro-batch's uses reach the policy: tokens (each expert's token "
                "count, as the store does) or requests (one use per expert and micro-batch, the "
                "store before 2026-12-03)");
  return {c, [a] {
            return cmd_cache_sim(a->trace, a->budgets, a->policies, a->output, a->early, a->uses);
          }};
}

}  // namespace moeflux::cli
