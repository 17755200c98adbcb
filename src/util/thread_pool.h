// A fixed pool of worker threads. parallel_for cuts [0, n) into one contiguous range per
// thread; callers put each output element in exactly one range, so results never depend on
// the thread count (no cross-thread reductions).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moeflux {

// The most compute threads anything takes: 4x the cores. More only time-slice, and at thousands
// the workers' spin-wait for the next job livelocks the machine; a larger request is an error
// (kInvalidArgument naming `what`), not a silent cap, so a typo like -t 10000 is seen.
int max_threads();
// n <= 0: one per core; otherwise n, checked against max_threads().
int resolve_threads(int n, const char* what);

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // resolve_threads(n_threads, "threads")
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // fn(begin, end) over disjoint ranges covering [0, n); returns when all are done. Ranges are
  // multiples of `grain` (except the last) so SIMD-friendly blocks are not split.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                    int64_t grain = 1);

 private:
  void worker(int index);
  void run_chunk(int index);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  int sleepers_ = 0;  // workers waiting on cv_start_ (under mu_)
  // current job
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
};

}  // namespace moeflux
