#include "util/thread_pool.h"

#include <immintrin.h>

#include <algorithm>

#include "util/error.h"

namespace moeflux {

namespace {
// A worker that finishes a job spins this many pause loops (~0.1 ms) for the next before it
// sleeps: a decoded token is hundreds of small jobs back to back, and waking a sleeping thread
// costs a futex call and a reschedule each (measured: 10% of decode time in this VM's
// paravirtual IRQ path).
constexpr int kSpin = 1 << 12;
}  // namespace

int max_threads() {
  return 4 * int(std::max(1u, std::thread::hardware_concurrency()));
}

int resolve_threads(int n, const char* what) {
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  if (n <= 0) return cores;
  if (n > max_threads())
    fail(ErrorKind::kInvalidArgument,
         "{} = {} is more than {} (4x the {} cores of this machine; 0: one per core)", what, n,
         max_threads(), cores);
  return n;
}

ThreadPool::ThreadPool(int n_threads) {
  n_threads_ = resolve_threads(n_threads, "threads");
  for (int i = 1; i < n_threads_; i++) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_start_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_chunk(int index) {
  int64_t blocks = (n_ + grain_ - 1) / grain_;
  int64_t per = blocks / n_threads_, extra = blocks % n_threads_;
  int64_t b0 = index * per + std::min<int64_t>(index, extra);
  int64_t b1 = b0 + per + (index < extra ? 1 : 0);
  int64_t begin = std::min(n_, b0 * grain_), end = std::min(n_, b1 * grain_);
  if (begin < end) (*fn_)(begin, end);
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    bool ready = false;
    for (int i = 0; i < kSpin && !ready; i++) {
      ready = stop_.load(std::memory_order_relaxed) ||
              generation_.load(std::memory_order_acquire) != seen;
      if (!ready) _mm_pause();
    }
    if (!ready) {
      std::unique_lock<std::mutex> lk(mu_);
      sleepers_++;
      cv_start_.wait(lk, [&] { return stop_.load() || generation_.load() != seen; });
      sleepers_--;
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    run_chunk(index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                              int64_t grain) {
  if (n <= 0) return;
  if (n_threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = std::max<int64_t>(1, grain);
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  bool wake;
  {
    // Under the lock: a worker about to sleep either sees the new generation or is counted.
    std::lock_guard<std::mutex> lk(mu_);
    generation_.fetch_add(1, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) cv_start_.notify_all();
  run_chunk(0);
  for (int i = 0; i < kSpin; i++) {
    if (pending_.load(std::memory_order_acquire) == 0) return;
    _mm_pause();
  }
  std::unique_lock<std::mutex> lk(mu_);
  cv_done_.wait(lk, [&] { return pending_.load() == 0; });
}

}  // namespace moeflux
