// Sampler: logits -> next token id.
//
// The chain, in llama.cpp's default order (common/sampling: penalties, top_k, top_p, min_p,
// temperature, then a draw):
//   1. logit_bias: added to the named tokens' logits.
//   2. penalties, over the last `penalty_last_n` accepted tokens (prompt and generated; -1: all):
//      for a token seen c > 0 times, a positive logit is divided by repeat_penalty and a negative
//      one multiplied by it (llama.cpp / CTRL), then c·frequency_penalty + presence_penalty is
//      subtracted (OpenAI's formula, applied over the same window as llama.cpp does).
//   3. temperature <= 0: greedy — the first maximum of the penalised logits. Otherwise:
//   4. top_k (k > 0): keep the k largest logits (ties: lower id first), exactly k.
//   5. top_p (p < 1): softmax of the survivors at temperature 1; keep the smallest prefix, in
//      descending probability, whose mass is >= p.
//   6. min_p (> 0): keep tokens whose probability (temperature 1) is >= min_p · the largest.
//   7. temperature: survivors' logits / temperature, softmax, one draw.
// Truncation therefore looks at the untempered distribution (as llama.cpp's default chain), and
// temperature only reshapes what survived.
//
// Determinism: the draw uses std::mt19937_64 (its output sequence is fixed by the C++ standard)
// seeded with `seed`, one 64-bit output per draw turned into u = (x >> 11) · 2^-53 in [0, 1);
// the token is the first survivor, in descending-probability order (ties: lower id), at which
// the running sum of probabilities exceeds u · total. Sums are in double. So a seed gives the
// same tokens on every platform for the same logits.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace moeflux {

struct SamplerParams {
  float temperature = 0.8f;        // <= 0: greedy
  int top_k = 40;                  // <= 0: off
  float top_p = 0.95f;             // >= 1: off
  float min_p = 0.05f;             // <= 0: off
  float repeat_penalty = 1.0f;     // 1: off
  float presence_penalty = 0.0f;   // 0: off
  float frequency_penalty = 0.0f;  // 0: off
  int penalty_last_n = 64;         // window of the penalties; -1: every accepted token
  uint64_t seed = 0;
  std::vector<std::pair<int32_t, float>> logit_bias;  // (token, added to its logit)

  // Throws Error(kInvalidArgument) naming the field of an out-of-range value.
  void validate() const;
};

// A surviving token with its probability (normalised over the survivors).
struct TokenProb {
  int32_t id;
  float logit;  // after bias, penalties and temperature
  double p;
};

class Sampler {
 public:
  Sampler(const SamplerParams& params, int vocab_size);

  // Picks the next token from logits [vocab_size]; does not record it (see accept).
  int32_t sample(const float* logits);
  // Records a token of the sequence (prompt or generated) for the penalties.
  void accept(int32_t token);
  // Forgets the accepted tokens; the random stream goes on.
  void clear_history();

  // The distribution the draw is made from: survivors in descending probability (ties: lower
  // id) with probabilities summing to 1. Greedy: the one chosen token with p = 1. Consumes no
  // randomness.
  std::vector<TokenProb> distribution(const float* logits);

  const SamplerParams& params() const { return params_; }
  int vocab_size() const { return vocab_; }

 private:
  void apply_bias_and_penalties(const float* logits);  // -> work_
  void truncate();                                     // work_ -> cand_ (steps 4-6)
  double uniform();

  SamplerParams params_;
  int vocab_;
  std::mt19937_64 rng_;
  std::vector<int32_t> history_;  // accepted tokens, the last penalty_last_n (or all)
  size_t history_head_ = 0;       // ring position when the window is full
  std::vector<float> work_;       // [vocab] penalised logits
  std::vector<int32_t> cand_;     // survivors, sorted
  std::vector<int32_t> counts_;   // [vocab] scratch for the penalties
};

// The first index of the largest value (argmax as torch and eval --greedy do).
int32_t argmax_first(const float* v, int n);

}  // namespace moeflux
