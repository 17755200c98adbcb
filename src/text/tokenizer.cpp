#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "text/unicode.h"
#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"

namespace moeflux {

namespace {

using json = nlohmann::json;

struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StrHash, std::equal_to<>>;

// Open addressing with linear probing and no allocation per entry, for the two big tables:
// loading inserts ~150k tokens and ~150k merges, and BPE looks up merges in its inner loop.
class VocabMap {
 public:
  size_t size() const { return entries_.size(); }
  const auto& entries() const { return entries_; }  // (token, id) in insertion order
  void reserve(size_t n) {
    entries_.reserve(n);
    hashes_.reserve(n);
    rehash(n);
  }

  int32_t find(std::string_view key) const {  // -1 when absent
    if (slots_.empty()) return -1;
    uint64_t h = StrHash{}(key);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      uint32_t s = slots_[i];
      if (s == 0) return -1;
      const auto& e = entries_[s - 1];
      if (hashes_[s - 1] == h && e.first == key) return e.second;
    }
  }
  // Inserts, or gives an existing token the new id (a repeated JSON key: the last one counts).
  void set(std::string key, int32_t id) {
    if ((entries_.size() + 1) * 2 > slots_.size()) rehash(entries_.size() + 1);
    uint64_t h = StrHash{}(key);
    size_t i = h & mask_;
    for (; slots_[i] != 0; i = (i + 1) & mask_) {
      auto& e = entries_[slots_[i] - 1];
      if (hashes_[slots_[i] - 1] == h && e.first == key) {
        e.second = id;
        return;
      }
    }
    entries_.emplace_back(std::move(key), id);
    hashes_.push_back(h);
    slots_[i] = uint32_t(entries_.size());
  }

 private:
  void rehash(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    if (cap <= slots_.size()) return;
    slots_.assign(cap, 0);
    mask_ = cap - 1;
    for (size_t k = 0; k < entries_.size(); ++k) {
      size_t i = hashes_[k] & mask_;
      while (slots_[i] != 0) i = (i + 1) & mask_;
      slots_[i] = uint32_t(k + 1);
    }
  }
  std::vector<std::pair<std::string, int32_t>> entries_;
  std::vector<uint64_t> hashes_;
  std::vector<uint32_t> slots_;  // 1 + index into entries_, 0 = empty
  size_t mask_ = 0;
};

struct MergeRule {
  int32_t rank;
  int32_t new_id;
};

// (left id, right id) -> merge rule.
class MergeMap {
 public:
  void reserve(size_t n) { rehash(n); }
  const MergeRule* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    uint64_t key = pack(a, b);
    for (size_t i = mix(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.rule;
      if (s.key == kEmpty) return nullptr;
    }
  }
  // A repeated pair takes the later rule, as a map built in file order does.
  void set(int32_t a, int32_t b, MergeRule rule) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(size_ + 1);
    uint64_t key = pack(a, b);
    size_t i = mix(key) & mask_;
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    if (slots_[i].key == kEmpty) ++size_;
    slots_[i] = {key, rule};
  }

 private:
  struct Slot {
    uint64_t key;
    MergeRule rule;
  };
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // ids are below 2^31: never a real key
  static uint64_t pack(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static uint64_t mix(uint64_t x) {  // splitmix64's finaliser
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  void rehash(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    if (cap <= slots_.size()) return;
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(cap, Slot{kEmpty, {}});
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.key == kEmpty) continue;
      size_t i = mix(s.key) & mask_;
      while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0, size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// JSON access: every failure names the file and the field path ("model.merges[12]").

std::string brief(const json& j) {
  return json_brief(j, 60);
}

struct Field {
  const json& j;
  std::string path;
  const std::string& source;

  [[noreturn]] void bad(ErrorKind kind, const std::string& what) const {
    fail(kind, "{}: {}: {}", source, path.empty() ? "(top level)" : path, what);
  }
  [[noreturn]] void bad(const std::string& what) const { bad(ErrorKind::kFormat, what); }

  std::string key_path(std::string_view k) const {
    return path.empty() ? std::string(k) : path + "." + std::string(k);
  }
  void expect_object() const {
    if (!j.is_object()) bad("must be a JSON object, got " + brief(j));
  }
  bool has(const char* k) const { return j.is_object() && j.contains(k) && !j[k].is_null(); }
  Field get(const char* k) const {
    expect_object();
    if (!has(k)) fail(ErrorKind::kFormat, "{}: {}: missing", source, key_path(k));
    return {j[k], key_path(k), source};
  }
  Field at(size_t i) const { return {j[i], fmt::format("{}[{}]", path, i), source}; }

  std::string str() const {
    if (!j.is_string()) bad("must be a string, got " + brief(j));
    return j.get<std::string>();
  }
  bool boolean() const {
    if (!j.is_boolean()) bad("must be true or false, got " + brief(j));
    return j.get<bool>();
  }
  int32_t token_id() const {
    if (!j.is_number_integer() || j.get<int64_t>() < 0 || j.get<int64_t>() > INT32_MAX)
      bad("must be a token id (an integer in [0, 2^31)), got " + brief(j));
    return int32_t(j.get<int64_t>());
  }
  const json& array() const {
    if (!j.is_array()) bad("must be an array, got " + brief(j));
    return j;
  }
  std::string str_or(const char* k, const std::string& def) const {
    return has(k) ? get(k).str() : def;
  }
  bool bool_or(const char* k, bool def) const { return has(k) ? get(k).boolean() : def; }
  std::string type() const { return get("type").str(); }
};

// ---------------------------------------------------------------------------------------------
// Regexes. tokenizers runs its patterns through Oniguruma; PCRE2 with UTF+UCP reads the same
// syntax for what tokenizer.json files use (\p{L}, (?i:...), lookahead, \s as Unicode space).

struct MatchData {
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  ~MatchData() { pcre2_match_data_free(md); }
};

pcre2_match_data* thread_match_data() {
  thread_local MatchData m;
  if (!m.md) throw std::bad_alloc();
  return m.md;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? fmt::format("PCRE2 error {}", code) : std::string(reinterpret_cast<char*>(buf));
}

using Range = std::pair<size_t, size_t>;  // [begin, end) byte offsets

class Regex {
 public:
  // where: "file: field" for errors.
  Regex(std::string_view pattern, bool literal, std::string where) : where_(std::move(where)) {
    int err = 0;
    PCRE2_SIZE off = 0;
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);  // LITERAL rejects UCP
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err,
                          &off, nullptr);
    if (!code_)
      fail(ErrorKind::kFormat, "{}: bad regex at offset {}: {}", where_, off, pcre2_message(err));
    // JIT is an optimisation: where it is unavailable pcre2_match interprets.
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Where the next search starts; see next().
  struct Cursor {
    size_t last_end = 0;
    bool have_last = false;
    size_t last_match_end = 0;
  };

  // The next match in s (valid UTF-8), in the order Oniguruma's find_iter yields them, which is
  // what tokenizers splits on: each search starts where the previous match ended, and an empty
  // match right at the end of the previous match is skipped by moving on one character.
  bool next(std::string_view s, Cursor* c, Range* m) const {
    pcre2_match_data* md = thread_match_data();
    while (c->last_end <= s.size()) {
      if (!match(s, c->last_end, md)) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      // \K can put the reported start after the end; keep offsets ordered and in bounds.
      if (b > e || e > s.size() || e < c->last_end)
        fail(ErrorKind::kUnsupported, "{}: the regex reported the match [{}, {}) searching from {}",
             where_, b, e, c->last_end);
      if (b == e && c->have_last && c->last_match_end == e) {
        size_t step = 1;
        if (c->last_end < s.size()) {
          uint8_t ch = uint8_t(s[c->last_end]);
          step = ch < 0x80 ? 1 : ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : 2;
        }
        c->last_end += step;
        continue;
      }
      c->last_end = e;
      c->last_match_end = e;
      c->have_last = true;
      *m = {b, e};
      return true;
    }
    c->last_end = s.size() + 1;
    return false;
  }

  // Calls part(begin, end, is_match) for the matches in s and the gaps between them, in order:
  // tokenizers' Pattern::find_matches.
  template <typename Part>
  void for_each_part(std::string_view s, Part part) const {
    Cursor c;
    Range m;
    size_t prev = 0;
    while (next(s, &c, &m)) {
      if (prev != m.first) part(prev, m.first, false);
      part(m.first, m.second, true);
      prev = m.second;
    }
    if (prev != s.size()) part(prev, s.size(), false);
  }

 private:
  bool match(std::string_view s, size_t start, pcre2_match_data* md) const {
    auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)  // the interpreter keeps its backtracking on the heap
      rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md,
                       nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0)
      fail(ErrorKind::kInvalidArgument,
           "{}: matching a {}-byte piece of the input from byte {}: {}", where_, s.size(), start,
           pcre2_message(rc));
    return true;  // rc == 0 only says the 1-pair ovector could not hold the capture groups
  }

  pcre2_code* code_ = nullptr;
  std::string where_;
};

// GPT-2's pre-tokeniser pattern, which ByteLevel applies when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> unicode table: printable bytes map to themselves, the other 68 to U+0100...

struct ByteLevelTable {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<std::string, 256> byte_to_utf8;
  std::vector<int16_t> cp_to_byte;  // -1: not the image of a byte

  ByteLevelTable() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_cp[b] = printable ? char32_t(b) : next++;
    }
    cp_to_byte.assign(next, -1);
    for (int b = 0; b < 256; ++b) {
      cp_to_byte[byte_to_cp[b]] = int16_t(b);
      append_utf8(&byte_to_utf8[b], byte_to_cp[b]);
    }
  }
};

const ByteLevelTable& byte_level() {
  static const ByteLevelTable t;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Pipeline pieces.

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct NormStep {
  enum Kind { kForm, kPrepend, kReplace } kind;
  NormalForm form = NormalForm::kNfc;
  std::string text;              // Prepend: the prefix; Replace: the replacement
  std::unique_ptr<Regex> regex;  // Replace
};

struct PreStep {
  enum Kind { kSplit, kByteLevel } kind = kSplit;
  std::unique_ptr<Regex> regex;  // Split
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = false;         // ByteLevel
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, single_word = false, lstrip = false, rstrip = false, normalized = false;
};

// Byte trie over added-token contents for leftmost-longest matching (what tokenizers' Aho-
// Corasick with MatchKind::LeftmostLongest finds).
class Trie {
 public:
  bool empty() const { return nodes_.size() <= 1; }
  void add(std::string_view s, int32_t value) {
    if (nodes_.empty()) nodes_.emplace_back();
    first_[uint8_t(s[0])] = true;
    size_t n = 0;
    for (char ch : s) {
      uint8_t c = uint8_t(ch);
      int32_t child = find_child(n, c);
      if (child < 0) {
        child = int32_t(nodes_.size());
        nodes_[n].next.push_back({c, child});
        nodes_.emplace_back();
      }
      n = size_t(child);
    }
    nodes_[n].value = value;
  }
  // Leftmost position >= from where some content starts, with the longest content there.
  bool find(std::string_view s, size_t from, size_t* pos, size_t* len, int32_t* value) const {
    if (empty()) return false;
    for (size_t i = from; i < s.size(); ++i) {
      if (!first_[uint8_t(s[i])]) continue;
      size_t n = 0, best = 0;
      int32_t best_value = -1;
      for (size_t k = i; k < s.size(); ++k) {
        int32_t child = find_child(n, uint8_t(s[k]));
        if (child < 0) break;
        n = size_t(child);
        if (nodes_[n].value >= 0) {
          best = k + 1 - i;
          best_value = nodes_[n].value;
        }
      }
      if (best_value >= 0) {
        *pos = i;
        *len = best;
        *value = best_value;
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;
    int32_t value = -1;
  };
  int32_t find_child(size_t n, uint8_t c) const {
    for (const auto& [k, child] : nodes_[n].next)
      if (k == c) return child;
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
};

// The code point that ends s / starts s (s valid UTF-8, non-empty).
char32_t last_code_point(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  return next_code_point(s, &i);
}
char32_t first_code_point(std::string_view s) {
  size_t i = 0;
  return next_code_point(s, &i);
}

struct Symbol {
  int32_t id;
  int32_t prev, next;
  bool alive;
};
struct Candidate {
  int32_t rank, pos, new_id;
  bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

// Buffers one encode() call reuses: per pre-tokeniser step, the text it hands on (ByteLevel
// rewrites it); for BPE, the symbols and the merge queue.
struct Scratch {
  struct Level {
    std::string prefixed, mapped;
  };
  std::vector<Level> levels;
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

uint64_t hash_piece(std::string_view s) {  // short strings: a few multiplies, no table
  uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
  }
  uint64_t w = 0;
  std::memcpy(&w, s.data() + i, s.size() - i);
  h = (h ^ w) * 0x94d049bb133111ebull;
  return h ^ (h >> 29);
}

// Pre-token -> its BPE ids. One per thread, so the hot path takes no lock; it belongs to one
// tokenizer at a time (`owner`) and starts afresh when another one uses the thread, or when
// it is full. Open addressing over one key arena and one id arena: no allocation per entry.
class PieceCache {
 public:
  static constexpr size_t kMaxWord = 256;  // longer pre-tokens are rare and not worth keeping
  static constexpr size_t kMaxEntries = size_t(1) << 17;

  uint64_t owner = 0;

  void clear() {
    slots_.assign(slots_.size(), Slot{});
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }
  bool find(std::string_view key, uint64_t h, std::vector<int32_t>* out) const {
    if (slots_.empty()) return false;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key_len == 0) return false;
      if (s.hash == h && s.key_len == key.size() &&
          std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0) {
        out->insert(out->end(), ids_.begin() + s.ids_off, ids_.begin() + s.ids_off + s.ids_len);
        return true;
      }
    }
  }
  // key (non-empty, at most kMaxWord bytes) must not be in the cache.
  void insert(std::string_view key, uint64_t h, const int32_t* ids, size_t n) {
    if (used_ >= kMaxEntries) clear();
    if ((used_ + 1) * 2 > slots_.size()) grow();
    size_t i = h & mask_;
    while (slots_[i].key_len != 0) i = (i + 1) & mask_;
    slots_[i] = {h, uint32_t(keys_.size()), uint32_t(key.size()), uint32_t(ids_.size()),
                 uint32_t(n)};
    keys_.append(key);
    ids_.insert(ids_.end(), ids, ids + n);
    ++used_;
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = 0;  // key_len 0: empty
    uint32_t ids_off = 0, ids_len = 0;
  };
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(4096, old.size() * 2), Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.key_len == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].key_len != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t used_ = 0, mask_ = 0;
};

PieceCache& thread_piece_cache() {
  thread_local PieceCache cache;
  return cache;
}

std::atomic<uint64_t> g_next_tokenizer_id{1};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string source;

  // model (BPE)
  VocabMap vocab;
  MergeMap merges;
  std::vector<int32_t> small_char_ids;  // [cp] for cp < 0x800: id of the one-character token
  std::optional<int32_t> unk_id;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string prefix, suffix;  // continuing_subword_prefix, end_of_word_suffix
  std::array<int32_t, 256> byte_fallback_ids{};

  // added tokens
  std::vector<AddedToken> added;
  StringMap<int32_t> added_by_content;
  Trie raw_trie, normalized_trie;  // values index `added`

  std::vector<NormStep> normalizers;
  std::vector<PreStep> pre_steps;

  // by id
  std::vector<std::string> id_text;
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_kind;  // 0 none, 1 vocab, 2 added, 3 special added

  uint64_t cache_owner_id = g_next_tokenizer_id++;  // tells the thread caches apart

  // Filled while parsing (see parse_tokenizer_json), consumed by load_model.
  std::vector<std::pair<std::string, int32_t>> raw_vocab;
  std::vector<std::pair<std::string, std::string>> raw_merges;

  void load(const json& root);
  void load_model(const Field& m);
  void load_added(const Field& a);
  void load_normalizer(const Field& n, int depth = 0);
  void load_pre_tokenizer(const Field& p, int depth = 0);
  void load_decoder(const Field& d);

  std::string_view normalize_text(std::string_view s, std::string* storage) const;
  template <typename OnText>
  void split_added(std::string_view s, const Trie& trie, bool parse_special, OnText on_text,
                   std::vector<int32_t>* ids) const;
  void pre_tokenize(size_t step, std::string_view piece, Scratch* sc,
                    std::vector<int32_t>* ids) const;
  void bpe(std::string_view word, Scratch* sc, std::vector<int32_t>* ids) const;
  void merge_word(std::string_view word, Scratch* sc, std::vector<int32_t>* ids) const;
  std::optional<int32_t> char_id(std::string_view word, size_t i, size_t j) const;
};

// ---------------------------------------------------------------------------------------------
// Loading

void Tokenizer::Impl::load(const json& root) {
  Field top{root, "", source};
  top.expect_object();
  load_model(top.get("model"));
  if (top.has("added_tokens")) load_added(top.get("added_tokens"));
  if (top.has("normalizer")) load_normalizer(top.get("normalizer"));
  if (top.has("pre_tokenizer")) load_pre_tokenizer(top.get("pre_tokenizer"));
  if (!top.has("decoder"))
    fail(ErrorKind::kUnsupported,
         "{}: decoder: missing; moeflux decodes byte-level BPE (a ByteLevel decoder)", source);
  load_decoder(top.get("decoder"));

  // Added tokens marked "normalized" are matched in normalised text, so their contents are
  // normalised too; the others are matched in the raw input. tokenizers also shows and decodes
  // them in the normalised form (its id_to_token), while token_to_id takes the original.
  std::vector<std::string> shown(added.size());
  for (size_t k = 0; k < added.size(); ++k) {
    const AddedToken& t = added[k];
    if (!t.normalized) {
      raw_trie.add(t.content, int32_t(k));
      shown[k] = t.content;
    } else {
      std::string storage;
      shown[k] = std::string(normalize_text(t.content, &storage));
      if (!shown[k].empty()) normalized_trie.add(shown[k], int32_t(k));
    }
  }

  // Tables by id. Added tokens override the vocabulary where both name an id, as tokenizers'
  // id_to_token looks in the added vocabulary first.
  int64_t max_id = -1;
  for (const auto& [tok, id] : vocab.entries()) max_id = std::max<int64_t>(max_id, id);
  for (const auto& t : added) max_id = std::max<int64_t>(max_id, t.id);
  size_t count = vocab.size() + added.size();
  if (max_id >= int64_t(2 * count + 65536))
    fail(ErrorKind::kFormat,
         "{}: token ids are sparse: the largest is {} but there are only {} tokens (moeflux "
         "keeps tokens in a table indexed by id)",
         source, max_id, count);
  size_t n = size_t(max_id + 1);
  id_text.assign(n, {});
  id_kind.assign(n, 0);
  for (const auto& [tok, id] : vocab.entries()) {
    if (id_kind[id])
      fail(ErrorKind::kFormat, "{}: model.vocab: id {} is given to both '{}' and '{}'", source, id,
           id_text[id], tok);
    id_text[id] = tok;
    id_kind[id] = 1;
  }
  for (size_t k = 0; k < added.size(); ++k) {
    id_text[added[k].id] = shown[k];
    id_kind[added[k].id] = added[k].special ? 3 : 2;
  }
  // ByteLevel decoding, per token: each character back to its byte; a token with a character
  // outside the table (an added token with a space, say) stays as its UTF-8 text.
  const ByteLevelTable& bl = byte_level();
  id_bytes.assign(n, {});
  for (size_t id = 0; id < n; ++id) {
    const std::string& t = id_text[id];
    std::string& out = id_bytes[id];
    size_t i = 0;
    while (i < t.size()) {
      char32_t cp = next_code_point(t, &i);
      if (cp >= bl.cp_to_byte.size() || bl.cp_to_byte[cp] < 0) {
        out = t;
        break;
      }
      out.push_back(char(bl.cp_to_byte[cp]));
    }
  }
}

void Tokenizer::Impl::load_model(const Field& m) {
  m.expect_object();
  // Files written before tokenizers tagged its models have no "type"; they are BPE when they
  // carry merges.
  std::string type = m.has("type") ? m.get("type").str() : (m.has("merges") ? "BPE" : "");
  if (type.empty()) fail(ErrorKind::kFormat, "{}: model.type: missing", source);
  if (type != "BPE")
    fail(ErrorKind::kUnsupported, "{}: model.type: '{}' is not supported (moeflux reads BPE)",
         source, type);
  if (m.has("dropout")) {
    Field d = m.get("dropout");
    if (!d.j.is_number()) d.bad("must be a number or null, got " + brief(d.j));
    if (d.j.get<double>() != 0.0)
      d.bad(ErrorKind::kUnsupported, "BPE dropout makes encoding random; moeflux needs null or 0");
  }
  fuse_unk = m.bool_or("fuse_unk", false);
  byte_fallback = m.bool_or("byte_fallback", false);
  ignore_merges = m.bool_or("ignore_merges", false);
  prefix = m.str_or("continuing_subword_prefix", "");
  suffix = m.str_or("end_of_word_suffix", "");

  // model.vocab and model.merges were taken out of the JSON while it was parsed (raw_vocab,
  // raw_merges); the tree keeps them as empty placeholders.
  m.get("vocab").expect_object();
  m.get("merges").array();
  vocab.reserve(raw_vocab.size());
  for (auto& [tok, id] : raw_vocab) vocab.set(std::move(tok), id);
  raw_vocab = {};

  if (m.has("unk_token")) {
    std::string unk = m.get("unk_token").str();
    int32_t id = vocab.find(unk);
    if (id < 0)
      fail(ErrorKind::kFormat, "{}: model.unk_token: '{}' is not in model.vocab", source, unk);
    unk_id = id;
  }
  for (int b = 0; b < 256; ++b) byte_fallback_ids[b] = vocab.find(fmt::format("<0x{:02X}>", b));
  small_char_ids.assign(0x800, -1);
  for (const auto& [tok, id] : vocab.entries()) {
    size_t i = 0;
    char32_t cp = next_code_point(tok, &i);
    if (i == tok.size() && cp < 0x800) small_char_ids[cp] = id;
  }

  merges.reserve(raw_merges.size());
  std::string merged;
  for (size_t r = 0; r < raw_merges.size(); ++r) {
    const auto& [a, b] = raw_merges[r];
    auto bad = [&](const std::string& what) {
      fail(ErrorKind::kFormat, "{}: model.merges[{}]: {}", source, r, what);
    };
    int32_t ia = vocab.find(a), ib = vocab.find(b);
    if (ia < 0) bad(fmt::format("token '{}' is not in model.vocab", a));
    if (ib < 0) bad(fmt::format("token '{}' is not in model.vocab", b));
    if (b.size() < prefix.size())
      bad(fmt::format("token '{}' is shorter than continuing_subword_prefix", b));
    merged.assign(a);
    merged.append(b, prefix.size());
    int32_t im = vocab.find(merged);
    if (im < 0) bad(fmt::format("the merged token '{}' is not in model.vocab", merged));
    if (r > size_t(INT32_MAX)) bad("too many merges");
    merges.set(ia, ib, MergeRule{int32_t(r), im});
  }
  raw_merges = {};
}

// Ids as tokenizers gives them (AddedVocabulary::add_tokens), which is not the "id" written in
// the file: the vocabulary's id when the content is a vocabulary token, else the next id after
// the vocabulary, in file order. tokenizers only warns where the two differ; in real files they
// agree. A repeated content keeps its id and takes the later flags.
void Tokenizer::Impl::load_added(const Field& a) {
  const json& arr = a.array();
  int64_t next_id = int64_t(vocab.size());
  std::unordered_map<int32_t, size_t> index_of_id;
  for (size_t i = 0; i < arr.size(); ++i) {
    Field e = a.at(i);
    e.expect_object();
    AddedToken t;
    e.get("id").token_id();  // checked for form only, see above
    t.content = e.get("content").str();
    if (t.content.empty()) continue;  // tokenizers skips these
    t.special = e.bool_or("special", false);
    t.single_word = e.bool_or("single_word", false);
    t.lstrip = e.bool_or("lstrip", false);
    t.rstrip = e.bool_or("rstrip", false);
    t.normalized = e.bool_or("normalized", !t.special);
    if (auto it = added_by_content.find(t.content); it != added_by_content.end()) {
      t.id = it->second;
    } else if (int32_t vid = vocab.find(t.content); vid >= 0) {
      t.id = vid;
    } else {
      if (next_id > INT32_MAX) e.bad("too many tokens");
      t.id = int32_t(next_id++);
    }
    added_by_content[t.content] = t.id;
    if (auto it = index_of_id.find(t.id); it != index_of_id.end()) {
      t.special = t.special || added[it->second].special;  // tokenizers' special set only grows
      added[it->second] = std::move(t);
    } else {
      index_of_id[t.id] = added.size();
      added.push_back(std::move(t));
    }
  }
}

namespace {
NormalForm parse_form(const std::string& type) {
  if (type == "NFC") return NormalForm::kNfc;
  if (type == "NFD") return NormalForm::kNfd;
  if (type == "NFKC") return NormalForm::kNfkc;
  return NormalForm::kNfkd;
}

std::unique_ptr<Regex> parse_pattern(const Field& p) {
  p.expect_object();
  std::string where = p.source + ": " + p.path;
  if (p.has("Regex")) return std::make_unique<Regex>(p.get("Regex").str(), false, where + ".Regex");
  if (p.has("String"))
    return std::make_unique<Regex>(p.get("String").str(), true, where + ".String");
  p.bad("must be {\"Regex\": ...} or {\"String\": ...}, got " + brief(p.j));
}
}  // namespace

// Real files nest one Sequence; the limit keeps a hostile file from exhausting the stack.
constexpr int kMaxSequenceDepth = 16;

void Tokenizer::Impl::load_normalizer(const Field& n, int depth) {
  std::string type = n.type();
  if (type == "Sequence") {
    if (depth >= kMaxSequenceDepth) n.bad("Sequence nested too deeply");
    Field list = n.get("normalizers");
    list.array();
    for (size_t i = 0; i < list.j.size(); ++i) load_normalizer(list.at(i), depth + 1);
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    normalizers.push_back({NormStep::kForm, parse_form(type), {}, nullptr});
  } else if (type == "Prepend") {
    normalizers.push_back({NormStep::kPrepend, {}, n.get("prepend").str(), nullptr});
  } else if (type == "Replace") {
    normalizers.push_back(
        {NormStep::kReplace, {}, n.get("content").str(), parse_pattern(n.get("pattern"))});
  } else {
    n.get("type").bad(ErrorKind::kUnsupported,
                      fmt::format("normalizer '{}' is not supported (moeflux has NFC, NFD, NFKC, "
                                  "NFKD, Prepend, Replace, Sequence)",
                                  type));
  }
}

void Tokenizer::Impl::load_pre_tokenizer(const Field& p, int depth) {
  std::string type = p.type();
  if (type == "Sequence") {
    if (depth >= kMaxSequenceDepth) p.bad("Sequence nested too deeply");
    Field list = p.get("pretokenizers");
    list.array();
    for (size_t i = 0; i < list.j.size(); ++i) load_pre_tokenizer(list.at(i), depth + 1);
  } else if (type == "Split") {
    PreStep st;
    st.regex = parse_pattern(p.get("pattern"));
    Field b = p.get("behavior");
    static const std::pair<std::string_view, Behavior> kBehaviors[] = {
        {"Removed", Behavior::kRemoved},
        {"Isolated", Behavior::kIsolated},
        {"MergedWithPrevious", Behavior::kMergedWithPrevious},
        {"MergedWithNext", Behavior::kMergedWithNext},
        {"Contiguous", Behavior::kContiguous}};
    std::string name = b.str();
    auto it = std::find_if(std::begin(kBehaviors), std::end(kBehaviors),
                           [&](const auto& kv) { return kv.first == name; });
    if (it == std::end(kBehaviors)) b.bad("unknown split behaviour '" + name + "'");
    st.behavior = it->second;
    st.invert = p.bool_or("invert", false);
    pre_steps.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    // tokenizers' ByteLevel defaults: add_prefix_space, trim_offsets and use_regex all true.
    PreStep st;
    st.kind = PreStep::kByteLevel;
    st.add_prefix_space = p.bool_or("add_prefix_space", true);
    st.use_regex = p.bool_or("use_regex", true);
    if (st.use_regex)
      st.regex = std::make_unique<Regex>(kGpt2Pattern, false, "ByteLevel's GPT-2 pattern");
    pre_steps.push_back(std::move(st));
  } else if (type == "Digits") {
    // Splits around each digit (individual_digits) or each run of digits: char::is_numeric.
    PreStep st;
    st.regex = std::make_unique<Regex>(R"(\p{N})", false, p.source + ": " + p.path);
    st.behavior =
        p.bool_or("individual_digits", false) ? Behavior::kIsolated : Behavior::kContiguous;
    pre_steps.push_back(std::move(st));
  } else {
    p.get("type").bad(ErrorKind::kUnsupported,
                      fmt::format("pre-tokenizer '{}' is not supported (moeflux has Split, "
                                  "ByteLevel, Digits, Sequence)",
                                  type));
  }
}

void Tokenizer::Impl::load_decoder(const Field& d) {
  std::string type = d.type();
  if (type != "ByteLevel")
    d.get("type").bad(
        ErrorKind::kUnsupported,
        fmt::format("decoder '{}' is not supported (moeflux decodes ByteLevel)", type));
}

// ---------------------------------------------------------------------------------------------
// Encoding

// Returns s normalised: s itself where no step changes it (most text, for NFC), else a view
// of *storage.
std::string_view Tokenizer::Impl::normalize_text(std::string_view s, std::string* storage) const {
  std::string_view cur = s;
  std::string next;
  for (const NormStep& st : normalizers) {
    switch (st.kind) {
      case NormStep::kForm:
        if (is_normalized_quick(cur, st.form)) continue;
        next = normalize(cur, st.form);
        break;
      case NormStep::kPrepend:
        if (cur.empty()) continue;
        next = st.text;
        next.append(cur);
        break;
      case NormStep::kReplace:
        next.clear();
        st.regex->for_each_part(cur, [&](size_t b, size_t e, bool is_match) {
          if (is_match)
            next += st.text;
          else
            next.append(cur.substr(b, e - b));
        });
        break;
    }
    std::swap(*storage, next);
    cur = *storage;
  }
  return cur;
}

// Splits s around the added tokens found by `trie`, as tokenizers' AddedVocabulary::
// find_matches: text between tokens goes to on_text, token ids to *ids, in order.
template <typename OnText>
void Tokenizer::Impl::split_added(std::string_view s, const Trie& trie, bool parse_special,
                                  OnText on_text, std::vector<int32_t>* ids) const {
  size_t start_offset = 0;  // end of what has been emitted
  size_t search = 0;        // the matcher resumes at the end of its previous match
  size_t pos, len;
  int32_t index;
  while (trie.find(s, search, &pos, &len, &index)) {
    size_t start = pos, stop = pos + len;
    search = stop;
    const AddedToken& t = added[size_t(index)];
    if (!parse_special && t.special) continue;
    if (t.single_word) {
      bool start_ok = start == 0 || !is_word_char(last_code_point(s.substr(0, start)));
      bool stop_ok = stop == s.size() || !is_word_char(first_code_point(s.substr(stop)));
      if (!start_ok || !stop_ok) continue;
    }
    if (t.lstrip) {  // take in the whitespace before it, back to what was already emitted
      size_t b = start;
      while (b > 0) {
        size_t k = b - 1;
        while (k > 0 && (uint8_t(s[k]) & 0xC0) == 0x80) --k;
        size_t i = k;
        if (!is_unicode_whitespace(next_code_point(s, &i))) break;
        b = k;
      }
      start = std::max(b, start_offset);
    }
    if (t.rstrip) {  // and the whitespace after it
      while (stop < s.size()) {
        size_t i = stop;
        if (!is_unicode_whitespace(next_code_point(s, &i))) break;
        stop = i;
      }
    }
    if (start_offset < start) on_text(s.substr(start_offset, start - start_offset));
    ids->push_back(t.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) on_text(s.substr(start_offset));
}

namespace {

// tokenizers' NormalizedString::split with a Split pre-tokeniser's behaviour, one part at a
// time: emit(begin, end) gets the pieces in order, empty ones dropped as PreTokenizedString does.
template <typename Emit>
void split_piece(const PreStep& st, std::string_view s, Emit emit) {
  bool have = false;  // a piece kept back to see whether the next part joins it
  Range pending{0, 0};
  bool previous_match = false;
  auto flush = [&] {
    if (have && pending.first != pending.second) emit(pending.first, pending.second);
    have = false;
  };
  st.regex->for_each_part(s, [&](size_t b, size_t e, bool is_match) {
    if (st.invert) is_match = !is_match;
    switch (st.behavior) {
      case Behavior::kIsolated:
        if (b != e) emit(b, e);
        break;
      case Behavior::kRemoved:
        if (!is_match && b != e) emit(b, e);
        break;
      case Behavior::kContiguous:  // runs of matches, runs of the rest
        if (have && is_match == previous_match) {
          pending.second = e;
        } else {
          flush();
          pending = {b, e};
          have = true;
        }
        break;
      case Behavior::kMergedWithPrevious:  // a match joins the piece before it
        if (have && is_match && !previous_match) {
          pending.second = e;
        } else {
          flush();
          pending = {b, e};
          have = true;
        }
        break;
      case Behavior::kMergedWithNext:  // a match joins the piece after it, unless that is a match
        if (have) {                    // (pending is a match here)
          if (!is_match) {
            emit(pending.first, e);
            have = false;
            break;
          }
          flush();
        }
        if (is_match) {
          pending = {b, e};
          have = true;
        } else if (b != e) {
          emit(b, e);
        }
        break;
    }
    previous_match = is_match;
  });
  flush();
}

}  // namespace

// Runs pre-tokeniser steps [step, end) over one piece, depth first, and BPE on what comes out:
// no step holds more than the piece it is working on.
void Tokenizer::Impl::pre_tokenize(size_t step, std::string_view piece, Scratch* sc,
                                   std::vector<int32_t>* ids) const {
  if (piece.empty()) return;
  if (step == pre_steps.size()) {
    bpe(piece, sc, ids);
    return;
  }
  const PreStep& st = pre_steps[step];
  if (st.kind == PreStep::kSplit) {
    split_piece(st, piece, [&](size_t b, size_t e) {
      pre_tokenize(step + 1, piece.substr(b, e - b), sc, ids);
    });
    return;
  }
  // ByteLevel: a space in front of every piece that lacks one (as tokenizers does, not just
  // the first), GPT-2's split if use_regex, then each byte as its stand-in character.
  Scratch::Level& lv = sc->levels[step];
  if (st.add_prefix_space && piece[0] != ' ') {
    lv.prefixed.assign(" ");
    lv.prefixed.append(piece);
    piece = lv.prefixed;
  }
  const ByteLevelTable& bl = byte_level();
  auto map = [&](size_t b, size_t e) {
    if (b == e) return;
    lv.mapped.clear();
    for (size_t i = b; i < e; ++i) lv.mapped += bl.byte_to_utf8[uint8_t(piece[i])];
    pre_tokenize(step + 1, lv.mapped, sc, ids);
  };
  if (st.use_regex)
    st.regex->for_each_part(piece, [&](size_t b, size_t e, bool) { map(b, e); });
  else
    map(0, piece.size());
}

std::optional<int32_t> Tokenizer::Impl::char_id(std::string_view word, size_t i, size_t j) const {
  if (prefix.empty() && suffix.empty()) {
    size_t k = i;
    char32_t cp = next_code_point(word, &k);
    if (cp < small_char_ids.size()) {
      int32_t id = small_char_ids[cp];
      return id < 0 ? std::nullopt : std::optional<int32_t>(id);
    }
    int32_t id = vocab.find(word.substr(i, j - i));
    return id < 0 ? std::nullopt : std::optional<int32_t>(id);
  }
  std::string s = i > 0 ? prefix : std::string();
  s.append(word.substr(i, j - i));
  if (j == word.size()) s += suffix;
  int32_t id = vocab.find(s);
  return id < 0 ? std::nullopt : std::optional<int32_t>(id);
}

// tokenizers' BPE::merge_word + Word::merge_all: one symbol per character, then repeatedly the
// pair with the lowest merge rank (leftmost among equals) becomes one symbol.
void Tokenizer::Impl::merge_word(std::string_view word, Scratch* sc,
                                 std::vector<int32_t>* ids) const {
  auto& sym = sc->symbols;
  sym.clear();
  auto add = [&](int32_t id) {
    int32_t n = int32_t(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  };
  int32_t pending_unk = -1;  // fuse_unk joins a run of unknown characters into one
  size_t i = 0;
  while (i < word.size()) {
    size_t j = i;
    next_code_point(word, &j);
    if (auto id = char_id(word, i, j)) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(*id);
    } else {
      bool done = false;
      if (byte_fallback) {  // the bytes of the lookup string, affixes included
        std::string_view s = word.substr(i, j - i);
        std::string affixed;
        if (!prefix.empty() || !suffix.empty()) {
          affixed = (i > 0 ? prefix : std::string()) + std::string(s) +
                    (j == word.size() ? suffix : std::string());
          s = affixed;
        }
        bool all = true;
        for (char c : s) all = all && byte_fallback_ids[uint8_t(c)] >= 0;
        if (all) {  // a pending unknown stays pending across these, as in tokenizers
          for (char c : s) add(byte_fallback_ids[uint8_t(c)]);
          done = true;
        }
      }
      if (!done && unk_id) {  // without unk_token an unknown character is dropped
        if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
        pending_unk = *unk_id;
      }
    }
    i = j;
  }
  if (pending_unk >= 0) add(pending_unk);
  if (sym.empty()) return;
  sym.back().next = -1;

  auto& heap = sc->heap;
  heap.clear();
  auto rule = [&](int32_t a, int32_t b) -> const MergeRule* { return merges.find(a, b); };
  auto push = [&](int32_t pos, const MergeRule* r) {
    heap.push_back({r->rank, pos, r->new_id});
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
  };
  for (size_t k = 0; k + 1 < sym.size(); ++k)
    if (const MergeRule* r = rule(sym[k].id, sym[k + 1].id)) push(int32_t(k), r);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    Candidate top = heap.back();
    heap.pop_back();
    Symbol& cur = sym[size_t(top.pos)];
    if (!cur.alive || cur.next < 0) continue;
    Symbol& right = sym[size_t(cur.next)];
    const MergeRule* r = rule(cur.id, right.id);
    if (!r || r->new_id != top.new_id) continue;  // stale: a neighbour changed since
    cur.id = top.new_id;
    right.alive = false;
    cur.next = right.next;
    if (cur.next >= 0) sym[size_t(cur.next)].prev = top.pos;
    if (cur.prev >= 0)
      if (const MergeRule* rp = rule(sym[size_t(cur.prev)].id, cur.id)) push(cur.prev, rp);
    if (cur.next >= 0)
      if (const MergeRule* rn = rule(cur.id, sym[size_t(cur.next)].id)) push(top.pos, rn);
  }
  for (const Symbol& s : sym)
    if (s.alive) ids->push_back(s.id);
}

void Tokenizer::Impl::bpe(std::string_view word, Scratch* sc, std::vector<int32_t>* ids) const {
  if (ignore_merges) {
    if (int32_t id = vocab.find(word); id >= 0) {
      ids->push_back(id);
      return;
    }
  }
  if (word.size() > PieceCache::kMaxWord) {
    merge_word(word, sc, ids);
    return;
  }
  PieceCache& cache = thread_piece_cache();
  if (cache.owner != cache_owner_id) {
    cache.clear();
    cache.owner = cache_owner_id;
  }
  uint64_t h = hash_piece(word);
  if (cache.find(word, h, ids)) return;
  size_t before = ids->size();
  merge_word(word, sc, ids);
  cache.insert(word, h, ids->data() + before, ids->size() - before);
}

// ---------------------------------------------------------------------------------------------

namespace {

// Parses tokenizer.json, taking model.vocab and model.merges out as they stream past: as a
// JSON tree their 300k small nodes cost more than all the rest of loading.
json parse_tokenizer_json(std::string_view text, const std::string& source,
                          std::vector<std::pair<std::string, int32_t>>* vocab,
                          std::vector<std::pair<std::string, std::string>>* merges) {
  using Event = json::parse_event_t;
  std::vector<std::string> keys;  // keys[d]: the last key seen in the object at depth d - 1
  bool in_vocab = false, in_merges = false;
  std::string key;
  size_t index = 0;
  auto at_model = [&](const char* k) {
    return keys.size() == 3 && keys[1] == "model" && keys[2] == k;
  };
  auto callback = [&](int depth, Event ev, json& parsed) -> bool {
    if (ev == Event::key && depth <= 2) {
      keys.resize(size_t(depth) + 1);
      keys[size_t(depth)] = parsed.get<std::string>();
    }
    if (depth == 2) {
      if (ev == Event::object_start && at_model("vocab")) in_vocab = true;
      if (ev == Event::object_end) in_vocab = false;
      if (ev == Event::array_start && at_model("merges")) in_merges = true, index = 0;
      if (ev == Event::array_end) in_merges = false;
      return true;
    }
    if (depth != 3 || (!in_vocab && !in_merges)) return true;
    if (in_vocab) {
      if (ev == Event::key) {  // dropped from the tree; the value's event still comes
        key = std::move(parsed.get_ref<std::string&>());
        return false;
      }
      if (ev != Event::value && ev != Event::object_end && ev != Event::array_end) return true;
      if (key.empty()) fail(ErrorKind::kFormat, "{}: model.vocab: an empty token", source);
      if (!parsed.is_number_integer() || parsed.get<int64_t>() < 0 ||
          parsed.get<int64_t>() > INT32_MAX)
        fail(ErrorKind::kFormat,
             "{}: model.vocab.{}: must be a token id (an integer in [0, 2^31)), got {}", source,
             key, brief(parsed));
      vocab->emplace_back(std::move(key), int32_t(parsed.get<int64_t>()));
      return false;
    }
    if (ev != Event::value && ev != Event::object_end && ev != Event::array_end) return true;
    if (parsed.is_string()) {  // the older "a b" form
      const std::string& s = parsed.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail(ErrorKind::kFormat,
             "{}: model.merges[{}]: must be two tokens separated by one space, got {}", source,
             index, brief(parsed));
      merges->emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (parsed.is_array() && parsed.size() == 2 && parsed[0].is_string() &&
               parsed[1].is_string()) {
      merges->emplace_back(std::move(parsed[0].get_ref<std::string&>()),
                           std::move(parsed[1].get_ref<std::string&>()));
    } else {
      fail(ErrorKind::kFormat, "{}: model.merges[{}]: must be [\"a\", \"b\"] or \"a b\", got {}",
           source, index, brief(parsed));
    }
    ++index;
    return false;
  };
  // Capacity for a typical file (~75 bytes of JSON per token and merge), so neither regrows.
  vocab->reserve(text.size() / 64);
  merges->reserve(text.size() / 64);
  if (std::string why = json_limit_violation(text, kJsonFileLimits); !why.empty())
    fail(ErrorKind::kFormat, "{}: JSON {}", source, why);
  try {
    return json::parse(text, callback);
  } catch (const json::parse_error& e) {
    fail(ErrorKind::kFormat, "{}: invalid JSON at byte {}: {}", source, e.byte,
         json_error_brief(e));
  } catch (const json::exception& e) {  // e.g. out_of_range for a number such as 1e400
    fail(ErrorKind::kFormat, "{}: invalid JSON: {}", source, json_error_brief(e));
  }
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  MappedFile f(path);
  return from_json(std::string_view(reinterpret_cast<const char*>(f.data()), f.size()), path);
}

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source) {
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  json root = parse_tokenizer_json(json_text, source, &impl->raw_vocab, &impl->raw_merges);
  try {
    impl->load(root);
  } catch (const json::exception& e) {  // a shape the field checks above did not foresee
    fail(ErrorKind::kFormat, "{}: unexpected JSON: {}", source, e.what());
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos)
    fail(ErrorKind::kInvalidArgument,
         "tokenizer input: invalid UTF-8 at byte offset {} (byte 0x{:02X})", bad,
         uint8_t(text[bad]));
  const Impl& im = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 2 + 8);  // ~3-4 bytes a token in English, fewer in CJK
  Scratch sc;
  sc.levels.resize(im.pre_steps.size());
  auto model_piece = [&](std::string_view piece) { im.pre_tokenize(0, piece, &sc, &ids); };
  auto normalized_piece = [&](std::string_view seg) {
    std::string storage;
    std::string_view norm = im.normalize_text(seg, &storage);
    if (im.normalized_trie.empty())
      model_piece(norm);
    else
      im.split_added(norm, im.normalized_trie, parse_special, model_piece, &ids);
  };
  im.split_added(text, im.raw_trie, parse_special, normalized_piece, &ids);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id);
  std::string out;
  out.reserve(bytes.size());
  append_utf8_lossy(bytes, true, &out);
  return out;
}

std::string Tokenizer::token_text(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_kind.size() || impl_->id_kind[size_t(id)] == 0)
    fail(ErrorKind::kInvalidArgument, "token id {} is not in the tokenizer ({}; vocab size {})", id,
         impl_->source, vocab_size());
  return impl_->id_text[size_t(id)];
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_bytes.size()) return {};
  return impl_->id_bytes[size_t(id)];
}

int32_t Tokenizer::vocab_size() const {
  return int32_t(impl_->id_kind.size());
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end())
    return it->second;
  if (int32_t id = impl_->vocab.find(token); id >= 0) return id;
  return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->id_kind.size() && impl_->id_kind[size_t(id)] == 3;
}

std::string DetokenizeStream::push(int32_t id) {
  pending_ += tok_->token_bytes(id);
  std::string out;
  size_t used = append_utf8_lossy(pending_, false, &out);
  pending_.erase(0, used);
  return out;
}

std::string DetokenizeStream::flush() {
  std::string out;
  append_utf8_lossy(pending_, true, &out);
  pending_.clear();
  return out;
}

}  // namespace moeflux
