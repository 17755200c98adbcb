// Hugging Face tokenizer.json byte-level BPE tokenizer (Qwen3, Qwen3.5, GPT-2 style).
//
// Everything comes from the file: vocab, merges (["a","b"] pairs or "a b" strings), added
// tokens with their flags, the normaliser, the pre-tokeniser (its regexes run through PCRE2
// with UTF+UCP) and the decoder. encode() follows tokenizers' pipeline:
//   1. split out added tokens whose "normalized" flag is false (leftmost, longest first; the
//      lstrip / rstrip / single_word flags as tokenizers applies them);
//   2. normalise each remaining piece, then split out added tokens with "normalized": true;
//   3. pre-tokenise each remaining piece (Sequence / Split / ByteLevel / Digits);
//   4. BPE each pre-token (lowest merge rank first, leftmost on ties), cached per pre-token.
// It adds no BOS/EOS: the post_processor is not applied (Qwen's ByteLevel one changes only
// offsets). Where tokenizers has quirks they are kept, so that ids match it: characters with no
// vocabulary entry and no unk_token are dropped; ByteLevel's add_prefix_space applies to every
// piece; added tokens get tokenizers' ids (the vocabulary's id for their content, else the next
// free id after the vocabulary, in file order), not the "id" written in the file, which
// tokenizers only checks with a warning (real files agree).
// Supported components, each an Error naming the field when it is something else:
//   normalizer     NFC NFD NFKC NFKD Prepend Replace Sequence, or null
//   pre_tokenizer  Split (String or Regex pattern, all five behaviours, invert) ByteLevel
//                  (add_prefix_space, use_regex = GPT-2's pattern) Digits Sequence, or null
//   model          BPE (unk_token, fuse_unk, byte_fallback, ignore_merges,
//                  continuing_subword_prefix, end_of_word_suffix; dropout null or 0)
//   decoder        ByteLevel
//
// Thread safety: a loaded Tokenizer is safe to use from several threads at once. The pre-token
// cache is per thread (no lock on the hot path) and belongs to the last tokenizer that thread
// used; alternating two tokenizers on one thread empties it each time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moeflux {

class Tokenizer {
 public:
  // Errors (moeflux::Error) name the file and the JSON field at fault.
  static Tokenizer load(const std::string& path_to_tokenizer_json);
  // The same from the file's text; `source` names it in errors.
  static Tokenizer from_json(std::string_view json_text, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // text must be valid UTF-8 (else Error naming the byte offset). With parse_special, special
  // added tokens written in the text ("<|im_start|>") become their ids; without it they are
  // encoded as plain text, as tokenizers' encode_special_tokens does. Added tokens that are not
  // special ("<think>" in Qwen3) are always matched.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;

  // Concatenates the tokens' bytes and replaces invalid UTF-8 with U+FFFD, as tokenizers'
  // decode(ids, skip_special_tokens=false). Ids that name no token (the model's padding rows
  // past the vocabulary, negative ids) decode to nothing, as there.
  std::string decode(std::span<const int32_t> ids) const;

  // The token as tokenizers' id_to_token spells it: the vocabulary's form ("Ġworld"), an added
  // token's content ("<|im_end|>"; normalised if the token is marked "normalized"). Error if
  // id names no token.
  std::string token_text(int32_t id) const;
  // The bytes the decoder turns the token into (" world"); possibly a partial UTF-8 sequence;
  // empty when id names no token.
  std::string_view token_bytes(int32_t id) const;
  // One past the largest token id (vocab and added tokens); the model's embedding may be larger.
  int32_t vocab_size() const;
  // The id of a vocabulary token or of an added token's content as written in the file (added
  // tokens first, as tokenizers' token_to_id).
  std::optional<int32_t> token_id(std::string_view token) const;
  bool is_special(int32_t id) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns ids into text one at a time, for printing while generating. Never returns a string
// that ends inside a UTF-8 sequence: bytes of an unfinished character are held back until the
// token that completes it arrives, or until flush(). The concatenation of everything push()
// and flush() return equals tokenizer.decode(all ids). The tokenizer must outlive the stream.
class DetokenizeStream {
 public:
  explicit DetokenizeStream(const Tokenizer& tokenizer) : tok_(&tokenizer) {}
  std::string push(int32_t id);
  // Returns what is held back (an unfinished sequence becomes U+FFFD) and starts afresh.
  std::string flush();

 private:
  const Tokenizer* tok_;
  std::string pending_;  // at most 3 bytes: the start of a character not yet complete
};

}  // namespace moeflux
