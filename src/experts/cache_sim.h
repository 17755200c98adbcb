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

// `policy` is a store policy name, "default", or "belady".
SimResult simulate_cache(const RoutingTrace& t, const std::string& policy, size_t slots,
                         int early_tokens = 32);
// Replays with a policy object (init is called here); `requests` = trace_requests(t).
SimResult simulate_cache(const RoutingTrace& t, const std::vector<std::vector<int>>& requests,
                         CachePolicy& policy, size_t slots, int early_tokens = 32);

}  // namespace moeflux
