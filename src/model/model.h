// A loaded package: the manifest, resident.bin mapped read-only, and per-layer weight views
// bound by name with dtype and shape checked (errors say expected vs actual).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "format/package.h"
#include "util/mapped_file.h"

namespace moeflux {

// A row-major matrix [rows, cols] in package memory: f32, bf16, f16, or quantised (q8/q4/q2:
// `data` is the packed u32 words [rows, cols*bits/32], with bf16 scales and biases
// [rows, cols/group]; see format/quant.h), or mxfp4 (`data` the e2m1 nibbles [rows, cols/2],
// `e8m0` the scales [rows, cols/32]; format/mxfp4.h).
struct Mat {
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  int group = 0;
  const uint8_t* e8m0 = nullptr;  // mxfp4: the scales [rows, cols/32] (`data`: the nibbles)
  explicit operator bool() const { return data != nullptr; }
};

// A view of a package tensor whose bytes start at `base`.
Mat mat_view(const PackedTensor& t, const uint8_t* base);
// Rows [r0, r0 + n) of m as a matrix of its own (the same memory).
Mat mat_rows(const Mat& m, int64_t r0, int64_t n);
// Row r of m as f32 (dequantised for q8/q4/q2), out: [m.cols].
void mat_row_f32(const Mat& m, int64_t r, float* out);

struct LayerWeights {
  AttnKind attn;
  FfnKind ffn;
  const float* attn_norm = nullptr;  // [H], 1+w already folded in by the converter
  const float* ffn_norm = nullptr;   // [H]
  // full attention
  Mat q, k, v, o;
  const float* q_norm = nullptr;  // [head_dim] or null
  const float* k_norm = nullptr;
  const float* q_bias = nullptr;  // [q rows], [kv_heads * head_dim] x2, or null (GLM-4.5, gpt-oss)
  const float* k_bias = nullptr;
  const float* v_bias = nullptr;
  // multi-head latent attention (q is `q` above when q_lora_rank is 0, `o` the output)
  Mat q_a, q_b;                      // [q_lora, H], [n_heads * head_dim, q_lora]
  const float* q_a_norm = nullptr;   // [q_lora]
  Mat kv_a;                          // [kv_lora + rope_dim, H]: latent, then the rope key
  const float* kv_a_norm = nullptr;  // [kv_lora]
  Mat k_b;  // [n_heads * kv_lora, nope]: per head, kv_b_proj's key rows transposed
  Mat v_b;  // [n_heads * v_head_dim, kv_lora]: per head, kv_b_proj's value rows
  // linear attention (Gated DeltaNet)
  Mat lin_qkv, lin_z, lin_b, lin_a, lin_out;
  const float* conv = nullptr;     // [qkv_dim, conv_kernel]
  const float* A_log = nullptr;    // [v_heads]
  const float* dt_bias = nullptr;  // [v_heads]
  const float* lin_norm = nullptr;  // [v_dim]
  // gpt-oss: the output projection's bias, sinks (null when the arch has none)
  const float* o_bias = nullptr;  // [H]
  const float* sinks = nullptr;   // [n_heads]
  // MoE
  Mat router;  // [E, H] f32
  const float* router_logit_bias = nullptr;  // [E] added to the logits (gpt-oss) or null
  const float* gate_bias = nullptr;          // [E, I] per-expert biases (gpt-oss) or null
  const float* up_bias = nullptr;            // [E, I]
  const float* down_bias = nullptr;          // [E, H]
  const float* router_bias = nullptr;      // [E] selection bias (sigmoid routing) or null
  Mat sh_gate, sh_up, sh_down, sh_router;  // shared expert; sh_router [1, H] f32
  int moe_index = -1;  // index of this layer's expert file
  // dense FFN
  Mat ffn_gate, ffn_up, ffn_down;
};

// The weights of one routed expert.
struct ExpertWeights {
  Mat gate, up, down;  // [I, H], [I, H], [H, I]
};

// A model's resident weights as a device's ops read them (Device::bind): on the CPU, views of
// the Model's own memory; on a GPU, device copies.
struct ModelWeights {
  Mat embed, lm_head;  // lm_head aliases embed when tied
  const float* final_norm = nullptr;
  std::vector<LayerWeights> layers;
};

class Model {
 public:
  // Reads and validates the package; throws Error naming the file/tensor/field.
  // The resident weights are read into (huge-page) memory, or mapped with `use_mmap` (faster
  // start, shared page cache, more page faults and TLB misses while running).
  //
  // Every package file is opened once here and kept open (expert files too: ExpertStore
  // reads through expert_fd), so a package replaced on disk by rename, as convert and synth
  // replace one, does not reach a loaded Model; a package replaced while it loads is an error.
  static std::unique_ptr<Model> load(const std::string& dir, bool use_mmap = false);
  ~Model();

  // One line when moeflux.json or resident.bin under dir() is no longer the file loaded
  // (replaced, rewritten, removed: another inode, size or mtime); empty while unchanged. The
  // Model goes on with what it loaded.
  std::string changed_on_disk() const;
  // Throws Error (kIo) when the mapped resident.bin (use_mmap) has shrunk below its loaded
  // size, where touching a weight would raise SIGBUS; Session::eval calls it first. A
  // truncation after this check is not caught (docs/2026-12-03-atomic-writes.md).
  void check_resident() const;
  // The open expert file of MoE layer i (index into manifest().experts.layers).
  int expert_fd(size_t i) const { return expert_fds_.at(i); }

  // The resident weights as views of this Model's memory (what the CPU device binds).
  ModelWeights host_weights() const { return {embed, lm_head, final_norm, layers}; }

  const ModelSpec& spec() const { return manifest_.spec; }
  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }

  Mat embed, lm_head;  // lm_head aliases embed when tied
  const float* final_norm = nullptr;
  std::vector<LayerWeights> layers;

 private:
  Mat bind_mat(const std::string& name, int64_t rows, int64_t cols, bool f32_only = false);
  const float* bind_vec(const std::string& name, std::vector<int64_t> shape);
  const PackedTensor& find(const std::string& name);

  std::string dir_;
  Manifest manifest_;
  MappedFile resident_;
  FileIdentity manifest_id_;     // moeflux.json as read
  std::vector<int> expert_fds_;  // [moe layer], O_RDONLY
};

}  // namespace moeflux
