// Errors: one typed exception carrying a message that names the file, tensor, field or
// position at fault. Front ends print e.what() on one line and exit non-zero.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moeflux {

enum class ErrorKind {
  kInvalidArgument,  // bad user input: flags, token ids, prompt too long
  kFormat,           // malformed file: safetensors, config.json, package manifest
  kUnsupported,      // valid input the engine does not handle (arch, dtype, feature)
  kIo,               // open/read/write failures
  kOutOfMemory,      // an allocation failed (activations, expert buffers, the cache)
  kNumeric,          // the forward pass produced NaN/Inf (corrupt weights, overflow)
  kInternal,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

template <typename... Args>
[[noreturn]] void fail(ErrorKind kind, fmt::format_string<Args...> f, Args&&... args) {
  throw Error(kind, fmt::format(f, std::forward<Args>(args)...));
}

// Checks that hold whatever the input; a failure is a bug in moeflux, reported as one.
#define MF_CHECK(cond)                                                                          \
  do {                                                                                          \
    if (!(cond))                                                                                \
      ::moeflux::fail(::moeflux::ErrorKind::kInternal, "internal error: {} ({}:{})", #cond,     \
                      __FILE__, __LINE__);                                                      \
  } while (0)

}  // namespace moeflux
