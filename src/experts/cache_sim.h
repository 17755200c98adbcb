// Replays a routing trace against a cache policy the way the ExpertStore serves it: one
// request per record (the distinct experts its tokens chose, ascending, as Session::moe asks
// the store), hits pinned, misses taking a free slot or the policy's victim (or bypassing the
// cache), the request released when done. No prefetch, no concurrent sessions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "experts/cache_policy.h"
#include "experts/routing_trace.h"

namespace moeflux {

struct SimResult {
  std::string policy;
  size_t slots = 0;
  std::vector<uint64_t> requests, hits;           // per MoE layer
  uint64_t decode_requests = 0, decode_hits = 0;  // over decode records only
  // Decode records among the first `early_tokens` decode tokens of their layer after a prompt
  // record: how fast the cache recovers from a prompt (compare with decode_hit_rate).
  uint64_t early_requests = 0, early_hits = 0;
  double hit_rate() const;
  double decode_hit_rate() const;
  double early_hit_rate() const;
  double layer_hit_rate(size_t l) const;
};

// The requests a trace makes of the store: per record, its distinct keys, ascending.
std::vector<std::vector<int>> trace_requests(const RoutingTrace& t);
// Parallel to trace_requests: how many of the record's tokens chose each of those keys (what
// Session::moe passes the store as `uses`).
std::vector<std::vector<uint32_t>> trace_uses(const RoutingTrace& t);

// How the policy is told a request's uses: kTokens as the store does (each key's token count),
// kRequests one use per key and request (the store before 2026-12-03: a prompt micro-batch
// counted as one use of each expert it touched, however many tokens chose it).
enum class UseCounting { kTokens, kRequests };

// `policy` is a store policy name, "default", or "belady".
SimResult simulate_cache(const RoutingTrace& t, const std::string& policy, size_t slots,
                         int early_tokens = 32, UseCounting counting = UseCounting::kTokens);
// Replays with a policy object (init is called here); `requests` = trace_requests(t), `uses`
// = trace_uses(t) or empty (one use each).
SimResult simulate_cache(const RoutingTrace& t, const std::vector<std::vector<int>>& requests,
                         const std::vector<std::vector<uint32_t>>& uses, CachePolicy& policy,
                         size_t slots, int early_tokens = 32);

}  // namespace moeflux
