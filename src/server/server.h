// `moeflux serve`: an OpenAI-compatible HTTP/1.1 server (cpp-httplib) over a SlotPool.
//
//   POST /v1/chat/completions   messages through the chat template; SSE when "stream": true
//   POST /v1/completions        a prompt string (or token ids)
//   GET  /v1/models, /health, /metrics (Prometheus text)
//   POST /tokenize, /detokenize (llama.cpp server's shapes)
//
// Each generation request runs on the HTTP worker thread that read it, on a slot taken from
// the pool (see slots.h for admission, queueing and the prompt cache). A watcher thread polls
// the sockets of running requests; a client that goes away (or a failed write of a stream
// chunk) sets the request's cancel flag, which generate() checks before every token, so its
// slot is free again within a token. Errors are OpenAI's {"error": {...}} with a 4xx/5xx status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace moeflux::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (bind() returns it)
  std::string api_key;  // non-empty: every route but /health needs "Authorization: Bearer KEY"
  int parallel = 1;     // slots
  int queue = 16;       // requests that may wait for a slot; beyond: 503
  int threads_per_slot = 0;  // CPU backend threads of each slot (0: one per core)
  bool exact = true;         // ContextOptions::exact of each slot
  size_t max_body = size_t(8) << 20;  // request bytes; beyond: 413
  bool no_think = false;     // render chat templates with enable_thinking = false by default
  bool prompt_cache = true;  // reuse slot state across requests
  int think_budget = -1;     // default for requests: force </think> after N thinking tokens
  std::string model_name;    // what /v1/models reports and responses echo
  SessionParams session;     // per slot (ctx, experts per token)
  bool verbose = false;      // one stderr line per request
};

class Server {
 public:
  // `tmpl`: the model's chat template or ChatTemplate::builtin_chatml(). `eos_ids`: tokens that
  // end a generation (eos_token_ids()). Creates the slots; throws Error on bad options.
  Server(const Model& model, ExpertStore& store, const Tokenizer& tokenizer, ChatTemplate tmpl,
         std::vector<int32_t> eos_ids, ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port; returns the port (the chosen one for port 0). Throws Error(kIo).
  int bind();
  // Serves until stop(). Call bind() first.
  void run();
  // Stops accepting, cancels running generations, makes run() return. Any thread.
  void stop();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moeflux::server
