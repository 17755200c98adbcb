// Sampler (text/sampler.h): each step of the chain on distributions whose answer is known by
// hand, the draw against the expected distribution (chi-square, seeds fixed so the test is
// deterministic), the documented RNG, and seeds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "text/sampler.h"
#include "util/error.h"

namespace moeflux {
namespace {

// Logits whose softmax is `probs`.
std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(float(std::log(p)));
  return l;
}

SamplerParams plain(float temperature = 1.0f) {
  SamplerParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  return p;
}

std::vector<int32_t> ids_of(const std::vector<TokenProb>& d) {
  std::vector<int32_t> out;
  for (auto& t : d) out.push_back(t.id);
  return out;
}

// Softmax of logits/temperature over `keep`, the expected distribution after truncation.
std::map<int32_t, double> expected(const std::vector<float>& logits, const std::vector<int>& keep,
                                   double temperature) {
  std::map<int32_t, double> out;
  double z = 0;
  for (int id : keep) z += std::exp(double(logits[size_t(id)]) / temperature);
  for (int id : keep) out[id] = std::exp(double(logits[size_t(id)]) / temperature) / z;
  return out;
}

// Draws n tokens and returns the chi-square statistic against `want` (every draw must be a key).
double chi_square(Sampler& s, const std::vector<float>& logits,
                  const std::map<int32_t, double>& want, int n) {
  std::map<int32_t, int> counts;
  for (int i = 0; i < n; i++) {
    int32_t t = s.sample(logits.data());
    EXPECT_TRUE(want.count(t)) << "token " << t << " should have been cut";
    counts[t]++;
  }
  double chi = 0;
  for (auto& [id, p] : want) {
    const double e = p * n;
    const double d = counts[id] - e;
    chi += d * d / e;
  }
  return chi;
}

TEST(Sampler, TemperatureZeroIsArgmaxFirstOnTies) {
  std::vector<float> l = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f};
  SamplerParams p;  // the CLI defaults, top-k/top-p/min-p on: greedy ignores them
  p.temperature = 0.0f;
  Sampler s(p, 5);
  for (int i = 0; i < 10; i++) EXPECT_EQ(s.sample(l.data()), 1);
  auto d = s.distribution(l.data());
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 1);
  EXPECT_EQ(d[0].p, 1.0);
  EXPECT_EQ(argmax_first(l.data(), 5), 1);
}

TEST(Sampler, TopKKeepsExactlyKLowerIdOnTies) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 2.0f);  // only the values' order matters below
  std::vector<float> l(1000);
  for (auto& v : l) v = nd(rng);
  for (int k : {1, 2, 10, 999, 1000, 5000}) {
    SamplerParams p = plain();
    p.top_k = k;
    Sampler s(p, 1000);
    auto d = s.distribution(l.data());
    ASSERT_EQ(int(d.size()), std::min(k, 1000)) << k;
    std::vector<int> order(1000);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
    order.resize(d.size());
    EXPECT_EQ(ids_of(d), std::vector<int32_t>(order.begin(), order.end())) << k;
    double sum = 0;
    for (auto& t : d) sum += t.p;
    EXPECT_NEAR(sum, 1.0, 1e-12);
  }
  // All equal: the k lowest ids.
  std::vector<float> flat(50, 0.5f);
  SamplerParams p = plain();
  p.top_k = 3;
  Sampler s(p, 50);
  EXPECT_EQ(ids_of(s.distribution(flat.data())), (std::vector<int32_t>{0, 1, 2}));
}

TEST(Sampler, TopPKeepsTheSmallestPrefixWithMassP) {
  // Shuffled ids so that order comes from the probabilities, not the ids.
  const std::vector<double> probs = {0.1, 0.4, 0.05, 0.3, 0.15};  // sorted: 1, 3, 4, 0, 2
  const auto l = logits_of(probs);
  struct Case {
    float p;
    std::vector<int32_t> ids;
  };
  for (const Case& c : std::vector<Case>{{0.35f, {1}},
                                         {0.45f, {1, 3}},
                                         {0.69f, {1, 3}},
                                         {0.72f, {1, 3, 4}},
                                         {0.9f, {1, 3, 4, 0}},
                                         {0.97f, {1, 3, 4, 0, 2}},
                                         {1.0f, {1, 3, 4, 0, 2}}}) {
    SamplerParams p = plain();
    p.top_p = c.p;
    Sampler s(p, 5);
    auto d = s.distribution(l.data());
    EXPECT_EQ(ids_of(d), c.ids) << c.p;
    double kept = 0;
    for (int32_t id : c.ids) kept += probs[size_t(id)];
    for (auto& t : d) EXPECT_NEAR(t.p, probs[size_t(t.id)] / kept, 1e-6);
  }
}

TEST(Sampler, TopPOnALargeFlatVocabularyMatchesBruteForce) {
  // The prefix holding mass p is thousands of tokens long: the growing partial sort must get
  // the same set as sorting everything.
  const int V = 50000;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<float> l(V);
  for (auto& v : l) v = ud(rng);
  for (float top_p : {0.1f, 0.5f, 0.95f}) {
    SamplerParams p = plain();
    p.top_p = top_p;
    Sampler s(p, V);
    auto d = s.distribution(l.data());
    std::vector<int> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    double z = 0, cum = 0;
    const float mx = l[size_t(order[0])];
    for (float v : l) z += std::exp(double(v) - mx);
    size_t keep = 0;
    while (keep < order.size()) {
      cum += std::exp(double(l[size_t(order[keep++])]) - mx);
      if (cum >= double(top_p) * z) break;
    }
    ASSERT_EQ(d.size(), keep) << top_p;
    EXPECT_GT(keep, 256u);  // past the first partial sort
    for (size_t i = 0; i < keep; i++) ASSERT_EQ(d[i].id, order[i]) << top_p << " " << i;
  }
}

TEST(Sampler, MinPKeepsTokensAboveAShareOfTheMax) {
  const std::vector<double> probs = {0.25, 0.5, 0.1, 0.15};
  const auto l = logits_of(probs);
  struct Case {
    float min_p;
    std::vector<int32_t> ids;
  };
  for (const Case& c : std::vector<Case>{{0.0f, {1, 0, 3, 2}},
                                         {0.1f, {1, 0, 3, 2}},
                                         {0.25f, {1, 0, 3}},  // 0.125: drops 0.1
                                         {0.4f, {1, 0}},      // 0.2
                                         {0.6f, {1}},         // 0.3
                                         {1.0f, {1}}}) {
    SamplerParams p = plain();
    p.min_p = c.min_p;
    Sampler s(p, 4);
    EXPECT_EQ(ids_of(s.distribution(l.data())), c.ids) << c.min_p;
  }
}

TEST(Sampler, ChainOrderTopKThenTopPThenMinPThenTemperature) {
  // probs sorted: 0.3 (id 2), 0.25 (0), 0.2 (4), 0.15 (1), 0.1 (3)
  const auto l = logits_of({0.25, 0.15, 0.3, 0.1, 0.2});
  SamplerParams p = plain(0.5f);
  p.top_k = 4;     // drops id 3; renormalised: 0.3/0.9 = .333, .278, .222, .167
  p.top_p = 0.6f;  // .333 + .278 = .611 >= .6: ids 2, 0
  p.min_p = 0.5f;  // 0.5 · .333 = .167: both stay
  Sampler s(p, 5);
  auto d = s.distribution(l.data());
  ASSERT_EQ(ids_of(d), (std::vector<int32_t>{2, 0}));
  // Temperature 0.5 last: p ∝ prob^2.
  const double a = 0.3 * 0.3, b = 0.25 * 0.25;
  EXPECT_NEAR(d[0].p, a / (a + b), 1e-6);
  EXPECT_NEAR(d[1].p, b / (a + b), 1e-6);
  // min_p looks at the untempered distribution: 0.9 · .333 = .3 drops id 0 whatever the
  // temperature.
  p.min_p = 0.9f;
  Sampler s2(p, 5);
  EXPECT_EQ(ids_of(s2.distribution(l.data())), (std::vector<int32_t>{2}));
}

TEST(Sampler, PenaltiesChangeExactlyTheRecentTokens) {
  const std::vector<float> l = {2.0f, -2.0f, 1.0f, 0.5f, 3.0f, -1.0f};
  SamplerParams p = plain();
  p.repeat_penalty = 2.0f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.penalty_last_n = -1;
  auto logits_after = [&](const SamplerParams& sp, const std::vector<int32_t>& history) {
    Sampler s(sp, 6);
    for (int32_t t : history) s.accept(t);
    std::map<int32_t, float> out;
    for (auto& t : s.distribution(l.data())) out[t.id] = t.logit;
    return out;
  };
  auto got = logits_after(p, {0, 1, 0, 3});
  EXPECT_FLOAT_EQ(got[0], 2.0f / 2 - 2 * 0.25f - 0.5f);  // seen twice, positive: divided
  EXPECT_FLOAT_EQ(got[1], -2.0f * 2 - 0.25f - 0.5f);     // negative: multiplied
  EXPECT_FLOAT_EQ(got[2], 1.0f);                         // not seen: unchanged
  EXPECT_FLOAT_EQ(got[3], 0.5f / 2 - 0.25f - 0.5f);
  EXPECT_FLOAT_EQ(got[4], 3.0f);
  EXPECT_FLOAT_EQ(got[5], -1.0f);
  // A window of the last 2 tokens (0, 3): token 1 is out of it, 0 counts once.
  p.penalty_last_n = 2;
  got = logits_after(p, {0, 1, 0, 3});
  EXPECT_FLOAT_EQ(got[0], 2.0f / 2 - 0.25f - 0.5f);
  EXPECT_FLOAT_EQ(got[1], -2.0f);
  EXPECT_FLOAT_EQ(got[3], 0.5f / 2 - 0.25f - 0.5f);
  // penalty_last_n = 0: off.
  p.penalty_last_n = 0;
  got = logits_after(p, {0, 1, 0, 3});
  for (int i = 0; i < 6; i++) EXPECT_FLOAT_EQ(got[i], l[size_t(i)]);
  // Only the repetition penalty, and clear_history forgets.
  SamplerParams r = plain();
  r.repeat_penalty = 1.5f;
  Sampler s(r, 6);
  s.accept(4);
  EXPECT_FLOAT_EQ(s.distribution(l.data())[0].logit, 2.0f);  // 3/1.5 = 2 ties id 0; 0 first
  s.clear_history();
  EXPECT_EQ(s.distribution(l.data())[0].id, 4);
  // Greedy sees the penalties too.
  SamplerParams g = plain(0.0f);
  g.repeat_penalty = 4.0f;
  Sampler gs(g, 6);
  gs.accept(4);
  EXPECT_EQ(gs.sample(l.data()), 0);
}

TEST(Sampler, LogitBias) {
  const std::vector<float> l = {1.0f, 2.0f, 3.0f};
  SamplerParams p = plain(0.0f);
  p.logit_bias = {{0, 5.0f}, {2, -INFINITY}};
  Sampler s(p, 3);
  EXPECT_EQ(s.sample(l.data()), 0);
  p.temperature = 1.0f;
  Sampler s2(p, 3);
  for (auto& t : s2.distribution(l.data())) {
    if (t.id == 2) {
      EXPECT_EQ(t.p, 0.0);
    }
  }
  for (int i = 0; i < 1000; i++) EXPECT_NE(s2.sample(l.data()), 2);
}

TEST(Sampler, EmpiricalFrequenciesMatchTheTruncatedDistribution) {
  // chi-square critical values at p = 0.001; the seeds are fixed, so this either always
  // passes or always fails.
  const std::map<int, double> crit = {{1, 10.83}, {2, 13.82}, {3, 16.27}, {4, 18.47},
                                      {5, 20.52}, {6, 22.46}, {7, 24.32}};
  const auto l = logits_of({0.02, 0.3, 0.05, 0.2, 0.1, 0.15, 0.08, 0.1});
  const int n = 200000;
  struct Case {
    const char* name;
    std::function<void(SamplerParams&)> set;
    std::vector<int> keep;  // the survivors, worked out by hand
    double temperature;
  };
  std::vector<Case> cases = {
      {"plain", [](SamplerParams&) {}, {0, 1, 2, 3, 4, 5, 6, 7}, 1.0},
      {"temperature 0.7", [](SamplerParams&) {}, {0, 1, 2, 3, 4, 5, 6, 7}, 0.7},
      {"top-k 3", [](SamplerParams& p) { p.top_k = 3; }, {1, 3, 5}, 1.0},
      // sorted: .3 .2 .15 .1(4) .1(7) .08 .05 .02; .75 reached at the fourth
      {"top-p 0.7", [](SamplerParams& p) { p.top_p = 0.7f; }, {1, 3, 5, 4}, 1.0},
      {"min-p 0.3", [](SamplerParams& p) { p.min_p = 0.3f; }, {1, 3, 5, 4, 7}, 1.0},
      {"top-k 5, top-p 0.8, temperature 1.5",
       [](SamplerParams& p) {
         p.top_k = 5;
         p.top_p = 0.8f;
       },  // /.85: .353 .588 .765 .882
       {1, 3, 5, 4},
       1.5},
  };
  uint64_t seed = 1000;
  for (const Case& c : cases) {
    SamplerParams p = plain(float(c.temperature));
    c.set(p);
    p.seed = seed++;
    Sampler s(p, int(l.size()));
    auto want = expected(l, c.keep, c.temperature);
    // The distribution the sampler reports is the expected one...
    auto d = s.distribution(l.data());
    ASSERT_EQ(d.size(), c.keep.size()) << c.name;
    for (auto& t : d) EXPECT_NEAR(t.p, want[t.id], 1e-6) << c.name << " token " << t.id;
    // ... and the draws follow it.
    const double chi = chi_square(s, l, want, n);
    EXPECT_LT(chi, crit.at(int(c.keep.size()) - 1)) << c.name;
  }
}

TEST(Sampler, DrawIsTheDocumentedMt19937_64Mapping) {
  // Uniform over 4 tokens: the draw is token floor(u·4) with u = (x >> 11)·2^-53, x the next
  // mt19937_64 output.
  const std::vector<float> l(4, 0.0f);
  SamplerParams p = plain();
  p.seed = 42;
  Sampler s(p, 4);
  std::mt19937_64 ref(42);
  for (int i = 0; i < 1000; i++) {
    const double u = double(ref() >> 11) * 0x1.0p-53;
    ASSERT_EQ(s.sample(l.data()), int32_t(u * 4)) << i;
  }
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferent) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> l(1000);
  for (auto& v : l) v = nd(rng);
  auto draw = [&](uint64_t seed) {
    SamplerParams p;  // CLI defaults
    p.temperature = 1.0f;
    p.top_k = 100;
    p.top_p = 0.99f;
    p.min_p = 0.0f;
    p.seed = seed;
    Sampler s(p, 1000);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; i++) {
      out.push_back(s.sample(l.data()));
      s.accept(out.back());
    }
    return out;
  };
  EXPECT_EQ(draw(5), draw(5));
  EXPECT_NE(draw(5), draw(6));
}

TEST(Sampler, BadParamsNameTheField) {
  auto msg = [](const SamplerParams& p, int vocab = 10) {
    try {
      Sampler s(p, vocab);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  SamplerParams p;
  p.top_p = 0.0f;
  EXPECT_NE(msg(p).find("top_p"), std::string::npos);
  p = {};
  p.min_p = 2.0f;
  EXPECT_NE(msg(p).find("min_p"), std::string::npos);
  p = {};
  p.repeat_penalty = 0.0f;
  EXPECT_NE(msg(p).find("repeat_penalty"), std::string::npos);
  p = {};
  p.temperature = NAN;
  EXPECT_NE(msg(p).find("temperature"), std::string::npos);
  p = {};
  p.logit_bias = {{10, 1.0f}};
  EXPECT_NE(msg(p).find("logit_bias"), std::string::npos);
}

TEST(Sampler, NanLogitsAreNeverChosen) {
  std::vector<float> l = {NAN, 1.0f, NAN, 0.5f};
  SamplerParams p = plain();
  Sampler s(p, 4);
  for (int i = 0; i < 200; i++) {
    int32_t t = s.sample(l.data());
    EXPECT_TRUE(t == 1 || t == 3);
  }
}

}  // namespace
}  // namespace moeflux
