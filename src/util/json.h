// JSON from outside (files, request bodies): the one way in. nlohmann's parser builds the tree
// without recursion, but copying, comparing, dump() and our own walkers recurse, so a value
// nested 100,000 deep overflows the stack later, far from the parse. Limits are checked first
// by a linear scan, then the text is parsed; errors quote at most a short prefix of a value.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <string_view>

#include "util/error.h"

namespace moeflux {

struct JsonLimits {
  size_t max_depth;  // nesting of [ and {; a scalar at top level is depth 0
  size_t max_bytes;
};

// Files we read (config.json, moeflux.json, tokenizer.json, tokenizer_config.json, a safetensors
// index): the real ones nest < 10 deep; the largest tokenizer.json seen is ~30 MB.
inline constexpr JsonLimits kJsonFileLimits{128, size_t(1) << 30};

// "" when `text` is within `limits`, else why not, naming the limit and the byte where it was
// passed ("nested deeper than 64 levels at byte 65"). Strings are skipped, escapes honoured;
// malformed text is left to the parser.
std::string json_limit_violation(std::string_view text, const JsonLimits& limits);

// The parser's message, bounded (nlohmann quotes the whole token it failed on).
std::string json_error_brief(const std::exception& e);

// At most `max_chars` of the value's JSON text, then "…"; stops writing once past the limit,
// so a large value costs no more than a small one.
std::string json_brief(const nlohmann::json& v, size_t max_chars = 40);
std::string json_brief(const nlohmann::ordered_json& v, size_t max_chars = 40);
// A string from outside quoted for an error message, bounded the same way.
std::string quote_brief(std::string_view s, size_t max_chars = 40);

// Checks the limits, then parses. Throws Error(kFormat) "SOURCE: ..." naming the limit or the
// byte of the syntax error.
template <class J = nlohmann::json>
J parse_json(std::string_view text, const std::string& source,
             const JsonLimits& limits = kJsonFileLimits) {
  if (std::string why = json_limit_violation(text, limits); !why.empty())
    fail(ErrorKind::kFormat, "{}: JSON {}", source, why);
  try {
    return J::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(ErrorKind::kFormat, "{}: invalid JSON at byte {}: {}", source, e.byte,
         json_error_brief(e));
  } catch (const nlohmann::json::exception& e) {  // e.g. a number that overflows a double
    fail(ErrorKind::kFormat, "{}: invalid JSON: {}", source, json_error_brief(e));
  }
}

}  // namespace moeflux
