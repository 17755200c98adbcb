// ExpertStore: owns the expert files and answers "bring expert (layer, e) into fast memory".
//
// A layer's routed experts are requested together (fetch); every expert not in the cache is
// read at once by a pool of reader threads (pread, or io_uring when built with liburing),
// whole records, optionally O_DIRECT; the caller takes experts in the order they arrive
// (ExpertBatch::next) so compute starts on the first one. The cache is a byte budget of
// expert-sized slots; which expert gives up its slot is the cache policy's choice
// (experts/cache_policy.h); experts in use by a batch are pinned. A request that finds no slot
// (budget 0, smaller than one layer's experts, or the policy does not admit the expert) reads
// into buffers of its own: slower, never wrong. The bytes an expert is computed from are the file's bytes whatever
// path brought them, so logits do not depend on the cache, the readers or the I/O mode.
//
// Prefetch: prefetch(layer, experts) warms the cache without pinning (reads of experts not
// already cached or in flight); the caller scores its predictions with note_prediction
// (recall = predicted ∩ used / used).
//
// Thread-safe: several sessions may share one store.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"

namespace moeflux {

class ExpertMemory;

// Reads bytes of an expert file. The store's readers call it from several threads at once.
// Implementations throw Error on failure (tests inject faults through this).
class ExpertReader {
 public:
  virtual ~ExpertReader() = default;
  // Reads exactly `n` bytes at `offset` of expert file `file` (index into the store's layers)
  // into `dst` (aligned to kFileAlign; offset and n are multiples of kFileAlign when O_DIRECT).
  virtual void read(int file, uint64_t offset, uint64_t n, uint8_t* dst) = 0;
};

enum class IoEngine { kAuto, kPread, kUring };

struct ExpertStoreOptions {
  // Cache budget in bytes: -1 = default (see default_cache_bytes), 0 = no cache (every expert
  // is read every time it is used).
  int64_t cache_bytes = -1;
  int readers = 4;          // reader threads (pread) or queue depth (io_uring)
  bool direct_io = false;   // O_DIRECT: bypass the page cache
  IoEngine io = IoEngine::kAuto;
  bool prefetch = false;    // sessions speculate the next layer's experts (see Session)
  // Eviction/admission policy by name (cache_policy_names(); "default" = kDefaultCachePolicy).
  // Results never depend on it, only hit rates do.
  std::string policy = "default";
  // Tests: replaces the file reader (fault injection). The store still opens and checks files.
  std::shared_ptr<ExpertReader> reader;
  // Tests: with io_uring, the ring reports an error once this many reads have completed, as
  // a failed io_uring_wait_cqe would (-1: never).
  int uring_fault_after = -1;
  // Where cache slots live: the memory of the device the sessions run on
  // (Device::expert_memory()); null: host memory (the CPU device's).
  ExpertMemory* memory = nullptr;
  // The host tier, used when the slots are not host-visible (a GPU): this many bytes of the
  // device's fastest host memory (ExpertMemory::host_alloc) keep the experts
  // read most recently, so a slot miss found there is one copy and no read. It holds what
  // was read whatever the slots hold (least recently used goes first). 0: none; every slot
  // miss is read, through a staging buffer.
  int64_t host_cache_bytes = 0;
};

// Per MoE layer (and summed): what the store did.
struct ExpertLayerStats {
  uint64_t requests = 0;   // experts asked for by fetch
  uint64_t hits = 0;       // found in the cache (including prefetched ones)
  uint64_t misses = 0;     // read for the request
  uint64_t bytes_read = 0; // every read, prefetch included
  double read_seconds = 0;   // summed time of reads (over reader threads)
  double stall_seconds = 0;  // time callers waited for experts
  uint64_t prefetch_reads = 0;     // experts read by prefetch
  uint64_t prefetch_used = 0;      // of those, used by a later fetch before eviction
  uint64_t predicted = 0;      // experts predicted for this layer (prefetch calls)
  uint64_t scored = 0;         // used experts that had a prediction
  uint64_t predicted_hit = 0;  // of those, predicted: recall = predicted_hit / scored
  // Slots not host-visible (a GPU): misses (and prefetch reads) found in the host tier, and
  // the copies from host memory into slots.
  uint64_t host_hits = 0;
  uint64_t bytes_copied = 0;
  double copy_seconds = 0;  // summed time of copies (over threads)

  void add(const ExpertLayerStats& o);
};

struct ExpertStats {
  ExpertLayerStats total;
  std::vector<ExpertLayerStats> layers;  // per MoE layer (expert file order)
  uint64_t cache_bytes = 0, cache_slots = 0, cached = 0;
  uint64_t host_cache_bytes = 0, host_cached = 0;  // the host tier
  double hit_rate() const {
    return total.requests ? double(total.hits) / double(total.requests) : 0.0;
  }
  double recall() const {
    return total.scored ? double(total.predicted_hit) / double(total.scored) : 0.0;
  }
};

class ExpertBatch;

class ExpertStore {
 public:
  // Opens every expert file and checks its size against the manifest (a truncated file is an
  // error naming it). Throws Error.
  ExpertStore(const Model& model, ExpertStoreOptions options = {});
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Starts bringing in `experts` (distinct ids) of MoE layer `moe_index`. `uses[i]`: how many
  // of the batch's tokens chose experts[i] (what the cache policy counts; empty: 1 each).
  std::unique_ptr<ExpertBatch> fetch(int moe_index, const std::vector<int>& experts,
                                     const std::vector<uint32_t>& uses = {});
  // Warms the cache with `experts` of MoE layer `moe_index` (no-op without a cache).
  void prefetch(int moe_index, const std::vector<int>& experts);
  // Records that of `scored` experts used by MoE layer `moe_index`, `hit` had been predicted.
  void note_prediction(int moe_index, uint64_t scored, uint64_t hit);

  ExpertStats stats() const;
  void reset_stats();
  // Drops every cached expert (waits for reads in flight).
  void drop_cache();
  // Reads every expert of every layer into the cache and keeps it there (pinned for the
  // store's life): afterwards resident() gives each layer's table and sessions skip fetch (on a
  // GPU, no host round trip per layer). Needs a budget of all experts (else Error
  // kInvalidArgument saying so); a read error is thrown. Fetches after it are not counted in
  // stats() (there is nothing to count: every one would hit).
  void load_all();
  // [n_experts()] weights of MoE layer `moe_index` by expert id after load_all(), else null.
  const ExpertWeights* resident(int moe_index) const;

  const ExpertStoreOptions& options() const { return opt_; }
  ExpertMemory& memory() const;    // where the cache slots live
  uint64_t expert_bytes() const;   // used bytes of one expert
  uint64_t expert_stride() const;  // bytes one expert occupies in the cache and in the file
  int n_layers() const;            // MoE layers
  int n_experts() const;           // experts per MoE layer
  const char* io_name() const;     // "pread", "io_uring", "custom" (+ " O_DIRECT")
  const char* policy_name() const; // the cache policy ("default" resolved)

  struct Impl;

 private:
  friend class ExpertBatch;
  ExpertStoreOptions opt_;
  std::unique_ptr<Impl> impl_;
};

// MemAvailable from /proc/meminfo in bytes (0 when it cannot be read).
uint64_t host_memory_available();
// Default cache budget: what fits in half of MemAvailable after the resident weights, capped at
// all experts.
int64_t default_cache_bytes(const Model& model);
// Parses "2GiB", "512M", "0", "25%" (of all experts), "all". Throws Error naming `what`.
int64_t parse_cache_size(const std::string& text, uint64_t all_expert_bytes,
                         const std::string& what);

class ExpertBatch {
 public:
  ~ExpertBatch();
  size_t size() const;
  // The next expert to arrive (each index once, in arrival order); blocks until one is in
  // memory; throws Error if its read failed. Returns the request index.
  size_t next();
  // Blocks until expert i is in memory; the views stay valid for the batch's life.
  const ExpertWeights& wait(size_t i);
  const ExpertWeights& weights(size_t i) const;  // after next() returned i or wait(i)

  struct State;

 private:
  friend class ExpertStore;
  explicit ExpertBatch(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

}  // namespace moeflux
