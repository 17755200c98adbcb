// libFuzzer target for the tokenizer. The first byte says what the rest of the input is:
//   even: a tokenizer.json to load, then used on a few strings;
//   odd:  text to encode with a small fixed tokenizer, then decoded and streamed back.
// Anything may happen but a crash, a sanitizer report or an exception other than moeflux::Error.
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 60 s:
//   CXX=clang++ cmake -S . -B build-fuzz -G Ninja && cmake --build build-fuzz --target
//   fuzz_tokenizer build-fuzz/tests/fuzz_tokenizer -max_total_time=60 -dict=tests/fuzz/json.dict
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "text/tokenizer.h"
#include "text/unicode.h"
#include "util/error.h"

namespace {

using moeflux::DetokenizeStream;
using moeflux::Error;
using moeflux::Tokenizer;

constexpr const char* kJson = R"JSON({
  "added_tokens": [
    {"id": 9, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false,
     "normalized": false, "special": true},
    {"id": 10, "content": "[M]", "single_word": true, "lstrip": true, "rstrip": true,
     "normalized": true, "special": false}],
  "normalizer": {"type": "NFC"},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": true, "use_regex": true}]},
  "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġa": 4, "Ġab": 5, "Ã": 6,
            "©": 7, "Ã©": 8},
            "merges": [["a", "b"], "Ġ a", ["Ġa", "b"], ["Ã", "©"]]}
})JSON";

void use(const Tokenizer& tok, std::string_view text) {
  try {
    std::vector<int32_t> ids = tok.encode(text, text.size() % 2 == 0);
    std::string decoded = tok.decode(ids);
    DetokenizeStream stream(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    if (streamed != decoded) std::abort();
    if (moeflux::find_invalid_utf8(decoded) != std::string_view::npos) std::abort();
  } catch (const Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    try {
      Tokenizer tok = Tokenizer::from_json(rest, "fuzz.json");
      use(tok, "ab abc 's <|end|> [M] é 12");
      use(tok, rest.substr(0, 64));
    } catch (const Error&) {
    }
  } else {
    static const Tokenizer tok = Tokenizer::from_json(kJson, "fuzz_tokenizer.cpp");
    use(tok, rest);
  }
  return 0;
}
