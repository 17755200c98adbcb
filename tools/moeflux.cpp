// moeflux: the command-line front end. One subcommand per job; every error is one line on
// stderr naming the file/tensor/field at fault, with a non-zero exit.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>

#include "convert/convert.h"
#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "format/package.h"
#include "format/safetensors.h"
#include "model/model.h"
#include "util/error.h"
#include "util/progress.h"

using namespace moeflux;

namespace {

std::vector<int32_t> parse_tokens(const std::string& s) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty())
      fail(ErrorKind::kInvalidArgument, "--tokens: empty item at position {}", out.size());
    char* end = nullptr;
    long v = std::strtol(item.c_str(), &end, 10);
    if (*end || v < INT32_MIN || v > INT32_MAX)
      fail(ErrorKind::kInvalidArgument, "--tokens: '{}' at position {} is not a token id", item,
           out.size());
    out.push_back(int32_t(v));
    i = j + 1;
  }
  return out;
}

int argmax(const float* v, int n) {
  return int(std::max_element(v, v + n) - v);  // first maximum, as torch.argmax
}

struct RunOptions {
  int threads = 0;
  int ctx = 0;
};

void add_run_options(CLI::App* app, RunOptions& o) {
  app->add_option("-t,--threads", o.threads, "CPU threads (0: one per core)");
  app->add_option("-c,--ctx", o.ctx, "context size in tokens (0: min(trained context, 4096))");
}

struct QuantFlags {
  std::string recipe = "none";
  int group = 64;
  std::map<std::string, std::string> overrides;  // class -> q8|q4|q2|none
};

int cmd_convert(const std::string& in, const std::string& out, const std::string& dtype,
                bool quiet, const QuantFlags& qf) {
  ConvertOptions opt;
  opt.progress = !quiet;
  opt.quant = quant_recipe(qf.recipe);
  for (const auto& [cls, dt] : qf.overrides)
    if (!dt.empty()) override_recipe(opt.quant, cls, dt);
  if (qf.group != 32 && qf.group != 64 && qf.group != 128)
    fail(ErrorKind::kInvalidArgument, "--group: {} is not one of 32, 64, 128", qf.group);
  opt.quant.group = qf.group;
  if (!dtype.empty()) {
    DType t;
    if (!dtype_from_name(dtype, &t) || !(t == DType::kBF16 || t == DType::kF16 || t == DType::kF32))
      fail(ErrorKind::kInvalidArgument, "--dtype: '{}' is not one of bf16, f16, f32", dtype);
    opt.dtype = t;
  }
  auto t0 = std::chrono::steady_clock::now();
  ConvertReport r = convert_checkpoint(in, out, opt);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const auto& n : r.notes) fmt::print(stderr, "note: {}\n", n);
  fmt::print(stderr, "wrote {}: resident {}, experts {} in {:.2f}s\n", out,
             format_bytes(r.resident_bytes), format_bytes(r.expert_bytes), secs);
  return 0;
}

int cmd_inspect(const std::string& dir) {
  Manifest m = read_manifest(dir);
  const ModelSpec& s = m.spec;
  int n_full = 0;
  for (auto a : s.attn) n_full += a == AttnKind::kFull;
  fmt::print("package     {}\n", dir);
  fmt::print("arch        {} (source {})\n", s.arch,
             m.provenance.value("source_model_type", std::string("?")));
  fmt::print("layers      {} ({} full attention, {} linear attention; {} MoE, {} dense)\n",
             s.n_layers, n_full, s.n_layers - n_full, s.n_moe_layers(),
             s.n_layers - s.n_moe_layers());
  std::string pattern;
  for (int l = 0; l < s.n_layers; l++) pattern += s.attn[size_t(l)] == AttnKind::kFull ? 'F' : 'L';
  fmt::print("pattern     {}\n", pattern);
  fmt::print("hidden      {}, vocab {}, context {}\n", s.hidden_size, s.vocab_size, s.ctx_train);
  if (n_full)
    fmt::print("attention   {} q-heads / {} kv-heads x {}, rope dims {} theta {}, gate {}, qk-norm {}\n",
               s.n_heads, s.n_kv_heads, s.head_dim, s.rope_dim, s.rope_theta,
               s.attn_output_gate ? "yes" : "no", s.qk_norm ? "yes" : "no");
  if (n_full < s.n_layers)
    fmt::print("deltanet    {} k-heads x {} / {} v-heads x {}, conv {}\n", s.lin_k_heads,
               s.lin_k_dim, s.lin_v_heads, s.lin_v_dim, s.conv_kernel);
  if (s.n_moe_layers())
    fmt::print("experts     {} x ffn {}, top-{} ({}), shared ffn {}\n", s.n_experts, s.moe_ffn,
               s.top_k, s.norm_topk_prob ? "renormalised" : "not renormalised", s.shared_ffn);
  if (s.n_moe_layers() < s.n_layers) fmt::print("dense ffn   {}\n", s.dense_ffn);
  fmt::print("embeddings  {}\n", s.tie_embeddings ? "tied" : "separate lm_head");

  std::map<std::string, std::pair<int, uint64_t>> by_dtype;
  uint64_t used = 0;
  for (const auto& t : m.resident) {
    auto& e = by_dtype[std::string(dtype_name(t.dtype))];
    e.first++;
    e.second += t.nbytes;
    used += t.nbytes;
  }
  fmt::print("\nresident    {} tensors, {} ({} in resident.bin with alignment)\n",
             m.resident.size(), format_bytes(used), format_bytes(m.resident_bytes));
  for (const auto& [dt, e] : by_dtype)
    fmt::print("  {:5} {:5} tensors  {}\n", dt, e.first, format_bytes(e.second));
  std::vector<const PackedTensor*> big;
  for (const auto& t : m.resident) big.push_back(&t);
  std::sort(big.begin(), big.end(), [](auto a, auto b) { return a->nbytes > b->nbytes; });
  fmt::print("  largest:");
  for (size_t i = 0; i < std::min<size_t>(3, big.size()); i++)
    fmt::print(" {} {}", big[i]->name, format_bytes(big[i]->nbytes));
  fmt::print("\n");
  const auto& ex = m.experts;
  if (!ex.layers.empty()) {
    const uint64_t per_layer = ex.bytes * uint64_t(ex.count);
    fmt::print("\nexperts     {} layers x {} experts x {} ({} stride; {})\n", ex.layers.size(),
               ex.count, format_bytes(ex.bytes), format_bytes(ex.stride),
               dtype_name(ex.parts[0].dtype));
    fmt::print("  per layer     {}\n", format_bytes(per_layer));
    fmt::print("  all layers    {}\n", format_bytes(per_layer * ex.layers.size()));
    fmt::print("  per token     {} (top-{} x {} layers)\n",
               format_bytes(ex.bytes * uint64_t(s.top_k) * ex.layers.size()), s.top_k,
               ex.layers.size());
    fmt::print("\nsplit       resident {} : experts {} ({:.1f}% resident)\n", format_bytes(used),
               format_bytes(per_layer * ex.layers.size()),
               100.0 * double(used) / double(used + per_layer * ex.layers.size()));
  }
  return 0;
}

int cmd_eval(const std::string& dir, const std::string& tokens_str, const std::string& dump,
             bool dump_hidden, int greedy, const RunOptions& ro) {
  std::vector<int32_t> tokens = parse_tokens(tokens_str);
  if (ro.threads < 0)
    fail(ErrorKind::kInvalidArgument, "--threads: {} is negative (0: one per core)", ro.threads);
  if (ro.ctx < 0)
    fail(ErrorKind::kInvalidArgument, "--ctx: {} is negative (0: min(trained context, 4096))",
         ro.ctx);
  // The last greedy token is printed, not evaluated.
  const int64_t positions = int64_t(tokens.size()) + std::max(greedy - 1, 0);
  if (ro.ctx > 0 && positions > ro.ctx)
    fail(ErrorKind::kInvalidArgument,
         "--ctx {} is too small: {} prompt tokens and {} greedy tokens need {} positions", ro.ctx,
         tokens.size(), greedy, positions);
  if (!dump.empty()) {
    const auto parent = std::filesystem::path(dump).parent_path();
    if (!parent.empty() && !std::filesystem::is_directory(parent))
      fail(ErrorKind::kIo, "--dump-logits {}: directory {} does not exist", dump, parent.string());
  }
  auto model = Model::load(dir);
  const ModelSpec& s = model->spec();
  auto backend = make_cpu_backend(ro.threads);
  ExpertStore store(*model);
  SessionParams sp;
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
    write_safetensors(dump, out);
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
  const auto& st = store.stats();
  fmt::print(stderr, "experts: {} reads, {} read\n", st.misses, format_bytes(st.bytes_read));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeflux: Mixture-of-Experts inference that streams experts from disk"};
  app.set_version_flag("--version", std::string("moeflux ") + MOEFLUX_VERSION);
  app.require_subcommand(1);

  auto* conv = app.add_subcommand("convert", "Hugging Face checkpoint -> moeflux package");
  std::string conv_in, conv_out, conv_dtype;
  bool quiet = false;
  conv->add_option("hf_dir", conv_in, "checkpoint directory (config.json + safetensors)")->required();
  conv->add_option("package_dir", conv_out, "output package directory")->required();
  conv->add_option("--dtype", conv_dtype, "matrix dtype: bf16, f16 or f32 (default: the checkpoint's)");
  conv->add_flag("-q,--quiet", quiet, "no progress bar");
  QuantFlags qf;
  for (const char* c : {"experts", "attn", "shared", "dense", "embed", "lm-head"}) qf.overrides[c];
  conv->add_option("--quant", qf.recipe,
                   "quantisation recipe: none, q8, q4 (experts/attention/shared/embedding q4, "
                   "lm_head q8), q2 (experts q2, rest as q4)");
  conv->add_option("--group", qf.group, "quantisation group size: 64 (default), 128 or 32");
  conv->add_option("--experts", qf.overrides["experts"], "override the routed experts: q8|q4|q2|none");
  conv->add_option("--attn", qf.overrides["attn"], "override attention and linear attention");
  conv->add_option("--shared", qf.overrides["shared"], "override the shared expert");
  conv->add_option("--dense", qf.overrides["dense"], "override dense FFN layers");
  conv->add_option("--embed", qf.overrides["embed"], "override the embedding");
  conv->add_option("--lm-head", qf.overrides["lm-head"], "override the output projection");

  auto* insp = app.add_subcommand("inspect", "print a package's model, tensors and sizes");
  std::string insp_dir;
  insp->add_option("package_dir", insp_dir, "package directory")->required();

  auto* ev = app.add_subcommand("eval", "logits for a list of token ids");
  std::string ev_model, ev_tokens, ev_dump;
  bool ev_hidden = false;
  int ev_greedy = 0;
  RunOptions ev_ro;
  ev->add_option("-m,--model", ev_model, "package directory")->required();
  ev->add_option("--tokens", ev_tokens, "comma-separated token ids")->required();
  ev->add_option("--dump-logits", ev_dump, "write F32 'logits' [T, vocab] to this safetensors file");
  ev->add_flag("--dump-hidden", ev_hidden, "also write hidden_<i> [T, hidden] (HF numbering)");
  ev->add_option("--greedy", ev_greedy, "continue with N greedy tokens (one-token decode path)")
      ->check(CLI::NonNegativeNumber);
  add_run_options(ev, ev_ro);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (*conv) return cmd_convert(conv_in, conv_out, conv_dtype, quiet, qf);
    if (*insp) return cmd_inspect(insp_dir);
    if (*ev) {
      if (ev_hidden && ev_dump.empty())
        fail(ErrorKind::kInvalidArgument, "--dump-hidden needs --dump-logits FILE");
      return cmd_eval(ev_model, ev_tokens, ev_dump, ev_hidden, ev_greedy, ev_ro);
    }
  } catch (const Error& e) {
    fmt::print(stderr, "moeflux: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "moeflux: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
