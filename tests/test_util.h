// Shared helpers for the tests: fixture paths, temporary directories, one-call model runs.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "convert/convert.h"
#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "format/safetensors.h"
#include "model/model.h"
#include "util/error.h"

// Builds with AddressSanitizer run the slow tests on less data.
#ifndef MF_TEST_ASAN
#if defined(__SANITIZE_ADDRESS__)
#define MF_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MF_TEST_ASAN 1
#endif
#endif
#endif

// Skips the running test with `reason`, except under CI=true, where it fails with it: CI is set
// up with everything these tests may skip without (io_uring, O_DIRECT on the build directory's
// filesystem, node with the openai client, the Qwen3 tokenizer), so there a missing one is a
// broken set-up and must not pass as a green run that tested nothing. Only for things CI is
// expected to have; a skip for what a CI machine may lack (an instruction set) is a GTEST_SKIP.
// A macro because GTEST_SKIP and FAIL return from the test body.
#define MF_SKIP_OR_FAIL_IN_CI(reason)                                                     \
  do {                                                                                    \
    const std::string mf_skip_reason_ = (reason);                                         \
    if (::moeflux::test::in_ci())                                                         \
      FAIL() << mf_skip_reason_ << " [CI=true: CI is expected to have this, so no skip]"; \
    GTEST_SKIP() << mf_skip_reason_;                                                      \
  } while (0)

namespace moeflux::test {

// CI=true in the environment (.ci/run's machine sets it, as most CI services do). Tests may read
// the environment; the engine may not.
inline bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci && std::strcmp(ci, "true") == 0;
}

inline std::string data_dir() { return MOEFLUX_TEST_DATA; }
inline std::string fixture_dir(const std::string& name) { return data_dir() + "/" + name; }

// A fresh directory under the system temp dir (or under `parent`), removed with the object.
class TempDir {
 public:
  TempDir();
  explicit TempDir(const std::string& parent);
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A test on a small random package: synth_and_load writes `spec` (f32 weights, no quantisation)
// with `seed` into a temporary directory and loads it with an expert store; eval gives the
// last position's logits of one evaluation.
class SynthSessionTest : public ::testing::Test {
 protected:
  void synth_and_load(const ModelSpec& spec, uint64_t seed);
  std::vector<float> eval(Session& s, const std::vector<int32_t>& toks);
  TempDir dir_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertStore> store_;
};

// Converts a fixture once per test process and returns the package path.
const std::string& converted_fixture(const std::string& name);

struct RunResult {
  std::vector<float> logits;                  // [T, vocab]
  std::map<int, std::vector<float>> hidden;   // HF-numbered [T, hidden]
};

// Evaluates `tokens` in one call (prefill path) on a fresh session.
RunResult run_tokens(const std::string& package, const std::vector<int32_t>& tokens, int threads,
                     bool want_hidden = false);

// Reads an F32 or I32 tensor of a reference file as floats / ints.
std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name);
std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name);

double cosine(const float* a, const float* b, size_t n);
float max_abs(const float* a, size_t n);
float max_abs_diff(const float* a, const float* b, size_t n);
int argmax(const float* v, int n);

// Runs the moeflux CLI; returns the exit code, stdout and stderr.
struct CliResult {
  int code;
  std::string out, err;
};
CliResult run_cli(const std::string& args);

// SHA-256 of `n` bytes, lowercase hex.
std::string sha256_hex(const void* data, size_t n);
std::string read_file(const std::string& path);

}  // namespace moeflux::test
