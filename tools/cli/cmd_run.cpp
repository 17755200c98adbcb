// `moeflux run` (one prompt -> streamed text), `moeflux chat` (interactive, the session kept
// across turns), `moeflux tokenize` and `moeflux detokenize`.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "engine/generate.h"
#include "text/chat_template.h"
#include "text/sampler.h"
#include "text/tokenizer.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"

namespace moeflux::cli {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Flags shared by run and chat.

struct SamplingFlags {
  float temp = 0.8f, top_p = 0.95f, min_p = 0.05f;
  int top_k = 40, repeat_last_n = 64;
  float repeat_penalty = 1.0f, presence_penalty = 0.0f, frequency_penalty = 0.0f;
  int64_t seed = -1;
};

struct GenFlags {
  ModelOptions mo;
  SamplingFlags s;
  std::string tokenizer;  // tokenizer.json or a directory holding it; "" = the package's
  int n_predict = -1;
  std::vector<std::string> stop;
  std::string system;
  bool no_think = false, hide_think = false, ignore_eos = false, verbose = false;
  int think_budget = -1;
};

void add_gen_options(CLI::App* app, GenFlags& g) {
  add_model_options(app, g.mo, /*model_required=*/false);
  app->add_option("--tokenizer", g.tokenizer,
                  "tokenizer.json (or a directory holding it) instead of the package's");
  app->add_option("-n,--n-predict", g.n_predict,
                  "tokens to generate at most (-1: until EOS or a full context)");
  app->add_option("--temp", g.s.temp, "temperature (0: greedy)");
  app->add_option("--top-k", g.s.top_k, "keep the k most likely tokens (0: off)");
  app->add_option("--top-p", g.s.top_p, "keep the smallest set with this much mass (1: off)");
  app->add_option("--min-p", g.s.min_p,
                  "drop tokens below this share of the most likely one's probability (0: off)");
  app->add_option("--repeat-penalty", g.s.repeat_penalty,
                  "divide positive / multiply negative logits of recent tokens (1: off)");
  app->add_option("--repeat-last-n", g.s.repeat_last_n,
                  "tokens the penalties look back over (-1: all, 0: none)");
  app->add_option("--presence-penalty", g.s.presence_penalty,
                  "subtracted from the logit of every recent token (0: off)");
  app->add_option("--frequency-penalty", g.s.frequency_penalty,
                  "subtracted per occurrence of a recent token (0: off)");
  app->add_option("--seed", g.s.seed, "random seed (-1: a random one, printed with the stats)");
  app->add_option("--stop", g.stop,
                  "stop when the answer contains this text (repeatable; \\n, \\t)")
      ->allow_extra_args(false);
  app->add_option("--system", g.system, "system message (chat)");
  app->add_flag("--no-think", g.no_think,
                "render the chat template with enable_thinking=false (Qwen3)");
  app->add_flag("--hide-think", g.hide_think, "generate the <think> part but do not print it");
  app->add_option("--think-budget", g.think_budget,
                  "after N thinking tokens, force \"\\n</think>\\n\\n\" (-1: no limit)");
  app->add_flag("--ignore-eos", g.ignore_eos, "do not stop at end-of-sequence tokens");
  app->add_flag("-v,--verbose", g.verbose, "more detail on stderr (token ids, cache reuse)");
}

// "\n", "\t", "\\" in a --stop argument (a shell cannot easily pass a newline).
std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[i + 1];
      if (c == 'n' || c == 't' || c == 'r' || c == '\\') {
        out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : '\\';
        i++;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

// Flag checks that need no files, so a typo fails before anything loads.
void check_gen_flags(const GenFlags& g) {
  if (g.n_predict < -1)
    fail(ErrorKind::kInvalidArgument, "--n-predict: {} is below -1 (-1: no limit)", g.n_predict);
  if (g.think_budget < -1)
    fail(ErrorKind::kInvalidArgument, "--think-budget: {} is below -1 (-1: no limit)",
         g.think_budget);
  if (g.s.top_k < 0)
    fail(ErrorKind::kInvalidArgument, "--top-k: {} is negative (0: off)", g.s.top_k);
  if (!(g.s.top_p > 0.0f && g.s.top_p <= 1.0f))
    fail(ErrorKind::kInvalidArgument, "--top-p: {} is not in (0, 1]", g.s.top_p);
  if (!(g.s.min_p >= 0.0f && g.s.min_p <= 1.0f))
    fail(ErrorKind::kInvalidArgument, "--min-p: {} is not in [0, 1]", g.s.min_p);
  if (!(std::isfinite(g.s.temp) && g.s.temp >= 0.0f))
    fail(ErrorKind::kInvalidArgument, "--temp: {} must be a finite number >= 0 (0: greedy)",
         g.s.temp);
  if (!(std::isfinite(g.s.repeat_penalty) && g.s.repeat_penalty > 0.0f))
    fail(ErrorKind::kInvalidArgument, "--repeat-penalty: {} must be a finite number > 0 (1: off)",
         g.s.repeat_penalty);
  if (g.s.repeat_last_n < -1)
    fail(ErrorKind::kInvalidArgument, "--repeat-last-n: {} is below -1", g.s.repeat_last_n);
  for (const auto& s : g.stop)
    if (s.empty()) fail(ErrorKind::kInvalidArgument, "--stop: empty string");
}

SamplerParams sampler_params(const SamplingFlags& f, uint64_t seed) {
  SamplerParams p;
  p.temperature = f.temp;
  p.top_k = f.top_k;
  p.top_p = f.top_p;
  p.min_p = f.min_p;
  p.repeat_penalty = f.repeat_penalty;
  p.presence_penalty = f.presence_penalty;
  p.frequency_penalty = f.frequency_penalty;
  p.penalty_last_n = f.repeat_last_n;
  p.seed = seed;
  return p;
}

uint64_t pick_seed(int64_t flag) {
  if (flag >= 0) return uint64_t(flag);
  std::random_device rd;
  return ((uint64_t(rd()) << 32) | rd()) >> 1;  // fits --seed's int64 for a rerun
}

// ---------------------------------------------------------------------------------------------
// Tokenizer and chat template of a package.

// A tokenizer.json path from a package directory or a file path.
std::string tokenizer_json_path(const std::string& path, const std::string& flag) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    std::string p = (fs::path(path) / "tokenizer.json").string();
    if (!fs::exists(p, ec))
      fail(ErrorKind::kInvalidArgument,
           "{}: no tokenizer.json in {}: copy the checkpoint's tokenizer.json (and "
           "tokenizer_config.json) into it, or pass --tokenizer FILE",
           flag, path);
    return p;
  }
  if (!fs::exists(path, ec)) fail(ErrorKind::kIo, "{}: {} does not exist", flag, path);
  return path;
}

struct TextAssets {
  std::unique_ptr<Tokenizer> tok;
  std::optional<ChatTemplate> tmpl;  // the model's own, when its tokenizer config has one
  std::string eos_token;             // tokenizer_config.json "eos_token", "" if none
  std::string tokenizer_path, config_path;
};

TextAssets load_text(const std::string& model_dir, const std::string& tokenizer_flag) {
  TextAssets a;
  a.tokenizer_path = tokenizer_flag.empty() ? tokenizer_json_path(model_dir, "-m")
                                            : tokenizer_json_path(tokenizer_flag, "--tokenizer");
  a.tok = std::make_unique<Tokenizer>(Tokenizer::load(a.tokenizer_path));
  std::error_code ec;
  // The config beside the tokenizer, else the package's.
  for (const fs::path& dir : {fs::path(a.tokenizer_path).parent_path(), fs::path(model_dir)}) {
    fs::path p = dir / "tokenizer_config.json";
    if (fs::exists(p, ec)) {
      a.config_path = p.string();
      break;
    }
  }
  if (a.config_path.empty()) return a;
  const Json cfg = parse_json<Json>(read_text_file(a.config_path), a.config_path);
  if (cfg.contains("eos_token")) {
    const Json& e = cfg["eos_token"];
    if (e.is_string()) a.eos_token = e.get<std::string>();
    if (e.is_object() && e.contains("content") && e["content"].is_string())
      a.eos_token = e["content"].get<std::string>();
  }
  const fs::path dir = fs::path(a.config_path).parent_path();
  const bool has_template = (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) ||
                            fs::exists(dir / "chat_template.jinja", ec) ||
                            fs::exists(dir / "chat_template.json", ec);
  if (has_template) a.tmpl = ChatTemplate::from_tokenizer_config(a.config_path);
  return a;
}

ChatMessage message(std::string role, std::string content) {
  ChatMessage m;
  m.role = std::move(role);
  m.content = std::move(content);
  return m;
}

// Token ids the model cannot take mean the tokenizer belongs to another model.
void check_ids_fit(const std::vector<int32_t>& ids, int vocab, const std::string& tokenizer) {
  for (size_t i = 0; i < ids.size(); i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      fail(ErrorKind::kInvalidArgument,
           "prompt: token {} at position {} is outside the model's vocabulary of {} ({} "
           "belongs to another model?)",
           ids[i], i, vocab, tokenizer);
}

// ---------------------------------------------------------------------------------------------
// Printing.

// Writes the streamed text to stdout as it comes. Without shown thinking, newlines at the start
// of the answer (those that follow </think>) are not printed.
class Printer {
 public:
  explicit Printer(bool strip_leading) : strip_(strip_leading) {}
  void operator()(std::string_view text, bool thinking) {
    if (strip_ && !started_) {
      size_t i = text.find_first_not_of('\n');
      if (i == std::string_view::npos) return;
      text.remove_prefix(i);
      started_ = true;
    }
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    last_ = text.empty() ? last_ : text.back();
    any_ = any_ || !text.empty();
  }
  // A newline unless the text already ended with one.
  void end_line() {
    if (any_ && last_ != '\n') std::fputc('\n', stdout);
    std::fflush(stdout);
  }

 private:
  bool strip_, started_ = false, any_ = false;
  char last_ = 0;
};

void print_timings(const GenerateResult& r, const std::string& prompt_note) {
  fmt::print(stderr, "prompt: {} tokens{} in {:.1f} ms ({:.1f} tok/s)\n", r.prompt_tokens,
             prompt_note, r.prompt_seconds * 1e3, r.prompt_tps());
  std::string think;
  if (r.think_tokens > 0)
    think = fmt::format(", {} thinking{}", r.think_tokens, r.think_forced ? " (budget hit)" : "");
  fmt::print(stderr, "generation: {} tokens in {:.1f} ms ({:.1f} tok/s), finish: {}{}\n",
             r.tokens.size(), r.gen_seconds * 1e3, r.gen_tps(), to_string(r.finish), think);
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C: the first one cancels the answer in progress (chat: or warns at the prompt).

std::atomic<bool> g_cancel{false};
volatile std::sig_atomic_t g_sigints = 0;
volatile std::sig_atomic_t g_second_quits = 0;  // run: a second Ctrl-C ends the program

extern "C" void on_sigint(int) {
  g_sigints = g_sigints + 1;
  g_cancel.store(true);
  if (g_second_quits && g_sigints >= 2) {
    signal(SIGINT, SIG_DFL);
    raise(SIGINT);
  }
}

// Installs on_sigint without SA_RESTART, so a blocked read() returns EINTR; restores on exit.
class SigintGuard {
 public:
  SigintGuard() {
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGINT, &sa, &old_);
  }
  ~SigintGuard() { sigaction(SIGINT, &old_, nullptr); }

 private:
  struct sigaction old_ {};
};

// ---------------------------------------------------------------------------------------------
// moeflux run

// What run and chat hand to generate(): stop conditions and thinking from the flags.
GenerateParams generate_params(const GenFlags& g, const ModelSpec& spec, const TextAssets& ta) {
  GenerateParams gp;
  gp.max_tokens = g.n_predict;
  for (const auto& s : g.stop) gp.stop.push_back(unescape(s));
  if (!g.ignore_eos) gp.eos_ids = eos_token_ids(spec, *ta.tok, ta.eos_token);
  gp.show_thinking = !g.hide_think;
  gp.think_budget = g.think_budget;
  gp.cancel = &g_cancel;
  return gp;
}

int cmd_run(GenFlags g, const std::string& prompt_flag, const std::string& file,
            bool chat_flag, bool raw_flag) {
  check_gen_flags(g);
  if (g.mo.model.empty()) g.mo.model = default_model_dir();  // the shipped demo model
  if (prompt_flag.empty() == file.empty())
    fail(ErrorKind::kInvalidArgument, "give the prompt with one of -p TEXT or -f FILE");
  const std::string prompt = file.empty() ? prompt_flag : read_text_file(file);

  TextAssets ta = load_text(g.mo.model, g.tokenizer);
  const bool chat = chat_flag || (!raw_flag && ta.tmpl.has_value());
  if (!chat && !g.system.empty())
    fail(ErrorKind::kInvalidArgument, "--system needs --chat (this prompt is raw text)");
  if (!chat && g.no_think)
    fail(ErrorKind::kInvalidArgument, "--no-think needs --chat (this prompt is raw text)");
  std::string text = prompt;
  if (chat) {
    const ChatTemplate tmpl = ta.tmpl ? *ta.tmpl : ChatTemplate::builtin_chatml();
    std::vector<ChatMessage> msgs;
    if (!g.system.empty()) msgs.push_back(message("system", g.system));
    msgs.push_back(message("user", prompt));
    Json extra = Json::object();
    if (g.no_think) extra["enable_thinking"] = false;
    text = tmpl.render(msgs, /*add_generation_prompt=*/true, extra);
  }
  const std::vector<int32_t> ids = ta.tok->encode(text);
  if (ids.empty()) fail(ErrorKind::kInvalidArgument, "prompt: no tokens (empty text)");

  Loaded L = open_model(g.mo);
  const ModelSpec& spec = L.model->spec();
  check_ids_fit(ids, spec.vocab_size, ta.tokenizer_path);
  SessionParams sp = session_params(g.mo);
  if (g.mo.ctx == 0) {
    const int64_t want = int64_t(ids.size()) + std::max(g.n_predict, 0);
    sp.ctx = int(std::max<int64_t>(std::min(spec.ctx_train > 0 ? spec.ctx_train : 4096, 4096),
                                   std::min<int64_t>(want, INT_MAX)));
  }
  Session session(*L.model, *L.backend, *L.store, sp);
  const uint64_t seed = pick_seed(g.s.seed);
  Sampler sampler(sampler_params(g.s, seed), spec.vocab_size);

  const GenerateParams gp = generate_params(g, spec, ta);
  if (g.verbose) {
    fmt::print(stderr, "prompt ({}, {} tokens): {}\n", chat ? "chat" : "raw", ids.size(),
               Json(text).dump());
    fmt::print(stderr, "eos: {}\n", fmt::join(gp.eos_ids, ","));
  }

  Printer print(g.hide_think);
  GenerateResult r;
  {
    g_second_quits = 1;  // the first stops generating (a long prefill finishes first)
    SigintGuard guard;
    r = generate(session, *ta.tok, sampler, ids, gp,
                 [&](std::string_view t, bool thinking) { print(t, thinking); });
  }
  if (isatty(STDOUT_FILENO)) print.end_line();
  std::fflush(stdout);
  if (g.verbose) fmt::print(stderr, "generated: {}\n", fmt::join(r.tokens, ","));
  print_timings(r, "");
  fmt::print(stderr, "seed: {}, {} threads\n", seed, L.backend->threads());
  fmt::print(stderr, "{}\n", store_summary(*L.store, r.prompt_tokens + r.evaluated));
  if (g.mo.stats) print_store_stats(*L.store, stderr);
  return r.finish == FinishReason::kCancelled ? 130 : 0;
}

// ---------------------------------------------------------------------------------------------
// moeflux chat

// Lines from stdin through read(2), so Ctrl-C (EINTR) interrupts a wait for input.
class LineReader {
 public:
  enum Status { kLine, kEof, kInterrupted };
  Status next(std::string& line) {
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return kLine;
      }
      if (eof_) {
        if (buf_.empty()) return kEof;
        line = std::move(buf_);
        buf_.clear();
        return kLine;
      }
      char tmp[4096];
      const ssize_t n = ::read(STDIN_FILENO, tmp, sizeof tmp);
      if (n < 0 && errno == EINTR) return kInterrupted;
      if (n < 0) fail(ErrorKind::kIo, "stdin: read failed: {}", std::strerror(errno));
      if (n == 0) eof_ = true;
      buf_.append(tmp, size_t(n > 0 ? n : 0));
    }
  }

 private:
  std::string buf_;
  bool eof_ = false;
};

Json conversation_json(const std::vector<ChatMessage>& msgs) {
  Json list = Json::array();
  for (const auto& m : msgs) list.push_back(to_json(m));
  Json j = Json::object();
  j["format"] = "moeflux-chat";
  j["version"] = 1;
  j["messages"] = list;
  return j;
}

std::vector<ChatMessage> conversation_from_json(const std::string& path) {
  Json j = parse_json<Json>(read_text_file(path), path);
  const Json* list = &j;
  if (j.is_object() && j.contains("messages")) list = &j["messages"];
  if (!list->is_array())
    fail(ErrorKind::kFormat, "{}: expected {{\"messages\": [...]}} or a list of messages", path);
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < list->size(); i++) {
    const Json& m = (*list)[i];
    auto str = [&](const char* key, bool required) -> std::optional<std::string> {
      if (!m.is_object() || !m.contains(key) || m[key].is_null()) {
        if (required) fail(ErrorKind::kFormat, "{}: messages[{}] has no \"{}\"", path, i, key);
        return std::nullopt;
      }
      if (!m[key].is_string())
        fail(ErrorKind::kFormat, "{}: messages[{}].{} is not a string", path, i, key);
      return m[key].get<std::string>();
    };
    ChatMessage msg;
    msg.role = *str("role", true);
    msg.content = *str("content", true);
    msg.reasoning_content = str("reasoning_content", false);
    out.push_back(std::move(msg));
  }
  return out;
}

const char* kChatHelp =
    "commands: /reset (new conversation), /save FILE (conversation as JSON messages; /save! "
    "FILE replaces an existing file), "
    "/load FILE (replace the conversation and evaluate it again; exact state snapshots come "
    "later), /exit (or Ctrl-D), /help. Ctrl-C stops an answer; twice at the prompt quits. "
    "A line ending in \\ continues on the next.\n";

class Chat {
 public:
  Chat(const GenFlags& g, TextAssets& ta, Loaded& L, Session& session, Sampler& sampler,
       GenerateParams gp)
      : g_(g),
        ta_(ta),
        L_(L),
        session_(session),
        sampler_(sampler),
        gp_(std::move(gp)),
        tmpl_(ta.tmpl ? *ta.tmpl : ChatTemplate::builtin_chatml()) {
    if (g.no_think) extra_["enable_thinking"] = false;
    reset();
  }

  void reset() {
    msgs_.clear();
    if (!g_.system.empty()) msgs_.push_back(message("system", g_.system));
    clear_cache();
  }

  // Like every file the CLI writes: never onto a package file, an existing file only when
  // asked (/save!), and through a temporary renamed into place.
  void save(const std::string& path, bool replace) {
    check_output_file(path, replace ? "/save!" : "/save", true, L_.model->dir());
    if (!replace && file_exists(path))
      fail(ErrorKind::kInvalidArgument, "/save {}: the file exists; /save! {} replaces it", path,
           path);
    StagedFile staged(path);
    {
      std::ofstream f(staged.path(), std::ios::binary);
      f << conversation_json(msgs_).dump(2) << "\n";
      f.close();
      if (!f) fail(ErrorKind::kIo, "{}: cannot write", staged.path());
    }
    staged.commit();
    fmt::print(stderr, "saved {} messages to {}\n", msgs_.size(), path);
  }

  void load(const std::string& path) {
    std::vector<ChatMessage> msgs = conversation_from_json(path);
    // Evaluate it now, so that the next turn only adds its own tokens.
    std::string text;
    std::vector<int32_t> ids;
    if (!msgs.empty()) {
      text = tmpl_.render(msgs, /*add_generation_prompt=*/false, extra_);
      ids = ta_.tok->encode(text);
      check_ids_fit(ids, L_.model->spec().vocab_size, ta_.tokenizer_path);
      if (int64_t(ids.size()) >= session_.ctx())
        fail(ErrorKind::kInvalidArgument,
             "{}: the conversation is {} tokens, the context {}; start with a larger -c", path,
             ids.size(), session_.ctx());
    }
    msgs_ = std::move(msgs);
    clear_cache();
    if (!ids.empty()) {
      auto t0 = Clock::now();
      session_.eval(ids.data(), int(ids.size()), nullptr, false);
      for (int32_t t : ids) sampler_.accept(t);
      cached_tokens_ = ids.size();
      cached_text_ = text;
      fmt::print(stderr, "loaded {} messages from {} ({} tokens evaluated in {:.1f} ms)\n",
                 msgs_.size(), path, ids.size(),
                 std::chrono::duration<double>(Clock::now() - t0).count() * 1e3);
    } else {
      fmt::print(stderr, "loaded an empty conversation from {}\n", path);
    }
  }

  // One user turn; when the context cannot hold it, says so and drops it.
  void turn(const std::string& user) {
    msgs_.push_back(message("user", user));
    const std::string full = tmpl_.render(msgs_, /*add_generation_prompt=*/true, extra_);
    std::string suffix;
    if (cached_tokens_ > 0 && full.starts_with(cached_text_)) {
      suffix = full.substr(cached_text_.size());
    } else {
      if (cached_tokens_ > 0) {
        if (g_.verbose)
          fmt::print(stderr,
                     "chat: the template renders the history differently from what was "
                     "evaluated (diverges at byte {}); evaluating the conversation again\n",
                     common_prefix(full, cached_text_));
        clear_cache();
      }
      suffix = full;
    }
    const std::vector<int32_t> ids = ta_.tok->encode(suffix);
    check_ids_fit(ids, L_.model->spec().vocab_size, ta_.tokenizer_path);
    if (ids.empty() || int64_t(session_.pos()) + int64_t(ids.size()) >= session_.ctx()) {
      msgs_.pop_back();
      fmt::print(stderr,
                 "context full: {} positions in use, this turn needs {} more of {}; /reset, or "
                 "start again with a larger -c\n",
                 session_.pos(), ids.size(), session_.ctx());
      return;
    }
    const size_t cached_before = cached_tokens_;
    Printer print(g_.hide_think);
    g_cancel.store(false);
    g_sigints = 0;
    GenerateResult r = generate(session_, *ta_.tok, sampler_, ids, gp_,
                                [&](std::string_view t, bool th) { print(t, th); });
    const bool cancelled = r.finish == FinishReason::kCancelled;
    g_cancel.store(false);
    g_sigints = 0;
    print.end_line();
    if (cancelled) fmt::print(stderr, "[stopped]\n");

    cached_tokens_ += ids.size() + size_t(r.evaluated);
    cached_text_ += suffix;
    cached_text_ += ta_.tok->decode(std::span(r.tokens).first(size_t(r.evaluated)));
    ChatMessage a = message("assistant", r.content);
    if (!r.reasoning.empty()) a.reasoning_content = r.reasoning;
    msgs_.push_back(std::move(a));
    if (g_.verbose) {
      fmt::print(stderr, "generated: {}\n", fmt::join(r.tokens, ","));
      print_timings(r, fmt::format(" new ({} cached)", cached_before));
      fmt::print(stderr, "{}\n", store_summary(*L_.store, 0));
    }
  }

 private:
  void clear_cache() {
    session_.clear();
    sampler_.clear_history();
    cached_tokens_ = 0;
    cached_text_.clear();
  }
  static size_t common_prefix(const std::string& a, const std::string& b) {
    size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) i++;
    return i;
  }

  const GenFlags& g_;
  TextAssets& ta_;
  Loaded& L_;
  Session& session_;
  Sampler& sampler_;
  GenerateParams gp_;
  ChatTemplate tmpl_;
  Json extra_ = Json::object();
  std::vector<ChatMessage> msgs_;
  size_t cached_tokens_ = 0;  // tokens in the session
  std::string cached_text_;   // the text they stand for
};

int cmd_chat(GenFlags g) {
  check_gen_flags(g);
  if (g.mo.model.empty()) g.mo.model = default_model_dir();  // the shipped demo model
  TextAssets ta = load_text(g.mo.model, g.tokenizer);
  Loaded L = open_model(g.mo);
  const ModelSpec& spec = L.model->spec();
  Session session(*L.model, *L.backend, *L.store, session_params(g.mo));
  const uint64_t seed = pick_seed(g.s.seed);
  Sampler sampler(sampler_params(g.s, seed), spec.vocab_size);

  const GenerateParams gp = generate_params(g, spec, ta);

  const bool tty = isatty(STDIN_FILENO);
  fmt::print(stderr, "chat: {} (context {}, seed {}, template {}); /help for commands\n",
             g.mo.model, session.ctx(), seed,
             ta.tmpl ? ta.config_path : std::string("built-in ChatML"));
  Chat chat(g, ta, L, session, sampler, gp);
  SigintGuard guard;
  LineReader in;
  bool warned = false;  // a Ctrl-C at the prompt: the next one quits
  for (;;) {
    if (tty) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
    }
    std::string line, part;
    LineReader::Status st;
    while ((st = in.next(part)) == LineReader::kLine && part.ends_with("\\")) {
      part.pop_back();
      line += part + "\n";
    }
    if (st == LineReader::kInterrupted) {
      g_cancel.store(false);
      if (warned) {
        std::fputc('\n', stdout);
        break;
      }
      warned = true;
      fmt::print(stderr, "\n(Ctrl-C again to quit, or /exit)\n");
      continue;
    }
    if (st == LineReader::kEof && line.empty()) break;
    line += part;
    warned = false;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      if (line[0] == '/') {
        const size_t sp = line.find(' ');
        const std::string cmd = line.substr(0, sp);
        std::string arg = sp == std::string::npos ? "" : line.substr(sp + 1);
        arg.erase(0, arg.find_first_not_of(" \t"));
        arg.erase(arg.find_last_not_of(" \t") + 1);
        if (cmd == "/exit" || cmd == "/quit") break;
        if (cmd == "/help") {
          fmt::print(stderr, "{}", kChatHelp);
        } else if (cmd == "/reset") {
          chat.reset();
          fmt::print(stderr, "new conversation\n");
        } else if ((cmd == "/save" || cmd == "/save!" || cmd == "/load") && arg.empty()) {
          fmt::print(stderr, "{} needs a file name\n", cmd);
        } else if (cmd == "/save" || cmd == "/save!") {
          chat.save(arg, cmd == "/save!");
        } else if (cmd == "/load") {
          chat.load(arg);
        } else {
          fmt::print(stderr, "unknown command {}; {}", cmd, kChatHelp);
        }
        continue;
      }
      chat.turn(line);
    } catch (const Error& e) {
      // A bad /load file or a turn that cannot be rendered: say so and keep the conversation.
      fmt::print(stderr, "error: {}\n", e.what());
    }
    if (st == LineReader::kEof) break;
  }
  if (g.mo.stats) print_store_stats(*L.store, stderr);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// moeflux tokenize / detokenize

int cmd_tokenize(const std::string& model, const std::string& text_flag, const std::string& file,
                 bool ids_only, bool no_special) {
  if (text_flag.empty() == file.empty())
    fail(ErrorKind::kInvalidArgument, "give the text with one of -p TEXT or --text-file FILE");
  Tokenizer tok = Tokenizer::load(tokenizer_json_path(model, "-m"));
  const std::string text = file.empty() ? text_flag : read_text_file(file);
  auto t0 = Clock::now();
  const std::vector<int32_t> ids = tok.encode(text, !no_special);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  fmt::memory_buffer out;
  if (ids_only) {
    for (size_t i = 0; i < ids.size(); i++) {
      if (i) out.push_back(',');
      fmt::format_to(fmt::appender(out), "{}", ids[i]);
    }
    out.push_back('\n');
  } else {
    for (int32_t id : ids)
      fmt::format_to(fmt::appender(out), "{:>7} {}\n", id,
                     Json(std::string(tok.token_bytes(id)))
                         .dump(-1, ' ', false, Json::error_handler_t::replace));
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  fmt::print(stderr, "{} tokens from {} bytes in {:.1f} ms ({:.1f} MB/s)\n", ids.size(),
             text.size(), secs * 1e3, secs > 0 ? double(text.size()) / 1e6 / secs : 0.0);
  return 0;
}

int cmd_detokenize(const std::string& model, const std::string& ids_flag) {
  Tokenizer tok = Tokenizer::load(tokenizer_json_path(model, "-m"));
  const std::vector<int32_t> ids = parse_tokens(ids_flag, "--ids");
  for (size_t i = 0; i < ids.size(); i++)
    if (ids[i] < 0 || ids[i] >= tok.vocab_size())
      fail(ErrorKind::kInvalidArgument, "--ids: {} at position {} is not in [0, {})", ids[i], i,
           tok.vocab_size());
  const std::string text = tok.decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  if (isatty(STDOUT_FILENO) && !text.ends_with('\n')) std::fputc('\n', stdout);
  return 0;
}

}  // namespace

Command add_run(CLI::App& app) {
  struct Args {
    GenFlags g;
    std::string prompt, file;
    bool chat = false, raw = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("run", "generate text from a prompt, streamed to stdout");
  add_gen_options(c, a->g);
  c->add_option("-p,--prompt", a->prompt, "the prompt (the user message with --chat)");
  c->add_option("-f,--file", a->file, "read the prompt from this file");
  auto* chat = c->add_flag("--chat", a->chat,
                           "render the prompt with the model's chat template (the default when "
                           "the package has one; else built-in ChatML)");
  c->add_flag("--raw", a->raw, "use the prompt as it is, no chat template")->excludes(chat);
  return {c, [a] { return cmd_run(a->g, a->prompt, a->file, a->chat, a->raw); }};
}

Command add_chat(CLI::App& app) {
  auto g = std::make_shared<GenFlags>();
  auto* c = app.add_subcommand("chat", "interactive chat on stdin/stdout; /help inside");
  add_gen_options(c, *g);
  return {c, [g] { return cmd_chat(*g); }};
}

Command add_tokenize(CLI::App& app) {
  struct Args {
    std::string model, text, file;
    bool ids_only = false, no_special = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("tokenize", "text -> token ids");
  c->add_option("-m,--model", a->model, "package directory or tokenizer.json")->required();
  c->add_option("-p,--prompt", a->text, "the text");
  c->add_option("--text-file", a->file, "read the text from this file");
  c->add_flag("--ids-only", a->ids_only, "print only the ids, comma-separated");
  c->add_flag("--no-special", a->no_special,
              "encode special tokens written in the text as plain text");
  return {c, [a] { return cmd_tokenize(a->model, a->text, a->file, a->ids_only, a->no_special); }};
}

Command add_detokenize(CLI::App& app) {
  struct Args {
    std::string model, ids;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("detokenize", "token ids -> text");
  c->add_option("-m,--model", a->model, "package directory or tokenizer.json")->required();
  c->add_option("--ids", a->ids, "comma-separated token ids")->required();
  return {c, [a] { return cmd_detokenize(a->model, a->ids); }};
}

}  // namespace moeflux::cli
