// Writes that are all-or-nothing: a package directory or an output file is written under a
// temporary name beside its target (same file system), fsynced, and renamed into place only
// when complete. A failure, an exception or a kill leaves the target as it was; the temporary
// is removed (by the destructor, or by the next run when a killed one left it behind).
// docs/2026-12-03-atomic-writes.md says what is guaranteed and what is not.
#pragma once

#include <string>

#include "util/mapped_file.h"  // FileIdentity

namespace moeflux {

// A package directory under construction: write everything into path(), then commit().
//
// The target must not exist, be an empty directory, or (with `force`) a directory holding a
// moeflux package (moeflux.json), which commit() replaces whole: the new directory is
// exchanged with the old in one rename (renameat2 RENAME_EXCHANGE, or rename old aside and
// new in where the file system lacks it), then the old is removed. A non-empty directory
// that is not a package is never replaced. The checks run in the constructor, so a refused
// target costs nothing.
class StagedDir {
 public:
  StagedDir(const std::string& target, bool force);
  ~StagedDir();  // not committed: removes the temporary directory
  StagedDir(const StagedDir&) = delete;
  StagedDir& operator=(const StagedDir&) = delete;

  const std::string& path() const { return tmp_; }  // ".<name>.partial-<pid>" beside target
  const std::string& target() const { return target_; }
  void commit();  // fsyncs every file and directory under path(), then renames into place

 private:
  std::string target_, tmp_;
  bool force_ = false, committed_ = false;
};

// An output file under construction: write path() (a ".<name>.tmp-<pid>" beside target),
// then commit() fsyncs and renames it over the target.
class StagedFile {
 public:
  explicit StagedFile(const std::string& target);
  ~StagedFile();  // not committed: removes the temporary file
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;

  const std::string& path() const { return tmp_; }
  void commit();

 private:
  std::string target_, tmp_;
  bool committed_ = false;
};

// Refuses (Error kInvalidArgument, naming both) an output directory that is the input
// directory, lies inside it, or contains it.
void check_dirs_disjoint(const std::string& input_dir, const std::string& output_dir);

// Checks an output file before anything is computed: its directory exists; it is not a file
// of the package in `package_dir` (same device and inode: resident.bin, moeflux.json, an
// expert file or tokenizer file, under any name or link); an existing file is replaced only
// with `force`. `flag` names the option in messages (e.g. "--dump-logits").
void check_output_file(const std::string& path, const std::string& flag, bool force,
                       const std::string& package_dir = "");

}  // namespace moeflux
