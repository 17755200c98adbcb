#include "model/spec.h"

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/json.h"

namespace moeflux {

using json = nlohmann::json;

int ModelSpec::n_moe_layers() const {
  int n = 0;
  for (auto f : ffn) n += f == FfnKind::kMoe;
  return n;
}

void ModelSpec::validate(const std::string& where) const {
  auto need = [&](bool ok, const char* field, const std::string& why) {
    if (!ok) fail(ErrorKind::kFormat, "{}: field '{}': {}", where, field, why);
  };
  need(vocab_size > 0, "vocab_size", "must be positive");
  need(hidden_size > 0, "hidden_size", "must be positive");
  need(n_layers > 0, "num_hidden_layers", "must be positive");
  need(int(attn.size()) == n_layers, "layer_types",
       fmt::format("has {} entries for {} layers", attn.size(), n_layers));
  need(int(ffn.size()) == n_layers, "ffn", "one entry per layer");
  need(rms_eps > 0, "rms_norm_eps", "must be positive");
  bool any_full = false, any_linear = false, any_moe = false, any_dense = false;
  for (int i = 0; i < n_layers; i++) {
    any_full |= attn[i] == AttnKind::kFull;
    any_linear |= attn[i] == AttnKind::kLinear;
    any_moe |= ffn[i] == FfnKind::kMoe;
    any_dense |= ffn[i] == FfnKind::kDense;
  }
  if (any_full) {
    need(n_heads > 0, "num_attention_heads", "must be positive");
    need(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "num_key_value_heads",
         fmt::format("{} does not divide num_attention_heads {}", n_kv_heads, n_heads));
    need(head_dim > 0, "head_dim", "must be positive");
    need(rope_dim >= 0 && rope_dim <= head_dim && rope_dim % 2 == 0, "partial_rotary_factor",
         fmt::format("rotary dims {} must be even and at most head_dim {}", rope_dim, head_dim));
    need(rope_theta > 0, "rope_theta", "must be positive");
  }
  if (any_linear) {
    need(lin_k_heads > 0, "linear_num_key_heads", "must be positive");
    need(lin_v_heads > 0 && lin_v_heads % lin_k_heads == 0, "linear_num_value_heads",
         fmt::format("{} is not a multiple of linear_num_key_heads {}", lin_v_heads,
                     lin_k_heads));
    need(lin_k_dim > 0, "linear_key_head_dim", "must be positive");
    need(lin_v_dim > 0, "linear_value_head_dim", "must be positive");
    need(conv_kernel > 0, "linear_conv_kernel_dim", "must be positive");
  }
  if (any_moe) {
    need(n_experts > 0, "num_experts", "must be positive");
    need(top_k > 0 && top_k <= n_experts, "num_experts_per_tok",
         fmt::format("{} must be in [1, num_experts={}]", top_k, n_experts));
    need(moe_ffn > 0, "moe_intermediate_size", "must be positive");
    need(shared_ffn >= 0, "shared_expert_intermediate_size", "must not be negative");
  }
  if (any_dense) need(dense_ffn > 0, "intermediate_size", "must be positive for dense layers");
  for (int id : eos_ids)
    need(id >= 0 && id < vocab_size, "eos_token_id",
         fmt::format("{} is outside the vocabulary [0, {})", id, vocab_size));
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
  s.validate(where);
  return s;
}

}  // namespace moeflux
