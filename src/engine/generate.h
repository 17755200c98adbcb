// Text generation: evaluate a prompt, then sample and evaluate one token at a time, streaming
// the text as it comes.
//
// generate() evaluates the prompt in one batched Session::eval (appended to whatever the
// session already holds), then loops: check the cancellation flag, sample, stream the token's
// text, evaluate it. It stops at
//   eos        a token of GenerateParams::eos_ids (see eos_token_ids; not streamed),
//   stop       a stop string in the answer text (the string and what follows are dropped),
//   length     max_tokens generated,
//   ctx        the session's context is full,
//   cancelled  *cancel became true (checked before every token).
// The last generated token is not evaluated: the session holds the prompt and every generated
// token but the last (pos() grows by prompt + tokens - 1), which is what a chat needs to carry on.
//
// Thinking (Qwen3 `<think>`…`</think>`, when the tokenizer has both tokens): the text between
// the tags is "thinking", the rest is the answer. A prompt whose last think tag is `<think>`
// (Qwen3.5's generation prompt) starts in thinking. With show_thinking the sink sees everything,
// tags included; without, it sees only the answer (thinking is still generated and evaluated).
// think_budget >= 0: after that many tokens inside thinking the tokens of "\n</think>\n\n" are
// forced (evaluated in one batch, counted as generated) and the answer follows.
//
// Text goes through DetokenizeStream, so no piece ends inside a UTF-8 character. Stop strings
// are matched in the answer, not inside thinking, each stretch of answer on its own; text that
// could be the start of a stop string is held back until it is known not to be one, so the
// stream never shows any part of a stop string.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/session.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

namespace moeflux {

enum class FinishReason { kEos, kStop, kLength, kCtx, kCancelled };
const char* to_string(FinishReason r);  // "eos", "stop", "length", "ctx", "cancelled"

struct GenerateParams {
  int max_tokens = -1;            // < 0: no limit (until EOS, a stop string or a full context)
  std::vector<std::string> stop;  // stop strings, matched in the answer text
  std::vector<int32_t> eos_ids;   // end-of-generation tokens; empty: never stop at a token
  bool show_thinking = true;
  int think_budget = -1;  // < 0: no limit
  const std::atomic<bool>* cancel = nullptr;
};

// Receives text as it is generated; `thinking` tells which part it belongs to.
using TextSink = std::function<void(std::string_view text, bool thinking)>;

struct GenerateResult {
  std::vector<int32_t> tokens;  // sampled and forced tokens in order; includes a final EOS
  // Everything generated, thinking and tags included, without EOS and the stop string: what a
  // sink with show_thinking received, concatenated.
  std::string text;
  std::string reasoning;  // the thinking text, without the tags
  std::string content;    // the answer: what a sink without show_thinking received
  FinishReason finish = FinishReason::kLength;
  int prompt_tokens = 0;
  int evaluated = 0;  // generated tokens the session evaluated
  int think_tokens = 0;
  bool think_forced = false;  // the budget closed the thinking
  double prompt_seconds = 0;  // the prompt's eval
  double gen_seconds = 0;     // from the prompt's logits to the end: sampling and decode
  double prompt_tps() const { return prompt_seconds > 0 ? prompt_tokens / prompt_seconds : 0; }
  double gen_tps() const { return gen_seconds > 0 ? double(tokens.size()) / gen_seconds : 0; }
};

// The model's eos_ids, plus the id of `eos_token` (the tokenizer config's eos_token, "" for
// none) when the tokenizer knows it; in order, without repeats.
std::vector<int32_t> eos_token_ids(const ModelSpec& spec, const Tokenizer& tokenizer,
                                   std::string_view eos_token = {});

// Evaluates `prompt` (non-empty) and generates. The sampler accepts the prompt's and the
// generated tokens (its penalties see them). Throws Error(kInvalidArgument), before any
// evaluation, when the prompt is empty or does not fit in the context left.
GenerateResult generate(Session& session, const Tokenizer& tokenizer, Sampler& sampler,
                        std::span<const int32_t> prompt, const GenerateParams& params,
                        const TextSink& sink = nullptr);

}  // namespace moeflux
