#include "util/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "util/error.h"

namespace moeflux {

namespace fs = std::filesystem;

namespace {

// "out/" and "out/." name the directory "out".
fs::path clean(const std::string& path) {
  fs::path p = fs::path(path).lexically_normal();
  while (!p.empty() && !p.has_filename() && p != p.root_path()) p = p.parent_path();
  return p;
}

fs::path parent_of(const fs::path& p) {
  fs::path d = p.parent_path();
  return d.empty() ? fs::path(".") : d;
}

void fsync_path(const std::string& path, bool dir) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (dir ? O_DIRECTORY : 0));
  if (fd < 0) fail(ErrorKind::kIo, "{}: cannot open to sync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  // Some file systems refuse fsync on a directory (EINVAL); their renames are as durable as
  // they get.
  if (rc != 0 && !(dir && e == EINVAL))
    fail(ErrorKind::kIo, "{}: fsync failed: {}", path, std::strerror(e));
}

// Removes ".<name>.<tag>-<pid>" entries beside `p` whose process is gone: what a killed run
// left. Our own pid's entry (a previous process with the same pid) is removed too.
void remove_stale(const fs::path& p, const std::string& tag) {
  const std::string prefix = "." + p.filename().string() + "." + tag + "-";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent_of(p), ec)) {
    const std::string n = e.path().filename().string();
    if (!n.starts_with(prefix)) continue;
    char* end = nullptr;
    const long pid = std::strtol(n.c_str() + prefix.size(), &end, 10);
    if (!end || *end != '\0' || pid <= 0) continue;
    if (pid == long(::getpid()) || (::kill(pid_t(pid), 0) != 0 && errno == ESRCH)) {
      std::error_code rm;
      fs::remove_all(e.path(), rm);
    }
  }
}

std::string staged_name(const fs::path& p, const std::string& tag) {
  return (parent_of(p) / fmt::format(".{}.{}-{}", p.filename().string(), tag, ::getpid())).string();
}

bool is_within(const fs::path& child, const fs::path& parent) {
  auto [pi, ci] = std::mismatch(parent.begin(), parent.end(), child.begin(), child.end());
  return pi == parent.end();
}

fs::path resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path), ec);
  if (ec) p = fs::absolute(path).lexically_normal();
  return clean(p.string());
}

}  // namespace

StagedDir::StagedDir(const std::string& target, bool force) : force_(force) {
  fs::path t = clean(target);
  if (t.empty()) fail(ErrorKind::kInvalidArgument, "the output package directory is empty");
  std::error_code ec;
  // A link to a directory: the directory it names is replaced, the link stays.
  if (fs::is_symlink(fs::symlink_status(t, ec))) {
    t = fs::canonical(t, ec);
    if (ec) fail(ErrorKind::kIo, "{}: cannot resolve the link: {}", target, ec.message());
  }
  target_ = t.string();
  const fs::file_status st = fs::status(t, ec);
  if (fs::exists(st)) {
    if (!fs::is_directory(st))
      fail(ErrorKind::kIo, "{}: exists and is not a directory", target_);
    if (!fs::is_empty(t, ec)) {
      const bool package = fs::exists(t / "moeflux.json", ec);
      if (!force)
        fail(ErrorKind::kIo,
             "{}: exists and is not empty{}; pass --force to replace it whole, or choose another "
             "directory",
             target_, package ? " (it holds a moeflux package)" : "");
      if (!package)
        fail(ErrorKind::kIo,
             "{}: exists, is not empty and holds no moeflux package (no moeflux.json); --force "
             "replaces only a package: remove it yourself or choose another directory",
             target_);
    }
  } else {
    fs::create_directories(parent_of(t), ec);
    if (ec)
      fail(ErrorKind::kIo, "{}: cannot create the parent directory: {}", target_, ec.message());
  }
  remove_stale(t, "partial");
  remove_stale(t, "old");
  tmp_ = staged_name(t, "partial");
  if (!fs::create_directory(tmp_, ec) || ec)
    fail(ErrorKind::kIo, "{}: cannot create the temporary directory {}: {}", target_, tmp_,
         ec ? ec.message() : "it exists");
}

StagedDir::~StagedDir() {
  if (committed_ || tmp_.empty()) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);
}

void StagedDir::commit() {
  MF_CHECK(!committed_);
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(tmp_, ec); !ec && it != fs::end(it);
       it.increment(ec))
    fsync_path(it->path().string(), it->is_directory());
  if (ec) fail(ErrorKind::kIo, "{}: cannot list: {}", tmp_, ec.message());
  fsync_path(tmp_, true);

  const fs::path t = target_;
  const bool replace = fs::exists(t, ec) && !fs::is_empty(t, ec);
  if (!replace) {
    // Absent or empty: rename(2) puts the new directory in its place atomically.
    if (std::rename(tmp_.c_str(), target_.c_str()) != 0)
      fail(ErrorKind::kIo, "{}: cannot rename {} into place: {}", target_, tmp_,
           std::strerror(errno));
  } else {
    MF_CHECK(force_);
    // One atomic swap where the file system has it; else old aside, new in (a reader between
    // the two renames finds no package, never a mix).
    std::string old = tmp_;
    if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS)
        fail(ErrorKind::kIo, "{}: cannot exchange with {}: {}", target_, tmp_, std::strerror(errno));
      old = staged_name(t, "old");
      if (std::rename(target_.c_str(), old.c_str()) != 0)
        fail(ErrorKind::kIo, "{}: cannot move the old package aside to {}: {}", target_, old,
             std::strerror(errno));
      if (std::rename(tmp_.c_str(), target_.c_str()) != 0) {
        const int e = errno;
        std::rename(old.c_str(), target_.c_str());
        fail(ErrorKind::kIo, "{}: cannot rename {} into place: {}", target_, tmp_, std::strerror(e));
      }
    }
    committed_ = true;
    fs::remove_all(old, ec);  // the old package: open files of running processes stay valid
  }
  committed_ = true;
  fsync_path(parent_of(t).string(), true);
}

StagedFile::StagedFile(const std::string& target) {
  const fs::path t = clean(target);
  target_ = t.string();
  remove_stale(t, "tmp");
  tmp_ = staged_name(t, "tmp");
}

StagedFile::~StagedFile() {
  if (!committed_) ::unlink(tmp_.c_str());
}

void StagedFile::commit() {
  MF_CHECK(!committed_);
  fsync_path(tmp_, false);
  if (std::rename(tmp_.c_str(), target_.c_str()) != 0)
    fail(ErrorKind::kIo, "{}: cannot rename {} into place: {}", target_, tmp_, std::strerror(errno));
  committed_ = true;
  fsync_path(parent_of(target_).string(), true);
}

void check_dirs_disjoint(const std::string& input_dir, const std::string& output_dir) {
  const fs::path in = resolved(input_dir), out = resolved(output_dir);
  if (in == out)
    fail(ErrorKind::kInvalidArgument, "{}: the output directory is the checkpoint directory {}",
         output_dir, input_dir);
  if (is_within(out, in))
    fail(ErrorKind::kInvalidArgument, "{}: the output directory lies inside the checkpoint directory {}",
         output_dir, input_dir);
  if (is_within(in, out))
    fail(ErrorKind::kInvalidArgument, "{}: the output directory contains the checkpoint directory {}",
         output_dir, input_dir);
}

void check_output_file(const std::string& path, const std::string& flag, bool force,
                       const std::string& package_dir) {
  const fs::path p = clean(path);
  std::error_code ec;
  const fs::path dir = parent_of(p);
  if (!fs::is_directory(dir, ec))
    fail(ErrorKind::kIo, "{} {}: directory {} does not exist", flag, path, dir.string());
  const FileIdentity id = file_identity(p.string());
  if (!id.exists) return;
  if (fs::is_directory(p, ec)) fail(ErrorKind::kIo, "{} {}: is a directory", flag, path);
  if (!package_dir.empty())
    for (auto it = fs::recursive_directory_iterator(package_dir, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
      const FileIdentity f = file_identity(it->path().string());
      if (f.exists && f.dev == id.dev && f.ino == id.ino)
        fail(ErrorKind::kInvalidArgument,
             "{} {}: is {}, a file of the package being read; refusing to overwrite it", flag,
             path, it->path().string());
    }
  if (!force)
    fail(ErrorKind::kInvalidArgument, "{} {}: the file exists; pass --force to replace it", flag,
         path);
}

}  // namespace moeflux
