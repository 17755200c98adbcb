#include "format/spec.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "util/error.h"
#include "util/json.h"

namespace moeflux {

using json = nlohmann::json;

int64_t ModelSpec::kv_floats_per_pos(AttnKind a) const {
  switch (a) {
    case AttnKind::kFull:
      return 2 * int64_t(n_kv_heads) * head_dim;
    case AttnKind::kMla:
      return int64_t(kv_lora_rank) + rope_dim;
    case AttnKind::kLinear:
      break;
  }
  return 0;
}

int ModelSpec::n_moe_layers() const {
  int n = 0;
  for (auto f : ffn) n += f == FfnKind::kMoe;
  return n;
}

const std::vector<std::string>& ModelSpec::known_archs() {
  // The normalised arch names convert and synth write (convert maps qwen3_5_moe_text onto
  // qwen3_5_moe); the runtime is arch-agnostic but refuses a name no converter produced.
  static const std::vector<std::string> archs = {"qwen3_5_moe", "qwen3_next", "qwen3_moe",
                                                 "mixtral", "deepseek_v3", "glm4_moe",
                                                 "gpt_oss"};
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
      kLinKDim{"lin_k_dim", "linear_key_head_dim"}, kLinVDim{"lin_v_dim", "linear_value_head_dim"},
      kConv{"conv_kernel", "linear_conv_kernel_dim"}, kExperts{"n_experts", "num_experts"},
      kTopK{"top_k", "num_experts_per_tok"}, kMoeFfn{"moe_ffn", "moe_intermediate_size"},
      kShared{"shared_ffn", "shared_expert_intermediate_size"},
      kDense{"dense_ffn", "intermediate_size"}, kEos{"eos_ids", "eos_token_id"},
      kBos{"bos_id", "bos_token_id"}, kArch{"arch", "model_type"},
      kQLora{"q_lora_rank", "q_lora_rank"}, kKvLora{"kv_lora_rank", "kv_lora_rank"},
      kVDim{"v_head_dim", "v_head_dim"}, kQkRope{"rope_dim", "qk_rope_head_dim"},
      kGroups{"n_group", "n_group"}, kTopkGroup{"topk_group", "topk_group"},
      kScale{"routed_scale", "routed_scaling_factor"},
      kRsFactor{"rope_scaling.factor", "rope_scaling.factor"},
      kRsOrig{"rope_scaling.orig_ctx", "rope_scaling.original_max_position_embeddings"},
      kRsBeta{"rope_scaling.beta_fast", "rope_scaling.beta_fast"},
      kSliding{"gpt_oss.sliding", "layer_types"},
      kWindow{"gpt_oss.sliding_window", "sliding_window"},
      kLimit{"gpt_oss.swiglu_limit", "swiglu_limit"}, kAlpha{"gpt_oss.swiglu_alpha", "swiglu_alpha"};
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
  bool any_full = false, any_linear = false, any_moe = false, any_dense = false, any_mla = false;
  for (size_t i = 0; i < attn.size() && i < ffn.size(); i++) {
    any_full |= attn[i] == AttnKind::kFull || attn[i] == AttnKind::kMla;
    any_mla |= attn[i] == AttnKind::kMla;
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
  if (any_mla) {
    need(rope_dim > 0 && rope_dim < head_dim && rope_dim % 2 == 0, kQkRope, rope_dim,
         fmt::format("must be even and in [2, {}) (the rope part of the q/k head dim)",
                     ref(kHeadDim, head_dim)));
    need(q_lora_rank >= 0, kQLora, q_lora_rank, "must be >= 0 (0: no q compression)");
    need(kv_lora_rank > 0, kKvLora, kv_lora_rank, "must be > 0");
    need(v_head_dim > 0, kVDim, v_head_dim, "must be > 0");
  }
  if (any_mla)
    for (size_t i = 0; i < attn.size(); i++)
      need(attn[i] != AttnKind::kFull, kAttn, fmt::format("[{}] \"full\"", i),
           "mixes full attention with MLA layers (not supported)");
  if (qkv_bias) {  // GLM-4.5: the biases belong to full (softmax) attention's q/k/v projections
    const Field kQkvBias{"qkv_bias", "attention_bias"};
    need(std::find(attn.begin(), attn.end(), AttnKind::kFull) != attn.end(), kQkvBias, "true",
         "needs full-attention layers (q/k/v biases are for full attention only)");
  }
  // YaRN: MLA layers, and gpt-oss's full/sliding layers (the session rotates both with the
  // scaled table; the other archs' converters never ask for it).
  if (rope_scaling.kind == RopeScaling::kYarn)
    need(any_mla || (any_full && arch == "gpt_oss"), kAttn, "[no MLA layer]",
         "YaRN rope scaling is implemented for MLA layers (and gpt-oss) only");
  if (!sliding.empty()) {
    need(int(sliding.size()) == n_layers, kSliding, fmt::format("[{} entries]", sliding.size()),
         fmt::format("must have one per layer ({})", ref(kLayers, n_layers)));
    for (size_t i = 0; i < sliding.size() && i < attn.size(); i++)
      need(!sliding[i] || attn[i] == AttnKind::kFull, kSliding, fmt::format("[{}]", i),
           "marks a layer sliding that is not a full-attention layer");
    need(sliding_window > 0, kWindow, sliding_window, "must be > 0 when a layer slides");
  }
  need(swiglu_limit >= 0 && std::isfinite(swiglu_limit), kLimit, swiglu_limit,
       "must be a finite number >= 0 (0: plain SwiGLU)");
  need(swiglu_limit == 0 || (swiglu_alpha > 0 && std::isfinite(swiglu_alpha)), kAlpha,
       swiglu_alpha, "must be a finite number > 0 with a swiglu_limit");
  if (any_full && rope_scaling.kind == RopeScaling::kYarn) {
    need(rope_scaling.factor > 0 && std::isfinite(rope_scaling.factor), kRsFactor,
         rope_scaling.factor, "must be a finite number > 0");
    need(rope_scaling.orig_ctx > 0, kRsOrig, rope_scaling.orig_ctx, "must be > 0");
    need(std::isfinite(rope_scaling.beta_fast) && std::isfinite(rope_scaling.beta_slow) &&
             rope_scaling.beta_fast > 0 && rope_scaling.beta_slow > 0,
         kRsBeta, rope_scaling.beta_fast, "and beta_slow must be finite numbers > 0");
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
    need(n_group >= 1 && n_experts % n_group == 0, kGroups, n_group,
         fmt::format("must divide {} into groups", ref(kExperts, n_experts)));
    need(topk_group >= 1 && topk_group <= n_group, kTopkGroup, topk_group,
         fmt::format("must be in [1, {}]", ref(kGroups, n_group)));
    need(n_group == 1 || n_experts / n_group >= 2, kGroups, n_group,
         "leaves fewer than 2 experts a group (groups are scored by their top-2 sum)");
    need(top_k <= int64_t(topk_group) * (n_experts / n_group), kTopK, top_k,
         fmt::format("is more than the experts of {} groups", ref(kTopkGroup, topk_group)));
    need(routed_scale > 0 && std::isfinite(routed_scale), kScale, routed_scale,
         "must be a finite number > 0");
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
  for (auto a : s.attn)
    attn.push_back(a == AttnKind::kFull ? "full" : a == AttnKind::kMla ? "mla" : "linear");
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
  // Written only where they differ from the defaults, so packages of the other archs keep the
  // manifest (and fingerprint) they had before these fields existed.
  if (std::find(s.attn.begin(), s.attn.end(), AttnKind::kMla) != s.attn.end())
    j["mla"] = json{{"q_lora_rank", s.q_lora_rank},
                    {"kv_lora_rank", s.kv_lora_rank},
                    {"v_head_dim", s.v_head_dim}};
  if (s.qkv_bias) j["qkv_bias"] = true;  // GLM-4.5
  if (s.rope_scaling.kind == RopeScaling::kYarn) {
    const RopeScaling& r = s.rope_scaling;
    j["rope_scaling"] = json{{"type", "yarn"},
                             {"factor", r.factor},
                             {"orig_ctx", r.orig_ctx},
                             {"beta_fast", r.beta_fast},
                             {"beta_slow", r.beta_slow},
                             {"mscale", r.mscale},
                             {"mscale_all_dim", r.mscale_all_dim},
                             {"attention_factor", r.attention_factor},
                             {"truncate", r.truncate}};
  }
  if (s.router != RouterKind::kSoftmax || s.router_bias || s.n_group != 1 || s.topk_group != 1 ||
      s.routed_scale != 1.0 || !s.shared_gate)
    j["routing"] = json{{"scoring", s.router == RouterKind::kSigmoid ? "sigmoid" : "softmax"},
                        {"bias", s.router_bias},
                        {"n_group", s.n_group},
                        {"topk_group", s.topk_group},
                        {"scale", s.routed_scale},
                        {"shared_gate", s.shared_gate}};
  if (s.has_gpt_oss_features()) {
    json sl = json::array();
    for (uint8_t v : s.sliding) sl.push_back(v != 0);
    j["gpt_oss"] = json{{"attn_bias", s.attn_bias},
                        {"attn_sinks", s.attn_sinks},
                        {"sliding_window", s.sliding_window},
                        {"sliding", sl},
                        {"router_logit_bias", s.router_logit_bias},
                        {"expert_bias", s.expert_bias},
                        {"swiglu_limit", s.swiglu_limit},
                        {"swiglu_alpha", s.swiglu_alpha}};
  }
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
    else if (a == "mla")
      s.attn.push_back(AttnKind::kMla);
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
  // Optional sections (absent: the defaults); inside one, every field is required.
  auto section = [&](const char* k) -> const json* {
    if (!j.contains(k)) return nullptr;
    if (!j[k].is_object())
      fail(ErrorKind::kFormat, "{}: model field '{}' must be an object", where, k);
    return &j[k];
  };
  auto sub = [&](const json& o, const char* sec, const char* k) -> const json& {
    if (!o.contains(k))
      fail(ErrorKind::kFormat, "{}: model field '{}.{}' is missing", where, sec, k);
    return o[k];
  };
  auto sub_num = [&](const json& o, const char* sec, const char* k) {
    const json& v = sub(o, sec, k);
    if (!v.is_number())
      fail(ErrorKind::kFormat, "{}: model field '{}.{}' must be a number", where, sec, k);
    return v.get<double>();
  };
  auto sub_int = [&](const json& o, const char* sec, const char* k) {
    const json& v = sub(o, sec, k);
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > (1ll << 30))
      fail(ErrorKind::kFormat, "{}: model field '{}.{}' must be an integer in [0, 2^30], got {}",
           where, sec, k, json_brief(v));
    return v.get<int>();
  };
  auto sub_bool = [&](const json& o, const char* sec, const char* k) {
    const json& v = sub(o, sec, k);
    if (!v.is_boolean())
      fail(ErrorKind::kFormat, "{}: model field '{}.{}' must be true or false", where, sec, k);
    return v.get<bool>();
  };
  if (j.contains("qkv_bias")) s.qkv_bias = get_bool("qkv_bias");  // GLM-4.5 (absent: false)
  if (const json* m = section("mla")) {
    s.q_lora_rank = sub_int(*m, "mla", "q_lora_rank");
    s.kv_lora_rank = sub_int(*m, "mla", "kv_lora_rank");
    s.v_head_dim = sub_int(*m, "mla", "v_head_dim");
  }
  if (const json* r = section("rope_scaling")) {
    const json& type = sub(*r, "rope_scaling", "type");
    if (type != "yarn")
      fail(ErrorKind::kFormat, "{}: model field 'rope_scaling.type' is {} (only \"yarn\")", where,
           json_brief(type));
    RopeScaling& rs = s.rope_scaling;
    rs.kind = RopeScaling::kYarn;
    rs.factor = sub_num(*r, "rope_scaling", "factor");
    rs.orig_ctx = sub_int(*r, "rope_scaling", "orig_ctx");
    rs.beta_fast = sub_num(*r, "rope_scaling", "beta_fast");
    rs.beta_slow = sub_num(*r, "rope_scaling", "beta_slow");
    rs.mscale = sub_num(*r, "rope_scaling", "mscale");
    rs.mscale_all_dim = sub_num(*r, "rope_scaling", "mscale_all_dim");
    rs.attention_factor = sub_num(*r, "rope_scaling", "attention_factor");
    rs.truncate = sub_bool(*r, "rope_scaling", "truncate");
  }
  if (const json* r = section("routing")) {
    const json& sc = sub(*r, "routing", "scoring");
    if (sc == "sigmoid")
      s.router = RouterKind::kSigmoid;
    else if (sc == "softmax")
      s.router = RouterKind::kSoftmax;
    else
      fail(ErrorKind::kFormat, "{}: model field 'routing.scoring' is {} (softmax or sigmoid)",
           where, json_brief(sc));
    s.router_bias = sub_bool(*r, "routing", "bias");
    s.n_group = sub_int(*r, "routing", "n_group");
    s.topk_group = sub_int(*r, "routing", "topk_group");
    s.routed_scale = sub_num(*r, "routing", "scale");
    s.shared_gate = sub_bool(*r, "routing", "shared_gate");
  }
  if (const json* g = section("gpt_oss")) {
    s.attn_bias = sub_bool(*g, "gpt_oss", "attn_bias");
    s.attn_sinks = sub_bool(*g, "gpt_oss", "attn_sinks");
    s.sliding_window = sub_int(*g, "gpt_oss", "sliding_window");
    const json& sl = sub(*g, "gpt_oss", "sliding");
    if (!sl.is_array())
      fail(ErrorKind::kFormat, "{}: model field 'gpt_oss.sliding' must be an array", where);
    for (const auto& v : sl) {
      if (!v.is_boolean())
        fail(ErrorKind::kFormat, "{}: model field 'gpt_oss.sliding' must hold true/false, got {}",
             where, json_brief(v));
      s.sliding.push_back(v.get<bool>() ? 1 : 0);
    }
    s.router_logit_bias = sub_bool(*g, "gpt_oss", "router_logit_bias");
    s.expert_bias = sub_bool(*g, "gpt_oss", "expert_bias");
    s.swiglu_limit = sub_num(*g, "gpt_oss", "swiglu_limit");
    s.swiglu_alpha = sub_num(*g, "gpt_oss", "swiglu_alpha");
  }
  s.validate(where, SpecNaming::kPackage);
  return s;
}

}  // namespace moeflux
