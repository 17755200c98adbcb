#include "util/json.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>

namespace moeflux {

std::string json_limit_violation(std::string_view text, const JsonLimits& limits) {
  if (text.size() > limits.max_bytes)
    return fmt::format("text of {} bytes is larger than the limit of {} bytes", text.size(),
                       limits.max_bytes);
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); i++) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        i++;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limits.max_depth)
        return fmt::format("nested deeper than {} levels (the limit) at byte {}", limits.max_depth,
                           i);
    } else if ((c == ']' || c == '}') && depth > 0) {
      depth--;
    }
  }
  return {};
}

std::string json_error_brief(const std::exception& e) {
  std::string s = e.what();
  if (s.size() > 200) s = s.substr(0, 200) + "…";
  return s;
}

namespace {

// Writes `v` into `out` until it holds more than `max` chars. Depth is bounded by the parse.
template <class J>
void write_brief(const J& v, std::string& out, size_t max) {
  if (out.size() > max) return;
  if (v.is_array()) {
    out += '[';
    bool first = true;
    for (const J& x : v) {
      if (out.size() > max) return;
      if (!first) out += ',';
      first = false;
      write_brief(x, out, max);
    }
    out += ']';
  } else if (v.is_object()) {
    out += '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (out.size() > max) return;
      if (!first) out += ',';
      first = false;
      out += quote_brief(it.key(), max);
      out += ':';
      write_brief(it.value(), out, max);
    }
    out += '}';
  } else if (v.is_string()) {
    out += quote_brief(v.template get_ref<const std::string&>(), max);
  } else {
    out += v.dump();
  }
}

template <class J>
std::string brief_of(const J& v, size_t max_chars) {
  std::string out;
  write_brief(v, out, max_chars);
  if (out.size() > max_chars) {
    size_t n = max_chars;
    while (n > 0 && (uint8_t(out[n]) & 0xC0) == 0x80) n--;  // do not split a UTF-8 sequence
    out = out.substr(0, n) + "…";
  }
  return out;
}

}  // namespace

std::string json_brief(const nlohmann::json& v, size_t max_chars) {
  return brief_of(v, max_chars);
}
std::string json_brief(const nlohmann::ordered_json& v, size_t max_chars) {
  return brief_of(v, max_chars);
}

std::string quote_brief(std::string_view s, size_t max_chars) {
  // dump() replaces invalid UTF-8, so the message stays printable.
  auto quote = [](std::string_view x) {
    return nlohmann::json(std::string(x))
        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  if (s.size() <= max_chars) return quote(s);
  size_t n = max_chars;
  while (n > 0 && (uint8_t(s[n]) & 0xC0) == 0x80) n--;  // do not split a UTF-8 sequence
  return quote(s.substr(0, n)) + "…";
}

}  // namespace moeflux
