#include "text/unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>

#include "util/error.h"

namespace moeflux {

namespace {

// What the lead byte b allows: the sequence length and the range of the second byte (Unicode
// Table 3-7, which rules out overlong forms, surrogates and code points above U+10FFFF).
struct LeadInfo {
  int len;  // 0: b cannot start a sequence
  uint8_t lo, hi;
};

LeadInfo lead_info(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Length of the valid sequence at s[i] (> 0), or -k where k >= 1 is the length of the maximal
// invalid subpart there, or 0 when s ends inside a sequence that is valid so far.
int classify(std::string_view s, size_t i) {
  LeadInfo li = lead_info(uint8_t(s[i]));
  if (li.len == 1) return 1;
  if (li.len == 0) return -1;
  for (int k = 1; k < li.len; ++k) {
    if (i + k >= s.size()) return 0;
    uint8_t c = uint8_t(s[i + k]);
    uint8_t lo = k == 1 ? li.lo : 0x80, hi = k == 1 ? li.hi : 0xBF;
    if (c < lo || c > hi) return -k;
  }
  return li.len;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII runs are most of most text.
    while (i + 8 <= s.size()) {
      uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    int c = classify(s, i);
    if (c <= 0) return i;
    i += size_t(c);
  }
  return std::string_view::npos;
}

char32_t next_code_point(std::string_view s, size_t* i) {
  uint8_t b = uint8_t(s[*i]);
  if (b < 0x80) {
    *i += 1;
    return b;
  }
  int len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
  char32_t cp = b & (0x7F >> len);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (uint8_t(s[*i + k]) & 0x3F);
  *i += size_t(len);
  return cp;
}

void append_utf8(std::string* out, char32_t cp) {
  if (cp < 0x80) {
    out->push_back(char(cp));
  } else if (cp < 0x800) {
    out->push_back(char(0xC0 | (cp >> 6)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(char(0xE0 | (cp >> 12)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(char(0xF0 | (cp >> 18)));
    out->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  }
}

size_t append_utf8_lossy(std::string_view s, bool final_chunk, std::string* out) {
  size_t i = 0;
  while (i < s.size()) {
    int c = classify(s, i);
    if (c > 0) {
      out->append(s.substr(i, size_t(c)));
      i += size_t(c);
    } else if (c < 0) {
      out->append(kReplacement);
      i += size_t(-c);
    } else if (final_chunk) {  // cut off by the end: one U+FFFD for the whole tail
      out->append(kReplacement);
      i = s.size();
    } else {
      break;
    }
  }
  return i;
}

namespace {

std::string utf8proc_normalize(std::string_view s, NormalForm form) {
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalForm::kNfc:
      options |= UTF8PROC_COMPOSE;
      break;
    case NormalForm::kNfd:
      options |= UTF8PROC_DECOMPOSE;
      break;
    case NormalForm::kNfkc:
      options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
      break;
    case NormalForm::kNfkd:
      options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
      break;
  }
  utf8proc_uint8_t* dst = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    utf8proc_ssize_t(s.size()), &dst, utf8proc_option_t(options));
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owned(dst, &std::free);
  if (n < 0)
    fail(ErrorKind::kInvalidArgument, "unicode normalisation failed: {}", utf8proc_errmsg(n));
  return std::string(reinterpret_cast<const char*>(dst), size_t(n));
}

// Code points with canonical combining class 0 and NFC_Quick_Check=Yes that are never the
// second half of a composition (checked against Python's unicodedata 14.0 over these ranges).
// The text before such a character normalises independently of the text from it on (UAX #15,
// "safe points"), and the character alone is already NFC.
bool nfc_safe_start(char32_t cp) {
  return cp < 0x300 || (cp >= 0x400 && cp <= 0x482) || (cp >= 0x48A && cp <= 0x52F) ||
         (cp >= 0x3000 && cp <= 0x3029) || (cp >= 0x3041 && cp <= 0x3096) ||
         (cp >= 0x30A1 && cp <= 0x30FA) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0xAC00 && cp <= 0xD7A3) ||
         (cp >= 0xFF01 && cp <= 0xFFEF) || (cp >= 0x1F300 && cp <= 0x1FAFF);
}

}  // namespace

bool is_normalized_quick(std::string_view s, NormalForm form) {
  if (form != NormalForm::kNfc) {
    uint8_t limit = form == NormalForm::kNfd ? 0xC3 : 0xC2;  // see normalize()
    for (char ch : s)
      if (uint8_t(ch) >= limit) return false;
    return true;
  }
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    if (!nfc_safe_start(next_code_point(s, &i))) return false;
  }
  return true;
}

std::string normalize(std::string_view s, NormalForm form) {
  if (form != NormalForm::kNfc) {
    // NFD already splits the precomposed letters from U+00C0 (lead byte 0xC3); the
    // compatibility forms change U+00A0 and others from U+0080 on.
    uint8_t limit = form == NormalForm::kNfd ? 0xC3 : 0xC2;
    for (char ch : s)
      if (uint8_t(ch) >= limit) return utf8proc_normalize(s, form);
    return std::string(s);
  }
  // NFC: only the stretches between safe points that hold anything else go through utf8proc,
  // which costs ~40 ns a byte; English, CJK and emoji text mostly copies through.
  std::string out;
  out.reserve(s.size());
  size_t copied = 0;   // s[0, copied) is in out
  size_t chunk = 0;    // where the current stretch began (a safe point)
  bool dirty = false;  // the stretch holds a code point that is not a safe start
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {  // ASCII: a safe start
      if (dirty) {
        out.append(s, copied, chunk - copied);
        out += utf8proc_normalize(s.substr(chunk, i - chunk), form);
        copied = i;
        dirty = false;
      }
      chunk = i++;
      continue;
    }
    size_t p = i;
    char32_t cp = next_code_point(s, &i);
    if (nfc_safe_start(cp)) {
      if (dirty) {
        out.append(s, copied, chunk - copied);
        out += utf8proc_normalize(s.substr(chunk, p - chunk), form);
        copied = p;
        dirty = false;
      }
      chunk = p;
    } else {
      dirty = true;
    }
  }
  if (dirty) {
    out.append(s, copied, chunk - copied);
    out += utf8proc_normalize(s.substr(chunk), form);
  } else {
    out.append(s, copied);
  }
  return out;
}

bool is_unicode_whitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

bool is_word_char(char32_t cp) {
  constexpr uint32_t kWordCategories =
      1u << UTF8PROC_CATEGORY_LU | 1u << UTF8PROC_CATEGORY_LL | 1u << UTF8PROC_CATEGORY_LT |
      1u << UTF8PROC_CATEGORY_LM | 1u << UTF8PROC_CATEGORY_LO | 1u << UTF8PROC_CATEGORY_NL |
      1u << UTF8PROC_CATEGORY_MN | 1u << UTF8PROC_CATEGORY_MC | 1u << UTF8PROC_CATEGORY_ME |
      1u << UTF8PROC_CATEGORY_ND | 1u << UTF8PROC_CATEGORY_PC;
  if (kWordCategories >> utf8proc_category(utf8proc_int32_t(cp)) & 1) return true;
  // ZWNJ/ZWJ (Join_Control), and the symbols with Other_Alphabetic (circled and squared Latin
  // letters); the other Other_Alphabetic code points are marks, counted above.
  return cp == 0x200C || cp == 0x200D || (cp >= 0x24B6 && cp <= 0x24E9) ||
         (cp >= 0x1F130 && cp <= 0x1F149) || (cp >= 0x1F150 && cp <= 0x1F169) ||
         (cp >= 0x1F170 && cp <= 0x1F189);
}

}  // namespace moeflux
