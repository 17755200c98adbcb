// RoPE frequencies and attention scales as Hugging Face computes them from a config
// (transformers 5.17 modeling_rope_utils.py: _compute_default_rope_parameters,
// _compute_yarn_parameters; DeepSeek-V3's attention scale). Host-side; the session uploads
// the table once and the rope_freq op reads it.
#pragma once

#include <vector>

#include "format/spec.h"

namespace moeflux {

// HF's yarn_get_mscale: 1 for scale <= 1, else 0.1 * mscale * ln(scale) + 1.
double yarn_get_mscale(double scale, double mscale);

// The rotary inverse frequencies [rope_dim / 2] in f32, as HF computes them in float32:
// default: 1 / theta^(2i/d); YaRN: the interpolated and extrapolated frequencies blended by
// the linear ramp between the correction dims of beta_fast and beta_slow (floored/ceiled when
// truncate).
std::vector<float> rope_inv_freq(const ModelSpec& spec);

// What HF multiplies cos and sin by (its attention_scaling): 1 for the default rope; for YaRN
// attention_factor if given, else get_mscale(factor, mscale) / get_mscale(factor,
// mscale_all_dim) when both are set, else get_mscale(factor, 1).
double rope_cos_sin_scale(const ModelSpec& spec);

// The softmax scale of attention: 1/sqrt(head_dim), times get_mscale(factor,
// mscale_all_dim)^2 for MLA with YaRN and mscale_all_dim set (DeepseekV3Attention.scaling).
double attention_scale(const ModelSpec& spec);

}  // namespace moeflux
