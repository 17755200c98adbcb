#include "experts/expert_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "util/error.h"

namespace moeflux {

ExpertStore::ExpertStore(const Model& model) : model_(model), layout_(model.manifest().experts) {
  for (int layer : layout_.layers) {
    std::string path = expert_file_path(model.dir(), layer);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      for (int f : fds_) ::close(f);
      fail(ErrorKind::kIo, "{}: cannot open: {}", path, std::strerror(e));
    }
    fds_.push_back(fd);
    paths_.push_back(path);
  }
}

ExpertStore::~ExpertStore() {
  for (int fd : fds_) ::close(fd);
}

void ExpertStore::read_expert(int moe_index, int expert, uint8_t* dst) {
  const uint64_t off = uint64_t(expert) * layout_.stride;
  uint64_t done = 0;
  auto t0 = std::chrono::steady_clock::now();
  while (done < layout_.bytes) {
    ssize_t n = ::pread(fds_[size_t(moe_index)], dst + done, layout_.bytes - done,
                        off_t(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      fail(ErrorKind::kIo, "{}: read of expert {} failed at offset {}: {}",
           paths_[size_t(moe_index)], expert, off + done, std::strerror(errno));
    if (n == 0)
      fail(ErrorKind::kIo, "{}: unexpected end of file reading expert {} at offset {} (truncated?)",
           paths_[size_t(moe_index)], expert, off + done);
    done += uint64_t(n);
  }
  stats_.read_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.bytes_read += layout_.bytes;
  stats_.misses++;
}

std::unique_ptr<ExpertBatch> ExpertStore::fetch(int moe_index, const std::vector<int>& experts) {
  MF_CHECK(moe_index >= 0 && size_t(moe_index) < fds_.size());
  auto b = std::unique_ptr<ExpertBatch>(new ExpertBatch());
  const uint64_t stride = layout_.stride;  // keeps each buffer 4 KiB aligned
  void* mem = std::aligned_alloc(kFileAlign, std::max<uint64_t>(1, stride * experts.size()));
  if (!mem) fail(ErrorKind::kIo, "out of memory for {} expert buffers", experts.size());
  b->storage_ = std::unique_ptr<uint8_t, void (*)(void*)>(static_cast<uint8_t*>(mem), std::free);
  const auto& parts = layout_.parts;
  auto view = [&](const PackedTensor& p, const uint8_t* base) { return mat_view(p, base + p.offset); };
  for (size_t i = 0; i < experts.size(); i++) {
    MF_CHECK(experts[i] >= 0 && experts[i] < layout_.count);
    uint8_t* dst = b->storage_.get() + i * stride;
    read_expert(moe_index, experts[i], dst);
    b->buffers_.push_back(dst);
    b->weights_.push_back({view(parts[0], dst), view(parts[1], dst), view(parts[2], dst)});
  }
  return b;
}

const ExpertWeights& ExpertBatch::wait(size_t i) { return weights_.at(i); }

}  // namespace moeflux
