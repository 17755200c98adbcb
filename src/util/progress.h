// A one-line progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moeflux {

class Progress {
 public:
  Progress(std::string label, uint64_t total, bool enabled = true);
  void update(uint64_t done);  // absolute
  void finish();

 private:
  std::string label_;
  uint64_t total_;
  bool enabled_, tty_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string format_bytes(uint64_t n);  // "1.23 GiB"

}  // namespace moeflux
