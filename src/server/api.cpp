#include "server/api.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "util/json.h"

namespace moeflux::server {

namespace {

const char* type_for(int status) {
  if (status == 401) return "authentication_error";
  if (status == 404) return "not_found_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

const char* json_type_name(const Json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

[[noreturn]] void wrong_type(const std::string& field, const char* expected, const Json& v) {
  throw ApiError(400,
                 fmt::format("Invalid type for '{}': expected {}, but got {} instead.", field,
                             expected, json_type_name(v)),
                 field, "invalid_type");
}

[[noreturn]] void bad_value(const std::string& field, const std::string& why) {
  throw ApiError(400, fmt::format("Invalid value for '{}': {}", field, why), field,
                 "invalid_value");
}

// A member that is present and not null, else nullptr (OpenAI treats null as "unset").
const Json* member(const Json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> number(const Json& body, const char* key, double lo, double hi) {
  const Json* v = member(body, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrong_type(key, "a number", *v);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    bad_value(key, fmt::format("{} is not in [{}, {}]", x, lo, hi));
  return x;
}

// Integers; a float with an integral value (5.0) is taken, as JSON does not tell them apart.
std::optional<int64_t> integer(const Json& body, const char* key, int64_t lo, int64_t hi) {
  const Json* v = member(body, key);
  if (!v) return std::nullopt;
  int64_t x = 0;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    x = u > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                          : int64_t(u);
  } else if (v->is_number_integer()) {
    x = v->get<int64_t>();
  } else if (v->is_number_float() && std::isfinite(v->get<double>()) &&
             std::floor(v->get<double>()) == v->get<double>() &&
             std::fabs(v->get<double>()) < 9e18) {
    x = int64_t(v->get<double>());
  } else {
    wrong_type(key, "an integer", *v);
  }
  if (x < lo || x > hi) bad_value(key, fmt::format("{} is not in [{}, {}]", x, lo, hi));
  return x;
}

std::optional<bool> boolean(const Json& body, const char* key) {
  const Json* v = member(body, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong_type(key, "a boolean", *v);
  return v->get<bool>();
}

std::optional<std::string> string(const Json& body, const char* key) {
  const Json* v = member(body, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong_type(key, "a string", *v);
  return v->get<std::string>();
}

// Fields both endpoints share: sampling, length, stop, stream, extensions.
void parse_common(const Json& body, GenRequest& r) {
  if (auto m = string(body, "model")) r.model = *m;
  if (auto n = integer(body, "n", std::numeric_limits<int64_t>::min(),
                       std::numeric_limits<int64_t>::max());
      n && *n != 1)
    throw ApiError(400, fmt::format("Invalid value for 'n': {}; only n = 1 is supported.", *n),
                   "n", "unsupported_value");
  if (auto s = boolean(body, "stream")) r.stream = *s;
  if (const Json* so = member(body, "stream_options")) {
    if (!so->is_object()) wrong_type("stream_options", "an object", *so);
    auto it = so->find("include_usage");
    if (it != so->end() && !it->is_null()) {
      if (!it->is_boolean()) wrong_type("stream_options.include_usage", "a boolean", *it);
      r.include_usage = it->get<bool>();
    }
  }
  SamplerParams& s = r.sampling;
  if (auto t = number(body, "temperature", 0, 2)) s.temperature = float(*t);
  if (auto p = number(body, "top_p", 0, 1)) {
    if (*p == 0) {  // the smallest set with mass >= 0: the most likely token
      s.top_k = 1;
      s.top_p = 1.0f;
    } else {
      s.top_p = float(*p);
    }
  }
  if (auto k = integer(body, "top_k", 0, std::numeric_limits<int32_t>::max())) s.top_k = int(*k);
  if (auto m = number(body, "min_p", 0, 1)) s.min_p = float(*m);
  if (auto p = number(body, "presence_penalty", -2, 2)) s.presence_penalty = float(*p);
  if (auto p = number(body, "frequency_penalty", -2, 2)) s.frequency_penalty = float(*p);
  if (auto p = number(body, "repeat_penalty", 1e-6, 1e6)) s.repeat_penalty = float(*p);
  if (auto n = integer(body, "repeat_last_n", -1, std::numeric_limits<int32_t>::max()))
    s.penalty_last_n = int(*n);
  if (auto seed = integer(body, "seed", std::numeric_limits<int64_t>::min(),
                          std::numeric_limits<int64_t>::max())) {
    s.seed = uint64_t(*seed);
    r.seed_given = true;
  }
  if (const Json* lb = member(body, "logit_bias")) {
    if (!lb->is_object()) wrong_type("logit_bias", "an object", *lb);
    for (auto& [k, v] : lb->items()) {
      const std::string field = "logit_bias." + (k.size() <= 40 ? k : k.substr(0, 40) + "…");
      char* end = nullptr;
      const long id = std::strtol(k.c_str(), &end, 10);
      if (k.empty() || *end || id < 0 || id > std::numeric_limits<int32_t>::max())
        bad_value(field, "the key is not a token id");
      if (!v.is_number()) wrong_type(field, "a number", v);
      const double b = v.get<double>();
      if (!(b >= -100 && b <= 100)) bad_value(field, fmt::format("{} is not in [-100, 100]", b));
      s.logit_bias.emplace_back(int32_t(id), float(b));
    }
  }
  const int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  if (auto m = integer(body, "max_tokens", 1, kMaxTokens)) r.max_tokens = int(*m);
  if (auto m = integer(body, "max_completion_tokens", 1, kMaxTokens)) r.max_tokens = int(*m);
  if (const Json* st = member(body, "stop")) {
    if (st->is_string()) {
      r.stop.push_back(st->get<std::string>());
    } else if (st->is_array()) {
      if (st->size() > 16) bad_value("stop", fmt::format("{} stop strings (at most 16)", st->size()));
      for (size_t i = 0; i < st->size(); i++) {
        if (!(*st)[i].is_string()) wrong_type(fmt::format("stop[{}]", i), "a string", (*st)[i]);
        r.stop.push_back((*st)[i].get<std::string>());
      }
    } else {
      wrong_type("stop", "a string or an array of strings", *st);
    }
    for (size_t i = 0; i < r.stop.size(); i++)
      if (r.stop[i].empty()) bad_value(fmt::format("stop[{}]", i), "an empty string");
  }
  if (auto c = boolean(body, "cache_prompt")) r.cache_prompt = *c;
  if (auto e = boolean(body, "ignore_eos")) r.ignore_eos = *e;
  if (auto b = integer(body, "think_budget", -1, std::numeric_limits<int32_t>::max()))
    r.think_budget = int(*b);
}

std::string content_text(const Json& content, const std::string& field) {
  if (content.is_string()) return content.get<std::string>();
  if (content.is_null()) return {};
  if (!content.is_array()) wrong_type(field, "a string or an array of content parts", content);
  std::string out;
  for (size_t j = 0; j < content.size(); j++) {
    const Json& part = content[j];
    const std::string pf = fmt::format("{}[{}]", field, j);
    if (!part.is_object()) wrong_type(pf, "an object", part);
    auto type = part.find("type");
    if (type == part.end() || !type->is_string())
      throw ApiError(400, fmt::format("Missing required parameter: '{}.type'.", pf),
                     pf + ".type", "missing_required_parameter");
    if (*type != "text")
      throw ApiError(400,
                     fmt::format("Invalid value for '{}.type': {}; only text content is "
                                 "supported.",
                                 pf, quote_brief(type->get_ref<const std::string&>())),
                     pf + ".type", "unsupported_value");
    auto text = part.find("text");
    if (text == part.end() || !text->is_string())
      wrong_type(pf + ".text", "a string", text == part.end() ? Json() : *text);
    if (!out.empty()) out += "\n";
    out += text->get<std::string>();
  }
  return out;
}

Json message_json(const Json& m, size_t i) {
  const std::string f = fmt::format("messages[{}]", i);
  if (!m.is_object()) wrong_type(f, "an object", m);
  auto role = m.find("role");
  if (role == m.end() || role->is_null())
    throw ApiError(400, fmt::format("Missing required parameter: '{}.role'.", f), f + ".role",
                   "missing_required_parameter");
  if (!role->is_string()) wrong_type(f + ".role", "a string", *role);
  std::string r = role->get<std::string>();
  if (r == "developer") r = "system";  // OpenAI's newer name; chat templates know "system"
  if (r != "system" && r != "user" && r != "assistant" && r != "tool" && r != "function")
    throw ApiError(400,
                   fmt::format("Invalid value for '{}.role': {}; expected one of system, "
                               "developer, user, assistant, tool.",
                               f, quote_brief(r)),
                   f + ".role", "invalid_value");
  Json out = Json::object();
  out["role"] = r;
  auto content = m.find("content");
  if ((content == m.end() || content->is_null()) && r != "assistant")
    throw ApiError(400, fmt::format("Missing required parameter: '{}.content'.", f),
                   f + ".content", "missing_required_parameter");
  out["content"] = content == m.end() ? std::string() : content_text(*content, f + ".content");
  for (const char* key : {"name", "tool_call_id", "reasoning_content"}) {
    auto it = m.find(key);
    if (it == m.end() || it->is_null()) continue;
    if (!it->is_string()) wrong_type(f + "." + key, "a string", *it);
    out[key] = *it;
  }
  auto tc = m.find("tool_calls");
  if (tc != m.end() && !tc->is_null()) {
    if (!tc->is_array()) wrong_type(f + ".tool_calls", "an array", *tc);
    out["tool_calls"] = *tc;
  }
  return out;
}

void reject_unsupported(const Json& body) {
  if (const Json* t = member(body, "tools"); t && !(t->is_array() && t->empty()))
    throw ApiError(400, "'tools' are not supported by this server.", "tools", "unsupported_parameter");
  if (const Json* rf = member(body, "response_format")) {
    if (!rf->is_object()) wrong_type("response_format", "an object", *rf);
    auto type = rf->find("type");
    if (type != rf->end() && *type != "text")
      throw ApiError(400, "'response_format' other than text is not supported by this server.",
                     "response_format", "unsupported_parameter");
  }
}

}  // namespace

ApiError::ApiError(int status_, std::string message, std::string param_, std::string code_,
                   std::string type_)
    : std::runtime_error(std::move(message)),
      status(status_),
      type(type_.empty() ? type_for(status_) : std::move(type_)),
      param(std::move(param_)),
      code(std::move(code_)) {}

ApiError api_error_of(const Error& e) {
  switch (e.kind()) {
    case ErrorKind::kInvalidArgument: return ApiError(400, e.what());
    case ErrorKind::kOutOfMemory: return ApiError(503, e.what(), "", "out_of_memory");
    case ErrorKind::kNumeric: return ApiError(500, e.what(), "", "numeric_error");
    default: return ApiError(500, e.what());
  }
}

Json error_json(const ApiError& e) {
  Json err = Json::object();
  err["message"] = e.what();
  err["type"] = e.type;
  err["param"] = e.param.empty() ? Json() : Json(e.param);
  err["code"] = e.code.empty() ? Json() : Json(e.code);
  Json j = Json::object();
  j["error"] = err;
  return j;
}

Json parse_body(std::string_view body) {
  if (std::string why = json_limit_violation(body, {kMaxRequestJsonDepth, body.size()});
      !why.empty())
    throw ApiError(400,
                   fmt::format("We could not parse the JSON body of your request: it is {}.", why),
                   "", "invalid_json");
  Json j;
  try {
    j = Json::parse(body);
  } catch (const nlohmann::json::parse_error& e) {
    throw ApiError(400,
                   fmt::format("We could not parse the JSON body of your request: invalid JSON at "
                               "byte {}.",
                               e.byte),
                   "", "invalid_json");
  } catch (const nlohmann::json::exception& e) {  // a number beyond double range (found by fuzzing)
    throw ApiError(
        400,
        fmt::format("We could not parse the JSON body of your request: {}", json_error_brief(e)),
        "", "invalid_json");
  }
  if (!j.is_object())
    throw ApiError(400, fmt::format("The request body must be a JSON object, not {}.",
                                    json_type_name(j)),
                   "", "invalid_json");
  return j;
}

GenRequest parse_chat_request(const Json& body) {
  GenRequest r;
  r.chat = true;
  auto msgs = body.find("messages");
  if (msgs == body.end() || msgs->is_null())
    throw ApiError(400, "Missing required parameter: 'messages'.", "messages",
                   "missing_required_parameter");
  if (!msgs->is_array()) wrong_type("messages", "an array", *msgs);
  if (msgs->empty()) bad_value("messages", "an empty array (at least one message is needed)");
  for (size_t i = 0; i < msgs->size(); i++) r.messages.push_back(message_json((*msgs)[i], i));
  if (auto lp = boolean(body, "logprobs"); lp && *lp)
    throw ApiError(400, "'logprobs' are not supported by this server.", "logprobs",
                   "unsupported_parameter");
  if (member(body, "top_logprobs"))
    throw ApiError(400, "'top_logprobs' is not supported by this server.", "top_logprobs",
                   "unsupported_parameter");
  reject_unsupported(body);
  if (const Json* k = member(body, "chat_template_kwargs")) {
    if (!k->is_object()) wrong_type("chat_template_kwargs", "an object", *k);
    r.template_kwargs = *k;
  }
  parse_common(body, r);
  return r;
}

GenRequest parse_completion_request(const Json& body) {
  GenRequest r;
  r.chat = false;
  auto p = body.find("prompt");
  if (p == body.end() || p->is_null())
    throw ApiError(400, "Missing required parameter: 'prompt'.", "prompt",
                   "missing_required_parameter");
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
    r.prompt = (*p)[0].get<std::string>();
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    for (size_t i = 0; i < p->size(); i++) {
      const Json& v = (*p)[i];
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          v.get<int64_t>() > std::numeric_limits<int32_t>::max())
        wrong_type(fmt::format("prompt[{}]", i), "a token id", v);
      r.prompt_ids.push_back(int32_t(v.get<int64_t>()));
    }
  } else if (p->is_array()) {
    bad_value("prompt", "batched prompts are not supported: give one string or one token list");
  } else {
    wrong_type("prompt", "a string, or an array of token ids", *p);
  }
  if (auto e = boolean(body, "echo"); e && *e)
    throw ApiError(400, "'echo' is not supported by this server.", "echo",
                   "unsupported_parameter");
  if (member(body, "suffix"))
    throw ApiError(400, "'suffix' is not supported by this server.", "suffix",
                   "unsupported_parameter");
  if (member(body, "logprobs"))
    throw ApiError(400, "'logprobs' are not supported by this server.", "logprobs",
                   "unsupported_parameter");
  if (auto b = integer(body, "best_of", 1, 1 << 20); b && *b != 1)
    throw ApiError(400, "Invalid value for 'best_of': only 1 is supported.", "best_of",
                   "unsupported_value");
  parse_common(body, r);
  return r;
}

ReasoningSplitter::Delta ReasoningSplitter::push(std::string_view text, bool thinking) {
  Delta d;
  std::string s(text);
  auto lstrip = [](std::string& x) { x.erase(0, x.find_first_not_of(" \t\r\n")); };
  if (thinking) {
    seen_thinking_ = true;
    for (std::string_view tag : {"</think>", "<think>"})
      if (s.ends_with(tag)) {
        s.resize(s.size() - tag.size());
        break;
      }
    if (!reasoning_started_) lstrip(s);
    if (!s.empty()) reasoning_started_ = true;
    d.reasoning = std::move(s);
  } else {
    if (seen_thinking_ && !content_started_) lstrip(s);
    if (!s.empty()) content_started_ = true;
    d.content = std::move(s);
  }
  return d;
}

std::string finish_reason(FinishReason r) {
  switch (r) {
    case FinishReason::kEos:
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength:
    case FinishReason::kCtx: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "stop";
}

Json usage_json(const Usage& u) {
  Json j = Json::object();
  j["prompt_tokens"] = u.prompt_tokens;
  j["completion_tokens"] = u.completion_tokens;
  j["total_tokens"] = u.prompt_tokens + u.completion_tokens;
  j["prompt_tokens_details"] = Json{{"cached_tokens", u.cached_tokens}};
  return j;
}

namespace {

Json envelope(const ResponseMeta& m, const char* object) {
  Json j = Json::object();
  j["id"] = m.id;
  j["object"] = object;
  j["created"] = m.created;
  j["model"] = m.model;
  j["system_fingerprint"] = "moeflux-" MOEFLUX_VERSION;
  return j;
}

Json finish_json(const std::string& f) { return f.empty() ? Json() : Json(f); }

}  // namespace

Json chat_response(const ResponseMeta& m, const std::string& content, const std::string& reasoning,
                   const std::string& finish, const Usage& u) {
  Json msg = Json::object();
  msg["role"] = "assistant";
  msg["content"] = content;
  if (!reasoning.empty()) msg["reasoning_content"] = reasoning;
  Json choice = Json::object();
  choice["index"] = 0;
  choice["message"] = msg;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_json(finish);
  Json j = envelope(m, "chat.completion");
  j["choices"] = Json::array({choice});
  j["usage"] = usage_json(u);
  return j;
}

Json chat_chunk(const ResponseMeta& m, const Json& delta, const std::string& finish,
                bool include_usage) {
  Json choice = Json::object();
  choice["index"] = 0;
  choice["delta"] = delta;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_json(finish);
  Json j = envelope(m, "chat.completion.chunk");
  j["choices"] = Json::array({choice});
  if (include_usage) j["usage"] = nullptr;
  return j;
}

Json completion_response(const ResponseMeta& m, const std::string& text,
                         const std::string& finish, const Usage& u) {
  Json choice = Json::object();
  choice["index"] = 0;
  choice["text"] = text;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_json(finish);
  Json j = envelope(m, "text_completion");
  j["choices"] = Json::array({choice});
  j["usage"] = usage_json(u);
  return j;
}

Json completion_chunk(const ResponseMeta& m, const std::string& text, const std::string& finish,
                      bool include_usage) {
  Json choice = Json::object();
  choice["index"] = 0;
  choice["text"] = text;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_json(finish);
  Json j = envelope(m, "text_completion");
  j["choices"] = Json::array({choice});
  if (include_usage) j["usage"] = nullptr;
  return j;
}

Json usage_chunk(const ResponseMeta& m, bool chat, const Usage& u) {
  Json j = envelope(m, chat ? "chat.completion.chunk" : "text_completion");
  j["choices"] = Json::array();
  j["usage"] = usage_json(u);
  return j;
}

ApiReply check_request(std::string_view method, std::string_view path, std::string_view body,
                       const std::function<std::string(const GenRequest&)>& render) {
  auto reply = [](int status, const Json& j) { return ApiReply{status, dump(j)}; };
  try {
    const bool chat = path == "/v1/chat/completions" || path == "/chat/completions";
    const bool completion = path == "/v1/completions" || path == "/completions";
    if ((!chat && !completion) || method != "POST")
      throw ApiError(
          404, fmt::format("Unknown request URL: {} {}.", quote_brief(method), quote_brief(path)),
          "", "unknown_url");
    const Json j = parse_body(body);
    const GenRequest g = chat ? parse_chat_request(j) : parse_completion_request(j);
    if (render && g.chat) render(g);
    return reply(200, Json{{"ok", true}});
  } catch (const ApiError& e) {
    return reply(e.status, error_json(e));
  } catch (const std::exception& e) {
    return reply(500, error_json(ApiError(500, e.what())));
  }
}

std::string dump(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string sse_event(const Json& j) { return "data: " + dump(j) + "\n\n"; }

}  // namespace moeflux::server
