// Which expert to keep: the eviction and admission policy of the expert cache, one class used by
// both the ExpertStore and `moeflux cache-sim` (so a policy measured on a trace is the code the
// store runs).
//
// A key is one expert of one MoE layer: moe_index * n_experts + expert. The cache is `slots`
// equal slots. The caller (store or simulator) drives a policy the way a fetch goes:
//   begin(layer, n)         a request of n distinct experts of one layer starts;
//   access(key, hit, uses)  for every expert of it, hit or miss, before any slot changes hands;
//                           `uses` = how many of the request's tokens chose it (1 in decode,
//                           up to the micro-batch's size in a prompt);
//   pin(key)                each hit: pinned while the request uses it (never a victim);
//   victim(key)             for each miss when no slot is free: the unpinned resident key to
//                           evict for `key`, or -1 to leave `key` uncached (read into a buffer
//                           of its own: admission refused or everything pinned);
//   insert(key)             `key` now holds a slot, pinned (its read is in flight);
//   unpin(key)              the request is done with it (it was ready): evictable again;
//   erase(key)              `key` left the cache otherwise (failed read, drop_cache).
// A request's experts are therefore never victims of that request: a layer's experts are
// fetched together and all of them are in memory at once.
//
// Policies (docs/2026-12-03-cache-policy.md has the measurements that chose the default):
//   lru        one LRU list over all keys (the store's policy before 2026-12-03);
//   lru-layer  per-layer quotas (slots / layers each, a layer under its quota takes from the
//              layer furthest over it), LRU inside a layer;
//   lfu        per-layer quotas, least frequently used inside a layer; a key's count is its
//              uses by token (a prompt micro-batch adds how many of its tokens chose the
//              expert, a decode step 1), halved every `aging` requests of the layer (so
//              yesterday's favourites fade);
//   lrfu       per-layer quotas, combined recency and frequency: score = sum over past uses of
//              2^(-lambda * age in requests of the layer);
//   tinylfu    lfu's counts with TinyLFU admission: a miss evicts the layer's least frequent
//              expert only if it is used more often than that victim, so a prompt's scan
//              (every expert touched by a few tokens) does not push out decode's regulars,
//              while the experts most of the prompt routed to come in with the counts to stay;
//   tinylfu-shared  tinylfu with shared quotas: each layer keeps between half and twice its
//              equal share of the slots, and within those bounds a miss evicts the least used
//              evictable expert of any layer (subject to the same admission). The default:
//              hits the most at 10% of the experts and recovers fastest after a prompt.
//   belady     (cache-sim only) Belady's MIN with bypass: evicts the key whose next use is
//              furthest away, or leaves the missed key uncached when it is that key. The upper
//              bound for any policy on a trace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeflux {

class CachePolicy {
 public:
  virtual ~CachePolicy() = default;
  virtual const char* name() const = 0;
  // Before anything else: n_layers x n_experts keys, `slots` cache slots.
  virtual void init(int n_layers, int n_experts, size_t slots);
  virtual void begin(int layer, size_t n_experts) { (void)layer, (void)n_experts; }
  virtual void access(int key, bool hit, uint32_t uses) = 0;
  virtual int victim(int key) = 0;
  virtual void insert(int key) = 0;
  virtual void pin(int key) = 0;
  virtual void unpin(int key) = 0;
  virtual void erase(int key) = 0;
  // The order in which a request's misses claim slots (`keys` is reordered in place). The store
  // keeps the request's order; Belady sorts by next use, since the misses of a request arrive
  // together and the soonest-needed ones deserve the slots.
  virtual void order_misses(std::vector<int>& keys) { (void)keys; }

 protected:
  int n_layers_ = 0, n_experts_ = 0;
  size_t slots_ = 0;
};

// The store's policy when none is named: chosen by measurement (docs/2026-12-03-cache-policy.md).
inline constexpr const char* kDefaultCachePolicy = "tinylfu-shared";

// Names the store accepts (and "default"), in the order cache-sim lists them.
std::vector<std::string> cache_policy_names();
// A store policy by name ("default" = kDefaultCachePolicy). Throws Error (kInvalidArgument)
// naming the valid names.
std::unique_ptr<CachePolicy> make_cache_policy(const std::string& name);
// Resolves "default" (and "") to the default's name; other names unchanged.
std::string resolve_cache_policy_name(const std::string& name);

// Belady's MIN over a known request sequence: requests[i] = the keys of request i, in the
// order the caller will access them. The caller must replay exactly that sequence.
std::unique_ptr<CachePolicy> make_belady_policy(const std::vector<std::vector<int>>& requests);

}  // namespace moeflux
