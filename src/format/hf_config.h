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
  // DeepSeek-V3 rope_interleave (the HF default): each head's rope dims are rotated in
  // interleaved pairs; the converter permutes those rows into rotate-half order.
  bool rope_interleave = false;
  // quantization_config {quant_method: fp8, weight_block_size}: e4m3 weights with an f32
  // weight_scale_inv per block of fp8_block[0] rows x fp8_block[1] columns (DeepSeek-V3).
  bool fp8 = false;
  int fp8_block[2] = {128, 128};
  // quantization_config {quant_method: mxfp4} (gpt-oss): the experts are stored as
  // <base>_blocks (e2m1 nibbles) and <base>_scales (e8m0 per 32), imported as they are.
  bool mxfp4 = false;
};

// Reads <dir>/config.json and, when present, <dir>/generation_config.json (for EOS ids).
// Throws Error naming config.json and the field for anything missing, malformed or unsupported.
HfConfig read_hf_config(const std::string& dir);

}  // namespace moeflux
