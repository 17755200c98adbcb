// `moeflux serve`: the OpenAI-compatible HTTP server (src/server/server.h) on one package.
#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "engine/generate.h"
#include "server/server.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "util/error.h"
#include "util/json.h"
#include "util/thread_pool.h"

namespace moeflux::cli {
namespace {

namespace fs = std::filesystem;

struct ServeFlags {
  ModelOptions mo;
  server::ServerOptions so;
  std::string tokenizer;  // tokenizer.json (or its directory) instead of the package's
  std::string alias;
  std::string max_body = "8MiB";
  int threads_per_slot = 0;
  bool no_prompt_cache = false;
};

// The package's tokenizer, chat template (or built-in ChatML) and eos token.
struct Text {
  std::unique_ptr<Tokenizer> tok;
  std::optional<ChatTemplate> tmpl;
  std::string eos_token, template_source = "built-in ChatML";
};

Text load_text(const std::string& package, const std::string& tokenizer_flag) {
  std::error_code ec;
  fs::path tj = tokenizer_flag.empty() ? fs::path(package) : fs::path(tokenizer_flag);
  if (fs::is_directory(tj, ec)) tj /= "tokenizer.json";
  if (!fs::exists(tj, ec))
    fail(ErrorKind::kInvalidArgument,
         "{}: no tokenizer.json: copy the checkpoint's tokenizer.json (and "
         "tokenizer_config.json) into the package, or pass --tokenizer FILE",
         tj.string());
  Text t;
  t.tok = std::make_unique<Tokenizer>(Tokenizer::load(tj.string()));
  for (const fs::path& dir : {tj.parent_path(), fs::path(package)}) {
    const fs::path cfg_path = dir / "tokenizer_config.json";
    if (!fs::exists(cfg_path, ec)) continue;
    std::ifstream f(cfg_path);
    std::stringstream ss;
    ss << f.rdbuf();
    const nlohmann::json cfg = parse_json(ss.str(), cfg_path.string());
    if (auto it = cfg.find("eos_token"); it != cfg.end()) {
      if (it->is_string()) t.eos_token = it->get<std::string>();
      if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
        t.eos_token = (*it)["content"].get<std::string>();
    }
    const bool has_template = (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) ||
                              fs::exists(dir / "chat_template.jinja", ec) ||
                              fs::exists(dir / "chat_template.json", ec);
    if (has_template) {
      t.tmpl = ChatTemplate::from_tokenizer_config(cfg_path.string());
      t.template_source = cfg_path.string();
    }
    break;
  }
  return t;
}

size_t parse_bytes(const std::string& s, const std::string& flag) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) i++;
  const std::string unit = s.substr(i);
  size_t mul = 0;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "K" || unit == "KiB" || unit == "k") mul = size_t(1) << 10;
  else if (unit == "M" || unit == "MiB") mul = size_t(1) << 20;
  else if (unit == "G" || unit == "GiB") mul = size_t(1) << 30;
  if (i == 0 || i > 12 || mul == 0)
    fail(ErrorKind::kInvalidArgument, "{}: '{}' is not a size (e.g. 8MiB, 65536)", flag, s);
  return size_t(std::stoull(s.substr(0, i))) * mul;
}

int cmd_serve(ServeFlags& f) {
  if (f.so.parallel < 1 || f.so.parallel > 256)
    fail(ErrorKind::kInvalidArgument, "--parallel: {} is not in [1, 256]", f.so.parallel);
  if (f.so.queue < 0) fail(ErrorKind::kInvalidArgument, "--queue: {} is negative", f.so.queue);
  if (f.so.port < 0 || f.so.port > 65535)
    fail(ErrorKind::kInvalidArgument, "--port: {} is not in [0, 65535]", f.so.port);
  if (f.so.think_budget < -1)
    fail(ErrorKind::kInvalidArgument, "--think-budget: {} is below -1", f.so.think_budget);
  f.so.max_body = parse_bytes(f.max_body, "--max-body");
  // SIGINT/SIGTERM stop the server from a thread of their own; every other thread (the expert
  // readers and backend pools included: all are created after this) blocks them. SIGPIPE: a
  // client that hung up is seen by write's error instead.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
  const std::string package = f.mo.model.empty() ? default_model_dir() : f.mo.model;
  Text text = load_text(package, f.tokenizer);
  Loaded L = open_model(f.mo);
  const ModelSpec& spec = L.model->spec();

  // Threads: the cores are split among the slots (each slot's backend runs its own pool; on
  // the demo model two slots of one thread each beat two of two threads on 2 cores, see
  // docs/2026-11-26-server.md).
  const int cores = f.mo.threads > 0 ? f.mo.threads
                                     : int(std::max(1u, std::thread::hardware_concurrency()));
  if (f.threads_per_slot < 0)
    fail(ErrorKind::kInvalidArgument, "--threads-per-slot: {} is negative", f.threads_per_slot);
  resolve_threads(f.threads_per_slot, "--threads-per-slot");
  f.so.threads_per_slot =
      f.threads_per_slot > 0 ? f.threads_per_slot : std::max(1, cores / f.so.parallel);
  f.so.exact = f.mo.exact;
  f.so.session = session_params(f.mo);
  f.so.prompt_cache = !f.no_prompt_cache;
  f.so.model_name = !f.alias.empty() ? f.alias : fs::path(package).lexically_normal().filename().string();
  if (f.so.model_name.empty()) f.so.model_name = fs::path(package).parent_path().filename().string();
  const std::vector<int32_t> eos = eos_token_ids(spec, *text.tok, text.eos_token);

  server::Server srv(*L.model, *L.store, *text.tok,
                     text.tmpl ? *text.tmpl : ChatTemplate::builtin_chatml(), eos, f.so);
  const int port = srv.bind();
  std::thread sig_thread([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (sig != SIGUSR1) fmt::print(stderr, "moeflux serve: signal {}, stopping\n", sig);
    srv.stop();
  });
  fmt::print(stderr,
             "moeflux serve: {} ({}, context {}, {} slot{} x {} thread{}, template {}{}{})\n",
             f.so.model_name, package, f.so.session.ctx > 0 ? f.so.session.ctx : std::min(spec.ctx_train > 0 ? spec.ctx_train : 4096, 4096),
             f.so.parallel, f.so.parallel > 1 ? "s" : "", f.so.threads_per_slot,
             f.so.threads_per_slot > 1 ? "s" : "", text.template_source,
             f.so.api_key.empty() ? "" : ", API key required",
             f.so.prompt_cache ? "" : ", no prompt cache");
  fmt::print(stderr, "moeflux serve: listening on http://{}:{}\n", f.so.host, port);
  std::fflush(stderr);
  srv.run();
  pthread_kill(sig_thread.native_handle(), SIGUSR1);  // if run() ended on its own
  sig_thread.join();
  if (f.mo.stats) print_store_stats(*L.store, stderr);
  fmt::print(stderr, "moeflux serve: stopped\n");
  return 0;
}

}  // namespace

Command add_serve(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  auto* c = app.add_subcommand("serve", "OpenAI-compatible HTTP server (/v1/chat/completions, ...)");
  add_model_options(c, f->mo, /*model_required=*/false);
  c->add_option("--host", f->so.host, "address to listen on (127.0.0.1: this machine only)");
  c->add_option("--port", f->so.port, "TCP port (0: any free port, printed at start)");
  c->add_option("--api-key", f->so.api_key,
                "require \"Authorization: Bearer KEY\" on every route but /health");
  c->add_option("--parallel", f->so.parallel,
                "requests generated at once, each in a slot of its own (session + backend); "
                "-t is split among them");
  c->add_option("--threads-per-slot", f->threads_per_slot,
                "CPU threads of each slot's backend (0: -t split among the slots)");
  c->add_option("--queue", f->so.queue, "requests that may wait for a slot; more get 503");
  c->add_option("--max-body", f->max_body, "largest request body (8MiB, 65536); more gets 413");
  c->add_flag("--no-think", f->so.no_think,
              "render chat templates with enable_thinking=false unless a request's "
              "chat_template_kwargs says otherwise");
  c->add_option("--think-budget", f->so.think_budget,
                "after N thinking tokens force \"</think>\" (-1: no limit; requests may set "
                "think_budget)");
  c->add_flag("--no-prompt-cache", f->no_prompt_cache,
              "evaluate every prompt from the start (no reuse of a slot's earlier tokens)");
  c->add_option("--tokenizer", f->tokenizer,
                "tokenizer.json (or a directory holding it) instead of the package's");
  c->add_option("-a,--alias", f->alias, "model name to report (default: the package's name)");
  c->add_flag("-v,--verbose", f->so.verbose, "one line per request and generation on stderr");
  return {c, [f] { return cmd_serve(*f); }};
}

}  // namespace moeflux::cli
