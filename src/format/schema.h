// The package's tensor schema: which tensors a package of a ModelSpec holds, their names,
// shapes and roles, in resident.bin order. One table for convert (which maps each entry to its
// checkpoint tensors), synth (which generates each entry) and Model::load (which binds each
// entry, shape and dtype checked), so the three cannot drift apart
// (docs/2026-12-03-tensor-schema.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "format/spec.h"

namespace moeflux {

// What a matrix is for; a quantisation recipe picks a dtype per class (convert/convert.h).
// Norms, conv weights, A_log, dt_bias and routers are never quantised (they are stored f32).
enum class TensorClass { kEmbed, kLmHead, kAttn, kLinearAttn, kSharedExpert, kDenseFfn, kExperts };

enum class TensorRole {
  kNorm,    // RMSNorm weight, f32 [n]: the package holds the scale itself (1 + w folded in)
  kVector,  // other f32 parameters: the conv taps [qkv_dim, conv_kernel], A_log, dt_bias
  kRouter,  // f32 matrix [rows, H] that decides routing (moe_router, shexp_router): never quantised
  kMatrix,  // matrix [rows, cols]: float, or quantised as the recipe says for its class
};

struct TensorSpec {
  std::string name;  // in the package: "embed", "blk.3.attn_q"
  std::string key;   // the name without the layer's "blk.N." prefix: "attn_q"
  int layer = -1;    // -1: not a layer's tensor
  std::vector<int64_t> shape;
  TensorRole role = TensorRole::kMatrix;
  TensorClass cls = TensorClass::kAttn;  // kMatrix: the recipe's class
};

// Every resident tensor of a package of `spec`, in file order: embed, each layer's tensors,
// final_norm, lm_head. Optional tensors are listed only where the spec has them: attn_q_norm and
// attn_k_norm with qk_norm, attn_{q,k,v}_bias with qkv_bias, the shared expert (shexp_*) with
// shared_ffn > 0 (shexp_router with shared_gate), moe_router_bias with router_bias, lm_head
// without tie_embeddings; MLA layers have attn_q_a/attn_q_a_norm/attn_q_b (q_lora_rank > 0) or
// attn_q, then attn_kv_a, attn_kv_a_norm, attn_k_b, attn_v_b, attn_o.
std::vector<TensorSpec> resident_schema(const ModelSpec& spec);

// The parts of one expert record, in record order: gate [moe_ffn, H], up [moe_ffn, H],
// down [H, moe_ffn] (class kExperts). Every MoE layer has n_experts of them.
std::vector<TensorSpec> expert_schema(const ModelSpec& spec);

}  // namespace moeflux
