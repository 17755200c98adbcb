#include "text/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.h"

namespace moeflux {

void SamplerParams::validate() const {
  auto finite = [](float v) { return std::isfinite(v); };
  if (!finite(temperature))
    fail(ErrorKind::kInvalidArgument, "temperature: {} is not a number", temperature);
  if (!finite(top_p) || top_p <= 0.0f)
    fail(ErrorKind::kInvalidArgument, "top_p: {} is not in (0, 1] (1: off)", top_p);
  if (!finite(min_p) || min_p < 0.0f || min_p > 1.0f)
    fail(ErrorKind::kInvalidArgument, "min_p: {} is not in [0, 1] (0: off)", min_p);
  if (!finite(repeat_penalty) || repeat_penalty <= 0.0f)
    fail(ErrorKind::kInvalidArgument, "repeat_penalty: {} is not positive (1: off)",
         repeat_penalty);
  if (!finite(presence_penalty))
    fail(ErrorKind::kInvalidArgument, "presence_penalty: {} is not a number", presence_penalty);
  if (!finite(frequency_penalty))
    fail(ErrorKind::kInvalidArgument, "frequency_penalty: {} is not a number", frequency_penalty);
  if (penalty_last_n < -1)
    fail(ErrorKind::kInvalidArgument, "penalty_last_n: {} is below -1 (-1: all tokens)",
         penalty_last_n);
}

int32_t argmax_first(const float* v, int n) {
  return int32_t(std::max_element(v, v + n) - v);
}

Sampler::Sampler(const SamplerParams& params, int vocab_size)
    : params_(params), vocab_(vocab_size), rng_(params.seed) {
  params_.validate();
  if (vocab_size <= 0) fail(ErrorKind::kInvalidArgument, "sampler: vocabulary size {}", vocab_size);
  for (auto& [id, bias] : params_.logit_bias)
    if (id < 0 || id >= vocab_)
      fail(ErrorKind::kInvalidArgument, "logit_bias: token {} is not in [0, {})", id, vocab_);
  work_.resize(size_t(vocab_));
  counts_.assign(size_t(vocab_), 0);
}

void Sampler::accept(int32_t token) {
  const int n = params_.penalty_last_n;
  if (n == 0) return;
  if (n < 0 || int(history_.size()) < n) {
    history_.push_back(token);
  } else {
    history_[history_head_] = token;
    history_head_ = (history_head_ + 1) % size_t(n);
  }
}

void Sampler::clear_history() {
  history_.clear();
  history_head_ = 0;
}

double Sampler::uniform() {
  return double(rng_() >> 11) * 0x1.0p-53;
}

void Sampler::apply_bias_and_penalties(const float* logits) {
  // NaN would break the sort's ordering; it can never be the choice.
  for (int i = 0; i < vocab_; i++) work_[size_t(i)] = std::isnan(logits[i]) ? -INFINITY : logits[i];
  for (auto& [id, bias] : params_.logit_bias) work_[size_t(id)] += bias;
  const SamplerParams& p = params_;
  if (p.repeat_penalty == 1.0f && p.presence_penalty == 0.0f && p.frequency_penalty == 0.0f) return;
  for (int32_t t : history_)
    if (t >= 0 && t < vocab_) counts_[size_t(t)]++;
  for (int32_t t : history_) {
    if (t < 0 || t >= vocab_) continue;
    const int32_t c = counts_[size_t(t)];
    if (c == 0) continue;  // already done (a repeated token)
    float& l = work_[size_t(t)];
    l = l > 0.0f ? l / p.repeat_penalty : l * p.repeat_penalty;
    l -= float(c) * p.frequency_penalty + p.presence_penalty;
    counts_[size_t(t)] = 0;
  }
}

void Sampler::truncate() {
  const float* w = work_.data();
  // Descending logit, lower id first on ties: a total order, so the result never depends on
  // the sort algorithm.
  auto before = [w](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };
  cand_.resize(size_t(vocab_));
  std::iota(cand_.begin(), cand_.end(), 0);
  size_t n = cand_.size();
  size_t sorted = 0;  // cand_[0, sorted) is in final order
  const SamplerParams& p = params_;
  if (p.top_k > 0 && size_t(p.top_k) < n) {
    std::nth_element(cand_.begin(), cand_.begin() + p.top_k, cand_.end(), before);
    n = size_t(p.top_k);
    cand_.resize(n);
    std::sort(cand_.begin(), cand_.end(), before);
    sorted = n;
  }
  // Probabilities at temperature 1 over the survivors: exp(l - max) / z.
  const float lmax = w[*std::min_element(cand_.begin(), cand_.end(), before)];
  if (p.top_p < 1.0f) {
    double z = 0;
    for (int32_t id : cand_) z += std::exp(double(w[id]) - lmax);
    // Sort a growing prefix until it holds mass p: the whole vocabulary is rarely needed.
    const double want = double(p.top_p) * z;
    size_t m = std::min<size_t>(n, 256), keep = n;
    for (;;) {
      if (sorted < m) {
        std::partial_sort(cand_.begin() + sorted, cand_.begin() + m, cand_.end(), before);
        sorted = m;
      }
      double cum = 0;
      size_t i = 0;
      for (; i < m; i++) {
        cum += std::exp(double(w[cand_[i]]) - lmax);
        if (cum >= want) break;
      }
      if (i < m) {
        keep = i + 1;
        break;
      }
      if (m == n) break;  // rounding: everything is kept
      m = std::min(n, m * 8);
    }
    n = keep;
    cand_.resize(n);
  }
  if (p.min_p > 0.0f) {
    // p_i >= min_p · p_max  <=>  exp(l_i - l_max) >= min_p; the maximum always stays.
    const double min_p = p.min_p;
    auto drop = [&](int32_t id) { return std::exp(double(w[id]) - lmax) < min_p; };
    cand_.erase(std::remove_if(cand_.begin(), cand_.end(), drop), cand_.end());
    n = cand_.size();
    sorted = std::min(sorted, n);  // remove_if keeps the order of what stays
  }
  if (sorted < n) std::sort(cand_.begin() + sorted, cand_.end(), before);
}

std::vector<TokenProb> Sampler::distribution(const float* logits) {
  apply_bias_and_penalties(logits);
  if (params_.temperature <= 0.0f) {
    const int32_t id = argmax_first(work_.data(), vocab_);
    return {TokenProb{id, work_[size_t(id)], 1.0}};
  }
  truncate();
  std::vector<TokenProb> out;
  out.reserve(cand_.size());
  const double t = params_.temperature;
  const double lmax = double(work_[size_t(cand_.front())]) / t;
  double z = 0;
  for (int32_t id : cand_) {
    const double l = double(work_[size_t(id)]) / t;
    const double e = std::exp(l - lmax);
    out.push_back(TokenProb{id, float(l), e});
    z += e;
  }
  for (auto& tp : out) tp.p /= z;
  return out;
}

int32_t Sampler::sample(const float* logits) {
  apply_bias_and_penalties(logits);
  if (params_.temperature <= 0.0f) return argmax_first(work_.data(), vocab_);
  truncate();
  const double t = params_.temperature;
  const double lmax = double(work_[size_t(cand_.front())]) / t;
  // Unnormalised weights; the draw scales u by their sum instead of dividing each.
  double z = 0;
  for (int32_t id : cand_) z += std::exp(double(work_[size_t(id)]) / t - lmax);
  const double target = uniform() * z;
  double cum = 0;
  for (int32_t id : cand_) {
    cum += std::exp(double(work_[size_t(id)]) / t - lmax);
    if (cum > target) return id;
  }
  return cand_.back();  // u·z rounded up to the sum
}

}  // namespace moeflux
