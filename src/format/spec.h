// ModelSpec: the normalised model configuration. The converter derives it from a Hugging Face
// config.json (format/hf_config.h); the package stores it in moeflux.json; every shape the
// engine uses comes from here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moeflux {

// Gated DeltaNet | softmax attention | multi-head latent attention (DeepSeek-V3: the KV cache
// holds a compressed latent and one shared rope key per position).
enum class AttnKind : uint8_t { kLinear, kFull, kMla };
enum class FfnKind : uint8_t { kMoe, kDense };

// Which file a spec came from, so validation errors name that file's own fields.
enum class SpecNaming {
  kPackage,   // moeflux.json: "model.ctx_train"
  kHfConfig,  // HF config.json: "max_position_embeddings"
};

// How router logits become expert choices (engine/backend.h RouteParams says it exactly).
enum class RouterKind : uint8_t {
  kSoftmax,  // softmax over all experts, top-k
  kSigmoid,  // sigmoid scores (+ a selection bias), group-limited top-k (DeepSeek-V3)
};

// RoPE frequency scaling. kNone: inv_freq[i] = theta^(-2i/rot_dim). kYarn: HF's
// _compute_yarn_parameters (engine/rope.h computes both from these fields).
struct RopeScaling {
  enum Kind : uint8_t { kNone, kYarn } kind = kNone;
  double factor = 1.0;
  int orig_ctx = 0;  // original_max_position_embeddings
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 0.0, mscale_all_dim = 0.0;  // 0: absent
  double attention_factor = 0.0;              // 0: absent (derived from factor and the mscales)
  bool truncate = true;
};

struct ModelSpec {
  std::string arch;  // qwen3_5_moe | qwen3_next | qwen3_moe | mixtral | deepseek_v3 | glm4_moe |
                     // gpt_oss
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
  // GLM-4.5: q/k/v projections carry biases (attn_{q,k,v}_bias), added before the q/k norm and
  // RoPE; o has none. moeflux.json field "qkv_bias", written only when true.
  bool qkv_bias = false;
  int rope_dim = 0;  // leading dims of each head that RoPE rotates (rotate-half)
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  // Multi-head latent attention (AttnKind::kMla). head_dim is the q/k head dim
  // (qk_nope_head_dim + qk_rope_head_dim), rope_dim the rotated tail of it (qk_rope_head_dim:
  // per head q is [nope | rope]); keys and values come from one latent of kv_lora_rank per
  // position (kv_b_proj), values of v_head_dim. q_lora_rank 0: q = q_proj x, else
  // q_b(norm(q_a x)). The converter stores rope dims in rotate-half order (HF's
  // rope_interleave permuted away).
  int q_lora_rank = 0, kv_lora_rank = 0, v_head_dim = 0;

  // Linear attention (Gated DeltaNet); k-heads are shared by lin_v_heads/lin_k_heads v-heads.
  int lin_k_heads = 0, lin_v_heads = 0, lin_k_dim = 0, lin_v_dim = 0, conv_kernel = 0;

  // Routed experts: softmax over n_experts, top_k, renormalised when norm_topk_prob.
  int n_experts = 0, top_k = 0, moe_ffn = 0;
  bool norm_topk_prob = true;
  // kSigmoid: scores sigmoid(logits) + the layer's moe_router_bias when router_bias (for the
  // choice only); experts in n_group groups, the topk_group groups of largest top-2 sum kept;
  // weights (renormalised when norm_topk_prob) times routed_scale.
  RouterKind router = RouterKind::kSoftmax;
  bool router_bias = false;
  int n_group = 1, topk_group = 1;
  double routed_scale = 1.0;
  int shared_ffn = 0;       // shared expert intermediate size (0: none)
  bool shared_gate = true;  // the shared expert's output is gated by sigmoid(w.x) (Qwen)
  int dense_ffn = 0;   // intermediate size of FfnKind::kDense layers

  // gpt-oss (GptOssForCausalLM; moeflux.json section "gpt_oss", written only when set):
  // biases on the q/k/v/o projections (attn_{q,k,v,o}_bias); a learned logit per head that joins
  // each attention softmax and takes its share of the mass (attn_sinks [n_heads]); layers with
  // sliding[l] attend, at position p, to the keys of positions (p - sliding_window, p] only
  // (full-attention layers otherwise); router logits W x + b (moe_router_logit_bias [E]), then
  // the top-k of the logits and a softmax over those k; per-expert biases after the gate, up and
  // down products (moe_gate_bias / moe_up_bias [E, I], moe_down_bias [E, H]); and when
  // swiglu_limit > 0 the clamped SwiGLU act = (clamp(up, -limit, limit) + 1) * g * sigmoid(
  // swiglu_alpha * g) with g = min(gate, limit), instead of silu(gate) * up.
  bool attn_bias = false;
  bool attn_sinks = false;
  int sliding_window = 0;
  std::vector<uint8_t> sliding;  // [n_layers] or empty (no sliding layer)
  bool router_logit_bias = false;
  bool expert_bias = false;
  double swiglu_limit = 0.0, swiglu_alpha = 0.0;

  bool tie_embeddings = false;
  int ctx_train = 0;
  std::vector<int> eos_ids;
  int bos_id = -1;

  int lin_qkv_dim() const { return 2 * lin_k_heads * lin_k_dim + lin_v_heads * lin_v_dim; }
  int lin_value_dim() const { return lin_v_heads * lin_v_dim; }
  int q_rows() const { return n_heads * head_dim * (attn_output_gate ? 2 : 1); }
  int mla_nope_dim() const { return head_dim - rope_dim; }
  // Floats per position of a layer's KV cache: K and V rows of full attention
  // (2 * n_kv_heads * head_dim), the latent and rope key of MLA (kv_lora_rank + rope_dim).
  int64_t kv_floats_per_pos(AttnKind a) const;
  int n_moe_layers() const;
  bool is_sliding(int layer) const { return !sliding.empty() && sliding[size_t(layer)]; }
  bool has_gpt_oss_features() const {
    return attn_bias || attn_sinks || !sliding.empty() || router_logit_bias || expert_bias ||
           swiglu_limit > 0;
  }

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
