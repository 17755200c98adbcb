// libFuzzer target: the session snapshot loader (Session::state_load). A session of the
// qwen3_5_moe fixture (converted once at start-up; hybrid, so both KV and linear state are in
// the payload) holds 6 tokens. Each input is loaded as a snapshot; when its first byte is odd
// the rest is loaded with its checksum fixed first, so the checks behind the checksum (positions,
// sizes, tokens) are reached too. Every input must either load or throw SnapshotError, and a
// refused one must leave the session byte for byte as it was.
//
// Built only with clang (tests/CMakeLists.txt). Run, e.g. for 60 s, seeded with a snapshot:
//   ./build/tests/fuzz_snapshot -max_total_time=60 corpus/
// (the target writes a valid snapshot to corpus/seed-snapshot at start-up when corpus/ exists).
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "convert/convert.h"
#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "util/error.h"

namespace {

std::string g_dir;
std::unique_ptr<moeflux::Model> g_model;
std::unique_ptr<moeflux::Context> g_backend;
std::unique_ptr<moeflux::ExpertStore> g_store;
std::unique_ptr<moeflux::Session> g_session;
std::vector<uint8_t> g_good;  // the session's snapshot, which every refused input must leave

std::vector<uint8_t> save() {
  std::vector<uint8_t> b(g_session->state_size());
  g_session->state_save(b.data(), b.size());
  return b;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "fuzz_snapshot-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) __builtin_trap();
  g_dir = tmpl + "/pkg";
  moeflux::ConvertOptions opt;
  opt.progress = false;
  moeflux::convert_checkpoint(std::string(MOEFLUX_TEST_DATA) + "/qwen3_5_moe", g_dir, opt);
  g_model = moeflux::Model::load(g_dir);
  g_backend = moeflux::make_cpu_context(1);
  g_store = std::make_unique<moeflux::ExpertStore>(*g_model);
  moeflux::SessionParams sp;
  sp.ctx = 16;
  g_session = std::make_unique<moeflux::Session>(*g_model, *g_backend, *g_store, sp);
  const int32_t tokens[6] = {3, 17, 2, 9, 41, 77};
  g_session->eval(tokens, 6, nullptr, false);
  g_good = save();
  if (std::filesystem::is_directory("corpus")) {
    std::ofstream f("corpus/seed-snapshot", std::ios::binary);
    f.write(reinterpret_cast<const char*>(g_good.data()), std::streamsize(g_good.size()));
  }
  std::atexit([] {
    g_session.reset();
    g_store.reset();
    g_model.reset();
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(g_dir).parent_path(), ec);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> in(data, data + size);
  if (!in.empty() && (in[0] & 1)) {
    in.erase(in.begin());
    if (in.size() >= moeflux::kSnapshotHeaderBytes) {
      std::memset(in.data() + 32, 0, 8);
      const uint64_t h = moeflux::fnv1a64(in.data(), in.size());
      std::memcpy(in.data() + 32, &h, 8);
    }
  }
  try {
    g_session->state_load(in.data(), in.size());
    // Accepted: a valid snapshot of this model. Evaluate from it, then go back.
    const int32_t t = 5;
    if (g_session->pos() < g_session->ctx()) g_session->eval(&t, 1, nullptr, false);
    g_session->state_load(g_good.data(), g_good.size());
  } catch (const moeflux::SnapshotError& e) {
    if (e.kind() == moeflux::ErrorKind::kInternal) __builtin_trap();
    if (save() != g_good) __builtin_trap();  // a refused snapshot changed the session
  }
  return 0;
}
