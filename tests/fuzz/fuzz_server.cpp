// libFuzzer target for the server's request -> response path without sockets: check_request()
// (src/server/api.h) parses and checks the body, and a chat's messages and chat_template_kwargs
// are rendered by a template that walks them (tojson), as the server does before tokenising.
// Input: "METHOD PATH\n" then the body; without a first line break all of it is a chat body.
// Every input must give a status in [200, 600) and a JSON body with "ok" or OpenAI's "error"
// object; a crash, a sanitizer report or an escaping exception is a finding.
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 600 s:
//   cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang
//   cmake --build build-fuzz --target fuzz_server
//   mkdir -p /tmp/corpus && build-fuzz/tests/fuzz_server -max_total_time=600 \
//     -dict=tests/fuzz/json.dict /tmp/corpus tests/fuzz/corpus/server
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "server/api.h"
#include "text/chat_template.h"
#include "util/error.h"

namespace {

using moeflux::server::Json;

const moeflux::ChatTemplate& chat_template() {
  static const moeflux::ChatTemplate t = moeflux::ChatTemplate::from_source(
      "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content }}"
      "{%- if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n"
      "{%- endfor -%}{%- if extra is defined %}{{ extra | tojson }}{% endif -%}"
      "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}",
      Json{{"eos_token", "<|im_end|>"}});
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string_view method = "POST", path = "/v1/chat/completions", body = in;
  if (size_t nl = in.find('\n'); nl != std::string_view::npos) {
    const std::string_view line = in.substr(0, nl);
    if (size_t sp = line.find(' '); sp != std::string_view::npos) {
      method = line.substr(0, sp);
      path = line.substr(sp + 1);
      body = in.substr(nl + 1);
    }
  }
  const moeflux::server::ApiReply r =
      moeflux::server::check_request(method, path, body, [](const moeflux::server::GenRequest& g) {
        try {
          return chat_template().render_json(g.messages, true, g.template_kwargs);
        } catch (const moeflux::Error& e) {  // the server answers 400 for these
          if (e.kind() == moeflux::ErrorKind::kInternal) abort();
          return std::string();
        }
      });
  if (r.status < 200 || r.status >= 600) abort();
  const Json j = Json::parse(r.body);  // the reply must be JSON (throws -> a finding)
  if (r.status == 200 ? !j.contains("ok") : !j["error"].is_object()) abort();
  if (r.status == 500) abort();  // nothing here should be a server error
  return 0;
}
