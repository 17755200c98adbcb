#include "engine/generate.h"

#include <algorithm>
#include <chrono>
#include <optional>

#include "util/error.h"

namespace moeflux {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Routes decoded text to thinking or answer, holds back answer text that could begin a stop
// string, and finds stop strings.
class TextRouter {
 public:
  TextRouter(const std::vector<std::string>& stop, bool show_thinking, const TextSink& sink,
             GenerateResult& r)
      : stop_(stop), show_thinking_(show_thinking), sink_(sink), r_(r) {
    std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
  }

  // `tag` is the tag's text when the piece ends with a think tag (kept out of `reasoning`).
  void thinking(const std::string& piece, std::string_view tag = {}) {
    if (piece.empty()) return;
    flush_answer();  // a stop string does not run across thinking
    r_.text += piece;
    r_.reasoning.append(piece, 0, piece.size() - std::min(piece.size(), tag.size()));
    if (show_thinking_ && sink_) sink_(piece, true);
  }

  // Returns true when a stop string completed: the answer ends before it.
  bool answer(const std::string& piece) {
    pending_ += piece;
    size_t at = std::string::npos;
    for (const std::string& s : stop_) at = std::min(at, pending_.find(s));
    if (at != std::string::npos) {
      pending_.resize(at);
      flush_answer();
      return true;
    }
    // The longest tail of pending_ that is a proper prefix of a stop string stays back. It
    // starts where a stop string starts, at a character boundary, so what goes out is whole
    // characters.
    size_t hold = 0;
    for (const std::string& s : stop_) {
      for (size_t k = std::min(s.size() - 1, pending_.size()); k > hold; k--) {
        if (std::string_view(pending_).substr(pending_.size() - k) ==
            std::string_view(s).substr(0, k)) {
          hold = k;
          break;
        }
      }
    }
    emit_answer(pending_.size() - hold);
    return false;
  }

  void flush_answer() { emit_answer(pending_.size()); }

 private:
  void emit_answer(size_t n) {
    if (n == 0) return;
    std::string_view out(pending_.data(), n);
    r_.text += out;
    r_.content += out;
    if (sink_) sink_(out, false);
    pending_.erase(0, n);
  }

  std::vector<std::string> stop_;
  bool show_thinking_;
  const TextSink& sink_;
  GenerateResult& r_;
  std::string pending_;  // answer text not yet streamed
};

}  // namespace

const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCtx:
      return "ctx";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

std::vector<int32_t> eos_token_ids(const ModelSpec& spec, const Tokenizer& tokenizer,
                                   std::string_view eos_token) {
  std::vector<int32_t> ids;
  auto add = [&](int32_t id) {
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  };
  for (int id : spec.eos_ids) add(id);
  if (!eos_token.empty())
    if (auto id = tokenizer.token_id(eos_token)) add(*id);
  return ids;
}

GenerateResult generate(Session& session, const Tokenizer& tok, Sampler& sampler,
                        std::span<const int32_t> prompt, const GenerateParams& p,
                        const TextSink& sink) {
  if (prompt.empty()) fail(ErrorKind::kInvalidArgument, "generate: the prompt is empty");
  if (int64_t(session.pos()) + int64_t(prompt.size()) > session.ctx())
    fail(ErrorKind::kInvalidArgument,
         "prompt: {} tokens do not fit in the context ({} of {} positions in use); raise --ctx",
         prompt.size(), session.pos(), session.ctx());

  GenerateResult r;
  r.prompt_tokens = int(prompt.size());
  const int V = sampler.vocab_size();
  std::vector<float> logits(static_cast<size_t>(V));

  const std::optional<int32_t> think_open = tok.token_id("<think>");
  const std::optional<int32_t> think_close = tok.token_id("</think>");
  const bool has_think = think_open && think_close;
  bool in_think = false;
  if (has_think)
    for (int32_t t : prompt) {
      if (t == *think_open) in_think = true;
      if (t == *think_close) in_think = false;
    }
  std::vector<int32_t> forced_end;  // "\n</think>\n\n"
  if (has_think && p.think_budget >= 0) {
    forced_end = tok.encode("\n</think>\n\n");
    if (std::find(forced_end.begin(), forced_end.end(), *think_close) == forced_end.end())
      forced_end.clear();  // the tokenizer does not split </think> out: no budget
  }

  for (int32_t t : prompt) sampler.accept(t);
  auto t0 = Clock::now();
  session.eval(prompt.data(), int(prompt.size()), logits.data(), false);
  r.prompt_seconds = seconds_since(t0);

  auto g0 = Clock::now();
  TextRouter router(p.stop, p.show_thinking, sink, r);
  DetokenizeStream detok(tok);
  std::optional<FinishReason> finish;
  std::vector<int32_t> batch;

  // Streams token t's text; returns true when a stop string completed.
  auto consume = [&](int32_t t) {
    if (has_think && t == *think_open) {
      in_think = true;
      router.thinking(detok.push(t), tok.token_bytes(t));
      return false;
    }
    if (has_think && t == *think_close && in_think) {
      router.thinking(detok.push(t), tok.token_bytes(t));
      in_think = false;
      return false;
    }
    if (in_think) {
      router.thinking(detok.push(t));
      return false;
    }
    return router.answer(detok.push(t));
  };

  while (!finish) {
    if (p.cancel && p.cancel->load(std::memory_order_relaxed)) {
      finish = FinishReason::kCancelled;
      break;
    }
    if (p.max_tokens >= 0 && int(r.tokens.size()) >= p.max_tokens) {
      finish = FinishReason::kLength;
      break;
    }
    batch.clear();
    if (in_think && !forced_end.empty() && !r.think_forced && r.think_tokens >= p.think_budget) {
      batch = forced_end;
      if (p.max_tokens >= 0)
        batch.resize(std::min(batch.size(), size_t(p.max_tokens) - r.tokens.size()));
      r.think_forced = true;
      for (int32_t t : batch) {
        sampler.accept(t);
        r.tokens.push_back(t);
        if (consume(t)) finish = FinishReason::kStop;
      }
    } else {
      const int32_t t = sampler.sample(logits.data());
      sampler.accept(t);
      r.tokens.push_back(t);
      if (std::find(p.eos_ids.begin(), p.eos_ids.end(), t) != p.eos_ids.end()) {
        finish = FinishReason::kEos;
        break;
      }
      if (in_think && !(has_think && t == *think_close)) r.think_tokens++;
      if (consume(t)) finish = FinishReason::kStop;
      batch.push_back(t);
    }
    if (finish) break;
    // The last token is not evaluated: its logits would go unused.
    if (p.max_tokens >= 0 && int(r.tokens.size()) >= p.max_tokens) {
      finish = FinishReason::kLength;
      break;
    }
    if (int64_t(session.pos()) + int64_t(batch.size()) > session.ctx()) {
      finish = FinishReason::kCtx;
      break;
    }
    session.eval(batch.data(), int(batch.size()), logits.data(), false);
    r.evaluated += int(batch.size());
  }
  r.finish = *finish;
  if (r.finish != FinishReason::kStop) {
    std::string rest = detok.flush();
    if (in_think)
      router.thinking(rest);
    else if (!rest.empty() && router.answer(rest))
      r.finish = FinishReason::kStop;
    router.flush_answer();
  }
  r.gen_seconds = seconds_since(g0);
  return r;
}

}  // namespace moeflux
