// A routing trace: which experts each MoE layer chose for each token, in evaluation order, as
// `moeflux routing --trace` records it and `moeflux cache-sim` replays it.
//
// File format (little-endian; "varint" = LEB128, 7 bits a byte, low first):
//   "MFTRACE\0"                      8-byte magic
//   varint version                   1
//   varint n, n bytes                model name (the package's directory name; informative)
//   varint n_moe_layers, n_experts, k
//   varint x n_moe_layers            the model layer index of each MoE layer
//   varint n_records
//   per record (one layer's routing of one evaluation, T tokens):
//     byte phase                     0 = decode (one token), 1 = prompt (a micro-batch)
//     varint moe_index, varint T
//     T*k expert ids, each in bits(n_experts - 1) bits, LSB first, padded to a whole byte
//   u64 FNV-1a 64 of every byte before it
// No compression: there is no compression library among the dependencies, and bit-packing
// already stores a top-8-of-256 token-layer in 8 bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeflux {

struct TraceRecord {
  enum Phase : uint8_t { kDecode = 0, kPrompt = 1 };
  Phase phase = kDecode;
  int moe_index = 0;
  int tokens = 0;            // T
  std::vector<int> experts;  // [T, k], each token's experts as routed (best first)
};

struct RoutingTrace {
  std::string model;
  int n_moe_layers = 0, n_experts = 0, k = 0;
  std::vector<int> layers;  // model layer index of each MoE layer
  std::vector<TraceRecord> records;

  // Throws Error (kIo) naming the file.
  void save(const std::string& path) const;
  // Validates everything; a malformed file is an Error (kFormat) naming the file and the byte
  // offset where it went wrong.
  static RoutingTrace load(const std::string& path);
  std::vector<uint8_t> encode() const;
  static RoutingTrace decode(const std::vector<uint8_t>& bytes, const std::string& name);
};

}  // namespace moeflux
