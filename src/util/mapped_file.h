// Read-only memory map of a whole file, and a small writer with checked writes.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace moeflux {

// Identity of a file as the kernel sees it: a replaced (renamed-over) file has another inode,
// a rewritten one another size or mtime.
struct FileIdentity {
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  bool exists = false;
  bool operator==(const FileIdentity&) const = default;
};
FileIdentity file_identity(const std::string& path);  // exists = false when stat fails
FileIdentity fd_identity(int fd);

// A whole file in memory, read-only: mapped (kMap, pages come from the page cache on first
// touch), or read into anonymous memory backed by transparent huge pages where the kernel
// allows (kRead: fewer page faults and TLB misses when the bytes are weights streamed every
// token; costs reading the file at load).
class MappedFile {
 public:
  enum Mode { kMap, kRead };
  MappedFile() = default;
  explicit MappedFile(const std::string& path, Mode mode = kMap);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  const FileIdentity& identity() const { return identity_; }  // of the file opened
  // kMap: the file (the one opened, whatever its name now) is shorter than when mapped, so
  // touching the pages past its end raises SIGBUS; `now` gets its size. kRead: always false.
  bool shrunk(uint64_t* now = nullptr) const;

 private:
  void reset();
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;  // bytes to munmap
  int fd_ = -1;        // kMap: kept open for shrunk()
  FileIdentity identity_;
};

// Sequential writer; every failure throws an Error naming the file.
class FileWriter {
 public:
  explicit FileWriter(const std::string& path);
  ~FileWriter();
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;

  void write(const void* data, size_t n);
  void pad_to(uint64_t alignment);  // zero bytes up to the next multiple of alignment
  void seek(uint64_t offset);       // absolute; the gap reads as zeros
  uint64_t offset() const { return offset_; }
  void close();

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
  uint64_t offset_ = 0;
};

std::string read_text_file(const std::string& path);
void write_text_file(const std::string& path, const std::string& text);
bool file_exists(const std::string& path);

inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace moeflux
