// Generation (engine/generate.h) on the converted qwen3_5_moe fixture (vocab 1024) with the
// byte-level tokenizer of byte_tokenizer.h: greedy equals the plain decode loop, EOS, stop
// strings never streamed, max tokens, a full context, seeds, the thinking budget and hidden
// thinking, cancellation.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "byte_tokenizer.h"
#include "engine/generate.h"
#include "test_util.h"
#include "text/unicode.h"

namespace moeflux {
namespace {

using test::byte_tokenizer_json;
using test::kByteTokenBase;

constexpr int32_t kImEnd = 1, kThink = 2, kThinkEnd = 3;

class Generate : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = Model::load(test::converted_fixture("qwen3_5_moe")).release();
    tok_ = new Tokenizer(Tokenizer::from_json(byte_tokenizer_json(), "byte_tokenizer.json"));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete model_;
  }

  void SetUp() override {
    be_ = make_cpu_context(2);
    store_ = std::make_unique<ExpertStore>(*model_);
  }

  std::unique_ptr<Session> session(int ctx = 0) {
    SessionParams sp;
    sp.ctx = ctx;
    return std::make_unique<Session>(*model_, *be_, *store_, sp);
  }

  // Greedy, with the special tokens and the non-ASCII bytes banned so that the text is plain
  // ASCII and no think tag or EOS turns up by chance.
  static SamplerParams ascii_params(float temperature = 0.0f, uint64_t seed = 0) {
    SamplerParams p;
    p.temperature = temperature;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.min_p = 0.0f;
    p.seed = seed;
    for (int32_t id = 0; id < kByteTokenBase; id++) p.logit_bias.push_back({id, -1e9f});
    for (int b = 0x80; b < 0x100; b++) p.logit_bias.push_back({kByteTokenBase + b, -1e9f});
    return p;
  }

  struct Run {
    GenerateResult r;
    std::string streamed, streamed_thinking;
    int pos = 0;
  };

  Run run(const std::string& prompt, const SamplerParams& sp, const GenerateParams& gp,
          int ctx = 0) {
    auto s = session(ctx);
    Sampler sampler(sp, model_->spec().vocab_size);
    Run out;
    std::vector<int32_t> ids = tok_->encode(prompt);
    out.r = generate(*s, *tok_, sampler, ids, gp, [&](std::string_view t, bool thinking) {
      EXPECT_FALSE(t.empty());
      EXPECT_TRUE(find_invalid_utf8(t) == std::string_view::npos);
      (thinking ? out.streamed_thinking : out.streamed) += t;
    });
    out.pos = s->pos();
    return out;
  }

  static Model* model_;
  static Tokenizer* tok_;
  std::unique_ptr<Context> be_;
  std::unique_ptr<ExpertStore> store_;
};

Model* Generate::model_ = nullptr;
Tokenizer* Generate::tok_ = nullptr;

const std::string kPrompt = "the quick brown fox jumps over the lazy dog";

TEST_F(Generate, GreedyEqualsThePlainDecodeLoop) {
  GenerateParams gp;
  gp.max_tokens = 20;
  Run a = run(kPrompt, ascii_params(), gp);
  // The same by hand: one prefill, then argmax / eval one token at a time.
  std::vector<int32_t> ids = tok_->encode(kPrompt);
  auto s = session();
  const int V = model_->spec().vocab_size;
  std::vector<float> logits(static_cast<size_t>(V));
  s->eval(ids.data(), int(ids.size()), logits.data(), false);
  Sampler greedy(ascii_params(), V);
  std::vector<int32_t> want;
  for (int i = 0; i < 20; i++) {
    int32_t t = greedy.sample(logits.data());
    want.push_back(t);
    if (i + 1 < 20) s->eval(&t, 1, logits.data(), false);
  }
  EXPECT_EQ(a.r.tokens, want);
  EXPECT_EQ(a.r.finish, FinishReason::kLength);
  EXPECT_EQ(a.r.prompt_tokens, int(ids.size()));
  EXPECT_EQ(a.r.evaluated, 19);  // the last token is not evaluated
  EXPECT_EQ(a.pos, int(ids.size()) + 19);
  EXPECT_EQ(a.r.text, tok_->decode(want));
  EXPECT_EQ(a.r.content, a.r.text);
  EXPECT_EQ(a.streamed, a.r.text);
  EXPECT_TRUE(a.streamed_thinking.empty());
  EXPECT_GT(a.r.prompt_seconds, 0.0);
  EXPECT_GT(a.r.gen_tps(), 0.0);
}

TEST_F(Generate, StopsAtEos) {
  GenerateParams gp;
  gp.max_tokens = 24;
  Run ref = run(kPrompt, ascii_params(), gp);
  // A token of the greedy output, made an EOS: generation ends at its first occurrence.
  const int32_t eos = ref.r.tokens[6];
  const size_t first =
      size_t(std::find(ref.r.tokens.begin(), ref.r.tokens.end(), eos) - ref.r.tokens.begin());
  gp.eos_ids = {999999, eos};
  Run a = run(kPrompt, ascii_params(), gp);
  EXPECT_EQ(a.r.finish, FinishReason::kEos);
  ASSERT_EQ(a.r.tokens.size(), first + 1);
  EXPECT_TRUE(std::equal(a.r.tokens.begin(), a.r.tokens.end(), ref.r.tokens.begin()));
  // The EOS is neither shown nor evaluated.
  std::vector<int32_t> before(a.r.tokens.begin(), a.r.tokens.end() - 1);
  EXPECT_EQ(a.r.text, tok_->decode(before));
  EXPECT_EQ(a.streamed, a.r.text);
  EXPECT_EQ(a.r.evaluated, int(first));

  // The model's own eos_ids (the fixture: 1 = <|im_end|> here), pushed to the top by a bias.
  std::vector<int32_t> ids = eos_token_ids(model_->spec(), *tok_, "<|endoftext|>");
  EXPECT_EQ(ids, (std::vector<int32_t>{kImEnd, 4}));
  SamplerParams sp = ascii_params();
  sp.logit_bias.push_back({kImEnd, 2e9f});
  gp.eos_ids = ids;
  Run b = run(kPrompt, sp, gp);
  EXPECT_EQ(b.r.finish, FinishReason::kEos);
  EXPECT_EQ(b.r.tokens, std::vector<int32_t>{kImEnd});
  EXPECT_EQ(b.r.text, "");
  EXPECT_EQ(b.streamed, "");
}

TEST_F(Generate, StopStringsAreHeldBackAndNeverStreamed) {
  GenerateParams gp;
  gp.max_tokens = 40;
  Run ref = run(kPrompt, ascii_params(), gp);
  const std::string& full = ref.r.text;
  ASSERT_GE(full.size(), 20u);
  // Stop strings that span token boundaries, start mid-token, and one that never occurs.
  for (size_t at : {size_t(3), size_t(8), full.size() / 2, full.size() - 4}) {
    for (size_t len : {size_t(1), size_t(3), size_t(6)}) {
      if (at + len > full.size()) continue;
      const std::string stop = full.substr(at, len);
      GenerateParams g2 = gp;
      g2.stop = {"this never occurs \x01", stop};
      Run a = run(kPrompt, ascii_params(), g2);
      const std::string want = full.substr(0, full.find(stop));
      EXPECT_EQ(a.r.finish, FinishReason::kStop) << stop;
      EXPECT_EQ(a.r.text, want) << stop;
      EXPECT_EQ(a.streamed, want) << stop;  // the stream equals the text: no part was shown
      // It stopped at the token that completed the stop string.
      size_t n = 0;
      std::string prefix;
      while (prefix.find(stop) == std::string::npos) prefix += tok_->token_bytes(ref.r.tokens[n++]);
      EXPECT_EQ(a.r.tokens.size(), n) << stop;
    }
  }
  // A stop string that is only ever a prefix: held back, then released at the end.
  GenerateParams g3 = gp;
  g3.stop = {full.substr(full.size() - 2) + "\x01"};
  Run b = run(kPrompt, ascii_params(), g3);
  EXPECT_EQ(b.r.finish, FinishReason::kLength);
  EXPECT_EQ(b.r.text, full);
  EXPECT_EQ(b.streamed, full);
}

TEST_F(Generate, MaxTokensAndAFullContext) {
  GenerateParams gp;
  gp.max_tokens = 0;
  Run z = run(kPrompt, ascii_params(), gp);
  EXPECT_EQ(z.r.finish, FinishReason::kLength);
  EXPECT_TRUE(z.r.tokens.empty());

  gp.max_tokens = 7;
  Run a = run(kPrompt, ascii_params(), gp);
  EXPECT_EQ(a.r.finish, FinishReason::kLength);
  EXPECT_EQ(a.r.tokens.size(), 7u);

  // Context: prompt + 4 positions. Four tokens are evaluated, the fifth has no room.
  const int P = int(tok_->encode(kPrompt).size());
  gp.max_tokens = -1;
  Run c = run(kPrompt, ascii_params(), gp, P + 4);
  EXPECT_EQ(c.r.finish, FinishReason::kCtx);
  EXPECT_EQ(c.r.tokens.size(), 5u);
  EXPECT_EQ(c.r.evaluated, 4);
  EXPECT_EQ(c.pos, P + 4);

  // A prompt that does not fit is an error before anything is evaluated.
  auto s = session(P - 1);
  Sampler sampler(ascii_params(), model_->spec().vocab_size);
  std::vector<int32_t> ids = tok_->encode(kPrompt);
  try {
    generate(*s, *tok_, sampler, ids, gp);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("context"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s->pos(), 0);
  EXPECT_THROW(generate(*s, *tok_, sampler, std::vector<int32_t>{}, gp), Error);
}

TEST_F(Generate, SameSeedSameTextDifferentSeedDifferent) {
  GenerateParams gp;
  gp.max_tokens = 24;
  Run a = run(kPrompt, ascii_params(1.0f, 11), gp);
  Run b = run(kPrompt, ascii_params(1.0f, 11), gp);
  Run c = run(kPrompt, ascii_params(1.0f, 12), gp);
  EXPECT_EQ(a.r.tokens, b.r.tokens);
  EXPECT_EQ(a.r.text, b.r.text);
  EXPECT_NE(a.r.tokens, c.r.tokens);
}

TEST_F(Generate, ThinkBudgetForcesTheEndOfThinking) {
  // A Qwen3.5-style generation prompt: it ends inside <think>.
  const std::string prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n";
  const std::vector<int32_t> forced = tok_->encode("\n</think>\n\n");
  ASSERT_EQ(forced, (std::vector<int32_t>{kByteTokenBase + '\n', kThinkEnd, 963}));
  for (bool show : {true, false}) {
    GenerateParams gp;
    gp.max_tokens = 12;
    gp.think_budget = 3;
    gp.show_thinking = show;
    Run a = run(prompt, ascii_params(), gp);
    ASSERT_EQ(a.r.tokens.size(), 12u);
    EXPECT_TRUE(a.r.think_forced);
    EXPECT_EQ(a.r.think_tokens, 3);
    EXPECT_EQ(std::vector<int32_t>(a.r.tokens.begin() + 3, a.r.tokens.begin() + 6), forced);
    const std::vector<int32_t> thought(a.r.tokens.begin(), a.r.tokens.begin() + 3);
    const std::vector<int32_t> answer(a.r.tokens.begin() + 6, a.r.tokens.end());
    EXPECT_EQ(a.r.text, tok_->decode(a.r.tokens));
    EXPECT_EQ(a.r.reasoning, tok_->decode(thought) + "\n");
    EXPECT_EQ(a.r.content, "\n\n" + tok_->decode(answer));
    EXPECT_EQ(a.streamed, a.r.content);
    EXPECT_EQ(a.streamed_thinking, show ? tok_->decode(thought) + "\n</think>" : "");
    EXPECT_EQ(a.r.evaluated, 11);
  }
  // Budget 0: the thinking closes before the first sampled token.
  GenerateParams gp;
  gp.max_tokens = 5;
  gp.think_budget = 0;
  Run z = run(prompt, ascii_params(), gp);
  EXPECT_EQ(std::vector<int32_t>(z.r.tokens.begin(), z.r.tokens.begin() + 3), forced);
  EXPECT_EQ(z.r.think_tokens, 0);
  // No budget (and </think> banned): everything is thinking.
  GenerateParams none;
  none.max_tokens = 6;
  Run free = run(prompt, ascii_params(), none);
  EXPECT_FALSE(free.r.think_forced);
  EXPECT_EQ(free.r.think_tokens, 6);
  EXPECT_EQ(free.r.content, "");
  EXPECT_EQ(free.streamed_thinking, free.r.text);
}

TEST_F(Generate, ThinkTagsSampledByTheModelSwitchChannels) {
  // A raw prompt and <think> made the likeliest token: the first one opens the thinking, the
  // next two count against a budget of 2, then the end is forced.
  SamplerParams sp = ascii_params();
  sp.logit_bias.erase(sp.logit_bias.begin() + kThink);
  sp.logit_bias.push_back({kThink, 2e9f});
  GenerateParams gp;
  gp.max_tokens = 6;
  gp.think_budget = 2;
  Run a = run(kPrompt, sp, gp);
  ASSERT_EQ(a.r.tokens.size(), 6u);
  EXPECT_EQ(a.r.tokens[0], kThink);
  EXPECT_TRUE(a.r.think_forced);
  EXPECT_EQ(a.r.tokens[3], kByteTokenBase + '\n');
  EXPECT_EQ(a.r.tokens[4], kThinkEnd);
  EXPECT_EQ(a.streamed_thinking, "<think><think><think>\n</think>");
  EXPECT_EQ(a.r.reasoning, "\n");  // think tags are left out of the reasoning
  EXPECT_EQ(a.streamed, "\n\n");
}

TEST_F(Generate, CancellationStopsBeforeTheNextToken) {
  std::atomic<bool> cancel{false};
  GenerateParams gp;
  gp.max_tokens = 30;
  gp.cancel = &cancel;
  auto s = session();
  Sampler sampler(ascii_params(), model_->spec().vocab_size);
  int pieces = 0;
  std::vector<int32_t> ids = tok_->encode(kPrompt);
  GenerateResult r = generate(*s, *tok_, sampler, ids, gp, [&](std::string_view, bool) {
    if (++pieces == 3) cancel = true;
  });
  EXPECT_EQ(r.finish, FinishReason::kCancelled);
  EXPECT_EQ(r.tokens.size(), 3u);
  EXPECT_EQ(r.evaluated, 3);  // a cancelled generation evaluated all it produced
  EXPECT_EQ(s->pos(), int(ids.size()) + 3);
  // Already set: nothing is generated.
  auto s2 = session();
  Sampler sampler2(ascii_params(), model_->spec().vocab_size);
  GenerateResult r2 = generate(*s2, *tok_, sampler2, ids, gp);
  EXPECT_EQ(r2.finish, FinishReason::kCancelled);
  EXPECT_TRUE(r2.tokens.empty());
}

TEST_F(Generate, StreamNeverSplitsACharacter) {
  // Every byte allowed: the random model emits lone UTF-8 lead and continuation bytes; each
  // piece handed to the sink is valid UTF-8 (checked in run()) and the pieces add up.
  SamplerParams sp;
  sp.temperature = 1.5f;
  sp.top_k = 0;
  sp.top_p = 1.0f;
  sp.min_p = 0.0f;
  sp.seed = 3;
  for (int32_t id = 0; id < kByteTokenBase; id++) sp.logit_bias.push_back({id, -1e9f});
  for (int b = 0x80; b < 0x100; b++) sp.logit_bias.push_back({kByteTokenBase + b, 3.0f});
  GenerateParams gp;
  gp.max_tokens = 64;
  Run a = run(kPrompt, sp, gp);
  EXPECT_EQ(a.streamed, a.r.text);
  EXPECT_EQ(a.r.text, tok_->decode(a.r.tokens));
  int high = 0;
  for (int32_t t : a.r.tokens) high += t >= kByteTokenBase + 0x80 && t < kByteTokenBase + 0x100;
  EXPECT_GT(high, 8);
}

}  // namespace
}  // namespace moeflux
