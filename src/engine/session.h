// Session: per-sequence state (KV cache for full-attention layers, conv and recurrent state for
// linear layers, position) and the forward pass over it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "experts/expert_store.h"
#include "model/model.h"

namespace moeflux {

struct SessionParams {
  int ctx = 0;  // maximum positions; 0: min(ctx_train, 4096)
  // Routed experts per token; 0: the model's top-k. Fewer than trained trades quality for
  // bytes (the chosen experts' weights are renormalised as the model says, norm_topk_prob).
  int experts_per_token = 0;
  // Observes routing: for each MoE layer evaluated, the chosen experts [T, k] (k = experts per
  // token) of its T tokens, best first. For statistics tools; null = off.
  std::function<void(int layer, int T, int k, const int* experts)> on_route;
};

// Receives HF-numbered hidden states: index 0 = embeddings, i = residual after layer i-1,
// n_layers = final-normed state. `h` is host memory [T, hidden].
using HiddenSink = std::function<void(int index, const float* h, int T)>;

class Session {
 public:
  Session(const Model& model, Backend& backend, ExpertStore& store, SessionParams params = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Evaluates T tokens at positions pos()..pos()+T-1. With `logits` non-null it receives
  // [T, vocab] when all_logits, else [1, vocab] for the last token. Throws Error for an
  // out-of-range token id or a full context, before any state changes.
  void eval(const int32_t* tokens, int T, float* logits, bool all_logits,
            const HiddenSink& hidden = nullptr);

  int pos() const { return pos_; }
  int ctx() const { return ctx_; }
  void clear();

 private:
  float* buf(size_t slot, size_t n);
  void full_attention(int l, const float* xn, float* out, int T);
  void linear_attention(int l, const float* xn, float* out, int T);
  void moe(int l, const float* x, const float* xn, float* out, int T);
  void prefetch_next(int l, const float* x, int T);
  void score_prediction(int moe_index, const std::vector<int>& used);
  void dense_ffn(int l, const float* xn, float* out, int T);

  const Model& model_;
  const ModelSpec& spec_;
  Backend& be_;
  ExpertStore& store_;
  int ctx_ = 0, pos_ = 0;
  int top_k_ = 0;  // routed experts per token
  std::function<void(int, int, int, const int*)> on_route_;
  // state, backend memory: per layer either K and V caches [ctx, kv_dim] or conv state
  // [K-1, qkv_dim] and recurrent state [v_heads, k_dim, v_dim]
  std::vector<float*> state_a_, state_b_;
  std::vector<size_t> state_a_n_, state_b_n_;
  // scratch, backend memory, grown on demand
  std::vector<float*> scratch_;
  std::vector<size_t> scratch_n_;
  // prefetch: the experts predicted for each MoE layer (sorted), scored at its next fetch
  std::vector<std::vector<int>> predicted_;
};

}  // namespace moeflux
