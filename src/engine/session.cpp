#include "engine/session.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "engine/rope.h"
#include "util/error.h"

namespace moeflux {

namespace {
// HF builds q_a_layernorm and kv_a_layernorm with DeepseekV3RMSNorm's default eps, not
// rms_norm_eps.
constexpr float kMlaNormEps = 1e-6f;

// Every check of the parameters, before anything is allocated or uploaded (binding the model
// copies its weights to the device on CUDA).
void check_params(const ModelSpec& s, const SessionParams& params, Context& context,
                  const ExpertStore& store) {
  if (params.ctx < 0) fail(ErrorKind::kInvalidArgument, "context size {} is negative", params.ctx);
  if (params.experts_per_token < 0 || params.experts_per_token > s.n_experts)
    fail(ErrorKind::kInvalidArgument, "experts per token {} is not in [0, {}] (0: the model's {})",
         params.experts_per_token, s.n_experts, s.top_k);
  const int top_k = params.experts_per_token > 0 ? params.experts_per_token : s.top_k;
  if (s.n_group > 1 && top_k > s.topk_group * (s.n_experts / s.n_group))
    fail(ErrorKind::kInvalidArgument,
         "experts per token {} is more than the {} experts of the {} "
         "expert groups routing keeps",
         top_k, s.topk_group * (s.n_experts / s.n_group), s.topk_group);
  if (params.checkpoints < 0)
    fail(ErrorKind::kInvalidArgument, "checkpoint count {} is negative", params.checkpoints);
  if (params.checkpoint_interval < 0)
    fail(ErrorKind::kInvalidArgument, "checkpoint interval {} is negative",
         params.checkpoint_interval);
  if (params.deltanet_chunked_min_tokens < 0)
    fail(ErrorKind::kInvalidArgument, "DeltaNet chunked threshold {} is negative",
         params.deltanet_chunked_min_tokens);
  if (params.deltanet_chunk < 1)
    fail(ErrorKind::kInvalidArgument, "DeltaNet chunk size {} < 1", params.deltanet_chunk);
  if (params.ubatch < 1)
    fail(ErrorKind::kInvalidArgument, "micro-batch size (ubatch) {} < 1", params.ubatch);
  if (&store.memory().device() != &context.device())  // whose ops read the slots
    fail(ErrorKind::kInvalidArgument, "the expert store keeps its experts in another device's "
         "memory than the session's ({})", context.name());
}
}  // namespace

Session::Session(const Model& model, Context& context, ExpertStore& store, SessionParams params)
    : model_(model),
      spec_(model.spec()),
      be_(context),
      weights_((check_params(model.spec(), params, context, store), context.device().bind(model))),
      w_(*weights_),
      store_(store) {
  ctx_ = params.ctx > 0 ? params.ctx : std::min(spec_.ctx_train > 0 ? spec_.ctx_train : 4096, 4096);
  const ModelSpec& s = spec_;
  top_k_ = params.experts_per_token > 0 ? params.experts_per_token : s.top_k;
  on_route_ = params.on_route;
  ubatch_ = params.ubatch;
  max_checkpoints_ = params.checkpoints;
  checkpoint_interval_ = params.checkpoint_interval;
  chunked_min_ = params.deltanet_chunked_min_tokens;
  chunk_ = params.deltanet_chunk;
  for (AttnKind a : s.attn) has_linear_ |= a == AttnKind::kLinear;
  fingerprint_ = model_fingerprint(model);
  try {
    for (int l = 0; l < s.n_layers; l++) {
      size_t na, nb;
      if (s.attn[size_t(l)] == AttnKind::kFull) {
        na = nb = size_t(ctx_) * s.n_kv_heads * s.head_dim;
      } else if (s.attn[size_t(l)] == AttnKind::kMla) {
        // The latent and the rope key of each position (one row, shared by every head).
        na = size_t(ctx_) * size_t(s.kv_floats_per_pos(AttnKind::kMla));
        nb = 0;
      } else {
        na = size_t(s.conv_kernel - 1) * s.lin_qkv_dim();
        nb = size_t(s.lin_v_heads) * s.lin_k_dim * s.lin_v_dim;
      }
      state_a_.push_back(na ? be_.alloc(na) : nullptr);
      state_b_.push_back(nb ? be_.alloc(nb) : nullptr);
      state_a_n_.push_back(na);
      state_b_n_.push_back(nb);
    }
    alloc_workspace();
  } catch (...) {
    // The destructor does not run for a throwing constructor: give back what was allocated.
    for (float* p : state_a_) be_.release(p);
    for (float* p : state_b_) be_.release(p);
    release_workspace();
    throw;
  }
  predicted_.resize(size_t(s.n_moe_layers()));
}

Session::~Session() {
  for (Checkpoint& c : checkpoints_) release(c);
  for (float* p : state_a_) be_.release(p);
  for (float* p : state_b_) be_.release(p);
  release_workspace();
}

void Session::clear() {
  pos_ = 0;
  tokens_.clear();
  for (Checkpoint& c : checkpoints_) release(c);
  checkpoints_.clear();
  broken_ = false;
  zero_linear_state();
}

void Session::zero_linear_state() {
  // Linear-attention state must start from zero; KV entries past pos are never read.
  std::vector<float> zeros;
  for (size_t l = 0; l < state_a_.size(); l++) {
    if (spec_.attn[l] != AttnKind::kLinear) continue;
    zeros.assign(std::max(state_a_n_[l], state_b_n_[l]), 0.0f);
    be_.upload(state_a_[l], zeros.data(), state_a_n_[l]);
    be_.upload(state_b_[l], zeros.data(), state_b_n_[l]);
  }
}

void Session::alloc_workspace() {
  const ModelSpec& s = spec_;
  const size_t U = size_t(ubatch_cap_ = std::min(ubatch_, ctx_)), H = size_t(s.hidden_size);
  const size_t K = size_t(top_k_), E = size_t(s.n_experts);
  bool full = false, linear = false, mla = false, moe = false, dense = false;
  for (int l = 0; l < s.n_layers; l++) {
    const AttnKind a = s.attn[size_t(l)];
    (a == AttnKind::kFull ? full : a == AttnKind::kMla ? mla : linear) = true;
    (s.ffn[size_t(l)] == FfnKind::kMoe ? moe : dense) = true;
  }
  auto f = [&](size_t n) {
    ws_blocks_.push_back(be_.alloc(n));
    return static_cast<float*>(ws_blocks_.back());
  };
  auto i32 = [&](size_t n) {
    ws_blocks_.push_back(be_.alloc_bytes(n * sizeof(int32_t)));
    return static_cast<int32_t*>(ws_blocks_.back());
  };
  Workspace& w = ws_;
  w.tokens = i32(U);
  w.x = f(U * H);
  w.xn = f(U * H);
  w.mix = f(U * H);
  if (full) {
    const size_t kvd = size_t(s.n_kv_heads) * s.head_dim;
    w.q = f(U * size_t(s.q_rows()));
    w.k = f(U * kvd);
    w.v = f(U * kvd);
    w.o = f(U * size_t(s.n_heads) * s.head_dim);
  }
  if (mla) {
    const size_t nh = size_t(s.n_heads), L = size_t(s.kv_lora_rank), R = size_t(s.rope_dim);
    if (s.q_lora_rank > 0) w.qa = f(U * size_t(s.q_lora_rank));
    w.q = f(U * nh * size_t(s.head_dim));
    w.kva = f(U * (L + R));
    w.qlat = f(U * nh * (L + R));
    w.olat = f(U * nh * L);
    w.o = f(U * nh * size_t(s.v_head_dim));
  }
  if ((mla || full) && s.rope_scaling.kind != RopeScaling::kNone) {
    const std::vector<float> inv = rope_inv_freq(s);
    w.inv_freq = f(inv.size());
    be_.upload(w.inv_freq, inv.data(), inv.size());
  }
  if (linear) {
    const size_t C = size_t(s.lin_qkv_dim()), vd = size_t(s.lin_value_dim());
    w.qkv = f(U * C);
    w.conv = f(U * C);
    w.z = f(U * vd);
    w.core = f(U * vd);
    w.la = f(U * size_t(s.lin_v_heads));
    w.lb = f(U * size_t(s.lin_v_heads));
  }
  if (moe) {
    w.router = f(U * E);
    w.ids = i32(U * K);
    w.weights = f(U * K);
    w.xp = f(U * H);
    w.ids_next = i32(U * K);
  }
  if (dense) {
    w.g = f(U * size_t(s.dense_ffn));
    w.u = f(U * size_t(s.dense_ffn));
  }
  w.logits = f(std::min<size_t>(U, kLogitRows) * size_t(s.vocab_size));
}

void Session::release_workspace() {
  for (void* p : ws_blocks_) be_.release(p);
  ws_blocks_.clear();
  ws_ = Workspace{};
}

void Session::validate_tokens(const int32_t* tokens, int T) const {
  const ModelSpec& s = spec_;
  if (T <= 0) throw EvalError(EvalError::kNoTokens, "no tokens to evaluate");
  for (int t = 0; t < T; t++)
    if (tokens[t] < 0 || tokens[t] >= s.vocab_size)
      throw EvalError(EvalError::kBadToken,
                      fmt::format("token id {} at position {} is out of range [0, {})", tokens[t],
                                  pos_ + t, s.vocab_size));
  if (int64_t(pos_) + T > ctx_)
    throw EvalError(EvalError::kContextFull,
                    fmt::format("context full: {} tokens at position {} exceed the context of {} "
                                "positions",
                                T, pos_, ctx_));
}

void Session::eval(const int32_t* tokens, int T, float* logits, bool all_logits,
                   const HiddenSink& hidden) {
  validate_tokens(tokens, T);
  if (broken_)
    throw EvalError(EvalError::kStateInvalid,
                    fmt::format("the session's state is invalid (an evaluation failed midway at "
                                "position {}): clear it, rewind it with seq_rm or load a snapshot",
                                pos_));
  model_.check_resident();  // a mapped resident.bin cut short: an error here, not SIGBUS below
  try {
    forward_ubatched(tokens, T, logits, all_logits, hidden);
  } catch (...) {
    broken_ = true;  // layers before the failure updated their state: never continue from it
    throw;
  }
  maybe_checkpoint(T);
}

void Session::forward_ubatched(const int32_t* tokens, int T, float* logits, bool all_logits,
                               const HiddenSink& hidden) {
  if (T <= ubatch_) return forward(tokens, T, logits, all_logits, hidden);
  // A hidden-state sink (a debugging aid) sees each index once with all T rows, as without
  // micro-batches: its rows are gathered on the host.
  const size_t H = size_t(spec_.hidden_size), V = size_t(spec_.vocab_size);
  std::vector<std::vector<float>> rows;
  HiddenSink gather;
  if (hidden) {
    rows.resize(size_t(spec_.n_layers) + 1);
    gather = [&](int index, const float* h, int n) {
      rows[size_t(index)].insert(rows[size_t(index)].end(), h, h + size_t(n) * H);
    };
  }
  for (int t0 = 0; t0 < T; t0 += ubatch_) {
    const int n = std::min(ubatch_, T - t0);
    const bool last = t0 + n == T;
    float* out = !logits ? nullptr : all_logits ? logits + size_t(t0) * V : last ? logits : nullptr;
    forward(tokens + t0, n, out, all_logits, hidden ? gather : HiddenSink());
  }
  for (size_t i = 0; i < rows.size(); i++) hidden(int(i), rows[i].data(), T);
}

void Session::forward(const int32_t* tokens, int T, float* logits, bool all_logits,
                      const HiddenSink& hidden) {
  const ModelSpec& s = spec_;
  const int H = s.hidden_size;
  const size_t TH = size_t(T) * H;
  MF_CHECK(T <= ubatch_cap_);
  const float* xn = ws_.xn;
  std::vector<float> host;
  auto emit = [&](int index, const float* v) {
    if (!hidden) return;
    host.resize(TH);
    be_.download(host.data(), v, TH);
    hidden(index, host.data(), T);
  };

  be_.set_pos(pos_);
  be_.upload_bytes(ws_.tokens, tokens, size_t(T) * sizeof(int32_t));
  if (T == 1 && logits && !hidden && replay_decode()) {
    be_.download_bytes_async(logits, ws_.logits, size_t(s.vocab_size) * sizeof(float));
  } else {
    layers(T, emit);
    if (logits) {
      // The lm_head kLogitRows rows at a time (each row's bits do not depend on the batch).
      const int rows = all_logits ? T : 1;
      const float* src = all_logits ? xn : xn + size_t(T - 1) * H;
      const size_t V = size_t(s.vocab_size);
      for (int r0 = 0; r0 < rows; r0 += kLogitRows) {
        const int n = std::min(kLogitRows, rows - r0);
        be_.matmul_exact(w_.lm_head, src + size_t(r0) * H, ws_.logits, n);
        be_.download_bytes_async(logits + size_t(r0) * V, ws_.logits,
                                 size_t(n) * V * sizeof(float));
        if (r0 + n < rows) be_.sync();  // before the next piece overwrites ws_.logits
      }
    }
  }
  raise_nonfinite();  // waits for the queue
  pos_ += T;
  tokens_.insert(tokens_.end(), tokens, tokens + T);
}

// Embedding, every layer and the final norm over the T tokens in ws_.tokens (result in ws_.xn).
void Session::layers(int T, const std::function<void(int, const float*)>& emit) {
  const ModelSpec& s = spec_;
  const int H = s.hidden_size;
  const size_t TH = size_t(T) * H;
  float* x = ws_.x;
  float* xn = ws_.xn;
  be_.embed(w_.embed, ws_.tokens, T, x);
  be_.check_finite(x, TH, -1);
  if (s.n_layers > 0) be_.rmsnorm(x, w_.layers[0].attn_norm, xn, T, H, H, s.rms_eps);
  else be_.rmsnorm(x, w_.final_norm, xn, T, H, H, s.rms_eps);
  for (int l = 0; l < s.n_layers; l++) {
    emit(l, x);  // xn already holds x normed for this layer's attention
    const LayerWeights& w = w_.layers[size_t(l)];
    if (w.attn == AttnKind::kFull) full_attention(l, T);
    else if (w.attn == AttnKind::kMla) mla_attention(l, T);
    else linear_attention(l, T);
    be_.add_rmsnorm(x, ws_.mix, w.ffn_norm, xn, T, H, s.rms_eps);
    if (w.ffn == FfnKind::kMoe) moe(l, T);
    else dense_ffn(l, T);
    // The residual add, and x normed for the next layer (or the final norm).
    const float* next = l + 1 < s.n_layers ? w_.layers[size_t(l) + 1].attn_norm : w_.final_norm;
    be_.add_rmsnorm(x, ws_.mix, next, xn, T, H, s.rms_eps);
    be_.check_finite(x, TH, l);
  }
  emit(s.n_layers, xn);
}

// A decode step (one token, its logits wanted) as one replay of a recording of layers() and
// the lm_head, when the context records and every MoE layer's experts are resident, so
// nothing in the step waits for the host. The first such step runs as called (first-use work,
// e.g. scratch and tables, must not be recorded), the second records, later ones replay. The
// recording stays valid for the session's life: every address in it (weights, resident
// experts, workspace, state) is fixed, and the position is read from context memory.
bool Session::replay_decode() {
  if (decode_ == DecodeReplay::kNever) return false;
  if (!decode_rec_) {
    if (on_route_) return false;
    for (int l = 0; l < spec_.n_layers; l++)
      if (spec_.ffn[size_t(l)] == FfnKind::kMoe && !store_.resident(w_.layers[size_t(l)].moe_index))
        return false;
    if (decode_ == DecodeReplay::kFirst) {
      decode_ = DecodeReplay::kRecordNext;
      return false;
    }
    if (!be_.record_begin()) {
      decode_ = DecodeReplay::kNever;
      return false;
    }
    try {
      layers(1, [](int, const float*) {});
      be_.matmul_exact(w_.lm_head, ws_.xn, ws_.logits, 1);
    } catch (...) {
      try {
        be_.record_end();
      } catch (...) {
      }
      throw;
    }
    decode_rec_ = be_.record_end();
    if (!decode_rec_) {  // nothing recorded and nothing ran: this step and later ones as called
      decode_ = DecodeReplay::kNever;
      return false;
    }
  }
  be_.replay(*decode_rec_);
  replayed_steps_++;
  return true;
}

// NaN/Inf in the residual stream never heals (every later layer adds to it) and turns every
// logit into NaN; the evaluation fails naming the first layer that made one. Cost: one read of
// [T, H] per layer, next to the layer's weight reads (docs/2026-12-03-hostile-inputs.md).
void Session::raise_nonfinite() {
  int l = 0;
  size_t i = 0;
  if (!be_.take_nonfinite(&l, &i)) return;
  const size_t H = size_t(spec_.hidden_size);
  const std::string what =
      l < 0 ? std::string("the token embedding (before layer 0)") : fmt::format("layer {}", l);
  fail(ErrorKind::kNumeric, "{} produced NaN/Inf at position {} (package resident weights "
       "corrupt?)", what, pos_ + int(i / H));
}

void Session::full_attention(int l, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = w_.layers[size_t(l)];
  const int hd = s.head_dim, nh = s.n_heads, nkv = s.n_kv_heads;
  const int kvd = nkv * hd, q_rows = s.q_rows(), qhs = s.attn_output_gate ? 2 * hd : hd;
  float *q = ws_.q, *k = ws_.k, *v = ws_.v, *o = ws_.o;
  const Mat* proj[] = {&w.q, &w.k, &w.v};
  float* const outs[] = {q, k, v};
  be_.matmul_n(proj, outs, 3, ws_.xn, T);
  if (w.q_bias) add_rows(q, w.q_bias, T, q_rows);  // GLM-4.5, gpt-oss: before the q/k norm and RoPE
  if (w.k_bias) add_rows(k, w.k_bias, T, kvd);
  if (w.v_bias) add_rows(v, w.v_bias, T, kvd);
  if (w.q_norm) be_.rmsnorm(q, w.q_norm, q, T * nh, hd, qhs, s.rms_eps);
  if (w.k_norm) be_.rmsnorm(k, w.k_norm, k, T * nkv, hd, hd, s.rms_eps);
  if (s.rope_dim > 0 && ws_.inv_freq) {  // YaRN (gpt-oss)
    const float cs = float(rope_cos_sin_scale(s));
    be_.rope_freq(q, T, nh, q_rows, qhs, s.rope_dim, ws_.inv_freq, cs);
    be_.rope_freq(k, T, nkv, kvd, hd, s.rope_dim, ws_.inv_freq, cs);
  } else if (s.rope_dim > 0) {
    be_.rope(q, T, nh, q_rows, qhs, s.rope_dim, s.rope_theta);
    be_.rope(k, T, nkv, kvd, hd, s.rope_dim, s.rope_theta);
  }
  float* kc = state_a_[size_t(l)];
  float* vc = state_b_[size_t(l)];
  be_.kv_append(kc, k, T, kvd);
  be_.kv_append(vc, v, T, kvd);
  AttentionParams p{nh, nkv, hd, q_rows, qhs, kvd, 1.0f / std::sqrt(float(hd))};
  p.sinks = w.sinks;
  if (s.is_sliding(l)) p.window = s.sliding_window;
  be_.attention(q, kc, vc, o, T, p);
  if (s.attn_output_gate) be_.mul_sigmoid_gate(o, q + hd, T, nh, hd, q_rows, qhs);
  be_.matmul_exact(w.o, o, ws_.mix, T);
  if (w.o_bias) add_rows(ws_.mix, w.o_bias, T, s.hidden_size);
}

// y[t] += b for each of T rows of n floats (projection biases).
void Session::add_rows(float* y, const float* b, int T, int n) {
  for (int t = 0; t < T; t++) be_.add(y + size_t(t) * n, b, size_t(n));
}

// Multi-head latent attention in the absorbed form, for prompts and decode alike (so prefill
// and decode stay bit-identical): the cache holds per position the normed latent c (kv_lora)
// and the rotated rope key; kv_b_proj's key half is multiplied into each head's query
// (q_lat = W_UK_h^T q_nope) and its value half applied after attention (o_h = W_UV_h o_lat), so
// the cache is never expanded to per-head K/V. Scores q_nope.(W_UK_h c) + q_rope.k_rope equal
// [q_lat | q_rope].[c | k_rope]: one attention over rows of kv_lora + rope_dim with a single
// kv head, whose value is the latent part of the same row.
void Session::mla_attention(int l, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = w_.layers[size_t(l)];
  const int nh = s.n_heads, L = s.kv_lora_rank, R = s.rope_dim, qk = s.head_dim;
  const int nope = s.mla_nope_dim(), vd = s.v_head_dim, row = L + R;
  float* q = ws_.q;  // [T, nh * qk], per head [nope | rope]
  if (s.q_lora_rank > 0) {
    be_.matmul(w.q_a, ws_.xn, ws_.qa, T);
    be_.rmsnorm(ws_.qa, w.q_a_norm, ws_.qa, T, s.q_lora_rank, s.q_lora_rank, kMlaNormEps);
    be_.matmul(w.q_b, ws_.qa, q, T);
  } else {
    be_.matmul(w.q, ws_.xn, q, T);
  }
  be_.matmul(w.kv_a, ws_.xn, ws_.kva, T);                              // [T, L + R]
  be_.rmsnorm(ws_.kva, w.kv_a_norm, ws_.kva, T, L, row, kMlaNormEps);  // the latent part only
  if (ws_.inv_freq) {
    const float cs = float(rope_cos_sin_scale(s));
    be_.rope_freq(q + nope, T, nh, nh * qk, qk, R, ws_.inv_freq, cs);
    be_.rope_freq(ws_.kva + L, T, 1, row, row, R, ws_.inv_freq, cs);
  } else {
    be_.rope(q + nope, T, nh, nh * qk, qk, R, s.rope_theta);
    be_.rope(ws_.kva + L, T, 1, row, row, R, s.rope_theta);
  }
  float* cache = state_a_[size_t(l)];  // [ctx, L + R]
  be_.kv_append(cache, ws_.kva, T, row);
  // q_lat = [W_UK_h^T q_nope_h | q_rope_h] per head: [T, nh, L + R]
  be_.matmul_heads(w.k_b, nh, q, nh * qk, qk, ws_.qlat, nh * row, row, T);
  be_.copy_rows(ws_.qlat + L, row, q + nope, qk, T * nh, R);
  AttentionParams p{nh, 1, row, nh * row, row, row, float(attention_scale(s)), L, row};
  be_.attention(ws_.qlat, cache, cache, ws_.olat, T, p);  // olat: [T, nh * L]
  be_.matmul_heads(w.v_b, nh, ws_.olat, nh * L, L, ws_.o, nh * vd, vd, T);
  be_.matmul_exact(w.o, ws_.o, ws_.mix, T);
}

void Session::linear_attention(int l, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = w_.layers[size_t(l)];
  const int C = s.lin_qkv_dim(), nv = s.lin_v_heads;
  const Mat* proj[] = {&w.lin_qkv, &w.lin_z, &w.lin_b, &w.lin_a};
  float* const outs[] = {ws_.qkv, ws_.z, ws_.lb, ws_.la};
  be_.matmul_n(proj, outs, 4, ws_.xn, T);
  be_.conv1d_silu(ws_.qkv, state_a_[size_t(l)], w.conv, ws_.conv, T, C, s.conv_kernel);
  be_.deltanet_gates(ws_.la, ws_.lb, w.A_log, w.dt_bias, T, nv);
  DeltaNetParams p{s.lin_k_heads, nv, s.lin_k_dim, s.lin_v_dim};
  if (chunked_min_ > 0 && T >= chunked_min_)
    be_.deltanet_chunked(ws_.conv, ws_.la, ws_.lb, state_b_[size_t(l)], ws_.core, T, p, chunk_);
  else
    be_.deltanet(ws_.conv, ws_.la, ws_.lb, state_b_[size_t(l)], ws_.core, T, p);
  be_.gated_rmsnorm(ws_.core, ws_.z, w.lin_norm, T * nv, s.lin_v_dim, s.rms_eps);
  be_.matmul_exact(w.lin_out, ws_.core, ws_.mix, T);
}

namespace {
// An ExpertBatch as the context's moe_experts takes it.
// Every expert of a layer, resident for good (ExpertStore::load_all).
class ResidentSource final : public ExpertSource {
 public:
  ResidentSource(const ExpertWeights* table, int n) : table_(table), n_(size_t(n)) {}
  size_t size() const override { return n_; }
  int id(size_t i) const override { return int(i); }
  size_t next() override { return next_++; }
  const ExpertWeights& weights(size_t i) const override { return table_[i]; }
  bool all_resident() const override { return true; }

 private:
  const ExpertWeights* table_;
  size_t n_, next_ = 0;
};

class BatchSource final : public ExpertSource {
 public:
  BatchSource(ExpertBatch& batch, const std::vector<int>& ids) : batch_(batch), ids_(ids) {}
  size_t size() const override { return ids_.size(); }
  int id(size_t i) const override { return ids_[i]; }
  size_t next() override { return batch_.next(); }
  const ExpertWeights& weights(size_t i) const override { return batch_.weights(i); }

 private:
  ExpertBatch& batch_;
  const std::vector<int>& ids_;
};
}  // namespace

void Session::moe(int l, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = w_.layers[size_t(l)];
  const int E = s.n_experts, K = top_k_;

  be_.matmul(w.router, ws_.xn, ws_.router, T);
  if (w.router_logit_bias) add_rows(ws_.router, w.router_logit_bias, T, E);  // gpt-oss
  be_.route(ws_.router, T, route_params(w), ws_.ids, ws_.weights);
  SharedExpert shared;
  if (s.shared_ffn > 0) {
    shared.gate = &w.sh_gate;
    shared.up = &w.sh_up;
    shared.down = &w.sh_down;
    shared.router = s.shared_gate ? &w.sh_router : nullptr;
    shared.inter = s.shared_ffn;
  }
  MoeParams mp;
  mp.T = T;
  mp.k = K;
  mp.hidden = s.hidden_size;
  mp.inter = s.moe_ffn;
  mp.gate_bias = w.gate_bias;  // gpt-oss (null elsewhere)
  mp.up_bias = w.up_bias;
  mp.down_bias = w.down_bias;
  mp.swiglu_limit = float(s.swiglu_limit);
  mp.swiglu_alpha = float(s.swiglu_alpha);
  const SharedExpert* sh = s.shared_ffn > 0 ? &shared : nullptr;
  if (const ExpertWeights* table = store_.resident(w.moe_index); table && !on_route_) {
    // Every expert resident: the ids stay where route left them (nothing to fetch or predict).
    ResidentSource src(table, E);
    be_.moe_experts(ws_.xn, ws_.ids, ws_.weights, src, sh, ws_.mix, mp);
    return;
  }
  // Only the chosen ids cross to the host, for the store.
  std::vector<int32_t> sel(size_t(T) * K);
  be_.download(sel.data(), ws_.ids, sel.size() * sizeof(int32_t));
  if (on_route_) on_route_(l, T, K, sel.data());

  // The distinct experts, and how many tokens chose each: the cache policy counts uses by token,
  // so a prompt micro-batch weighs an expert by how much of the text routed to it.
  std::vector<uint32_t> chosen(static_cast<size_t>(E), 0);
  for (int32_t e : sel) chosen[size_t(e)]++;
  std::vector<int> used;
  std::vector<uint32_t> uses;
  for (int e = 0; e < E; e++)
    if (chosen[size_t(e)]) {
      used.push_back(e);
      uses.push_back(chosen[size_t(e)]);
    }
  auto batch = store_.fetch(w.moe_index, used, uses);
  score_prediction(w.moe_index, used);
  // While this layer's experts arrive: guess the next MoE layer's and start reading them.
  if (store_.options().prefetch) prefetch_next(l, T);

  BatchSource src(*batch, used);
  be_.moe_experts(ws_.xn, ws_.ids, ws_.weights, src, sh, ws_.mix, mp);
  be_.sync();  // the experts' memory is read before the batch unpins it
}

RouteParams Session::route_params(const LayerWeights& w) const {
  const ModelSpec& s = spec_;
  RouteParams rp;
  rp.n_experts = s.n_experts;
  rp.k = top_k_;
  rp.norm_topk_prob = s.norm_topk_prob;
  if (s.router == RouterKind::kSigmoid) {
    rp.scoring = RouteScoring::kSigmoid;
    rp.bias = w.router_bias;
  }
  rp.scale = float(s.routed_scale);
  rp.n_group = s.n_group;
  rp.topk_group = s.topk_group;
  return rp;
}

void Session::score_prediction(int moe_index, const std::vector<int>& used) {
  auto& pred = predicted_[size_t(moe_index)];
  if (pred.empty()) return;
  uint64_t hit = 0;
  for (int e : used) hit += std::binary_search(pred.begin(), pred.end(), e);
  store_.note_prediction(moe_index, used.size(), hit);
  pred.clear();
}

void Session::prefetch_next(int l, int T) {
  const ModelSpec& s = spec_;
  int nl = l + 1;
  while (nl < s.n_layers && w_.layers[size_t(nl)].ffn != FfnKind::kMoe) nl++;
  if (nl >= s.n_layers) return;
  // Layer nl's router applied to the residual stream as it stands (after layer l's attention),
  // normed with layer nl's FFN norm: the input layer nl's router will see, minus what layers
  // l..nl-1 still add.
  const LayerWeights& w = w_.layers[size_t(nl)];
  const int H = s.hidden_size, E = s.n_experts, K = top_k_;
  be_.rmsnorm(ws_.x, w.ffn_norm, ws_.xp, T, H, H, s.rms_eps);
  be_.matmul(w.router, ws_.xp, ws_.router, T);
  if (w.router_logit_bias) add_rows(ws_.router, w.router_logit_bias, T, E);
  be_.route(ws_.router, T, route_params(w), ws_.ids_next, nullptr);
  std::vector<int32_t> guess(size_t(T) * K);
  be_.download(guess.data(), ws_.ids_next, guess.size() * sizeof(int32_t));
  std::vector<char> want(static_cast<size_t>(E), 0);
  for (int32_t e : guess) want[size_t(e)] = 1;
  auto& pred = predicted_[size_t(w.moe_index)];
  pred.clear();
  for (int e = 0; e < E; e++)
    if (want[size_t(e)]) pred.push_back(e);
  store_.prefetch(w.moe_index, pred);
}

void Session::dense_ffn(int l, int T) {
  const LayerWeights& w = w_.layers[size_t(l)];
  const int I = spec_.dense_ffn;
  be_.matmul(w.ffn_gate, ws_.xn, ws_.g, T);
  be_.matmul(w.ffn_up, ws_.xn, ws_.u, T);
  be_.silu_mul(ws_.g, ws_.u, size_t(T) * I);
  be_.matmul(w.ffn_down, ws_.g, ws_.mix, T);
}

// ---- memory: checkpoints, seq_rm ------------------------------------------------------------

void Session::release(Checkpoint& c) {
  for (float* p : c.a) if (p) be_.release(p);
  for (float* p : c.b) if (p) be_.release(p);
  c.a.clear();
  c.b.clear();
}

std::vector<int> Session::checkpoint_positions() const {
  std::vector<int> v;
  for (const Checkpoint& c : checkpoints_) v.push_back(c.pos);
  return v;
}

void Session::maybe_checkpoint(int T) {
  if (!has_linear_ || max_checkpoints_ == 0 || pos_ == 0) return;
  const int newest = checkpoints_.empty() ? 0 : checkpoints_.back().pos;
  if (pos_ <= newest) return;
  const bool due = T > 1 || (checkpoint_interval_ > 0 && pos_ - newest >= checkpoint_interval_);
  if (!due) return;
  Checkpoint c;
  if (int(checkpoints_.size()) >= max_checkpoints_) {
    c = std::move(checkpoints_.front());  // reuse the oldest one's memory
    checkpoints_.erase(checkpoints_.begin());
  } else {
    const size_t L = state_a_.size();
    c.a.assign(L, nullptr);
    c.b.assign(L, nullptr);
    try {
      for (size_t l = 0; l < L; l++) {
        if (spec_.attn[l] != AttnKind::kLinear) continue;
        c.a[l] = be_.alloc(state_a_n_[l]);
        c.b[l] = be_.alloc(state_b_n_[l]);
      }
    } catch (...) {
      release(c);
      return;  // no memory for another checkpoint: rewinding just replays more
    }
  }
  c.pos = pos_;
  for (size_t l = 0; l < state_a_.size(); l++) {
    if (!c.a[l]) continue;
    be_.copy(c.a[l], state_a_[l], state_a_n_[l]);
    be_.copy(c.b[l], state_b_[l], state_b_n_[l]);
  }
  checkpoints_.push_back(std::move(c));
}

void Session::restore_and_replay(int p) {
  while (!checkpoints_.empty() && checkpoints_.back().pos > p) {
    release(checkpoints_.back());
    checkpoints_.pop_back();
  }
  if (!has_linear_) {
    // KV rows before p are what they were; rows from p on are overwritten before being read.
    pos_ = p;
    tokens_.resize(size_t(p));
    broken_ = false;
    return;
  }
  int from = 0;
  if (!checkpoints_.empty()) {
    const Checkpoint& c = checkpoints_.back();
    for (size_t l = 0; l < state_a_.size(); l++) {
      if (!c.a[l]) continue;
      be_.copy(state_a_[l], c.a[l], state_a_n_[l]);
      be_.copy(state_b_[l], c.b[l], state_b_n_[l]);
    }
    from = c.pos;
  } else {
    zero_linear_state();
  }
  const std::vector<int32_t> redo(tokens_.begin() + from, tokens_.begin() + p);
  tokens_.resize(size_t(from));
  pos_ = from;
  broken_ = false;
  try {
    if (!redo.empty()) forward_ubatched(redo.data(), int(redo.size()), nullptr, false, nullptr);
  } catch (...) {
    broken_ = true;
    throw;
  }
  if (!redo.empty()) maybe_checkpoint(int(redo.size()));
}

void Session::seq_rm(int p0, int p1) {
  if (p0 < 0 || p0 > pos_)
    fail(ErrorKind::kInvalidArgument, "seq_rm: p0 = {} is outside [0, {}] (the session holds {} "
         "positions)", p0, pos_, pos_);
  if (p1 >= 0 && p1 < p0)
    fail(ErrorKind::kInvalidArgument, "seq_rm: p1 = {} is before p0 = {}", p1, p0);
  if (p1 >= 0 && p1 == p0) return;  // empty range
  if (p1 >= 0 && p1 < pos_)
    fail(ErrorKind::kUnsupported,
         "seq_rm: cannot remove the middle range [{}, {}) of {} positions: only a tail [p0, end) "
         "can be removed (no KV shifting; linear-attention state cannot be cut)",
         p0, p1, pos_);
  if (p0 == pos_ && !broken_) return;
  restore_and_replay(p0);
}

// ---- snapshots --------------------------------------------------------------------------------

uint64_t model_fingerprint(const Model& model) {
  const std::string manifest = model.manifest().to_json().dump();
  uint64_t h = fnv1a64(manifest.data(), manifest.size());
  const uint64_t resident = model.manifest().resident_bytes;
  h = fnv1a64(&resident, sizeof resident, h);
  const size_t H = size_t(model.spec().hidden_size);
  for (const LayerWeights& w : model.layers) {
    h = fnv1a64(w.attn_norm, H * sizeof(float), h);
    h = fnv1a64(w.ffn_norm, H * sizeof(float), h);
  }
  return fnv1a64(model.final_norm, H * sizeof(float), h);
}

namespace {

// Header layout (little-endian; the engine only runs on little-endian hosts).
constexpr char kSnapshotMagic[8] = {'M', 'F', 'S', 'N', 'A', 'P', '\0', '\0'};
enum HeaderOffset : size_t {
  kOffMagic = 0,       // 8 bytes
  kOffVersion = 8,     // u32
  kOffHeaderLen = 12,  // u32, kSnapshotHeaderBytes
  kOffModel = 16,      // u64 model fingerprint
  kOffPayload = 24,    // u64 payload bytes (after the header)
  kOffChecksum = 32,   // u64 FNV-1a 64 of the header with this field zero, then the payload
  kOffPos = 40,        // i32 positions (tokens) held
  kOffLayers = 44,     // i32 layers
  kOffTopK = 48,       // i32 experts per token the state was computed with
  kOffFlags = 52,      // u32, 0
  kOffReserved = 56,   // u64, 0
};
static_assert(kOffReserved + 8 == kSnapshotHeaderBytes);

template <typename T>
T get(const uint8_t* p, size_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof v);
  return v;
}
template <typename T>
void put(uint8_t* p, size_t off, T v) {
  std::memcpy(p + off, &v, sizeof v);
}

uint64_t snapshot_checksum(const uint8_t* p, size_t n) {
  const uint64_t zero = 0;
  uint64_t h = fnv1a64(p, kOffChecksum);
  h = fnv1a64(&zero, sizeof zero, h);
  return fnv1a64(p + kOffChecksum + 8, n - kOffChecksum - 8, h);
}

[[noreturn]] void snapshot_fail(SnapshotError::Reason r, const std::string& msg) {
  const ErrorKind kind = r == SnapshotError::kModel || r == SnapshotError::kParams
                             ? ErrorKind::kInvalidArgument
                             : ErrorKind::kFormat;
  throw SnapshotError(r, kind, "snapshot: " + msg);
}

}  // namespace

std::pair<size_t, size_t> Session::snapshot_floats(size_t l, int pos) const {
  switch (spec_.attn[l]) {
    case AttnKind::kFull: {
      const size_t kvd = size_t(spec_.n_kv_heads) * spec_.head_dim;
      return {size_t(pos) * kvd, size_t(pos) * kvd};
    }
    case AttnKind::kMla:
      return {size_t(pos) * size_t(spec_.kv_floats_per_pos(AttnKind::kMla)), 0};
    case AttnKind::kLinear:
      break;
  }
  return {state_a_n_[l], state_b_n_[l]};
}

size_t Session::state_size() const {
  uint64_t n = kSnapshotHeaderBytes + uint64_t(pos_) * sizeof(int32_t);
  for (size_t l = 0; l < state_a_.size(); l++) {
    const auto [a, b] = snapshot_floats(l, pos_);
    n += uint64_t(a + b) * sizeof(float);
  }
  return size_t(n);
}

void Session::state_save(void* dst, size_t cap) const {
  if (broken_)
    fail(ErrorKind::kInvalidArgument, "state_save: the session's state is invalid (an "
         "evaluation failed midway); nothing to save");
  const size_t n = state_size();
  if (!dst || cap < n)
    fail(ErrorKind::kInvalidArgument, "state_save: the buffer holds {} bytes, the snapshot needs {}",
         dst ? cap : 0, n);
  auto* out = static_cast<uint8_t*>(dst);
  std::memset(out, 0, kSnapshotHeaderBytes);
  std::memcpy(out + kOffMagic, kSnapshotMagic, sizeof kSnapshotMagic);
  put<uint32_t>(out, kOffVersion, kSnapshotVersion);
  put<uint32_t>(out, kOffHeaderLen, uint32_t(kSnapshotHeaderBytes));
  put<uint64_t>(out, kOffModel, fingerprint_);
  put<uint64_t>(out, kOffPayload, uint64_t(n - kSnapshotHeaderBytes));
  put<int32_t>(out, kOffPos, pos_);
  put<int32_t>(out, kOffLayers, spec_.n_layers);
  put<int32_t>(out, kOffTopK, top_k_);
  size_t at = kSnapshotHeaderBytes;
  std::memcpy(out + at, tokens_.data(), tokens_.size() * sizeof(int32_t));
  at += tokens_.size() * sizeof(int32_t);
  // Through a host vector: the caller's buffer need not be float-aligned.
  std::vector<float> host;
  auto take = [&](const float* src, size_t count) {
    host.resize(count);
    be_.download(host.data(), src, count);
    std::memcpy(out + at, host.data(), count * sizeof(float));
    at += count * sizeof(float);
  };
  for (size_t l = 0; l < state_a_.size(); l++) {
    const auto [a, b] = snapshot_floats(l, pos_);
    if (a) take(state_a_[l], a);
    if (b) take(state_b_[l], b);
  }
  MF_CHECK(at == n);
  put<uint64_t>(out, kOffChecksum, snapshot_checksum(out, n));
}

void Session::check_snapshot(const uint8_t* p, size_t n) const {
  using R = SnapshotError;
  if (!p) snapshot_fail(R::kTruncated, "no data (null pointer)");
  if (n < kSnapshotHeaderBytes)
    snapshot_fail(R::kTruncated, fmt::format("{} bytes is shorter than the {}-byte header", n,
                                             kSnapshotHeaderBytes));
  if (std::memcmp(p + kOffMagic, kSnapshotMagic, sizeof kSnapshotMagic) != 0)
    snapshot_fail(R::kBadMagic, "not a moeflux session snapshot (bad magic)");
  const uint32_t version = get<uint32_t>(p, kOffVersion);
  if (version != kSnapshotVersion)
    snapshot_fail(R::kVersion, fmt::format("format version {}; this build reads version {}",
                                           version, kSnapshotVersion));
  if (get<uint32_t>(p, kOffHeaderLen) != kSnapshotHeaderBytes)
    snapshot_fail(R::kCorrupt, fmt::format("header length {} (expected {})",
                                           get<uint32_t>(p, kOffHeaderLen), kSnapshotHeaderBytes));
  const uint64_t model = get<uint64_t>(p, kOffModel);
  if (model != fingerprint_)
    snapshot_fail(R::kModel, fmt::format("taken with another model (fingerprint {:016x}, this "
                                         "model is {:016x})", model, fingerprint_));
  const uint64_t payload = get<uint64_t>(p, kOffPayload), have = n - kSnapshotHeaderBytes;
  if (payload > have)
    snapshot_fail(R::kTruncated, fmt::format("truncated: the header announces {} payload bytes, "
                                             "{} are present", payload, have));
  if (payload < have)
    snapshot_fail(R::kTruncated, fmt::format("{} bytes after the {} payload bytes the header "
                                             "announces", have - payload, payload));
  const uint64_t sum = get<uint64_t>(p, kOffChecksum), want = snapshot_checksum(p, n);
  if (sum != want)
    snapshot_fail(R::kCorrupt, fmt::format("checksum mismatch (stored {:016x}, computed {:016x}): "
                                           "the data is corrupted", sum, want));
  // Past the checksum only a snapshot crafted on purpose can be inconsistent; check anyway.
  if (get<uint32_t>(p, kOffFlags) != 0 || get<uint64_t>(p, kOffReserved) != 0)
    snapshot_fail(R::kCorrupt, "reserved header fields are not zero");
  if (get<int32_t>(p, kOffLayers) != spec_.n_layers)
    snapshot_fail(R::kCorrupt, fmt::format("{} layers, the model has {}",
                                           get<int32_t>(p, kOffLayers), spec_.n_layers));
  const int32_t pos = get<int32_t>(p, kOffPos);
  if (pos < 0) snapshot_fail(R::kCorrupt, fmt::format("negative position count {}", pos));
  const int32_t top_k = get<int32_t>(p, kOffTopK);
  if (top_k != top_k_)
    snapshot_fail(R::kParams, fmt::format("computed with {} experts per token, this session uses "
                                          "{}", top_k, top_k_));
  if (pos > ctx_)
    snapshot_fail(R::kParams, fmt::format("holds {} positions, more than this session's context "
                                          "of {}", pos, ctx_));
  uint64_t expect = uint64_t(pos) * sizeof(int32_t);
  for (size_t l = 0; l < state_a_.size(); l++) {
    const auto [a, b] = snapshot_floats(l, pos);
    expect += uint64_t(a + b) * sizeof(float);
  }
  if (expect != payload)
    snapshot_fail(R::kCorrupt, fmt::format("{} payload bytes, {} positions of this model need {}",
                                           payload, pos, expect));
  for (int32_t t = 0; t < pos; t++) {
    const int32_t tok = get<int32_t>(p + kSnapshotHeaderBytes, size_t(t) * sizeof(int32_t));
    if (tok < 0 || tok >= spec_.vocab_size)
      snapshot_fail(R::kCorrupt, fmt::format("token {} at position {} is out of range [0, {})",
                                             tok, t, spec_.vocab_size));
  }
}

void Session::state_load(const void* src, size_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  check_snapshot(p, n);
  const int pos = get<int32_t>(p, kOffPos);
  size_t at = kSnapshotHeaderBytes;
  std::vector<int32_t> toks(static_cast<size_t>(pos));
  std::memcpy(toks.data(), p + at, toks.size() * sizeof(int32_t));
  at += toks.size() * sizeof(int32_t);
  std::vector<float> host;
  auto give = [&](float* dst, size_t count) {
    host.resize(count);
    std::memcpy(host.data(), p + at, count * sizeof(float));
    be_.upload(dst, host.data(), count);
    at += count * sizeof(float);
  };
  for (size_t l = 0; l < state_a_.size(); l++) {
    const auto [a, b] = snapshot_floats(l, pos);
    if (a) give(state_a_[l], a);
    if (b) give(state_b_[l], b);
  }
  MF_CHECK(at == n);
  tokens_ = std::move(toks);
  pos_ = pos;
  broken_ = false;
  for (Checkpoint& c : checkpoints_) release(c);
  checkpoints_.clear();
  maybe_checkpoint(2);  // a checkpoint at the loaded position (if checkpoints are on)
}

}  // namespace moeflux
