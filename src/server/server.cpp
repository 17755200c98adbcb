#include "server/server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fmt/format.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "engine/generate.h"
#include "server/api.h"
#include "server/metrics.h"
#include "server/slots.h"
#include "util/error.h"

namespace moeflux::server {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string random_id(const char* prefix) {
  static const char kAlnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string s = prefix;
  for (int i = 0; i < 24; i++) s += kAlnum[rng() % (sizeof kAlnum - 1)];
  return s;
}

uint64_t random_seed() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng() >> 1;
}

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// "host:port" of a socket address as httplib writes them (getnameinfo, numeric).
bool numeric_name(const sockaddr_storage& a, socklen_t len, std::string& host, int& port) {
  char h[NI_MAXHOST], p[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, h, sizeof h, p, sizeof p,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return false;
  host = h;
  port = std::atoi(p);
  return true;
}

// The socket of the connection a request came on. httplib does not hand it to handlers, but the
// request carries both ends' addresses, which name one socket of this process. -1 if not found.
int find_client_socket(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int found = -1;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (*end || e->d_name[0] == '\0' || fd == dirfd(dir)) continue;
    struct stat st;
    if (fstat(int(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t ll = sizeof local, pl = sizeof peer;
    if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    std::string lh, ph;
    int lp = -1, pp = -1;
    if (!numeric_name(local, ll, lh, lp) || !numeric_name(peer, pl, ph, pp)) continue;
    if (lp == req.local_port && pp == req.remote_port && lh == req.local_addr &&
        ph == req.remote_addr) {
      found = int(fd);
      break;
    }
  }
  closedir(dir);
  return found;
}

// Route label for the metrics (unknown paths share one, so clients cannot grow the label set).
std::string endpoint_label(const std::string& path) {
  for (const char* p : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                        "/metrics", "/tokenize", "/detokenize", "/chat/completions",
                        "/completions", "/models"})
    if (path == p) return p;
  return "other";
}

void send_json(httplib::Response& res, int status, const Json& j) {
  res.status = status;
  res.set_content(dump(j), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status, error_json(e));
  if (e.status == 503) res.set_header("Retry-After", "1");
}

// Constant-time comparison of the API key (no early exit on the first differing byte).
bool same_secret(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); i++) diff |= uint8_t(a[i]) ^ uint8_t(b[i]);
  return diff == 0;
}

const char* status_text(int status) {
  switch (status) {
    case 400: return "Bad request.";
    case 404: return "Not found.";
    case 405: return "Method not allowed.";
    case 408: return "Request timeout.";
    case 413: return "The request body is too large.";
    case 414: return "The request URI is too long.";
    case 416: return "Range not satisfiable.";
    case 431: return "The request header fields are too large.";
    default: return status >= 500 ? "Internal server error." : "Bad request.";
  }
}

}  // namespace

// One generation request, from its parsed body to its last byte.
struct Job {
  GenRequest g;
  std::vector<int32_t> prompt;
  ResponseMeta meta;
  std::atomic<bool> cancel{false};
  int fd = -1;  // the client's socket, watched for a hang-up; -1: unknown
  Clock::time_point t0;
  std::function<void()> on_destroy;
  ~Job() {
    if (on_destroy) on_destroy();
  }
};

struct Outcome {
  bool ran = false;  // false: cancelled before a slot was free
  GenerateResult r;
  size_t cached = 0;
  std::string content, reasoning;  // chat: the split answer; completions: content = all text
  Usage usage() const {
    return {r.prompt_tokens + int(cached), int(r.tokens.size()), int(cached)};
  }
};

struct Server::Impl {
  Impl(const Model& m, ExpertStore& st, const Tokenizer& t, ChatTemplate tp,
       std::vector<int32_t> eos, ServerOptions o)
      : model(m),
        store(st),
        tok(t),
        tmpl(std::move(tp)),
        eos_ids(std::move(eos)),
        opt(std::move(o)),
        pool(m, st, opt.parallel, ContextOptions{opt.threads_per_slot, opt.exact}, opt.queue, opt.session),
        created(unix_time()) {}

  const Model& model;
  ExpertStore& store;
  const Tokenizer& tok;
  ChatTemplate tmpl;
  std::vector<int32_t> eos_ids;
  ServerOptions opt;
  SlotPool pool;
  Metrics metrics;
  httplib::Server http;
  int64_t created;

  // Running jobs, for the watcher and stop().
  std::mutex jobs_mu;
  std::condition_variable jobs_cv;
  std::map<uint64_t, Job*> jobs;
  uint64_t next_job = 0;
  bool stopping = false;
  std::thread watcher;

  void routes();
  std::set<std::string> post_paths;  // the routes that take a body (read by post() in routes())
  void refuse_too_large(httplib::Response& res) const;
  void watch();
  void handle_generate(const httplib::Request& req, httplib::Response& res, bool chat);
  std::vector<int32_t> prompt_tokens(const GenRequest& g);
  Outcome run(Job& job, const std::function<void(const ReasoningSplitter::Delta&)>& emit,
              const std::function<void(std::string_view)>& emit_raw);
  void stream(Job& job, httplib::DataSink& sink);
};

// ---------------------------------------------------------------------------------------------
// Generation.

std::vector<int32_t> Server::Impl::prompt_tokens(const GenRequest& g) {
  const char* field = g.chat ? "messages" : "prompt";
  std::vector<int32_t> ids;
  if (g.chat) {
    Json extra = Json::object();
    if (opt.no_think) extra["enable_thinking"] = false;
    for (auto& [k, v] : g.template_kwargs.items()) extra[k] = v;
    std::string text;
    try {
      text = tmpl.render_json(g.messages, /*add_generation_prompt=*/true, extra);
    } catch (const Error& e) {
      throw ApiError(400, fmt::format("The chat template failed on these messages: {}", e.what()),
                     field, "chat_template_error");
    }
    ids = tok.encode(text);
  } else if (!g.prompt_ids.empty()) {
    ids = g.prompt_ids;
  } else {
    ids = tok.encode(g.prompt);
  }
  if (ids.empty())
    throw ApiError(400, fmt::format("Invalid value for '{}': it has no tokens.", field), field,
                   "invalid_value");
  const int vocab = model.spec().vocab_size;
  for (size_t i = 0; i < ids.size(); i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw ApiError(400,
                     fmt::format("Invalid value for '{}': token {} at position {} is not in "
                                 "[0, {}).",
                                 field, ids[i], i, vocab),
                     g.chat || g.prompt_ids.empty() ? std::string(field)
                                                    : fmt::format("prompt[{}]", i),
                     "invalid_value");
  const int ctx = pool.ctx();
  if (int64_t(ids.size()) >= ctx)
    throw ApiError(400,
                   fmt::format("This model's maximum context length is {} tokens. However, your "
                               "{} resulted in {} tokens (at least one must be left to generate).",
                               ctx, g.chat ? "messages" : "prompt", ids.size()),
                   field, "context_length_exceeded");
  for (const auto& [id, bias] : g.sampling.logit_bias)
    if (id >= vocab)
      throw ApiError(400, fmt::format("Invalid value for 'logit_bias': token {} is not in [0, {}).",
                                      id, vocab),
                     "logit_bias", "invalid_value");
  return ids;
}

Outcome Server::Impl::run(Job& job, const std::function<void(const ReasoningSplitter::Delta&)>& emit,
                          const std::function<void(std::string_view)>& emit_raw) {
  uint64_t key;
  {
    std::lock_guard lock(jobs_mu);
    key = next_job++;
    jobs[key] = &job;
    if (stopping) job.cancel = true;
  }
  struct Unregister {
    Impl& s;
    uint64_t key;
    ~Unregister() {
      std::lock_guard lock(s.jobs_mu);
      s.jobs.erase(key);
    }
  } unregister{*this, key};

  Outcome out;
  Slot* slot = pool.acquire(job.prompt, &job.cancel);
  if (!slot) {
    out.r.finish = FinishReason::kCancelled;
    return out;
  }
  struct Release {
    SlotPool& pool;
    Slot* slot;
    ~Release() { pool.release(slot); }
  } release{pool, slot};
  out.ran = true;
  const GenRequest& g = job.g;
  GenerateParams gp;
  gp.max_tokens = g.max_tokens;
  gp.stop = g.stop;
  if (!g.ignore_eos) gp.eos_ids = eos_ids;
  gp.show_thinking = true;  // the splitter takes the thinking apart
  gp.think_budget = g.think_budget >= 0 ? g.think_budget : opt.think_budget;
  gp.cancel = &job.cancel;
  ReasoningSplitter split;
  const auto gen_start = Clock::now();
  SlotResult sr = generate_on_slot(
      *slot, tok, job.prompt, g.sampling, gp, g.cache_prompt && opt.prompt_cache,
      [&](std::string_view text, bool th) {
        if (!g.chat) {
          out.content += text;
          if (emit_raw) emit_raw(text);
          return;
        }
        const ReasoningSplitter::Delta d = split.push(text, th);
        if (d.empty()) return;
        out.content += d.content;
        out.reasoning += d.reasoning;
        if (emit) emit(d);
      });
  out.r = std::move(sr.r);
  out.cached = sr.cached;
  const double ttft = seconds(gen_start - job.t0) + out.r.prompt_seconds;
  metrics.generation(int(job.prompt.size()), int(out.cached), out.r.prompt_seconds,
                     int(out.r.tokens.size()), out.r.gen_seconds, ttft,
                     out.r.finish == FinishReason::kCancelled);
  if (opt.verbose)
    fmt::print(stderr,
               "slot {}: prompt {} tokens ({} cached) {:.1f} ms, {} generated {:.1f} ms "
               "({:.1f} tok/s), finish {}\n",
               slot->id, job.prompt.size(), out.cached, out.r.prompt_seconds * 1e3,
               out.r.tokens.size(), out.r.gen_seconds * 1e3, out.r.gen_tps(),
               to_string(out.r.finish));
  return out;
}

void Server::Impl::stream(Job& job, httplib::DataSink& sink) {
  const GenRequest& g = job.g;
  auto write = [&](const std::string& s) {
    if (job.cancel.load()) return;
    if (!sink.write(s.data(), s.size())) job.cancel = true;  // the client is gone
  };
  try {
    if (g.chat) write(sse_event(chat_chunk(job.meta, Json{{"role", "assistant"}, {"content", ""}},
                                           "", g.include_usage)));
    Outcome out = run(
        job,
        [&](const ReasoningSplitter::Delta& d) {
          Json delta = Json::object();
          if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
          if (!d.content.empty()) delta["content"] = d.content;
          write(sse_event(chat_chunk(job.meta, delta, "", g.include_usage)));
        },
        [&](std::string_view text) {
          write(sse_event(completion_chunk(job.meta, std::string(text), "", g.include_usage)));
        });
    if (!out.ran || out.r.finish == FinishReason::kCancelled) return;
    const std::string finish = finish_reason(out.r.finish);
    write(sse_event(g.chat ? chat_chunk(job.meta, Json::object(), finish, g.include_usage)
                           : completion_chunk(job.meta, "", finish, g.include_usage)));
    if (g.include_usage) write(sse_event(usage_chunk(job.meta, g.chat, out.usage())));
    write(std::string(kSseDone));
  } catch (const ApiError& e) {
    write(sse_event(error_json(e)));
  } catch (const Error& e) {
    write(sse_event(error_json(api_error_of(e))));
  } catch (const std::exception& e) {
    write(sse_event(error_json(ApiError(500, e.what()))));
  }
}

void Server::Impl::handle_generate(const httplib::Request& req, httplib::Response& res,
                                   bool chat) {
  auto job = std::make_shared<Job>();
  job->t0 = Clock::now();
  const Json body = parse_body(req.body);
  job->g = chat ? parse_chat_request(body) : parse_completion_request(body);
  if (!job->g.seed_given) job->g.sampling.seed = random_seed();
  job->prompt = prompt_tokens(job->g);
  job->meta.id = random_id(chat ? "chatcmpl-" : "cmpl-");
  job->meta.created = unix_time();
  job->meta.model = opt.model_name;
  if (!pool.try_admit()) {
    metrics.rejected_busy();
    throw ApiError(503,
                   fmt::format("The server is busy: {} slots and {} queue places are taken; "
                               "retry later.",
                               pool.size(), pool.max_queue()),
                   "", "server_busy");
  }
  job->on_destroy = [this] { pool.leave(); };
  job->fd = find_client_socket(req);

  if (job->g.stream) {
    res.status = 200;
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    res.set_chunked_content_provider("text/event-stream",
                                     [this, job](size_t, httplib::DataSink& sink) {
                                       stream(*job, sink);
                                       sink.done();
                                       return true;
                                     });
    return;
  }
  Outcome out = run(*job, nullptr, nullptr);
  if (!out.ran || out.r.finish == FinishReason::kCancelled) {
    // Nobody is listening (or the server is stopping); say so for the log.
    send_error(res, ApiError(503, "The request was cancelled.", "", "cancelled"));
    return;
  }
  const std::string finish = finish_reason(out.r.finish);
  send_json(res, 200,
            chat ? chat_response(job->meta, out.content, out.reasoning, finish, out.usage())
                 : completion_response(job->meta, out.content, finish, out.usage()));
}

// ---------------------------------------------------------------------------------------------
// Watcher: a hung-up client cancels its request.

void Server::Impl::watch() {
  std::unique_lock lock(jobs_mu);
  while (!stopping) {
    jobs_cv.wait_for(lock, std::chrono::milliseconds(50));
    std::vector<pollfd> fds;
    std::vector<Job*> owners;
    for (auto& [key, job] : jobs)
      if (job->fd >= 0 && !job->cancel.load()) {
        fds.push_back({job->fd, POLLRDHUP, 0});
        owners.push_back(job);
      }
    if (fds.empty()) continue;
    // Jobs unregister under jobs_mu before their socket can close, so the fds stay theirs.
    if (poll(fds.data(), fds.size(), 0) <= 0) continue;
    for (size_t i = 0; i < fds.size(); i++)
      if (fds[i].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) owners[i]->cancel = true;
  }
}

// ---------------------------------------------------------------------------------------------
// Routes.

// 413, and the connection closes: the rest of the body is not read.
void Server::Impl::refuse_too_large(httplib::Response& res) const {
  send_error(res, ApiError(413,
                           fmt::format("The request body is larger than the limit of {} bytes "
                                       "(--max-body).",
                                       opt.max_body),
                           "", "request_too_large"));
  res.set_header("Connection", "close");
}

void Server::Impl::routes() {
  auto wrap = [](std::function<void(const httplib::Request&, httplib::Response&)> fn) {
    return [fn](const httplib::Request& req, httplib::Response& res) {
      try {
        fn(req, res);
      } catch (const ApiError& e) {
        send_error(res, e);
      } catch (const Error& e) {
        send_error(res, api_error_of(e));
      } catch (const std::exception& e) {
        send_error(res, ApiError(500, e.what()));
      }
    };
  };
  // POST bodies are read here, not by httplib: its payload limit (0.11) holds only for a body
  // with a Content-Length, and a chunked one would grow without bound. An oversized
  // Content-Length is refused before any of it is read (set_pre_routing_handler below).
  using Handler = std::function<void(const httplib::Request&, httplib::Response&)>;
  auto post = [this](const char* path, Handler fn) {
    post_paths.insert(path);
    http.Post(path, [this, fn](const httplib::Request& req, httplib::Response& res,
                               const httplib::ContentReader& reader) {
      httplib::Request full = req;
      bool too_large = false;
      const bool ok = reader([&](const char* data, size_t n) {
        if (n > opt.max_body - full.body.size()) {
          too_large = true;
          return false;
        }
        full.body.append(data, n);
        return true;
      });
      if (too_large) {
        refuse_too_large(res);
        return;
      }
      if (!ok) {
        send_error(res, ApiError(400, "The request body could not be read.", "", "bad_body"));
        res.set_header("Connection", "close");
        return;
      }
      fn(full, res);
    });
  };
  auto chat = wrap([this](const auto& req, auto& res) { handle_generate(req, res, true); });
  auto completions = wrap([this](const auto& req, auto& res) { handle_generate(req, res, false); });
  post("/v1/chat/completions", chat);
  post("/chat/completions", chat);
  post("/v1/completions", completions);
  post("/completions", completions);

  auto models = wrap([this](const auto&, auto& res) {
    Json m = Json::object();
    m["id"] = opt.model_name;
    m["object"] = "model";
    m["created"] = created;
    m["owned_by"] = "moeflux";
    m["meta"] = Json{{"n_ctx", pool.ctx()},
                     {"n_vocab", model.spec().vocab_size},
                     {"arch", model.spec().arch},
                     {"slots", pool.size()}};
    send_json(res, 200, Json{{"object", "list"}, {"data", Json::array({m})}});
  });
  http.Get("/v1/models", models);
  http.Get("/models", models);

  http.Get("/health", wrap([this](const auto&, auto& res) {
             const int busy = pool.busy();
             Json j{{"status", "ok"},
                    {"slots_idle", pool.size() - busy},
                    {"slots_processing", busy},
                    {"requests_queued", pool.queued()}};
             // Still serving the package as loaded (Model keeps its files open); say so.
             if (const std::string changed = model.changed_on_disk(); !changed.empty())
               j["warning"] = changed;
             send_json(res, 200, j);
           }));

  http.Get("/metrics", wrap([this](const auto&, auto& res) {
             res.status = 200;
             res.set_content(
                 metrics.render(pool.size(), pool.busy(), pool.queued(), store.stats()),
                 "text/plain; version=0.0.4; charset=utf-8");
           }));

  post("/tokenize", wrap([this](const auto& req, auto& res) {
         const Json body = parse_body(req.body);
         auto c = body.find("content");
         if (c == body.end() || !c->is_string())
           throw ApiError(400, "'content' must be a string.", "content", "invalid_type");
         bool with_pieces = false, parse_special = true;
         for (auto [key, flag] : {std::pair{"with_pieces", &with_pieces},
                                  std::pair{"parse_special", &parse_special}}) {
           auto it = body.find(key);
           if (it == body.end() || it->is_null()) continue;
           if (!it->is_boolean())
             throw ApiError(400, fmt::format("'{}' must be a boolean.", key), key, "invalid_type");
           *flag = it->template get<bool>();
         }
         const std::vector<int32_t> ids = tok.encode(c->template get<std::string>(), parse_special);
         Json tokens = Json::array();
         for (int32_t id : ids)
           if (with_pieces)
             tokens.push_back(Json{{"id", id}, {"piece", std::string(tok.token_bytes(id))}});
           else
             tokens.push_back(id);
         send_json(res, 200, Json{{"tokens", tokens}});
       }));

  post("/detokenize", wrap([this](const auto& req, auto& res) {
         const Json body = parse_body(req.body);
         auto t = body.find("tokens");
         if (t == body.end() || !t->is_array())
           throw ApiError(400, "'tokens' must be an array of token ids.", "tokens", "invalid_type");
         std::vector<int32_t> ids;
         for (size_t i = 0; i < t->size(); i++) {
           const Json& v = (*t)[i];
           if (!v.is_number_integer() || v.template get<int64_t>() < 0 ||
               v.template get<int64_t>() >= tok.vocab_size())
             throw ApiError(
                 400,
                 fmt::format("'tokens[{}]' is not a token id in [0, {}).", i, tok.vocab_size()),
                 fmt::format("tokens[{}]", i), "invalid_value");
           ids.push_back(int32_t(v.template get<int64_t>()));
         }
         send_json(res, 200, Json{{"content", tok.decode(ids)}});
       }));

  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    // Refused at once, not after reading (httplib skips a body over its limit by reading it).
    if (req.has_header("Content-Length")) {
      const std::string len = req.get_header_value("Content-Length");
      char* end = nullptr;
      errno = 0;
      const unsigned long long n = std::strtoull(len.c_str(), &end, 10);
      if (len.empty() || *end || len[0] == '-' || errno == ERANGE || n > opt.max_body) {
        if (len.empty() || *end || len[0] == '-')
          send_error(res, ApiError(400, "The Content-Length header is not a number.", "",
                                   "bad_content_length"));
        else
          refuse_too_large(res);
        res.set_header("Connection", "close");
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    const std::string auth = req.get_header_value("Authorization");
    const std::string bearer = "Bearer ";
    if (opt.api_key.empty() || req.path == "/health" ||
        (auth.starts_with(bearer) && same_secret(auth.substr(bearer.size()), opt.api_key))) {
      // httplib reads the body of any POST, PUT, PATCH, ... before finding no route for it
      // (and a chunked one without bound): refuse those before reading.
      if (req.method == "GET" || req.method == "HEAD" ||
          (req.method == "POST" && post_paths.count(req.path)))
        return httplib::Server::HandlerResponse::Unhandled;
      send_error(res,
                 ApiError(404, fmt::format("Unknown request URL: {} {}.", req.method, req.path), "",
                          "unknown_url", "invalid_request_error"));
      res.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    }
    send_error(res, ApiError(401,
                             auth.empty() ? "You didn't provide an API key. Pass it in the "
                                            "Authorization header: Bearer YOUR_KEY."
                                          : "Incorrect API key provided.",
                             "", "invalid_api_key"));
    return httplib::Server::HandlerResponse::Handled;
  });

  // Responses httplib makes itself (no route: 404, body over the limit: 413, a request it
  // cannot parse: 400) get a JSON body; ours already have one.
  http.set_error_handler(httplib::Server::HandlerWithResponse([max_body = opt.max_body](
                                                                  const httplib::Request& req,
                                                                  httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 404)
      send_error(res, ApiError(404, fmt::format("Unknown request URL: {} {}.", req.method,
                                                req.path),
                               "", "unknown_url", "invalid_request_error"));
    else if (res.status == 413)
      send_error(res, ApiError(413,
                               fmt::format("The request body is larger than the limit of {} "
                                           "bytes (--max-body).",
                                           max_body),
                               "", "request_too_large"));
    else
      send_error(res, ApiError(res.status, status_text(res.status)));
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res,
                                std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, what));
  });

  // Counted just before the response goes out (the logger runs after it is written, so a
  // client could see its answer and then a /metrics without it).
  http.set_post_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    metrics.request(endpoint_label(req.path), res.status);
  });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    if (opt.verbose)
      fmt::print(stderr, "{} {} {} -> {}\n", req.remote_addr, req.method, req.path, res.status);
  });
}

// ---------------------------------------------------------------------------------------------

Server::Server(const Model& model, ExpertStore& store, const Tokenizer& tokenizer,
               ChatTemplate tmpl, std::vector<int32_t> eos_ids, ServerOptions options) {
  if (options.parallel < 1 || options.parallel > 256)
    fail(ErrorKind::kInvalidArgument, "--parallel: {} is not in [1, 256]", options.parallel);
  if (options.queue < 0)
    fail(ErrorKind::kInvalidArgument, "--queue: {} is negative", options.queue);
  if (options.max_body < 1024)
    fail(ErrorKind::kInvalidArgument, "--max-body: {} bytes is below 1024", options.max_body);
  impl_ = std::make_unique<Impl>(model, store, tokenizer, std::move(tmpl), std::move(eos_ids),
                                 std::move(options));
  Impl& s = *impl_;
  // Every admitted request holds a worker thread while it waits or generates; the rest serve
  // /health, /metrics and idle keep-alive connections.
  const size_t workers = size_t(s.opt.parallel + s.opt.queue + 16);
  s.http.new_task_queue = [workers] { return new httplib::ThreadPool(workers); };
  s.http.set_payload_max_length(s.opt.max_body);
  s.http.set_tcp_nodelay(true);
  // httplib's default sets SO_REUSEPORT, so a second server on a taken port binds too and the
  // kernel splits connections between the two. SO_REUSEADDR alone still allows a restart while
  // the old socket is in TIME_WAIT, but a port in use fails to bind.
  s.http.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });  // one small SSE chunk per token: do not wait to coalesce
  s.routes();
}

Server::~Server() {
  stop();
  if (impl_->watcher.joinable()) impl_->watcher.join();
}

int Server::bind() {
  Impl& s = *impl_;
  int port = s.opt.port;
  errno = 0;  // httplib reports only false; the failing call's errno says why
  auto why = [] { return errno ? std::string(": ") + std::strerror(errno) : std::string(); };
  if (port == 0) {
    port = s.http.bind_to_any_port(s.opt.host);
    if (port < 0) fail(ErrorKind::kIo, "serve: cannot bind {} (any port){}", s.opt.host, why());
  } else if (!s.http.bind_to_port(s.opt.host, port)) {
    fail(ErrorKind::kIo, "serve: cannot bind {}:{}{} (in use, or not an address of this machine)",
         s.opt.host, port, why());
  }
  return port;
}

void Server::run() {
  Impl& s = *impl_;
  {
    std::lock_guard lock(s.jobs_mu);
    if (s.stopping) return;
  }
  s.watcher = std::thread([&s] { s.watch(); });
  s.http.listen_after_bind();
}

void Server::stop() {
  Impl& s = *impl_;
  {
    std::lock_guard lock(s.jobs_mu);
    s.stopping = true;
    for (auto& [key, job] : s.jobs) job->cancel = true;
  }
  s.jobs_cv.notify_all();
  s.http.stop();
}

}  // namespace moeflux::server
