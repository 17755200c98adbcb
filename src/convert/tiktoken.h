// Kimi K2 ships its tokenizer as a tiktoken BPE file (tiktoken.model: "<base64 token> <rank>"
// per line) plus a pre-tokeniser pattern in its Python code and special tokens in
// tokenizer_config.json, not as a tokenizer.json. The converter turns that into the
// tokenizer.json the runtime reads (text/tokenizer.h), the way transformers' TikTokenConverter
// does: byte-level vocabulary (GPT-2's byte-to-unicode mapping), merges derived from the ranks,
// ignore_merges (tiktoken takes a whole pre-token that is in the vocabulary as it is), the
// pattern as a Split(Isolated) pre-tokeniser, and the reserved special tokens above the base
// vocabulary.
#pragma once

#include <string>

namespace moeflux {

// Kimi K2's pat_str (tokenization_kimi.py) in PCRE2 form: tiktoken's Rust regex writes "letters
// and marks but not Han" as the class intersection [\p{Lu}...\p{M}&&[^\p{Han}]], which PCRE2
// has not; each becomes (?:(?!\p{Han})[\p{Lu}...\p{M}]).
extern const char* const kKimiK2Pattern;

// tokenizer.json text for `tiktoken_path` with `pattern`. Special tokens: tokenizer_config.json's
// added_tokens_decoder (`config_path`, may be empty), and "<|reserved_token_N|>" for every other
// id of the `n_reserved` ids after the base vocabulary, as tokenization_kimi.py names them.
// Throws Error naming the file and line for a malformed line, duplicate token or ranks that are
// not 0..n-1.
std::string tiktoken_to_tokenizer_json(const std::string& tiktoken_path,
                                       const std::string& config_path, const std::string& pattern,
                                       int n_reserved = 256);

}  // namespace moeflux
