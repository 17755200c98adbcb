#include "format/hf_config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"

namespace moeflux {

using json = nlohmann::json;

namespace {

json parse_json_file(const std::string& path) {
  return parse_json(read_text_file(path), path);
}

// Field access on one config object with errors that name the file and the field.
struct Fields {
  const json& j;
  std::string where;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t get_int(const char* k) const {
    if (!has(k)) fail(ErrorKind::kFormat, "{}: missing field '{}'", where, k);
    const json& v = j[k];
    if (!v.is_number_integer())
      fail(ErrorKind::kFormat, "{}: field '{}' must be an integer, got {}", where, k,
           json_brief(v));
    return v.get<int64_t>();
  }
  int get_size(const char* k) const {
    int64_t v = get_int(k);
    if (v < 0 || v > (1ll << 30))
      fail(ErrorKind::kFormat, "{}: field '{}' = {} is out of range", where, k, v);
    return int(v);
  }
  int get_size_or(const char* k, int def) const { return has(k) ? get_size(k) : def; }
  double get_num_or(const char* k, double def) const {
    if (!has(k)) return def;
    if (!j[k].is_number())
      fail(ErrorKind::kFormat, "{}: field '{}' must be a number, got {}", where, k,
           json_brief(j[k]));
    return j[k].get<double>();
  }
  bool get_bool_or(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean())
      fail(ErrorKind::kFormat, "{}: field '{}' must be true or false, got {}", where, k,
           json_brief(j[k]));
    return j[k].get<bool>();
  }
  std::string get_str_or(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string())
      fail(ErrorKind::kFormat, "{}: field '{}' must be a string, got {}", where, k,
           json_brief(j[k]));
    return j[k].get<std::string>();
  }
};

void add_ids(const json& v, std::vector<int>* out, const std::string& where, const char* k) {
  if (v.is_null()) return;
  auto add = [&](const json& x) {
    if (!x.is_number_integer())
      fail(ErrorKind::kFormat, "{}: field '{}' must hold token ids, got {}", where, k,
           json_brief(x));
    int id = x.get<int>();
    for (int e : *out)
      if (e == id) return;
    out->push_back(id);
  };
  if (v.is_array()) {
    for (const auto& x : v) add(x);
  } else {
    add(v);
  }
}

// GLM-4.5 (transformers' Glm4MoeConfig, Glm4MoeAttention, Glm4MoeMoE), the fields beyond the
// common ones; absent fields take Glm4MoeConfig's defaults. Attention: q/k/v biases when
// attention_bias, q_norm/k_norm (RMSNorm over each head, eps rms_norm_eps) when use_qk_norm,
// RoPE rotate-half on the first int(head_dim * partial_rotary_factor) dims of each head.
// Routing is DeepSeek-V3's (Glm4MoeMoE.route_tokens_to_experts): sigmoid scores, the
// e_score_correction_bias for the choice only, group-limited top-k, weights renormalised when
// norm_topk_prob, times routed_scaling_factor; n_shared_experts ungated shared experts.
void read_glm4_moe(const Fields& f, ModelSpec* s) {
  s->qkv_bias = f.get_bool_or("attention_bias", false);
  s->qk_norm = f.get_bool_or("use_qk_norm", false);
  s->router = RouterKind::kSigmoid;
  s->router_bias = true;
  s->norm_topk_prob = f.get_bool_or("norm_topk_prob", true);
  s->n_group = f.get_size_or("n_group", 1);
  s->topk_group = f.get_size_or("topk_group", 1);
  s->routed_scale = f.get_num_or("routed_scaling_factor", 1.0);
  s->shared_ffn = f.get_size_or("n_shared_experts", 1) * s->moe_ffn;
  s->shared_gate = false;
}

// gpt-oss (GptOssConfig): attention biases and sinks, sliding layers (layer_types
// "sliding_attention", sliding_window), the router's logit bias, per-expert biases and the
// clamped SwiGLU (swiglu_limit, swiglu_alpha; transformers' defaults 7.0 and 1.702).
void read_gpt_oss_fields(const Fields& f, const json& cfg, ModelSpec& s) {
  s.attn_bias = f.get_bool_or("attention_bias", true);
  s.attn_sinks = true;
  s.router_logit_bias = true;
  s.expert_bias = true;
  s.swiglu_limit = f.get_num_or("swiglu_limit", 7.0);
  s.swiglu_alpha = f.get_num_or("swiglu_alpha", 1.702);
  std::vector<uint8_t> sliding;
  if (f.has("layer_types")) {
    for (const auto& t : cfg["layer_types"]) sliding.push_back(t == "sliding_attention" ? 1 : 0);
  } else {  // GptOssConfig's default: sliding, full, sliding, full, ...
    for (int i = 0; i < s.n_layers; i++) sliding.push_back((i + 1) % 2 ? 1 : 0);
  }
  if (std::find(sliding.begin(), sliding.end(), 1) != sliding.end()) {
    if (!f.has("sliding_window"))
      fail(ErrorKind::kFormat, "{}: sliding_attention layers but no field 'sliding_window'",
           f.where);
    s.sliding_window = f.get_size("sliding_window");
    if (s.sliding_window <= 0)
      fail(ErrorKind::kFormat, "{}: field 'sliding_window' must be > 0, got {}", f.where,
           s.sliding_window);
    s.sliding = std::move(sliding);
  }
}

}  // namespace

HfConfig read_hf_config(const std::string& dir) {
  const std::string path = dir + "/config.json";
  const json root = parse_json_file(path);
  if (!root.is_object()) fail(ErrorKind::kFormat, "{}: not a JSON object", path);
  HfConfig out;
  Fields top{root, path};
  out.model_type = top.get_str_or("model_type", "");
  if (out.model_type.empty()) fail(ErrorKind::kFormat, "{}: missing field 'model_type'", path);

  static const std::set<std::string> kSupported = {"qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next",
                                                   "qwen3_moe",   "mixtral",          "deepseek_v3",
                                                   "kimi_k2",     "glm4_moe",         "gpt_oss"};
  if (!kSupported.count(out.model_type))
    fail(ErrorKind::kUnsupported,
         "{}: model_type '{}' is not supported (supported: qwen3_5_moe, qwen3_5_moe_text, "
         "qwen3_next, qwen3_moe, mixtral, deepseek_v3, kimi_k2, glm4_moe, gpt_oss)",
         path, out.model_type);

  if (top.has("quantization_config")) {
    const json& q = root["quantization_config"];
    if (!q.is_object())
      fail(ErrorKind::kFormat, "{}: field 'quantization_config' must be an object", path);
    Fields qf{q, path + " quantization_config"};
    const std::string method = qf.get_str_or("quant_method", "");
    if (method == "fp8") {
      if (qf.get_str_or("fmt", "e4m3") != "e4m3")
        fail(ErrorKind::kUnsupported, "{}: fp8 format '{}' is not supported (only e4m3)", qf.where,
             qf.get_str_or("fmt", ""));
      out.fp8 = true;
      if (qf.has("weight_block_size")) {
        const json& b = q["weight_block_size"];
        if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() ||
            !b[1].is_number_integer() || b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1 ||
            b[0].get<int64_t>() > (1 << 20) || b[1].get<int64_t>() > (1 << 20))
          fail(ErrorKind::kFormat,
               "{}: field 'weight_block_size' must be two positive sizes, got {}", qf.where,
               json_brief(b));
        out.fp8_block[0] = b[0].get<int>();
        out.fp8_block[1] = b[1].get<int>();
      }
    } else if (method == "mxfp4" && out.model_type == "gpt_oss") {
      // gpt-oss: the experts in MXFP4 (modules_to_not_convert names the rest, which is bf16).
      out.mxfp4 = true;
    } else {
      fail(ErrorKind::kUnsupported,
           "{}: quantization_config quant_method '{}' is not supported "
           "(fp8 block-quantised checkpoints are, and gpt-oss's mxfp4; MLX checkpoints use "
           "'quantization')",
           qf.where, method);
    }
  }

  const json* cfg = &root;
  std::string where = path;
  if (out.model_type == "qwen3_5_moe" && root.contains("text_config")) {
    if (!root["text_config"].is_object())
      fail(ErrorKind::kFormat, "{}: field 'text_config' must be an object", path);
    cfg = &root["text_config"];
    where = path + " (text_config)";
    out.nested_text_config = true;
  }
  Fields f{*cfg, where};
  ModelSpec& s = out.spec;
  const std::string& mt = out.model_type;
  const bool qwen35 = mt == "qwen3_5_moe" || mt == "qwen3_5_moe_text";
  const bool next = mt == "qwen3_next";
  const bool hybrid = qwen35 || next;
  // Kimi K2 is the DeepSeek-V3 architecture (DeepseekV3ForCausalLM) under its own model_type.
  const bool ds = mt == "deepseek_v3" || mt == "kimi_k2";
  // GLM-4.5 / 4.5-Air (Glm4MoeForCausalLM): GQA attention with q/k/v biases, optional q/k norm,
  // partial rotary; DeepSeek-V3's routing (read_glm4_moe below).
  const bool glm = mt == "glm4_moe";
  const bool oss = mt == "gpt_oss";
  s.arch = qwen35 ? "qwen3_5_moe" : ds ? "deepseek_v3" : mt;
  out.norm_one_plus = hybrid;
  out.source_dtype = f.get_str_or("dtype", f.get_str_or("torch_dtype", top.get_str_or("dtype", "")));

  if (f.get_str_or("hidden_act", "silu") != "silu")
    fail(ErrorKind::kUnsupported, "{}: hidden_act '{}' is not supported (only silu)", where,
         f.get_str_or("hidden_act", ""));
  if (!glm && !oss && f.get_bool_or("attention_bias", false))
    fail(ErrorKind::kUnsupported, "{}: attention_bias = true is not supported", where);
  if (!oss && f.has("sliding_window") &&
      (mt == "mixtral" || f.get_bool_or("use_sliding_window", false)))
    fail(ErrorKind::kUnsupported,
         "{}: sliding-window attention (sliding_window = {}) is not supported", where,
         json_brief((*cfg)["sliding_window"]));

  s.vocab_size = f.get_size("vocab_size");
  s.hidden_size = f.get_size("hidden_size");
  s.n_layers = f.get_size("num_hidden_layers");
  s.rms_eps = float(f.get_num_or("rms_norm_eps", 1e-6));
  s.ctx_train = f.get_size_or("max_position_embeddings", 4096);

  // Layer kinds: layer_types when present (never assume a pattern when the file gives one).
  if (f.has("layer_types")) {
    const json& lt = (*cfg)["layer_types"];
    if (!lt.is_array() || int(lt.size()) != s.n_layers)
      fail(ErrorKind::kFormat,
           "{}: field 'layer_types' must list {} layer kinds (num_hidden_layers), got {}", where,
           s.n_layers, lt.is_array() ? fmt::format("{} entries", lt.size()) : json_brief(lt));
    for (size_t i = 0; i < lt.size(); i++) {
      if (lt[i] == "full_attention") s.attn.push_back(AttnKind::kFull);
      else if (lt[i] == "linear_attention" && hybrid) s.attn.push_back(AttnKind::kLinear);
      else if (lt[i] == "sliding_attention" && oss) s.attn.push_back(AttnKind::kFull);
      else
        fail(ErrorKind::kUnsupported, "{}: layer_types[{}] = {} is not supported for {}", where, i,
             json_brief(lt[i]), mt);
    }
  } else if (hybrid) {
    int interval = f.get_size_or("full_attention_interval", 4);
    if (interval <= 0)
      fail(ErrorKind::kFormat, "{}: field 'full_attention_interval' must be positive", where);
    for (int i = 0; i < s.n_layers; i++)
      s.attn.push_back((i + 1) % interval == 0 ? AttnKind::kFull : AttnKind::kLinear);
  } else {
    s.attn.assign(size_t(s.n_layers), ds ? AttnKind::kMla : AttnKind::kFull);
  }

  // Attention.
  s.n_heads = f.get_size("num_attention_heads");
  s.n_kv_heads = f.get_size_or("num_key_value_heads", s.n_heads);
  s.head_dim = f.get_size_or("head_dim", s.n_heads ? s.hidden_size / s.n_heads : 0);
  s.attn_output_gate = hybrid;
  s.qk_norm = mt != "mixtral" && !ds && !glm && !oss;
  if (oss) read_gpt_oss_fields(f, *cfg, s);
  if (ds) {
    // MLA: the q/k head is [nope | rope] (HF's config.head_dim is qk_rope_head_dim, not this).
    s.q_lora_rank = f.has("q_lora_rank") ? f.get_size("q_lora_rank") : 0;  // null: q_proj
    s.kv_lora_rank = f.get_size("kv_lora_rank");
    s.v_head_dim = f.get_size("v_head_dim");
    s.rope_dim = f.get_size("qk_rope_head_dim");
    s.head_dim = f.get_size("qk_nope_head_dim") + s.rope_dim;
    out.rope_interleave = f.get_bool_or("rope_interleave", true);
  }
  const json* rope = f.has("rope_parameters") ? &(*cfg)["rope_parameters"]
                     : f.has("rope_scaling")  ? &(*cfg)["rope_scaling"]
                                              : nullptr;
  double theta = f.get_num_or("rope_theta", 10000.0);
  // Glm4MoeConfig defaults partial_rotary_factor to 0.5 (its __post_init__); the others to 1.
  double partial = f.get_num_or("partial_rotary_factor", glm ? 0.5 : 1.0);
  if (rope) {
    if (!rope->is_object())
      fail(ErrorKind::kFormat, "{}: field 'rope_parameters' must be an object", where);
    const std::string rname = f.has("rope_parameters") ? "rope_parameters" : "rope_scaling";
    Fields r{*rope, where + " " + rname};
    theta = r.get_num_or("rope_theta", theta);
    partial = r.get_num_or("partial_rotary_factor", partial);
    std::string type = r.get_str_or("rope_type", r.get_str_or("type", "default"));
    if (type == "yarn" && (ds || oss)) {
      RopeScaling& rs = s.rope_scaling;
      rs.kind = RopeScaling::kYarn;
      rs.factor = r.get_num_or("factor", 0);
      if (!r.has("factor")) fail(ErrorKind::kFormat, "{}: yarn {} has no 'factor'", where, rname);
      rs.orig_ctx = r.get_size("original_max_position_embeddings");
      // As HF: a missing or zero beta takes the paper's default (`or 32`, `or 1`).
      rs.beta_fast = r.get_num_or("beta_fast", 0) != 0 ? r.get_num_or("beta_fast", 0) : 32.0;
      rs.beta_slow = r.get_num_or("beta_slow", 0) != 0 ? r.get_num_or("beta_slow", 0) : 1.0;
      rs.mscale = r.get_num_or("mscale", 0);
      rs.mscale_all_dim = r.get_num_or("mscale_all_dim", 0);
      rs.attention_factor = r.get_num_or("attention_factor", 0);
      rs.truncate = r.get_bool_or("truncate", true);
    } else if (type != "default") {
      fail(ErrorKind::kUnsupported, "{}: rope_type '{}' is not supported (only default{})", where,
           type, ds || oss ? " and yarn" : "");
    }
  }
  s.rope_theta = theta;
  if (!(partial > 0 && partial <= 1))
    fail(ErrorKind::kFormat, "{}: partial_rotary_factor {} must be in (0, 1]", where, partial);
  if (ds && partial != 1)
    fail(ErrorKind::kUnsupported,
         "{}: partial_rotary_factor {} with MLA (qk_rope_head_dim is "
         "the rotated part)",
         where, partial);
  if (!ds) s.rope_dim = int(s.head_dim * partial);  // as HF: int(head_dim * factor)

  // Linear attention.
  if (hybrid) {
    s.lin_k_heads = f.get_size("linear_num_key_heads");
    s.lin_v_heads = f.get_size("linear_num_value_heads");
    s.lin_k_dim = f.get_size("linear_key_head_dim");
    s.lin_v_dim = f.get_size("linear_value_head_dim");
    s.conv_kernel = f.get_size("linear_conv_kernel_dim");
  }

  // Feed-forward.
  // Expert count: transformers 5 writes num_local_experts for qwen3_moe too.
  s.n_experts = glm ? (f.has("num_local_experts") && !f.has("n_routed_experts")
                           ? f.get_size("num_local_experts")
                           : f.get_size("n_routed_experts"))
                : ds                   ? (f.has("n_routed_experts") ? f.get_size("n_routed_experts")
                                                                    : f.get_size("num_local_experts"))
                : f.has("num_experts") ? f.get_size("num_experts")
                                       : f.get_size("num_local_experts");
  s.moe_ffn = mt == "mixtral" || oss ? f.get_size("intermediate_size")
                                     : f.get_size("moe_intermediate_size");
  s.top_k = f.get_size("num_experts_per_tok");
  // gpt-oss: softmax over the k chosen logits, which is the renormalised top-k of the softmax.
  s.norm_topk_prob = (qwen35 || mt == "mixtral" || oss) ? true : f.get_bool_or("norm_topk_prob", next);
  if (hybrid) s.shared_ffn = f.get_size("shared_expert_intermediate_size");
  if (ds) {
    // DeepseekV3TopkRouter + DeepseekV3MoE.route_tokens_to_experts: sigmoid scores, the
    // e_score_correction_bias for the choice, group-limited top-k, weights x scaling factor;
    // n_shared_experts ungated shared experts fused into one of n x moe_intermediate_size.
    const std::string scoring = f.get_str_or("scoring_func", "sigmoid");
    if (scoring != "sigmoid")
      fail(ErrorKind::kUnsupported, "{}: scoring_func '{}' is not supported (only sigmoid)", where,
           scoring);
    const std::string method = f.get_str_or("topk_method", "noaux_tc");
    if (method != "noaux_tc")
      fail(ErrorKind::kUnsupported, "{}: topk_method '{}' is not supported (only noaux_tc)", where,
           method);
    s.router = RouterKind::kSigmoid;
    s.router_bias = true;
    s.norm_topk_prob = f.get_bool_or("norm_topk_prob", true);
    s.n_group = f.get_size_or("n_group", 1);
    s.topk_group = f.get_size_or("topk_group", 1);
    s.routed_scale = f.get_num_or("routed_scaling_factor", 1.0);
    s.shared_ffn = f.get_size_or("n_shared_experts", 0) * s.moe_ffn;
    s.shared_gate = false;
  }
  if (glm) read_glm4_moe(f, &s);
  std::vector<int> mlp_only;
  int sparse_step = 1;
  if (mt == "qwen3_moe" || next) {
    if (f.has("mlp_only_layers")) add_ids((*cfg)["mlp_only_layers"], &mlp_only, where, "mlp_only_layers");
    sparse_step = f.get_size_or("decoder_sparse_step", 1);
    if (sparse_step <= 0)
      fail(ErrorKind::kFormat, "{}: field 'decoder_sparse_step' must be positive", where);
  }
  // Glm4MoeConfig's default is 1 dense layer; DeepSeek's reader has always taken 0.
  const int first_dense = ds    ? f.get_size_or("first_k_dense_replace", 0)
                          : glm ? f.get_size_or("first_k_dense_replace", 1)
                                : 0;
  for (int i = 0; i < s.n_layers; i++) {
    bool dense = std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end() ||
                 s.n_experts == 0 || (i + 1) % sparse_step != 0 || i < first_dense;
    s.ffn.push_back(dense ? FfnKind::kDense : FfnKind::kMoe);
  }
  if (s.n_moe_layers() < s.n_layers) s.dense_ffn = f.get_size("intermediate_size");

  s.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool_or("tie_word_embeddings", false)
                                                  : top.get_bool_or("tie_word_embeddings", false);

  // Special ids: config (text_config first, then top level), then generation_config.json.
  if (f.has("eos_token_id")) add_ids((*cfg)["eos_token_id"], &s.eos_ids, where, "eos_token_id");
  if (top.has("eos_token_id")) add_ids(root["eos_token_id"], &s.eos_ids, path, "eos_token_id");
  std::vector<int> bos;
  if (f.has("bos_token_id")) add_ids((*cfg)["bos_token_id"], &bos, where, "bos_token_id");
  const std::string gen_path = dir + "/generation_config.json";
  if (file_exists(gen_path)) {
    const json gen = parse_json_file(gen_path);
    if (gen.is_object()) {
      if (gen.contains("eos_token_id"))
        add_ids(gen["eos_token_id"], &s.eos_ids, gen_path, "eos_token_id");
      if (gen.contains("bos_token_id") && bos.empty())
        add_ids(gen["bos_token_id"], &bos, gen_path, "bos_token_id");
    }
  }
  s.bos_id = bos.empty() ? -1 : bos[0];
  s.validate(where, SpecNaming::kHfConfig);
  return out;
}

}  // namespace moeflux
