// Hugging Face config.json (+ generation_config.json) -> ModelSpec.
#pragma once

#include <string>

#include "format/spec.h"

namespace moeflux {

struct HfConfig {
  ModelSpec spec;
  std::string model_type;    // as written in config.json
  bool norm_one_plus = false;  // RMSNorm weights are stored zero-centred: scale = 1 + w
  bool nested_text_config = false;  // multimodal wrapper with text_config
  std::string source_dtype;  // "bfloat16", ... (informational)
};

// Reads <dir>/config.json and, when present, <dir>/generation_config.json (for EOS ids).
// Throws Error naming config.json and the field for anything missing, malformed or unsupported.
HfConfig read_hf_config(const std::string& dir);

}  // namespace moeflux
