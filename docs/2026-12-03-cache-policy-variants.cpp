// The simulator harness behind "Variants tried" in docs/2026-12-03-cache-policy.md (issue 16):
// policy variants as a CachePolicy subclass (prompt-use weights, proportional / bounded-shared /
// no quotas, admission thresholds, aging periods), replayed by simulate_cache over routing
// traces beside LRU and Belady. A note's source, not part of the build:
//   g++ -std=c++20 -O2 -Isrc docs/2026-12-03-cache-policy-variants.cpp build/libmoeflux_core.a \
//     -lfmt -lpcre2-8 -lutf8proc -luring -lpthread -o /tmp/variants
//   /tmp/variants tests/data/traces/moe128/decode.trace tests/data/traces/moe128/chat.trace
// Columns: overall hit rate, decode, first 32 decodes after a prompt, decodes after those, and
// the overall rate over Belady's. "tok-bound.5-2" is what became tinylfu-shared.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <algorithm>

#include "experts/cache_sim.h"
#include "experts/routing_trace.h"

using namespace moeflux;

struct Variant {
  std::string name;
  int weight = 0;          // 0 tokens, 1 requests, 2 sqrt, 3 log2(1+u)
  int quotas = 0;          // 0 equal, 1 proportional to observed working set, 2 none (global)
  double admit_mult = 1.0; // admit if f(new) > mult * f(victim)
  int admission = 1;
  int aging_mult = 8;      // halve every aging_mult * E requests of the layer
  double lo = 0.5, hi = 2.0;
};

class VarPolicy : public CachePolicy {
 public:
  explicit VarPolicy(Variant v) : v_(v) {}
  const char* name() const override { return v_.name.c_str(); }
  void init(int L, int E, size_t slots) override {
    CachePolicy::init(L, E, slots);
    size_t n = size_t(L) * size_t(E);
    res_.assign(n, 0); pin_.assign(n, 0); cnt_.assign(size_t(L), 0);
    freq_.assign(n, 0); last_.assign(n, 0); tick_.assign(size_t(L), 0);
    quota_.assign(size_t(L), 0);
    for (int l = 0; l < L; l++) quota_[size_t(l)] = double(slots) / L;
    aging_ = uint64_t(std::max(16, v_.aging_mult * E));
  }
  void begin(int l, size_t) override {
    tick_[size_t(l)]++;
    if (tick_[size_t(l)] % aging_ == 0) {
      for (int k = l * n_experts_; k < (l + 1) * n_experts_; k++) freq_[size_t(k)] = std::floor(freq_[size_t(k)] / 2);
    }
    if (v_.quotas == 1 && tick_[size_t(l)] % 64 == 0) recompute_quotas();
  }
  void access(int key, bool, uint32_t uses) override {
    double w = uses;
    if (v_.weight == 1) w = 1;
    else if (v_.weight == 2) w = std::sqrt(double(uses));
    else if (v_.weight == 3) w = std::log2(1.0 + uses);
    freq_[size_t(key)] += w;
    last_[size_t(key)] = tick_[size_t(key / n_experts_)];
  }
  int victim(int key) override {
    const int l = key / n_experts_;
    int v = -1;
    if (v_.quotas == 2) {
      // global: lowest frequency among all evictable
      double bs = 0;
      for (size_t k = 0; k < res_.size(); k++) {
        if (!res_[k] || pin_[k]) continue;
        if (v < 0 || freq_[k] < bs) { v = int(k); bs = freq_[k]; }
      }
      if (v < 0) return -1;
      if (v_.admission && !(freq_[size_t(key)] > v_.admit_mult * freq_[size_t(v)])) return -1;
    } else if (v_.quotas == 3) {
      // bounded global: a layer keeps between lo and hi times its equal share
      const double share = double(slots_) / n_layers_;
      if (cnt_[size_t(l)] >= v_.hi * share) {
        v = lowest(l);
      } else {
        double bs = 0;
        for (int m = 0; m < n_layers_; m++) {
          if (m != l && cnt_[size_t(m)] <= v_.lo * share) continue;
          const int c = lowest(m);
          if (c >= 0 && (v < 0 || freq_[size_t(c)] < bs)) { v = c; bs = freq_[size_t(c)]; }
        }
      }
      if (v < 0) return -1;
      if (v_.admission && !(freq_[size_t(key)] > v_.admit_mult * freq_[size_t(v)])) return -1;
    } else if (cnt_[size_t(l)] >= quota_[size_t(l)]) {
      v = lowest(l);
      if (v < 0) return -1;
      if (v_.admission && !(freq_[size_t(key)] > v_.admit_mult * freq_[size_t(v)])) return -1;
    } else {
      double most = 0;
      for (int m = 0; m < n_layers_; m++) {
        const double over = cnt_[size_t(m)] - quota_[size_t(m)];
        if (over <= most) continue;
        int c = lowest(m);
        if (c >= 0) { most = over; v = c; }
      }
      if (v < 0) return -1;
    }
    erase(v);
    return v;
  }
  void insert(int key) override { res_[size_t(key)] = 1; pin_[size_t(key)] = 1; cnt_[size_t(key / n_experts_)]++; }
  void pin(int key) override { pin_[size_t(key)] = 1; }
  void unpin(int key) override { pin_[size_t(key)] = 0; }
  void erase(int key) override {
    if (!res_[size_t(key)]) return;
    res_[size_t(key)] = 0; pin_[size_t(key)] = 0; cnt_[size_t(key / n_experts_)]--;
  }

 private:
  int lowest(int m) const {
    int best = -1; double bs = 0;
    for (int k = m * n_experts_; k < (m + 1) * n_experts_; k++) {
      if (!res_[size_t(k)] || pin_[size_t(k)]) continue;
      double s = freq_[size_t(k)];
      if (best < 0 || s < bs || (s == bs && last_[size_t(k)] < last_[size_t(best)])) { best = k; bs = s; }
    }
    return best;
  }
  // Quota of layer l proportional to the "effective number" of experts it uses: 2^entropy of
  // its frequency distribution.
  void recompute_quotas() {
    std::vector<double> eff(static_cast<size_t>(n_layers_));
    double tot = 0;
    for (int l = 0; l < n_layers_; l++) {
      double s = 0, h = 0;
      for (int k = l * n_experts_; k < (l + 1) * n_experts_; k++) s += freq_[size_t(k)];
      if (s <= 0) { eff[size_t(l)] = n_experts_; tot += n_experts_; continue; }
      for (int k = l * n_experts_; k < (l + 1) * n_experts_; k++) {
        double p = freq_[size_t(k)] / s;
        if (p > 0) h -= p * std::log2(p);
      }
      eff[size_t(l)] = std::exp2(h);
      tot += eff[size_t(l)];
    }
    for (int l = 0; l < n_layers_; l++) quota_[size_t(l)] = double(slots_) * eff[size_t(l)] / tot;
  }
  Variant v_;
  std::vector<uint8_t> res_, pin_;
  std::vector<int> cnt_;
  std::vector<double> freq_, quota_;
  std::vector<uint64_t> last_, tick_;
  uint64_t aging_ = 0;
};

int main(int argc, char** argv) {
  // usage: exp TRACE...
  std::vector<Variant> vs = {
      {"tok", 0, 0, 1.0, 1, 8},        {"req", 1, 0, 1.0, 1, 8},
      {"sqrt", 2, 0, 1.0, 1, 8},       {"log", 3, 0, 1.0, 1, 8},
      {"tok-propq", 0, 1, 1.0, 1, 8},  {"tok-global", 0, 2, 1.0, 1, 8},
      {"tok-adm1.5", 0, 0, 1.5, 1, 8}, {"tok-adm0.5", 0, 0, 0.5, 1, 8},
      {"tok-age4", 0, 0, 1.0, 1, 4},   {"tok-age32", 0, 0, 1.0, 1, 32},
      {"tok-noadm", 0, 0, 1.0, 0, 8},
      {"tok-bound.5-2", 0, 3, 1.0, 1, 8, 0.5, 2.0},
      {"tok-bound.75-1.5", 0, 3, 1.0, 1, 8, 0.75, 1.5},
      {"tok-bound.25-4", 0, 3, 1.0, 1, 8, 0.25, 4.0},
  };
  for (int a = 1; a < argc; a++) {
    const RoutingTrace t = RoutingTrace::load(argv[a]);
    const auto req = trace_requests(t);
    const auto uses = trace_uses(t);
    const size_t all = size_t(t.n_moe_layers) * size_t(t.n_experts);
    std::printf("## %s (%d layers x %d experts, top-%d)\n", argv[a], t.n_moe_layers, t.n_experts, t.k);
    std::printf("| variant | budget | hit | decode | first32 | late decode | /belady |\n|---|---|---|---|---|---|---|\n");
    for (double pct : {0.10, 0.25, 0.50}) {
      const size_t slots = size_t(double(all) * pct);
      SimResult b = simulate_cache(t, "belady", slots);
      auto row = [&](const std::string& n, const SimResult& r) {
        const double late = double(r.decode_hits - r.early_hits) / double(r.decode_requests - r.early_requests);
        std::printf("| %s | %.0f%% | %.1f | %.1f | %.1f | %.1f | %.0f%% |\n", n.c_str(), pct * 100,
                    100 * r.hit_rate(), 100 * r.decode_hit_rate(), 100 * r.early_hit_rate(), 100 * late,
                    100 * r.hit_rate() / b.hit_rate());
      };
      row("belady", b);
      row("lru", simulate_cache(t, "lru", slots));
      for (const auto& v : vs) {
        VarPolicy p(v);
        row(v.name, simulate_cache(t, req, v.weight == 1 ? std::vector<std::vector<uint32_t>>{} : uses, p, slots));
      }
    }
  }
}
