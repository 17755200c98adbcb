// `moeflux eval`: logits (and hidden states) for a list of token ids, optionally followed by
// greedy decoding; the oracle tests drive the engine through it.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>

#include "cli/commands.h"
#include "cli/common.h"
#include "format/safetensors.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/progress.h"

namespace moeflux::cli {
namespace {

int argmax(const float* v, int n) {
  return int(std::max_element(v, v + n) - v);  // first maximum, as torch.argmax
}

int cmd_eval(const ModelOptions& ro, const std::string& tokens_str, const std::string& dump,
             bool dump_hidden, bool force, int greedy) {
  std::vector<int32_t> tokens = parse_tokens(tokens_str);
  // The last greedy token is printed, not evaluated.
  const int64_t positions = int64_t(tokens.size()) + std::max(greedy - 1, 0);
  if (ro.ctx > 0 && positions > ro.ctx)
    fail(ErrorKind::kInvalidArgument,
         "--ctx {} is too small: {} prompt tokens and {} greedy tokens need {} positions", ro.ctx,
         tokens.size(), greedy, positions);
  // Checked before the model runs; written to a temporary beside it and renamed into place.
  if (!dump.empty()) check_output_file(dump, "--dump-logits", force, ro.model);
  Loaded L = open_model(ro);
  const Model* model = L.model.get();
  Context* backend = L.backend.get();
  ExpertStore& store = *L.store;
  const ModelSpec& s = model->spec();
  SessionParams sp = session_params(ro);
  sp.ctx = ro.ctx > 0 ? ro.ctx : std::max<int>(std::min(s.ctx_train, 4096), int(tokens.size()) + greedy);
  Session session(*model, *backend, store, sp);
  const int T = int(tokens.size()), V = s.vocab_size, H = s.hidden_size;

  std::vector<float> logits(size_t(T) * V);
  std::map<int, std::vector<float>> hidden;
  HiddenSink sink;
  if (dump_hidden)
    sink = [&](int i, const float* h, int n) { hidden[i].assign(h, h + size_t(n) * H); };
  auto t0 = std::chrono::steady_clock::now();
  session.eval(tokens.data(), T, logits.data(), true, sink);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print(stderr, "eval: {} tokens in {:.1f} ms ({:.1f} tok/s), {} threads\n", T, secs * 1e3,
             T / secs, backend->threads());

  if (!dump.empty()) {
    std::vector<TensorToWrite> out;
    out.push_back({"logits", DType::kF32, {T, V}, logits.data()});
    std::vector<std::string> names;
    for (auto& [i, h] : hidden) names.push_back(fmt::format("hidden_{}", i));
    size_t k = 0;
    for (auto& [i, h] : hidden) out.push_back({names[k++], DType::kF32, {T, H}, h.data()});
    StagedFile staged(dump);
    write_safetensors(staged.path(), out);
    staged.commit();
  }
  if (greedy > 0) {
    std::vector<int> gen;
    int next = argmax(logits.data() + size_t(T - 1) * V, V);
    std::vector<float> last(static_cast<size_t>(V));
    auto g0 = std::chrono::steady_clock::now();
    for (int i = 0; i < greedy; i++) {
      gen.push_back(next);
      if (i + 1 == greedy) break;
      int32_t tok = next;
      session.eval(&tok, 1, last.data(), false);
      next = argmax(last.data(), V);
    }
    double gs = std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count();
    fmt::print(stderr, "greedy: {} tokens in {:.1f} ms ({:.1f} tok/s)\n", greedy, gs * 1e3,
               greedy > 1 ? (greedy - 1) / gs : 0.0);
    fmt::print("{}\n", fmt::join(gen, ","));
  } else if (dump.empty()) {
    std::vector<int> top;
    for (int t = 0; t < T; t++) top.push_back(argmax(logits.data() + size_t(t) * V, V));
    fmt::print("{}\n", fmt::join(top, ","));
  }
  const int evaluated = T + std::max(greedy - 1, 0);
  fmt::print(stderr, "{}\n", store_summary(store, evaluated));
  if (ro.stats) print_store_stats(store, stderr);
  return 0;
}

}  // namespace

Command add_eval(CLI::App& app) {
  struct Args {
    ModelOptions mo;
    std::string tokens, dump;
    bool hidden = false, force = false;
    int greedy = 0;
  };
  auto a = std::make_shared<Args>();
  auto* ev = app.add_subcommand("eval", "logits for a list of token ids");
  add_model_options(ev, a->mo);
  ev->add_option("--tokens", a->tokens, "comma-separated token ids")->required();
  ev->add_option("--dump-logits", a->dump, "write F32 'logits' [T, vocab] to this safetensors file");
  ev->add_flag("--dump-hidden", a->hidden, "also write hidden_<i> [T, hidden] (HF numbering)");
  ev->add_flag("--force", a->force, "replace the --dump-logits file when it exists");
  ev->add_option("--greedy", a->greedy, "continue with N greedy tokens (one-token decode path)")
      ->check(CLI::NonNegativeNumber);
  return {ev, [a] {
            if (a->hidden && a->dump.empty())
              fail(ErrorKind::kInvalidArgument, "--dump-hidden needs --dump-logits FILE");
            return cmd_eval(a->mo, a->tokens, a->dump, a->hidden, a->force, a->greedy);
          }};
}

}  // namespace moeflux::cli
