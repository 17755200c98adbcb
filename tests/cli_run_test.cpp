// `moeflux run`, `chat`, `tokenize`, `detokenize` through the binary: run --temp 0 equals
// eval --greedy, stop strings, the chat template default, chat over piped stdin reusing the
// evaluated turns, /save /reset /load, the tokenizer round trip, and one-line errors.
//
// The package is the converted qwen3_5_moe fixture (vocab 1024) with the byte-level tokenizer of
// byte_tokenizer.h and a ChatML tokenizer_config.json copied in; the turn-reuse test runs the
// shipped demo model and its real tokenizer.
#include <cctype>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "byte_tokenizer.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace moeflux {
namespace {

namespace fs = std::filesystem;
using test::CliResult;
using test::run_cli;

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// The fixture package plus a tokenizer; `config` is the tokenizer_config.json text.
std::string make_package(const test::TempDir& root, const std::string& name,
                         const std::string& config) {
  const std::string dir = root / name;
  fs::copy(test::converted_fixture("qwen3_5_moe"), dir, fs::copy_options::recursive);
  write_file(dir + "/tokenizer.json", test::byte_tokenizer_json());
  if (!config.empty()) write_file(dir + "/tokenizer_config.json", config);
  return dir;
}

const test::TempDir& root() {
  static test::TempDir r;
  return r;
}

// ChatML template, <|im_end|> eos.
const std::string& chatml_package() {
  static const std::string p = make_package(root(), "chatml", test::chatml_tokenizer_config_json());
  return p;
}

// Qwen3's own tokenizer_config.json (its template drops <think> blocks from past turns).
const std::string& qwen3_template_package() {
  static const std::string p = make_package(
      root(), "qwen3tpl", read_file(test::data_dir() + "/tokenizer/qwen3/tokenizer_config.json"));
  return p;
}

bool have_qwen_tokenizer() {
  return fs::exists(MOEFLUX_TOKENIZER_JSON);
}

CliResult run_cli_stdin(const std::string& args, const std::string& input) {
  test::TempDir tmp;
  write_file(tmp / "in", input);
  const std::string cmd = std::string(MOEFLUX_BIN) + " " + args + " >" + (tmp / "out") + " 2>" +
                          (tmp / "err") + " <" + (tmp / "in");
  const int rc = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  r.out = read_file(tmp / "out");
  r.err = read_file(tmp / "err");
  return r;
}

// The value after `key` up to the end of its line.
std::string line_after(const std::string& text, const std::string& key) {
  const size_t at = text.find(key);
  if (at == std::string::npos) return "";
  const size_t from = at + key.size();
  return text.substr(from, text.find('\n', from) - from);
}

std::string trim(std::string s) {
  s.erase(s.find_last_not_of(" \n") + 1);
  return s;
}

TEST(CliRun, TempZeroGivesTheTokensOfEvalGreedy) {
  const std::string& pkg = chatml_package();
  const std::string text = "the quick brown fox";
  CliResult tk = run_cli("tokenize --ids-only -m " + pkg + " -p " + quote(text));
  ASSERT_EQ(tk.code, 0) << tk.err;
  const std::string ids = trim(tk.out);
  ASSERT_FALSE(ids.empty());

  CliResult run = run_cli("run -m " + pkg + " --raw -p " + quote(text) +
                          " --temp 0 -n 12 --ignore-eos -v -t 2");
  ASSERT_EQ(run.code, 0) << run.err;
  CliResult ev = run_cli("eval -m " + pkg + " --tokens " + ids + " --greedy 12 -t 2");
  ASSERT_EQ(ev.code, 0) << ev.err;
  const std::string generated = line_after(run.err, "generated: ");
  EXPECT_EQ(generated, trim(ev.out)) << run.err;

  // stdout is the text of those tokens, exactly (no newline added when it is not a terminal).
  CliResult dt = run_cli("detokenize -m " + pkg + " --ids " + generated);
  ASSERT_EQ(dt.code, 0) << dt.err;
  EXPECT_EQ(run.out, dt.out);
  // Stats on stderr.
  EXPECT_NE(run.err.find("prompt: " + std::to_string(std::count(ids.begin(), ids.end(), ',') + 1) +
                         " tokens"),
            std::string::npos)
      << run.err;
  EXPECT_NE(run.err.find("generation: 12 tokens"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("finish: length"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("tok/s"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("experts: "), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("prompt (raw, "), std::string::npos) << run.err;

  // The same with --stats: the per-layer table.
  CliResult st =
      run_cli("run -m " + pkg + " --raw -p " + quote(text) + " --temp 0 -n 2 --stats -t 2");
  ASSERT_EQ(st.code, 0) << st.err;
  EXPECT_NE(st.err.find("expert store:"), std::string::npos) << st.err;
}

TEST(CliRun, StopStringsAndPromptFile) {
  const std::string& pkg = chatml_package();
  test::TempDir tmp;
  write_file(tmp / "prompt.txt", "the quick brown fox");
  const std::string base =
      "run -m " + pkg + " --raw -f " + (tmp / "prompt.txt") + " --temp 0 -n 30 --ignore-eos -t 2";
  CliResult full = run_cli(base);
  ASSERT_EQ(full.code, 0) << full.err;
  ASSERT_GE(full.out.size(), 12u);
  std::string stop;
  for (size_t at = 6; at + 3 <= full.out.size() && stop.empty(); at++) {
    std::string s = full.out.substr(at, 3);
    if (s.find('\'') == std::string::npos && s.find('\\') == std::string::npos &&
        s.find('\n') == std::string::npos && (unsigned char)s[0] < 0x80 &&
        (unsigned char)s[2] < 0x80)
      stop = s;
  }
  ASSERT_FALSE(stop.empty());
  CliResult cut = run_cli(base + " --stop zzzzzzzzqq --stop " + quote(stop));
  ASSERT_EQ(cut.code, 0) << cut.err;
  EXPECT_EQ(cut.out, full.out.substr(0, full.out.find(stop)));
  EXPECT_NE(cut.err.find("finish: stop"), std::string::npos) << cut.err;
}

TEST(CliRun, ChatTemplateIsTheDefaultWhenThePackageHasOne) {
  CliResult a =
      run_cli("run -m " + chatml_package() + " -p hi --system 'be brief' -n 2 --temp 0 -v -t 2");
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_NE(a.err.find(R"(prompt (chat, )"), std::string::npos) << a.err;
  EXPECT_NE(
      a.err.find(
          R"(<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n)"),
      std::string::npos)
      << a.err;
  // eos: the model's (1) and the config's <|im_end|> (also 1).
  EXPECT_NE(a.err.find("eos: 1\n"), std::string::npos) << a.err;

  // No tokenizer_config.json: raw by default; --chat uses the built-in ChatML.
  test::TempDir tmp;
  write_file(tmp / "tokenizer.json", test::byte_tokenizer_json());
  const std::string bare = test::converted_fixture("qwen3_5_moe");
  CliResult b = run_cli("run -m " + bare + " --tokenizer " + (tmp / "tokenizer.json") +
                        " -p hi -n 2 --temp 0 -v -t 2");
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_NE(b.err.find(R"(prompt (raw, )"), std::string::npos) << b.err;
  CliResult c = run_cli("run -m " + bare + " --tokenizer " + tmp.path() +
                        " --chat -p hi -n 2 --temp 0 -v -t 2");
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_NE(c.err.find(R"(<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n)"),
            std::string::npos)
      << c.err;
}

// "prompt: N tokens new (M cached)" of each turn.
std::vector<std::pair<int, int>> turn_counts(const std::string& err) {
  std::vector<std::pair<int, int>> out;
  std::regex re(R"(prompt: (\d+) tokens new \((\d+) cached\))");
  for (auto it = std::sregex_iterator(err.begin(), err.end(), re); it != std::sregex_iterator();
       ++it)
    out.push_back({std::stoi((*it)[1]), std::stoi((*it)[2])});
  return out;
}

// The shipped demo model (models/demo: its own 4096-token BPE tokenizer, trained with HF
// tokenizers; no chat template, so chat uses the built-in ChatML, whose markers that tokenizer
// splits into ordinary pieces). Expected counts are literals from an independent tokenizer,
// tokenizers.js (npm @huggingface/tokenizers 0.2.0, which gives HF's ids for the demo's whole
// validation text): tools/refs/cli_chat_counts.mjs, run on the greedy answer below.
//   turn 1: "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n" = 35 tokens
//   turn 2: the conversation rendered again is 85 tokens, whose first 42 are turn 1's 35 and
//           7 of the 8 answer tokens (the last one is sampled, not evaluated): 43 new.
// The answer ids are the engine's greedy output (pinned: they change only with the model or
// the kernels, which the oracle and demo tests judge against HF).
TEST(CliChat, SecondTurnEvaluatesOnlyItsOwnTokens) {
  const std::string pkg = std::string(MOEFLUX_SOURCE_DIR) + "/models/demo";
  CliResult r = run_cli_stdin("chat -m " + pkg + " --temp 0 -n 8 --ignore-eos -v -t 2",
                              "hello there\nhow are you\n");
  ASSERT_EQ(r.code, 0) << r.err;  // EOF ends the chat cleanly
  EXPECT_NE(r.err.find("generated: 40,364,304,323,1139,332,545,304\n"), std::string::npos)
      << r.err;
  EXPECT_NE(r.out.find("Had I not tell you what I"), std::string::npos) << r.out;
  auto turns = turn_counts(r.err);
  ASSERT_EQ(turns.size(), 2u) << r.err;
  EXPECT_EQ(turns[0], std::make_pair(35, 0)) << r.err;
  EXPECT_EQ(turns[1], std::make_pair(43, 42)) << r.err;
  EXPECT_EQ(r.err.find("evaluating the conversation again"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("generation: 8 tokens"), std::string::npos) << r.err;
}

TEST(CliChat, TemplateThatRewritesHistoryIsReEvaluated) {
  // Qwen3's template with enable_thinking=false puts "<think>\n\n</think>\n\n" in the generation
  // prompt but not in past turns: the second turn cannot reuse the first.
  CliResult r = run_cli_stdin(
      "chat -m " + qwen3_template_package() + " --no-think --temp 0 -n 4 --ignore-eos -v -t 2",
      "hello\nagain\n");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("evaluating the conversation again"), std::string::npos) << r.err;
  auto turns = turn_counts(r.err);
  ASSERT_EQ(turns.size(), 2u) << r.err;
  EXPECT_EQ(turns[1].second, 0);
  EXPECT_GT(turns[1].first, turns[0].first);
}

TEST(CliChat, SaveResetLoad) {
  const std::string& pkg = chatml_package();
  test::TempDir tmp;
  const std::string file = tmp / "conv.json";
  CliResult r = run_cli_stdin("chat -m " + pkg + " --temp 0 -n 5 --ignore-eos -v -t 2",
                              "hello there\n/save " + file + "\n/reset\n/help\n/bogus\n/load " +
                                  file + "\nhow are you\n/exit\nnot read\n");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("saved 2 messages"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("new conversation"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("snapshots come later"), std::string::npos) << r.err;  // /help
  EXPECT_NE(r.err.find("unknown command /bogus"), std::string::npos) << r.err;
  const std::string loaded = line_after(r.err, "loaded 2 messages from " + file + " (");
  ASSERT_FALSE(loaded.empty()) << r.err;
  const int evaluated = std::stoi(loaded);
  auto turns = turn_counts(r.err);
  ASSERT_EQ(turns.size(), 2u) << r.err;  // "not read" comes after /exit
  EXPECT_EQ(turns[1].second, evaluated);
  auto j = nlohmann::json::parse(read_file(file));
  ASSERT_EQ(j["messages"].size(), 2u);
  EXPECT_EQ(j["messages"][0]["role"], "user");
  EXPECT_EQ(j["messages"][0]["content"], "hello there");
  EXPECT_EQ(j["messages"][1]["role"], "assistant");
  // A bad file is reported and the chat goes on.
  write_file(tmp / "bad.json", R"({"messages": [{"role": "user"}]})");
  CliResult b = run_cli_stdin("chat -m " + pkg + " --temp 0 -n 2 -t 2",
                              "/load " + (tmp / "bad.json") + "\nhi\n");
  EXPECT_EQ(b.code, 0) << b.err;
  EXPECT_NE(b.err.find("messages[0] has no \"content\""), std::string::npos) << b.err;
}

TEST(CliTokenize, RoundTripOnTheQwenTokenizer) {
  if (!have_qwen_tokenizer())
    MF_SKIP_OR_FAIL_IN_CI(std::string("no ") + MOEFLUX_TOKENIZER_JSON +
                          " (scripts/fetch_tokenizer.sh)");
  // Expected ids from HF tokenizers (tests/data/tokenizer/qwen3/golden.json), not from our
  // Tokenizer: CJK, emoji with ZWJ, accents, tabs and CRLF, special tokens and <think>.
  const nlohmann::json golden =
      nlohmann::json::parse(read_file(test::data_dir() + "/tokenizer/qwen3/golden.json"));
  const std::set<std::string> picked = {
      "Hello, my dog is cute", "naïve café résumé", "中文测试：你好，世界！",
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
      "<think>\nreasoning\n</think>\n\nanswer", "mixed\r\nnewlines\r\n", "tab\tseparated\tvalues",
      "\xF0\x9F\x99\x82\xF0\x9F\x9A\x80\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D"
      "\xF0\x9F\x91\xA7\xE2\x80\x8D\xF0\x9F\x91\xA6 emoji"};
  test::TempDir tmp;
  int checked = 0;
  for (const auto& g : golden["encode"]) {
    const std::string text = g["text"];
    if (!picked.count(text)) continue;
    SCOPED_TRACE(text);
    checked++;
    write_file(tmp / "text.txt", text);
    CliResult tk = run_cli(std::string("tokenize -m ") + MOEFLUX_TOKENIZER_JSON + " --text-file " +
                           (tmp / "text.txt") + " --ids-only");
    ASSERT_EQ(tk.code, 0) << tk.err;
    std::string want_s;
    for (size_t i = 0; i < g["ids"].size(); i++)
      want_s += (i ? "," : "") + std::to_string(int(g["ids"][i]));
    EXPECT_EQ(tk.out, want_s + "\n");
    CliResult dt =
        run_cli(std::string("detokenize -m ") + MOEFLUX_TOKENIZER_JSON + " --ids " + want_s);
    ASSERT_EQ(dt.code, 0) << dt.err;
    EXPECT_EQ(dt.out, std::string(g["decoded"]));
  }
  EXPECT_EQ(checked, int(picked.size()));
  // The listing: one line per token; HF encodes "Hello world" as [9707, 1879] ("Hello", " world").
  CliResult ls = run_cli(std::string("tokenize -m ") + MOEFLUX_TOKENIZER_JSON + " -p " +
                         quote("Hello world"));
  ASSERT_EQ(ls.code, 0) << ls.err;
  EXPECT_EQ(std::count(ls.out.begin(), ls.out.end(), '\n'), 2);
  EXPECT_NE(ls.out.find("9707"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("1879"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("\" world\""), std::string::npos) << ls.out;
  EXPECT_NE(ls.err.find("MB/s"), std::string::npos) << ls.err;
}

// Without -m, run uses the shipped demo model (models/demo, trained on the KJV and Austen):
// greedy text from "And it came to pass" is English — mostly letters and spaces, and common
// words of the corpus.
TEST(CliRun, DefaultModelWritesEnglish) {
  const test::CliResult r = test::run_cli("run -p 'And it came to pass' -n 40 --temp 0");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string& t = r.out;
  ASSERT_GT(t.size(), 80u) << t;
  size_t plain = 0;
  for (char c : t) plain += std::isalpha(static_cast<unsigned char>(c)) || c == ' ' || c == ',' || c == '.' || c == '\n';
  EXPECT_GT(double(plain) / double(t.size()), 0.95) << t;
  int common = 0;
  for (const char* w : {" the ", " and ", " of ", " that ", " unto ", " he ", " to "})
    common += t.find(w) != std::string::npos;
  EXPECT_GE(common, 3) << t;
  std::printf("[demo] And it came to pass%s\n", t.c_str());
}

TEST(CliRun, BadInputGivesOneLineErrors) {
  const std::string& pkg = chatml_package();
  const std::string bare = test::converted_fixture("qwen3_5_moe");
  struct Case {
    std::string args, part;
  };
  std::vector<Case> cases = {
      {"run -m " + pkg, "-p TEXT or -f FILE"},
      {"run -m " + pkg + " -p hi -f /etc/hostname", "-p TEXT or -f FILE"},
      {"run -m " + pkg + " -f /nonexistent/prompt.txt", "/nonexistent/prompt.txt"},
      {"run -m " + pkg + " -p hi --top-p 1.5", "--top-p"},
      {"run -m " + pkg + " -p hi --min-p -1", "--min-p"},
      {"run -m " + pkg + " -p hi --temp -1", "--temp"},
      {"run -m " + pkg + " -p hi --temp nan", "--temp: nan must be a finite number >= 0"},
      {"run -m " + pkg + " -p hi --temp inf", "--temp: inf must be a finite number >= 0"},
      {"run -m " + pkg + " -p hi --repeat-penalty nan", "--repeat-penalty: nan must be a finite"},
      {"run -m " + pkg + " -p hi -t 10000", "--threads = 10000 is more than"},
      {"eval -m " + pkg + " --tokens 1 -t 10000", "x the"},
      {"frobnicate -m " + pkg, "unknown command 'frobnicate' (see moeflux --help)"},
      {"run -m " + pkg + " --raw -f " + pkg, pkg + ": is a directory, expected a file"},
      {"perplexity -m " + pkg + " -f " + pkg, pkg + ": is a directory, expected a file"},
      {"run -m " + pkg + " -p hi --top-k -3", "--top-k"},
      {"run -m " + pkg + " -p hi --think-budget -2", "--think-budget"},
      {"run -m " + pkg + " -p hi -n -5", "--n-predict"},
      {"run -m " + pkg + " -p hi --stop ''", "--stop: empty"},
      {"run -m " + pkg + " --raw -p hi --system s", "--system needs --chat"},
      {"run -m " + pkg + " -p hi --tokenizer /nonexistent.json", "--tokenizer: /nonexistent.json"},
      {"run -m " + bare + " -p hi", "no tokenizer.json in " + bare},
      {"run -m " + bare + " -p hi", "pass --tokenizer FILE"},
      {"run -m /nonexistent/pkg -p hi", "/nonexistent/pkg"},
      {"run -m " + pkg + " -p 'the quick brown fox jumps' -c 3 --raw", "do not fit in the context"},
      {"tokenize -m /nonexistent -p x", "/nonexistent does not exist"},
      {"tokenize -m " + pkg, "-p TEXT or --text-file FILE"},
      {"detokenize -m " + pkg + " --ids 1,x", "--ids: 'x' at position 1"},
      {"detokenize -m " + pkg + " --ids 5000", "--ids: 5000 at position 0 is not in [0, 1024)"},
  };
  if (have_qwen_tokenizer())
    cases.push_back({"run -m " + pkg + std::string(" --tokenizer ") + MOEFLUX_TOKENIZER_JSON +
                         " -p 'Hello world'",
                     "outside the model's vocabulary of 1024"});
  for (const Case& c : cases) {
    CliResult r = run_cli(c.args);
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.err.find(c.part), std::string::npos) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
    EXPECT_EQ(r.err.rfind("moeflux: error: ", 0), 0u) << c.args << "\n" << r.err;
  }
}

}  // namespace
}  // namespace moeflux
