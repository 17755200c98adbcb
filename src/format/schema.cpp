#include "format/schema.h"

#include <fmt/format.h>

namespace moeflux {

namespace {

struct SchemaBuilder {
  std::vector<TensorSpec> out;
  int layer = -1;

  void add(const std::string& key, std::vector<int64_t> shape, TensorRole role,
           TensorClass cls = TensorClass::kAttn) {
    std::string name = layer < 0 ? key : fmt::format("blk.{}.{}", layer, key);
    out.push_back({std::move(name), key, layer, std::move(shape), role, cls});
  }
  void norm(const std::string& key, int64_t n) { add(key, {n}, TensorRole::kNorm); }
  void vec(const std::string& key, std::vector<int64_t> shape) {
    add(key, std::move(shape), TensorRole::kVector);
  }
  void mat(const std::string& key, int64_t rows, int64_t cols, TensorClass cls) {
    add(key, {rows, cols}, TensorRole::kMatrix, cls);
  }
};

}  // namespace

std::vector<TensorSpec> resident_schema(const ModelSpec& s) {
  using C = TensorClass;
  const int64_t H = s.hidden_size, V = s.vocab_size;
  SchemaBuilder b;
  b.mat("embed", V, H, C::kEmbed);
  for (int l = 0; l < s.n_layers; l++) {
    b.layer = l;
    b.norm("attn_norm", H);
    b.norm("ffn_norm", H);
    if (s.attn[size_t(l)] == AttnKind::kMla) {
      // Multi-head latent attention. kv_b_proj is stored split and per head: its key rows
      // transposed (attn_k_b, what the absorbed query multiplies) and its value rows (attn_v_b).
      const int64_t nh = s.n_heads, L = s.kv_lora_rank, R = s.rope_dim;
      const int64_t qk = s.head_dim, nope = s.mla_nope_dim(), vd = s.v_head_dim;
      if (s.q_lora_rank > 0) {
        b.mat("attn_q_a", s.q_lora_rank, H, C::kAttn);
        b.norm("attn_q_a_norm", s.q_lora_rank);
        b.mat("attn_q_b", nh * qk, s.q_lora_rank, C::kAttn);  // per head [nope | rope]
      } else {
        b.mat("attn_q", nh * qk, H, C::kAttn);
      }
      b.mat("attn_kv_a", L + R, H, C::kAttn);  // [latent | rope key]
      b.norm("attn_kv_a_norm", L);
      b.mat("attn_k_b", nh * L, nope, C::kAttn);
      b.mat("attn_v_b", nh * vd, L, C::kAttn);
      b.mat("attn_o", H, nh * vd, C::kAttn);
    } else if (s.attn[size_t(l)] == AttnKind::kFull) {
      const int64_t hd = s.head_dim, kv = int64_t(s.n_kv_heads) * hd;
      b.mat("attn_q", s.q_rows(), H, C::kAttn);  // with the output gate: per head q then gate
      b.mat("attn_k", kv, H, C::kAttn);
      b.mat("attn_v", kv, H, C::kAttn);
      b.mat("attn_o", H, int64_t(s.n_heads) * hd, C::kAttn);
      if (s.qk_norm) {
        b.norm("attn_q_norm", hd);
        b.norm("attn_k_norm", hd);
      }
      if (s.qkv_bias || s.attn_bias) {  // GLM-4.5 (q/k/v), gpt-oss (q/k/v/o)
        b.vec("attn_q_bias", {s.q_rows()});
        b.vec("attn_k_bias", {kv});
        b.vec("attn_v_bias", {kv});
      }
      if (s.attn_bias) b.vec("attn_o_bias", {H});
      if (s.attn_sinks) b.vec("attn_sinks", {s.n_heads});
    } else {
      const int64_t nv = s.lin_v_heads, qkv = s.lin_qkv_dim(), vd = s.lin_value_dim();
      b.mat("lin_qkv", qkv, H, C::kLinearAttn);  // [q all | k all | v all]
      b.mat("lin_z", vd, H, C::kLinearAttn);
      b.mat("lin_b", nv, H, C::kLinearAttn);
      b.mat("lin_a", nv, H, C::kLinearAttn);
      b.vec("lin_conv", {qkv, s.conv_kernel});  // depthwise conv1d taps
      b.vec("lin_A_log", {nv});
      b.vec("lin_dt_bias", {nv});
      b.norm("lin_norm", s.lin_v_dim);  // the gated norm over each v-head
      b.mat("lin_out", H, vd, C::kLinearAttn);
    }
    if (s.ffn[size_t(l)] == FfnKind::kDense) {
      const int64_t I = s.dense_ffn;
      b.mat("ffn_gate", I, H, C::kDenseFfn);
      b.mat("ffn_up", I, H, C::kDenseFfn);
      b.mat("ffn_down", H, I, C::kDenseFfn);
      continue;
    }
    b.add("moe_router", {s.n_experts, H}, TensorRole::kRouter);
    if (s.router_bias) b.vec("moe_router_bias", {s.n_experts});  // selection only
    if (s.router_logit_bias) b.vec("moe_router_logit_bias", {s.n_experts});  // gpt-oss
    if (s.expert_bias) {  // gpt-oss: every expert's biases, resident (small next to the experts)
      b.vec("moe_gate_bias", {s.n_experts, s.moe_ffn});
      b.vec("moe_up_bias", {s.n_experts, s.moe_ffn});
      b.vec("moe_down_bias", {s.n_experts, H});
    }
    if (s.shared_ffn > 0) {
      const int64_t S = s.shared_ffn;
      b.mat("shexp_gate", S, H, C::kSharedExpert);
      b.mat("shexp_up", S, H, C::kSharedExpert);
      b.mat("shexp_down", H, S, C::kSharedExpert);
      if (s.shared_gate)
        b.add("shexp_router", {1, H}, TensorRole::kRouter);  // sigmoid gate of the shared expert
    }
  }
  b.layer = -1;
  b.norm("final_norm", H);
  if (!s.tie_embeddings) b.mat("lm_head", V, H, C::kLmHead);
  return std::move(b.out);
}

std::vector<TensorSpec> expert_schema(const ModelSpec& s) {
  const int64_t H = s.hidden_size, I = s.moe_ffn;
  SchemaBuilder b;
  b.mat("gate", I, H, TensorClass::kExperts);
  b.mat("up", I, H, TensorClass::kExperts);
  b.mat("down", H, I, TensorClass::kExperts);
  return std::move(b.out);
}

}  // namespace moeflux
