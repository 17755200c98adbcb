// FNV-1a 64: the checksum of snapshots and routing traces (fast, not cryptographic).
#pragma once

#include <cstddef>
#include <cstdint>

namespace moeflux {

// FNV-1a 64 of n bytes, continuing from `h`.
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace moeflux
