// UTF-8 and Unicode helpers for the tokenizer: strict validation, lossy decoding the way Rust's
// String::from_utf8_lossy does it (what Hugging Face tokenizers' decode returns), normalisation
// forms (utf8proc) and the two character classes that added-token matching needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moeflux {

// Offset of the first byte that does not start or continue a valid UTF-8 sequence (overlong
// forms, surrogates and code points above U+10FFFF are invalid; so is a sequence cut off by the
// end of s), or npos when s is valid throughout.
size_t find_invalid_utf8(std::string_view s);

// Decodes the code point at s[i], which must be valid UTF-8 (checked by find_invalid_utf8);
// returns it and advances i past it.
char32_t next_code_point(std::string_view s, size_t* i);
void append_utf8(std::string* out, char32_t cp);

// Appends s to *out with every invalid sequence replaced by U+FFFD, one per maximal invalid
// subpart (Unicode §3.9 "substitution of maximal subparts", as Rust's from_utf8_lossy).
// With final_chunk false it stops before a trailing sequence that is incomplete but could still
// be completed by more bytes, and returns how many bytes of s it consumed; streaming callers
// keep the rest. With final_chunk true it consumes everything.
size_t append_utf8_lossy(std::string_view s, bool final_chunk, std::string* out);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
// s must be valid UTF-8.
std::string normalize(std::string_view s, NormalForm form);
// True when s is certainly in that form already (a quick check that errs towards false).
bool is_normalized_quick(std::string_view s, NormalForm form);

// Unicode White_Space: Rust's char::is_whitespace and its regex crate's \s.
bool is_unicode_whitespace(char32_t cp);
// A word character as the Rust regex crate's \w, which tokenizers uses for added tokens
// marked single_word: Alphabetic, marks, decimal digits, connector punctuation, ZWNJ/ZWJ.
bool is_word_char(char32_t cp);

}  // namespace moeflux
