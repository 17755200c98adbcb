#include "format/spec.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "util/error.h"
#include "util/json.h"

namespace moeflux {

using json = nlohmann::json;

int ModelSpec::n_moe_layers() const {
  int n = 0;
  for (auto f : ffn) n += f == FfnKind::kMoe;
  return n;
}

const std::vector<std::string>& ModelSpec::known_archs() {
  // The normalised arch names convert and synth write (convert maps qwen3_5_moe_text onto
  // qwen3_5_moe); the runtime is arch-agnostic but refuses a name no converter produced.
  static const std::vector<std::string> archs = {"qwen3_5_moe", "qwen3_next", "qwen3_moe",
                                                 "mixtral"};
  return archs;
}

void ModelSpec::validate(const std::string& where, SpecNaming naming) const {
  // Each field under its name in the file being read: moeflux.json's "model" object, or the
  // HF config.json it was converted from.
  struct Field {
    const char* pkg;
    const char* hf;
  };
  auto name = [&](Field f) {
    return naming == SpecNaming::kPackage ? fmt::format("model.{}", f.pkg)
                                          : fmt::format("field '{}'", f.hf);
  };
  // Another field quoted in a message: "model.n_heads = 4" / "num_attention_heads 4".
  auto ref = [&](Field f, const auto& value) {
    return naming == SpecNaming::kPackage ? fmt::format("model.{} = {}", f.pkg, value)
                                          : fmt::format("{} {}", f.hf, value);
  };
  auto need = [&](bool ok, Field f, const auto& value, const std::string& why) {
    if (!ok) fail(ErrorKind::kFormat, "{}: {} = {} {}", where, name(f), value, why);
  };
  const Field kVocab{"vocab_size", "vocab_size"}, kHidden{"hidden_size", "hidden_size"},
      kLayers{"n_layers", "num_hidden_layers"}, kAttn{"attn", "layer_types"},
      kFfn{"ffn", "mlp_only_layers"}, kEps{"rms_eps", "rms_norm_eps"},
      kCtx{"ctx_train", "max_position_embeddings"}, kHeads{"n_heads", "num_attention_heads"},
      kKvHeads{"n_kv_heads", "num_key_value_heads"}, kHeadDim{"head_dim", "head_dim"},
      kRopeDim{"rope_dim", "partial_rotary_factor"}, kTheta{"rope_theta", "rope_theta"},
      kLinK{"lin_k_heads", "linear_num_key_heads"}, kLinV{"lin_v_heads", "linear_num_value_heads"},
      kLinKDim{"lin_k_dim", "linear_key_head_dim"},
      kLinVDim{"lin_v_dim", "linear_value_head_dim"},
      kConv{"conv_kernel", "linear_conv_kernel_dim"}, kExperts{"n_experts", "num_experts"},
      kTopK{"top_k", "num_experts_per_tok"}, kMoeFfn{"moe_ffn", "moe_intermediate_size"},
      kShared{"shared_ffn", "shared_expert_intermediate_size"},
      kDense{"dense_ffn", "intermediate_size"}, kEos{"eos_ids", "eos_token_id"},
      kBos{"bos_id", "bos_token_id"}, kArch{"arch", "model_type"};
  const auto& archs = known_archs();
  need(std::find(archs.begin(), archs.end(), arch) != archs.end(), kArch,
       fmt::format("\"{}\"", arch),
       fmt::format("is not a known arch ({})", fmt::join(archs, ", ")));
  need(vocab_size > 0, kVocab, vocab_size, "must be > 0");
  need(hidden_size > 0, kHidden, hidden_size, "must be > 0");
  need(n_layers > 0, kLayers, n_layers, "must be > 0");
  need(int(attn.size()) == n_layers, kAttn, fmt::format("[{} entries]", attn.size()),
       fmt::format("must have one per layer ({})", ref(kLayers, n_layers)));
  need(int(ffn.size()) == n_layers, kFfn, fmt::format("[{} entries]", ffn.size()),
       fmt::format("must have one per layer ({})", ref(kLayers, n_layers)));
  need(rms_eps > 0 && std::isfinite(rms_eps), kEps, rms_eps, "must be a finite number > 0");
  need(ctx_train > 0, kCtx, ctx_train, "must be > 0");
  bool any_full = false, any_linear = false, any_moe = false, any_dense = false;
  for (size_t i = 0; i < attn.size() && i < ffn.size(); i++) {
    any_full |= attn[i] == AttnKind::kFull;
    any_linear |= attn[i] == AttnKind::kLinear;
    any_moe |= ffn[i] == FfnKind::kMoe;
    any_dense |= ffn[i] == FfnKind::kDense;
  }
  if (any_full) {
    need(n_heads > 0, kHeads, n_heads, "must be > 0");
    need(n_kv_heads > 0 && n_heads % n_kv_heads == 0, kKvHeads, n_kv_heads,
         fmt::format("does not divide {}", ref(kHeads, n_heads)));
    need(head_dim > 0, kHeadDim, head_dim, "must be > 0");
    need(rope_dim >= 0 && rope_dim <= head_dim && rope_dim % 2 == 0, kRopeDim, rope_dim,
         fmt::format("(rotary dims) must be even and at most {}", ref(kHeadDim, head_dim)));
    need(rope_theta > 0 && std::isfinite(rope_theta), kTheta, rope_theta,
         "must be a finite number > 0");
  }
  if (any_linear) {
    need(lin_k_heads > 0, kLinK, lin_k_heads, "must be > 0");
    need(lin_v_heads > 0 && lin_v_heads % lin_k_heads == 0, kLinV, lin_v_heads,
         fmt::format("is not a multiple of {}", ref(kLinK, lin_k_heads)));
    need(lin_k_dim > 0, kLinKDim, lin_k_dim, "must be > 0");
    need(lin_v_dim > 0, kLinVDim, lin_v_dim, "must be > 0");
    need(conv_kernel > 0, kConv, conv_kernel, "must be > 0");
  }
  if (any_moe) {
    need(n_experts > 0, kExperts, n_experts, "must be > 0");
    need(top_k > 0 && top_k <= n_experts, kTopK, top_k,
         fmt::format("must be in [1, {}]", naming == SpecNaming::kPackage
                                               ? fmt::format("{} = {}", name(kExperts), n_experts)
                                               : fmt::format("num_experts={}", n_experts)));
    need(moe_ffn > 0, kMoeFfn, moe_ffn, "must be > 0");
    need(shared_ffn >= 0, kShared, shared_ffn, "must be >= 0 (0: no shared expert)");
  }
  if (any_dense) need(dense_ffn > 0, kDense, dense_ffn, "must be > 0 for dense layers");
  for (int id : eos_ids)
    need(id >= 0 && id < vocab_size, kEos, id,
         fmt::format("is outside the vocabulary [0, {})", vocab_size));
  need(bos_id >= -1 && bos_id < vocab_size, kBos, bos_id,
       fmt::format("is outside the vocabulary [0, {}) (-1: none)", vocab_size));
}

void to_json(json& j, const ModelSpec& s) {
  json attn = json::array(), ffn = json::array();
  for (auto a : s.attn) attn.push_back(a == AttnKind::kFull ? "full" : "linear");
  for (auto f : s.ffn) ffn.push_back(f == FfnKind::kMoe ? "moe" : "dense");
  j = json{{"arch", s.arch},
           {"vocab_size", s.vocab_size},
           {"hidden_size", s.hidden_size},
           {"n_layers", s.n_layers},
           {"attn", attn},
           {"ffn", ffn},
           {"rms_eps", s.rms_eps},
           {"n_heads", s.n_heads},
           {"n_kv_heads", s.n_kv_heads},
           {"head_dim", s.head_dim},
           {"attn_output_gate", s.attn_output_gate},
           {"qk_norm", s.qk_norm},
           {"rope_dim", s.rope_dim},
           {"rope_theta", s.rope_theta},
           {"lin_k_heads", s.lin_k_heads},
           {"lin_v_heads", s.lin_v_heads},
           {"lin_k_dim", s.lin_k_dim},
           {"lin_v_dim", s.lin_v_dim},
           {"conv_kernel", s.conv_kernel},
           {"n_experts", s.n_experts},
           {"top_k", s.top_k},
           {"moe_ffn", s.moe_ffn},
           {"norm_topk_prob", s.norm_topk_prob},
           {"shared_ffn", s.shared_ffn},
           {"dense_ffn", s.dense_ffn},
           {"tie_embeddings", s.tie_embeddings},
           {"ctx_train", s.ctx_train},
           {"eos_ids", s.eos_ids},
           {"bos_id", s.bos_id}};
}

ModelSpec spec_from_json(const json& j, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::kFormat, "{}: 'model' is not an object", where);
  auto field = [&](const char* k) -> const json& {
    if (!j.contains(k)) fail(ErrorKind::kFormat, "{}: model field '{}' is missing", where, k);
    return j[k];
  };
  auto get_int = [&](const char* k) {
    const json& v = field(k);
    if (!v.is_number_integer() || v.get<int64_t>() < -1 || v.get<int64_t>() > (1ll << 31) - 1)
      fail(ErrorKind::kFormat, "{}: model field '{}' must be an integer, got {}", where, k,
           json_brief(v));
    return v.get<int>();
  };
  auto get_num = [&](const char* k) {
    const json& v = field(k);
    if (!v.is_number()) fail(ErrorKind::kFormat, "{}: model field '{}' must be a number", where, k);
    return v.get<double>();
  };
  auto get_bool = [&](const char* k) {
    const json& v = field(k);
    if (!v.is_boolean())
      fail(ErrorKind::kFormat, "{}: model field '{}' must be true or false", where, k);
    return v.get<bool>();
  };
  ModelSpec s;
  const json& arch = field("arch");
  if (!arch.is_string()) fail(ErrorKind::kFormat, "{}: model field 'arch' must be a string", where);
  s.arch = arch.get<std::string>();
  s.vocab_size = get_int("vocab_size");
  s.hidden_size = get_int("hidden_size");
  s.n_layers = get_int("n_layers");
  for (const auto& a : field("attn")) {
    if (a == "full") s.attn.push_back(AttnKind::kFull);
    else if (a == "linear") s.attn.push_back(AttnKind::kLinear);
    else
      fail(ErrorKind::kFormat, "{}: model field 'attn' has unknown kind {}", where, json_brief(a));
  }
  for (const auto& f : field("ffn")) {
    if (f == "moe") s.ffn.push_back(FfnKind::kMoe);
    else if (f == "dense") s.ffn.push_back(FfnKind::kDense);
    else
      fail(ErrorKind::kFormat, "{}: model field 'ffn' has unknown kind {}", where, json_brief(f));
  }
  s.rms_eps = float(get_num("rms_eps"));
  s.n_heads = get_int("n_heads");
  s.n_kv_heads = get_int("n_kv_heads");
  s.head_dim = get_int("head_dim");
  s.attn_output_gate = get_bool("attn_output_gate");
  s.qk_norm = get_bool("qk_norm");
  s.rope_dim = get_int("rope_dim");
  s.rope_theta = get_num("rope_theta");
  s.lin_k_heads = get_int("lin_k_heads");
  s.lin_v_heads = get_int("lin_v_heads");
  s.lin_k_dim = get_int("lin_k_dim");
  s.lin_v_dim = get_int("lin_v_dim");
  s.conv_kernel = get_int("conv_kernel");
  s.n_experts = get_int("n_experts");
  s.top_k = get_int("top_k");
  s.moe_ffn = get_int("moe_ffn");
  s.norm_topk_prob = get_bool("norm_topk_prob");
  s.shared_ffn = get_int("shared_ffn");
  s.dense_ffn = get_int("dense_ffn");
  s.tie_embeddings = get_bool("tie_embeddings");
  s.ctx_train = get_int("ctx_train");
  for (const auto& e : field("eos_ids")) {
    if (!e.is_number_integer())
      fail(ErrorKind::kFormat, "{}: model field 'eos_ids' must hold integers", where);
    s.eos_ids.push_back(e.get<int>());
  }
  s.bos_id = get_int("bos_id");
  s.validate(where, SpecNaming::kPackage);
  return s;
}

}  // namespace moeflux
