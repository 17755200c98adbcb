// HF checkpoint directory -> moeflux package. Every checkpoint quirk is resolved here, so the
// runtime reads one normalised form (see format/package.h for the layout and README for names).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "format/dtype.h"

namespace moeflux {

struct ConvertOptions {
  std::optional<DType> dtype;  // matrices; default: the checkpoint's own float dtype
  bool progress = true;
};

struct ConvertReport {
  std::vector<std::string> notes;  // skipped tensors, ties, ... (one line each)
  uint64_t resident_bytes = 0;
  uint64_t expert_bytes = 0;  // all layers, all experts (used bytes, not padding)
};

ConvertReport convert_checkpoint(const std::string& hf_dir, const std::string& out_dir,
                                 const ConvertOptions& opt);

}  // namespace moeflux
