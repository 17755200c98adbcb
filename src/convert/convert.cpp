#include "convert/convert.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "convert/tiktoken.h"
#include "format/hf_config.h"
#include "format/mxfp4.h"
#include "format/package.h"
#include "format/quant.h"
#include "format/safetensors.h"
#include "format/schema.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/half.h"
#include "util/mapped_file.h"
#include "util/progress.h"

namespace moeflux {

namespace fs = std::filesystem;

QuantRecipe quant_recipe(const std::string& name) {
  QuantRecipe r;
  r.name = name;
  using C = TensorClass;
  const C all[] = {C::kEmbed, C::kLmHead, C::kAttn, C::kLinearAttn, C::kSharedExpert, C::kDenseFfn, C::kExperts};
  if (name == "none") return r;
  if (name == "q8") {
    for (C c : all) r.dtype[c] = DType::kQ8;
  } else if (name == "q4" || name == "q2") {
    for (C c : all) r.dtype[c] = DType::kQ4;
    r.dtype[C::kLmHead] = DType::kQ8;  // the output projection is the most sensitive matrix
    if (name == "q2") r.dtype[C::kExperts] = DType::kQ2;
  } else if (name == "mxfp4") {
    // gpt-oss's own layout: the routed experts MXFP4 (format/mxfp4.h), the rest as it is.
    r.dtype[C::kExperts] = DType::kMxfp4;
  } else {
    fail(ErrorKind::kInvalidArgument, "--quant: unknown recipe '{}' (none, q8, q4, q2, mxfp4)",
         name);
  }
  return r;
}

void override_recipe(QuantRecipe& r, const std::string& cls, const std::string& dtype) {
  std::vector<TensorClass> classes;
  if (cls == "experts") classes = {TensorClass::kExperts};
  else if (cls == "attn") classes = {TensorClass::kAttn, TensorClass::kLinearAttn};
  else if (cls == "shared") classes = {TensorClass::kSharedExpert};
  else if (cls == "dense") classes = {TensorClass::kDenseFfn};
  else if (cls == "embed") classes = {TensorClass::kEmbed};
  else if (cls == "lm-head") classes = {TensorClass::kLmHead};
  else fail(ErrorKind::kInvalidArgument, "unknown tensor class '{}'", cls);
  DType t;
  const bool none = dtype == "none";
  if (!none && (!dtype_from_name(dtype, &t) ||
                !(is_quant_dtype(t) || (t == DType::kMxfp4 && cls == "experts"))))
    fail(ErrorKind::kInvalidArgument, "--{}: '{}' is not one of q8, q4, q2, none{}", cls, dtype,
         cls == "experts" ? ", mxfp4" : "");
  for (auto c : classes) {
    if (none) r.dtype.erase(c);
    else r.dtype[c] = t;
  }
  r.name = "custom";
}

namespace {

// A run of rows of a checkpoint tensor. For MLX-quantised sources `src` holds the packed u32
// words and scales/biases the bf16 groups; rows index [E*rows, ...] views of 3-D tensors.
struct RowSlice {
  const TensorInfo* src;
  int64_t row0, n_rows;
  const TensorInfo* scales = nullptr;
  const TensorInfo* biases = nullptr;
  int64_t row_step = 1;  // rows row0, row0 + step, ... (MXFP4 sources only: gpt-oss's gate/up)
};

struct Source {
  std::vector<RowSlice> slices;
  int64_t cols = 0;  // logical columns
  enum Kind { kMatrix, kVectorF32, kNormF32 } kind = kMatrix;
  TensorClass cls = TensorClass::kAttn;
  int bits = 0, group = 0;  // > 0: the checkpoint stores it quantised
  // FP8 (e4m3) weights with an f32 scale per block (RowSlice::scales: weight_scale_inv
  // [ceil(rows / block_rows), ceil(cols / block_cols)]), dequantised on import.
  bool fp8 = false;
  int64_t block_rows = 0, block_cols = 0;
  // A tensor that is no run of checkpoint rows (MLA's attn_k_b: kv_b_proj's key rows
  // transposed per head): `rows` x cols f32 values made whole by `make` (slices then only
  // name the checkpoint tensors it reads, for the dtype).
  int64_t rows = 0;
  std::function<void(float* out)> make;
  // MXFP4 (gpt-oss): RowSlice::src the checkpoint's _blocks (u8 [.., rows, cols/32, 16]),
  // RowSlice::scales its _scales (u8 [.., rows, cols/32]); copied as they are.
  bool mxfp4 = false;
};

class Converter {
 public:
  Converter(const std::string& hf_dir, const std::string& out_dir, const ConvertOptions& opt)
      : hf_dir_(hf_dir), out_dir_(out_dir), opt_(opt), cfg_(read_hf_config(hf_dir)),
        ckpt_(hf_dir) {}

  ConvertReport run();

 private:
  const TensorInfo& need(const std::string& name, std::vector<int64_t> shape);
  const TensorInfo* find_any(const std::vector<std::string>& names);
  PackedTensor plan(const std::string& name, std::vector<int64_t> shape, const Source& src);
  Source source(const TensorSpec& t);
  Source fused_linear_attn(const TensorSpec& t, const std::string& la);
  Source conv(const std::string& hf_name, int64_t channels, int64_t kernel);
  std::string moe_prefix(int l) const;
  Source matrix(const std::string& hf_name, int64_t rows, int64_t cols, TensorClass cls);
  Source stacked(const std::string& hf_name, int64_t n, int64_t rows, int64_t cols,
                 TensorClass cls);
  Source vec(const std::string& hf_name, int64_t n, Source::Kind kind);
  Source mla(const TensorSpec& t, const std::string& attn_prefix);
  // gpt-oss: the router, its logit bias and the experts' biases (resident), and the experts,
  // from the MXFP4 layout or the bf16 one.
  Source gpt_oss_moe(const TensorSpec& t);
  void plan_experts_gpt_oss(int l);
  void write_mxfp4(FileWriter& w, const PackedTensor& t, const Source& src);
  // n rows from `row` of slice `sl` of `src` as f32 (float, or MLX-quantised, dequantised).
  void rows_f32(const Source& src, const RowSlice& sl, int64_t row, int64_t n, float* out);
  void plan_experts(int l);
  void write_tensor(FileWriter& w, const PackedTensor& t, const Source& src);
  // n rows of `cols` f32 values (a 1-D tensor: one row) as rows [out_row, out_row + n) of
  // package tensor `t` at `base`: converted to its float dtype or quantised.
  void put_f32_rows(FileWriter& w, const PackedTensor& t, uint64_t base, int64_t out_row,
                    const float* data, int64_t n, int64_t cols);
  void check_leftovers();
  DType float_dtype(const Source& s) const;

  std::string hf_dir_, out_dir_;
  ConvertOptions opt_;
  HfConfig cfg_;
  Checkpoint ckpt_;
  std::string prefix_;  // "model.", "model.language_model." or MLX's "language_model.model."
  std::string lm_head_name_ = "lm_head.weight";
  bool mlx_ = false;  // MLX-sanitised checkpoint: norms already hold 1 + w, conv1d [C, K, 1]
  std::set<std::string> used_;
  Manifest m_;
  std::vector<Source> resident_src_;
  std::vector<std::vector<std::array<Source, 3>>> expert_src_;  // [moe layer][expert][part]
  ConvertReport report_;
  std::vector<float> f32_;
  std::vector<uint8_t> buf_;
  std::vector<uint32_t> packed_;
  std::vector<uint16_t> sc_, bi_;
};

DType Converter::float_dtype(const Source& s) const {
  if (opt_.dtype) return *opt_.dtype;
  const DType t = s.slices[0].src->dtype;
  if (s.bits == 0 && (t == DType::kBF16 || t == DType::kF16 || t == DType::kF32)) return t;
  return DType::kBF16;
}

const TensorInfo& Converter::need(const std::string& name, std::vector<int64_t> shape) {
  const TensorInfo& t = ckpt_.get(name);
  if (!is_float_dtype(t.dtype))
    fail(ErrorKind::kFormat, "{}: tensor '{}' has dtype {}, expected a float type", t.file, name,
         dtype_st_name(t.dtype));
  if (t.shape != shape)
    fail(ErrorKind::kFormat, "{}: tensor '{}' has shape {}, expected [{}]", t.file, name,
         t.shape_str(), fmt::join(shape, ", "));
  used_.insert(name);
  return t;
}

const TensorInfo* Converter::find_any(const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (const TensorInfo* t = ckpt_.find(n)) return t;
  return nullptr;
}

// `n` stacked matrices [rows, cols] (n = 0: one plain 2-D matrix), float or MLX-quantised
// (`<base>.weight` u32 [.., rows, cols*bits/32] + `.scales` / `.biases` [.., rows, cols/group]).
Source Converter::stacked(const std::string& hf_name, int64_t n, int64_t rows, int64_t cols,
                          TensorClass cls) {
  Source s;
  s.cols = cols;
  s.cls = cls;
  std::vector<int64_t> lead;
  if (n > 0) lead.push_back(n);
  const TensorInfo* w = ckpt_.find(hf_name);
  const std::string base = hf_name.ends_with(".weight") ? hf_name.substr(0, hf_name.size() - 7) : hf_name;
  const TensorInfo* sc = ckpt_.find(base + ".scales");
  if (w && w->dtype == DType::kU32 && sc) {
    const TensorInfo* bi = ckpt_.find(base + ".biases");
    if (!bi) fail(ErrorKind::kFormat, "{}: missing tensor '{}.biases'", hf_dir_, base);
    const int64_t packed_cols = w->shape.empty() ? 0 : w->shape.back();
    const int64_t n_groups = sc->shape.empty() ? 0 : sc->shape.back();
    const int bits = cols > 0 ? int(packed_cols * 32 / cols) : 0;
    const int group = n_groups > 0 ? int(cols / n_groups) : 0;
    auto shape = lead;
    shape.push_back(rows);
    auto expect = [&](const TensorInfo* t, int64_t last, DType dt) {
      auto want = shape;
      want.push_back(last);
      if (t->shape != want)
        fail(ErrorKind::kFormat, "{}: tensor '{}' has shape {}, expected [{}] ({}-bit groups of {})",
             t->file, t->name, t->shape_str(), fmt::join(want, ", "), bits, group);
      if (t->dtype != dt)
        fail(ErrorKind::kUnsupported, "{}: tensor '{}' has dtype {}, expected {}", t->file, t->name,
             dtype_st_name(t->dtype), dtype_st_name(dt));
      used_.insert(t->name);
    };
    if (!(bits == 8 || bits == 4 || bits == 2) || !quantisable(cols, bits, group))
      fail(ErrorKind::kUnsupported, "{}: tensor '{}' [{} cols] packs {}-bit groups of {}: only 8/4/2-bit are supported",
           hf_dir_, w->name, cols, packed_cols * 32.0 / double(cols), group);
    expect(w, cols * bits / 32, DType::kU32);
    expect(sc, cols / group, DType::kBF16);
    expect(bi, cols / group, DType::kBF16);
    s.bits = bits;
    s.group = group;
    s.slices.push_back({w, 0, std::max<int64_t>(n, 1) * rows, sc, bi});
    return s;
  }
  if (w && w->dtype == DType::kF8E4M3) {
    // FP8 block-quantised (DeepSeek-V3): weight e4m3 [rows, cols], weight_scale_inv f32
    // [ceil(rows/br), ceil(cols/bc)]; w = e4m3 value * scale of its block.
    const int64_t br = cfg_.fp8_block[0], bc = cfg_.fp8_block[1];
    if (n > 0)
      fail(ErrorKind::kUnsupported,
           "{}: tensor '{}' is FP8 and stacked {}; only 2-D FP8 "
           "weights are supported",
           w->file, w->name, w->shape_str());
    if (w->shape != std::vector<int64_t>{rows, cols})
      fail(ErrorKind::kFormat, "{}: tensor '{}' has shape {}, expected [{}, {}]", w->file, w->name,
           w->shape_str(), rows, cols);
    const TensorInfo* si = ckpt_.find(base + ".weight_scale_inv");
    if (!si)
      fail(ErrorKind::kFormat, "{}: FP8 tensor '{}' has no '{}.weight_scale_inv'", w->file, w->name,
           base);
    const std::vector<int64_t> want = {(rows + br - 1) / br, (cols + bc - 1) / bc};
    if (si->dtype != DType::kF32 || si->shape != want)
      fail(ErrorKind::kFormat, "{}: tensor '{}' is {} {}, expected F32 [{}, {}] (blocks of {}x{})",
           si->file, si->name, dtype_st_name(si->dtype), si->shape_str(), want[0], want[1], br, bc);
    used_.insert(w->name);
    used_.insert(si->name);
    s.fp8 = true;
    s.block_rows = br;
    s.block_cols = bc;
    s.slices.push_back({w, 0, rows, si});
    return s;
  }
  auto shape = lead;
  shape.push_back(rows);
  shape.push_back(cols);
  const TensorInfo& t = need(hf_name, shape);
  s.slices.push_back({&t, 0, std::max<int64_t>(n, 1) * rows});
  return s;
}

Source Converter::matrix(const std::string& hf_name, int64_t rows, int64_t cols, TensorClass cls) {
  return stacked(hf_name, 0, rows, cols, cls);
}

Source Converter::vec(const std::string& hf_name, int64_t n, Source::Kind kind) {
  const TensorInfo& t = need(hf_name, {n});
  Source s;
  s.slices.push_back({&t, 0, 1});
  s.cols = n;
  s.kind = kind;
  return s;
}

// Decides a tensor's dtype (and group) in the package.
PackedTensor Converter::plan(const std::string& name, std::vector<int64_t> shape, const Source& src) {
  PackedTensor t;
  t.name = name;
  t.shape = std::move(shape);
  if (src.kind != Source::kMatrix) {
    t.dtype = DType::kF32;
  } else {
    auto want = opt_.quant.dtype.find(src.cls);
    if (src.mxfp4) {
      // MXFP4 (gpt-oss): imported as is whatever the recipe, never requantised.
      t.dtype = DType::kMxfp4;
    } else if (src.bits > 0) {
      // Already quantised (MLX): imported as is whatever the recipe, never requantised.
      t.dtype = src.bits == 8 ? DType::kQ8 : src.bits == 4 ? DType::kQ4 : DType::kQ2;
      t.group = src.group;
    } else if (want != opt_.quant.dtype.end() && want->second == DType::kMxfp4) {
      // --quant mxfp4: quantised here (format/mxfp4.h mxfp4_quantize_rows)
      if (src.cols % kMxfp4Group == 0) {
        t.dtype = DType::kMxfp4;
      } else {
        t.dtype = float_dtype(src);
        report_.notes.push_back(fmt::format("{}: input dimension {} is not a multiple of 32; kept {}",
                                            name, src.cols, dtype_name(t.dtype)));
      }
    } else if (want != opt_.quant.dtype.end()) {
      const int bits = quant_bits(want->second);
      for (int g : {opt_.quant.group, 128, 64, 32})
        if (quantisable(src.cols, bits, g)) {
          t.dtype = want->second;
          t.group = g;
          break;
        }
      if (t.group == 0) {
        t.dtype = float_dtype(src);
        report_.notes.push_back(fmt::format(
            "{}: input dimension {} is divisible by no group size (32, 64, 128); kept {}", name,
            src.cols, dtype_name(t.dtype)));
      }
    } else {
      t.dtype = float_dtype(src);
    }
  }
  t.nbytes = t.expected_bytes();
  return t;
}

// The checkpoint tensor behind each package tensor of a layer (format/schema.h) that has one,
// after "<prefix>layers.N.".
const std::map<std::string, std::string, std::less<>> kHfLayerNames = {
    {"attn_norm", "input_layernorm.weight"},
    {"ffn_norm", "post_attention_layernorm.weight"},
    {"attn_q", "self_attn.q_proj.weight"},
    {"attn_k", "self_attn.k_proj.weight"},
    {"attn_v", "self_attn.v_proj.weight"},
    {"attn_o", "self_attn.o_proj.weight"},
    {"attn_q_norm", "self_attn.q_norm.weight"},
    {"attn_k_norm", "self_attn.k_norm.weight"},
    {"attn_q_bias", "self_attn.q_proj.bias"},  // GLM-4.5 (attention_bias), gpt-oss
    {"attn_k_bias", "self_attn.k_proj.bias"},
    {"attn_v_bias", "self_attn.v_proj.bias"},
    {"lin_qkv", "linear_attn.in_proj_qkv.weight"},
    {"lin_z", "linear_attn.in_proj_z.weight"},
    {"lin_b", "linear_attn.in_proj_b.weight"},
    {"lin_a", "linear_attn.in_proj_a.weight"},
    {"lin_conv", "linear_attn.conv1d.weight"},
    {"lin_A_log", "linear_attn.A_log"},
    {"lin_dt_bias", "linear_attn.dt_bias"},
    {"lin_norm", "linear_attn.norm.weight"},
    {"lin_out", "linear_attn.out_proj.weight"},
    {"ffn_gate", "mlp.gate_proj.weight"},
    {"ffn_up", "mlp.up_proj.weight"},
    {"ffn_down", "mlp.down_proj.weight"},
    {"attn_o_bias", "self_attn.o_proj.bias"},  // gpt-oss
    {"attn_sinks", "self_attn.sinks"},
};
// The same for the tensors of a MoE layer, after its MoE block (moe_prefix).
const std::map<std::string, std::string, std::less<>> kHfMoeNames = {
    {"moe_router", "gate.weight"},
    {"shexp_gate", "shared_expert.gate_proj.weight"},
    {"shexp_up", "shared_expert.up_proj.weight"},
    {"shexp_down", "shared_expert.down_proj.weight"},
    {"shexp_router", "shared_expert_gate.weight"},
    {"moe_router_bias", "gate.e_score_correction_bias"},
};

// "<prefix>layers.N.mlp.", or Mixtral's "<prefix>layers.N.block_sparse_moe.".
std::string Converter::moe_prefix(int l) const {
  const std::string hp = fmt::format("{}layers.{}.", prefix_, l);
  return hp + (ckpt_.find(hp + "block_sparse_moe.gate.weight") ? "block_sparse_moe." : "mlp.");
}

// The checkpoint rows that make package tensor `t`, shapes checked against the schema's.
Source Converter::source(const TensorSpec& t) {
  std::string hf;
  if (t.layer < 0) {
    hf = t.key == "embed"            ? prefix_ + "embed_tokens.weight"
         : t.key == "final_norm"     ? prefix_ + "norm.weight"
         : ckpt_.find(lm_head_name_) ? lm_head_name_
                                     : "lm_head.weight";
  } else {
    const std::string hp = fmt::format("{}layers.{}.", prefix_, t.layer);
    const std::string la = hp + "linear_attn.";
    if ((t.key == "lin_qkv" || t.key == "lin_z" || t.key == "lin_b" || t.key == "lin_a") &&
        ckpt_.find(la + "in_proj_qkvz.weight"))
      return fused_linear_attn(t, la);
    if (cfg_.spec.attn[size_t(t.layer)] == AttnKind::kMla && t.key.starts_with("attn_") &&
        t.key != "attn_norm")
      return mla(t, hp + "self_attn.");
    if (cfg_.spec.arch == "gpt_oss" && t.key.starts_with("moe_")) return gpt_oss_moe(t);
    auto moe = kHfMoeNames.find(t.key);
    hf =
        moe != kHfMoeNames.end() ? moe_prefix(t.layer) + moe->second : hp + kHfLayerNames.at(t.key);
    // DeepSeek-V3 spells the shared expert in the plural: mlp.shared_experts.
    if (t.key.starts_with("shexp_") && !ckpt_.find(hf)) {
      std::string plural = hf;
      plural.replace(plural.find("shared_expert."), 14, "shared_experts.");
      if (ckpt_.find(plural)) hf = plural;
    }
    if (t.key == "lin_conv") return conv(hf, t.shape[0], t.shape[1]);
  }
  switch (t.role) {
    case TensorRole::kNorm:
      // The gated norm inside the DeltaNet scales by plain w (not 1 + w) in every arch.
      return vec(hf, t.shape[0], t.key == "lin_norm" ? Source::kVectorF32 : Source::kNormF32);
    case TensorRole::kVector:
      return vec(hf, t.shape[0], Source::kVectorF32);
    case TensorRole::kRouter: {
      // Routers stay f32: they decide which experts run (an MLX 8-bit router is dequantised).
      Source r = matrix(hf, t.shape[0], t.shape[1], t.cls);
      r.kind = Source::kVectorF32;
      return r;
    }
    case TensorRole::kMatrix:
      break;
  }
  return matrix(hf, t.shape[0], t.shape[1], t.cls);
}

// DeepSeek-V3's attention (MLA). Rows of each head's rope part are permuted from HF's
// interleaved pairs (rope_interleave: HF de-interleaves x[0], x[2], .., x[1], x[3], .. before a
// rotate-half) into rotate-half order, so the runtime has one RoPE; kv_b_proj is split into
// attn_k_b (key rows, transposed per head) and attn_v_b (value rows).
Source Converter::mla(const TensorSpec& t, const std::string& ap) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size, nh = s.n_heads, L = s.kv_lora_rank, R = s.rope_dim;
  const int64_t qk = s.head_dim, nope = s.mla_nope_dim(), vd = s.v_head_dim;
  // The package's row j of a rope part is the checkpoint's row rope_row(j) of it.
  auto rope_row = [&](int64_t j) {
    if (!cfg_.rope_interleave) return j;
    return j < R / 2 ? 2 * j : 2 * (j - R / 2) + 1;
  };
  // Per head: the nope rows as one run, the rope rows one by one.
  auto permute_heads = [&](Source from, int64_t heads, int64_t head_rows, int64_t first_rope) {
    Source out = from;
    out.slices.clear();
    for (int64_t h = 0; h < heads; h++) {
      RowSlice sl = from.slices[0];
      sl.row0 = h * head_rows;
      sl.n_rows = first_rope;
      if (sl.n_rows > 0) out.slices.push_back(sl);
      for (int64_t j = 0; j < R; j++) {
        sl.row0 = h * head_rows + first_rope + rope_row(j);
        sl.n_rows = 1;
        out.slices.push_back(sl);
      }
    }
    return out;
  };
  if (t.key == "attn_q_a") return matrix(ap + "q_a_proj.weight", s.q_lora_rank, H, t.cls);
  if (t.key == "attn_q_a_norm")
    return vec(ap + "q_a_layernorm.weight", s.q_lora_rank, Source::kNormF32);
  if (t.key == "attn_q_b")
    return permute_heads(matrix(ap + "q_b_proj.weight", nh * qk, s.q_lora_rank, t.cls), nh, qk,
                         nope);
  if (t.key == "attn_q")
    return permute_heads(matrix(ap + "q_proj.weight", nh * qk, H, t.cls), nh, qk, nope);
  if (t.key == "attn_kv_a")
    return permute_heads(matrix(ap + "kv_a_proj_with_mqa.weight", L + R, H, t.cls), 1, L + R, L);
  if (t.key == "attn_kv_a_norm") return vec(ap + "kv_a_layernorm.weight", L, Source::kNormF32);
  if (t.key == "attn_o") return matrix(ap + "o_proj.weight", H, nh * vd, t.cls);
  const Source kvb = matrix(ap + "kv_b_proj.weight", nh * (nope + vd), L, t.cls);
  if (t.key == "attn_v_b") {
    Source out = kvb;
    out.slices.clear();
    for (int64_t h = 0; h < nh; h++) {
      RowSlice sl = kvb.slices[0];
      sl.row0 = h * (nope + vd) + nope;
      sl.n_rows = vd;
      out.slices.push_back(sl);
    }
    return out;
  }
  MF_CHECK(t.key == "attn_k_b");
  // attn_k_b[h*L + c, i] = kv_b[h*(nope + vd) + i, c]
  Source out = kvb;
  out.cols = nope;
  out.bits = 0;  // made in f32 (an MLX-quantised kv_b is dequantised and requantised)
  out.rows = nh * L;
  out.make = [this, kvb, nh, L, nope, vd](float* dst) {
    std::vector<float> head(size_t(nope * L));
    for (int64_t h = 0; h < nh; h++) {
      rows_f32(kvb, kvb.slices[0], h * (nope + vd), nope, head.data());
      for (int64_t i = 0; i < nope; i++)
        for (int64_t c = 0; c < L; c++)
          dst[size_t((h * L + c) * nope + i)] = head[size_t(i * L + c)];
    }
  };
  return out;
}

// Qwen3-Next packs [q k v z] per key-head group and [b a] per group; the rows are reordered into
// the Qwen3.5 layout ([q all | k all | v all], z, b, a).
Source Converter::fused_linear_attn(const TensorSpec& t, const std::string& la) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size, nk = s.lin_k_heads, dk = s.lin_k_dim, dv = s.lin_v_dim;
  const int64_t r = s.lin_v_heads / nk, grp = 2 * dk + 2 * r * dv;
  std::vector<std::pair<int64_t, int64_t>> runs;  // (first row, rows) of the fused tensor
  Source from;
  if (t.key == "lin_qkv" || t.key == "lin_z") {
    from = matrix(la + "in_proj_qkvz.weight", nk * grp, H, t.cls);
    if (t.key == "lin_qkv") {
      for (int64_t g = 0; g < nk; g++) runs.push_back({g * grp, dk});
      for (int64_t g = 0; g < nk; g++) runs.push_back({g * grp + dk, dk});
      for (int64_t g = 0; g < nk; g++) runs.push_back({g * grp + 2 * dk, r * dv});
    } else {
      for (int64_t g = 0; g < nk; g++) runs.push_back({g * grp + 2 * dk + r * dv, r * dv});
    }
  } else {
    from = matrix(la + "in_proj_ba.weight", nk * 2 * r, H, t.cls);
    const int64_t first = t.key == "lin_b" ? 0 : r;
    for (int64_t g = 0; g < nk; g++) runs.push_back({g * 2 * r + first, r});
  }
  Source out = from;
  out.slices.clear();
  for (auto [row0, n] : runs) {
    RowSlice sl = from.slices[0];
    sl.row0 = row0;
    sl.n_rows = n;
    out.slices.push_back(sl);
  }
  return out;
}

// The depthwise conv [channels, kernel]: HF stores it as [C, 1, K], MLX as [C, K, 1]: the same
// bytes.
Source Converter::conv(const std::string& hf_name, int64_t channels, int64_t kernel) {
  const TensorInfo* c = ckpt_.find(hf_name);
  const bool mlx_conv = c && c->shape == std::vector<int64_t>{channels, kernel, 1} && kernel != 1;
  const TensorInfo& cw = need(hf_name, mlx_conv ? std::vector<int64_t>{channels, kernel, 1}
                                                : std::vector<int64_t>{channels, 1, kernel});
  Source cs;
  cs.slices.push_back({&cw, 0, 1});
  cs.cols = channels * kernel;
  cs.kind = Source::kVectorF32;
  return cs;
}

void Converter::plan_experts(int l) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size, I = s.moe_ffn, E = s.n_experts;
  const auto X = TensorClass::kExperts;
  std::vector<std::array<Source, 3>> experts(static_cast<size_t>(E));
  const std::string mp = moe_prefix(l);
  // Row runs of stacked [E, rows, ...] sources: expert e's block of `rows` starting at `first`.
  auto expert_rows = [](const Source& all, int64_t e, int64_t per_expert, int64_t first, int64_t n) {
    Source out = all;
    out.slices[0].row0 = e * per_expert + first;
    out.slices[0].n_rows = n;
    return out;
  };
  const TensorInfo* gate_up = find_any({mp + "experts.gate_up_proj", mp + "experts.gate_up_proj.weight"});
  if (ckpt_.find(mp + "switch_mlp.gate_proj.weight") || ckpt_.find(mp + "switch_mlp.w1.weight")) {
    // MLX: stacked [E, out, in] (possibly quantised), one tensor per projection.
    const bool mixtral_names = ckpt_.find(mp + "switch_mlp.w1.weight") != nullptr;
    const std::string sm = mp + "switch_mlp.";
    Source g = stacked(sm + (mixtral_names ? "w1" : "gate_proj") + ".weight", E, I, H, X);
    Source u = stacked(sm + (mixtral_names ? "w3" : "up_proj") + ".weight", E, I, H, X);
    Source d = stacked(sm + (mixtral_names ? "w2" : "down_proj") + ".weight", E, H, I, X);
    for (int64_t e = 0; e < E; e++)
      experts[size_t(e)] = {expert_rows(g, e, I, 0, I), expert_rows(u, e, I, 0, I),
                            expert_rows(d, e, H, 0, H)};
  } else if (gate_up) {
    // Fused 3-D spelling: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    Source gu = stacked(gate_up->name, E, 2 * I, H, X);
    const TensorInfo* dp = find_any({mp + "experts.down_proj", mp + "experts.down_proj.weight"});
    if (!dp) fail(ErrorKind::kFormat, "{}: missing tensor '{}experts.down_proj'", hf_dir_, mp);
    Source d = stacked(dp->name, E, H, I, X);
    for (int64_t e = 0; e < E; e++)
      experts[size_t(e)] = {expert_rows(gu, e, 2 * I, 0, I), expert_rows(gu, e, 2 * I, I, I),
                            expert_rows(d, e, H, 0, H)};
  } else {
    const bool mixtral_names = ckpt_.find(mp + "experts.0.w1.weight") != nullptr;
    const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
    const char* mnames[3] = {"w1", "w3", "w2"};
    for (int64_t e = 0; e < E; e++)
      for (int p = 0; p < 3; p++) {
        std::string n = fmt::format("{}experts.{}.{}.weight", mp, e, mixtral_names ? mnames[p] : names[p]);
        experts[size_t(e)][size_t(p)] = p < 2 ? matrix(n, I, H, X) : matrix(n, H, I, X);
      }
  }
  expert_src_.push_back(std::move(experts));
}

// gpt-oss's resident MoE tensors: mlp.router.{weight,bias}; the experts' biases from
// gate_up_proj_bias [E, 2I] (gate in the even columns, up in the odd ones: interleaved, as
// transformers' GptOssExperts reads them) and down_proj_bias [E, H].
Source Converter::gpt_oss_moe(const TensorSpec& t) {
  const ModelSpec& s = cfg_.spec;
  const int64_t E = s.n_experts, I = s.moe_ffn, H = s.hidden_size;
  const std::string mp = moe_prefix(t.layer);
  if (t.key == "moe_router") {
    Source r = matrix(mp + "router.weight", E, H, t.cls);
    r.kind = Source::kVectorF32;
    return r;
  }
  if (t.key == "moe_router_logit_bias") return vec(mp + "router.bias", E, Source::kVectorF32);
  if (t.key == "moe_down_bias") {
    const TensorInfo& b = need(mp + "experts.down_proj_bias", {E, H});
    Source out;
    out.slices.push_back({&b, 0, E});
    out.cols = H;
    out.kind = Source::kVectorF32;
    return out;
  }
  if (t.key == "moe_gate_bias" || t.key == "moe_up_bias") {
    const TensorInfo& b = need(mp + "experts.gate_up_proj_bias", {E, 2 * I});
    const int64_t odd = t.key == "moe_up_bias" ? 1 : 0;
    Source out;
    out.slices.push_back({&b, 0, E});
    out.cols = I;
    out.rows = E;
    out.kind = Source::kVectorF32;
    out.make = [&b, E, I, odd](float* dst) {
      std::vector<float> row(size_t(2 * I));
      for (int64_t e = 0; e < E; e++) {
        to_f32(b.dtype, b.data + uint64_t(e * 2 * I) * dtype_size(b.dtype), row.data(), row.size());
        for (int64_t i = 0; i < I; i++) dst[e * I + i] = row[size_t(2 * i + odd)];
      }
    };
    return out;
  }
  fail(ErrorKind::kInternal, "gpt-oss: no source for '{}'", t.name);
}

// gpt-oss's experts. MXFP4 checkpoints (openai/gpt-oss-*): gate_up_proj_blocks [E, 2I, H/32,
// 16] + _scales [E, 2I, H/32], rows interleaved (gate 2i, up 2i + 1), and down_proj_blocks
// [E, H, I/32, 16] + _scales [E, H, I/32]: each expert's rows are copied as they are. bf16
// checkpoints (what transformers saves unquantised): gate_up_proj [E, H, 2I] and down_proj
// [E, I, H], the transposes of the [out, in] matrices (the orientation is read off gate_up's
// shape; the [E, 2I, H] / [E, H, I] spelling is accepted too), made into gate/up/down in f32
// and then stored by the recipe like any float weight.
void Converter::plan_experts_gpt_oss(int l) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size, I = s.moe_ffn, E = s.n_experts;
  const auto X = TensorClass::kExperts;
  const std::string mp = moe_prefix(l) + "experts.";
  std::vector<std::array<Source, 3>> experts(static_cast<size_t>(E));
  const TensorInfo* gu_blocks = ckpt_.find(mp + "gate_up_proj_blocks");
  const TensorInfo* dn_blocks = ckpt_.find(mp + "down_proj_blocks");
  if (gu_blocks || dn_blocks) {
    // Both matrices must come as blocks + scales of the expected shapes, u8.
    auto mx = [&](const std::string& base, int64_t rows, int64_t cols) {
      const TensorInfo* b = ckpt_.find(base + "_blocks");
      const TensorInfo* sc = ckpt_.find(base + "_scales");
      if (!b) fail(ErrorKind::kFormat, "{}: MXFP4 checkpoint without tensor '{}_blocks'", hf_dir_, base);
      if (!sc)
        fail(ErrorKind::kFormat, "{}: tensor '{}' has no scales '{}_scales'", b->file, b->name, base);
      if (cols % kMxfp4Group)
        fail(ErrorKind::kFormat, "{}: tensor '{}': {} input columns are not whole MXFP4 groups of 32",
             b->file, b->name, cols);
      const std::vector<int64_t> bs = {E, rows, cols / kMxfp4Group, kMxfp4Group / 2};
      const std::vector<int64_t> ss = {E, rows, cols / kMxfp4Group};
      if (b->dtype != DType::kU8 || b->shape != bs)
        fail(ErrorKind::kFormat, "{}: tensor '{}' is {} {}, expected U8 [{}] (MXFP4 blocks)",
             b->file, b->name, dtype_st_name(b->dtype), b->shape_str(), fmt::join(bs, ", "));
      if (sc->dtype != DType::kU8 || sc->shape != ss)
        fail(ErrorKind::kFormat, "{}: tensor '{}' is {} {}, expected U8 [{}] (MXFP4 e8m0 scales)",
             sc->file, sc->name, dtype_st_name(sc->dtype), sc->shape_str(), fmt::join(ss, ", "));
      used_.insert(b->name);
      used_.insert(sc->name);
      Source src;
      src.cols = cols;
      src.cls = X;
      src.mxfp4 = true;
      src.slices.push_back({b, 0, 0, sc});
      return src;
    };
    const Source gu = mx(mp + "gate_up_proj", 2 * I, H), dn = mx(mp + "down_proj", H, I);
    auto part = [](Source src, int64_t row0, int64_t n, int64_t step) {
      src.slices[0].row0 = row0;
      src.slices[0].n_rows = n;
      src.slices[0].row_step = step;
      return src;
    };
    for (int64_t e = 0; e < E; e++)
      experts[size_t(e)] = {part(gu, e * 2 * I, I, 2), part(gu, e * 2 * I + 1, I, 2),
                            part(dn, e * H, H, 1)};
  } else {
    const TensorInfo* gu = ckpt_.find(mp + "gate_up_proj");
    if (!gu) fail(ErrorKind::kFormat, "{}: missing tensor '{}gate_up_proj' (or its MXFP4 _blocks)", hf_dir_, mp);
    const bool transposed = gu->shape == std::vector<int64_t>{E, H, 2 * I};
    const TensorInfo& g = need(gu->name, transposed ? std::vector<int64_t>{E, H, 2 * I}
                                                    : std::vector<int64_t>{E, 2 * I, H});
    const TensorInfo& d = need(mp + "down_proj", transposed ? std::vector<int64_t>{E, I, H}
                                                            : std::vector<int64_t>{E, H, I});
    // Expert e's [rows, cols] = [out, in] matrix, element (r, c) at src[e][idx(r, c)].
    auto made = [&](const TensorInfo& src, int64_t e, int64_t rows, int64_t cols,
                    std::function<int64_t(int64_t, int64_t)> idx, int64_t block) {
      Source out;
      out.slices.push_back({&src, 0, 1});
      out.cols = cols;
      out.rows = rows;
      out.cls = X;
      out.make = [&src, e, rows, cols, idx, block](float* dst) {
        std::vector<float> all(static_cast<size_t>(block));
        to_f32(src.dtype, src.data + uint64_t(e * block) * dtype_size(src.dtype), all.data(), all.size());
        for (int64_t r = 0; r < rows; r++)
          for (int64_t c = 0; c < cols; c++) dst[r * cols + c] = all[size_t(idx(r, c))];
      };
      return out;
    };
    const int64_t gub = H * 2 * I, db = H * I;
    for (int64_t e = 0; e < E; e++) {
      auto gate = transposed ? std::function<int64_t(int64_t, int64_t)>(
                                   [I](int64_t r, int64_t c) { return c * 2 * I + 2 * r; })
                             : [H](int64_t r, int64_t c) { return (2 * r) * H + c; };
      auto up = transposed ? std::function<int64_t(int64_t, int64_t)>(
                                 [I](int64_t r, int64_t c) { return c * 2 * I + 2 * r + 1; })
                           : [H](int64_t r, int64_t c) { return (2 * r + 1) * H + c; };
      auto down = transposed ? std::function<int64_t(int64_t, int64_t)>(
                                   [H](int64_t r, int64_t c) { return c * H + r; })
                             : [I](int64_t r, int64_t c) { return r * I + c; };
      experts[size_t(e)] = {made(g, e, I, H, gate, gub), made(g, e, I, H, up, gub),
                            made(d, e, H, I, down, db)};
    }
  }
  expert_src_.push_back(std::move(experts));
}

// MXFP4 in, MXFP4 out: each row's nibbles and e8m0 scales copied as they are (a scale of 255,
// NaN in the MX spec, is refused naming the tensor).
void Converter::write_mxfp4(FileWriter& w, const PackedTensor& t, const Source& src) {
  MF_CHECK(t.dtype == DType::kMxfp4 && t.shape.size() == 2 && t.shape[1] == src.cols);
  const uint64_t base = w.offset();
  const int64_t cols = src.cols, rows = t.shape[0];
  const uint64_t pr = uint64_t(cols / 2), sr = uint64_t(cols / kMxfp4Group);
  int64_t out_row = 0;
  for (const RowSlice& sl : src.slices) {
    for (int64_t i = 0; i < sl.n_rows; i++, out_row++) {
      const int64_t row = sl.row0 + i * sl.row_step;
      MF_CHECK(uint64_t(row + 1) * pr <= sl.src->nbytes && uint64_t(row + 1) * sr <= sl.scales->nbytes);
      const uint8_t* scales = sl.scales->data + uint64_t(row) * sr;
      for (uint64_t g = 0; g < sr; g++)
        if (scales[g] == 255)
          fail(ErrorKind::kFormat, "{}: tensor '{}': e8m0 scale 255 (NaN) at row {}, group {}",
               sl.scales->file, sl.scales->name, row, g);
      w.seek(base + uint64_t(out_row) * pr);
      w.write(sl.src->data + uint64_t(row) * pr, pr);
      w.seek(base + uint64_t(rows) * pr + uint64_t(out_row) * sr);
      w.write(scales, sr);
    }
  }
  MF_CHECK(out_row == rows);
  w.seek(base + t.nbytes);
}

void Converter::check_leftovers() {
  int skipped_vision = 0, skipped_mtp = 0;
  for (const auto& name : ckpt_.names()) {
    if (used_.count(name)) continue;
    if (name.starts_with("model.visual.") || name.starts_with("visual.") ||
        name.starts_with("vision_tower.") || name.starts_with("model.vision_tower.")) {
      skipped_vision++;
    } else if (name.starts_with("mtp.") || name.starts_with("model.mtp.")) {
      skipped_mtp++;
    } else if ((cfg_.spec.arch == "deepseek_v3" || cfg_.spec.arch == "glm4_moe") &&
               name.starts_with(prefix_ + "layers.") &&
               std::atoi(name.c_str() + prefix_.size() + 7) >= cfg_.spec.n_layers) {
      skipped_mtp++;  // DeepSeek-V3 and GLM-4.5 store their MTP module as layer num_hidden_layers
    } else if ((name == "lm_head.weight" || name == lm_head_name_) && cfg_.spec.tie_embeddings) {
      report_.notes.push_back(name + " skipped: tie_word_embeddings uses the embedding");
    } else if (name.ends_with("rotary_emb.inv_freq")) {
      // a buffer some exporters save; recomputed from rope_theta
    } else {
      fail(ErrorKind::kUnsupported,
           "{}: tensor '{}' is not used by a {} model (unsupported feature or wrong config?)",
           hf_dir_, name, cfg_.spec.arch);
    }
  }
  if (skipped_vision)
    report_.notes.push_back(fmt::format("skipped {} vision tensors (text model only)", skipped_vision));
  if (skipped_mtp)
    report_.notes.push_back(fmt::format("skipped {} mtp (multi-token prediction) tensors", skipped_mtp));
}

void Converter::rows_f32(const Source& src, const RowSlice& sl, int64_t row, int64_t n,
                         float* out) {
  const TensorInfo& in = *sl.src;
  const int64_t cols = src.cols;
  if (src.bits > 0) {
    const int64_t swpr = cols * src.bits / 32, sgpr = cols / src.group;
    for (int64_t i = 0; i < n; i++)
      dequantize_row(reinterpret_cast<const uint32_t*>(in.data) + (row + i) * swpr,
                     reinterpret_cast<const uint16_t*>(sl.scales->data) + (row + i) * sgpr,
                     reinterpret_cast<const uint16_t*>(sl.biases->data) + (row + i) * sgpr, cols,
                     src.bits, src.group, out + i * cols);
    return;
  }
  MF_CHECK(uint64_t((row + n) * cols) * dtype_size(in.dtype) <= in.nbytes);
  to_f32(in.dtype, in.data + uint64_t(row * cols) * dtype_size(in.dtype), out, size_t(n * cols));
  if (src.fp8) {
    // The f32 product of the e4m3 value (exact in f32) and its block's scale, as DeepSeek's
    // weight_dequant computes it, then rounded once more to the package dtype.
    const int64_t bpr = (cols + src.block_cols - 1) / src.block_cols;
    const float* scale = reinterpret_cast<const float*>(sl.scales->data);
    for (int64_t i = 0; i < n; i++) {
      const float* sr = scale + ((row + i) / src.block_rows) * bpr;
      float* o = out + i * cols;
      for (int64_t c = 0; c < cols; c++) o[c] *= sr[c / src.block_cols];
    }
  }
}

// Writes `src` as package tensor `t` at the writer's current offset. Rows are processed one
// slice at a time, so no tensor is held whole in memory (except one that is made, src.make).
void Converter::write_tensor(FileWriter& w, const PackedTensor& t, const Source& src) {
  if (src.mxfp4) return write_mxfp4(w, t, src);
  if (src.make) {
    const uint64_t at = w.offset();
    std::vector<float> all(size_t(src.rows * src.cols));
    src.make(all.data());
    put_f32_rows(w, t, at, 0, all.data(), src.rows, src.cols);
    w.seek(at + t.nbytes);
    return;
  }
  const uint64_t base = w.offset();
  const int64_t cols = src.cols;
  const bool out_q = is_quant_dtype(t.dtype);
  const int bits = out_q ? quant_bits(t.dtype) : 0;
  QuantLayout ql{};
  if (out_q) ql = quant_layout(t.shape[0], cols, bits, t.group);
  const uint64_t wpr = out_q ? uint64_t(cols) * bits / 32 : 0, gpr = out_q ? uint64_t(cols / t.group) : 0;
  int64_t out_row = 0;
  constexpr int64_t kChunkRows = 256;
  for (const auto& sl : src.slices) {
    MF_CHECK(sl.row_step == 1);
    for (int64_t r0 = 0; r0 < sl.n_rows; r0 += kChunkRows) {
      const int64_t n = std::min(kChunkRows, sl.n_rows - r0), row = sl.row0 + r0;
      const TensorInfo& in = *sl.src;
      if (src.bits > 0 && out_q) {
        // Quantised in, quantised out (MLX import): copy words, scales and biases.
        MF_CHECK(src.bits == bits && src.group == t.group);
        w.seek(base + uint64_t(out_row) * wpr * 4);
        w.write(in.data + uint64_t(row) * wpr * 4, uint64_t(n) * wpr * 4);
        w.seek(base + ql.packed_bytes + uint64_t(out_row) * gpr * 2);
        w.write(sl.scales->data + uint64_t(row) * gpr * 2, uint64_t(n) * gpr * 2);
        w.seek(base + ql.packed_bytes + ql.scales_bytes + uint64_t(out_row) * gpr * 2);
        w.write(sl.biases->data + uint64_t(row) * gpr * 2, uint64_t(n) * gpr * 2);
        out_row += n;
        continue;
      }
      // Anything else goes through f32.
      f32_.resize(size_t(n * cols));
      if (src.bits == 0 && !out_q && in.dtype == t.dtype && src.kind != Source::kNormF32) {
        MF_CHECK(uint64_t((row + n) * cols) * dtype_size(in.dtype) <= in.nbytes);
        w.write(in.data + uint64_t(row * cols) * dtype_size(in.dtype),
                uint64_t(n * cols) * dtype_size(in.dtype));
        out_row += n;
        continue;
      }
      rows_f32(src, sl, row, n, f32_.data());
      if (src.kind == Source::kNormF32 && cfg_.norm_one_plus && !mlx_)
        for (auto& x : f32_) x += 1.0f;  // zero-centred norm: scale = 1 + w, folded here
      put_f32_rows(w, t, base, out_row, f32_.data(), n, cols);
      out_row += n;
    }
  }
  w.seek(base + t.nbytes);
}

void Converter::put_f32_rows(FileWriter& w, const PackedTensor& t, uint64_t base, int64_t out_row,
                             const float* data, int64_t n, int64_t cols) {
  if (t.dtype == DType::kMxfp4) {  // --quant mxfp4
    const uint64_t pr = uint64_t(cols / 2), sr = uint64_t(cols / kMxfp4Group);
    buf_.resize(size_t(uint64_t(n) * (pr + sr)));
    uint8_t* packed = buf_.data();
    uint8_t* scales = buf_.data() + uint64_t(n) * pr;
    mxfp4_quantize_rows(data, n, cols, packed, scales);
    w.seek(base + uint64_t(out_row) * pr);
    w.write(packed, uint64_t(n) * pr);
    w.seek(base + uint64_t(t.shape[0]) * pr + uint64_t(out_row) * sr);
    w.write(scales, uint64_t(n) * sr);
    return;
  }
  if (is_quant_dtype(t.dtype)) {
    const int bits = quant_bits(t.dtype);
    const QuantLayout ql = quant_layout(t.shape[0], cols, bits, t.group);
    const uint64_t wpr = uint64_t(cols) * bits / 32, gpr = uint64_t(cols / t.group);
    packed_.resize(size_t(uint64_t(n) * wpr));
    sc_.resize(size_t(uint64_t(n) * gpr));
    bi_.resize(size_t(uint64_t(n) * gpr));
    quantize_rows(data, n, cols, bits, t.group, packed_.data(), sc_.data(), bi_.data());
    w.seek(base + uint64_t(out_row) * wpr * 4);
    w.write(packed_.data(), packed_.size() * 4);
    w.seek(base + ql.packed_bytes + uint64_t(out_row) * gpr * 2);
    w.write(sc_.data(), sc_.size() * 2);
    w.seek(base + ql.packed_bytes + ql.scales_bytes + uint64_t(out_row) * gpr * 2);
    w.write(bi_.data(), bi_.size() * 2);
  } else {
    buf_.resize(size_t(n * cols) * dtype_size(t.dtype));
    from_f32(t.dtype, data, buf_.data(), size_t(n * cols));
    w.write(buf_.data(), buf_.size());
  }
}

ConvertReport Converter::run() {
  const ModelSpec& s = cfg_.spec;
  if (ckpt_.find("language_model.model.embed_tokens.weight")) {
    prefix_ = "language_model.model.";
    lm_head_name_ = "language_model.lm_head.weight";
  } else if (ckpt_.find("model.language_model.embed_tokens.weight")) {
    prefix_ = "model.language_model.";
  } else {
    prefix_ = "model.";
  }
  // mlx-lm's sanitize stacks experts into switch_mlp, moves conv1d to [C, K, 1] and adds 1 to
  // the zero-centred norms; a checkpoint it wrote must not be shifted again.
  for (const auto& n : ckpt_.names()) {
    const TensorInfo* t = ckpt_.find(n);
    if (n.find(".switch_mlp.") != std::string::npos ||
        (n.ends_with("conv1d.weight") && t->shape.size() == 3 && t->shape[2] == 1 && t->shape[1] != 1)) {
      mlx_ = true;
      break;
    }
  }
  if (mlx_ && cfg_.norm_one_plus)
    report_.notes.push_back("MLX checkpoint: norm weights already hold 1 + w");
  m_.spec = s;
  for (const TensorSpec& t : resident_schema(s)) {
    resident_src_.push_back(source(t));
    m_.resident.push_back(plan(t.name, t.shape, resident_src_.back()));
  }
  for (int l = 0; l < s.n_layers; l++)
    if (s.ffn[size_t(l)] == FfnKind::kMoe) {
      if (s.arch == "gpt_oss")
        plan_experts_gpt_oss(l);
      else
        plan_experts(l);
    }
  check_leftovers();

  uint64_t off = 0;
  for (auto& t : m_.resident) {
    off = align_up(off, kFileAlign);
    t.offset = off;
    off += t.nbytes;
  }
  m_.resident_bytes = align_up(off, kFileAlign);
  report_.resident_bytes = off;

  ExpertLayout& ex = m_.experts;
  if (!expert_src_.empty()) {
    const std::vector<TensorSpec> x = expert_schema(s);
    std::vector<PackedTensor> parts;
    for (size_t p = 0; p < 3; p++) {
      PackedTensor t = plan(x[p].name, x[p].shape, expert_src_[0][0][p]);
      for (const auto& layer : expert_src_)  // one layout for all experts of all layers
        for (const auto& e : layer) {
          PackedTensor other = plan(x[p].name, x[p].shape, e[p]);
          if (other.dtype != t.dtype || other.group != t.group)
            fail(ErrorKind::kUnsupported, "{}: experts are stored with different dtypes or groups", hf_dir_);
        }
      parts.push_back(t);
    }
    ex = make_expert_layout(s, std::move(parts));
    report_.expert_bytes = ex.bytes * uint64_t(ex.count) * ex.layers.size();
  }

  fs::create_directories(out_dir_ + "/experts");
  uint64_t total = report_.resident_bytes + report_.expert_bytes, done = 0;
  Progress bar("convert", total, opt_.progress);
  {
    FileWriter w(resident_path(out_dir_));
    for (size_t i = 0; i < m_.resident.size(); i++) {
      w.seek(m_.resident[i].offset);
      write_tensor(w, m_.resident[i], resident_src_[i]);
      done += m_.resident[i].nbytes;
      bar.update(done);
    }
    w.pad_to(kFileAlign);  // the writer stands at the end of the last tensor
    MF_CHECK(w.offset() == m_.resident_bytes);
    w.close();
  }
  for (size_t li = 0; li < ex.layers.size(); li++) {
    FileWriter w(expert_file_path(out_dir_, ex.layers[li]));
    for (int e = 0; e < ex.count; e++) {
      for (size_t p = 0; p < 3; p++) {
        w.seek(uint64_t(e) * ex.stride + ex.parts[p].offset);
        write_tensor(w, ex.parts[p], expert_src_[li][size_t(e)][p]);
      }
      w.seek(uint64_t(e) * ex.stride + ex.bytes);
      w.pad_to(kFileAlign);
      done += ex.bytes;
      bar.update(done);
    }
    MF_CHECK(w.offset() == uint64_t(ex.count) * ex.stride);
    w.close();
  }
  bar.finish();

  const std::string tiktoken = hf_dir_ + "/tiktoken.model";
  if (!file_exists(hf_dir_ + "/tokenizer.json") && file_exists(tiktoken)) {
    // Kimi K2: a tiktoken file and a pattern in Python code; written as a tokenizer.json.
    if (cfg_.model_type == "kimi_k2") {
      write_text_file(
          out_dir_ + "/tokenizer.json",
          tiktoken_to_tokenizer_json(tiktoken, hf_dir_ + "/tokenizer_config.json", kKimiK2Pattern));
      m_.tokenizer_files.push_back("tokenizer.json");
      report_.notes.push_back("tokenizer.json made from tiktoken.model with Kimi K2's pattern");
    } else {
      report_.notes.push_back(
          fmt::format("tiktoken.model skipped: no known pre-tokeniser pattern "
                      "for model_type {}; the package has no tokenizer",
                      cfg_.model_type));
    }
  }
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    std::string src = hf_dir_ + "/" + f;
    if (file_exists(src)) {
      fs::copy_file(src, out_dir_ + "/" + f, fs::copy_options::overwrite_existing);
      m_.tokenizer_files.push_back(f);
    }
  }
  nlohmann::json recipe = nullptr;
  if (opt_.quant.name != "none") {
    recipe = nlohmann::json::object();
    const std::map<TensorClass, const char*> names = {
        {TensorClass::kEmbed, "embed"}, {TensorClass::kLmHead, "lm_head"}, {TensorClass::kAttn, "attn"},
        {TensorClass::kLinearAttn, "linear_attn"}, {TensorClass::kSharedExpert, "shared_expert"},
        {TensorClass::kDenseFfn, "dense_ffn"}, {TensorClass::kExperts, "experts"}};
    for (auto [c, d] : opt_.quant.dtype) recipe[names.at(c)] = dtype_name(d);
    recipe = {{"name", opt_.quant.name}, {"group_size", opt_.quant.group}, {"classes", recipe}};
  }
  m_.provenance = {{"source", fs::absolute(hf_dir_).string()},
                   {"source_model_type", cfg_.model_type},
                   {"source_dtype", cfg_.source_dtype},
                   {"source_format", mlx_ ? "mlx" : "hf"},
                   {"converter", std::string("moeflux ") + MOEFLUX_VERSION},
                   {"quantisation", recipe},
                   {"notes", report_.notes}};
  write_manifest(out_dir_, m_);
  return report_;
}

}  // namespace

ConvertReport convert_checkpoint(const std::string& hf_dir, const std::string& out_dir,
                                 const ConvertOptions& opt) {
  check_dirs_disjoint(hf_dir, out_dir);
  StagedDir stage(out_dir, opt.force);
  ConvertReport r = Converter(hf_dir, stage.path(), opt).run();
  stage.commit();
  return r;
}

}  // namespace moeflux
