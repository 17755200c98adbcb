#include "util/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "util/error.h"

namespace moeflux {

MappedFile::MappedFile(const std::string& path, Mode mode) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorKind::kIo, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail(ErrorKind::kIo, "{}: cannot stat: {}", path, std::strerror(e));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail(ErrorKind::kIo, "{}: is a directory, expected a file", path);
  }
  size_ = size_t(st.st_size);
  identity_ = fd_identity(fd);
  if (size_ > 0 && mode == kRead) {
    const size_t huge = size_t(2) << 20;
    mapped_ = (size_ + huge - 1) / huge * huge;
    void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      fail(ErrorKind::kOutOfMemory, "{}: cannot allocate {} bytes: {}", path, size_,
           std::strerror(e));
    }
    ::madvise(p, mapped_, MADV_HUGEPAGE);  // advice: fine if the kernel has no THP
    auto* dst = static_cast<uint8_t*>(p);
    size_t done = 0;
    while (done < size_) {
      ssize_t n = ::pread(fd, dst + done, std::min<size_t>(size_ - done, size_t(64) << 20), off_t(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = n < 0 ? errno : 0;
        ::munmap(p, mapped_);
        ::close(fd);
        fail(ErrorKind::kIo, "{}: read failed at offset {}: {}", path, done,
             e ? std::strerror(e) : "unexpected end of file");
      }
      done += size_t(n);
    }
    ::mprotect(p, mapped_, PROT_READ);
    data_ = dst;
  } else if (size_ > 0) {
    mapped_ = size_;
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      fail(ErrorKind::kIo, "{}: cannot map {} bytes: {}", path, size_, std::strerror(e));
    }
    data_ = static_cast<const uint8_t*>(p);
    fd_ = fd;  // a map follows the file: shrunk() asks it for its size
    return;
  }
  ::close(fd);
}

void MappedFile::reset() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), mapped_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  size_ = 0;
  mapped_ = 0;
  fd_ = -1;
}

MappedFile::~MappedFile() { reset(); }

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), data_(o.data_), size_(o.size_), mapped_(o.mapped_), fd_(o.fd_),
      identity_(o.identity_) {
  o.data_ = nullptr;
  o.size_ = 0;
  o.mapped_ = 0;
  o.fd_ = -1;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    reset();
    path_ = std::move(o.path_);
    data_ = o.data_;
    size_ = o.size_;
    mapped_ = o.mapped_;
    fd_ = o.fd_;
    identity_ = o.identity_;
    o.data_ = nullptr;
    o.size_ = 0;
    o.mapped_ = 0;
    o.fd_ = -1;
  }
  return *this;
}

bool MappedFile::shrunk(uint64_t* now) const {
  if (fd_ < 0) return false;
  struct stat st;
  if (::fstat(fd_, &st) != 0) return false;
  if (now) *now = uint64_t(st.st_size);
  return uint64_t(st.st_size) < uint64_t(size_);
}

FileWriter::FileWriter(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "wb");
  if (!f_) fail(ErrorKind::kIo, "{}: cannot create: {}", path, std::strerror(errno));
  std::setvbuf(f_, nullptr, _IOFBF, 1 << 20);
}

FileWriter::~FileWriter() {
  if (f_) std::fclose(f_);
}

void FileWriter::write(const void* data, size_t n) {
  if (n == 0) return;
  if (std::fwrite(data, 1, n, f_) != n)
    fail(ErrorKind::kIo, "{}: write failed at offset {}: {}", path_, offset_, std::strerror(errno));
  offset_ += n;
}

void FileWriter::pad_to(uint64_t alignment) {
  static const std::vector<uint8_t> zeros(1 << 16, 0);
  uint64_t target = align_up(offset_, alignment);
  while (offset_ < target) write(zeros.data(), std::min<uint64_t>(target - offset_, zeros.size()));
}

void FileWriter::seek(uint64_t offset) {
  if (std::fseek(f_, long(offset), SEEK_SET) != 0)
    fail(ErrorKind::kIo, "{}: seek to {} failed: {}", path_, offset, std::strerror(errno));
  offset_ = offset;
}

void FileWriter::close() {
  if (!f_) return;
  int rc = std::fclose(f_);
  f_ = nullptr;
  if (rc != 0) fail(ErrorKind::kIo, "{}: close failed: {}", path_, std::strerror(errno));
}

std::string read_text_file(const std::string& path) {
  // An ifstream opens a directory and reads nothing: say so instead of "malformed JSON" or
  // "no tokens" further on.
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    fail(ErrorKind::kIo, "{}: is a directory, expected a file", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::kIo, "{}: cannot open: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text_file(const std::string& path, const std::string& text) {
  FileWriter w(path);
  w.write(text.data(), text.size());
  w.close();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

namespace {
FileIdentity identity_of(const struct stat& st) {
  return {st.st_dev, st.st_ino, st.st_size,
          int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec, true};
}
}  // namespace

FileIdentity file_identity(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? identity_of(st) : FileIdentity{};
}

FileIdentity fd_identity(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 ? identity_of(st) : FileIdentity{};
}

}  // namespace moeflux
