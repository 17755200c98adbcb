#include "experts/expert_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <list>
#include <mutex>
#include <numeric>
#include <thread>
#include <unordered_map>

#ifdef MOEFLUX_HAVE_LIBURING
#include <liburing.h>
#endif

#include <fmt/format.h>

#include "engine/backend.h"
#include "experts/cache_policy.h"
#include "util/error.h"
#include "util/progress.h"

namespace moeflux {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---------------------------------------------------------------------------------------------
// Reads. A Job is one whole expert record; `done` runs on the reader's thread with the error
// text (empty on success) and the seconds the read took.

struct Job {
  int file;
  uint64_t offset, len;
  uint8_t* dst;
  std::function<void(const std::string& error, double seconds)> done;
};

class ReadQueue {
 public:
  virtual ~ReadQueue() = default;
  virtual void submit(Job job) = 0;
};

// Blocking pread of the whole range (EINTR and short reads retried).
class PreadReader final : public ExpertReader {
 public:
  PreadReader(const std::vector<int>& fds, const std::vector<std::string>& paths)
      : fds_(fds), paths_(paths) {}
  void read(int file, uint64_t offset, uint64_t n, uint8_t* dst) override {
    uint64_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fds_[size_t(file)], dst + done, n - done, off_t(offset + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0)
        fail(ErrorKind::kIo, "{}: read failed at offset {}: {}", paths_[size_t(file)],
             offset + done, std::strerror(errno));
      if (r == 0)
        fail(ErrorKind::kIo, "{}: unexpected end of file at offset {} (truncated?)",
             paths_[size_t(file)], offset + done);
      done += uint64_t(r);
    }
  }

 private:
  const std::vector<int>& fds_;
  const std::vector<std::string>& paths_;
};

// Reads nothing: the store's copy-only jobs (a slot miss found in the host tier) run their
// `done` on a ThreadReadQueue of these.
class NoRead final : public ExpertReader {
 public:
  void read(int, uint64_t, uint64_t, uint8_t*) override {}
};

// A pool of threads, each running blocking reads through an ExpertReader.
class ThreadReadQueue final : public ReadQueue {
 public:
  ThreadReadQueue(std::shared_ptr<ExpertReader> reader, int n) : reader_(std::move(reader)) {
    for (int i = 0; i < n; i++) threads_.emplace_back([this] { loop(); });
  }
  ~ThreadReadQueue() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(Job job) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      q_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;  // stop_ and drained
        job = std::move(q_.front());
        q_.pop_front();
      }
      std::string err;
      const auto t0 = Clock::now();
      try {
        reader_->read(job.file, job.offset, job.len, job.dst);
      } catch (const std::exception& e) {
        err = e.what();
        if (err.empty()) err = "read failed";
      }
      job.done(err, seconds_since(t0));
    }
  }

  std::shared_ptr<ExpertReader> reader_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> q_;
  bool stop_ = false;
};

#ifdef MOEFLUX_HAVE_LIBURING
// io_uring: submitters put reads on the ring under a mutex (up to `depth` in flight, the rest
// wait in a queue); one thread reaps completions, resubmits short reads and starts queued ones.
// When the ring itself fails (io_uring_wait_cqe or io_uring_submit errors) nothing more will
// complete: every queued and in-flight read is failed at once, so their waiters wake and throw,
// and every later read fails at once with the same reason (the queue is broken for good).
class UringReadQueue final : public ReadQueue {
 public:
  UringReadQueue(const std::vector<int>& fds, const std::vector<std::string>& paths, int depth,
                 int fault_after)
      : fds_(fds), paths_(paths), depth_(std::max(depth, 1)), fault_after_(fault_after) {
    int r = io_uring_queue_init(unsigned(std::max(depth_ * 2, 8)), &ring_, 0);
    if (r < 0) fail(ErrorKind::kIo, "io_uring_queue_init: {}", std::strerror(-r));
    reaper_ = std::thread([this] { reap(); });
  }
  ~UringReadQueue() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe) {  // wakes the reaper (gone already if the ring failed under it)
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, 0);
        io_uring_submit(&ring_);
      }
    }
    reaper_.join();
    io_uring_queue_exit(&ring_);
  }
  void submit(Job job) override {
    std::vector<Op*> dead;
    std::string why;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto* op = new Op{std::move(job), 0, Clock::now(), next_id_++};
      if (broken_.empty() && int(in_flight_.size()) < depth_) start(op);
      else waiting_.push_back(op);
      if (!broken_.empty()) dead = drain(&why);
    }
    fail_ops(std::move(dead), why, /*async=*/true);
  }

 private:
  struct Op {
    Job job;
    uint64_t done;
    Clock::time_point t0;
    uint64_t id;  // the sqe's user data (0: the destructor's nop)
  };
  void start(Op* op) {  // mu_ held; on a submit error the ring is broken and op stays listed
    in_flight_[op->id] = op;
    if (!broken_.empty()) return;
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    MF_CHECK(sqe != nullptr);
    io_uring_prep_read(sqe, fds_[size_t(op->job.file)], op->job.dst + op->done,
                       unsigned(op->job.len - op->done), op->job.offset + op->done);
    io_uring_sqe_set_data64(sqe, op->id);
    const int r = io_uring_submit(&ring_);
    if (r < 0) broken_ = fmt::format("io_uring_submit: {}", std::strerror(-r));
  }
  // mu_ held: takes every read out of the queue (the ring is broken) and says why.
  std::vector<Op*> drain(std::string* why) {
    std::vector<Op*> ops;
    for (auto& [id, op] : in_flight_) ops.push_back(op);
    in_flight_.clear();
    ops.insert(ops.end(), waiting_.begin(), waiting_.end());
    waiting_.clear();
    *why = broken_;
    return ops;
  }
  // Delivers the failures (mu_ not held). From submit(), whose caller holds the store's lock
  // that done() takes, it must not call done() itself: a thread of its own delivers them.
  void fail_ops(std::vector<Op*> ops, const std::string& why, bool async) {
    if (ops.empty()) return;
    std::vector<std::string> msgs;
    for (Op* op : ops)
      msgs.push_back(fmt::format("{}: read at offset {} failed: the io_uring ring failed ({}); "
                                 "no expert can be read any more (reload the model, or use "
                                 "--io pread)",
                                 paths_[size_t(op->job.file)], op->job.offset + op->done, why));
    auto deliver = [ops = std::move(ops), msgs = std::move(msgs)] {
      for (size_t i = 0; i < ops.size(); i++) {
        ops[i]->job.done(msgs[i], seconds_since(ops[i]->t0));
        delete ops[i];
      }
    };
    if (async) std::thread(std::move(deliver)).detach();
    else deliver();
  }
  void reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      int r = io_uring_wait_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      if (r >= 0 && fault_after_ >= 0 && completed_ >= uint64_t(fault_after_))
        r = -EIO;  // test hook (ExpertStoreOptions::uring_fault_after)
      if (r < 0) {
        std::vector<Op*> dead;
        std::string why;
        {
          std::lock_guard<std::mutex> g(mu_);
          if (broken_.empty()) broken_ = fmt::format("io_uring_wait_cqe: {}", std::strerror(-r));
          dead = drain(&why);
        }
        fail_ops(std::move(dead), why, /*async=*/false);
        return;
      }
      const uint64_t id = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      Op* op = nullptr;
      {
        std::lock_guard<std::mutex> g(mu_);
        if (id == 0) {
          if (stop_ && in_flight_.empty()) return;
          continue;
        }
        auto it = in_flight_.find(id);
        if (it == in_flight_.end()) continue;  // already failed when the ring broke
        op = it->second;
        in_flight_.erase(it);
      }
      std::string err;
      bool finished = true;
      if (res == -EINTR || res == -EAGAIN) {
        finished = false;
      } else if (res < 0) {
        err = fmt::format("{}: read failed at offset {}: {}", paths_[size_t(op->job.file)],
                          op->job.offset + op->done, std::strerror(-res));
      } else if (res == 0) {
        err = fmt::format("{}: unexpected end of file at offset {} (truncated?)",
                          paths_[size_t(op->job.file)], op->job.offset + op->done);
      } else {
        op->done += uint64_t(res);
        finished = op->done >= op->job.len;
      }
      std::vector<Op*> dead;
      std::string why;
      {
        std::lock_guard<std::mutex> g(mu_);
        if (finished) completed_++;
        else start(op);
        while (broken_.empty() && int(in_flight_.size()) < depth_ && !waiting_.empty()) {
          start(waiting_.front());
          waiting_.pop_front();
        }
        if (!broken_.empty()) dead = drain(&why);
      }
      if (finished) {
        op->job.done(err, seconds_since(op->t0));
        delete op;
      }
      fail_ops(std::move(dead), why, /*async=*/false);
      std::lock_guard<std::mutex> g(mu_);
      if (stop_ && in_flight_.empty() && waiting_.empty()) return;
    }
  }

  const std::vector<int>& fds_;
  const std::vector<std::string>& paths_;
  int depth_;
  int fault_after_;  // < 0: off
  io_uring ring_{};
  std::thread reaper_;
  std::mutex mu_;
  std::deque<Op*> waiting_;
  std::unordered_map<uint64_t, Op*> in_flight_;  // by sqe user data
  uint64_t next_id_ = 1;
  uint64_t completed_ = 0;  // reads finished (reaper only)
  std::string broken_;      // why the ring failed; empty while it works
  bool stop_ = false;
};
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------

void ExpertLayerStats::add(const ExpertLayerStats& o) {
  requests += o.requests;
  hits += o.hits;
  misses += o.misses;
  bytes_read += o.bytes_read;
  read_seconds += o.read_seconds;
  stall_seconds += o.stall_seconds;
  prefetch_reads += o.prefetch_reads;
  prefetch_used += o.prefetch_used;
  predicted += o.predicted;
  predicted_hit += o.predicted_hit;
  scored += o.scored;
  host_hits += o.host_hits;
  bytes_copied += o.bytes_copied;
  copy_seconds += o.copy_seconds;
}

// A cache slot holds one expert record. Slots with no pins and a finished read sit on the LRU
// list (front = most recently used) and may be evicted.
struct Slot {
  int key = -1;  // moe_index * n_experts + expert, -1 = empty
  int pins = 0;
  enum State { kEmpty, kLoading, kReady, kFailed } state = kEmpty;
  bool prefetched = false;  // read by prefetch and not yet used by a fetch
  std::string error;
};

// One request of a batch: either a cache slot or a private buffer of the batch.
struct Request {
  int expert;
  int slot = -1;             // cache slot, or -1
  uint8_t* own = nullptr;    // private buffer when no slot was free
  bool own_done = false;     // private read finished
  std::string own_error;
  bool taken = false;        // returned by next()
};

struct ExpertStore::Impl {
  const Model& model;
  const ExpertLayout& layout;
  ExpertStoreOptions opt;
  std::vector<int> fds;
  std::vector<std::string> paths;
  std::shared_ptr<ExpertReader> reader;
  std::unique_ptr<ReadQueue> queue;
  std::string io_name;
  uint64_t read_len = 0;  // bytes read per expert (bytes rounded up to kFileAlign)

  std::mutex mu;
  std::condition_variable cv;  // any read finished
  // cache
  uint8_t* arena = nullptr;
  size_t arena_bytes = 0;
  std::vector<Slot> slots;
  std::vector<int> slot_of;  // key -> slot or -1
  std::vector<int> free_slots;
  // Which cached expert gives up its slot (experts/cache_policy.h). It sees a key as pinned
  // exactly while its slot's pins > 0, and as resident while it holds a slot.
  std::unique_ptr<CachePolicy> policy;
  // private buffers of batches (expert memory), reused
  std::vector<uint8_t*> spare;
  // Expert memory the device reads (ExpertMemory): files are read into it directly when it is
  // host-visible, else into host memory (a staging buffer or a host-tier slot) and copied in.
  // The staging buffers and the host tier are under their own lock.
  ExpertMemory* memory = nullptr;
  std::mutex staging_mu;
  std::vector<uint8_t*> staging;
  // The host tier (ExpertStoreOptions::host_cache_bytes): slots of host memory keyed like the
  // cache's; a slot is pinned while a read fills it or a copy reads it, and sits on the LRU
  // list (front = most recent) while ready and unpinned.
  struct HostSlot {
    int key = -1;
    int pins = 0;
    bool ready = false;
    bool listed = false;
    std::list<int>::iterator at;
  };
  uint8_t* host_arena = nullptr;
  size_t host_arena_bytes = 0;
  std::vector<HostSlot> hslots;
  std::vector<int> hslot_of;  // key -> host slot or -1
  std::vector<int> hfree;
  std::list<int> hlru;
  std::unique_ptr<ReadQueue> copy_queue;  // copy-only jobs (host-tier hits)
  int reads_in_flight = 0;
  // stats
  std::vector<ExpertLayerStats> stats;
  // load_all: [moe layer][expert] views of slots pinned for good
  std::vector<std::vector<ExpertWeights>> resident;

  Impl(const Model& m, ExpertStoreOptions o)
      : model(m),
        layout(m.manifest().experts),
        opt(std::move(o)),
        memory(opt.memory ? opt.memory : &cpu_device().expert_memory()) {}

  uint8_t* slot_mem(int s) const { return arena + size_t(s) * layout.stride; }

  // A slot to fill for `key`: a free one, else the policy's victim's. -1 if none (everything
  // pinned, or the policy does not admit `key`).
  int take_slot(int key) {
    if (!free_slots.empty()) {
      int s = free_slots.back();
      free_slots.pop_back();
      return s;
    }
    if (slots.empty()) return -1;
    const int v = policy->victim(key);
    if (v < 0) return -1;
    const int s = slot_of[size_t(v)];
    MF_CHECK(s >= 0 && slots[size_t(s)].pins == 0 && slots[size_t(s)].state == Slot::kReady);
    slot_of[size_t(v)] = -1;
    slots[size_t(s)] = Slot{};
    return s;
  }
  // Fills free slot s with `key` (loading, pinned by the caller).
  void claim(int s, int key) {
    Slot& x = slots[size_t(s)];
    x.key = key;
    x.state = Slot::kLoading;
    slot_of[size_t(key)] = s;
    policy->insert(key);
  }
  void pin(int s) {
    Slot& x = slots[size_t(s)];
    if (x.pins++ == 0) policy->pin(x.key);
  }
  void unpin(int s) {
    Slot& x = slots[size_t(s)];
    if (--x.pins > 0) return;
    if (x.state == Slot::kReady) {
      policy->unpin(x.key);
    } else if (x.state == Slot::kFailed) {  // give failed slots back; the next fetch retries
      policy->erase(x.key);
      slot_of[size_t(x.key)] = -1;
      x = Slot{};
      free_slots.push_back(s);
    }
  }
  uint8_t* take_spare() {
    if (!spare.empty()) {
      uint8_t* p = spare.back();
      spare.pop_back();
      return p;
    }
    if (!memory->host_visible()) return memory->alloc(layout.stride);
    return host_buffer();
  }
  uint8_t* hslot_mem(int h) const { return host_arena + size_t(h) * layout.stride; }
  // staging_mu held: a host slot to fill (free, else the least recently used), or -1.
  int take_hslot() {
    if (!hfree.empty()) {
      const int h = hfree.back();
      hfree.pop_back();
      return h;
    }
    if (hlru.empty()) return -1;
    const int h = hlru.back();
    hlru.pop_back();
    HostSlot& x = hslots[size_t(h)];
    hslot_of[size_t(x.key)] = -1;
    x = HostSlot{};
    return h;
  }
  void hpin(int h) {
    HostSlot& x = hslots[size_t(h)];
    if (x.listed) hlru.erase(x.at);
    x.listed = false;
    x.pins++;
  }
  void hunpin(int h) {
    HostSlot& x = hslots[size_t(h)];
    if (--x.pins > 0) return;
    if (x.ready) {
      hlru.push_front(h);
      x.at = hlru.begin();
      x.listed = true;
    } else {  // its read failed: nothing of it stays
      hslot_of[size_t(x.key)] = -1;
      x = HostSlot{};
      hfree.push_back(h);
    }
  }
  uint8_t* host_buffer() const {
    void* p = std::aligned_alloc(kFileAlign, layout.stride);
    if (!p)
      fail(ErrorKind::kOutOfMemory, "out of memory for an expert buffer of {} bytes",
           layout.stride);
    return static_cast<uint8_t*>(p);
  }
  void free_spare(uint8_t* p) {
    if (memory->host_visible()) std::free(p);
    else memory->release(p, layout.stride);
  }

  // Starts bringing expert `e` of layer `li` into `dst`; `finish` runs under mu. Host-visible
  // memory is read into directly. Otherwise the expert's bytes come from the host tier when
  // it holds them (a copy, no read), else they are read into a host-tier slot (kept there) or
  // a staging buffer, and copied into dst before the read counts as done (dst is pinned and
  // not ready until then, so nothing reads it meanwhile).
  void start_read(int li, int e, uint8_t* dst, std::function<void(const std::string&)> finish) {
    reads_in_flight++;
    enum Mode { kDirect, kStage, kHostFill, kHostHit } mode = kDirect;
    uint8_t* src = dst;
    int h = -1;
    if (!memory->host_visible()) {
      const int key = li * layout.count + e;
      std::lock_guard<std::mutex> g(staging_mu);
      mode = kStage;
      if (!hslots.empty()) {
        h = hslot_of[size_t(key)];
        if (h >= 0 && hslots[size_t(h)].ready) {
          mode = kHostHit;
          hpin(h);
        } else if (h < 0 && (h = take_hslot()) >= 0) {  // (one still loading: staged instead)
          mode = kHostFill;
          hslots[size_t(h)].key = key;
          hslot_of[size_t(key)] = h;
          hpin(h);
        } else {
          h = -1;
        }
      }
      if (h >= 0) {
        src = hslot_mem(h);
      } else if (!staging.empty()) {
        src = staging.back();
        staging.pop_back();
      } else {
        src = nullptr;
      }
    }
    if (mode == kStage && !src) src = memory->host_alloc(layout.stride, "an expert staging buffer");
    Job job{li, uint64_t(e) * layout.stride, read_len, src,
            [this, li, dst, src, h, mode, finish = std::move(finish)](std::string err, double secs) {
              const bool read_ok = err.empty();
              double copy_secs = 0;
              if (mode != kDirect && read_ok) {
                const auto t0 = Clock::now();
                try {
                  memory->write(dst, src, layout.bytes);
                } catch (const std::exception& ex) {
                  err = ex.what();
                }
                copy_secs = seconds_since(t0);
              }
              if (mode != kDirect) {
                std::lock_guard<std::mutex> g(staging_mu);
                if (mode == kStage) {
                  staging.push_back(src);
                } else {
                  if (mode == kHostFill && read_ok) hslots[size_t(h)].ready = true;
                  hunpin(h);
                }
              }
              // Notified under the lock: the store's destructor may run as soon as it is released.
              std::lock_guard<std::mutex> g(mu);
              ExpertLayerStats& st = stats[size_t(li)];
              if (mode == kHostHit) {
                st.host_hits++;
              } else {
                st.read_seconds += secs;
                if (read_ok) st.bytes_read += layout.bytes;
              }
              if (mode != kDirect && err.empty()) {
                st.bytes_copied += layout.bytes;
                st.copy_seconds += copy_secs;
              }
              finish(err);
              reads_in_flight--;
              cv.notify_all();
            }};
    (mode == kHostHit ? copy_queue : queue)->submit(std::move(job));
  }
  // Reads into cache slot s (loading, pinned once for the read itself).
  void start_slot_read(int li, int e, int s) {
    Slot& x = slots[size_t(s)];
    x.pins++;
    start_read(li, e, slot_mem(s), [this, s](const std::string& err) {
      Slot& y = slots[size_t(s)];
      if (err.empty()) {
        y.state = Slot::kReady;
      } else {
        y.state = Slot::kFailed;
        y.error = err;
      }
      unpin(s);
    });
  }
};

// ---------------------------------------------------------------------------------------------

ExpertStore::ExpertStore(const Model& model, ExpertStoreOptions options)
    : opt_(std::move(options)), impl_(std::make_unique<Impl>(model, opt_)) {
  Impl& m = *impl_;
  const ExpertLayout& L = m.layout;
  // Each pread reader is a thread: a count in the thousands is a typo, not a setting.
  if (opt_.readers < 1 || opt_.readers > 256)
    fail(ErrorKind::kInvalidArgument, "expert readers: {} is not in [1, 256]", opt_.readers);
  m.policy = make_cache_policy(opt_.policy);  // an unknown name: before anything is opened
  m.read_len = align_up(L.bytes, kFileAlign);
  MF_CHECK(m.read_len <= L.stride);
  auto close_all = [&] {
    for (int f : m.fds) ::close(f);
    m.fds.clear();
  };
  for (size_t i = 0; i < L.layers.size(); i++) {
    const int layer = L.layers[i];
    std::string path = expert_file_path(model.dir(), layer);
    // The file the Model opened at load, not whatever has the name now (a package replaced
    // by rename since): reopened through /proc for this store's own flags (O_DIRECT).
    const int flags = O_RDONLY | O_CLOEXEC | (opt_.direct_io ? O_DIRECT : 0);
    int fd = ::open(fmt::format("/proc/self/fd/{}", model.expert_fd(i)).c_str(), flags);
    if (fd < 0 && errno == ENOENT) {  // no /proc: by name, and only if it is the same file
      fd = ::open(path.c_str(), flags);
      const FileIdentity a = fd_identity(fd), b = fd_identity(model.expert_fd(i));
      if (fd >= 0 && (a.dev != b.dev || a.ino != b.ino)) {
        ::close(fd);
        close_all();
        fail(ErrorKind::kIo, "{}: replaced on disk since the package was loaded; load it again",
             path);
      }
    }
    if (fd < 0) {
      int e = errno;
      close_all();
      fail(ErrorKind::kIo, "{}: cannot open{}: {}", path, opt_.direct_io ? " with O_DIRECT" : "",
           std::strerror(e));
    }
    m.fds.push_back(fd);
    m.paths.push_back(path);
    const off_t size = ::lseek(fd, 0, SEEK_END);
    const uint64_t want = uint64_t(L.count) * L.stride;
    if (size < 0 || uint64_t(size) < want) {
      close_all();
      fail(ErrorKind::kFormat, "{}: is {} bytes, expected {} ({} experts x {} stride): truncated?",
           path, int64_t(size), want, L.count, L.stride);
    }
  }
  try {
    if (opt_.reader) {
      m.reader = opt_.reader;
      m.queue = std::make_unique<ThreadReadQueue>(m.reader, opt_.readers);
      m.io_name = "custom";
    } else {
#ifdef MOEFLUX_HAVE_LIBURING
      // auto: io_uring for O_DIRECT reads; buffered reads go through pread threads, since
      // io_uring hands buffered reads that miss the page cache to kernel workers (measured:
      // 3.5x the system time of pread on this machine).
      const bool want_uring = opt_.io == IoEngine::kUring || (opt_.io == IoEngine::kAuto && opt_.direct_io);
      if (want_uring) {
        try {
          m.queue = std::make_unique<UringReadQueue>(m.fds, m.paths, opt_.readers,
                                                     opt_.uring_fault_after);
          m.io_name = "io_uring";
        } catch (const Error&) {
          if (opt_.io == IoEngine::kUring) throw;  // asked for explicitly: say why not
        }
      }
#else
      if (opt_.io == IoEngine::kUring)
        fail(ErrorKind::kInvalidArgument, "io_uring: this build has no liburing (use --io pread)");
#endif
      if (!m.queue) {
        m.reader = std::make_shared<PreadReader>(m.fds, m.paths);
        m.queue = std::make_unique<ThreadReadQueue>(m.reader, opt_.readers);
        m.io_name = "pread";
      }
    }
    if (opt_.direct_io) m.io_name += " O_DIRECT";

    const uint64_t all = L.stride * uint64_t(L.count) * L.layers.size();
    uint64_t budget = opt_.cache_bytes < 0 ? uint64_t(default_cache_bytes(model))
                                           : uint64_t(opt_.cache_bytes);
    budget = std::min(budget, all);
    const size_t n_slots = L.stride ? size_t(budget / L.stride) : 0;
    if (n_slots) {
      m.arena = m.memory->alloc(n_slots * L.stride);
      m.arena_bytes = n_slots * L.stride;
    }
    m.slots.resize(n_slots);
    for (size_t s = n_slots; s-- > 0;) m.free_slots.push_back(int(s));
    if (!m.memory->host_visible()) {
      if (opt_.host_cache_bytes < 0)
        fail(ErrorKind::kInvalidArgument, "host cache: {} bytes is negative", opt_.host_cache_bytes);
      const size_t n_host =
          L.stride ? size_t(std::min(uint64_t(opt_.host_cache_bytes), all) / L.stride) : 0;
      if (n_host) {
        m.host_arena = m.memory->host_alloc(n_host * L.stride, "the host expert cache");
        m.host_arena_bytes = n_host * L.stride;
        m.hslots.resize(n_host);
        for (size_t h = n_host; h-- > 0;) m.hfree.push_back(int(h));
        m.hslot_of.assign(size_t(L.count) * L.layers.size(), -1);
        m.copy_queue = std::make_unique<ThreadReadQueue>(std::make_shared<NoRead>(), opt_.readers);
      }
    }
    m.policy->init(int(L.layers.size()), L.count, n_slots);
    m.slot_of.assign(size_t(L.count) * L.layers.size(), -1);
    m.stats.resize(L.layers.size());
  } catch (...) {
    m.queue.reset();
    if (m.arena) m.memory->release(m.arena, m.arena_bytes);
    m.arena = nullptr;
    close_all();
    throw;
  }
}

ExpertStore::~ExpertStore() {
  Impl& m = *impl_;
  {
    std::unique_lock<std::mutex> g(m.mu);
    m.cv.wait(g, [&] { return m.reads_in_flight == 0; });
  }
  m.queue.reset();
  m.copy_queue.reset();
  for (uint8_t* p : m.spare) m.free_spare(p);
  for (uint8_t* p : m.staging) m.memory->host_release(p, m.layout.stride);
  if (m.host_arena) m.memory->host_release(m.host_arena, m.host_arena_bytes);
  if (m.arena) m.memory->release(m.arena, m.arena_bytes);
  for (int f : m.fds) ::close(f);
}

ExpertMemory& ExpertStore::memory() const { return *impl_->memory; }
uint64_t ExpertStore::expert_bytes() const { return impl_->layout.bytes; }
uint64_t ExpertStore::expert_stride() const { return impl_->layout.stride; }
int ExpertStore::n_layers() const { return int(impl_->layout.layers.size()); }
int ExpertStore::n_experts() const { return impl_->layout.count; }
const char* ExpertStore::io_name() const { return impl_->io_name.c_str(); }
const char* ExpertStore::policy_name() const { return impl_->policy->name(); }

ExpertStats ExpertStore::stats() const {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> g(m.mu);
  ExpertStats s;
  s.layers = m.stats;
  for (const auto& l : m.stats) s.total.add(l);
  s.cache_bytes = m.arena_bytes;
  s.cache_slots = m.slots.size();
  for (const Slot& x : m.slots) s.cached += x.state == Slot::kReady;
  s.host_cache_bytes = m.host_arena_bytes;
  std::lock_guard<std::mutex> h(m.staging_mu);
  for (const auto& x : m.hslots) s.host_cached += x.ready;
  return s;
}

void ExpertStore::reset_stats() {
  std::lock_guard<std::mutex> g(impl_->mu);
  for (auto& l : impl_->stats) l = ExpertLayerStats{};
}

void ExpertStore::drop_cache() {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> g(m.mu);
  m.cv.wait(g, [&] { return m.reads_in_flight == 0; });
  for (size_t s = 0; s < m.slots.size(); s++) {
    Slot& x = m.slots[s];
    if (x.key < 0 || x.pins > 0) continue;
    m.policy->erase(x.key);
    m.slot_of[size_t(x.key)] = -1;
    x = Slot{};
    m.free_slots.push_back(int(s));
  }
  std::lock_guard<std::mutex> h(m.staging_mu);  // no read in flight: no host slot is pinned
  m.hlru.clear();
  m.hfree.clear();
  for (size_t i = m.hslots.size(); i-- > 0;) {
    if (m.hslots[i].key >= 0) m.hslot_of[size_t(m.hslots[i].key)] = -1;
    m.hslots[i] = Impl::HostSlot{};
    m.hfree.push_back(int(i));
  }
}

void ExpertStore::load_all() {
  Impl& m = *impl_;
  const int E = m.layout.count, L = int(m.layout.layers.size());
  if (!m.resident.empty()) return;
  const uint64_t all = uint64_t(E) * uint64_t(L);
  if (m.slots.size() < all)
    fail(ErrorKind::kInvalidArgument,
         "keeping every expert resident needs a cache of all {} experts ({}); the budget holds "
         "{} (--expert-cache all)",
         all, format_bytes(all * m.layout.stride), m.slots.size());
  std::vector<int> every(static_cast<size_t>(E));
  std::iota(every.begin(), every.end(), 0);
  std::vector<std::vector<ExpertWeights>> table(static_cast<size_t>(L));
  for (int li = 0; li < L; li++) {
    auto batch = fetch(li, every);
    for (int i = 0; i < E; i++) batch->next();  // throws on a read error
    std::lock_guard<std::mutex> g(m.mu);
    const auto& p = m.layout.parts;
    for (int e = 0; e < E; e++) {
      const int s = m.slot_of[size_t(li * E + e)];
      MF_CHECK(s >= 0 && m.slots[size_t(s)].state == Slot::kReady);
      m.pin(s);  // for good: never evicted
      const uint8_t* base = m.slot_mem(s);
      table[size_t(li)].push_back({mat_view(p[0], base + p[0].offset),
                                   mat_view(p[1], base + p[1].offset),
                                   mat_view(p[2], base + p[2].offset)});
    }
  }
  std::lock_guard<std::mutex> g(m.mu);
  m.resident = std::move(table);
}

const ExpertWeights* ExpertStore::resident(int moe_index) const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> g(impl_->mu);
  return m.resident.empty() ? nullptr : m.resident.at(size_t(moe_index)).data();
}

void ExpertStore::note_prediction(int moe_index, uint64_t scored, uint64_t hit) {
  std::lock_guard<std::mutex> g(impl_->mu);
  ExpertLayerStats& st = impl_->stats.at(size_t(moe_index));
  st.scored += scored;
  st.predicted_hit += hit;
}

void ExpertStore::prefetch(int moe_index, const std::vector<int>& experts) {
  Impl& m = *impl_;
  const int E = m.layout.count;
  MF_CHECK(moe_index >= 0 && size_t(moe_index) < m.fds.size());
  std::lock_guard<std::mutex> g(m.mu);
  ExpertLayerStats& st = m.stats[size_t(moe_index)];
  st.predicted += experts.size();
  if (m.slots.empty()) return;
  // The predicted experts already cached (or on their way) are held while the others claim
  // slots, so a prediction never evicts itself; releasing them is their use (with lru: they
  // move to the front, as the fetch that follows will want them). Prefetch does not count as
  // an access: frequencies follow what layers really used.
  std::vector<int> held;
  for (int e : experts) {
    MF_CHECK(e >= 0 && e < E);
    const int s = m.slot_of[size_t(moe_index * E + e)];
    if (s >= 0) {
      m.pin(s);
      held.push_back(s);
    }
  }
  for (int e : experts) {
    const int key = moe_index * E + e;
    if (m.slot_of[size_t(key)] >= 0) continue;
    const int s = m.take_slot(key);
    if (s < 0) continue;  // everything pinned, or the policy keeps what it has
    m.claim(s, key);
    m.slots[size_t(s)].prefetched = true;
    st.prefetch_reads++;
    m.start_slot_read(moe_index, e, s);
  }
  for (int s : held) m.unpin(s);
}

// ---------------------------------------------------------------------------------------------

struct ExpertBatch::State {
  ExpertStore::Impl* store = nullptr;
  int moe_index = 0;
  std::vector<Request> req;
  std::vector<ExpertWeights> weights;
  size_t taken = 0;
};

std::unique_ptr<ExpertBatch> ExpertStore::fetch(int moe_index, const std::vector<int>& experts,
                                                const std::vector<uint32_t>& uses) {
  Impl& m = *impl_;
  const int E = m.layout.count;
  MF_CHECK(moe_index >= 0 && size_t(moe_index) < m.fds.size());
  MF_CHECK(uses.empty() || uses.size() == experts.size());
  auto st = std::make_unique<ExpertBatch::State>();
  st->store = &m;
  st->moe_index = moe_index;
  st->req.resize(experts.size());
  st->weights.resize(experts.size());
  std::lock_guard<std::mutex> g(m.mu);
  ExpertLayerStats& ls = m.stats[size_t(moe_index)];
  // The policy sees the whole request before any slot changes hands. Every cached one is pinned
  // first so that filling the misses cannot evict them.
  m.policy->begin(moe_index, experts.size());
  for (size_t i = 0; i < experts.size(); i++) {
    const int e = experts[i];
    MF_CHECK(e >= 0 && e < E);
    Request& r = st->req[i];
    r.expert = e;
    const int s = m.slot_of[size_t(moe_index * E + e)];
    const bool hit = s >= 0 && m.slots[size_t(s)].state != Slot::kFailed;
    m.policy->access(moe_index * E + e, hit, uses.empty() ? 1u : uses[i]);
    if (!hit) continue;  // a failed slot is retried below as a miss
    Slot& x = m.slots[size_t(s)];
    m.pin(s);
    if (x.prefetched) {
      x.prefetched = false;
      ls.prefetch_used++;
    }
    r.slot = s;
    ls.hits++;
  }
  for (size_t i = 0; i < experts.size(); i++) {
    Request& r = st->req[i];
    if (r.slot >= 0) continue;
    ls.misses++;
    const int key = moe_index * E + r.expert;
    int s = m.slot_of[size_t(key)] < 0 ? m.take_slot(key) : -1;
    if (s >= 0) {
      Slot& x = m.slots[size_t(s)];
      m.claim(s, key);
      x.pins++;  // the batch's pin (claim left the key pinned in the policy)
      r.slot = s;
      m.start_slot_read(moe_index, r.expert, s);
    } else {
      // No room (budget 0, everything pinned, or not admitted by the policy) or a failed slot still pinned by another batch:
      // read into a buffer of this batch.
      r.own = m.take_spare();
      ExpertBatch::State* raw = st.get();
      m.start_read(moe_index, r.expert, r.own, [raw, i](const std::string& err) {
        raw->req[i].own_done = true;
        raw->req[i].own_error = err;
      });
    }
  }
  ls.requests += experts.size();
  return std::unique_ptr<ExpertBatch>(new ExpertBatch(std::move(st)));
}

ExpertBatch::ExpertBatch(std::unique_ptr<State> s) : s_(std::move(s)) {}

ExpertBatch::~ExpertBatch() {
  ExpertStore::Impl& m = *s_->store;
  std::unique_lock<std::mutex> g(m.mu);
  // Private reads still running write into our buffers: wait for them.
  m.cv.wait(g, [&] {
    for (const Request& r : s_->req)
      if (r.own && !r.own_done) return false;
    return true;
  });
  for (Request& r : s_->req) {
    if (r.slot >= 0) m.unpin(r.slot);
    if (r.own) m.spare.push_back(r.own);
  }
}

size_t ExpertBatch::size() const { return s_->req.size(); }

namespace {
// Under mu: 1 ready, 0 not yet, -1 failed (message in *err).
int request_ready(ExpertStore::Impl& m, const Request& r, std::string* err) {
  if (r.own) {
    if (!r.own_done) return 0;
    if (!r.own_error.empty()) {
      *err = r.own_error;
      return -1;
    }
    return 1;
  }
  const Slot& x = m.slots[size_t(r.slot)];
  if (x.state == Slot::kLoading) return 0;
  if (x.state == Slot::kFailed) {
    *err = x.error;
    return -1;
  }
  return 1;
}
}  // namespace

size_t ExpertBatch::next() {
  State& s = *s_;
  ExpertStore::Impl& m = *s.store;
  MF_CHECK(s.taken < s.req.size());
  std::unique_lock<std::mutex> g(m.mu);
  const auto t0 = Clock::now();
  bool waited = false;
  for (;;) {
    for (size_t i = 0; i < s.req.size(); i++) {
      Request& r = s.req[i];
      if (r.taken) continue;
      std::string err;
      const int st = request_ready(m, r, &err);
      if (st == 0) continue;
      if (waited) m.stats[size_t(s.moe_index)].stall_seconds += seconds_since(t0);
      if (st < 0)
        fail(ErrorKind::kIo, "expert {} of layer {}: {}", r.expert,
             m.layout.layers[size_t(s.moe_index)], err);
      r.taken = true;
      s.taken++;
      const uint8_t* base = r.own ? r.own : m.slot_mem(r.slot);
      const auto& p = m.layout.parts;
      s.weights[i] = {mat_view(p[0], base + p[0].offset), mat_view(p[1], base + p[1].offset),
                      mat_view(p[2], base + p[2].offset)};
      return i;
    }
    waited = true;
    m.cv.wait(g);
  }
}

const ExpertWeights& ExpertBatch::wait(size_t i) {
  State& s = *s_;
  MF_CHECK(i < s.req.size());
  while (!s.req[i].taken) next();
  return s.weights[i];
}

const ExpertWeights& ExpertBatch::weights(size_t i) const {
  MF_CHECK(i < s_->req.size() && s_->req[i].taken);
  return s_->weights[i];
}

// ---------------------------------------------------------------------------------------------

uint64_t host_memory_available() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

int64_t default_cache_bytes(const Model& model) {
  const ExpertLayout& L = model.manifest().experts;
  const uint64_t all = L.stride * uint64_t(L.count) * L.layers.size();
  const uint64_t avail = host_memory_available();
  if (avail == 0) return int64_t(std::min<uint64_t>(all, uint64_t(1) << 30));
  const uint64_t resident = model.manifest().resident_bytes;
  const uint64_t room = avail > resident ? (avail - resident) / 2 : 0;
  return int64_t(std::min(all, room));
}

int64_t parse_cache_size(const std::string& text, uint64_t all, const std::string& what) {
  std::string t = text;
  t.erase(0, t.find_first_not_of(" \t"));
  t.erase(t.find_last_not_of(" \t") + 1);
  if (t == "all") return int64_t(all);
  if (t.empty()) fail(ErrorKind::kInvalidArgument, "{}: empty size", what);
  size_t i = 0;
  while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) || t[i] == '.')) i++;
  if (i == 0) fail(ErrorKind::kInvalidArgument, "{}: '{}' is not a size (e.g. 2GiB, 25%, all, 0)", what, text);
  char* end = nullptr;
  const std::string num = t.substr(0, i);
  const double v = std::strtod(num.c_str(), &end);
  if (*end) fail(ErrorKind::kInvalidArgument, "{}: '{}' is not a size (e.g. 2GiB, 25%, all, 0)", what, text);
  std::string unit = t.substr(i);
  unit.erase(0, unit.find_first_not_of(' '));
  double mult;
  if (unit == "%") {
    if (v > 100) fail(ErrorKind::kInvalidArgument, "{}: {}% is more than 100%", what, v);
    return int64_t(double(all) * v / 100.0);
  }
  std::string u;
  for (char c : unit) u += char(std::tolower(static_cast<unsigned char>(c)));
  if (u.empty() || u == "b") mult = 1;
  else if (u == "k" || u == "kib" || u == "kb") mult = 1024.0;
  else if (u == "m" || u == "mib" || u == "mb") mult = 1024.0 * 1024;
  else if (u == "g" || u == "gib" || u == "gb") mult = 1024.0 * 1024 * 1024;
  else if (u == "t" || u == "tib" || u == "tb") mult = 1024.0 * 1024 * 1024 * 1024;
  else
    fail(ErrorKind::kInvalidArgument, "{}: unknown unit '{}' in '{}' (B, KiB, MiB, GiB, TiB, %)",
         what, unit, text);
  const double bytes = v * mult;
  if (bytes > 9.0e18) fail(ErrorKind::kInvalidArgument, "{}: '{}' is too large", what, text);
  return int64_t(bytes);
}

}  // namespace moeflux
