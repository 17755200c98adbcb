#include "experts/cache_sim.h"

#include <algorithm>

#include "util/error.h"

namespace moeflux {

namespace {
double ratio(uint64_t a, uint64_t b) {
  return b ? double(a) / double(b) : 0.0;
}
uint64_t sum(const std::vector<uint64_t>& v) {
  uint64_t s = 0;
  for (uint64_t x : v) s += x;
  return s;
}
}  // namespace

double SimResult::hit_rate() const {
  return ratio(sum(hits), sum(requests));
}
double SimResult::decode_hit_rate() const {
  return ratio(decode_hits, decode_requests);
}
double SimResult::early_hit_rate() const {
  return ratio(early_hits, early_requests);
}
double SimResult::layer_hit_rate(size_t l) const {
  return ratio(hits.at(l), requests.at(l));
}

std::vector<std::vector<int>> trace_requests(const RoutingTrace& t) {
  std::vector<std::vector<int>> out;
  out.reserve(t.records.size());
  std::vector<uint8_t> chosen(size_t(t.n_experts));
  for (const TraceRecord& r : t.records) {
    std::fill(chosen.begin(), chosen.end(), 0);
    for (int e : r.experts) chosen[size_t(e)] = 1;
    std::vector<int> keys;
    for (int e = 0; e < t.n_experts; e++)
      if (chosen[size_t(e)]) keys.push_back(r.moe_index * t.n_experts + e);
    out.push_back(std::move(keys));
  }
  return out;
}

std::vector<std::vector<uint32_t>> trace_uses(const RoutingTrace& t) {
  std::vector<std::vector<uint32_t>> out;
  out.reserve(t.records.size());
  std::vector<uint32_t> n(size_t(t.n_experts));
  for (const TraceRecord& r : t.records) {
    std::fill(n.begin(), n.end(), 0);
    for (int e : r.experts) n[size_t(e)]++;
    std::vector<uint32_t> u;
    for (int e = 0; e < t.n_experts; e++)
      if (n[size_t(e)]) u.push_back(n[size_t(e)]);
    out.push_back(std::move(u));
  }
  return out;
}

SimResult simulate_cache(const RoutingTrace& t, const std::vector<std::vector<int>>& requests,
                         const std::vector<std::vector<uint32_t>>& uses, CachePolicy& policy,
                         size_t slots, int early_tokens) {
  MF_CHECK(requests.size() == t.records.size());
  MF_CHECK(uses.empty() || uses.size() == requests.size());
  const size_t n_keys = size_t(t.n_moe_layers) * size_t(t.n_experts);
  slots = std::min(slots, n_keys);
  policy.init(t.n_moe_layers, t.n_experts, slots);
  SimResult res;
  res.policy = policy.name();
  res.slots = slots;
  res.requests.assign(size_t(t.n_moe_layers), 0);
  res.hits.assign(size_t(t.n_moe_layers), 0);
  std::vector<uint8_t> resident(n_keys, 0);
  size_t used = 0;
  std::vector<int> misses;
  // Per layer: decode tokens since its last prompt record (-1: no prompt yet).
  std::vector<int64_t> since_prompt(size_t(t.n_moe_layers), -1);
  for (size_t i = 0; i < requests.size(); i++) {
    const TraceRecord& rec = t.records[i];
    const auto& keys = requests[i];
    const size_t l = size_t(rec.moe_index);
    policy.begin(rec.moe_index, keys.size());
    misses.clear();
    uint64_t h = 0;
    for (size_t j = 0; j < keys.size(); j++) {
      const int k = keys[j];
      const bool hit = resident[size_t(k)];
      policy.access(k, hit, uses.empty() ? 1u : uses[i][j]);
      if (hit) {
        policy.pin(k);
        h++;
      } else {
        misses.push_back(k);
      }
    }
    if (slots > 0) {
      policy.order_misses(misses);
      for (int k : misses) {
        if (used == slots) {
          const int v = policy.victim(k);
          if (v < 0) continue;  // not cached: read into the request's own buffer
          MF_CHECK(resident[size_t(v)]);
          resident[size_t(v)] = 0;
          used--;
        }
        resident[size_t(k)] = 1;
        used++;
        policy.insert(k);
      }
    }
    // Released in the request's order, as the store's batch releases its slots (with lru the
    // order is the recency order).
    for (int k : keys)
      if (resident[size_t(k)]) policy.unpin(k);
    res.requests[l] += keys.size();
    res.hits[l] += h;
    if (rec.phase == TraceRecord::kDecode) {
      res.decode_requests += keys.size();
      res.decode_hits += h;
      int64_t& n = since_prompt[l];
      if (n >= 0 && n < early_tokens) {
        res.early_requests += keys.size();
        res.early_hits += h;
      }
      if (n >= 0) n += rec.tokens;
    } else {
      since_prompt[l] = 0;
    }
  }
  return res;
}

SimResult simulate_cache(const RoutingTrace& t, const std::string& name, size_t slots,
                         int early_tokens, UseCounting counting) {
  const std::vector<std::vector<int>> requests = trace_requests(t);
  const std::vector<std::vector<uint32_t>> uses =
      counting == UseCounting::kTokens ? trace_uses(t) : std::vector<std::vector<uint32_t>>{};
  std::unique_ptr<CachePolicy> p =
      name == "belady" ? make_belady_policy(requests) : make_cache_policy(name);
  SimResult r = simulate_cache(t, requests, uses, *p, slots, early_tokens);
  if (name == "default") r.policy = "default";
  return r;
}

}  // namespace moeflux
