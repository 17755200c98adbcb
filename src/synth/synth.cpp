#include "synth/synth.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <numeric>

#include "format/mxfp4.h"
#include "format/quant.h"
#include "format/schema.h"
#include "text/tokenizer.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/half.h"
#include "util/mapped_file.h"
#include "util/progress.h"
#include "util/thread_pool.h"

namespace moeflux {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Presets: the normalised spec of each real model's config.json (sources and the numbers' path
// through format/hf_config.cpp are in docs/2026-11-26-synth.md).

namespace {

struct HybridShape {
  std::string arch;
  int vocab, hidden, layers;
  int heads, kv_heads, head_dim;
  int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim;
  int experts, top_k, moe_ffn, shared_ffn;
  int ctx;
  std::vector<int> eos;
};

// Qwen3.5-MoE and Qwen3-Next: 3 Gated DeltaNet layers then 1 gated full-attention layer
// (full_attention_interval 4), partial RoPE 0.25 with theta 1e7, conv 4, shared expert.
ModelSpec hybrid(const HybridShape& h) {
  ModelSpec s;
  s.arch = h.arch;
  s.vocab_size = h.vocab;
  s.hidden_size = h.hidden;
  s.n_layers = h.layers;
  for (int i = 0; i < h.layers; i++) {
    s.attn.push_back((i + 1) % 4 == 0 ? AttnKind::kFull : AttnKind::kLinear);
    s.ffn.push_back(FfnKind::kMoe);
  }
  s.rms_eps = 1e-6f;
  s.n_heads = h.heads;
  s.n_kv_heads = h.kv_heads;
  s.head_dim = h.head_dim;
  s.attn_output_gate = true;
  s.qk_norm = true;
  s.rope_dim = h.head_dim / 4;
  s.rope_theta = 1e7;
  s.lin_k_heads = h.lin_k_heads;
  s.lin_v_heads = h.lin_v_heads;
  s.lin_k_dim = h.lin_k_dim;
  s.lin_v_dim = h.lin_v_dim;
  s.conv_kernel = 4;
  s.n_experts = h.experts;
  s.top_k = h.top_k;
  s.moe_ffn = h.moe_ffn;
  s.norm_topk_prob = true;
  s.shared_ffn = h.shared_ffn;
  s.tie_embeddings = false;
  s.ctx_train = h.ctx;
  s.eos_ids = h.eos;
  return s;
}

// Qwen3-MoE and Mixtral: every layer full attention, no output gate, no shared expert.
ModelSpec full_attention(const std::string& arch, int vocab, int hidden, int layers, int heads,
                         int kv_heads, int head_dim, int experts, int top_k, int moe_ffn,
                         double theta, float eps, int ctx, std::vector<int> eos, int bos) {
  ModelSpec s;
  s.arch = arch;
  s.vocab_size = vocab;
  s.hidden_size = hidden;
  s.n_layers = layers;
  s.attn.assign(size_t(layers), AttnKind::kFull);
  s.ffn.assign(size_t(layers), FfnKind::kMoe);
  s.rms_eps = eps;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.attn_output_gate = false;
  s.qk_norm = arch != "mixtral";
  s.rope_dim = head_dim;
  s.rope_theta = theta;
  s.n_experts = experts;
  s.top_k = top_k;
  s.moe_ffn = moe_ffn;
  s.norm_topk_prob = true;
  s.ctx_train = ctx;
  s.eos_ids = std::move(eos);
  s.bos_id = bos;
  return s;
}

// DeepSeek-V3 and Kimi K2 (DeepseekV3ForCausalLM): MLA in every layer, the first
// `dense_layers` dense, then sigmoid-routed MoE with the correction bias, one shared expert;
// YaRN (mscale = mscale_all_dim = 1).
struct MlaShape {
  int vocab, hidden, layers, dense_layers, dense_ffn;
  int heads, q_lora, kv_lora, nope, rope, v_dim;
  int experts, top_k, moe_ffn, shared, n_group, topk_group;
  double routed_scale, theta, yarn_factor, beta_fast, beta_slow;
  int orig_ctx, ctx;
  std::vector<int> eos;
  int bos;
};

ModelSpec mla_model(const MlaShape& m) {
  ModelSpec s;
  s.arch = "deepseek_v3";
  s.vocab_size = m.vocab;
  s.hidden_size = m.hidden;
  s.n_layers = m.layers;
  s.attn.assign(size_t(m.layers), AttnKind::kMla);
  for (int i = 0; i < m.layers; i++)
    s.ffn.push_back(i < m.dense_layers ? FfnKind::kDense : FfnKind::kMoe);
  s.dense_ffn = m.dense_ffn;
  s.rms_eps = 1e-6f;
  s.n_heads = s.n_kv_heads = m.heads;
  s.head_dim = m.nope + m.rope;
  s.rope_dim = m.rope;
  s.rope_theta = m.theta;
  s.q_lora_rank = m.q_lora;
  s.kv_lora_rank = m.kv_lora;
  s.v_head_dim = m.v_dim;
  s.rope_scaling.kind = RopeScaling::kYarn;
  s.rope_scaling.factor = m.yarn_factor;
  s.rope_scaling.orig_ctx = m.orig_ctx;
  s.rope_scaling.beta_fast = m.beta_fast;
  s.rope_scaling.beta_slow = m.beta_slow;
  s.rope_scaling.mscale = s.rope_scaling.mscale_all_dim = 1.0;
  s.n_experts = m.experts;
  s.top_k = m.top_k;
  s.moe_ffn = m.moe_ffn;
  s.norm_topk_prob = true;
  s.router = RouterKind::kSigmoid;
  s.router_bias = true;
  s.n_group = m.n_group;
  s.topk_group = m.topk_group;
  s.routed_scale = m.routed_scale;
  s.shared_ffn = m.shared * m.moe_ffn;
  s.shared_gate = false;
  s.ctx_train = m.ctx;
  s.eos_ids = m.eos;
  s.bos_id = m.bos;
  return s;
}

// GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM): GQA full attention with q/k/v biases (and q/k
// norm on GLM-4.5, not on Air), RoPE on half of each head (theta 1e6), the first `dense_layers`
// dense, then DeepSeek-V3's sigmoid routing with the correction bias (one group) and one
// shared expert. The MTP layer (num_nextn_predict_layers) is left out, as convert does.
struct GlmShape {
  int vocab, hidden, layers, dense_layers, dense_ffn;
  int heads, kv_heads, head_dim;
  bool qk_norm;
  int experts, top_k, moe_ffn;
  double routed_scale;
  int ctx;
  std::vector<int> eos;
};

ModelSpec glm_model(const GlmShape& m) {
  ModelSpec s;
  s.arch = "glm4_moe";
  s.vocab_size = m.vocab;
  s.hidden_size = m.hidden;
  s.n_layers = m.layers;
  s.attn.assign(size_t(m.layers), AttnKind::kFull);
  for (int i = 0; i < m.layers; i++)
    s.ffn.push_back(i < m.dense_layers ? FfnKind::kDense : FfnKind::kMoe);
  s.dense_ffn = m.dense_ffn;
  s.rms_eps = 1e-5f;
  s.n_heads = m.heads;
  s.n_kv_heads = m.kv_heads;
  s.head_dim = m.head_dim;
  s.qk_norm = m.qk_norm;
  s.qkv_bias = true;
  s.rope_dim = m.head_dim / 2;  // partial_rotary_factor 0.5
  s.rope_theta = 1e6;
  s.n_experts = m.experts;
  s.top_k = m.top_k;
  s.moe_ffn = m.moe_ffn;
  s.norm_topk_prob = true;
  s.router = RouterKind::kSigmoid;
  s.router_bias = true;
  s.routed_scale = m.routed_scale;
  s.shared_ffn = m.moe_ffn;  // n_shared_experts 1
  s.shared_gate = false;
  s.ctx_train = m.ctx;
  s.eos_ids = m.eos;
  s.bos_id = -1;
  return s;
}
const std::vector<int> kGlmEos = {151329, 151336, 151338};  // <|endoftext|>, <|user|>, <|observation|>

// gpt-oss (openai/gpt-oss-20b, -120b config.json): alternating sliding (128) and full layers,
// attention biases and sinks, YaRN (factor 32 from 4096, truncate false), 32 or 128 experts of
// 2880, top-4, the router's logit bias, per-expert biases and the clamped SwiGLU.
ModelSpec gpt_oss_model(int layers, int experts) {
  ModelSpec s;
  s.arch = "gpt_oss";
  s.vocab_size = 201088;
  s.hidden_size = 2880;
  s.n_layers = layers;
  s.attn.assign(size_t(layers), AttnKind::kFull);
  s.ffn.assign(size_t(layers), FfnKind::kMoe);
  s.rms_eps = 1e-5f;
  s.n_heads = 64;
  s.n_kv_heads = 8;
  s.head_dim = 64;
  s.qk_norm = false;
  s.rope_dim = 64;
  s.rope_theta = 150000.0;
  s.rope_scaling.kind = RopeScaling::kYarn;
  s.rope_scaling.factor = 32.0;
  s.rope_scaling.orig_ctx = 4096;
  s.rope_scaling.truncate = false;
  s.n_experts = experts;
  s.top_k = 4;
  s.moe_ffn = 2880;
  s.norm_topk_prob = true;
  s.attn_bias = s.attn_sinks = s.router_logit_bias = s.expert_bias = true;
  s.sliding_window = 128;
  for (int i = 0; i < layers; i++) s.sliding.push_back((i + 1) % 2 ? 1 : 0);
  s.swiglu_limit = 7.0;
  s.swiglu_alpha = 1.702;
  s.ctx_train = 131072;
  s.eos_ids = {200002, 199999, 200012};  // <|return|>, <|endoftext|>, <|call|>
  s.bos_id = 199998;
  return s;
}

const std::vector<int> kQwen3Eos = {151645, 151643};   // <|im_end|>, <|endoftext|>
const std::vector<int> kQwen35Eos = {248046, 248044};  // the same two in the 248k vocabulary

}  // namespace

const std::vector<SynthPreset>& synth_presets() {
  static const std::vector<SynthPreset> presets = {
      {"tiny", "(moeflux's own: Qwen3.5-MoE layout, Qwen3 vocabulary)", "qwen3_5_moe", 0, 0},
      {"qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe", 35, 3},
      {"qwen3-next-80b-a3b", "Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen3_next", 80, 3},
      {"qwen3.5-122b-a10b", "Qwen/Qwen3.5-122B-A10B", "qwen3_5_moe", 122, 10},
      {"qwen3.5-397b-a17b", "Qwen/Qwen3.5-397B-A17B", "qwen3_5_moe", 397, 17},
      {"qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3_moe", 30.5, 3.3},
      {"mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "mixtral", 46.7, 12.9},
      {"deepseek-v3-671b", "deepseek-ai/DeepSeek-V3", "deepseek_v3", 671, 37},
      {"kimi-k2", "moonshotai/Kimi-K2-Instruct", "kimi_k2", 1000, 32},
      {"glm-4.5", "zai-org/GLM-4.5", "glm4_moe", 355, 32},
      {"glm-4.5-air", "zai-org/GLM-4.5-Air", "glm4_moe", 106, 12},
      {"gpt-oss-20b", "openai/gpt-oss-20b", "gpt_oss", 21, 3.6},
      {"gpt-oss-120b", "openai/gpt-oss-120b", "gpt_oss", 117, 5.1},
  };
  return presets;
}

std::string synth_preset_names() {
  std::string s;
  for (const auto& p : synth_presets()) s += (s.empty() ? "" : ", ") + p.name;
  return s;
}

const SynthPreset& synth_preset(const std::string& name) {
  for (const auto& p : synth_presets())
    if (p.name == name) return p;
  fail(ErrorKind::kInvalidArgument, "unknown preset '{}' (presets: {})", name,
       synth_preset_names());
}

ModelSpec synth_spec(const std::string& preset) {
  synth_preset(preset);  // the error lists the presets
  ModelSpec s;
  if (preset == "tiny") {
    // Small enough to synth in about a second and decode fast on a laptop; every dimension a
    // multiple of 64 so each matrix quantises with the default group.
    s = hybrid(
        {"qwen3_5_moe", 151936, 256, 8, 4, 2, 64, 4, 8, 32, 32, 32, 4, 128, 128, 32768, kQwen3Eos});
  } else if (preset == "qwen3.5-35b-a3b") {
    s = hybrid({"qwen3_5_moe", 248320, 2048, 40, 16, 2, 256, 16, 32, 128, 128, 256, 8, 512, 512,
                262144, kQwen35Eos});
  } else if (preset == "qwen3-next-80b-a3b") {
    s = hybrid({"qwen3_next", 151936, 2048, 48, 16, 2, 256, 16, 32, 128, 128, 512, 10, 512, 512,
                262144, kQwen3Eos});
  } else if (preset == "qwen3.5-122b-a10b") {
    s = hybrid({"qwen3_5_moe", 248320, 3072, 48, 32, 2, 256, 16, 64, 128, 128, 256, 8, 1024, 1024,
                262144, kQwen35Eos});
  } else if (preset == "qwen3.5-397b-a17b") {
    s = hybrid({"qwen3_5_moe", 248320, 4096, 60, 32, 2, 256, 16, 64, 128, 128, 512, 10, 1024, 1024,
                262144, kQwen35Eos});
  } else if (preset == "qwen3-30b-a3b") {
    s = full_attention("qwen3_moe", 151936, 2048, 48, 32, 4, 128, 128, 8, 768, 1e6, 1e-6f, 40960,
                       kQwen3Eos, 151643);
  } else if (preset == "mixtral-8x7b") {
    s = full_attention("mixtral", 32000, 4096, 32, 32, 8, 128, 8, 2, 14336, 1e6, 1e-5f, 32768, {2},
                       1);
  } else if (preset == "deepseek-v3-671b") {
    // config.json without the MTP layer (num_hidden_layers 61; the checkpoint's layer 61).
    s = mla_model({129280, 7168, 61, 3, 18432, 128,   1536, 512, 128, 64,   128,    256, 8,
                   2048,   1,    8,  4, 2.5,   10000, 40,   32,  1,   4096, 163840, {1}, 0});
  } else if (preset == "kimi-k2") {
    s = mla_model({163840, 7168, 61,  1, 18432, 64,     1536,     512,   128,
                   64,     128,  384, 8, 2048,  1,      1,        1,     2.827,
                   50000,  32,   1,   1, 4096,  131072, {163585}, 163584});
  } else if (preset == "glm-4.5") {
    // config.json without the MTP layer (num_hidden_layers 92; the checkpoint's layer 92).
    s = glm_model({151552, 5120, 92, 3, 12288, 96, 8, 128, true, 160, 8, 1536, 2.5, 131072,
                   kGlmEos});
  } else if (preset == "glm-4.5-air") {
    s = glm_model({151552, 4096, 46, 1, 10944, 96, 8, 128, false, 128, 8, 1408, 1.0, 131072,
                   kGlmEos});
  } else if (preset == "gpt-oss-20b") {
    s = gpt_oss_model(24, 32);
  } else if (preset == "gpt-oss-120b") {
    s = gpt_oss_model(36, 128);
  }
  s.validate("synth preset " + preset, SpecNaming::kPackage);
  return s;
}

ModelSpec cut_layers(const ModelSpec& spec, int layers, const std::string& what) {
  if (layers < 1 || layers > spec.n_layers)
    fail(ErrorKind::kInvalidArgument, "--layers: {} is not in [1, {}]{}", layers, spec.n_layers,
         what.empty() ? "" : fmt::format(" ({} has {} layers)", what, spec.n_layers));
  ModelSpec s = spec;
  s.n_layers = layers;
  s.attn.resize(size_t(layers));
  s.ffn.resize(size_t(layers));
  if (!s.sliding.empty()) s.sliding.resize(size_t(layers));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Values.

namespace {

// Counter-based random numbers (splitmix64's finaliser over key + i*golden): word i of stream
// `key` is computed on its own, so any byte range can be generated by any thread.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
inline uint64_t rand_word(uint64_t key, uint64_t i) {
  return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ull);
}
inline double rand_unit(uint64_t key, uint64_t i) {  // [0, 1)
  return double(rand_word(key, i) >> 11) * 0x1.0p-53;
}
uint64_t name_key(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return mix64(h ^ mix64(seed + 0x5eedull));
}

// Scale so that 2^b uniform levels centred on zero have standard deviation `std`.
double quant_scale(double std, int bits) {
  const double levels = double(1u << bits);
  return std / std::sqrt((levels * levels - 1) / 12.0);
}

// Embedding column 0 holds the same value in every row: the residual stream's one common
// direction, which routers read to give experts a popularity (routing_skew). In units of the
// embedding's standard deviation: the top quantisation level, or 1.6 for float embeddings.
constexpr int kCommonChannel = 0;
double common_level(DType embed) {
  if (!is_quant_dtype(embed)) return 1.6;
  const int b = quant_bits(embed);
  return (double((1u << b) - 1) / 2) / std::sqrt((std::pow(4.0, b) - 1) / 12.0);
}

// Value scales, sized like a trained model's under pre-norm: every norm's output has RMS 1, so a
// [out, in] matrix reading it gets std 1/sqrt(in) and emits RMS ~1; the matrices that write
// into the residual stream are scaled so each block adds RMS kEmbedStd/sqrt(2 L), and the
// stream grows from kEmbedStd to about sqrt(2) kEmbedStd over L layers whatever L is (measured
// in tests/synth_test.cpp). That keeps every layer's input close to the previous one's, as in
// trained models, so next-layer expert prediction has something to predict.
constexpr double kEmbedStd = 0.02;
constexpr double kLogitStd = 3.0;  // lm_head: logits ~ N(0, 3) for a unit-RMS final state
constexpr double kSiluRms = 0.6;   // RMS of silu(g) for g ~ N(0, 1)
constexpr double kSigmoidRms = 0.54;

enum class Init {
  kMatrix,  // uniform, std sigma (the table's and the experts' matrices)
  kEmbed,   // kMatrix plus the common channel
  kNorm,    // RMSNorm weight (stored with 1 + w folded where the arch is zero-centred): ~1
  kConv,    // depthwise conv1d taps
  kALog,    // log(U(1, 16))
  kDtBias,  // U(-0.5, 0.5)
  kRouter,  // kMatrix, column kCommonChannel = popularity bias / expected common value
};

struct TensorInit {
  Init init = Init::kMatrix;
  double sigma = 0;
  int layer = -1;
};

struct Plan {
  Manifest m;
  std::vector<TensorInit> init;          // per resident tensor
  std::array<double, 3> expert_sigma{};  // gate, up, down
  QuantRecipe recipe;
};

// A matrix (TensorRole::kMatrix) gets the recipe's dtype for its class when a group fits its
// input dimension (as convert does), else bf16; everything else is f32.
PackedTensor plan_tensor(const TensorSpec& ts, const QuantRecipe& recipe) {
  PackedTensor t;
  t.name = ts.name;
  t.shape = ts.shape;
  const bool matrix = ts.role == TensorRole::kMatrix;
  t.dtype = matrix ? DType::kBF16 : DType::kF32;
  if (matrix) {
    auto want = recipe.dtype.find(ts.cls);
    if (want != recipe.dtype.end() && want->second == DType::kMxfp4) {
      if (t.shape[1] % kMxfp4Group == 0) t.dtype = DType::kMxfp4;  // as convert: else bf16
    } else if (want != recipe.dtype.end()) {
      for (int g : {recipe.group, 128, 64, 32})
        if (quantisable(t.shape[1], quant_bits(want->second), g)) {
          t.dtype = want->second;
          t.group = g;
          break;
        }
    }
  }
  t.nbytes = t.expected_bytes();
  return t;
}

Plan make_plan(const ModelSpec& s, const std::string& quant, int full_layers) {
  Plan p;
  p.recipe = quant_recipe(quant);
  p.m.spec = s;
  const int64_t H = s.hidden_size;
  const double L = std::max(full_layers, s.n_layers);
  const double block = kEmbedStd / std::sqrt(2 * L);  // RMS each block adds to the stream
  const double in_h = 1 / std::sqrt(double(H));
  auto mat = [](double sigma) { return TensorInit{Init::kMatrix, sigma, -1}; };

  // How each tensor of the schema is initialised; matrices that read a unit-RMS input of H get
  // std 1/sqrt(H).
  auto init = [&](const TensorSpec& t) -> TensorInit {
    const std::string& k = t.key;
    if (t.role == TensorRole::kNorm) return {Init::kNorm, 0, -1};
    if (k == "embed") return {Init::kEmbed, kEmbedStd, -1};
    if (k == "lm_head") return mat(kLogitStd * in_h);
    if (k == "moe_router") return {Init::kRouter, in_h, t.layer};
    if (k == "moe_router_bias") return mat(0.0);  // no selection bias: the skew alone
    // GLM's q/k/v biases: small next to the projections' unit-RMS outputs.
    if (k == "attn_q_bias" || k == "attn_k_bias" || k == "attn_v_bias") return mat(0.1);
    if (k == "lin_conv") return {Init::kConv, 0.5 / std::sqrt(double(t.shape[1])), t.layer};
    if (k == "lin_A_log") return {Init::kALog, 0, t.layer};
    if (k == "lin_dt_bias") return {Init::kDtBias, 0, t.layer};
    // gpt-oss's biases and sinks: small next to the products they are added to.
    if (k == "attn_q_bias" || k == "attn_k_bias" || k == "attn_v_bias") return mat(0.1);
    if (k == "attn_o_bias" || k == "moe_down_bias") return mat(0.1 * block);
    if (k == "moe_gate_bias" || k == "moe_up_bias") return mat(0.1);
    if (k == "attn_sinks") return mat(1.0);
    if (k == "moe_router_logit_bias") return mat(0.0);  // the router's skew alone
    const double in = double(t.shape[1]);
    if (k == "attn_o") {
      // Input: softmax-weighted averages of unit-RMS values (smaller than 1), gated by
      // sigmoid(gate) where the arch has the output gate.
      const double o_gain = s.attn_output_gate ? 2.0 : 1.5;
      return mat(block * o_gain / std::sqrt(in));
    }
    if (k == "lin_a") return mat(0.5 * in_h);
    // MLA: inputs of unit RMS but not of width H (normed q/kv latents, per-head queries).
    if (k == "attn_q_b" || k == "attn_k_b" || k == "attn_v_b") return mat(1 / std::sqrt(in));
    // Input: rms-normed heads times silu(z) (lin_out), silu(gate) * up (ffn_down).
    if (k == "lin_out" || k == "ffn_down") return mat(block / kSiluRms / std::sqrt(in));
    // Half the block's energy from the shared expert (gated by a sigmoid), half routed.
    if (k == "shexp_down")
      return mat(block / std::sqrt(2.0) / (kSiluRms * (s.shared_gate ? kSigmoidRms : 1.0)) /
                 std::sqrt(in));
    MF_CHECK(t.role == TensorRole::kMatrix || k == "shexp_router");
    return mat(in_h);
  };
  for (const TensorSpec& t : resident_schema(s)) {
    p.m.resident.push_back(plan_tensor(t, p.recipe));
    p.init.push_back(init(t));
  }

  uint64_t off = 0;
  for (auto& t : p.m.resident) {
    off = align_up(off, kFileAlign);
    t.offset = off;
    off += t.nbytes;
  }
  p.m.resident_bytes = align_up(off, kFileAlign);

  if (s.n_moe_layers() > 0) {
    // The top-k outputs are summed with weights summing to 1 (about 1/sqrt(k) of one output's
    // RMS when the weights are even; 1.3x that for the uneven weights routing gives).
    const int64_t I = s.moe_ffn;
    const double routed = block / (s.shared_ffn > 0 ? std::sqrt(2.0) : 1.0);
    const double down = routed * std::sqrt(double(s.top_k)) / 1.3 / kSiluRms / std::sqrt(double(I));
    p.expert_sigma = {in_h, in_h, down};
    std::vector<PackedTensor> parts;
    for (const TensorSpec& t : expert_schema(s)) parts.push_back(plan_tensor(t, p.recipe));
    p.m.experts = make_expert_layout(s, std::move(parts));
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Files as byte ranges with generators.

// A byte range of a file; fill(off, n, dst) produces bytes [off, off + n) of the range and
// depends on nothing else. Bytes no segment covers are zero (alignment padding).
struct Segment {
  uint64_t offset = 0, size = 0;
  std::function<void(uint64_t off, uint64_t n, uint8_t* dst)> fill;
};

// Random bytes; with `row_bytes`, the first element of every row (low `bits` bits of its first
// byte, LSB-first packing) is set to the top level: the common channel of a quantised embedding.
Segment random_bytes(uint64_t offset, uint64_t size, uint64_t key, uint64_t row_bytes = 0,
                     int bits = 0) {
  return {offset, size, [=](uint64_t off, uint64_t n, uint8_t* dst) {
            uint64_t i = off;
            const uint64_t end = off + n;
            while (i < end) {
              const uint64_t w = rand_word(key, i / 8);
              const uint64_t b0 = i % 8, take = std::min<uint64_t>(8 - b0, end - i);
              std::memcpy(dst + (i - off), reinterpret_cast<const uint8_t*>(&w) + b0, take);
              i += take;
            }
            if (row_bytes)
              for (uint64_t r = (off + row_bytes - 1) / row_bytes * row_bytes; r < end;
                   r += row_bytes)
                dst[r - off] |= uint8_t((1u << bits) - 1);
          }};
}

Segment const_u16(uint64_t offset, uint64_t size, uint16_t v) {
  return {offset, size, [=](uint64_t off, uint64_t n, uint8_t* dst) {
            const uint8_t b[2] = {uint8_t(v & 0xff), uint8_t(v >> 8)};
            for (uint64_t i = 0; i < n; i++) dst[i] = b[(off + i) & 1];
          }};
}

// bf16 uniform with standard deviation `sigma`; with `cols`, element 0 of every row is `common`.
Segment bf16_uniform(uint64_t offset, uint64_t size, uint64_t key, double sigma, int64_t cols = 0,
                     double common = 0) {
  const float a = float(sigma * std::sqrt(3.0));
  return {offset, size, [=](uint64_t off, uint64_t n, uint8_t* dst) {
            MF_CHECK(off % 2 == 0 && n % 2 == 0);
            uint16_t* out = reinterpret_cast<uint16_t*>(dst);
            for (uint64_t j = off / 2, k = 0; k < n / 2; j++, k++) {
              const uint32_t u = uint32_t(rand_word(key, j / 4) >> (16 * (j % 4))) & 0xffff;
              float v = (float(u) + 0.5f) * (2.0f / 65536) - 1.0f;
              v = cols && j % uint64_t(cols) == 0 ? float(common) : v * a;
              out[k] = f32_to_bf16(v);
            }
          }};
}

Segment f32_values(uint64_t offset, uint64_t size, std::function<float(uint64_t)> value) {
  return {offset, size, [value = std::move(value)](uint64_t off, uint64_t n, uint8_t* dst) {
            MF_CHECK(off % 4 == 0 && n % 4 == 0);
            for (uint64_t j = off / 4, k = 0; k < n / 4; j++, k++) {
              const float v = value(j);
              std::memcpy(dst + 4 * k, &v, 4);
            }
          }};
}

// A matrix of std `sigma` as package tensor `t` at `offset`, in packed form when quantised.
// MXFP4: uniform random codes (e2m1 values of RMS sqrt(68.5 / 8) = 2.93) under one e8m0 scale,
// the power of two nearest sigma / 2.93.
void add_matrix(std::vector<Segment>& segs, const PackedTensor& t, uint64_t offset, uint64_t key,
                double sigma, bool common_channel = false, double common = 0) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  if (t.dtype == DType::kMxfp4) {
    MF_CHECK(!common_channel);
    const int k = int(std::lround(std::log2(sigma / std::sqrt(68.5 / 8))));
    const uint8_t e = uint8_t(std::clamp(127 + k, 0, 254));
    const uint64_t packed = mxfp4_packed_bytes(rows, cols);
    segs.push_back(random_bytes(offset, packed, key));
    segs.push_back({offset + packed, mxfp4_bytes(rows, cols) - packed,
                    [e](uint64_t, uint64_t n, uint8_t* dst) { std::memset(dst, e, n); }});
    return;
  }
  if (!is_quant_dtype(t.dtype)) {
    MF_CHECK(t.dtype == DType::kBF16);
    segs.push_back(bf16_uniform(offset, t.nbytes, key, sigma, common_channel ? cols : 0, common));
    return;
  }
  const int bits = quant_bits(t.dtype);
  const QuantLayout q = quant_layout(rows, cols, bits, t.group);
  const uint16_t scale = f32_to_bf16(float(quant_scale(sigma, bits)));
  const uint16_t bias = f32_to_bf16(-float((1u << bits) - 1) / 2 * bf16_to_f32(scale));
  segs.push_back(random_bytes(offset, q.packed_bytes, key,
                              common_channel ? uint64_t(cols) * bits / 8 : 0, bits));
  segs.push_back(const_u16(offset + q.packed_bytes, q.scales_bytes, scale));
  segs.push_back(const_u16(offset + q.packed_bytes + q.scales_bytes, q.biases_bytes, bias));
}

struct Values {
  const ModelSpec& s;
  const Plan& p;
  uint64_t seed;
  double skew;
  int full_layers;

  // Expected value of the common channel at the router of layer l, after ffn_norm: the
  // embedding's constant over the stream's RMS, which has grown by 2l + 1 blocks.
  double common_at_router(int l) const {
    const DType embed = p.m.resident[0].dtype;
    const double L = std::max(full_layers, s.n_layers);
    return common_level(embed) / std::sqrt(1 + (2.0 * l + 1) / (2 * L));
  }

  // Logit offsets of one layer's experts: -skew * ln(rank), ranks a random order per layer.
  std::vector<float> popularity_bias(int l) const {
    const int E = s.n_experts;
    std::vector<int> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    const uint64_t key = name_key(seed, fmt::format("blk.{}.popularity", l));
    for (int i = E - 1; i > 0; i--)  // Fisher-Yates
      std::swap(order[size_t(i)], order[size_t(rand_word(key, uint64_t(i)) % uint64_t(i + 1))]);
    std::vector<float> bias(static_cast<size_t>(E));
    const double c = common_at_router(l);
    for (int r = 0; r < E; r++)
      bias[size_t(order[size_t(r)])] = float(-skew * std::log(r + 1.0) / c);
    return bias;
  }

  void resident(std::vector<Segment>& segs) const {
    for (size_t i = 0; i < p.m.resident.size(); i++) {
      const PackedTensor& t = p.m.resident[i];
      const TensorInit& in = p.init[i];
      const uint64_t key = name_key(seed, t.name);
      const uint64_t off = t.offset;
      switch (in.init) {
        case Init::kMatrix:
          if (t.dtype == DType::kF32) {  // the shared expert's gate [1, H]
            const float a = float(in.sigma * std::sqrt(3.0));
            segs.push_back(f32_values(
                off, t.nbytes, [=](uint64_t j) { return float(rand_unit(key, j) * 2 - 1) * a; }));
          } else {
            add_matrix(segs, t, off, key, in.sigma);
          }
          break;
        case Init::kEmbed: {
          const double common = common_level(t.dtype) * kEmbedStd;
          add_matrix(segs, t, off, key, in.sigma, true, common);
          break;
        }
        case Init::kNorm:
          segs.push_back(f32_values(
              off, t.nbytes, [=](uint64_t j) { return float(0.9 + 0.2 * rand_unit(key, j)); }));
          break;
        case Init::kConv: {
          const float a = float(in.sigma * std::sqrt(3.0));
          segs.push_back(f32_values(
              off, t.nbytes, [=](uint64_t j) { return float(rand_unit(key, j) * 2 - 1) * a; }));
          break;
        }
        case Init::kALog:
          segs.push_back(f32_values(off, t.nbytes, [=](uint64_t j) {
            return float(std::log(1 + 15 * rand_unit(key, j)));
          }));
          break;
        case Init::kDtBias:
          segs.push_back(f32_values(off, t.nbytes,
                                    [=](uint64_t j) { return float(rand_unit(key, j) - 0.5); }));
          break;
        case Init::kRouter: {
          const float a = float(in.sigma * std::sqrt(3.0));
          const uint64_t H = uint64_t(s.hidden_size);
          std::vector<float> bias =
              skew != 0 ? popularity_bias(in.layer) : std::vector<float>(size_t(s.n_experts), 0.0f);
          segs.push_back(f32_values(off, t.nbytes, [=, bias = std::move(bias)](uint64_t j) {
            if (j % H == kCommonChannel) return bias[size_t(j / H)];
            return float(rand_unit(key, j) * 2 - 1) * a;
          }));
          break;
        }
      }
    }
  }

  // Expert file of MoE layer `l`: expert e at e * stride, parts gate, up, down.
  void experts(std::vector<Segment>& segs, int l) const {
    const ExpertLayout& ex = p.m.experts;
    for (int e = 0; e < ex.count; e++)
      for (int q = 0; q < 3; q++) {
        const PackedTensor& t = ex.parts[size_t(q)];
        add_matrix(segs, t, uint64_t(e) * ex.stride + t.offset,
                   name_key(seed, fmt::format("blk.{}.expert.{}.{}", l, e, t.name)),
                   p.expert_sigma[size_t(q)]);
      }
  }
};

// Fills [off, off + n) of the file the (sorted, disjoint) segments describe.
void fill_range(const std::vector<Segment>& segs, uint64_t off, uint64_t n, uint8_t* dst) {
  auto it = std::upper_bound(segs.begin(), segs.end(), off,
                             [](uint64_t o, const Segment& s) { return o < s.offset + s.size; });
  uint64_t pos = off;
  const uint64_t end = off + n;
  for (; pos < end && it != segs.end() && it->offset < end; ++it) {
    if (it->offset > pos) {
      std::memset(dst + (pos - off), 0, it->offset - pos);
      pos = it->offset;
    }
    const uint64_t stop = std::min(end, it->offset + it->size);
    it->fill(pos - it->offset, stop - pos, dst + (pos - off));
    pos = stop;
  }
  if (pos < end) std::memset(dst + (pos - off), 0, end - pos);
}

// Writes a file of `size` bytes in chunks: chunk i is generated by the pool while chunk i-1 is
// being written, so at most two chunk buffers exist.
class FileProducer {
 public:
  FileProducer(ThreadPool& pool, Progress& bar, uint64_t& done)
      : pool_(pool), bar_(bar), done_(done) {}

  void produce(const std::string& path, uint64_t size, const std::vector<Segment>& segs) {
    constexpr uint64_t kSub = 1 << 20;  // one task's share: the RNG is random-access
    FileWriter w(path);
    std::future<void> pending;
    uint64_t pending_n = 0;
    auto finish_pending = [&] {
      if (!pending.valid()) return;
      pending.get();  // rethrows a write error
      done_ += pending_n;
      bar_.update(done_);
    };
    for (uint64_t c0 = 0, i = 0; c0 < size; c0 += kSynthChunkBytes, i++) {
      std::vector<uint8_t>& buf = buf_[i % 2];
      const uint64_t n = std::min(kSynthChunkBytes, size - c0);
      if (buf.size() < n) buf.resize(n);
      uint8_t* b = buf.data();
      pool_.parallel_for(int64_t((n + kSub - 1) / kSub), [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; s++) {
          const uint64_t a = uint64_t(s) * kSub;
          fill_range(segs, c0 + a, std::min(kSub, n - a), b + a);
        }
      });
      finish_pending();
      pending = std::async(std::launch::async, [&w, b, n] { w.write(b, n); });
      pending_n = n;
    }
    finish_pending();
    w.close();
  }

 private:
  ThreadPool& pool_;
  Progress& bar_;
  uint64_t& done_;
  std::vector<uint8_t> buf_[2];
};

nlohmann::json recipe_json(const QuantRecipe& r) {
  if (r.name == "none") return nullptr;
  const std::map<TensorClass, const char*> names = {{TensorClass::kEmbed, "embed"},
                                                    {TensorClass::kLmHead, "lm_head"},
                                                    {TensorClass::kAttn, "attn"},
                                                    {TensorClass::kLinearAttn, "linear_attn"},
                                                    {TensorClass::kSharedExpert, "shared_expert"},
                                                    {TensorClass::kDenseFfn, "dense_ffn"},
                                                    {TensorClass::kExperts, "experts"}};
  nlohmann::json classes = nlohmann::json::object();
  for (auto [c, d] : r.dtype) classes[names.at(c)] = dtype_name(d);
  return {{"name", r.name}, {"group_size", r.group}, {"classes", classes}};
}

// `dir` is the (new, empty) staging directory; messages name the target.
void prepare_out_dir(const std::string& dir, const std::string& target, uint64_t need) {
  std::error_code ec;
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    fail(ErrorKind::kIo, "{}: the package directory is not writable: {}", target,
         std::strerror(errno));
  const fs::space_info sp = fs::space(dir, ec);
  if (!ec && sp.available < need)
    fail(ErrorKind::kIo, "{}: the package needs {} but the file system has {} free", target,
         format_bytes(need), format_bytes(sp.available));
  fs::create_directories(dir + "/experts", ec);
  if (ec) fail(ErrorKind::kIo, "{}/experts: cannot create: {}", dir, ec.message());
}

}  // namespace

ParamCount count_params(const ModelSpec& spec) {
  const Plan p = make_plan(spec, "none", spec.n_layers);
  ParamCount c;
  for (const auto& t : p.m.resident) c.total += uint64_t(t.numel());
  const uint64_t expert = 3ull * uint64_t(spec.hidden_size) * uint64_t(spec.moe_ffn);
  const uint64_t moe_layers = uint64_t(spec.n_moe_layers());
  c.total += moe_layers * uint64_t(spec.n_experts) * expert;
  c.active = c.total - moe_layers * uint64_t(spec.n_experts - spec.top_k) * expert;
  c.embedding = uint64_t(spec.vocab_size) * uint64_t(spec.hidden_size);
  return c;
}

Manifest synth_plan(const ModelSpec& spec, const std::string& quant) {
  return make_plan(spec, quant, spec.n_layers).m;
}

SynthReport synth_package(const ModelSpec& spec, const std::string& target_dir,
                          const SynthOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  spec.validate("synth " + opt.preset, SpecNaming::kPackage);
  if (!std::isfinite(opt.routing_skew) || opt.routing_skew < 0 || opt.routing_skew > 8)
    fail(ErrorKind::kInvalidArgument, "--routing-skew: {} is not in [0, 8]", opt.routing_skew);
  if (opt.full_layers != 0 && opt.full_layers < spec.n_layers)
    fail(ErrorKind::kInvalidArgument, "synth: full_layers {} < the spec's {} layers",
         opt.full_layers, spec.n_layers);
  const int full_layers = opt.full_layers ? opt.full_layers : spec.n_layers;
  Plan plan = make_plan(spec, opt.quant, full_layers);
  Manifest& m = plan.m;

  // The tokenizer is checked before anything is written.
  std::string tok_config;
  if (!opt.tokenizer.empty()) {
    if (!file_exists(opt.tokenizer) || fs::is_directory(opt.tokenizer))
      fail(ErrorKind::kIo, "--tokenizer {}: no such file (expected a tokenizer.json)",
           opt.tokenizer);
    const int32_t n = Tokenizer::load(opt.tokenizer).vocab_size();
    if (n > spec.vocab_size)
      fail(ErrorKind::kInvalidArgument,
           "--tokenizer {}: its {} tokens do not fit the model's vocab_size {}", opt.tokenizer, n,
           spec.vocab_size);
    const std::string beside =
        (fs::path(opt.tokenizer).parent_path() / "tokenizer_config.json").string();
    if (file_exists(beside)) tok_config = beside;
  }

  SynthReport r;
  r.resident_bytes = m.resident_bytes;
  r.expert_bytes = m.experts.stride * uint64_t(m.experts.count) * m.experts.layers.size();
  StagedDir stage(target_dir, opt.force);
  const std::string& out_dir = stage.path();
  // With --force the old package stays until the new one is complete: both need room.
  prepare_out_dir(out_dir, target_dir, r.total_bytes() + (64 << 20));

  ThreadPool pool(opt.threads);
  Progress bar("synth", r.total_bytes(), opt.progress);
  uint64_t done = 0;
  FileProducer producer(pool, bar, done);
  const Values values{spec, plan, opt.seed, opt.routing_skew, full_layers};
  {
    std::vector<Segment> segs;
    values.resident(segs);
    producer.produce(resident_path(out_dir), m.resident_bytes, segs);
  }
  for (int l : m.experts.layers) {
    std::vector<Segment> segs;
    values.experts(segs, l);
    producer.produce(expert_file_path(out_dir, l), uint64_t(m.experts.count) * m.experts.stride,
                     segs);
  }
  bar.finish();

  if (!opt.tokenizer.empty()) {
    fs::copy_file(opt.tokenizer, out_dir + "/tokenizer.json", fs::copy_options::overwrite_existing);
    m.tokenizer_files.push_back("tokenizer.json");
    if (!tok_config.empty()) {
      fs::copy_file(tok_config, out_dir + "/tokenizer_config.json",
                    fs::copy_options::overwrite_existing);
      m.tokenizer_files.push_back("tokenizer_config.json");
    }
  }
  std::string model_type = spec.arch;
  std::string hf_model;
  for (const auto& p : synth_presets())
    if (p.name == opt.preset) {
      model_type = p.model_type;
      hf_model = p.hf_model;
    }
  m.provenance = {{"source", "synth:" + opt.preset},
                  {"source_model_type", model_type},
                  {"source_format", "synth"},
                  {"converter", std::string("moeflux ") + MOEFLUX_VERSION},
                  {"quantisation", recipe_json(plan.recipe)},
                  {"synth",
                   {{"preset", opt.preset},
                    {"shape_of", hf_model},
                    {"seed", opt.seed},
                    {"layers", spec.n_layers},
                    {"full_layers", full_layers},
                    {"routing_skew", opt.routing_skew},
                    {"values", "random (docs/2026-11-26-synth.md): not a trained model"}}},
                  {"notes", nlohmann::json::array()}};
  write_manifest(out_dir, m);
  stage.commit();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace moeflux
