// Session: per-sequence state (KV cache for full-attention layers, conv and recurrent state for
// linear layers, position) and the forward pass over it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "util/hash.h"
#include "util/error.h"

namespace moeflux {

struct SessionParams {
  int ctx = 0;  // maximum positions; 0: min(ctx_train, 4096)
  // Routed experts per token; 0: the model's top-k. Fewer than trained trades quality for
  // bytes (the chosen experts' weights are renormalised as the model says, norm_topk_prob).
  int experts_per_token = 0;
  // Observes routing: for each MoE layer evaluated, the chosen experts [T, k] (k = experts per
  // token) of its T tokens, best first. For statistics tools; null = off.
  std::function<void(int layer, int T, int k, const int* experts)> on_route;

  // Recurrent-state checkpoints, so memory_seq_rm can rewind models with linear-attention
  // layers (whose state cannot be rewound): at most `checkpoints` copies of every linear layer's
  // conv and recurrent state (0: none; rewinding then re-evaluates from position 0). One is
  // taken at the end of every eval of more than one token (a prompt) and of any eval that ends
  // `checkpoint_interval` or more tokens after the newest one; the oldest goes when full.
  int checkpoints = 4;
  int checkpoint_interval = 256;
  // Gated DeltaNet: evals of at least this many tokens use the chunked form
  // (Context::deltanet_chunked, `deltanet_chunk` tokens a chunk), which is NOT bit-identical to
  // the token-by-token recurrence; 0 = always the recurrence (prefill == decode bit for bit).
  // The default is what measured faster on the CPU (docs/2026-11-26-sessions-capi.md).
  int deltanet_chunked_min_tokens = 0;
  int deltanet_chunk = 64;
  // Prompts are evaluated in micro-batches of at most this many tokens, so scratch memory is
  // bounded by the micro-batch, not by the prompt (each expert is fetched once per micro-batch).
  // Results do not depend on it (prefill is bit-identical to decode), except with the chunked
  // DeltaNet form, whose chunks restart at each micro-batch.
  int ubatch = 512;
};

// Why Session::eval refused its input (before anything changed). Kind kInvalidArgument; the C
// API maps the reason to its codes.
class EvalError : public Error {
 public:
  enum Reason {
    kNoTokens,      // T <= 0
    kBadToken,      // an id outside [0, vocab)
    kContextFull,   // pos() + T > ctx()
    kStateInvalid,  // an earlier evaluation failed midway (see Session::valid)
  };
  EvalError(Reason r, const std::string& msg) : Error(ErrorKind::kInvalidArgument, msg), reason_(r) {}
  Reason reason() const { return reason_; }

 private:
  Reason reason_;
};

// Why Session::state_load refused a snapshot (the session is unchanged in every case).
class SnapshotError : public Error {
 public:
  enum Reason {
    kTruncated,  // shorter (or longer) than its header says
    kBadMagic,   // not a moeflux session snapshot
    kVersion,    // written by another snapshot format version
    kCorrupt,    // checksum mismatch or inconsistent fields
    kModel,      // taken with another model (fingerprint differs)
    kParams,     // taken with session settings this session cannot continue (experts per token,
                 // a context too small for it)
  };
  SnapshotError(Reason r, ErrorKind kind, const std::string& msg) : Error(kind, msg), reason_(r) {}
  Reason reason() const { return reason_; }

 private:
  Reason reason_;
};

constexpr uint32_t kSnapshotVersion = 1;
constexpr size_t kSnapshotHeaderBytes = 64;

// A 64-bit identity of a loaded package: FNV-1a over its normalised manifest (spec, tensor table,
// provenance), the size of resident.bin, and every norm weight vector (so two packages of one
// shape with other weights differ too). Snapshots carry it.
uint64_t model_fingerprint(const Model& model);

// Receives HF-numbered hidden states: index 0 = embeddings, i = residual after layer i-1,
// n_layers = final-normed state. `h` is host memory [T, hidden].
using HiddenSink = std::function<void(int index, const float* h, int T)>;

class Session {
 public:
  // `context` runs the session's ops (one session per context at a time) and binds the model on
  // its device; `store` must hold its experts in that device's expert memory.
  Session(const Model& model, Context& context, ExpertStore& store, SessionParams params = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Evaluates T tokens at positions pos()..pos()+T-1, in micro-batches of at most
  // SessionParams::ubatch tokens. With `logits` non-null it receives [T, vocab] when
  // all_logits, else [1, vocab] for the last token; `hidden` receives each index once with all
  // T rows. Throws EvalError for no tokens, an out-of-range token id, a full context or an
  // invalid state, before any state changes.
  void eval(const int32_t* tokens, int T, float* logits, bool all_logits,
            const HiddenSink& hidden = nullptr);

  int pos() const { return pos_; }
  int ctx() const { return ctx_; }
  // Forgets everything: position 0, zero linear-attention state, no checkpoints, no history.
  void clear();

  // The tokens at positions 0..pos()-1 (what was evaluated; seq_rm re-evaluates from it).
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // The last position holding a token: pos() - 1, -1 when empty.
  int pos_max() const { return pos_ - 1; }
  // Removes positions [p0, p1) (p1 < 0: to the end) so the next token goes at p0.
  //   * 0 <= p0 <= pos() (else Error kInvalidArgument); p1 >= 0 and p1 < p0 is kInvalidArgument;
  //     an empty range (p0 == pos(), or p1 == p0) changes nothing.
  //   * Only a tail can go: p0 < p1 < pos() (a middle range) throws Error kUnsupported and
  //     changes nothing, for every model (no KV shifting/RoPE re-rotation).
  //   * Full-attention KV is cut. Linear-attention state cannot be rewound: the newest checkpoint
  //     at or before p0 (or the zero state at 0) is restored and the tokens from there to p0 are
  //     evaluated again from the history, so the result is the state a fresh session fed the
  //     first p0 tokens would hold (bit-identical with the recurrence).
  // A failed re-evaluation (expert read error) leaves the session invalid (see valid()).
  void seq_rm(int p0, int p1);
  // False after an evaluation failed midway (its state is partly updated): eval refuses until
  // clear, seq_rm or state_load puts the session back on a consistent state.
  bool valid() const { return !broken_; }
  int checkpoint_count() const { return int(checkpoints_.size()); }
  // Positions of the checkpoints held now, oldest first.
  std::vector<int> checkpoint_positions() const;

  // Snapshots: a 64-byte header (magic, version, model fingerprint, payload size, FNV-1a 64
  // checksum of header + payload, position, experts per token) then the token history, the K/V
  // rows [0, pos) of each full-attention layer and the conv + recurrent state of each linear
  // layer (little-endian f32). Checkpoints are not saved; loading takes one at the loaded position.
  size_t state_size() const;
  // Writes state_size() bytes to dst (cap must be at least that; else Error kInvalidArgument).
  void state_save(void* dst, size_t cap) const;
  // Replaces the session's state with a snapshot. Every check (size, magic, version, model,
  // checksum, fields) runs before anything changes: on a SnapshotError the session is as it was.
  void state_load(const void* src, size_t n);
  uint64_t fingerprint() const { return fingerprint_; }
  // Decode steps run as one replay of a recorded forward pass (a CUDA graph; never on the CPU).
  int64_t replayed_steps() const { return replayed_steps_; }

 private:
  // The workspace: context memory sized once from the spec and the micro-batch U, at fixed
  // addresses (a captured decode graph replays over them). Shapes per micro-batch of T <= U.
  struct Workspace {
    int32_t* tokens = nullptr;  // [U]
    float* x = nullptr;         // [U, H] residual stream
    float* xn = nullptr;        // [U, H] normed input of the current block
    float* mix = nullptr;       // [U, H] attention / FFN output, added to x
    // full attention
    float* q = nullptr;  // [U, q_rows] (per head: head_dim queries, then head_dim gates)
    float* k = nullptr;  // [U, kv_dim]
    float* v = nullptr;  // [U, kv_dim]
    float* o = nullptr;  // [U, n_heads * head_dim] (MLA: [U, n_heads * v_head_dim])
    // multi-head latent attention (q above: [U, n_heads * head_dim], per head [nope | rope])
    float* qa = nullptr;        // [U, q_lora_rank] compressed query
    float* kva = nullptr;       // [U, kv_lora + rope_dim] latent | rope key, as cached
    float* qlat = nullptr;      // [U, n_heads, kv_lora + rope_dim] absorbed query | rope query
    float* olat = nullptr;      // [U, n_heads * kv_lora] attention output in the latent space
    float* inv_freq = nullptr;  // [rope_dim / 2] scaled rope frequencies (YaRN), or null
    // linear attention (Gated DeltaNet)
    float* qkv = nullptr;   // [U, C] projections
    float* conv = nullptr;  // [U, C] after conv1d + SiLU
    float* z = nullptr;     // [U, v_heads * v_dim] output gate
    float* core = nullptr;  // [U, v_heads * v_dim] delta-rule output
    float* la = nullptr;    // [U, v_heads] a -> g
    float* lb = nullptr;    // [U, v_heads] b -> beta
    // MoE
    float* router = nullptr;      // [U, E] logits
    int32_t* ids = nullptr;       // [U, k] chosen experts, best first
    float* weights = nullptr;     // [U, k]
    float* xp = nullptr;          // [U, H] prefetch: x normed for the next MoE layer
    int32_t* ids_next = nullptr;  // [U, k] prefetch: its router's guess
    // dense FFN
    float* g = nullptr;  // [U, dense_ffn]
    float* u = nullptr;  // [U, dense_ffn]
    float* logits = nullptr;  // [kLogitRows, V]
  };
  static constexpr int kLogitRows = 64;  // all-logits evals run the lm_head this many rows at a time
  void alloc_workspace();
  void release_workspace();
  void full_attention(int l, int T);
  // y[t] += b for T rows of n floats (the biases of GLM-4.5's and gpt-oss's projections and
  // gpt-oss's router).
  void add_rows(float* y, const float* b, int T, int n);
  void mla_attention(int l, int T);
  void linear_attention(int l, int T);
  RouteParams route_params(const LayerWeights& w) const;
  // Floats of layer l's state a and b a snapshot of `pos` positions holds.
  std::pair<size_t, size_t> snapshot_floats(size_t l, int pos) const;
  void moe(int l, int T);
  void prefetch_next(int l, int T);
  void score_prediction(int moe_index, const std::vector<int>& used);
  void dense_ffn(int l, int T);
  // Throws kNumeric naming the first layer (-1: the embedding) and position where the residual
  // stream held a NaN/Inf in the evaluation just run, if any.
  void raise_nonfinite();
  void forward(const int32_t* tokens, int T, float* logits, bool all_logits,
               const HiddenSink& hidden);
  void layers(int T, const std::function<void(int, const float*)>& emit);
  bool replay_decode();
  void forward_ubatched(const int32_t* tokens, int T, float* logits, bool all_logits,
                        const HiddenSink& hidden);
  void validate_tokens(const int32_t* tokens, int T) const;
  void maybe_checkpoint(int T);
  void restore_and_replay(int p);
  void zero_linear_state();
  void check_snapshot(const uint8_t* src, size_t n) const;

  // A copy of every linear layer's conv (a) and recurrent (b) state at position `pos`, context
  // memory, indexed like state_a_/state_b_ (null for full-attention layers).
  struct Checkpoint {
    int pos = 0;
    std::vector<float*> a, b;
  };
  void release(Checkpoint& c);

  const Model& model_;
  const ModelSpec& spec_;
  Context& be_;
  std::shared_ptr<const ModelWeights> weights_;  // bound on be_'s device
  const ModelWeights& w_;
  ExpertStore& store_;
  int ctx_ = 0, pos_ = 0;
  int top_k_ = 0;  // routed experts per token
  std::function<void(int, int, int, const int*)> on_route_;
  // state, context memory: per layer either K and V caches [ctx, kv_dim], the MLA cache
  // [ctx, kv_lora + rope_dim] (b null), or conv state [K-1, qkv_dim] and recurrent state
  // [v_heads, k_dim, v_dim]
  std::vector<float*> state_a_, state_b_;
  std::vector<size_t> state_a_n_, state_b_n_;
  int ubatch_cap_ = 0;  // U: the workspace's micro-batch
  Workspace ws_;
  std::vector<void*> ws_blocks_;
  // prefetch: the experts predicted for each MoE layer (sorted), scored at its next fetch
  std::vector<std::vector<int>> predicted_;
  // memory: token history [pos], checkpoints (oldest first), session settings
  std::vector<int32_t> tokens_;
  std::vector<Checkpoint> checkpoints_;
  int max_checkpoints_ = 0, checkpoint_interval_ = 0;
  int chunked_min_ = 0, chunk_ = 64;
  int ubatch_ = 512;
  bool has_linear_ = false;
  bool broken_ = false;
  uint64_t fingerprint_ = 0;
  // Decode steps replayed from one recording (replay_decode).
  enum class DecodeReplay { kFirst, kRecordNext, kNever };
  DecodeReplay decode_ = DecodeReplay::kFirst;
  std::unique_ptr<Context::Recording> decode_rec_;
  int64_t replayed_steps_ = 0;
};

}  // namespace moeflux
