// Generation slots and the prompt cache.
//
// A slot is one Session with its own CPU backend (a backend's thread pool runs one forward pass
// at a time), sharing the Model and the ExpertStore with the other slots. It remembers the tokens
// its session holds (`history`), so a request whose prompt starts with them evaluates only the
// rest: a chat's next turn costs its new tokens, not the whole conversation.
//
// Admission: at most `slots + max_queue` generation requests are in the server at once; more
// get 503 (try_admit fails). Admitted requests take slots first come, first served; a free slot
// is chosen by the longest common prefix between its history and the prompt (ties: the least
// recently used), so that concurrent conversations keep their own slots.
//
// Rewinding: when the prompt leaves a slot's history before its end (an edited turn, a
// re-tokenised answer, the same prompt again), the session drops the tokens past the common
// prefix with Session::seq_rm, which cuts the full-attention KV and restores the linear layers'
// state from its newest checkpoint at or before that point, re-evaluating the tokens between
// (one is taken after every prompt, so a chat's next turn replays at most the previous answer).
// Never stale: the state is what a fresh session fed the kept tokens would hold.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "engine/backend.h"
#include "engine/generate.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

namespace moeflux::server {

struct Slot {
  int id = 0;
  std::unique_ptr<Context> backend;
  std::unique_ptr<Session> session;
  int vocab_size = 0;  // the model's
  uint64_t last_used = 0;

  // The tokens the session holds, in order.
  const std::vector<int32_t>& history() const { return session->tokens(); }

  // Prepares the session for `prompt` (non-empty): keeps the longest prefix of the history
  // that the prompt starts with, leaving at least one prompt token to evaluate (its logits
  // start the generation). Returns how many prompt tokens the session already holds.
  size_t prepare(std::span<const int32_t> prompt, bool use_cache);
  // Forgets everything (after an error left the session in an unknown state).
  void reset();
};

size_t common_prefix(std::span<const int32_t> a, std::span<const int32_t> b);

struct SlotResult {
  GenerateResult r;
  size_t cached = 0;  // prompt tokens the slot already held (not evaluated again)
};

// generate() on a slot: prepare(prompt, use_cache), a fresh Sampler that has accepted the
// reused prefix too, then the rest of the prompt and the generation. The tokens are those a
// fresh session would give (the forward pass gives the same bits for a token whether it is
// evaluated alone or in a batch, and seq_rm restores exact states). An exception resets the slot.
SlotResult generate_on_slot(Slot& slot, const Tokenizer& tok, std::span<const int32_t> prompt,
                            const SamplerParams& sampling, const GenerateParams& params,
                            bool use_cache, const TextSink& sink = nullptr);

class SlotPool {
 public:
  // `threads` per slot backend (0: one per core).
  SlotPool(const Model& model, ExpertStore& store, int n_slots, const ContextOptions& backend, int max_queue,
           const SessionParams& params);

  // Takes a place (a slot or the queue); false when all are taken. Pair with leave().
  bool try_admit();
  void leave();

  // Waits for a free slot, first come first served; returns the best one for `prompt`, or
  // nullptr when *cancel became true while waiting. Pair with release().
  Slot* acquire(std::span<const int32_t> prompt, const std::atomic<bool>* cancel);
  void release(Slot* slot);

  int size() const { return int(slots_.size()); }
  int ctx() const;
  int busy() const;
  int queued() const;
  int max_queue() const { return max_queue_; }
  // The slots themselves (tests).
  Slot& slot(int i) { return *slots_[size_t(i)]; }

 private:
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<bool> in_use_;
  int max_queue_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int admitted_ = 0;
  std::deque<uint64_t> waiting_;  // tickets of requests waiting for a slot, oldest first
  uint64_t next_ticket_ = 0, clock_ = 0;
};

}  // namespace moeflux::server
