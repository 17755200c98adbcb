// The expert store: logits bit-identical whatever the cache, cache policy, readers, I/O engine,
// direct I/O and prefetch; LRU eviction; the store's hits are the simulator's for every policy; statistics; read faults; budgets smaller than a layer's experts;
// sessions sharing one store from several threads.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "experts/cache_sim.h"

#include "test_util.h"

namespace moeflux::test {
namespace {

// How much of the model's experts the cache holds.
enum class CacheSize { kNone, kOneExpert, kTopKLessOne, kQuarter, kAll };

// One store configuration; `name` is the test name's suffix (letters, digits, underscores).
struct Config {
  const char* name;
  CacheSize cache;
  int readers = 4;
  IoEngine io = IoEngine::kPread;
  bool direct = false;
  bool prefetch = false;
  const char* policy = "default";
};

void PrintTo(const Config& c, std::ostream* os) {
  *os << c.name;
}

const Config kConfigs[] = {
    {.name = "all", .cache = CacheSize::kAll},
    {.name = "all_prefetch", .cache = CacheSize::kAll, .prefetch = true},
    {.name = "one_expert", .cache = CacheSize::kOneExpert},
    {.name = "less_than_top_k_prefetch",
     .cache = CacheSize::kTopKLessOne,
     .readers = 2,
     .prefetch = true},
    {.name = "quarter", .cache = CacheSize::kQuarter, .readers = 3},
    {.name = "quarter_prefetch", .cache = CacheSize::kQuarter, .prefetch = true},
    {.name = "none_8_readers", .cache = CacheSize::kNone, .readers = 8},
    {.name = "uring_none", .cache = CacheSize::kNone, .io = IoEngine::kUring},
    {.name = "uring_quarter_prefetch",
     .cache = CacheSize::kQuarter,
     .readers = 2,
     .io = IoEngine::kUring,
     .prefetch = true},
    {.name = "direct_none", .cache = CacheSize::kNone, .direct = true},
    {.name = "direct_quarter_prefetch",
     .cache = CacheSize::kQuarter,
     .direct = true,
     .prefetch = true},
    {.name = "direct_uring_all", .cache = CacheSize::kAll, .io = IoEngine::kUring, .direct = true},
    // Every policy: only hit rates may change.
    {.name = "quarter_lru", .cache = CacheSize::kQuarter, .policy = "lru"},
    {.name = "quarter_lru_layer_prefetch",
     .cache = CacheSize::kQuarter,
     .prefetch = true,
     .policy = "lru-layer"},
    {.name = "quarter_lfu", .cache = CacheSize::kQuarter, .policy = "lfu"},
    {.name = "quarter_lrfu_prefetch", .cache = CacheSize::kQuarter, .prefetch = true, .policy = "lrfu"},
    {.name = "quarter_tinylfu", .cache = CacheSize::kQuarter, .readers = 2, .policy = "tinylfu"},
    {.name = "less_than_top_k_tinylfu_prefetch",
     .cache = CacheSize::kTopKLessOne,
     .prefetch = true,
     .policy = "tinylfu"},
    {.name = "one_expert_lfu", .cache = CacheSize::kOneExpert, .policy = "lfu"},
    {.name = "quarter_tinylfu_shared_prefetch",
     .cache = CacheSize::kQuarter,
     .prefetch = true,
     .policy = "tinylfu-shared"},
    {.name = "less_than_top_k_tinylfu_shared",
     .cache = CacheSize::kTopKLessOne,
     .policy = "tinylfu-shared"},
};

// Prefill of 6 tokens, then 8 one-token decodes (fixed tokens, so every config sees the same
// requests); returns every logit row.
std::vector<float> run_sequence(const Model& model, ExpertStore& store) {
  auto be = make_cpu_context(2);
  Session s(model, *be, store);
  const int V = model.spec().vocab_size;
  const std::vector<int32_t> prompt = {3, 141, 59, 265, 358, 97};
  std::vector<float> out(size_t(V) * 6);
  s.eval(prompt.data(), 6, out.data(), true);
  std::vector<float> row(static_cast<size_t>(V));
  for (int i = 0; i < 8; i++) {
    const int32_t tok = (17 + 131 * i) % V;
    s.eval(&tok, 1, row.data(), false);
    out.insert(out.end(), row.begin(), row.end());
  }
  return out;
}

// run_sequence on a store with no cache: what every configuration must give, bit for bit.
std::vector<float> uncached_sequence(const Model& model) {
  ExpertStoreOptions o;
  o.cache_bytes = 0;
  ExpertStore store(model, o);
  return run_sequence(model, store);
}

// "" when `file` opens with O_DIRECT, else why not.
std::string direct_io_error(const std::string& file) {
  int fd = ::open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) return std::strerror(errno);
  ::close(fd);
  return "";
}

uint64_t all_expert_bytes(const Model& m) {
  const auto& ex = m.manifest().experts;
  return ex.stride * uint64_t(ex.count) * ex.layers.size();
}

int64_t cache_bytes(const Model& m, CacheSize c) {
  const int64_t stride = int64_t(m.manifest().experts.stride);
  switch (c) {
    case CacheSize::kNone:
      return 0;
    case CacheSize::kOneExpert:
      return stride;
    case CacheSize::kTopKLessOne:
      return stride * (m.spec().top_k - 1);
    case CacheSize::kQuarter:
      return int64_t(all_expert_bytes(m) / 4);
    case CacheSize::kAll:
      return int64_t(all_expert_bytes(m));
  }
  return 0;
}

// One test per architecture and configuration, so a configuration this machine cannot run
// (io_uring refused, no O_DIRECT) is reported as a skip with its reason, and as a failure under
// CI=true, instead of being passed over inside a passing test.
class StoreBitIdentity : public ::testing::TestWithParam<std::tuple<std::string, Config>> {};

TEST_P(StoreBitIdentity, LogitsDoNotDependOnTheStore) {
  const auto& [arch, c] = GetParam();
  std::string pkg = converted_fixture(arch);
  // Direct I/O on a copy in the build directory: the system temp dir may be a tmpfs, which has
  // no O_DIRECT before Linux 6.6, while the build directory is where CI's disk is.
  std::unique_ptr<TempDir> on_build_fs;
  if (c.direct) {
    on_build_fs = std::make_unique<TempDir>(MOEFLUX_TEST_BUILD_DIR);
    const std::string copy = *on_build_fs / "pkg";
    std::filesystem::copy(pkg, copy, std::filesystem::copy_options::recursive);
    pkg = copy;
  }
  auto model = Model::load(pkg);
  if (c.direct) {
    const std::string file = expert_file_path(pkg, model->manifest().experts.layers[0]);
    const std::string why = direct_io_error(file);
    if (!why.empty()) MF_SKIP_OR_FAIL_IN_CI("O_DIRECT open of " + file + " failed: " + why);
  }
  ExpertStoreOptions ref_opt;
  ref_opt.cache_bytes = 0;
  ref_opt.readers = 1;
  ExpertStore ref_store(*model, ref_opt);
  const std::vector<float> ref = run_sequence(*model, ref_store);

  ExpertStoreOptions o;
  o.cache_bytes = cache_bytes(*model, c.cache);
  o.readers = c.readers;
  o.io = c.io;
  o.direct_io = c.direct;
  o.prefetch = c.prefetch;
  o.policy = c.policy;
  std::unique_ptr<ExpertStore> store;
  try {
    store = std::make_unique<ExpertStore>(*model, o);
  } catch (const Error& e) {
    // io_uring may be unavailable (old kernel, seccomp, built without liburing): then it must
    // say so.
    ASSERT_EQ(c.io, IoEngine::kUring) << e.what();
    ASSERT_NE(std::string(e.what()).find("io_uring"), std::string::npos) << e.what();
    MF_SKIP_OR_FAIL_IN_CI(std::string("io_uring is unavailable: ") + e.what());
  }
  // Twice on the same store: the second run meets a warm (or churning) cache.
  for (int rep = 0; rep < 2; rep++) {
    const std::vector<float> got = run_sequence(*model, *store);
    ASSERT_EQ(got.size(), ref.size());
    ASSERT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0)
        << "logits differ from the uncached run, repetition " << rep;
  }
  const ExpertStats st = store->stats();
  EXPECT_EQ(st.total.hits + st.total.misses, st.total.requests);
  if (c.cache == CacheSize::kAll && !c.prefetch) {
    // Everything fits: each expert is read once, later uses are hits.
    EXPECT_EQ(st.total.bytes_read, st.total.misses * store->expert_bytes());
    EXPECT_GT(st.total.hits, 0u);
  }
  if (c.cache == CacheSize::kNone) {
    EXPECT_EQ(st.total.hits, 0u);
  }
  if (c.prefetch && c.cache != CacheSize::kNone) {
    EXPECT_GT(st.total.scored, 0u);
    EXPECT_LE(st.total.predicted_hit, st.total.scored);
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, StoreBitIdentity,
                         ::testing::Combine(::testing::Values("qwen3_5_moe", "qwen3_next",
                                                              "mixtral", "qwen3_moe"),
                                            ::testing::ValuesIn(kConfigs)),
                         [](const ::testing::TestParamInfo<StoreBitIdentity::ParamType>& info) {
                           return std::get<0>(info.param) + "_" + std::get<1>(info.param).name;
                         });

// Every expert resident (load_all, what a GPU uses when they fit): sessions skip fetch and the
// backend reads the ids where the router left them; the logits are those of the uncached run,
// bit for bit, and nothing is read again. A budget short of all experts is refused, naming it.
TEST(ExpertStore, ResidentExpertsChangeNoBit) {
  for (const std::string arch : {"qwen3_5_moe", "qwen3_next", "mixtral", "qwen3_moe"}) {
    SCOPED_TRACE(arch);
    auto model = Model::load(converted_fixture(arch));
    const std::vector<float> ref = uncached_sequence(*model);

    ExpertStoreOptions o;
    o.cache_bytes = int64_t(all_expert_bytes(*model));
    ExpertStore store(*model, o);
    EXPECT_EQ(store.resident(0), nullptr);
    store.load_all();
    const uint64_t read = store.stats().total.bytes_read;
    EXPECT_EQ(read, all_expert_bytes(*model) / model->manifest().experts.stride *
                        store.expert_bytes());
    for (int l = 0; l < store.n_layers(); l++) ASSERT_NE(store.resident(l), nullptr);
    const std::vector<float> got = run_sequence(*model, store);
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0)
        << "logits with every expert resident differ from the uncached run";
    EXPECT_EQ(store.stats().total.bytes_read, read) << "a resident expert was read again";
    store.drop_cache();  // pinned for good: stays
    EXPECT_EQ(std::memcmp(run_sequence(*model, store).data(), ref.data(),
                          ref.size() * sizeof(float)),
              0);

    ExpertStoreOptions small;
    small.cache_bytes = int64_t(all_expert_bytes(*model)) - 1;
    ExpertStore short_store(*model, small);
    try {
      short_store.load_all();
      ADD_FAILURE() << "load_all with a budget short of all experts";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("--expert-cache all"), std::string::npos) << e.what();
    }
  }
}

TEST(ExpertStore, LruEvictsTheLeastRecentlyUsed) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  ExpertStoreOptions o;
  o.policy = "lru";
  o.cache_bytes = int64_t(model->manifest().experts.stride) * 2;  // two slots
  ExpertStore store(*model, o);
  auto use = [&](std::vector<int> experts) {
    auto b = store.fetch(0, experts);
    for (size_t i = 0; i < experts.size(); i++) b->next();
  };
  use({0, 1});  // misses; 1 released after 0: 1 is the more recent
  use({2});     // evicts 0
  store.reset_stats();
  use({1});  // hit
  EXPECT_EQ(store.stats().total.hits, 1u);
  use({0});  // miss: it was evicted; evicts 2 (1 was used more recently)
  EXPECT_EQ(store.stats().total.misses, 1u);
  use({1});
  use({0});
  EXPECT_EQ(store.stats().total.hits, 3u);
  use({2});
  EXPECT_EQ(store.stats().total.misses, 2u);
  const ExpertStats st = store.stats();
  EXPECT_EQ(st.cache_slots, 2u);
  EXPECT_EQ(st.cached, 2u);
  store.drop_cache();
  EXPECT_EQ(store.stats().cached, 0u);
}

TEST(ExpertStore, ArrivalOrderCoversEveryRequestOnce) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  ExpertStoreOptions o;
  o.cache_bytes = 0;
  o.readers = 3;
  ExpertStore store(*model, o);
  const std::vector<int> experts = {9, 2, 15, 4, 0};
  auto b = store.fetch(1, experts);
  std::vector<int> seen(experts.size(), 0);
  for (size_t i = 0; i < experts.size(); i++) seen[b->next()]++;
  for (int n : seen) EXPECT_EQ(n, 1);
  // The views point at the requested expert's bytes: compare with the file.
  const auto& ex = model->manifest().experts;
  std::vector<uint8_t> file(ex.bytes);
  int fd = ::open(expert_file_path(model->dir(), ex.layers[1]).c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  for (size_t i = 0; i < experts.size(); i++) {
    ASSERT_EQ(::pread(fd, file.data(), ex.bytes, off_t(uint64_t(experts[i]) * ex.stride)),
              ssize_t(ex.bytes));
    const ExpertWeights& w = b->weights(i);
    const auto* base = static_cast<const uint8_t*>(w.gate.data) - ex.parts[0].offset;
    EXPECT_EQ(std::memcmp(base, file.data(), ex.bytes), 0) << "request " << i;
  }
  ::close(fd);
}

// Slot memory the store must treat as a GPU's: not host-visible, so every expert goes
// through host memory (a staging buffer or the host tier) and write(). It is host memory all
// the same, so the CPU context computes from the slots.
class DeviceLikeMemory final : public ExpertMemory {
 public:
  Device& device() override { return cpu_device(); }
  uint8_t* alloc(size_t bytes) override {
    return static_cast<uint8_t*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
  }
  void release(uint8_t* p, size_t) override { std::free(p); }
  bool host_visible() const override { return false; }
  void write(uint8_t* dst, const uint8_t* host, size_t n) override {
    writes++;
    std::memcpy(dst, host, n);
  }
  uint8_t* host_alloc(size_t bytes, const char* what) override {
    host_bytes += bytes;
    return ExpertMemory::host_alloc(bytes, what);
  }
  std::atomic<int> writes{0};
  std::atomic<uint64_t> host_bytes{0};
};

// The host tier in front of slots a device owns: logits are the uncached run's bit for bit for
// any split of budgets between slots and host tier, prefetch on or off, on repeated runs.
TEST(ExpertStore, HostTierChangesNoBit) {
  for (const std::string arch : {"qwen3_5_moe", "mixtral"}) {
    SCOPED_TRACE(arch);
    auto model = Model::load(converted_fixture(arch));
    const std::vector<float> ref = uncached_sequence(*model);
    const int64_t stride = int64_t(model->manifest().experts.stride);
    const int64_t all = int64_t(all_expert_bytes(*model));
    struct Split {
      int64_t slots, host;
      bool prefetch;
    };
    for (const Split& sp : {Split{0, 0, false}, Split{0, all, false}, Split{0, all / 4, true},
                            Split{stride, all, true}, Split{all / 4, all / 4, false},
                            Split{all / 4, 2 * stride, true}, Split{all, all, false}}) {
      SCOPED_TRACE(testing::Message() << "slots " << sp.slots << " host " << sp.host
                                      << " prefetch " << sp.prefetch);
      DeviceLikeMemory mem;
      ExpertStoreOptions o;
      o.memory = &mem;
      o.cache_bytes = sp.slots;
      o.host_cache_bytes = sp.host;
      o.prefetch = sp.prefetch;
      ExpertStore store(*model, o);
      for (int rep = 0; rep < 2; rep++) {
        const std::vector<float> got = run_sequence(*model, store);
        ASSERT_EQ(got.size(), ref.size());
        ASSERT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0)
            << "repetition " << rep;
      }
      const ExpertStats st = store.stats();
      EXPECT_EQ(st.host_cache_bytes, uint64_t(sp.host / stride * stride));
      // Every expert that reached a slot or a batch's buffer was copied there, once.
      EXPECT_EQ(st.total.bytes_copied, uint64_t(mem.writes) * store.expert_bytes());
      EXPECT_GT(mem.writes, 0);
      if (sp.host == 0) {
        EXPECT_EQ(st.total.host_hits, 0u);
      }
      if (sp.host >= all && sp.slots < all) {
        // The host tier keeps everything: the second run read nothing.
        EXPECT_GT(st.total.host_hits, 0u);
        EXPECT_EQ(st.total.bytes_read,
                  uint64_t(st.host_cached) * store.expert_bytes());
      }
    }
  }
}

// Fails the reads chosen by `fail_if`, otherwise reads the file.
class FaultyReader : public ExpertReader {
 public:
  FaultyReader(const Model& m, std::function<bool(int, uint64_t)> fail_if)
      : fail_if_(std::move(fail_if)) {
    for (int l : m.manifest().experts.layers)
      fds_.push_back(::open(expert_file_path(m.dir(), l).c_str(), O_RDONLY));
  }
  ~FaultyReader() override {
    for (int fd : fds_) ::close(fd);
  }
  void read(int file, uint64_t offset, uint64_t n, uint8_t* dst) override {
    reads++;
    if (fail_if_(file, offset)) fail(ErrorKind::kIo, "injected read error (EIO) at offset {}", offset);
    uint64_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fds_[size_t(file)], dst + done, n - done, off_t(offset + done));
      if (r <= 0) fail(ErrorKind::kIo, "pread failed");
      done += uint64_t(r);
    }
  }
  std::atomic<int> reads{0};

 private:
  std::function<bool(int, uint64_t)> fail_if_;
  std::vector<int> fds_;
};

TEST(ExpertStore, ReadErrorsAreErrorsNeverWrongOutput) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  const std::vector<float> ref = uncached_sequence(*model);

  // The last two: slots a device owns, with a host tier that holds every expert (a failed
  // read must not stay there either) and one that holds two.
  DeviceLikeMemory mem;
  const int64_t all = int64_t(all_expert_bytes(*model));
  for (auto [cache, host] : {std::pair{int64_t(0), int64_t(-1)}, std::pair{int64_t(1) << 30, int64_t(-1)},
                             std::pair{int64_t(0), all}, std::pair{all / 4, int64_t(2 * model->manifest().experts.stride)}}) {
    SCOPED_TRACE(testing::Message() << "cache " << cache << " host tier " << host);
    std::atomic<bool> broken{true};
    const uint64_t stride = model->manifest().experts.stride;
    ExpertStoreOptions o;
    o.cache_bytes = cache;
    o.prefetch = cache > 0;
    if (host >= 0) {
      o.memory = &mem;
      o.host_cache_bytes = host;
    }
    // Every read of file 2 (MoE layer 2) fails while `broken`.
    o.reader = std::make_shared<FaultyReader>(*model, [&](int file, uint64_t off) {
      return broken && file == 2 && off / stride < 1000;
    });
    ExpertStore store(*model, o);
    auto be = make_cpu_context(2);
    Session s(*model, *be, store);
    const std::vector<int32_t> prompt = {3, 141, 59, 265, 358, 97};
    std::vector<float> logits(size_t(model->spec().vocab_size) * 6);
    try {
      s.eval(prompt.data(), 6, logits.data(), true);
      FAIL() << "a failed expert read must fail the evaluation";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("injected read error"), std::string::npos) << msg;
      EXPECT_NE(msg.find("of layer " + std::to_string(model->manifest().experts.layers[2])),
                std::string::npos)
          << msg;
    }
    EXPECT_EQ(s.pos(), 0) << "a failed evaluation must not advance the session";
    // Once reads work again the same store gives exactly the clean logits: no failed or
    // half-read expert stayed in the cache.
    broken = false;
    const std::vector<float> got = run_sequence(*model, store);
    ASSERT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0);
  }
}

// When the io_uring ring itself fails, every queued and in-flight read fails at once (their
// waiters wake and throw, naming expert, layer and file), and the store then fails every read
// at once with the same reason instead of hanging.
TEST(ExpertStore, UringRingFailureFailsEveryQueuedRead) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  ExpertStoreOptions o;
  o.cache_bytes = 0;
  o.io = IoEngine::kUring;
  o.readers = 2;
  o.uring_fault_after = 3;
  std::unique_ptr<ExpertStore> store;
  try {
    store = std::make_unique<ExpertStore>(*model, o);
  } catch (const Error& e) {
    GTEST_SKIP() << "io_uring unavailable here: " << e.what();
  }
  const std::vector<int32_t> prompt = {3, 141, 59, 265, 358, 97};
  for (int attempt = 0; attempt < 2; attempt++) {
    SCOPED_TRACE(attempt);
    auto be = make_cpu_context(2);
    Session s(*model, *be, *store);
    try {
      s.eval(prompt.data(), 6, nullptr, false);
      FAIL() << "a failed io_uring ring must fail the evaluation";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(int(e.kind()), int(ErrorKind::kIo)) << msg;
      for (const char* needle : {"expert ", " of layer ", "the io_uring ring failed",
                                 "io_uring_wait_cqe", "--io pread"})
        EXPECT_NE(msg.find(needle), std::string::npos) << needle << " in: " << msg;
      EXPECT_NE(msg.find(model->dir()), std::string::npos) << msg;
    }
  }
}

TEST(ExpertStore, TruncatedExpertFileIsNamedAtOpen) {
  TempDir tmp;
  const std::string src = converted_fixture("mixtral");
  std::filesystem::copy(src, tmp / "p", std::filesystem::copy_options::recursive);
  auto model = Model::load(tmp / "p");
  const std::string f = expert_file_path(tmp / "p", model->manifest().experts.layers[1]);
  std::filesystem::resize_file(f, std::filesystem::file_size(f) - 4096);
  try {
    ExpertStore store(*model);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST(ExpertStore, SessionsShareOneStoreAcrossThreads) {
  auto model = Model::load(converted_fixture("qwen3_next"));
  ExpertStoreOptions ref_opt;
  ref_opt.cache_bytes = 0;
  ExpertStore ref_store(*model, ref_opt);
  const std::vector<float> ref = run_sequence(*model, ref_store);
  ExpertStoreOptions o;
  o.cache_bytes = int64_t(all_expert_bytes(*model) / 3);
  o.prefetch = true;
  ExpertStore store(*model, o);
  std::vector<std::vector<float>> got(4);
  std::vector<std::thread> th;
  for (int i = 0; i < 4; i++)
    th.emplace_back([&, i] { got[size_t(i)] = run_sequence(*model, store); });
  for (auto& t : th) t.join();
  for (const auto& g : got) {
    ASSERT_EQ(g.size(), ref.size());
    EXPECT_EQ(std::memcmp(g.data(), ref.data(), ref.size() * sizeof(float)), 0);
  }
}

// The store runs the policy code cache-sim replays: the same requests give the same hits.
TEST(ExpertStore, HitsAreTheSimulatorsForEveryPolicy) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  const auto& ex = model->manifest().experts;
  const int M = int(ex.layers.size()), E = ex.count, K = model->spec().top_k;
  RoutingTrace t;
  t.n_moe_layers = M;
  t.n_experts = E;
  t.k = K;
  t.layers = ex.layers;
  std::mt19937 rng(11);
  for (int i = 0; i < 400; i++) {
    TraceRecord r;
    r.moe_index = i % M;
    r.tokens = (i / M) % 25 == 0 ? 6 : 1;  // now and then a prompt micro-batch
    r.phase = r.tokens > 1 ? TraceRecord::kPrompt : TraceRecord::kDecode;
    for (int tok = 0; tok < r.tokens; tok++) {
      // Skewed: two in three picks from each layer's first quarter of experts.
      std::vector<int> pick;
      while (int(pick.size()) < K) {
        const int e = rng() % 3 ? int(rng() % uint32_t(std::max(K + 1, E / 4))) : int(rng() % uint32_t(E));
        if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
      }
      r.experts.insert(r.experts.end(), pick.begin(), pick.end());
    }
    t.records.push_back(r);
  }
  const auto requests = trace_requests(t);
  const auto uses = trace_uses(t);  // the token counts Session::moe passes (prompt records: > 1)
  for (const auto& name : cache_policy_names()) {
    for (size_t slots : {size_t(3), size_t(M * E / 4), size_t(M * E / 2)}) {
      ExpertStoreOptions o;
      o.cache_bytes = int64_t(slots * ex.stride);
      o.policy = name;
      ExpertStore store(*model, o);
      for (size_t i = 0; i < requests.size(); i++) {
        std::vector<int> experts;
        for (int key : requests[i]) experts.push_back(key % E);
        auto b = store.fetch(t.records[i].moe_index, experts, uses[i]);
        for (size_t j = 0; j < experts.size(); j++) b->next();
      }
      const SimResult sim = simulate_cache(t, name, slots);
      const ExpertStats st = store.stats();
      for (int l = 0; l < M; l++)
        EXPECT_EQ(st.layers[size_t(l)].hits, sim.hits[size_t(l)])
            << name << ", " << slots << " slots, layer " << l;
      EXPECT_STREQ(store.policy_name(), name.c_str());
    }
  }
  ExpertStoreOptions bad;
  bad.policy = "mru";
  EXPECT_THROW(ExpertStore(*model, bad), Error);
}

TEST(ExpertStore, CacheSizeParsing) {
  const uint64_t all = uint64_t(40) << 30;
  EXPECT_EQ(parse_cache_size("0", all, "--expert-cache"), 0);
  EXPECT_EQ(parse_cache_size("2GiB", all, "--expert-cache"), int64_t(2) << 30);
  EXPECT_EQ(parse_cache_size("512M", all, "--expert-cache"), int64_t(512) << 20);
  EXPECT_EQ(parse_cache_size("1.5g", all, "--expert-cache"), int64_t(3) << 29);
  EXPECT_EQ(parse_cache_size("25%", all, "--expert-cache"), int64_t(10) << 30);
  EXPECT_EQ(parse_cache_size("all", all, "--expert-cache"), int64_t(all));
  EXPECT_EQ(parse_cache_size("4096", all, "--expert-cache"), 4096);
  for (const char* bad : {"", "GiB", "-1", "2 parsecs", "150%", "1e999G", "abc"}) {
    SCOPED_TRACE(bad);
    try {
      parse_cache_size(bad, all, "--expert-cache");
      FAIL() << "accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--expert-cache"), std::string::npos) << e.what();
    }
  }
}

TEST(ExpertStore, CliStatsAndBadFlags) {
  const std::string pkg = converted_fixture("qwen3_5_moe");
  CliResult r = run_cli(fmt::format(
      "eval -m {} --tokens 1,2,3 --greedy 4 --expert-cache 25% --prefetch --stats", pkg));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("hits"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("recall"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("stall ms"), std::string::npos) << r.err;  // the per-layer table
  EXPECT_NE(r.err.find(std::string("(") + kDefaultCachePolicy + ")"), std::string::npos) << r.err;
  r = run_cli(fmt::format("eval -m {} --tokens 1,2,3 --expert-cache 25% --cache-policy lru --stats",
                          pkg));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("slots (lru)"), std::string::npos) << r.err;
  for (const auto& [flags, what] : std::vector<std::pair<std::string, std::string>>{
           {"--cache-policy fifo", "--cache-policy"},
           {"--expert-cache 12parsecs", "--expert-cache"},
           {"--host-cache 3furlongs", "--host-cache"},  // checked on a CPU too, where it is unused
           {"--readers 0", "--readers"},
           {"--io floppy", "--io"}}) {
    r = run_cli(fmt::format("eval -m {} --tokens 1,2 {}", pkg, flags));
    EXPECT_EQ(r.code, 1) << flags;
    EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace moeflux::test
