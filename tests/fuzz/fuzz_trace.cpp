// libFuzzer target: the routing-trace reader (RoutingTrace::decode). When its first byte is odd
// the rest is decoded with its checksum fixed first, so the structure checks behind the checksum
// (counts, layer and expert ranges, repeated experts) are reached too. Every input must either
// decode or throw Error kFormat; one that decodes is replayed by cache-sim's simulator with the
// default policy and Belady at a quarter of the slots (no crash, hits never above requests).
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 60 s:
//   ./build-fuzz/tests/fuzz_trace -max_total_time=60 tests/fuzz/corpus/trace/
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "experts/cache_sim.h"
#include "experts/routing_trace.h"
#include "util/error.h"
#include "util/hash.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::vector<uint8_t> b(data + 1, data + size);
  if ((data[0] & 1) && b.size() >= 8) {
    const uint64_t h = moeflux::fnv1a64(b.data(), b.size() - 8);
    for (int i = 0; i < 8; i++) b[b.size() - 8 + size_t(i)] = uint8_t(h >> (8 * i));
  }
  moeflux::RoutingTrace t;
  try {
    t = moeflux::RoutingTrace::decode(b, "fuzz.trace");
  } catch (const moeflux::Error& e) {
    if (e.kind() != moeflux::ErrorKind::kFormat) std::abort();
    return 0;
  }
  // Keep each input cheap: the simulator is linear in requests x slots for Belady.
  size_t ids = 0;
  for (const auto& r : t.records) ids += r.experts.size();
  const size_t keys = size_t(t.n_moe_layers) * size_t(t.n_experts);
  if (ids > 100000 || keys > 100000) return 0;
  const size_t slots = keys / 4;
  const moeflux::SimResult d = moeflux::simulate_cache(t, "default", slots);
  const moeflux::SimResult o = moeflux::simulate_cache(t, "belady", slots);
  for (size_t l = 0; l < d.hits.size(); l++)
    if (d.hits[l] > d.requests[l] || o.hits[l] > o.requests[l]) std::abort();
  return 0;
}
