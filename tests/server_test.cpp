// `moeflux serve`: the protocol pieces in-process (request parsing and its errors, SSE and error
// shapes, the reasoning splitter, the metrics text), the prompt cache on the demo model (reused
// state gives the tokens a fresh session gives), then a real server process on 127.0.0.1 (a free
// port it picks and prints) driven by an HTTP client, curl (SSE framing), the official `openai`
// npm client (tests/server/*.mjs: chat, streaming, completions, a bounded load test), a client
// that disconnects mid-stream, and every bad request it should refuse.
//
// The node parts skip, saying why, when node or build/third_party/node_modules/openai (installed
// by scripts/setup.sh) is missing.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <httplib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "byte_tokenizer.h"
#include "engine/generate.h"
#include "server/api.h"
#include "server/metrics.h"
#include "server/slots.h"
#include "test_util.h"
#include "text/tokenizer.h"

// A server that stops reading a request (413) makes the client's next write raise SIGPIPE; a
// client is expected to see EPIPE instead, and httplib 0.11 does not ask for MSG_NOSIGNAL.
[[maybe_unused]] static const bool kSigpipeIgnored = [] { return signal(SIGPIPE, SIG_IGN) != SIG_ERR; }();

namespace moeflux {
namespace {

namespace fs = std::filesystem;
using server::ApiError;
using server::api_error_of;
using server::Json;
using Clock = std::chrono::steady_clock;

const std::string kKey = "sk-moeflux-test";

std::string demo_dir() { return std::string(MOEFLUX_SOURCE_DIR) + "/models/demo"; }
std::string modules_parent() { return std::string(MOEFLUX_SOURCE_DIR) + "/build/third_party"; }

// The file's text; "" while it does not exist yet.
std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Polls `done` every millisecond until it holds or `limit_s` has passed; whether it held. A
// deadline, not a guessed sleep: as quick as the machine allows, and patient when it is loaded.
bool wait_until(const std::function<bool()>& done, double limit_s = 60) {
  const auto t0 = Clock::now();
  while (!done()) {
    if (since(t0) > limit_s) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Protocol, in-process.

ApiError chat_error(const Json& body) {
  try {
    server::parse_chat_request(body);
  } catch (const ApiError& e) {
    return e;
  }
  ADD_FAILURE() << "accepted: " << body.dump();
  return ApiError(0, "");
}

Json user_msgs() { return Json::array({Json{{"role", "user"}, {"content", "hi"}}}); }

TEST(ServerApi, ParsesChatRequest) {
  Json body = Json::parse(R"({
    "model": "x", "messages": [
      {"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null, "reasoning_content": "hmm"}],
    "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 7, "stop": "END", "seed": 42,
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "n": 1, "stream": true,
    "stream_options": {"include_usage": true}, "chat_template_kwargs": {"enable_thinking": false},
    "logit_bias": {"17": -100}, "user": "ignored"})");
  const server::GenRequest r = server::parse_chat_request(body);
  EXPECT_TRUE(r.chat);
  ASSERT_EQ(r.messages.size(), 3u);
  EXPECT_EQ(r.messages[0]["role"], "system");
  EXPECT_EQ(r.messages[1]["content"], "a\nb");
  EXPECT_EQ(r.messages[2]["content"], "");
  EXPECT_EQ(r.messages[2]["reasoning_content"], "hmm");
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_EQ(r.stop, std::vector<std::string>{"END"});
  EXPECT_TRUE(r.seed_given);
  EXPECT_EQ(r.sampling.seed, 42u);
  EXPECT_FLOAT_EQ(r.sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.frequency_penalty, -0.5f);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.template_kwargs["enable_thinking"], false);
  ASSERT_EQ(r.sampling.logit_bias.size(), 1u);
  EXPECT_EQ(r.sampling.logit_bias[0].first, 17);

  Json c = Json::parse(R"({"prompt": ["once"], "max_tokens": 3.0, "stop": ["a", "b"]})");
  const server::GenRequest rc = server::parse_completion_request(c);
  EXPECT_FALSE(rc.chat);
  EXPECT_EQ(rc.prompt, "once");
  EXPECT_EQ(rc.max_tokens, 3);
  EXPECT_EQ(rc.stop.size(), 2u);
  EXPECT_EQ(server::parse_completion_request(Json::parse(R"({"prompt": [5, 6]})")).prompt_ids,
            (std::vector<int32_t>{5, 6}));
}

TEST(ServerApi, BadFieldsNameTheField) {
  struct Case {
    const char* extra;  // merged into {"messages": [user hi]}
    const char* param;
  };
  const Case cases[] = {
      {R"({"temperature": "hot"})", "temperature"},
      {R"({"temperature": 3})", "temperature"},
      {R"({"top_p": true})", "top_p"},
      {R"({"max_tokens": 0})", "max_tokens"},
      {R"({"max_tokens": 1.5})", "max_tokens"},
      {R"({"max_completion_tokens": "10"})", "max_completion_tokens"},
      {R"({"stop": 5})", "stop"},
      {R"({"stop": ["a", 5]})", "stop[1]"},
      {R"({"stop": [""]})", "stop[0]"},
      {R"({"seed": "x"})", "seed"},
      {R"({"n": 2})", "n"},
      {R"({"stream": "yes"})", "stream"},
      {R"({"stream_options": {"include_usage": 1}})", "stream_options.include_usage"},
      {R"({"presence_penalty": 2.5})", "presence_penalty"},
      {R"({"frequency_penalty": []})", "frequency_penalty"},
      {R"({"logit_bias": {"x": 1}})", "logit_bias.x"},
      {R"({"logprobs": true})", "logprobs"},
      {R"({"chat_template_kwargs": 1})", "chat_template_kwargs"},
      {R"({"messages": "hi"})", "messages"},
      {R"({"messages": []})", "messages"},
      {R"({"messages": [{"content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "wizard", "content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "user"}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": 3}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].type"},
      {R"({"tools": [{"type": "function"}]})", "tools"},
  };
  for (const Case& c : cases) {
    Json body = Json{{"messages", user_msgs()}};
    const Json extra = Json::parse(c.extra);
    for (auto& [k, v] : extra.items()) body[k] = v;
    const ApiError e = chat_error(body);
    EXPECT_EQ(e.status, 400) << c.extra;
    EXPECT_EQ(e.param, c.param) << c.extra << ": " << e.what();
    EXPECT_EQ(e.type, "invalid_request_error");
  }
  EXPECT_EQ(chat_error(Json::object()).param, "messages");
  // Malformed JSON and non-objects.
  for (const char* text : {"{", "{\"messages\": [}", "[1]", "\"x\"", ""}) {
    try {
      server::parse_body(text);
      ADD_FAILURE() << "parsed: " << text;
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400);
      EXPECT_EQ(e.code, "invalid_json");
    }
  }
  for (const char* text : {R"({"prompt": 5})", R"({"prompt": [["a"], ["b"]]})", R"({})",
                           R"({"prompt": "x", "echo": true})", R"({"prompt": [1, -2]})"}) {
    EXPECT_THROW(server::parse_completion_request(Json::parse(text)), ApiError) << text;
  }
}

// check_request, the model-free request path the fuzzer drives: JSON nested past the limit is
// refused before parsing (whatever the field), brackets inside strings do not count, and a
// client's bad value is quoted by a short prefix.
TEST(ServerApi, CheckRequestRefusesDeepJsonAndQuotesBriefly) {
  const std::string chat = "/v1/chat/completions";
  const std::string deep = std::string(65, '[') + std::string(65, ']');
  auto reply = [&](const std::string& body, const std::string& path = "/v1/chat/completions") {
    return server::check_request("POST", path, body);
  };
  const server::ApiReply r = reply(R"({"messages": [{"role": "user", "content": )" + deep + "}]}");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_NE(r.body.find("nested deeper than 64 levels"), std::string::npos) << r.body;
  EXPECT_EQ(reply(R"({"prompt": )" + deep + "}", "/v1/completions").status, 400);
  // 64 deep in all is within the limit (this one is refused for its type, not its depth).
  const std::string ok_depth = std::string(62, '[') + std::string(62, ']');
  const server::ApiReply r64 = reply(R"({"messages": [)" + ok_depth + "]}");
  EXPECT_EQ(r64.status, 400);
  EXPECT_EQ(r64.body.find("nested deeper"), std::string::npos) << r64.body;
  const std::string in_string = R"({"messages": [{"role": "user", "content": ")" +
                                std::string(1000, '[') + R"(\"{{{"}]})";
  EXPECT_EQ(reply(in_string).status, 200) << reply(in_string).body;
  const server::ApiReply role =
      reply(R"({"messages": [{"role": ")" + std::string(10000, 'x') + R"(", "content": "hi"}]})");
  EXPECT_EQ(role.status, 400);
  EXPECT_LT(role.body.size(), 400u) << role.body;
  EXPECT_EQ(server::check_request("GET", chat, "{}").status, 404);
  // Found by fuzz_server: a number beyond double range was a 500.
  EXPECT_EQ(reply(R"({"messages": 1e400})").status, 400);
}

TEST(ServerApi, ErrorAndSseShapes) {
  const Json e = server::error_json(ApiError(400, "bad 'n'", "n", "unsupported_value"));
  EXPECT_EQ(e.dump(),
            R"({"error":{"message":"bad 'n'","type":"invalid_request_error","param":"n",)"
            R"("code":"unsupported_value"}})");
  const Json e2 = server::error_json(ApiError(503, "busy"));
  EXPECT_EQ(e2["error"]["type"], "server_error");
  EXPECT_TRUE(e2["error"]["param"].is_null());
  EXPECT_TRUE(e2["error"]["code"].is_null());

  server::ResponseMeta m{"chatcmpl-1", 7, "demo"};
  const std::string ev = server::sse_event(server::chat_chunk(m, Json{{"content", "a\nb"}}, "", true));
  EXPECT_TRUE(ev.starts_with("data: {"));
  EXPECT_TRUE(ev.ends_with("}\n\n"));
  EXPECT_EQ(ev.find('\n'), ev.size() - 2) << "an event is one line";
  const Json chunk = Json::parse(ev.substr(6));
  EXPECT_EQ(chunk["object"], "chat.completion.chunk");
  EXPECT_EQ(chunk["choices"][0]["delta"]["content"], "a\nb");
  EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(chunk.contains("usage") && chunk["usage"].is_null());
  // Invalid UTF-8 in generated text becomes U+FFFD instead of an exception.
  const std::string bad = server::dump(Json{{"t", std::string("a\xff")}});
  EXPECT_EQ(bad, "{\"t\":\"a\xef\xbf\xbd\"}");
  const Json u = server::usage_chunk(m, true, {10, 3, 4});
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["total_tokens"], 13);
  EXPECT_EQ(u["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
}

// Engine errors raised while serving: the client's (400), memory (503, retry), NaN/Inf from the
// model (500 naming it), anything else 500; each with its machine-readable code.
TEST(ServerApi, EngineErrorsGetTheirStatus) {
  const struct {
    ErrorKind kind;
    int status;
    const char* code;
  } cases[] = {{ErrorKind::kInvalidArgument, 400, ""},
               {ErrorKind::kOutOfMemory, 503, "out_of_memory"},
               {ErrorKind::kNumeric, 500, "numeric_error"},
               {ErrorKind::kIo, 500, ""},
               {ErrorKind::kInternal, 500, ""}};
  for (const auto& c : cases) {
    const ApiError e = api_error_of(Error(c.kind, "layer 3 produced NaN/Inf at position 7"));
    EXPECT_EQ(e.status, c.status);
    EXPECT_EQ(e.code, c.code);
    EXPECT_EQ(e.type, c.status >= 500 ? "server_error" : "invalid_request_error");
    EXPECT_STREQ(e.what(), "layer 3 produced NaN/Inf at position 7");
  }
}

TEST(ServerApi, ReasoningSplitter) {
  server::ReasoningSplitter s;
  std::string content, reasoning;
  auto push = [&](std::string_view t, bool th) {
    auto d = s.push(t, th);
    content += d.content;
    reasoning += d.reasoning;
  };
  push("<think>", true);
  push("\n", true);
  push("Let me", true);
  push(" see.\n</think>", true);
  push("\n\n", false);
  push("Hello", false);
  push(" world", false);
  EXPECT_EQ(reasoning, "Let me see.\n");
  EXPECT_EQ(content, "Hello world");
  // Without thinking the answer is kept as it is, leading spaces included.
  server::ReasoningSplitter plain;
  EXPECT_EQ(plain.push(" x", false).content, " x");
}

TEST(ServerApi, MetricsText) {
  server::Metrics m;
  m.request("/v1/chat/completions", 200);
  m.request("/v1/chat/completions", 200);
  m.request("other", 404);
  m.generation(100, 60, 0.5, 10, 0.25, 0.6, false);
  ExpertStats st;
  st.total.requests = 10;
  st.total.hits = 7;
  st.total.misses = 3;
  st.total.bytes_read = 3000;
  const std::string text = m.render(2, 1, 0, st);
  EXPECT_NE(text.find("moeflux_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("moeflux_requests_total{endpoint=\"other\",status=\"404\"} 1\n"),
            std::string::npos);
  EXPECT_NE(text.find("moeflux_prompt_tokens_total 100\n"), std::string::npos);
  EXPECT_NE(text.find("moeflux_prompt_tokens_cached_total 60\n"), std::string::npos);
  EXPECT_NE(text.find("moeflux_generation_tokens_per_second 40\n"), std::string::npos);
  EXPECT_NE(text.find("moeflux_expert_cache_hits_total 7\n"), std::string::npos);
  EXPECT_NE(text.find("moeflux_expert_cache_misses_total 3\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE moeflux_slots_busy gauge\n"), std::string::npos);
  // Every sample line is "name[{labels}] value".
  std::istringstream in(text);
  std::regex sample(R"(^moeflux_[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+(inf)?$)");
  for (std::string line; std::getline(in, line);)
    if (!line.starts_with("#")) {
      EXPECT_TRUE(std::regex_match(line, sample)) << line;
    }
}

// ---------------------------------------------------------------------------------------------
// The prompt cache on the demo model, in-process.

class ServerSlots : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = Model::load(demo_dir()).release();
    store_ = new ExpertStore(*model_);
    tok_ = new Tokenizer(Tokenizer::load(demo_dir() + "/tokenizer.json"));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete store_;
    delete model_;
  }
  static Model* model_;
  static ExpertStore* store_;
  static Tokenizer* tok_;
};
Model* ServerSlots::model_ = nullptr;
ExpertStore* ServerSlots::store_ = nullptr;
Tokenizer* ServerSlots::tok_ = nullptr;

TEST_F(ServerSlots, ReusedStateGivesTheTokensOfAFreshSession) {
  server::SlotPool pool(*model_, *store_, 2, ContextOptions{1, false}, 0, {});
  SamplerParams sp;
  sp.temperature = 0.9f;
  sp.seed = 5;
  sp.presence_penalty = 0.3f;  // the penalties must see the reused prefix too
  GenerateParams gp;
  gp.max_tokens = 12;
  const std::vector<int32_t> turn1 =
      tok_->encode("It is a truth universally acknowledged, that a single man");
  server::Slot& a = pool.slot(0);
  server::Slot& fresh = pool.slot(1);
  const server::SlotResult r1 = server::generate_on_slot(a, *tok_, turn1, sp, gp, true);
  EXPECT_EQ(r1.cached, 0u);
  // The next turn extends what slot a holds (prompt + evaluated answer).
  std::vector<int32_t> turn2 = a.history();
  for (int32_t t : tok_->encode(" in possession of a good fortune")) turn2.push_back(t);
  const server::SlotResult cached = server::generate_on_slot(a, *tok_, turn2, sp, gp, true);
  EXPECT_EQ(cached.cached, turn1.size() + size_t(r1.r.evaluated));
  const server::SlotResult ref = server::generate_on_slot(fresh, *tok_, turn2, sp, gp, false);
  EXPECT_EQ(ref.cached, 0u);
  EXPECT_EQ(cached.r.tokens, ref.r.tokens);
  EXPECT_EQ(cached.r.text, ref.r.text);

  // A prompt that leaves the history inside it (an edited last turn) rewinds the session.
  std::vector<int32_t> edited(turn2.begin(), turn2.begin() + long(turn1.size()) + 2);
  for (int32_t t : tok_->encode(" and nothing more")) edited.push_back(t);
  const server::SlotResult rw = server::generate_on_slot(a, *tok_, edited, sp, gp, true);
  EXPECT_EQ(rw.cached, server::common_prefix(turn2, edited));
  const server::SlotResult rw_ref = server::generate_on_slot(fresh, *tok_, edited, sp, gp, false);
  EXPECT_EQ(rw.r.tokens, rw_ref.r.tokens);
  // The same prompt again: everything but its last token is reused.
  const server::SlotResult same = server::generate_on_slot(a, *tok_, edited, sp, gp, true);
  EXPECT_EQ(same.cached, edited.size() - 1);
  EXPECT_EQ(same.r.tokens, rw_ref.r.tokens);
}

TEST_F(ServerSlots, AcquirePicksTheLongestPrefixAndQueuesInOrder) {
  server::SlotPool pool(*model_, *store_, 2, ContextOptions{1, false}, 1, {});
  SamplerParams sp;
  sp.temperature = 0;
  GenerateParams gp;
  gp.max_tokens = 2;
  const std::vector<int32_t> p = tok_->encode("And God said");
  server::generate_on_slot(pool.slot(1), *tok_, p, sp, gp, true);
  std::vector<int32_t> longer = p;
  longer.push_back(p.back());
  server::Slot* s = pool.acquire(longer, nullptr);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->id, 1);
  // Admission: 2 slots + 1 queue place.
  EXPECT_TRUE(pool.try_admit());
  EXPECT_TRUE(pool.try_admit());
  EXPECT_TRUE(pool.try_admit());
  EXPECT_FALSE(pool.try_admit());
  pool.leave();
  pool.leave();
  pool.leave();
  server::Slot* t = pool.acquire(p, nullptr);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->id, 0);
  // Both busy: a waiter gets the first slot released; a cancelled waiter gives up.
  std::atomic<bool> cancel{false};
  std::thread waiter([&] { EXPECT_EQ(pool.acquire(p, &cancel), nullptr); });
  EXPECT_TRUE(wait_until([&] { return pool.queued() == 1; })) << "queued " << pool.queued();
  cancel = true;
  waiter.join();
  EXPECT_EQ(pool.queued(), 0);
  server::Slot* got = nullptr;
  std::thread waiter2([&] { got = pool.acquire(p, nullptr); });
  // Released only once the waiter waits, so it is the queue that hands the slot over.
  EXPECT_TRUE(wait_until([&] { return pool.queued() == 1; })) << "queued " << pool.queued();
  pool.release(s);
  waiter2.join();
  EXPECT_EQ(got, s);
  pool.release(got);
  pool.release(t);
  EXPECT_EQ(pool.busy(), 0);
}

// ---------------------------------------------------------------------------------------------
// A real server process.

// `moeflux serve --port 0 ARGS`, its stdout and stderr in a log file; waits until it prints the
// port and answers /health. SIGTERM on destruction.
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& args) {
    log_ = tmp_ / "serve.log";
    std::vector<std::string> argv = {MOEFLUX_BIN, "serve", "--port", "0"};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = fork();
    if (pid_ == 0) {
#if MF_TEST_ASAN
      // ASan keeps freed memory in a quarantine (256 MiB by default), which would read as RSS
      // growth in the load test; a small one still catches use-after-free of recent frees.
      const char* old = std::getenv("ASAN_OPTIONS");
      const std::string opts = std::string(old ? old : "") + (old && *old ? ":" : "") +
                               "quarantine_size_mb=16";
      setenv("ASAN_OPTIONS", opts.c_str(), 1);
#endif
      const int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> cargv;
      for (auto& a : argv) cargv.push_back(a.data());
      cargv.push_back(nullptr);
      execv(cargv[0], cargv.data());
      _exit(127);
    }
    const auto t0 = Clock::now();
    const std::regex listening(R"(listening on http://127\.0\.0\.1:(\d+))");
    while (port_ <= 0) {
      std::smatch m;
      const std::string log = slurp(log_);
      if (std::regex_search(log, m, listening)) port_ = std::stoi(m[1]);
      int status = 0;
      if (port_ <= 0 && waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        ADD_FAILURE() << "moeflux serve exited at start:\n" << log;
        return;
      }
      if (port_ <= 0 && since(t0) > 120) {
        ADD_FAILURE() << "moeflux serve did not start:\n" << log;
        return;
      }
      if (port_ <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    httplib::Client c("127.0.0.1", port_);
    while (since(t0) < 120) {
      auto res = c.Get("/health");
      if (res && res->status == 200) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ADD_FAILURE() << "no /health answer";
  }
  ~ServerProcess() { stop(); }

  bool ok() const { return pid_ > 0 && port_ > 0; }
  int port() const { return port_; }
  int pid() const { return pid_; }
  std::string log() const { return slurp(log_); }
  bool alive() const { return pid_ > 0 && kill(pid_, 0) == 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

  // VmRSS in KiB.
  long rss_kib() const {
    std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
    for (std::string line; std::getline(f, line);)
      if (line.starts_with("VmRSS:")) return std::stol(line.substr(6));
    return -1;
  }

  // SIGTERM; the exit status (-1 if it had to be killed).
  int stop() {
    if (pid_ <= 0) return exit_;
    kill(pid_, SIGTERM);
    const auto t0 = Clock::now();
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (since(t0) > 60) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        ADD_FAILURE() << "moeflux serve ignored SIGTERM";
        pid_ = -1;
        return exit_ = -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    exit_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return exit_;
  }

 private:
  test::TempDir tmp_;
  std::string log_;
  pid_t pid_ = -1;
  int port_ = -1;
  int exit_ = -1;
};

std::unique_ptr<httplib::Client> client(int port, const std::string& key = kKey) {
  auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
  if (!key.empty()) c->set_default_headers({{"Authorization", "Bearer " + key}});
  c->set_read_timeout(std::chrono::seconds(600));
  c->set_write_timeout(std::chrono::seconds(60));
  return c;
}

Json post_json(httplib::Client& c, const std::string& path, const Json& body, int want = 200) {
  auto res = c.Post(path.c_str(), body.dump(), "application/json");
  if (!res) {
    ADD_FAILURE() << path << ": no response (" << httplib::to_string(res.error()) << ")";
    return Json();
  }
  EXPECT_EQ(res->status, want) << path << " " << body.dump() << " -> " << res->body;
  Json j = Json::parse(res->body, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << res->body;
  return j;
}

// Runs a shell command; its stdout (stderr to the test's stderr).
std::string shell(const std::string& cmd, int* rc = nullptr) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  if (rc) *rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return out;
}

bool have(const std::string& command) {
  return std::system(("command -v " + command + " >/dev/null 2>&1").c_str()) == 0;
}

std::string node_skip_reason() {
  if (!have("node")) return "node is not installed (scripts/setup.sh installs nodejs)";
  if (!fs::exists(modules_parent() + "/node_modules/openai/package.json"))
    return "the openai npm client is not in " + modules_parent() +
           "/node_modules (scripts/setup.sh installs it)";
  return "";
}

// A conversation of about `tokens` tokens of the demo's validation text, ending with a user turn.
Json long_conversation(const Tokenizer& tok, int tokens, const std::string& system) {
  const std::string text = test::read_file(test::data_dir() + "/demo/valid.txt");
  Json msgs = Json::array({Json{{"role", "system"}, {"content", system}}});
  size_t at = 0;
  int n = 0;
  for (int turn = 0; n < tokens && at < text.size(); turn++) {
    const std::string piece = text.substr(at, 600);
    at += 600;
    n += int(tok.encode(piece).size()) + 5;
    msgs.push_back(Json{{"role", turn % 2 == 0 ? "user" : "assistant"}, {"content", piece}});
  }
  if (msgs.back()["role"] != "user") msgs.push_back(Json{{"role", "user"}, {"content", "Go on."}});
  return msgs;
}

// The server most tests share: 2 slots, an API key, a 1 MiB body limit.
class ServerProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    srv_ = new ServerProcess({"--parallel", "2", "--api-key", kKey, "--max-body", "1MiB"});
  }
  static void TearDownTestSuite() {
    if (srv_ && srv_->ok()) {
      EXPECT_EQ(srv_->stop(), 0) << srv_->log();
    }
    delete srv_;
    srv_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(srv_ && srv_->ok()) << (srv_ ? srv_->log() : ""); }
  static ServerProcess* srv_;
};
ServerProcess* ServerProcessTest::srv_ = nullptr;

TEST_F(ServerProcessTest, HealthModelsTokenize) {
  auto c = client(srv_->port());
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(Json::parse(h->body)["status"], "ok");
  auto m = c->Get("/v1/models");
  ASSERT_TRUE(m);
  const Json models = Json::parse(m->body);
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "demo");
  const Json t = post_json(*c, "/tokenize", Json{{"content", "In the beginning"}});
  ASSERT_TRUE(t["tokens"].is_array());
  EXPECT_GT(t["tokens"].size(), 1u);
  const Json d = post_json(*c, "/detokenize", Json{{"tokens", t["tokens"]}});
  EXPECT_EQ(d["content"], "In the beginning");
  const Json p = post_json(*c, "/tokenize", Json{{"content", "In"}, {"with_pieces", true}});
  EXPECT_EQ(p["tokens"][0]["piece"], "In");
}

TEST_F(ServerProcessTest, ChatAndCompletions) {
  auto c = client(srv_->port());
  const Json body = {{"messages", Json::array({Json{{"role", "user"}, {"content", "Hello"}}})},
                     {"max_tokens", 8},
                     {"seed", 3}};
  const Json r = post_json(*c, "/v1/chat/completions", body);
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_TRUE(r["id"].get<std::string>().starts_with("chatcmpl-"));
  EXPECT_EQ(r["model"], "demo");
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(r["choices"][0]["message"]["content"].is_string());
  EXPECT_LE(r["usage"]["completion_tokens"].get<int>(), 8);
  EXPECT_EQ(post_json(*c, "/v1/chat/completions", body)["choices"][0]["message"]["content"],
            r["choices"][0]["message"]["content"])
      << "same seed, same text";

  const Json t = post_json(*c, "/tokenize", Json{{"content", "And God said"}});
  const Json cr = post_json(*c, "/v1/completions",
                            Json{{"prompt", t["tokens"]}, {"max_tokens", 6}, {"temperature", 0}});
  const Json cs = post_json(*c, "/v1/completions",
                            Json{{"prompt", "And God said"}, {"max_tokens", 6}, {"temperature", 0}});
  EXPECT_EQ(cr["object"], "text_completion");
  EXPECT_EQ(cr["choices"][0]["text"], cs["choices"][0]["text"]);
  EXPECT_EQ(cr["usage"]["prompt_tokens"], t["tokens"].size());
  // max_tokens is honoured exactly when EOS is ignored.
  const Json n = post_json(*c, "/v1/completions",
                           Json{{"prompt", "And"}, {"max_tokens", 5}, {"ignore_eos", true}});
  EXPECT_EQ(n["usage"]["completion_tokens"], 5);
  EXPECT_EQ(n["choices"][0]["finish_reason"], "length");
}

// Splits an SSE body into its events' data; checks the framing on the way.
std::vector<std::string> sse_data(const std::string& body) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < body.size()) {
    const size_t end = body.find("\n\n", at);
    EXPECT_NE(end, std::string::npos) << "unterminated event: " << body.substr(at);
    if (end == std::string::npos) break;
    const std::string ev = body.substr(at, end - at);
    EXPECT_TRUE(ev.starts_with("data: ")) << ev;
    EXPECT_EQ(ev.find('\n'), std::string::npos) << "multi-line event: " << ev;
    out.push_back(ev.substr(6));
    at = end + 2;
  }
  return out;
}

TEST_F(ServerProcessTest, SseFramingWithCurl) {
  if (!have("curl")) MF_SKIP_OR_FAIL_IN_CI("curl is not installed (scripts/setup.sh installs it)");
  const Json body = {
      {"messages", Json::array({Json{{"role", "user"}, {"content", "Let there be light"}}})},
      {"max_tokens", 12},
      {"temperature", 0.8},
      {"seed", 11},
      {"stream", true},
      {"stream_options", {{"include_usage", true}}}};
  test::TempDir tmp;
  {
    std::ofstream(tmp / "body.json") << body.dump();
  }
  const std::string cmd = fmt::format(
      "curl -sS -N --max-time 300 -D {} -H 'Authorization: Bearer {}' -H 'Content-Type: "
      "application/json' --data-binary @{} http://127.0.0.1:{}/v1/chat/completions",
      tmp / "headers", kKey, tmp / "body.json", srv_->port());
  int rc = 0;
  const std::string out = shell(cmd, &rc);
  ASSERT_EQ(rc, 0) << out;
  const std::string headers = slurp(tmp / "headers");
  EXPECT_NE(headers.find("HTTP/1.1 200"), std::string::npos) << headers;
  EXPECT_NE(headers.find("Content-Type: text/event-stream"), std::string::npos) << headers;
  EXPECT_NE(headers.find("Transfer-Encoding: chunked"), std::string::npos) << headers;

  const std::vector<std::string> data = sse_data(out);
  ASSERT_GE(data.size(), 4u) << out;
  EXPECT_EQ(data.back(), "[DONE]");
  std::string content;
  std::string finish;
  Json usage;
  std::string id;
  for (size_t i = 0; i + 1 < data.size(); i++) {
    const Json j = Json::parse(data[i]);
    if (id.empty()) id = j["id"];
    EXPECT_EQ(j["id"], id) << "one id for the whole stream";
    EXPECT_EQ(j["object"], "chat.completion.chunk");
    if (i == 0) {
      EXPECT_EQ(j["choices"][0]["delta"]["role"], "assistant");
    }
    if (i + 2 == data.size()) {  // the usage chunk
      EXPECT_TRUE(j["choices"].empty());
      usage = j["usage"];
      continue;
    }
    EXPECT_TRUE(j["usage"].is_null());
    const Json& ch = j["choices"][0];
    if (ch["delta"].contains("content")) content += ch["delta"]["content"].get<std::string>();
    if (!ch["finish_reason"].is_null()) {
      EXPECT_TRUE(finish.empty()) << "two finish chunks";
      finish = ch["finish_reason"];
    }
  }
  EXPECT_TRUE(finish == "stop" || finish == "length") << finish;
  ASSERT_TRUE(usage.is_object());

  Json plain = body;
  plain.erase("stream");
  plain.erase("stream_options");
  auto c = client(srv_->port());
  const Json r = post_json(*c, "/v1/chat/completions", plain);
  EXPECT_EQ(content, r["choices"][0]["message"]["content"].get<std::string>());
  EXPECT_EQ(usage["completion_tokens"], r["usage"]["completion_tokens"]);
  EXPECT_EQ(finish, r["choices"][0]["finish_reason"].get<std::string>());

  // Completions stream too, ending with [DONE].
  Json cbody = {{"prompt", "In the beginning"}, {"max_tokens", 5}, {"stream", true}, {"seed", 2}};
  {
    std::ofstream(tmp / "c.json") << cbody.dump();
  }
  const std::string cout = shell(fmt::format(
      "curl -sS -N --max-time 300 -H 'Authorization: Bearer {}' --data-binary @{} "
      "http://127.0.0.1:{}/v1/completions",
      kKey, tmp / "c.json", srv_->port()));
  const std::vector<std::string> cdata = sse_data(cout);
  ASSERT_GE(cdata.size(), 2u);
  EXPECT_EQ(cdata.back(), "[DONE]");
  EXPECT_EQ(Json::parse(cdata[0])["object"], "text_completion");
}

TEST_F(ServerProcessTest, BadRequestsGetTheir4xx) {
  auto c = client(srv_->port());
  auto expect_error = [&](const httplib::Result& res, int status, const std::string& param,
                          const std::string& what) {
    ASSERT_TRUE(res) << what;
    EXPECT_EQ(res->status, status) << what << ": " << res->body;
    const Json j = Json::parse(res->body, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << what << ": " << res->body;
    const Json& e = j["error"];
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << what;
    EXPECT_TRUE(e["type"].is_string()) << what;
    EXPECT_TRUE(e.contains("param") && e.contains("code")) << what;
    if (param.empty()) {
      EXPECT_TRUE(e["param"].is_null()) << what << ": " << res->body;
    } else {
      EXPECT_EQ(e["param"], param) << what << ": " << res->body;
    }
    EXPECT_NE(res->get_header_value("Content-Type").find("application/json"), std::string::npos);
  };
  const std::string chat = "/v1/chat/completions";
  auto post = [&](const std::string& path, const std::string& body) {
    return c->Post(path.c_str(), body, "application/json");
  };
  expect_error(post(chat, "{\"messages\": [}"), 400, "", "malformed JSON");
  expect_error(post(chat, "[]"), 400, "", "not an object");
  expect_error(post(chat, R"({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"})"),
               400, "temperature", "wrong type");
  expect_error(post(chat, R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"})"),
               400, "max_tokens", "wrong type");
  expect_error(post(chat, R"({"messages": [{"role": "user", "content": "x"}], "n": 3})"), 400, "n",
               "n > 1");
  expect_error(post(chat, R"({"model": "demo"})"), 400, "messages", "no messages");
  expect_error(post("/v1/completions", R"({"prompt": {"a": 1}})"), 400, "prompt", "bad prompt");
  expect_error(post("/v1/completions", R"({"prompt": ""})"), 400, "prompt", "empty prompt");
  expect_error(post("/v1/completions", R"({"prompt": [1, 99999]})"), 400, "prompt[1]",
               "token out of range");
  expect_error(post("/detokenize", R"({"tokens": [1, -1]})"), 400, "tokens[1]", "bad id");
  expect_error(post("/tokenize", R"({"content": 1})"), 400, "content", "bad content");
  // A prompt longer than the context (4096).
  std::string long_prompt;
  while (long_prompt.size() < 40000) long_prompt += "And it came to pass, ";
  auto res = post("/v1/completions", Json{{"prompt", long_prompt}}.dump());
  expect_error(res, 400, "prompt", "too many tokens");
  EXPECT_EQ(Json::parse(res->body)["error"]["code"], "context_length_exceeded");
  // A body over the limit is refused before it is read: see HostileRequestsGet4xx..., which
  // sends it on a raw socket (this client dies of SIGPIPE when the server stops reading).
  // Unknown routes and methods.
  auto nf = c->Get("/v1/nothing");
  expect_error(nf, 404, "", "unknown route");
  expect_error(c->Get(chat.c_str()), 404, "", "GET on a POST route");
  // The API key.
  auto nokey = client(srv_->port(), "");
  expect_error(nokey->Get("/v1/models"), 401, "", "no key");
  expect_error(nokey->Post(chat.c_str(), "{}", "application/json"), 401, "", "no key, POST");
  auto wrong = client(srv_->port(), kKey + "x");
  expect_error(wrong->Get("/v1/models"), 401, "", "wrong key");
  auto health = nokey->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200) << "/health needs no key";
  // The server is still fine.
  post_json(*c, chat, Json{{"messages", user_msgs()}, {"max_tokens", 2}});
}

// One raw HTTP exchange on a fresh connection: sends `head`, then `body` in 64 KiB pieces (a
// send the server refuses by closing ends it), then reads until the server closes or `deadline`.
std::string raw_exchange(int port, const std::string& head, const std::string& body,
                         Clock::time_point deadline) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return "";
  }
  timeval tv{0, 100000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  auto drain = [&] {  // what has arrived so far, without waiting
    char buf[4096];
    for (ssize_t n; (n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0;) out.append(buf, size_t(n));
  };
  bool ok = send(fd, head.data(), head.size(), MSG_NOSIGNAL) == ssize_t(head.size());
  for (size_t at = 0; ok && at < body.size() && Clock::now() < deadline; at += 65536) {
    const size_t n = std::min<size_t>(65536, body.size() - at);
    ok = send(fd, body.data() + at, n, MSG_NOSIGNAL) == ssize_t(n);
    drain();
  }
  auto complete = [&] {  // one whole response (httplib sends a Content-Length with each)
    const size_t end = out.find("\r\n\r\n");
    const size_t cl = out.find("Content-Length: ");
    if (end == std::string::npos || cl == std::string::npos || cl > end) return false;
    return out.size() >= end + 4 + std::stoull(out.substr(cl + 16, end - cl - 16));
  };
  while (Clock::now() < deadline && !complete()) {
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n > 0) out.append(buf, size_t(n));
    else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) break;
  }
  close(fd);
  return out;
}

// Requests from a hostile client: JSON nested 100,000 deep in any field (once a stack overflow
// that killed the server), a chunked body over --max-body (once read without bound), an absurd
// Content-Length (once refused only after the read timeout). Each gets its 4xx, and the server
// stays up.
TEST_F(ServerProcessTest, HostileRequestsGet4xxAndTheServerStaysUp) {
  auto c = client(srv_->port());
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string deep_obj = [] {
    std::string s;
    for (int i = 0; i < 100000; i++) s += "{\"a\":";
    return s + "1" + std::string(100000, '}');
  }();
  const std::string user = R"({"role": "user", "content": "hi"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"content", R"({"messages": [{"role": "user", "content": )" + deep + "}]}"},
      {"role", R"({"messages": [{"role": )" + deep + R"(, "content": "hi"}]})"},
      {"name", R"({"messages": [{"role": "user", "content": "hi", "name": )" + deep_obj + "}]}"},
      {"extra key", R"({"messages": [)" + user + R"(], "x": )" + deep + "}"},
      {"chat_template_kwargs", R"({"messages": [)" + user + R"(], "chat_template_kwargs": {"k": )" +
                                   deep_obj + "}}"},
      {"prompt", R"({"prompt": )" + deep + "}"},
  };
  for (const auto& [what, body] : cases) {
    SCOPED_TRACE(what);
    const std::string path = what == "prompt" ? "/v1/completions" : "/v1/chat/completions";
    auto res = c->Post(path.c_str(), body, "application/json");
    ASSERT_TRUE(res) << httplib::to_string(res.error()) << "\n" << srv_->log();
    EXPECT_EQ(res->status, 400) << res->body;
    const Json j = Json::parse(res->body, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << res->body;
    EXPECT_NE(j["error"]["message"].get<std::string>().find("nested deeper than 64 levels"),
              std::string::npos)
        << res->body;
    EXPECT_EQ(j["error"]["code"], "invalid_json");
    EXPECT_TRUE(srv_->alive()) << srv_->log();
  }
  // Nesting within the limit still works (a content list).
  post_json(*c, "/v1/chat/completions",
            Json{{"messages", Json::array({Json{{"role", "user"},
                                                {"content", Json::array({Json{
                                                    {"type", "text"}, {"text", "hi"}}})}}})},
                 {"max_tokens", 1}});

  const auto deadline = [] { return Clock::now() + std::chrono::seconds(30); };
  const std::string auth = "Authorization: Bearer " + kKey + "\r\n";
  // A chunked body over the 1 MiB limit: 413 once the limit is passed.
  std::string chunked;
  for (int i = 0; i < 40; i++) chunked += "10000\r\n" + std::string(65536, ' ') + "\r\n";
  chunked += "0\r\n\r\n";
  std::string reply = raw_exchange(srv_->port(),
                                   "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                                       "Content-Type: application/json\r\n"
                                       "Transfer-Encoding: chunked\r\n\r\n",
                                   chunked, deadline());
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 413")) << reply.substr(0, 400);
  EXPECT_NE(reply.find("--max-body"), std::string::npos) << reply.substr(0, 400);
  // A body for a route that takes none is not read (httplib would read it whole first).
  for (const std::string line : {"POST /v1/nothing", "PUT /v1/chat/completions"}) {
    reply = raw_exchange(srv_->port(),
                         line + " HTTP/1.1\r\nHost: x\r\n" + auth +
                             "Transfer-Encoding: chunked\r\n\r\n",
                         chunked, deadline());
    EXPECT_TRUE(reply.starts_with("HTTP/1.1 404")) << line << ": " << reply.substr(0, 400);
  }
  // A small chunked body is read whole.
  const std::string ok_body = R"({"content": "hi"})";
  reply = raw_exchange(srv_->port(),
                       "POST /tokenize HTTP/1.1\r\nHost: x\r\n" + auth +
                           "Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
                       fmt::format("{:x}\r\n{}\r\n0\r\n\r\n", ok_body.size(), ok_body),
                       deadline());
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 200")) << reply;
  // A body just over the limit (1 MiB) with its Content-Length: 413 from the headers alone, read
  // by a client still sending (the server does not read the rest).
  reply = raw_exchange(srv_->port(),
                       "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                           "Content-Type: application/json\r\nContent-Length: 1100002\r\n\r\n",
                       std::string(1100000, ' ') + "{}", deadline());
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 413")) << reply.substr(0, 400);
  EXPECT_NE(reply.find("request_too_large"), std::string::npos) << reply.substr(0, 400);
  // An absurd Content-Length: 413 without a byte of the body sent (no wait for a read timeout;
  // the deadline only bounds a failure).
  reply = raw_exchange(srv_->port(),
                       "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                           "Content-Length: 99999999999999\r\n\r\n",
                       "", deadline());
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 413")) << reply;
  reply = raw_exchange(srv_->port(),
                       "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                           "Content-Length: 99999999999999999999999999\r\n\r\n",
                       "", deadline());
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 413")) << reply;
  // The server is still fine.
  EXPECT_TRUE(srv_->alive()) << srv_->log();
  post_json(*c, "/v1/chat/completions", Json{{"messages", user_msgs()}, {"max_tokens", 2}});
}

// A second server on a port already taken fails to start, naming host:port (httplib's default
// SO_REUSEPORT once let both listen and share the connections).
TEST_F(ServerProcessTest, SecondServerOnATakenPortExits) {
  const std::string addr = fmt::format("127.0.0.1:{}", srv_->port());
  int rc = 0;
  const std::string out =
      shell(fmt::format("timeout 300 {} serve --port {} 2>&1", MOEFLUX_BIN, srv_->port()), &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(rc, 124) << "still running after 300 s: " << out;
  EXPECT_NE(out.find("cannot bind " + addr), std::string::npos) << out;
  EXPECT_TRUE(srv_->alive()) << srv_->log();
}

TEST_F(ServerProcessTest, Metrics) {
  auto c = client(srv_->port());
  post_json(*c, "/v1/chat/completions", Json{{"messages", user_msgs()}, {"max_tokens", 3}});
  auto m = c->Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  EXPECT_NE(m->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  const std::string& t = m->body;
  std::smatch match;
  EXPECT_TRUE(std::regex_search(
      t, match,
      std::regex(R"(moeflux_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\d+))")))
      << t;
  EXPECT_TRUE(std::regex_search(t, match, std::regex(R"(moeflux_tokens_generated_total (\d+))")));
  EXPECT_GT(std::stol(match[1]), 0);
  EXPECT_TRUE(std::regex_search(t, match, std::regex(R"(moeflux_expert_requests_total (\d+))")));
  EXPECT_GT(std::stol(match[1]), 0);
  for (const char* name : {"moeflux_expert_cache_hits_total", "moeflux_expert_cache_misses_total",
                           "moeflux_expert_bytes_read_total", "moeflux_generation_tokens_per_second",
                           "moeflux_prompt_tokens_per_second", "moeflux_slots 2"})
    EXPECT_NE(t.find(name), std::string::npos) << name;
}

TEST_F(ServerProcessTest, OpenAiNodeClient) {
  const std::string why = node_skip_reason();
  if (!why.empty()) MF_SKIP_OR_FAIL_IN_CI(why);
  int rc = 0;
  const std::string out =
      shell(fmt::format("node {}/tests/server/openai_client.mjs http://127.0.0.1:{}/v1 {} {} 2>&1",
                        MOEFLUX_SOURCE_DIR, srv_->port(), modules_parent(), kKey),
            &rc);
  EXPECT_EQ(rc, 0) << out << "\nserver log:\n" << srv_->log();
  EXPECT_NE(out.find("\"ok\":true"), std::string::npos) << out;
}

TEST_F(ServerProcessTest, LoadTest) {
  const std::string why = node_skip_reason();
  if (!why.empty()) MF_SKIP_OR_FAIL_IN_CI(why);
  auto run_load = [&](int clients, int requests, int max_tokens, Json* result) {
    int rc = 0;
    const std::string out = shell(
        fmt::format("node {}/tests/server/load.mjs http://127.0.0.1:{}/v1 {} {} {} {} {} 2>&1",
                    MOEFLUX_SOURCE_DIR, srv_->port(), modules_parent(), kKey, clients, requests,
                    max_tokens),
        &rc);
    EXPECT_EQ(rc, 0) << out;
    *result = Json::parse(out.substr(0, out.find('\n')), nullptr, false);
  };
  // Warm-up: every slot has run, the worker threads exist.
  Json warm;
  run_load(8, 1, 8, &warm);
  const long rss0 = srv_->rss_kib();
  Json r;
  const auto t0 = Clock::now();
#if MF_TEST_ASAN
  run_load(8, 5, 8, &r);  // the same shape, fewer rounds: ASan is ~10x slower
#else
  run_load(8, 20, 8, &r);
#endif
  const double secs = since(t0);
  const long rss1 = srv_->rss_kib();
  ASSERT_FALSE(r.is_discarded());
  EXPECT_EQ(r["errors"], 0) << r.dump();
  EXPECT_EQ(r["mismatches"], 0) << r.dump();
  EXPECT_TRUE(srv_->alive());
  auto c = client(srv_->port());
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  // RSS: sessions, thread stacks and caches exist after the warm-up; the load adds at most a
  // little (allocator slack), not per-request growth. Under ASan freed memory sits in its
  // quarantine (up to 256 MiB), so RSS says nothing there; LeakSanitizer checks the server's
  // exit instead (TearDownTestSuite expects status 0).
#if !MF_TEST_ASAN
  EXPECT_LT(rss1 - rss0, 32 * 1024) << "RSS grew from " << rss0 << " to " << rss1 << " KiB";
#endif
  std::fprintf(stderr, "[ load ] %s in %.1f s; RSS %ld -> %ld KiB\n", r.dump().c_str(), secs,
               rss0, rss1);
}

// Time to first token of a 2,000-token conversation's next turn, with and without the cache.
TEST_F(ServerProcessTest, PromptCacheTimeToFirstToken) {
  auto c = client(srv_->port());
  const Tokenizer tok = Tokenizer::load(demo_dir() + "/tokenizer.json");
#if MF_TEST_ASAN
  const int rounds = 1;
#else
  const int rounds = 3;
#endif
  std::vector<double> with, without;
  int prompt_tokens = 0, cached_tokens = 0;
  for (int i = 0; i < rounds; i++) {
    Json msgs = long_conversation(tok, 1700, fmt::format("Conversation {}.", i));
    const Json a = post_json(*c, "/v1/chat/completions",
                             Json{{"messages", msgs}, {"max_tokens", 16}, {"temperature", 0}});
    msgs.push_back(Json{{"role", "assistant"}, {"content", a["choices"][0]["message"]["content"]}});
    msgs.push_back(Json{{"role", "user"}, {"content", "And then?"}});
    // max_tokens 1: the request's latency is its time to first token.
    auto ttft = [&](bool cache, Json* usage) {
      const auto t0 = Clock::now();
      const Json r = post_json(*c, "/v1/chat/completions",
                               Json{{"messages", msgs}, {"max_tokens", 1}, {"temperature", 0},
                                    {"cache_prompt", cache}});
      *usage = r["usage"];
      return since(t0);
    };
    Json u1, u2;
    with.push_back(ttft(true, &u1));
    without.push_back(ttft(false, &u2));
    prompt_tokens = u1["prompt_tokens"];
    cached_tokens = u1["prompt_tokens_details"]["cached_tokens"];
    EXPECT_GT(cached_tokens, prompt_tokens - 80) << "the next turn should reuse the conversation";
    EXPECT_EQ(u2["prompt_tokens_details"]["cached_tokens"], 0);
  }
  std::sort(with.begin(), with.end());
  std::sort(without.begin(), without.end());
  const double w = with[with.size() / 2], wo = without[without.size() / 2];
  std::fprintf(stderr,
               "[ ttft ] next turn of a %d-token conversation (%d cached): %.1f ms with the "
               "prompt cache, %.1f ms without (median of %d)\n",
               prompt_tokens, cached_tokens, w * 1e3, wo * 1e3, rounds);
  EXPECT_GT(prompt_tokens, 1800);
  // The cache's reuse is checked above by token counts (what it saves is evaluating them); the
  // times are a measurement, printed, not compared: a comparison would depend on the load.
}

// Sends a POST over a socket of its own and returns the socket (to read from and hang up).
int raw_post(int port, const std::string& path, const std::string& body) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string req = fmt::format(
      "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      "Content-Length: {}\r\n\r\n{}",
      path, body.size(), body);
  EXPECT_EQ(write(fd, req.data(), req.size()), ssize_t(req.size()));
  return fd;
}

// Retries a short request while the server answers 503; the seconds until it was served (1e9
// when not within 60 s).
double served_after_hangup(httplib::Client& c) {
  const Json body = {{"prompt", "And"}, {"max_tokens", 4}};
  const auto t0 = Clock::now();
  for (;;) {
    auto r = c.Post("/v1/completions", body.dump(), "application/json");
    if (!r) {
      ADD_FAILURE() << "no response";
      return 1e9;
    }
    if (r->status != 503) {
      EXPECT_EQ(r->status, 200) << r->body;
      return since(t0);
    }
    if (since(t0) > 60) return 1e9;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

long metric(httplib::Client& c, const std::string& name) {
  auto m = c.Get("/metrics");
  if (!m) return -1;
  std::smatch match;
  if (!std::regex_search(m->body, match, std::regex("\\n" + name + " (\\d+)"))) return -1;
  return std::stol(match[1]);
}

// One slot, no queue: a second request while the first runs gets 503; a client that hangs up
// mid-stream, or while waiting for a non-streamed answer, frees the slot for the next request.
TEST(ServerDisconnect, HangUpFreesTheSlot) {
  ServerProcess srv({"--parallel", "1", "--queue", "0"});
  ASSERT_TRUE(srv.ok()) << srv.log();
  auto c = client(srv.port(), "");
  // Generations that would run until the context (4096) is full.
  const Json endless = {{"prompt", "In the beginning"}, {"ignore_eos", true}};
  Json streamed = endless;
  streamed["stream"] = true;
  int fd = raw_post(srv.port(), "/v1/completions", streamed.dump());
  std::string got;
  char buf[4096];
  const auto t0 = Clock::now();
  while (std::count(got.begin(), got.end(), '\n') < 20 && since(t0) < 120) {
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    got.append(buf, size_t(n));
  }
  ASSERT_NE(got.find("data: "), std::string::npos) << got;

  // The slot is busy and there is no queue: 503 in OpenAI's shape.
  auto busy = c->Post("/v1/completions", Json{{"prompt", "And"}, {"max_tokens", 4}}.dump(),
                      "application/json");
  ASSERT_TRUE(busy);
  EXPECT_EQ(busy->status, 503) << busy->body;
  EXPECT_EQ(Json::parse(busy->body)["error"]["code"], "server_busy");
  EXPECT_FALSE(busy->get_header_value("Retry-After").empty());

  close(fd);
  const double wait_stream = served_after_hangup(*c);
  // Served at all is the check (the slot was freed), and the cancelled generation stopped
  // (counted as cancelled; the token count below shows it did not run on to the context's end).
  EXPECT_LT(wait_stream, 1e9) << "the hung-up stream kept the slot";
  EXPECT_EQ(metric(*c, "moeflux_generations_cancelled_total"), 1);

  // Not streamed: nothing is written until the end, so the hang-up is seen on the socket.
  // Hang up once it holds the slot (polled, no guessed sleep): from there the generation sees
  // the cancel flag the hang-up sets, whether it is still on the prompt or already sampling,
  // and counts as cancelled.
  fd = raw_post(srv.port(), "/v1/completions", endless.dump());
  EXPECT_TRUE(wait_until([&] { return metric(*c, "moeflux_slots_busy") == 1; }))
      << "the second endless request did not get the slot";
  close(fd);
  const double wait_plain = served_after_hangup(*c);
  EXPECT_LT(wait_plain, 1e9) << "the hung-up request kept the slot";
  EXPECT_EQ(metric(*c, "moeflux_generations_cancelled_total"), 2);
  EXPECT_LT(metric(*c, "moeflux_tokens_generated_total"), 4000) << "a cancelled generation ran on";
  std::fprintf(stderr,
               "[ disconnect ] next request served %.0f ms after a stream's hang-up, %.0f ms "
               "after a waiting client's\n",
               wait_stream * 1e3, wait_plain * 1e3);
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

// A thinking model (the qwen3_5_moe fixture with a byte-level tokenizer that has <think> and
// </think>, and a Qwen3-style template whose generation prompt opens <think>): the reasoning
// comes back apart from the answer, streamed or not, and enable_thinking=false turns it off.
TEST(ServerThinking, ReasoningContentAndNoThink) {
  test::TempDir root;
  const std::string dir = root / "pkg";
  fs::copy(test::converted_fixture("qwen3_5_moe"), dir, fs::copy_options::recursive);
  std::ofstream(dir + "/tokenizer.json") << test::byte_tokenizer_json();
  const std::string tmpl =
      "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
      "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
      "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
      "{%- else %}<think>\n{%- endif %}{%- endif %}";
  std::ofstream(dir + "/tokenizer_config.json")
      << Json{{"chat_template", tmpl}, {"eos_token", "<|im_end|>"}}.dump();
  ServerProcess srv({"-m", dir});
  ASSERT_TRUE(srv.ok()) << srv.log();
  auto c = client(srv.port(), "");
  // Lower-case letters only, so the random model writes no tags, EOS or broken UTF-8.
  Json bias = Json::object();
  for (int id = 0; id < 1024; id++)
    if (id < 261) bias[std::to_string(id)] = -100;
  Json body = {{"messages", user_msgs()},
               {"max_tokens", 12},
               {"think_budget", 3},
               {"seed", 1},
               {"logit_bias", bias}};
  const Json r = post_json(*c, "/v1/chat/completions", body);
  const Json& msg = r["choices"][0]["message"];
  ASSERT_TRUE(msg.contains("reasoning_content")) << r.dump();
  const std::string reasoning = msg["reasoning_content"], content = msg["content"];
  EXPECT_FALSE(reasoning.empty());
  EXPECT_FALSE(content.empty());
  for (const std::string& s : {reasoning, content}) {
    EXPECT_EQ(s.find("<think>"), std::string::npos) << s;
    EXPECT_EQ(s.find("</think>"), std::string::npos) << s;
  }
  EXPECT_NE(content[0], '\n');

  // Streamed: reasoning_content deltas, then content deltas, the same texts.
  Json sbody = body;
  sbody["stream"] = true;
  auto res = c->Post("/v1/chat/completions", sbody.dump(), "application/json");
  ASSERT_TRUE(res);
  std::string sr, sc;
  for (const std::string& d : sse_data(res->body)) {
    if (d == "[DONE]") break;
    const Json delta = Json::parse(d)["choices"][0]["delta"];
    if (delta.contains("reasoning_content")) {
      EXPECT_TRUE(sc.empty()) << "reasoning after the answer";
      sr += delta["reasoning_content"].get<std::string>();
    }
    if (delta.contains("content")) sc += delta["content"].get<std::string>();
  }
  EXPECT_EQ(sr, reasoning);
  EXPECT_EQ(sc, content);

  // enable_thinking=false: the template closes the thinking, so all of it is answer.
  body["chat_template_kwargs"] = {{"enable_thinking", false}};
  const Json nt = post_json(*c, "/v1/chat/completions", body);
  EXPECT_FALSE(nt["choices"][0]["message"].contains("reasoning_content")) << nt.dump();
  EXPECT_EQ(nt["usage"]["completion_tokens"], 12);
  EXPECT_EQ(srv.stop(), 0) << srv.log();

  // --no-think does the same for every request.
  ServerProcess nothink({"-m", dir, "--no-think"});
  ASSERT_TRUE(nothink.ok()) << nothink.log();
  body.erase("chat_template_kwargs");
  auto c2 = client(nothink.port(), "");
  const Json nt2 = post_json(*c2, "/v1/chat/completions", body);
  EXPECT_FALSE(nt2["choices"][0]["message"].contains("reasoning_content")) << nt2.dump();
  EXPECT_EQ(nt2["choices"][0]["message"]["content"], nt["choices"][0]["message"]["content"]);
}

}  // namespace
}  // namespace moeflux
