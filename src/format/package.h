// The moeflux package (DESIGN.md §2): moeflux.json + resident.bin + experts/layer-NNN.bin.
//
// resident.bin holds every non-expert tensor, each 4 KiB aligned. Each MoE layer has one
// expert file; expert e occupies [e*stride, e*stride + expert_bytes) with stride a multiple of
// 4 KiB, and inside it the parts gate, up, down (64-byte aligned), so one read fetches a
// whole expert.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "format/dtype.h"
#include "format/quant.h"
#include "format/spec.h"

namespace moeflux {

constexpr int kPackageFormatVersion = 1;
constexpr uint64_t kFileAlign = 4096;  // resident tensors and expert records
constexpr uint64_t kPartAlign = 64;    // parts inside an expert record

struct PackedTensor {
  std::string name;
  uint64_t offset = 0;  // in resident.bin, or inside the expert record for expert parts
  uint64_t nbytes = 0;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int group = 0;  // quantised dtypes: group size (format/quant.h); 0 otherwise

  int64_t numel() const;
  // Bytes the tensor's dtype and shape imply (for quantised dtypes: packed + scales + biases).
  uint64_t expected_bytes() const;
};

struct ExpertLayout {
  int count = 0;        // experts per MoE layer
  uint64_t bytes = 0;   // used bytes of one expert record
  uint64_t stride = 0;  // record stride in the layer file (multiple of kFileAlign)
  std::vector<PackedTensor> parts;  // gate, up, down
  std::vector<int> layers;          // model layer index of each expert file
};

// The expert layout of a model with these parts (gate, up, down; dtype, shape, nbytes set):
// the parts placed at kPartAlign offsets in one record, records kFileAlign apart, one file
// per MoE layer of `spec`.
ExpertLayout make_expert_layout(const ModelSpec& spec, std::vector<PackedTensor> parts);

struct Manifest {
  int format_version = kPackageFormatVersion;
  ModelSpec spec;
  std::vector<PackedTensor> resident;
  uint64_t resident_bytes = 0;  // size of resident.bin
  ExpertLayout experts;
  std::vector<std::string> tokenizer_files;
  nlohmann::json provenance = nlohmann::json::object();

  const PackedTensor* find(const std::string& name) const;
  nlohmann::json to_json() const;
};

std::string manifest_path(const std::string& dir);
std::string resident_path(const std::string& dir);
std::string expert_file_path(const std::string& dir, int layer);  // experts/layer-NNN.bin

// Parses and validates moeflux.json: every field present and typed, offsets inside the files,
// dtype x shape = bytes, alignment, no overlaps, and the files' sizes on disk.
Manifest read_manifest(const std::string& dir);
void write_manifest(const std::string& dir, const Manifest& m);

}  // namespace moeflux
