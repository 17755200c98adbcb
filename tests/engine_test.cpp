// Forward-pass properties that do not need the reference: prefill + decode equals one pass,
// thread count and repetition do not change a bit, and clear() forgets everything.
#include <cstring>

#include "test_util.h"

namespace moeflux::test {
namespace {

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Context> be;
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<Session> session;
  explicit Loaded(const std::string& fixture, int threads = 2) {
    model = Model::load(converted_fixture(fixture));
    be = make_cpu_context(threads);
    store = std::make_unique<ExpertStore>(*model);
    session = std::make_unique<Session>(*model, *be, *store);
  }
  int vocab() const { return model->spec().vocab_size; }
};

std::vector<int32_t> chunk_tokens(const std::string& fixture) {
  SafetensorsFile ref(fixture_dir(fixture) + "/reference.safetensors");
  return read_i32(ref, "tokens_chunk");
}

// Logits for every position from a prefill of the first k tokens followed by one-token decodes.
std::vector<float> prefill_then_decode(const std::string& fixture, const std::vector<int32_t>& toks,
                                       int k) {
  Loaded m(fixture);
  const int V = m.vocab(), T = int(toks.size());
  std::vector<float> out(size_t(T) * V);
  m.session->eval(toks.data(), k, out.data(), true);
  for (int t = k; t < T; t++) m.session->eval(&toks[size_t(t)], 1, out.data() + size_t(t) * V, false);
  return out;
}

class PrefillDecode : public ::testing::TestWithParam<std::string> {};

TEST_P(PrefillDecode, SplitAtAnyPointEqualsOnePass) {
  const std::string fixture = GetParam();
  const auto toks = chunk_tokens(fixture);
  const auto whole = run_tokens(converted_fixture(fixture), toks, 2).logits;
  const float tol = 1e-3f * max_abs(whole.data(), whole.size());
  // inside and across the 64-token chunk boundary of chunked DeltaNet prefill
  for (int k : {1, 7, 63, 64, 65, 99}) {
    const auto split = prefill_then_decode(fixture, toks, k);
    ASSERT_EQ(split.size(), whole.size());
    EXPECT_LE(max_abs_diff(split.data(), whole.data(), whole.size()), tol) << "k=" << k;
    // Stronger, and what this engine guarantees today: the same bits.
    EXPECT_EQ(0, std::memcmp(split.data(), whole.data(), whole.size() * sizeof(float)))
        << "prefill " << k << " + decode is not bit-identical to one pass";
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, PrefillDecode,
                         ::testing::Values("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral",
                                           "qwen3_next_v2"));

TEST(Determinism, SameBitsForAnyThreadCountAndRepeatedRuns) {
  for (const char* fixture : {"qwen3_5_moe", "mixtral"}) {
    const auto toks = chunk_tokens(fixture);
    const auto base = run_tokens(converted_fixture(fixture), toks, 1).logits;
    for (int threads : {1, 2, 3, 2}) {
      const auto r = run_tokens(converted_fixture(fixture), toks, threads).logits;
      EXPECT_EQ(0, std::memcmp(r.data(), base.data(), base.size() * sizeof(float)))
          << fixture << " with " << threads << " threads";
    }
  }
}

TEST(Session, ClearForgetsEverything) {
  Loaded m("qwen3_5_moe");
  const auto toks = chunk_tokens("qwen3_5_moe");
  const int V = m.vocab();
  std::vector<float> first(static_cast<size_t>(V)), again(static_cast<size_t>(V));
  m.session->eval(toks.data(), 20, first.data(), false);
  m.session->eval(toks.data() + 20, 30, nullptr, false);  // more state that must not leak
  m.session->clear();
  EXPECT_EQ(m.session->pos(), 0);
  m.session->eval(toks.data(), 20, again.data(), false);
  EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float)));
}

TEST(Session, RejectsBadTokensAndFullContextWithoutChangingState) {
  Loaded m("qwen3_moe");
  const int V = m.vocab();
  std::vector<float> a(static_cast<size_t>(V)), b(static_cast<size_t>(V));
  const std::vector<int32_t> good = {3, 17, 250};
  m.session->eval(good.data(), 3, a.data(), false);
  const std::vector<int32_t> bad = {5, V, 7};
  try {
    m.session->eval(bad.data(), 3, nullptr, false);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(V)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 4"), std::string::npos) << e.what();
  }
  EXPECT_EQ(m.session->pos(), 3);
  std::vector<int32_t> huge(size_t(m.session->ctx()), 1);
  EXPECT_THROW(m.session->eval(huge.data(), int(huge.size()), nullptr, false), Error);
  EXPECT_EQ(m.session->pos(), 3);
  // The failed calls left nothing behind: continuing equals a fresh run of the same tokens.
  const int32_t next = 42;
  m.session->eval(&next, 1, a.data(), false);
  Loaded fresh("qwen3_moe");
  const std::vector<int32_t> all = {3, 17, 250, 42};
  fresh.session->eval(all.data(), 4, b.data(), false);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

}  // namespace
}  // namespace moeflux::test
