// The OpenAI-compatible protocol, without HTTP: request bodies -> GenRequest (every field
// checked, errors name it), results -> response and stream-chunk JSON, errors in OpenAI's shape.
// server.cpp puts these on the wire; tests/server_test.cpp checks them directly.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "engine/generate.h"
#include "text/sampler.h"
#include "util/error.h"

namespace moeflux::server {

using Json = nlohmann::ordered_json;

// An error a client caused (or a server state it should know of), sent as
// {"error": {"message", "type", "param", "code"}} with `status`.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = {}, std::string code = {},
           std::string type = {});
  int status;
  std::string type;   // "invalid_request_error", "server_error", ... (from status when empty)
  std::string param;  // the request field at fault; "" -> null
  std::string code;   // machine-readable code; "" -> null
};

Json error_json(const ApiError& e);

// The response for an engine Error raised while serving: a bad argument is the client's (400),
// running out of memory is the server's for now (503, "out_of_memory": try again later or with
// less), NaN/Inf in the forward pass the model's (500, "numeric_error", naming layer and
// position), anything else 500.
ApiError api_error_of(const Error& e);

// Request bodies nest at most this deep (a chat request needs 4: body, messages, message,
// content parts); deeper is refused before parsing, as copying or dumping a deep value recurses.
inline constexpr size_t kMaxRequestJsonDepth = 64;

// The request body as JSON (400 "invalid JSON ... at byte N" or naming the depth limit
// otherwise; an object required).
Json parse_body(std::string_view body);

struct GenRequest {
  bool chat = true;
  std::string model;
  Json messages = Json::array();  // chat: messages as the template wants them (content strings)
  std::string prompt;             // completions: the prompt text ...
  std::vector<int32_t> prompt_ids;  // ... or token ids (when the prompt was a list of ints)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  SamplerParams sampling;      // seed filled in by the server when seed_given is false
  bool seed_given = false;
  int max_tokens = -1;  // < 0: until EOS or a full context
  std::vector<std::string> stop;
  Json template_kwargs = Json::object();  // chat_template_kwargs
  bool cache_prompt = true;               // moeflux/llama.cpp extension: reuse a slot's state
  bool ignore_eos = false;                // extension: generate past end-of-sequence tokens
  int think_budget = -1;                  // extension: force </think> after N thinking tokens
};

// POST /v1/chat/completions and /v1/completions bodies. Throws ApiError(400) naming the field.
GenRequest parse_chat_request(const Json& body);
GenRequest parse_completion_request(const Json& body);

// Splits what generate() streams into the answer and the reasoning of a thinking model: the
// <think> / </think> tags are dropped, leading whitespace of the reasoning and (after a
// reasoning) of the answer is held back, as the templates put newlines there. Streamed chunks
// and the non-streamed message are both built from it, so they agree.
class ReasoningSplitter {
 public:
  struct Delta {
    std::string content, reasoning;
    bool empty() const { return content.empty() && reasoning.empty(); }
  };
  Delta push(std::string_view text, bool thinking);

 private:
  bool seen_thinking_ = false, content_started_ = false, reasoning_started_ = false;
};

std::string finish_reason(FinishReason r);  // "stop", "length" (cancelled: "cancelled")

struct Usage {
  int prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
};
Json usage_json(const Usage& u);

// The fixed part of every response / chunk of one request.
struct ResponseMeta {
  std::string id;  // "chatcmpl-..." / "cmpl-..."
  int64_t created = 0;
  std::string model;
};

Json chat_response(const ResponseMeta& m, const std::string& content, const std::string& reasoning,
                   const std::string& finish, const Usage& u);
// A chat.completion.chunk. `delta` is the choice's delta; finish "" -> null. With
// include_usage every chunk carries "usage": null, as OpenAI's do.
Json chat_chunk(const ResponseMeta& m, const Json& delta, const std::string& finish,
                bool include_usage);
Json completion_response(const ResponseMeta& m, const std::string& text,
                         const std::string& finish, const Usage& u);
Json completion_chunk(const ResponseMeta& m, const std::string& text, const std::string& finish,
                      bool include_usage);
// The last chunk of a stream with include_usage: no choices, the usage.
Json usage_chunk(const ResponseMeta& m, bool chat, const Usage& u);

// One server-sent event: "data: <json>\n\n" (JSON on one line, invalid UTF-8 replaced).
std::string sse_event(const Json& j);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// The model-free part of the request -> response path, for the fuzzer and tests: a POST body
// to a generation route parsed and checked, a chat's messages rendered by `render` (e.g. the
// chat template) when given. Returns the status and body the server would send up to the point
// where tokens and a slot are needed (200 {"ok": true} when it got there). Throws nothing.
struct ApiReply {
  int status = 200;
  std::string body;
};
ApiReply check_request(std::string_view method, std::string_view path, std::string_view body,
                       const std::function<std::string(const GenRequest&)>& render = nullptr);

// Serialises for the wire (one line, invalid UTF-8 replaced by U+FFFD).
std::string dump(const Json& j);

}  // namespace moeflux::server
