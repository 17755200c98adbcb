#include "convert/convert.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <array>
#include <functional>
#include <map>
#include <set>

#include "format/hf_config.h"
#include "format/package.h"
#include "format/safetensors.h"
#include "util/error.h"
#include "util/mapped_file.h"
#include "util/progress.h"

namespace moeflux {

namespace fs = std::filesystem;

namespace {

// A matrix (or vector) assembled from rows of checkpoint tensors.
struct RowSlice {
  const TensorInfo* src;
  int64_t row0, n_rows;  // rows of src viewed as [rows, cols]; for 3-D sources, [E*rows, cols]
};

struct Source {
  std::vector<RowSlice> slices;
  int64_t cols = 0;
  enum Kind { kMatrix, kVectorF32, kNormF32 } kind = kMatrix;
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
  void add_resident(const std::string& name, std::vector<int64_t> shape, Source src);
  Source matrix(const std::string& hf_name, int64_t rows, int64_t cols);
  Source vec(const std::string& hf_name, int64_t n, Source::Kind kind);
  void plan_layer(int l);
  void plan_experts(int l);
  void write_tensor(FileWriter& w, const PackedTensor& t, const Source& src,
                    std::vector<uint8_t>& buf);
  void check_leftovers();
  DType matrix_dtype(const TensorInfo& t) const;

  std::string hf_dir_, out_dir_;
  ConvertOptions opt_;
  HfConfig cfg_;
  Checkpoint ckpt_;
  std::string prefix_;  // "model." or "model.language_model."
  std::set<std::string> used_;
  Manifest m_;
  std::vector<Source> resident_src_;
  // per MoE layer: gate, up, down sources for each expert
  std::vector<std::vector<std::array<Source, 3>>> expert_src_;
  ConvertReport report_;
};

DType Converter::matrix_dtype(const TensorInfo& t) const {
  if (opt_.dtype) return *opt_.dtype;
  if (t.dtype == DType::kBF16 || t.dtype == DType::kF16 || t.dtype == DType::kF32) return t.dtype;
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

Source Converter::matrix(const std::string& hf_name, int64_t rows, int64_t cols) {
  const TensorInfo& t = need(hf_name, {rows, cols});
  return Source{{{&t, 0, rows}}, cols, Source::kMatrix};
}

Source Converter::vec(const std::string& hf_name, int64_t n, Source::Kind kind) {
  const TensorInfo& t = need(hf_name, {n});
  return Source{{{&t, 0, 1}}, n, kind};
}

void Converter::add_resident(const std::string& name, std::vector<int64_t> shape, Source src) {
  PackedTensor t;
  t.name = name;
  t.shape = std::move(shape);
  t.dtype = src.kind == Source::kMatrix ? matrix_dtype(*src.slices[0].src) : DType::kF32;
  t.nbytes = uint64_t(t.numel()) * dtype_size(t.dtype);
  m_.resident.push_back(t);
  resident_src_.push_back(std::move(src));
}

void Converter::plan_layer(int l) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size;
  const std::string hp = fmt::format("{}layers.{}.", prefix_, l);
  const std::string pp = fmt::format("blk.{}.", l);
  const auto norm = Source::kNormF32;

  add_resident(pp + "attn_norm", {H}, vec(hp + "input_layernorm.weight", H, norm));
  add_resident(pp + "ffn_norm", {H}, vec(hp + "post_attention_layernorm.weight", H, norm));

  if (s.attn[size_t(l)] == AttnKind::kFull) {
    const int64_t hd = s.head_dim, kv = int64_t(s.n_kv_heads) * hd;
    add_resident(pp + "attn_q", {s.q_rows(), H}, matrix(hp + "self_attn.q_proj.weight", s.q_rows(), H));
    add_resident(pp + "attn_k", {kv, H}, matrix(hp + "self_attn.k_proj.weight", kv, H));
    add_resident(pp + "attn_v", {kv, H}, matrix(hp + "self_attn.v_proj.weight", kv, H));
    const int64_t o_in = int64_t(s.n_heads) * hd;
    add_resident(pp + "attn_o", {H, o_in}, matrix(hp + "self_attn.o_proj.weight", H, o_in));
    if (s.qk_norm) {
      add_resident(pp + "attn_q_norm", {hd}, vec(hp + "self_attn.q_norm.weight", hd, norm));
      add_resident(pp + "attn_k_norm", {hd}, vec(hp + "self_attn.k_norm.weight", hd, norm));
    }
  } else {
    const int64_t nk = s.lin_k_heads, nv = s.lin_v_heads, dk = s.lin_k_dim, dv = s.lin_v_dim;
    const int64_t r = nv / nk, qkv = s.lin_qkv_dim(), vd = nv * dv, K = s.conv_kernel;
    const std::string la = hp + "linear_attn.";
    if (ckpt_.find(la + "in_proj_qkvz.weight")) {
      // Qwen3-Next packs [q k v z] per key-head group and [b a] per group; reorder the rows
      // into the Qwen3.5 layout ([q all | k all | v all], z, b, a).
      const int64_t grp = 2 * dk + 2 * r * dv;
      const TensorInfo& t = need(la + "in_proj_qkvz.weight", {nk * grp, H});
      const TensorInfo& ba = need(la + "in_proj_ba.weight", {nk * 2 * r, H});
      Source q{{}, H, Source::kMatrix}, z{{}, H, Source::kMatrix};
      for (int64_t g = 0; g < nk; g++) q.slices.push_back({&t, g * grp, dk});
      for (int64_t g = 0; g < nk; g++) q.slices.push_back({&t, g * grp + dk, dk});
      for (int64_t g = 0; g < nk; g++) q.slices.push_back({&t, g * grp + 2 * dk, r * dv});
      for (int64_t g = 0; g < nk; g++) z.slices.push_back({&t, g * grp + 2 * dk + r * dv, r * dv});
      Source b{{}, H, Source::kMatrix}, a{{}, H, Source::kMatrix};
      for (int64_t g = 0; g < nk; g++) b.slices.push_back({&ba, g * 2 * r, r});
      for (int64_t g = 0; g < nk; g++) a.slices.push_back({&ba, g * 2 * r + r, r});
      add_resident(pp + "lin_qkv", {qkv, H}, q);
      add_resident(pp + "lin_z", {vd, H}, z);
      add_resident(pp + "lin_b", {nv, H}, b);
      add_resident(pp + "lin_a", {nv, H}, a);
    } else {
      add_resident(pp + "lin_qkv", {qkv, H}, matrix(la + "in_proj_qkv.weight", qkv, H));
      add_resident(pp + "lin_z", {vd, H}, matrix(la + "in_proj_z.weight", vd, H));
      add_resident(pp + "lin_b", {nv, H}, matrix(la + "in_proj_b.weight", nv, H));
      add_resident(pp + "lin_a", {nv, H}, matrix(la + "in_proj_a.weight", nv, H));
    }
    const TensorInfo& conv = need(la + "conv1d.weight", {qkv, 1, K});
    add_resident(pp + "lin_conv", {qkv, K}, Source{{{&conv, 0, 1}}, qkv * K, Source::kVectorF32});
    add_resident(pp + "lin_A_log", {nv}, vec(la + "A_log", nv, Source::kVectorF32));
    add_resident(pp + "lin_dt_bias", {nv}, vec(la + "dt_bias", nv, Source::kVectorF32));
    // The gated norm inside the DeltaNet scales by plain w (not 1 + w) in every arch.
    add_resident(pp + "lin_norm", {dv}, vec(la + "norm.weight", dv, Source::kVectorF32));
    add_resident(pp + "lin_out", {H, vd}, matrix(la + "out_proj.weight", H, vd));
  }

  if (s.ffn[size_t(l)] == FfnKind::kDense) {
    const int64_t I = s.dense_ffn;
    add_resident(pp + "ffn_gate", {I, H}, matrix(hp + "mlp.gate_proj.weight", I, H));
    add_resident(pp + "ffn_up", {I, H}, matrix(hp + "mlp.up_proj.weight", I, H));
    add_resident(pp + "ffn_down", {H, I}, matrix(hp + "mlp.down_proj.weight", H, I));
    return;
  }
  const std::string mp = hp + (s.arch == "mixtral" && ckpt_.find(hp + "block_sparse_moe.gate.weight")
                                   ? "block_sparse_moe."
                                   : "mlp.");
  Source router = matrix(mp + "gate.weight", s.n_experts, H);
  router.kind = Source::kVectorF32;  // routers stay f32: they decide which experts run
  add_resident(pp + "moe_router", {s.n_experts, H}, router);
  if (s.shared_ffn > 0) {
    const int64_t S = s.shared_ffn;
    add_resident(pp + "shexp_gate", {S, H}, matrix(mp + "shared_expert.gate_proj.weight", S, H));
    add_resident(pp + "shexp_up", {S, H}, matrix(mp + "shared_expert.up_proj.weight", S, H));
    add_resident(pp + "shexp_down", {H, S}, matrix(mp + "shared_expert.down_proj.weight", H, S));
    Source g = matrix(mp + "shared_expert_gate.weight", 1, H);
    g.kind = Source::kVectorF32;
    add_resident(pp + "shexp_router", {1, H}, g);
  }
  plan_experts(l);
}

void Converter::plan_experts(int l) {
  const ModelSpec& s = cfg_.spec;
  const int64_t H = s.hidden_size, I = s.moe_ffn, E = s.n_experts;
  const std::string hp = fmt::format("{}layers.{}.", prefix_, l);
  std::vector<std::array<Source, 3>> experts(static_cast<size_t>(E));
  const std::string mp = hp + (ckpt_.find(hp + "block_sparse_moe.experts.0.w1.weight")
                                   ? "block_sparse_moe."
                                   : "mlp.");
  const TensorInfo* gate_up = find_any({mp + "experts.gate_up_proj", mp + "experts.gate_up_proj.weight"});
  if (gate_up) {
    // Fused 3-D spelling: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    const TensorInfo& gu = need(gate_up->name, {E, 2 * I, H});
    const TensorInfo* dp = find_any({mp + "experts.down_proj", mp + "experts.down_proj.weight"});
    if (!dp) fail(ErrorKind::kFormat, "{}: missing tensor '{}experts.down_proj'", hf_dir_, mp);
    const TensorInfo& d = need(dp->name, {E, H, I});
    for (int64_t e = 0; e < E; e++) {
      experts[size_t(e)][0] = Source{{{&gu, e * 2 * I, I}}, H, Source::kMatrix};
      experts[size_t(e)][1] = Source{{{&gu, e * 2 * I + I, I}}, H, Source::kMatrix};
      experts[size_t(e)][2] = Source{{{&d, e * H, H}}, I, Source::kMatrix};
    }
  } else {
    const bool mixtral_names = mp.ends_with("block_sparse_moe.");
    const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
    const char* mnames[3] = {"w1", "w3", "w2"};
    for (int64_t e = 0; e < E; e++)
      for (int p = 0; p < 3; p++) {
        std::string n = fmt::format("{}experts.{}.{}.weight", mp, e, mixtral_names ? mnames[p] : names[p]);
        experts[size_t(e)][size_t(p)] = p < 2 ? matrix(n, I, H) : matrix(n, H, I);
      }
  }
  expert_src_.push_back(std::move(experts));
}

void Converter::check_leftovers() {
  int skipped_vision = 0, skipped_mtp = 0;
  for (const auto& name : ckpt_.names()) {
    if (used_.count(name)) continue;
    if (name.starts_with("model.visual.") || name.starts_with("visual.") ||
        name.starts_with("model.vision_tower.")) {
      skipped_vision++;
    } else if (name.starts_with("mtp.") || name.starts_with("model.mtp.")) {
      skipped_mtp++;
    } else if (name == "lm_head.weight" && cfg_.spec.tie_embeddings) {
      report_.notes.push_back("lm_head.weight skipped: tie_word_embeddings uses the embedding");
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

void Converter::write_tensor(FileWriter& w, const PackedTensor& t, const Source& src,
                             std::vector<uint8_t>& buf) {
  // Rows are converted one source slice at a time so no tensor is held whole in memory twice.
  std::vector<float> tmp;
  for (const auto& sl : src.slices) {
    const TensorInfo& in = *sl.src;
    const int64_t cols = src.cols;
    const int64_t n = sl.n_rows * cols;
    const uint8_t* p = in.data + uint64_t(sl.row0 * cols) * dtype_size(in.dtype);
    MF_CHECK(uint64_t((sl.row0 + sl.n_rows) * cols) * dtype_size(in.dtype) <= in.nbytes);
    if (in.dtype == t.dtype && src.kind != Source::kNormF32) {
      w.write(p, uint64_t(n) * dtype_size(t.dtype));
      continue;
    }
    tmp.resize(size_t(n));
    to_f32(in.dtype, p, tmp.data(), size_t(n));
    if (src.kind == Source::kNormF32 && cfg_.norm_one_plus)
      for (auto& x : tmp) x += 1.0f;  // zero-centred norm: scale = 1 + w, folded here
    buf.resize(size_t(n) * dtype_size(t.dtype));
    from_f32(t.dtype, tmp.data(), buf.data(), size_t(n));
    w.write(buf.data(), buf.size());
  }
}

ConvertReport Converter::run() {
  const ModelSpec& s = cfg_.spec;
  if (ckpt_.find("model.language_model.embed_tokens.weight")) prefix_ = "model.language_model.";
  else prefix_ = "model.";
  const int64_t V = s.vocab_size, H = s.hidden_size;

  m_.spec = s;
  add_resident("embed", {V, H}, matrix(prefix_ + "embed_tokens.weight", V, H));
  for (int l = 0; l < s.n_layers; l++) plan_layer(l);
  add_resident("final_norm", {H}, vec(prefix_ + "norm.weight", H, Source::kNormF32));
  if (!s.tie_embeddings) add_resident("lm_head", {V, H}, matrix("lm_head.weight", V, H));
  check_leftovers();

  // Offsets.
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
    const auto& e0 = expert_src_[0][0];
    const char* part_names[3] = {"gate", "up", "down"};
    const int64_t I = s.moe_ffn;
    std::vector<int64_t> shapes[3] = {{I, H}, {I, H}, {H, I}};
    uint64_t poff = 0;
    for (int p = 0; p < 3; p++) {
      PackedTensor t;
      t.name = part_names[p];
      t.shape = shapes[p];
      t.dtype = matrix_dtype(*e0[size_t(p)].slices[0].src);
      t.nbytes = uint64_t(t.numel()) * dtype_size(t.dtype);
      poff = align_up(poff, kPartAlign);
      t.offset = poff;
      poff += t.nbytes;
      ex.parts.push_back(t);
    }
    ex.count = s.n_experts;
    ex.bytes = poff;
    ex.stride = align_up(poff, kFileAlign);
    for (int l = 0; l < s.n_layers; l++)
      if (s.ffn[size_t(l)] == FfnKind::kMoe) ex.layers.push_back(l);
    report_.expert_bytes = ex.bytes * uint64_t(ex.count) * ex.layers.size();
  }

  fs::create_directories(out_dir_ + "/experts");
  uint64_t total = report_.resident_bytes + report_.expert_bytes, done = 0;
  Progress bar("convert", total, opt_.progress);
  std::vector<uint8_t> buf;
  {
    FileWriter w(resident_path(out_dir_));
    for (size_t i = 0; i < m_.resident.size(); i++) {
      w.seek(m_.resident[i].offset);
      write_tensor(w, m_.resident[i], resident_src_[i], buf);
      done += m_.resident[i].nbytes;
      bar.update(done);
    }
    w.pad_to(kFileAlign);
    MF_CHECK(w.offset() == m_.resident_bytes);
    w.close();
  }
  for (size_t li = 0; li < ex.layers.size(); li++) {
    FileWriter w(expert_file_path(out_dir_, ex.layers[li]));
    for (int e = 0; e < ex.count; e++) {
      for (size_t p = 0; p < 3; p++) {
        w.seek(uint64_t(e) * ex.stride + ex.parts[p].offset);
        write_tensor(w, ex.parts[p], expert_src_[li][size_t(e)][p], buf);
      }
      w.pad_to(kFileAlign);
      done += ex.bytes;
      bar.update(done);
    }
    MF_CHECK(w.offset() == uint64_t(ex.count) * ex.stride);
    w.close();
  }
  bar.finish();

  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    std::string src = hf_dir_ + "/" + f;
    if (file_exists(src)) {
      fs::copy_file(src, out_dir_ + "/" + f, fs::copy_options::overwrite_existing);
      m_.tokenizer_files.push_back(f);
    }
  }
  m_.provenance = {{"source", fs::absolute(hf_dir_).string()},
                   {"source_model_type", cfg_.model_type},
                   {"source_dtype", cfg_.source_dtype},
                   {"converter", std::string("moeflux ") + MOEFLUX_VERSION},
                   {"quantisation", nullptr},
                   {"notes", report_.notes}};
  write_manifest(out_dir_, m_);
  return report_;
}

}  // namespace

ConvertReport convert_checkpoint(const std::string& hf_dir, const std::string& out_dir,
                                 const ConvertOptions& opt) {
  return Converter(hf_dir, out_dir, opt).run();
}

}  // namespace moeflux
