// ExpertStore: owns the expert files and answers "bring expert (layer, e) into fast memory".
// This first version reads each requested expert with pread into a buffer owned by the batch
// (no cache yet); the interface is the one the cached, asynchronous store keeps: a layer's
// experts are requested together and each is waited for before use.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"

namespace moeflux {

struct ExpertWeights {
  Mat gate, up, down;  // [I, H], [I, H], [H, I]
};

struct ExpertStats {
  uint64_t hits = 0, misses = 0, bytes_read = 0;
  double read_seconds = 0;
};

class ExpertBatch;

class ExpertStore {
 public:
  explicit ExpertStore(const Model& model);
  ~ExpertStore();

  // Starts fetching `experts` (distinct ids) of MoE layer `moe_index`.
  std::unique_ptr<ExpertBatch> fetch(int moe_index, const std::vector<int>& experts);

  const ExpertStats& stats() const { return stats_; }
  uint64_t expert_bytes() const { return layout_.bytes; }

 private:
  friend class ExpertBatch;
  void read_expert(int moe_index, int expert, uint8_t* dst);

  const Model& model_;
  ExpertLayout layout_;
  std::vector<int> fds_;
  std::vector<std::string> paths_;
  ExpertStats stats_;
};

class ExpertBatch {
 public:
  // Blocks until expert i of the request is in memory; the views stay valid for the batch's life.
  const ExpertWeights& wait(size_t i);
  size_t size() const { return weights_.size(); }

 private:
  friend class ExpertStore;
  std::vector<uint8_t*> buffers_;
  std::vector<ExpertWeights> weights_;
  std::unique_ptr<uint8_t, void (*)(void*)> storage_{nullptr, nullptr};
};

}  // namespace moeflux
