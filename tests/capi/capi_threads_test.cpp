// Sessions sharing one model (and its expert cache) through the C API, one per thread, at once:
// prompts, decoding, rewinds, snapshots and clears interleaved across threads give exactly the
// bits of one session alone. Part of moeflux_tests, and the core of the ThreadSanitizer build
// (moeflux_tsan_tests, scripts/test.sh).
#include <cstring>
#include <thread>
#include <vector>

#include "moeflux.h"
#include "test_util.h"

namespace moeflux::test {
namespace {

const std::vector<int32_t> kPrompt = {3, 17, 250, 9, 41, 77, 5, 123, 64, 2, 200, 31, 8, 90};

struct SessionRun {
  std::vector<float> prompt_logits, decode_logits, rewound_logits, loaded_logits;
  int rc = MF_OK;
  std::string error;
};

// One session's life: prompt, decode, rewind and continue, save + clear + load and continue.
SessionRun one_session(mf_model* m) {
  SessionRun r;
  const size_t V = size_t(mf_model_n_vocab(m));
  r.prompt_logits.resize(V);
  r.decode_logits.resize(V);
  r.rewound_logits.resize(V);
  r.loaded_logits.resize(V);
  mf_session_params sp = mf_session_default_params();
  sp.threads = 1;
  sp.n_ctx = 64;
  sp.checkpoint_interval = 3;
  mf_session* s = nullptr;
  auto step = [&](int rc) {
    if (rc != MF_OK && r.rc == MF_OK) {
      r.rc = rc;
      r.error = mf_last_error();
    }
    return rc == MF_OK;
  };
  if (!step(mf_session_new(m, &sp, &s))) return r;
  step(mf_eval_prompt(s, kPrompt.data(), 10, r.prompt_logits.data()));
  for (size_t i = 10; i < kPrompt.size(); i++)
    step(mf_eval_token(s, kPrompt[i], r.decode_logits.data()));
  step(mf_memory_seq_rm(s, 7, -1));
  step(mf_eval_token(s, 99, r.rewound_logits.data()));
  std::vector<uint8_t> snap(mf_state_size(s));
  step(mf_state_save(s, snap.data(), snap.size(), nullptr));
  step(mf_memory_clear(s));
  step(mf_eval_prompt(s, kPrompt.data(), 3, nullptr));
  step(mf_state_load(s, snap.data(), snap.size()));
  step(mf_eval_token(s, 42, r.loaded_logits.data()));
  mf_session_free(s);
  return r;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CapiThreads, SessionsShareOneModelAcrossThreads) {
  for (const char* fixture : {"qwen3_5_moe", "qwen3_moe"}) {
    SCOPED_TRACE(fixture);
    mf_model_params mp = mf_model_default_params();
    mp.threads = 1;
    mp.prefetch = true;
    mf_model* alone = nullptr;
    ASSERT_EQ(mf_model_load(converted_fixture(fixture).c_str(), &mp, &alone), MF_OK)
        << mf_last_error();
    const SessionRun want = one_session(alone);
    ASSERT_EQ(want.rc, MF_OK) << want.error;
    mf_model_free(alone);

    // A cache of a third of the experts, shared: evictions race with the other sessions' reads.
    auto model = Model::load(converted_fixture(fixture));
    const auto& ex = model->manifest().experts;
    mp.expert_cache_bytes = int64_t(ex.stride * uint64_t(ex.count) * ex.layers.size() / 3);
    mf_model* shared = nullptr;
    ASSERT_EQ(mf_model_load(converted_fixture(fixture).c_str(), &mp, &shared), MF_OK);
    constexpr int kThreads = 4;
    std::vector<SessionRun> got(kThreads);
    std::vector<std::thread> th;
    for (int i = 0; i < kThreads; i++)
      th.emplace_back([&, i] { got[size_t(i)] = one_session(shared); });
    for (auto& t : th) t.join();
    for (const SessionRun& r : got) {
      ASSERT_EQ(r.rc, MF_OK) << r.error;
      EXPECT_TRUE(same(r.prompt_logits, want.prompt_logits));
      EXPECT_TRUE(same(r.decode_logits, want.decode_logits));
      EXPECT_TRUE(same(r.rewound_logits, want.rewound_logits));
      EXPECT_TRUE(same(r.loaded_logits, want.loaded_logits));
    }
    mf_model_free(shared);
  }
}

TEST(CapiThreads, ErrorMessagesAreThreadLocal) {
  mf_model* m = nullptr;
  ASSERT_EQ(mf_model_load("/nonexistent-a", nullptr, &m), MF_ERR_IO);
  std::string other;
  std::thread t([&] {
    mf_model* m2 = nullptr;
    mf_model_load("/nonexistent-b", nullptr, &m2);
    other = mf_last_error();
  });
  t.join();
  EXPECT_NE(std::string(mf_last_error()).find("/nonexistent-a"), std::string::npos);
  EXPECT_NE(other.find("/nonexistent-b"), std::string::npos);
}

}  // namespace
}  // namespace moeflux::test
