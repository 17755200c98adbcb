#include "server/slots.h"

#include <algorithm>
#include <chrono>

#include "util/error.h"

namespace moeflux::server {

size_t common_prefix(std::span<const int32_t> a, std::span<const int32_t> b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) i++;
  return i;
}

size_t Slot::prepare(std::span<const int32_t> prompt, bool use_cache) {
  MF_CHECK(!prompt.empty());
  if (!session->valid()) reset();
  size_t keep = use_cache ? common_prefix(history(), prompt) : 0;
  if (keep == prompt.size()) keep--;  // one token must be evaluated for the first logits
  if (keep < history().size()) {
    try {
      session->seq_rm(int(keep), -1);
    } catch (const Error&) {
      reset();  // a failed re-evaluation leaves the session invalid: start from nothing
    }
  }
  return history().size();
}

void Slot::reset() { session->clear(); }

SlotResult generate_on_slot(Slot& slot, const Tokenizer& tok, std::span<const int32_t> prompt,
                            const SamplerParams& sampling, const GenerateParams& params,
                            bool use_cache, const TextSink& sink) {
  SlotResult out;
  out.cached = slot.prepare(prompt, use_cache);
  Sampler sampler(sampling, slot.vocab_size);
  for (size_t i = 0; i < out.cached; i++) sampler.accept(prompt[i]);
  try {
    out.r = generate(*slot.session, tok, sampler, prompt.subspan(out.cached), params, sink);
  } catch (...) {
    slot.reset();  // an eval that threw leaves the session in no known state
    throw;
  }
  return out;
}

SlotPool::SlotPool(const Model& model, ExpertStore& store, int n_slots, const ContextOptions& backend,
                   int max_queue, const SessionParams& params)
    : max_queue_(max_queue) {
  if (n_slots < 1) fail(ErrorKind::kInvalidArgument, "--parallel: {} is below 1", n_slots);
  if (max_queue < 0) fail(ErrorKind::kInvalidArgument, "--queue: {} is negative", max_queue);
  for (int i = 0; i < n_slots; i++) {
    auto s = std::make_unique<Slot>();
    s->id = i;
    s->backend = store.memory().device().context(backend);  // the device the store serves
    s->session = std::make_unique<Session>(model, *s->backend, store, params);
    s->vocab_size = model.spec().vocab_size;
    slots_.push_back(std::move(s));
  }
  in_use_.assign(slots_.size(), false);
}

int SlotPool::ctx() const { return slots_.front()->session->ctx(); }

bool SlotPool::try_admit() {
  std::lock_guard lock(mu_);
  if (admitted_ >= size() + max_queue_) return false;
  admitted_++;
  return true;
}

void SlotPool::leave() {
  std::lock_guard lock(mu_);
  admitted_--;
}

Slot* SlotPool::acquire(std::span<const int32_t> prompt, const std::atomic<bool>* cancel) {
  std::unique_lock lock(mu_);
  const uint64_t ticket = next_ticket_++;
  waiting_.push_back(ticket);
  auto free_slot = [&] { return std::find(in_use_.begin(), in_use_.end(), false) != in_use_.end(); };
  for (;;) {
    if (cancel && cancel->load()) {
      waiting_.erase(std::find(waiting_.begin(), waiting_.end(), ticket));
      cv_.notify_all();  // the next in line may be first now
      return nullptr;
    }
    if (waiting_.front() == ticket && free_slot()) break;
    // Woken by release(); the timeout is for the cancel flag, which another thread sets.
    cv_.wait_for(lock, std::chrono::milliseconds(50));
  }
  waiting_.pop_front();
  int best = -1;
  size_t best_len = 0;
  for (int i = 0; i < size(); i++) {
    if (in_use_[size_t(i)]) continue;
    const size_t len = common_prefix(slots_[size_t(i)]->history(), prompt);
    if (best < 0 || len > best_len ||
        (len == best_len && slots_[size_t(i)]->last_used < slots_[size_t(best)]->last_used)) {
      best = i;
      best_len = len;
    }
  }
  in_use_[size_t(best)] = true;
  slots_[size_t(best)]->last_used = ++clock_;
  cv_.notify_all();  // another slot may be free for the next in line
  return slots_[size_t(best)].get();
}

void SlotPool::release(Slot* slot) {
  {
    std::lock_guard lock(mu_);
    in_use_[size_t(slot->id)] = false;
  }
  cv_.notify_all();
}

int SlotPool::busy() const {
  std::lock_guard lock(mu_);
  return int(std::count(in_use_.begin(), in_use_.end(), true));
}

int SlotPool::queued() const {
  std::lock_guard lock(mu_);
  return int(waiting_.size());
}

}  // namespace moeflux::server
