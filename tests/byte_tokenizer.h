// A byte-level BPE tokenizer.json whose ids fill [0, 1024) exactly, for generating text with the
// fixture models (vocab 1024) in tests:
//   0 <|im_start|>  1 <|im_end|> (the fixtures' eos_token_id)  2 <think>  3 </think>
//   4 <|endoftext|>  5..260 the 256 bytes (id 5 + byte)  261..936 the 676 pairs of lower-case
//   letters  937..962 " a".." z"  963 "\n\n"  964..1023 " aa", " ab", ... (60 of them).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace moeflux::test {

constexpr int kByteTokenBase = 5;  // id of byte b = kByteTokenBase + b

// GPT-2's byte -> printable code point mapping (the ByteLevel pre-tokeniser's alphabet).
inline std::string byte_level_char(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
    int n = 0;
    for (int x = 0; x < b; x++)
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

inline std::string byte_tokenizer_json() {
  using json = nlohmann::ordered_json;
  json vocab = json::object();
  json merges = json::array();
  json added = json::array();
  const char* specials[] = {"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"};
  int id = 0;
  for (const char* s : specials) {
    vocab[s] = id;
    const bool special = std::string(s) != "<think>" && std::string(s) != "</think>";
    added.push_back({{"id", id},
                     {"content", s},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", special}});
    id++;
  }
  for (int b = 0; b < 256; b++) vocab[byte_level_char(b)] = id++;
  const std::string sp = byte_level_char(' '), nl = byte_level_char('\n');
  for (char a = 'a'; a <= 'z'; a++)
    for (char b = 'a'; b <= 'z'; b++) {
      vocab[std::string{a, b}] = id++;
      merges.push_back({std::string(1, a), std::string(1, b)});
    }
  for (char a = 'a'; a <= 'z'; a++) {
    vocab[sp + a] = id++;
    merges.push_back({sp, std::string(1, a)});
  }
  vocab[nl + nl] = id++;
  merges.push_back({nl, nl});
  for (char a = 'a'; id < 1024; a++)
    for (char b = 'a'; b <= 'z' && id < 1024; b++) {
      vocab[sp + a + b] = id++;
      merges.push_back({sp, std::string{a, b}});
    }
  json j = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", false},
        {"trim_offsets", false},
        {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", false},
        {"trim_offsets", false},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merges}}},
  };
  return j.dump();
}

// A tokenizer_config.json with the ChatML template and <|im_end|> as eos_token.
inline std::string chatml_tokenizer_config_json() {
  nlohmann::ordered_json j = {
      {"eos_token", "<|im_end|>"},
      {"chat_template",
       "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
       "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
       "{{ '<|im_start|>assistant\\n' }}{% endif %}"},
  };
  return j.dump(2);
}

}  // namespace moeflux::test
