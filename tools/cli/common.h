// What every subcommand that runs a model shares: the model/backend/expert-store flags, opening
// a package with them, and the --stats report. Each subcommand lives in its own cmd_*.cpp and
// registers itself with an add_* function (commands.h).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"

namespace moeflux::cli {

struct ModelOptions {
  std::string model;  // package directory
  int threads = 0;    // 0: one per core
  int ctx = 0;        // 0: min(trained context, 4096)
  std::string expert_cache = "auto";  // bytes ("2GiB"), "25%" of all experts, "all", "0", "auto"
  std::string host_cache = "0";       // the host tier (GPU): same forms, or auto
  int readers = 4;
  bool direct_io = false;
  std::string io = "auto";  // auto | pread | uring
  bool prefetch = false;
  std::string cache_policy = "default";  // ExpertStoreOptions::policy
  bool stats = false;
  int experts_per_token = 0;  // 0: the model's top-k
  bool mmap = false;          // map resident.bin instead of reading it into memory
  int ubatch = 512;           // prompt micro-batch (SessionParams::ubatch)
  std::string backend = "auto";  // auto | cpu | cuda
  bool exact = true;             // ContextOptions::exact (--exact / --int8)
};

// Adds -m (required unless `model_required` is false), -t, -c and the expert-store flags.
void add_model_options(CLI::App* app, ModelOptions& o, bool model_required = true);

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Context> backend;
  std::unique_ptr<ExpertStore> store;
};

// The demo model shipped with moeflux (models/demo in the source tree, or
// <prefix>/share/moeflux/models/demo when installed): what -m defaults to.
std::string default_model_dir();

// Validates the flags (errors name the flag) and opens the package (-m, or the demo model when
// -m is empty), backend and store.
Loaded open_model(const ModelOptions& o);
SessionParams session_params(const ModelOptions& o);

// The expert-store report printed by --stats: totals, then one line per MoE layer.
void print_store_stats(const ExpertStore& store, std::FILE* out);
// One line: "experts: 93.1% hits, 1.23 GiB read (0.41 GB/token), 2.1 GB/s, stall 12 ms".
std::string store_summary(const ExpertStore& store, int tokens);

// Comma-separated token ids ("1, 2,3"); an empty or malformed item is an error naming `flag`
// and its position.
std::vector<int32_t> parse_tokens(const std::string& s, const std::string& flag = "--tokens");

}  // namespace moeflux::cli
