// ModelSpec: the normalised model configuration. The converter derives it from a Hugging Face
// config.json (format/hf_config.h); the package stores it in moeflux.json; every shape the
// engine uses comes from here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moeflux {

enum class AttnKind : uint8_t { kLinear, kFull };  // Gated DeltaNet | softmax attention
enum class FfnKind : uint8_t { kMoe, kDense };

// Which file a spec came from, so validation errors name that file's own fields.
enum class SpecNaming {
  kPackage,   // moeflux.json: "model.ctx_train"
  kHfConfig,  // HF config.json: "max_position_embeddings"
};

struct ModelSpec {
  std::string arch;  // qwen3_5_moe | qwen3_next | qwen3_moe | mixtral
  int vocab_size = 0;
  int hidden_size = 0;
  int n_layers = 0;
  std::vector<AttnKind> attn;  // [n_layers]
  std::vector<FfnKind> ffn;    // [n_layers]
  float rms_eps = 1e-6f;

  // Full attention. q has n_heads*head_dim rows, or twice that with an output gate
  // (per head: head_dim query rows then head_dim gate rows).
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  bool attn_output_gate = false;
  bool qk_norm = false;
  int rope_dim = 0;  // leading dims of each head that RoPE rotates (rotate-half)
  double rope_theta = 10000.0;

  // Linear attention (Gated DeltaNet); k-heads are shared by lin_v_heads/lin_k_heads v-heads.
  int lin_k_heads = 0, lin_v_heads = 0, lin_k_dim = 0, lin_v_dim = 0, conv_kernel = 0;

  // Routed experts: softmax over n_experts, top_k, renormalised when norm_topk_prob.
  int n_experts = 0, top_k = 0, moe_ffn = 0;
  bool norm_topk_prob = true;
  int shared_ffn = 0;  // shared expert intermediate size (0: none); gated by sigmoid(w.x)
  int dense_ffn = 0;   // intermediate size of FfnKind::kDense layers

  bool tie_embeddings = false;
  int ctx_train = 0;
  std::vector<int> eos_ids;
  int bos_id = -1;

  int lin_qkv_dim() const { return 2 * lin_k_heads * lin_k_dim + lin_v_heads * lin_v_dim; }
  int lin_value_dim() const { return lin_v_heads * lin_v_dim; }
  int q_rows() const { return n_heads * head_dim * (attn_output_gate ? 2 : 1); }
  int n_moe_layers() const;

  // Throws Error(kFormat) naming `where` and the field when a size is missing or inconsistent,
  // or the arch is none of known_archs(). Fields are named as the file being read names them.
  void validate(const std::string& where, SpecNaming naming) const;
  // The arch names a package may carry.
  static const std::vector<std::string>& known_archs();
};

void to_json(nlohmann::json& j, const ModelSpec& s);
// Reads a spec written by to_json; `where` names the file in errors.
ModelSpec spec_from_json(const nlohmann::json& j, const std::string& where);

}  // namespace moeflux
