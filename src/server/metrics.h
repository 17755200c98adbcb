// Server counters and their Prometheus text exposition (GET /metrics, format 0.0.4).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "experts/expert_store.h"

namespace moeflux::server {

class Metrics {
 public:
  void request(const std::string& endpoint, int status);
  // One finished generation: tokens and seconds of its prompt eval and of its decode.
  void generation(int prompt_tokens, int cached_tokens, double prompt_seconds, int gen_tokens,
                  double gen_seconds, double ttft_seconds, bool cancelled);
  void rejected_busy();

  // `slots_busy`, `queued`: the pool's state now; `store`: expert-cache counters.
  std::string render(int slots, int slots_busy, int queued, const ExpertStats& store) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;  // (endpoint, status) -> count
  uint64_t prompt_tokens_ = 0, cached_tokens_ = 0, gen_tokens_ = 0;
  double prompt_seconds_ = 0, gen_seconds_ = 0, ttft_seconds_ = 0;
  uint64_t generations_ = 0, cancelled_ = 0, busy_ = 0;
};

}  // namespace moeflux::server
