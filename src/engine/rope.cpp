#include "engine/rope.h"

#include <algorithm>
#include <cmath>

namespace moeflux {

double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

std::vector<float> rope_inv_freq(const ModelSpec& s) {
  const int dim = s.rope_dim, half = dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  // pos_freqs = base ** (arange(0, dim, 2).float() / dim), in float32
  std::vector<float> pos(static_cast<size_t>(half));
  for (int i = 0; i < half; i++)
    pos[size_t(i)] = std::pow(float(s.rope_theta), float(2 * i) / float(dim));
  if (s.rope_scaling.kind != RopeScaling::kYarn) {
    for (int i = 0; i < half; i++) inv[size_t(i)] = 1.0f / pos[size_t(i)];
    return inv;
  }
  const RopeScaling& r = s.rope_scaling;
  const double base = s.rope_theta, factor = r.factor;
  // find_correction_dim / find_correction_range (python floats, i.e. double)
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(double(r.orig_ctx) / (rotations * 2 * M_PI))) / (2 * std::log(base));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // linear_ramp_factor: prevent a singularity
  for (int i = 0; i < half; i++) {
    const float extrapolation = 1.0f / pos[size_t(i)];
    const float interpolation = 1.0f / (float(factor) * pos[size_t(i)]);
    // ramp = clamp((arange(dim // 2) - low) / (high - low), 0, 1) in float32, high - low a python
    // float (double) rounded once (it matters when truncate is false: gpt-oss)
    const float ramp = std::clamp((float(i) - float(low)) / float(high - low), 0.0f, 1.0f);
    const float extra_factor = 1.0f - ramp;
    inv[size_t(i)] = interpolation * (1.0f - extra_factor) + extrapolation * extra_factor;
  }
  return inv;
}

double rope_cos_sin_scale(const ModelSpec& s) {
  if (s.rope_scaling.kind != RopeScaling::kYarn) return 1.0;
  const RopeScaling& r = s.rope_scaling;
  if (r.attention_factor > 0) return r.attention_factor;
  if (r.mscale != 0 && r.mscale_all_dim != 0)
    return yarn_get_mscale(r.factor, r.mscale) / yarn_get_mscale(r.factor, r.mscale_all_dim);
  return yarn_get_mscale(r.factor, 1.0);
}

double attention_scale(const ModelSpec& s) {
  double scale = 1.0 / std::sqrt(double(s.head_dim));
  const bool mla = std::find(s.attn.begin(), s.attn.end(), AttnKind::kMla) != s.attn.end();
  if (mla && s.rope_scaling.kind == RopeScaling::kYarn && s.rope_scaling.mscale_all_dim != 0) {
    const double m = yarn_get_mscale(s.rope_scaling.factor, s.rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

}  // namespace moeflux
