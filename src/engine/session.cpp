#include "engine/session.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "util/error.h"

namespace moeflux {

namespace {
// Scratch slots; each op's temporaries get a fixed slot so buffers are reused across layers.
enum Slot : size_t {
  kX, kXn, kAttnOut, kFfnOut, kA, kB, kC, kD, kE, kF, kG, kHost, kSlots, kNumSlots
};
}  // namespace

Session::Session(const Model& model, Backend& backend, ExpertStore& store, SessionParams params)
    : model_(model), spec_(model.spec()), be_(backend), store_(store) {
  ctx_ = params.ctx > 0 ? params.ctx : std::min(spec_.ctx_train > 0 ? spec_.ctx_train : 4096, 4096);
  const ModelSpec& s = spec_;
  if (params.ctx < 0) fail(ErrorKind::kInvalidArgument, "context size {} is negative", params.ctx);
  if (params.experts_per_token < 0 || params.experts_per_token > s.n_experts)
    fail(ErrorKind::kInvalidArgument, "experts per token {} is not in [0, {}] (0: the model's {})",
         params.experts_per_token, s.n_experts, s.top_k);
  top_k_ = params.experts_per_token > 0 ? params.experts_per_token : s.top_k;
  on_route_ = params.on_route;
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
      } else {
        na = size_t(s.conv_kernel - 1) * s.lin_qkv_dim();
        nb = size_t(s.lin_v_heads) * s.lin_k_dim * s.lin_v_dim;
      }
      state_a_.push_back(be_.alloc(na));
      state_b_.push_back(be_.alloc(nb));
      state_a_n_.push_back(na);
      state_b_n_.push_back(nb);
    }
  } catch (...) {
    // The destructor does not run for a throwing constructor: give back what was allocated.
    for (float* p : state_a_) be_.release(p);
    for (float* p : state_b_) be_.release(p);
    throw;
  }
  scratch_.assign(kNumSlots, nullptr);
  scratch_n_.assign(kNumSlots, 0);
  predicted_.resize(size_t(s.n_moe_layers()));
}

Session::~Session() {
  for (Checkpoint& c : checkpoints_) release(c);
  for (float* p : state_a_) be_.release(p);
  for (float* p : state_b_) be_.release(p);
  for (float* p : scratch_) if (p) be_.release(p);
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

float* Session::buf(size_t slot, size_t n) {
  if (scratch_n_[slot] < n) {
    if (scratch_[slot]) be_.release(scratch_[slot]);
    scratch_[slot] = be_.alloc(n);
    scratch_n_[slot] = n;
  }
  return scratch_[slot];
}

void Session::validate_tokens(const int32_t* tokens, int T) const {
  const ModelSpec& s = spec_;
  if (T <= 0) fail(ErrorKind::kInvalidArgument, "no tokens to evaluate");
  for (int t = 0; t < T; t++)
    if (tokens[t] < 0 || tokens[t] >= s.vocab_size)
      fail(ErrorKind::kInvalidArgument, "token id {} at position {} is out of range [0, {})",
           tokens[t], pos_ + t, s.vocab_size);
  if (int64_t(pos_) + T > ctx_)
    fail(ErrorKind::kInvalidArgument,
         "context full: {} tokens at position {} exceed the context of {} positions", T, pos_,
         ctx_);
}

void Session::eval(const int32_t* tokens, int T, float* logits, bool all_logits,
                   const HiddenSink& hidden) {
  validate_tokens(tokens, T);
  if (broken_)
    fail(ErrorKind::kInvalidArgument,
         "the session's state is invalid (an evaluation failed midway at position {}): clear "
         "it, rewind it with seq_rm or load a snapshot",
         pos_);
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
  float* x = buf(kX, TH);
  float* xn = buf(kXn, TH);
  float* attn_out = buf(kAttnOut, TH);
  float* ffn_out = buf(kFfnOut, TH);
  std::vector<float> host;
  auto emit = [&](int index, const float* v) {
    if (!hidden) return;
    host.resize(TH);
    be_.download(host.data(), v, TH);
    hidden(index, host.data(), T);
  };

  be_.embed(model_.embed, tokens, T, x);
  check_finite(-1, x, T);
  for (int l = 0; l < s.n_layers; l++) {
    emit(l, x);
    const LayerWeights& w = model_.layers[size_t(l)];
    be_.rmsnorm(x, w.attn_norm, xn, T, H, H, s.rms_eps);
    if (w.attn == AttnKind::kFull) full_attention(l, xn, attn_out, T);
    else linear_attention(l, xn, attn_out, T);
    be_.add(x, attn_out, TH);
    be_.rmsnorm(x, w.ffn_norm, xn, T, H, H, s.rms_eps);
    if (w.ffn == FfnKind::kMoe) moe(l, x, xn, ffn_out, T);
    else dense_ffn(l, xn, ffn_out, T);
    be_.add(x, ffn_out, TH);
    check_finite(l, x, T);
  }
  be_.rmsnorm(x, model_.final_norm, xn, T, H, H, s.rms_eps);
  emit(s.n_layers, xn);
  pos_ += T;
  tokens_.insert(tokens_.end(), tokens, tokens + T);
  if (logits) {
    const int rows = all_logits ? T : 1;
    const float* src = all_logits ? xn : xn + size_t(T - 1) * H;
    float* out = buf(kA, size_t(rows) * s.vocab_size);
    be_.matmul(model_.lm_head, src, out, rows);
    be_.download(logits, out, size_t(rows) * s.vocab_size);
  }
}

// NaN/Inf in the residual stream never heals (every later layer adds to it) and turns every
// logit into NaN; stop at the first layer that makes one, naming it. Cost: one read of [T, H]
// per layer, next to the layer's weight reads (docs/2026-12-03-hostile-inputs.md).
void Session::check_finite(int l, const float* x, int T) {
  const size_t H = size_t(spec_.hidden_size), n = size_t(T) * H;
  const size_t i = be_.first_nonfinite(x, n);
  if (i == n) return;
  const std::string what =
      l < 0 ? std::string("the token embedding (before layer 0)") : fmt::format("layer {}", l);
  fail(ErrorKind::kNumeric, "{} produced NaN/Inf at position {} (package resident weights "
       "corrupt?)", what, pos_ + int(i / H));
}

void Session::full_attention(int l, const float* xn, float* out, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = model_.layers[size_t(l)];
  const int hd = s.head_dim, nh = s.n_heads, nkv = s.n_kv_heads;
  const int kvd = nkv * hd, q_rows = s.q_rows(), qhs = s.attn_output_gate ? 2 * hd : hd;
  float* q = buf(kA, size_t(T) * q_rows);  // [T, nh * (hd | 2hd)]
  float* k = buf(kB, size_t(T) * kvd);
  float* v = buf(kC, size_t(T) * kvd);
  float* o = buf(kD, size_t(T) * nh * hd);
  be_.matmul(w.q, xn, q, T);
  be_.matmul(w.k, xn, k, T);
  be_.matmul(w.v, xn, v, T);
  if (w.q_norm) be_.rmsnorm(q, w.q_norm, q, T * nh, hd, qhs, s.rms_eps);
  if (w.k_norm) be_.rmsnorm(k, w.k_norm, k, T * nkv, hd, hd, s.rms_eps);
  if (s.rope_dim > 0) {
    be_.rope(q, T, nh, q_rows, qhs, s.rope_dim, pos_, s.rope_theta);
    be_.rope(k, T, nkv, kvd, hd, s.rope_dim, pos_, s.rope_theta);
  }
  float* kc = state_a_[size_t(l)];
  float* vc = state_b_[size_t(l)];
  be_.copy(kc + size_t(pos_) * kvd, k, size_t(T) * kvd);
  be_.copy(vc + size_t(pos_) * kvd, v, size_t(T) * kvd);
  AttentionParams p{nh, nkv, hd, q_rows, qhs, kvd, 1.0f / std::sqrt(float(hd))};
  be_.attention(q, kc, vc, o, T, pos_, p);
  if (s.attn_output_gate) be_.mul_sigmoid_gate(o, q + hd, T, nh, hd, q_rows, qhs);
  be_.matmul(w.o, o, out, T);
}

void Session::linear_attention(int l, const float* xn, float* out, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = model_.layers[size_t(l)];
  const int C = s.lin_qkv_dim(), vd = s.lin_value_dim(), nv = s.lin_v_heads;
  float* qkv = buf(kA, size_t(T) * C);
  float* z = buf(kB, size_t(T) * vd);
  float* b = buf(kC, size_t(T) * nv);
  float* a = buf(kD, size_t(T) * nv);
  float* conv = buf(kE, size_t(T) * C);
  float* core = buf(kF, size_t(T) * vd);
  be_.matmul(w.lin_qkv, xn, qkv, T);
  be_.matmul(w.lin_z, xn, z, T);
  be_.matmul(w.lin_b, xn, b, T);
  be_.matmul(w.lin_a, xn, a, T);
  be_.conv1d_silu(qkv, state_a_[size_t(l)], w.conv, conv, T, C, s.conv_kernel);
  be_.deltanet_gates(a, b, w.A_log, w.dt_bias, T, nv);
  DeltaNetParams p{s.lin_k_heads, nv, s.lin_k_dim, s.lin_v_dim};
  if (chunked_min_ > 0 && T >= chunked_min_)
    be_.deltanet_chunked(conv, a, b, state_b_[size_t(l)], core, T, p, chunk_);
  else
    be_.deltanet(conv, a, b, state_b_[size_t(l)], core, T, p);
  be_.gated_rmsnorm(core, z, w.lin_norm, T * nv, s.lin_v_dim, s.rms_eps);
  be_.matmul(w.lin_out, core, out, T);
}

void Session::moe(int l, const float* x, const float* xn, float* out, int T) {
  const ModelSpec& s = spec_;
  const LayerWeights& w = model_.layers[size_t(l)];
  const int H = s.hidden_size, E = s.n_experts, K = top_k_, I = s.moe_ffn;

  // Routing on the host: softmax over all experts, top-k (ties to the lower index),
  // renormalised over the k when norm_topk_prob.
  float* rl = buf(kA, size_t(T) * E);
  be_.matmul(w.router, xn, rl, T);
  std::vector<float> logits(size_t(T) * E);
  be_.download(logits.data(), rl, logits.size());
  std::vector<int> sel(size_t(T) * K);
  std::vector<float> wts(size_t(T) * K);
  std::vector<int> order(static_cast<size_t>(E));
  std::vector<double> prob(static_cast<size_t>(E));
  for (int t = 0; t < T; t++) {
    const float* lg = logits.data() + size_t(t) * E;
    const float mx = *std::max_element(lg, lg + E);
    double sum = 0;
    for (int e = 0; e < E; e++) sum += (prob[size_t(e)] = std::exp(double(lg[e]) - mx));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int b) {
      return lg[a] != lg[b] ? lg[a] > lg[b] : a < b;
    });
    double top = 0;
    for (int j = 0; j < K; j++) top += prob[size_t(order[size_t(j)])];
    for (int j = 0; j < K; j++) {
      const int e = order[size_t(j)];
      sel[size_t(t) * K + j] = e;
      wts[size_t(t) * K + j] =
          float(s.norm_topk_prob ? prob[size_t(e)] / top : prob[size_t(e)] / sum);
    }
  }

  if (on_route_) on_route_(l, T, K, sel.data());

  // Group by expert so each routed expert is fetched once and applied to all its tokens.
  std::vector<std::vector<int>> slots_of(static_cast<size_t>(E));
  for (int i = 0; i < T * K; i++) slots_of[size_t(sel[size_t(i)])].push_back(i);
  std::vector<int> used;
  for (int e = 0; e < E; e++)
    if (!slots_of[size_t(e)].empty()) used.push_back(e);
  auto batch = store_.fetch(w.moe_index, used);
  score_prediction(w.moe_index, used);
  // While this layer's experts arrive: guess the next MoE layer's and start reading them.
  if (store_.options().prefetch) prefetch_next(l, x, T);

  // Experts in arrival order; each writes only its own slots and sum_slots adds the K slots of
  // a token in a fixed order, so the result does not depend on the order they came in.
  float* slots = buf(kSlots, size_t(T) * K * H);
  float* xe = buf(kB, size_t(T) * H);
  float* g = buf(kC, size_t(T) * I);
  float* u = buf(kD, size_t(T) * I);
  float* y = buf(kE, size_t(T) * H);
  std::vector<int32_t> rows, dst;
  std::vector<float> scale;
  for (size_t done = 0; done < used.size(); done++) {
    const size_t i = batch->next();
    const ExpertWeights& ew = batch->weights(i);
    const auto& sl = slots_of[size_t(used[i])];
    const int n = int(sl.size());
    rows.clear();
    dst.clear();
    scale.clear();
    for (int slot : sl) {
      rows.push_back(slot / K);
      dst.push_back(slot);
      scale.push_back(wts[size_t(slot)]);
    }
    be_.gather_rows(xn, rows.data(), n, H, xe);
    be_.matmul(ew.gate, xe, g, n);
    be_.matmul(ew.up, xe, u, n);
    be_.silu_mul(g, u, size_t(n) * I);
    be_.matmul(ew.down, g, y, n);
    be_.scatter_rows_scaled(y, dst.data(), scale.data(), n, H, slots);
  }
  batch.reset();  // unpins this layer's experts
  be_.sum_slots(slots, T, K, H, out);

  if (s.shared_ffn > 0) {
    const int S = s.shared_ffn;
    float* sg = buf(kC, size_t(T) * S);
    float* su = buf(kD, size_t(T) * S);
    float* sy = buf(kE, size_t(T) * H);
    float* sr = buf(kF, size_t(T));
    be_.matmul(w.sh_gate, xn, sg, T);
    be_.matmul(w.sh_up, xn, su, T);
    be_.silu_mul(sg, su, size_t(T) * S);
    be_.matmul(w.sh_down, sg, sy, T);
    be_.matmul(w.sh_router, xn, sr, T);
    be_.scale_rows_sigmoid(sy, sr, T, H);
    be_.add(out, sy, size_t(T) * H);
  }
}

void Session::score_prediction(int moe_index, const std::vector<int>& used) {
  auto& pred = predicted_[size_t(moe_index)];
  if (pred.empty()) return;
  uint64_t hit = 0;
  for (int e : used) hit += std::binary_search(pred.begin(), pred.end(), e);
  store_.note_prediction(moe_index, used.size(), hit);
  pred.clear();
}

void Session::prefetch_next(int l, const float* x, int T) {
  const ModelSpec& s = spec_;
  int nl = l + 1;
  while (nl < s.n_layers && model_.layers[size_t(nl)].ffn != FfnKind::kMoe) nl++;
  if (nl >= s.n_layers) return;
  // Layer nl's router applied to the residual stream as it stands (after layer l's attention),
  // normed with layer nl's FFN norm: the input layer nl's router will see, minus what layers
  // l..nl-1 still add.
  const LayerWeights& w = model_.layers[size_t(nl)];
  const int H = s.hidden_size, E = s.n_experts, K = top_k_;
  float* xp = buf(kG, size_t(T) * H);
  be_.rmsnorm(x, w.ffn_norm, xp, T, H, H, s.rms_eps);
  float* rl = buf(kF, size_t(T) * E);
  be_.matmul(w.router, xp, rl, T);
  std::vector<float> logits(size_t(T) * E);
  be_.download(logits.data(), rl, logits.size());
  std::vector<char> want(static_cast<size_t>(E), 0);
  std::vector<int> order(static_cast<size_t>(E));
  for (int t = 0; t < T; t++) {
    const float* lg = logits.data() + size_t(t) * E;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int b) {
      return lg[a] != lg[b] ? lg[a] > lg[b] : a < b;
    });
    for (int j = 0; j < K; j++) want[size_t(order[size_t(j)])] = 1;
  }
  auto& pred = predicted_[size_t(w.moe_index)];
  pred.clear();
  for (int e = 0; e < E; e++)
    if (want[size_t(e)]) pred.push_back(e);
  store_.prefetch(w.moe_index, pred);
}

void Session::dense_ffn(int l, const float* xn, float* out, int T) {
  const LayerWeights& w = model_.layers[size_t(l)];
  const int I = spec_.dense_ffn;
  float* g = buf(kC, size_t(T) * I);
  float* u = buf(kD, size_t(T) * I);
  be_.matmul(w.ffn_gate, xn, g, T);
  be_.matmul(w.ffn_up, xn, u, T);
  be_.silu_mul(g, u, size_t(T) * I);
  be_.matmul(w.ffn_down, g, out, T);
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

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

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

size_t Session::state_size() const {
  uint64_t n = kSnapshotHeaderBytes + uint64_t(pos_) * sizeof(int32_t);
  const uint64_t kvd = uint64_t(spec_.n_kv_heads) * spec_.head_dim;
  for (size_t l = 0; l < state_a_.size(); l++)
    n += spec_.attn[l] == AttnKind::kFull ? 2 * uint64_t(pos_) * kvd * sizeof(float)
                                          : (state_a_n_[l] + state_b_n_[l]) * sizeof(float);
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
  const size_t kvd = size_t(spec_.n_kv_heads) * spec_.head_dim;
  for (size_t l = 0; l < state_a_.size(); l++) {
    if (spec_.attn[l] == AttnKind::kFull) {
      take(state_a_[l], size_t(pos_) * kvd);
      take(state_b_[l], size_t(pos_) * kvd);
    } else {
      take(state_a_[l], state_a_n_[l]);
      take(state_b_[l], state_b_n_[l]);
    }
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
  const uint64_t kvd = uint64_t(spec_.n_kv_heads) * spec_.head_dim;
  for (size_t l = 0; l < state_a_.size(); l++)
    expect += spec_.attn[l] == AttnKind::kFull ? 2 * uint64_t(pos) * kvd * sizeof(float)
                                               : (state_a_n_[l] + state_b_n_[l]) * sizeof(float);
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
  const size_t kvd = size_t(spec_.n_kv_heads) * spec_.head_dim;
  for (size_t l = 0; l < state_a_.size(); l++) {
    if (spec_.attn[l] == AttnKind::kFull) {
      give(state_a_[l], size_t(pos) * kvd);
      give(state_b_[l], size_t(pos) * kvd);
    } else {
      give(state_a_[l], state_a_n_[l]);
      give(state_b_[l], state_b_n_[l]);
    }
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
