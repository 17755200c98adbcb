#include "convert/tiktoken.h"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"

namespace moeflux {

const char* const kKimiK2Pattern =
    R"([\p{Han}]+)"
    R"(|[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])*)"
    R"((?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])+)"
    R"((?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|\p{N}{1,3})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+)"
    R"(|\s+(?!\S))"
    R"(|\s+)";

namespace {

bool base64_decode(std::string_view in, std::string* out) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  out->clear();
  if (in.empty() || in.size() % 4) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int j = 0; j < 4; j++) {
      const char c = in[i + size_t(j)];
      if (c == '=' && i + 4 == in.size() && j >= 2) {
        v[j] = 0;
        pad++;
      } else if (pad || (v[j] = val(c)) < 0) {
        return false;
      }
    }
    const uint32_t w =
        uint32_t(v[0]) << 18 | uint32_t(v[1]) << 12 | uint32_t(v[2]) << 6 | uint32_t(v[3]);
    out->push_back(char(w >> 16));
    if (pad < 2) out->push_back(char((w >> 8) & 0xff));
    if (pad < 1) out->push_back(char(w & 0xff));
  }
  return true;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else if (cp < 0x800) {
    s.push_back(char(0xc0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  } else {
    s.push_back(char(0xe0 | (cp >> 12)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  }
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n.
std::vector<std::string> byte_chars() {
  std::vector<std::string> m(256);
  uint32_t n = 0;
  for (uint32_t b = 0; b < 256; b++) {
    const bool printable =
        (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    append_utf8(m[b], printable ? b : 256 + n++);
  }
  return m;
}

}  // namespace

std::string tiktoken_to_tokenizer_json(const std::string& tiktoken_path,
                                       const std::string& config_path, const std::string& pattern,
                                       int n_reserved) {
  const std::string text = read_text_file(tiktoken_path);
  std::vector<std::string> by_rank;
  std::unordered_map<std::string, int> rank_of;
  {
    std::istringstream in(text);
    std::string line, tok;
    std::vector<std::pair<int64_t, std::string>> entries;
    int line_no = 0;
    while (std::getline(in, line)) {
      line_no++;
      if (line.empty()) continue;
      const size_t sp = line.find(' ');
      char* end = nullptr;
      const long long r =
          sp == std::string::npos ? -1 : std::strtoll(line.c_str() + sp + 1, &end, 10);
      if (sp == std::string::npos || !base64_decode(std::string_view(line).substr(0, sp), &tok) ||
          r < 0 || r > (1 << 30) || !end || *end != '\0')
        fail(ErrorKind::kFormat, "{}:{}: expected '<base64 token> <rank>'", tiktoken_path, line_no);
      entries.push_back({r, tok});
    }
    by_rank.resize(entries.size());
    std::vector<char> seen(entries.size(), 0);
    for (const auto& [r, t] : entries) {
      if (size_t(r) >= entries.size() || seen[size_t(r)])
        fail(ErrorKind::kFormat, "{}: ranks must be 0..{} each once (rank {})", tiktoken_path,
             entries.size() - 1, r);
      seen[size_t(r)] = 1;
      by_rank[size_t(r)] = t;
      if (!rank_of.emplace(t, int(r)).second)
        fail(ErrorKind::kFormat, "{}: token of rank {} appears twice", tiktoken_path, r);
    }
  }
  const std::vector<std::string> bc = byte_chars();
  auto chars = [&](const std::string& b) {
    std::string s;
    for (unsigned char c : b) s += bc[c];
    return s;
  };
  // Plain json (sorted keys): an ordered_json object looks keys up linearly, quadratic over a
  // 160k vocabulary.
  using json = nlohmann::json;
  json vocab = json::object();
  json merges = json::array();
  struct Merge {
    int l, r;
  };
  std::vector<Merge> local;
  for (size_t r = 0; r < by_rank.size(); r++) {
    const std::string& t = by_rank[r];
    vocab[chars(t)] = int(r);
    if (t.size() < 2) continue;
    // Every split of the token into two vocabulary tokens, by the ranks of the pieces
    // (transformers' TikTokenConverter.extract_vocab_merges_from_model).
    local.clear();
    for (size_t i = 1; i < t.size(); i++) {
      auto a = rank_of.find(t.substr(0, i)), b = rank_of.find(t.substr(i));
      if (a != rank_of.end() && b != rank_of.end()) local.push_back({a->second, b->second});
    }
    std::stable_sort(local.begin(), local.end(), [](const Merge& x, const Merge& y) {
      return x.l != y.l ? x.l < y.l : x.r < y.r;
    });
    for (const Merge& m : local)
      merges.push_back(json::array({chars(by_rank[size_t(m.l)]), chars(by_rank[size_t(m.r)])}));
  }
  // Special tokens: tokenizer_config.json's, then the reserved names for the rest.
  const int n_base = int(by_rank.size());
  std::unordered_map<int, json> given;
  if (!config_path.empty() && file_exists(config_path)) {
    const nlohmann::json cfg = parse_json(read_text_file(config_path), config_path);
    if (cfg.is_object() && cfg.contains("added_tokens_decoder")) {
      const auto& d = cfg["added_tokens_decoder"];
      if (!d.is_object())
        fail(ErrorKind::kFormat, "{}: 'added_tokens_decoder' must be an object", config_path);
      for (const auto& [k, v] : d.items()) {
        char* end = nullptr;
        const long id = std::strtol(k.c_str(), &end, 10);
        if (!end || *end || id < n_base || id >= n_base + n_reserved || !v.is_object() ||
            !v.contains("content") || !v["content"].is_string())
          fail(ErrorKind::kFormat,
               "{}: added_tokens_decoder entry '{}' is not a token of ids "
               "[{}, {}) with a 'content'",
               config_path, k, n_base, n_base + n_reserved);
        given[int(id)] = v;
      }
    }
  }
  json added = json::array();
  for (int id = n_base; id < n_base + n_reserved; id++) {
    auto it = given.find(id);
    const nlohmann::json* e = it == given.end() ? nullptr : &it->second;
    auto flag = [&](const char* k, bool def) {
      return e && e->contains(k) && (*e)[k].is_boolean() ? (*e)[k].get<bool>() : def;
    };
    added.push_back({{"id", id},
                     {"content", e ? (*e)["content"].get<std::string>()
                                   : fmt::format("<|reserved_token_{}|>", id)},
                     {"single_word", flag("single_word", false)},
                     {"lstrip", flag("lstrip", false)},
                     {"rstrip", flag("rstrip", false)},
                     {"normalized", flag("normalized", false)},
                     {"special", flag("special", true)}});
  }
  json out = {{"version", "1.0"},
              {"truncation", nullptr},
              {"padding", nullptr},
              {"added_tokens", added},
              {"normalizer", nullptr},
              {"pre_tokenizer",
               {{"type", "Sequence"},
                {"pretokenizers", json::array({{{"type", "Split"},
                                                {"pattern", {{"Regex", pattern}}},
                                                {"behavior", "Isolated"},
                                                {"invert", false}},
                                               {{"type", "ByteLevel"},
                                                {"add_prefix_space", false},
                                                {"trim_offsets", true},
                                                {"use_regex", false}}})}}},
              {"post_processor", nullptr},
              {"decoder",
               {{"type", "ByteLevel"},
                {"add_prefix_space", true},
                {"trim_offsets", true},
                {"use_regex", true}}},
              {"model",
               {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", true},
                {"vocab", vocab},
                {"merges", merges}}}};
  return out.dump();
}

}  // namespace moeflux
