// libFuzzer target: the package manifest (read_manifest), then Model::load and a 3-token
// forward pass when it is accepted. The input replaces moeflux.json of a real package (the
// qwen3_moe fixture, converted once at start-up), so the file-size and binding checks are
// reached too. Every input must either work or throw moeflux::Error (not kInternal).
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 60 s, seeded with a manifest:
//   mkdir -p corpus && ./build/moeflux convert -q tests/data/qwen3_moe /tmp/pkg &&
//   cp /tmp/pkg/moeflux.json corpus/
//   ./build/tests/fuzz_manifest -max_total_time=60 -dict=tests/fuzz/json.dict corpus/
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "convert/convert.h"
#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "format/package.h"
#include "model/model.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace {

std::string g_dir;

void remove_package() {
  std::error_code ec;
  std::filesystem::remove_all(g_dir, ec);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "fuzz_manifest-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) __builtin_trap();
  g_dir = tmpl + "/pkg";
  moeflux::ConvertOptions opt;
  opt.progress = false;
  moeflux::convert_checkpoint(std::string(MOEFLUX_TEST_DATA) + "/qwen3_moe", g_dir, opt);
  std::atexit([] {
    remove_package();
    ::rmdir(std::filesystem::path(g_dir).parent_path().c_str());
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = moeflux::manifest_path(g_dir);
  ::unlink(path.c_str());  // a new file each time: no in-place truncate + rewrite flushes
  moeflux::write_text_file(path, std::string(reinterpret_cast<const char*>(data), size));
  try {
    auto model = moeflux::Model::load(g_dir);
    static auto backend = moeflux::make_cpu_context(1);
    moeflux::ExpertStore store(*model);
    moeflux::Session session(*model, *backend, store, moeflux::SessionParams{8});
    const int V = model->spec().vocab_size;
    const int32_t tokens[3] = {3 % V, 1 % V, 4 % V};
    std::vector<float> logits(size_t(V) * 3);
    session.eval(tokens, 3, logits.data(), true);
  } catch (const moeflux::Error& e) {
    if (e.kind() == moeflux::ErrorKind::kInternal) __builtin_trap();
  }
  return 0;
}
