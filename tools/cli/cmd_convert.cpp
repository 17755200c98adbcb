// `moeflux convert` (Hugging Face checkpoint -> package) and `moeflux inspect`.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>

#include "cli/commands.h"
#include "convert/convert.h"
#include "format/package.h"
#include "util/error.h"
#include "util/progress.h"

namespace moeflux::cli {
namespace {

struct QuantFlags {
  std::string recipe = "none";
  int group = 64;
  std::map<std::string, std::string> overrides;  // class -> q8|q4|q2|none
};

int cmd_convert(const std::string& in, const std::string& out, const std::string& dtype,
                bool quiet, bool force, const QuantFlags& qf) {
  ConvertOptions opt;
  opt.progress = !quiet;
  opt.force = force;
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
  int n_full = 0, n_mla = 0;
  for (auto a : s.attn) {
    n_full += a == AttnKind::kFull;
    n_mla += a == AttnKind::kMla;
  }
  fmt::print("package     {}\n", dir);
  fmt::print("arch        {} (source {})\n", s.arch,
             m.provenance.value("source_model_type", std::string("?")));
  if (n_mla)
    fmt::print("layers      {} ({} multi-head latent attention; {} MoE, {} dense)\n", s.n_layers,
               n_mla, s.n_moe_layers(), s.n_layers - s.n_moe_layers());
  else
    fmt::print("layers      {} ({} full attention, {} linear attention; {} MoE, {} dense)\n",
               s.n_layers, n_full, s.n_layers - n_full, s.n_moe_layers(),
               s.n_layers - s.n_moe_layers());
  std::string pattern;
  for (int l = 0; l < s.n_layers; l++)
    pattern += s.attn[size_t(l)] == AttnKind::kFull  ? 'F'
               : s.attn[size_t(l)] == AttnKind::kMla ? 'M'
                                                     : 'L';
  fmt::print("pattern     {}\n", pattern);
  if (s.has_gpt_oss_features()) {  // gpt-oss
    int n_sliding = 0;
    for (int l = 0; l < s.n_layers; l++) n_sliding += s.is_sliding(l);
    fmt::print("gpt-oss     {} sliding-window layers (window {}), {} full; attention bias {}, "
               "sinks {}; router bias {}, expert biases {}, clamped swiglu limit {} alpha {}\n",
               n_sliding, s.sliding_window, s.n_layers - n_sliding, s.attn_bias ? "yes" : "no",
               s.attn_sinks ? "yes" : "no", s.router_logit_bias ? "yes" : "no",
               s.expert_bias ? "yes" : "no", s.swiglu_limit, s.swiglu_alpha);
    if (s.rope_scaling.kind == RopeScaling::kYarn)
      fmt::print("rope        yarn x{} from {} (truncate {})\n", s.rope_scaling.factor,
                 s.rope_scaling.orig_ctx, s.rope_scaling.truncate ? "yes" : "no");
  }
  fmt::print("hidden      {}, vocab {}, context {}\n", s.hidden_size, s.vocab_size, s.ctx_train);
  if (n_full && !n_mla)
    fmt::print("attention   {} q-heads / {} kv-heads x {}, rope dims {} theta {}, gate {}, qk-norm {}{}\n",
               s.n_heads, s.n_kv_heads, s.head_dim, s.rope_dim, s.rope_theta,
               s.attn_output_gate ? "yes" : "no", s.qk_norm ? "yes" : "no",
               s.qkv_bias ? ", q/k/v bias yes" : "");  // GLM-4.5
  if (n_mla) {
    fmt::print(
        "mla         {} heads, q_lora {}, kv_lora {}, qk {} (nope {} + rope {}), v {}, rope "
        "theta {}{}\n",
        s.n_heads, s.q_lora_rank ? std::to_string(s.q_lora_rank) : "none (q_proj)", s.kv_lora_rank,
        s.head_dim, s.mla_nope_dim(), s.rope_dim, s.v_head_dim, s.rope_theta,
        s.rope_scaling.kind == RopeScaling::kYarn
            ? fmt::format(", yarn x{} from {}", s.rope_scaling.factor, s.rope_scaling.orig_ctx)
            : "");
  }
  {
    // The KV cache the engine keeps per token (f32), and what the same entries take in bf16.
    int64_t floats = 0;
    for (auto a : s.attn) floats += s.kv_floats_per_pos(a);
    if (floats)
      fmt::print("kv cache    {} bytes per token (f32; {} in bf16)\n", floats * 4, floats * 2);
    if (floats && !s.sliding.empty()) {
      // gpt-oss: the engine keeps every position of every layer; a sliding layer needs only
      // its window's, so past the window a token costs only the full layers'.
      int64_t full = 0;
      for (int l = 0; l < s.n_layers; l++)
        if (!s.is_sliding(l)) full += s.kv_floats_per_pos(s.attn[size_t(l)]);
      fmt::print("            {} bytes per token in the full layers alone (f32; {} in bf16): what "
                 "a token past the window needs once sliding layers keep only {} positions\n",
                 full * 4, full * 2, s.sliding_window);
    }
  }
  if (n_full + n_mla < s.n_layers)
    fmt::print("deltanet    {} k-heads x {} / {} v-heads x {}, conv {}\n", s.lin_k_heads,
               s.lin_k_dim, s.lin_v_heads, s.lin_v_dim, s.conv_kernel);
  if (s.n_moe_layers())
    fmt::print("experts     {} x ffn {}, top-{} ({}), shared ffn {}\n", s.n_experts, s.moe_ffn,
               s.top_k, s.norm_topk_prob ? "renormalised" : "not renormalised", s.shared_ffn);
  if (s.n_moe_layers() && s.router == RouterKind::kSigmoid)
    fmt::print(
        "routing     sigmoid{}, {} groups (top {} kept), weights x {}{}\n",
        s.router_bias ? " + correction bias" : "", s.n_group, s.topk_group, s.routed_scale,
        s.shared_ffn ? (s.shared_gate ? ", gated shared expert" : ", ungated shared expert") : "");
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

}  // namespace

Command add_convert(CLI::App& app) {
  struct Args {
    std::string in, out, dtype;
    bool quiet = false, force = false;
    QuantFlags qf;
  };
  auto a = std::make_shared<Args>();
  auto* conv = app.add_subcommand("convert", "Hugging Face checkpoint -> moeflux package");
  conv->add_option("hf_dir", a->in, "checkpoint directory (config.json + safetensors)")->required();
  conv->add_option("package_dir", a->out,
                   "output package directory (must not exist or be empty, unless --force)")
      ->required();
  conv->add_option("--dtype", a->dtype, "matrix dtype: bf16, f16 or f32 (default: the checkpoint's)");
  conv->add_flag("-q,--quiet", a->quiet, "no progress bar");
  conv->add_flag("--force", a->force,
                 "replace the package already in package_dir, whole, once the new one is complete");
  QuantFlags& qf = a->qf;
  for (const char* c : {"experts", "attn", "shared", "dense", "embed", "lm-head"}) qf.overrides[c];
  conv->add_option("--quant", qf.recipe,
                   "quantisation recipe: none, q8, q4 (experts/attention/shared/embedding q4, "
                   "lm_head q8), q2 (experts q2, rest as q4), mxfp4 (experts MXFP4, the rest as "
                   "it is: gpt-oss's own layout)");
  conv->add_option("--group", qf.group, "quantisation group size: 64 (default), 128 or 32");
  conv->add_option("--experts", qf.overrides["experts"], "override the routed experts: q8|q4|q2|mxfp4|none");
  conv->add_option("--attn", qf.overrides["attn"], "override attention and linear attention");
  conv->add_option("--shared", qf.overrides["shared"], "override the shared expert");
  conv->add_option("--dense", qf.overrides["dense"], "override dense FFN layers");
  conv->add_option("--embed", qf.overrides["embed"], "override the embedding");
  conv->add_option("--lm-head", qf.overrides["lm-head"], "override the output projection");
  return {conv, [a] { return cmd_convert(a->in, a->out, a->dtype, a->quiet, a->force, a->qf); }};
}

Command add_inspect(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto* insp = app.add_subcommand("inspect", "print a package's model, tensors and sizes");
  insp->add_option("package_dir", *dir, "package directory")->required();
  return {insp, [dir] { return cmd_inspect(*dir); }};
}

}  // namespace moeflux::cli
