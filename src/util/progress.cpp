#include "util/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

namespace moeflux {

Progress::Progress(std::string label, uint64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(::isatty(2)) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

void Progress::update(uint64_t done) {
  if (!enabled_ || total_ == 0) return;
  auto now = std::chrono::steady_clock::now();
  double frac = double(std::min(done, total_)) / double(total_);
  double secs = std::chrono::duration<double>(now - start_).count();
  if (tty_) {
    if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    int width = 30, filled = int(frac * width);
    std::string bar(size_t(filled), '#');
    bar.resize(size_t(width), '.');
    std::fprintf(stderr, "\r%s [%s] %5.1f%%  %s / %s  %.1fs", label_.c_str(), bar.c_str(),
                 frac * 100, format_bytes(done).c_str(), format_bytes(total_).c_str(), secs);
  } else {
    int decile = int(frac * 10);
    if (decile == last_decile_) return;
    last_decile_ = decile;
    std::fprintf(stderr, "%s %3d%%  %s / %s  %.1fs\n", label_.c_str(), decile * 10,
                 format_bytes(done).c_str(), format_bytes(total_).c_str(), secs);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_) return;
  update(total_);
  if (tty_) std::fprintf(stderr, "\n");
}

std::string format_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    u++;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.2f} {}", v, units[u]);
}

}  // namespace moeflux
