#include "server/metrics.h"

#include <fmt/format.h>

namespace moeflux::server {

void Metrics::request(const std::string& endpoint, int status) {
  std::lock_guard lock(mu_);
  requests_[{endpoint, status}]++;
}

void Metrics::generation(int prompt_tokens, int cached_tokens, double prompt_seconds,
                         int gen_tokens, double gen_seconds, double ttft_seconds, bool cancelled) {
  std::lock_guard lock(mu_);
  prompt_tokens_ += uint64_t(prompt_tokens);
  cached_tokens_ += uint64_t(cached_tokens);
  prompt_seconds_ += prompt_seconds;
  gen_tokens_ += uint64_t(gen_tokens);
  gen_seconds_ += gen_seconds;
  ttft_seconds_ += ttft_seconds;
  generations_++;
  if (cancelled) cancelled_++;
}

void Metrics::rejected_busy() {
  std::lock_guard lock(mu_);
  busy_++;
}

std::string Metrics::render(int slots, int slots_busy, int queued,
                            const ExpertStats& store) const {
  std::lock_guard lock(mu_);
  std::string s;
  auto head = [&](const char* name, const char* type, const char* help) {
    s += fmt::format("# HELP moeflux_{} {}\n# TYPE moeflux_{} {}\n", name, help, name, type);
  };
  auto value = [&](const char* name, double v) { s += fmt::format("moeflux_{} {}\n", name, v); };
  auto one = [&](const char* name, const char* type, const char* help, double v) {
    head(name, type, help);
    value(name, v);
  };

  head("requests_total", "counter", "HTTP requests by endpoint and status code.");
  for (const auto& [key, n] : requests_)
    s += fmt::format("moeflux_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}\n", key.first,
                     key.second, n);
  one("requests_rejected_busy_total", "counter",
      "Generation requests refused with 503 because every slot and queue place was taken.",
      double(busy_));
  one("generations_total", "counter", "Finished generations (cancelled ones included).",
      double(generations_));
  one("generations_cancelled_total", "counter",
      "Generations stopped because the client went away (or the server stopped).",
      double(cancelled_));
  one("prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
      double(prompt_tokens_));
  one("prompt_tokens_cached_total", "counter",
      "Prompt tokens not evaluated again thanks to a slot's prompt cache.", double(cached_tokens_));
  one("prompt_seconds_total", "counter", "Seconds spent evaluating prompts.", prompt_seconds_);
  one("tokens_generated_total", "counter", "Generated tokens.", double(gen_tokens_));
  one("generation_seconds_total", "counter", "Seconds spent generating (sampling and decode).",
      gen_seconds_);
  one("prompt_tokens_per_second", "gauge",
      "Evaluated prompt tokens per second of prompt evaluation, over the server's life.",
      prompt_seconds_ > 0 ? double(prompt_tokens_ - cached_tokens_) / prompt_seconds_ : 0.0);
  one("generation_tokens_per_second", "gauge",
      "Generated tokens per second of generation, per request, over the server's life.",
      gen_seconds_ > 0 ? double(gen_tokens_) / gen_seconds_ : 0.0);
  one("time_to_first_token_seconds_total", "counter",
      "Summed time from a request's arrival to its first token.", ttft_seconds_);
  one("slots", "gauge", "Generation slots (--parallel).", slots);
  one("slots_busy", "gauge", "Slots generating now.", slots_busy);
  one("requests_queued", "gauge", "Requests waiting for a slot.", queued);

  const auto& t = store.total;
  one("expert_requests_total", "counter", "Experts asked of the expert store.", double(t.requests));
  one("expert_cache_hits_total", "counter", "Experts found in the expert cache.", double(t.hits));
  one("expert_cache_misses_total", "counter", "Experts read from the files for a request.",
      double(t.misses));
  one("expert_bytes_read_total", "counter", "Bytes read from the expert files (prefetch included).",
      double(t.bytes_read));
  one("expert_stall_seconds_total", "counter", "Seconds the forward pass waited for experts.",
      t.stall_seconds);
  one("expert_host_tier_hits_total", "counter",
      "Cache misses found in the host tier (GPU): copied, not read.", double(t.host_hits));
  one("expert_bytes_copied_total", "counter", "Bytes copied from host memory into GPU expert slots.",
      double(t.bytes_copied));
  one("expert_copy_seconds_total", "counter", "Summed seconds of those copies (over threads).",
      t.copy_seconds);
  one("expert_cache_bytes", "gauge", "Expert cache budget in bytes.", double(store.cache_bytes));
  one("expert_host_cache_bytes", "gauge", "Host tier budget in bytes (GPU).",
      double(store.host_cache_bytes));
  one("expert_cache_cached", "gauge", "Experts in the cache now.", double(store.cached));
  one("expert_cache_hit_ratio", "gauge", "Expert cache hits / requests.", store.hit_rate());
  return s;
}

}  // namespace moeflux::server
