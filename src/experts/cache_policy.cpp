#include "experts/cache_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "util/error.h"

namespace moeflux {

void CachePolicy::init(int n_layers, int n_experts, size_t slots) {
  n_layers_ = n_layers;
  n_experts_ = n_experts;
  slots_ = slots;
}

namespace {

// Which keys hold a slot and which of those are pinned: what every policy needs to know to name
// a victim. One byte per key: the key space (layers x experts, 30k for the largest models) is
// small enough that no policy needs a hash table or a sketch.
class Residency : public CachePolicy {
 public:
  void init(int n_layers, int n_experts, size_t slots) override {
    CachePolicy::init(n_layers, n_experts, slots);
    const size_t n = size_t(n_layers) * size_t(n_experts);
    resident_.assign(n, 0);
    pinned_.assign(n, 0);
    count_.assign(size_t(n_layers), 0);
  }
  void insert(int key) override {
    MF_CHECK(!resident_[size_t(key)]);
    resident_[size_t(key)] = 1;
    pinned_[size_t(key)] = 1;
    count_[size_t(layer_of(key))]++;
  }
  void pin(int key) override { pinned_[size_t(key)] = 1; }
  void unpin(int key) override { pinned_[size_t(key)] = 0; }
  void erase(int key) override {
    if (!resident_[size_t(key)]) return;
    resident_[size_t(key)] = 0;
    pinned_[size_t(key)] = 0;
    count_[size_t(layer_of(key))]--;
  }

 protected:
  int layer_of(int key) const { return key / n_experts_; }
  bool evictable(int key) const { return resident_[size_t(key)] && !pinned_[size_t(key)]; }
  std::vector<uint8_t> resident_, pinned_;
  std::vector<int> count_;  // resident keys per layer
};

// ---------------------------------------------------------------------------------------------
// lru: one list over every key, most recently released first. A key is on the list while it is
// resident and unpinned; releasing a pinned key (the end of a request) is its use.

class LruPolicy final : public Residency {
 public:
  const char* name() const override { return "lru"; }
  void init(int n_layers, int n_experts, size_t slots) override {
    Residency::init(n_layers, n_experts, slots);
    const size_t n = size_t(n_layers) * size_t(n_experts);
    prev_.assign(n, -1);
    next_.assign(n, -1);
    on_.assign(n, 0);
    head_ = tail_ = -1;
  }
  void access(int, bool, uint32_t) override {}
  int victim(int) override {
    const int k = tail_;
    if (k < 0) return -1;
    remove(k);
    Residency::erase(k);
    return k;
  }
  void pin(int key) override {
    Residency::pin(key);
    remove(key);
  }
  void unpin(int key) override {
    Residency::unpin(key);
    remove(key);
    push_front(key);
  }
  void erase(int key) override {
    remove(key);
    Residency::erase(key);
  }

 private:
  void remove(int k) {
    if (!on_[size_t(k)]) return;
    (prev_[size_t(k)] >= 0 ? next_[size_t(prev_[size_t(k)])] : head_) = next_[size_t(k)];
    (next_[size_t(k)] >= 0 ? prev_[size_t(next_[size_t(k)])] : tail_) = prev_[size_t(k)];
    prev_[size_t(k)] = next_[size_t(k)] = -1;
    on_[size_t(k)] = 0;
  }
  void push_front(int k) {
    prev_[size_t(k)] = -1;
    next_[size_t(k)] = head_;
    if (head_ >= 0) prev_[size_t(head_)] = k;
    head_ = k;
    if (tail_ < 0) tail_ = k;
    on_[size_t(k)] = 1;
  }
  std::vector<int> prev_, next_;
  std::vector<uint8_t> on_;
  int head_ = -1, tail_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Per-layer quotas. Decoding walks the layers in a cycle, so one list over all layers evicts
// each layer's experts just before the cycle comes back to them (0% hits below one cycle's
// working set, docs/2026-11-26-expert-store.md). Each layer is entitled to slots / layers
// (the remainder to the first layers): a miss of a layer at or over its quota evicts from that
// layer; a layer under its quota takes from the layer furthest over its own. Inside the chosen
// layer the subclass's score picks the victim (lowest first); scanning one layer's experts is
// cheap (at most a few hundred bytes of flags) and happens only on a miss.

class QuotaPolicy : public Residency {
 public:
  // shared = false: strict quotas (above). shared = true: each layer keeps between half and
  // twice its equal share (no layer starved, none hoarding) and within those bounds the layers
  // compete: a miss evicts the lowest-scored evictable key of any layer above its floor (of its
  // own layer when that one is at its ceiling). Costs a scan of every layer's flags per miss
  // (layers x experts bytes, 10k for the 35B-A3B shape).
  explicit QuotaPolicy(bool shared = false) : shared_(shared) {}
  void init(int n_layers, int n_experts, size_t slots) override {
    Residency::init(n_layers, n_experts, slots);
    quota_.assign(size_t(n_layers), 0);
    for (int l = 0; l < n_layers; l++)
      quota_[size_t(l)] = int(slots / size_t(n_layers) + (size_t(l) < slots % size_t(n_layers)));
    tick_.assign(size_t(n_layers), 0);
    last_.assign(size_t(n_layers) * size_t(n_experts), 0);
  }
  void begin(int layer, size_t) override { tick_[size_t(layer)]++; }
  void access(int key, bool, uint32_t) override {
    last_[size_t(key)] = tick_[size_t(layer_of(key))];
  }
  int victim(int key) override {
    const int l = layer_of(key);
    int v = -1;
    if (shared_) {
      const double share = double(slots_) / double(n_layers_);
      if (count_[size_t(l)] >= 2 * share) {
        v = lowest(l);
      } else {
        double best = 0;
        for (int m = 0; m < n_layers_; m++) {
          if (m != l && count_[size_t(m)] <= share / 2) continue;
          const int c = lowest(m);
          if (c >= 0 && (v < 0 || score(c) < best)) {
            v = c;
            best = score(c);
          }
        }
      }
      if (v < 0 || !admit(key, v)) return -1;
    } else if (count_[size_t(l)] >= quota_[size_t(l)]) {
      // At its quota: the layer replaces one of its own, if the newcomer is admitted; with all
      // of its own pinned (a request larger than the quota) the newcomer goes uncached rather
      // than take from a layer within its share.
      v = lowest(l);
      if (v < 0 || !admit(key, v)) return -1;
    } else {
      // Under its quota, the layer is owed the slot: the lowest of the layer furthest over.
      int most = 0;
      for (int m = 0; m < n_layers_; m++) {
        const int over = count_[size_t(m)] - quota_[size_t(m)];
        if (over <= most) continue;
        const int c = lowest(m);
        if (c >= 0) {
          most = over;
          v = c;
        }
      }
      if (v < 0) return -1;
    }
    Residency::erase(v);
    return v;
  }

 protected:
  // Lower = evicted first. Called only for resident keys.
  virtual double score(int key) const = 0;
  virtual bool admit(int key, int victim) const {
    (void)key, (void)victim;
    return true;
  }
  // The evictable key of layer `m` with the lowest score (ties: least recently used), or -1.
  int lowest(int m) const {
    int best = -1;
    double bs = 0;
    const int base = m * n_experts_;
    for (int k = base; k < base + n_experts_; k++) {
      if (!evictable(k)) continue;
      const double s = score(k);
      if (best < 0 || s < bs || (s == bs && last_[size_t(k)] < last_[size_t(best)])) {
        best = k;
        bs = s;
      }
    }
    return best;
  }
  bool shared_ = false;
  std::vector<int> quota_;
  std::vector<uint64_t> tick_;  // requests seen per layer: the clock of that layer
  std::vector<uint64_t> last_;  // per key: its layer's tick at its last access
};

class LruLayerPolicy final : public QuotaPolicy {
 public:
  const char* name() const override { return "lru-layer"; }

 protected:
  double score(int key) const override { return double(last_[size_t(key)]); }
};

// Frequencies of every key (resident or not), halved every `aging` requests of its layer.
class LfuPolicy : public QuotaPolicy {
 public:
  explicit LfuPolicy(bool admission, bool shared = false)
      : QuotaPolicy(shared), admission_(admission) {}
  const char* name() const override {
    return shared_ ? "tinylfu-shared" : admission_ ? "tinylfu" : "lfu";
  }
  void init(int n_layers, int n_experts, size_t slots) override {
    QuotaPolicy::init(n_layers, n_experts, slots);
    freq_.assign(size_t(n_layers) * size_t(n_experts), 0);
    // About eight uses per expert between halvings for a top-k of E/8: long enough that a
    // regular's count stands well above a prompt's one touch, short enough to follow drift.
    aging_ = uint64_t(std::max(16, 8 * n_experts));
  }
  void begin(int layer, size_t n) override {
    QuotaPolicy::begin(layer, n);
    if (tick_[size_t(layer)] % aging_ == 0) {
      const size_t base = size_t(layer) * size_t(n_experts_);
      for (size_t k = base; k < base + size_t(n_experts_); k++) freq_[k] /= 2;
    }
  }
  void access(int key, bool hit, uint32_t uses) override {
    QuotaPolicy::access(key, hit, uses);
    freq_[size_t(key)] += uses;
  }

 protected:
  double score(int key) const override { return double(freq_[size_t(key)]); }
  // TinyLFU: a newcomer must be used more often than the expert it would replace.
  bool admit(int key, int victim) const override {
    return !admission_ || freq_[size_t(key)] > freq_[size_t(victim)];
  }

 private:
  bool admission_;
  uint64_t aging_ = 0;
  std::vector<uint32_t> freq_;
};

// LRFU (Lee et al. 1999): CRF(t) = sum over uses at t_i of 2^(-lambda (t - t_i)), t in requests
// of the key's layer; lambda -> 0 is LFU, lambda = 1 is LRU. Stored as (crf at last use, last
// use), decayed when read.
class LrfuPolicy final : public QuotaPolicy {
 public:
  const char* name() const override { return "lrfu"; }
  void init(int n_layers, int n_experts, size_t slots) override {
    QuotaPolicy::init(n_layers, n_experts, slots);
    crf_.assign(size_t(n_layers) * size_t(n_experts), 0.0);
  }
  void access(int key, bool hit, uint32_t uses) override {
    const double now_crf = score(key);
    QuotaPolicy::access(key, hit, uses);
    crf_[size_t(key)] = now_crf + double(uses);
  }

 protected:
  double score(int key) const override {
    const uint64_t age = tick_[size_t(layer_of(key))] - last_[size_t(key)];
    return crf_[size_t(key)] * std::exp2(-kLambda * double(age));
  }

 private:
  static constexpr double kLambda = 0.01;  // half-life of a use: 100 requests of the layer
  std::vector<double> crf_;
};

// ---------------------------------------------------------------------------------------------
// Belady's MIN with bypass, offline: every key's next request is known.

class BeladyPolicy final : public Residency {
 public:
  explicit BeladyPolicy(const std::vector<std::vector<int>>& requests) : requests_(requests) {}
  const char* name() const override { return "belady"; }
  void init(int n_layers, int n_experts, size_t slots) override {
    Residency::init(n_layers, n_experts, slots);
    const size_t n = size_t(n_layers) * size_t(n_experts);
    occ_.assign(n, {});
    for (size_t i = 0; i < requests_.size(); i++)
      for (int k : requests_[i]) {
        MF_CHECK(k >= 0 && size_t(k) < n);
        occ_[size_t(k)].push_back(i);
      }
    ptr_.assign(n, 0);
    req_ = size_t(-1);
  }
  void begin(int, size_t) override { req_++; }
  void access(int key, bool, uint32_t) override {
    const auto& o = occ_[size_t(key)];
    size_t& p = ptr_[size_t(key)];
    while (p < o.size() && o[p] <= req_) p++;
  }
  int victim(int key) override {
    int v = -1;
    for (size_t k = 0; k < resident_.size(); k++)
      if (evictable(int(k)) && (v < 0 || sooner(v, int(k)))) v = int(k);
    if (v < 0 || !sooner(key, v)) return -1;
    Residency::erase(v);
    return v;
  }
  void order_misses(std::vector<int>& keys) override {
    std::stable_sort(keys.begin(), keys.end(), [&](int a, int b) { return sooner(a, b); });
  }

 private:
  // Whether key a is wanted before key b. Two keys next wanted by the same request are told
  // apart by their uses after it: both would hit there, but the one kept then stays pinned
  // through it, so the other cannot take its slot until later (a tie broken either way is
  // not optimal under pinning; the later uses decide).
  bool sooner(int a, int b) const {
    const auto& oa = occ_[size_t(a)];
    const auto& ob = occ_[size_t(b)];
    size_t i = ptr_[size_t(a)], j = ptr_[size_t(b)];
    for (; i < oa.size() && j < ob.size(); i++, j++)
      if (oa[i] != ob[j]) return oa[i] < ob[j];
    return i < oa.size() && j == ob.size();
  }
  const std::vector<std::vector<int>>& requests_;
  std::vector<std::vector<size_t>> occ_;  // per key: the requests that use it, ascending
  std::vector<size_t> ptr_;               // per key: its first use after the requests seen so far
  size_t req_ = 0;
};

}  // namespace

std::vector<std::string> cache_policy_names() {
  return {"lru", "lru-layer", "lfu", "lrfu", "tinylfu", "tinylfu-shared"};
}

std::string resolve_cache_policy_name(const std::string& name) {
  return name.empty() || name == "default" ? std::string(kDefaultCachePolicy) : name;
}

std::unique_ptr<CachePolicy> make_cache_policy(const std::string& name_in) {
  const std::string name = resolve_cache_policy_name(name_in);
  if (name == "lru") return std::make_unique<LruPolicy>();
  if (name == "lru-layer") return std::make_unique<LruLayerPolicy>();
  if (name == "lfu") return std::make_unique<LfuPolicy>(false);
  if (name == "tinylfu") return std::make_unique<LfuPolicy>(true);
  if (name == "tinylfu-shared") return std::make_unique<LfuPolicy>(true, true);
  if (name == "lrfu") return std::make_unique<LrfuPolicy>();
  std::string all;
  for (const auto& n : cache_policy_names()) all += (all.empty() ? "" : ", ") + n;
  fail(ErrorKind::kInvalidArgument, "cache policy '{}' is not one of default, {}", name_in, all);
}

std::unique_ptr<CachePolicy> make_belady_policy(const std::vector<std::vector<int>>& requests) {
  return std::make_unique<BeladyPolicy>(requests);
}

}  // namespace moeflux
