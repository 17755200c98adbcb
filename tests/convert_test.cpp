// Converter spellings (DESIGN.md §1, "Checkpoint spellings the converter must accept"): each test
// rewrites a fixture's checkpoint into another spelling in a temporary directory, converts both,
// and requires the same normalised package: resident.bin, every experts/layer-NNN.bin and
// moeflux.json (less its provenance block) byte-identical / equal.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <sstream>

#include "format/package.h"
#include "test_util.h"
#include "util/half.h"
#include "util/progress.h"

namespace moeflux::test {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// An in-memory checkpoint: named tensors with their raw bytes, in a fixed order.

struct Tensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
using Tensors = std::vector<Tensor>;

Tensors load_tensors(const std::string& dir) {
  Checkpoint ck(dir);
  Tensors out;
  for (const auto& n : ck.names()) {
    const TensorInfo& t = ck.get(n);
    out.push_back({n, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)});
  }
  return out;
}

const Tensor* find_tensor(const Tensors& ts, const std::string& name) {
  for (const auto& t : ts)
    if (t.name == name) return &t;
  return nullptr;
}

Tensor take(Tensors& ts, const std::string& name) {
  auto it = std::find_if(ts.begin(), ts.end(), [&](const Tensor& t) { return t.name == name; });
  if (it == ts.end()) throw std::runtime_error("no tensor " + name);
  Tensor t = std::move(*it);
  ts.erase(it);
  return t;
}

bool has_prefix(const Tensors& ts, const std::string& prefix) {
  for (const auto& t : ts)
    if (t.name.starts_with(prefix)) return true;
  return false;
}

// Rows [row0, row0 + n) of a tensor viewed as [rows, shape.back()].
std::vector<uint8_t> rows(const Tensor& t, int64_t row0, int64_t n) {
  const size_t row_bytes = size_t(t.shape.back()) * dtype_size(t.dtype);
  EXPECT_LE(size_t(row0 + n) * row_bytes, t.bytes.size()) << t.name;
  return {t.bytes.begin() + std::ptrdiff_t(size_t(row0) * row_bytes),
          t.bytes.begin() + std::ptrdiff_t(size_t(row0 + n) * row_bytes)};
}

void append(std::vector<uint8_t>& dst, const std::vector<uint8_t>& src) {
  dst.insert(dst.end(), src.begin(), src.end());
}

Tensor bf16_zeros(const std::string& name, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return {name, DType::kBF16, std::move(shape), std::vector<uint8_t>(size_t(n) * 2, 0)};
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return json::parse(in);
}

void write_json(const std::string& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
}

// Writes a checkpoint directory: `config` (default: the fixture's config.json), the fixture's
// generation_config.json, and the tensors in one file or `shards` files with an index.
std::string write_checkpoint(const TempDir& tmp, const std::string& name, const std::string& fixture,
                             const Tensors& ts, const std::optional<json>& config = std::nullopt,
                             int shards = 1) {
  const std::string dir = tmp / name;
  fs::create_directories(dir);
  const std::string src = fixture_dir(fixture);
  write_json(dir + "/config.json", config ? *config : read_json(src + "/config.json"));
  if (fs::exists(src + "/generation_config.json"))
    fs::copy_file(src + "/generation_config.json", dir + "/generation_config.json");
  auto to_write = [](const Tensors& part) {
    std::vector<TensorToWrite> w;
    for (const auto& t : part) w.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
    return w;
  };
  if (shards == 1) {
    write_safetensors(dir + "/model.safetensors", to_write(ts), {{"format", "pt"}});
    return dir;
  }
  json weight_map = json::object();
  uint64_t total = 0;
  for (int s = 0; s < shards; s++) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    Tensors part;
    for (size_t i = ts.size() * size_t(s) / size_t(shards);
         i < ts.size() * size_t(s + 1) / size_t(shards); i++) {
      part.push_back(ts[i]);
      weight_map[ts[i].name] = file;
      total += ts[i].bytes.size();
    }
    write_safetensors(dir + "/" + file, to_write(part), {{"format", "pt"}});
  }
  write_json(dir + "/model.safetensors.index.json",
             {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
  return dir;
}

ConvertReport convert(const std::string& hf_dir, const std::string& out,
                      std::optional<DType> dtype = std::nullopt) {
  ConvertOptions opt;
  opt.progress = false;
  opt.dtype = dtype;
  return convert_checkpoint(hf_dir, out, opt);
}

bool has_note(const ConvertReport& r, const std::string& needle) {
  for (const auto& n : r.notes)
    if (n.find(needle) != std::string::npos) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Package comparison.

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void expect_same_file(const std::string& a, const std::string& b) {
  const std::string x = slurp(a), y = slurp(b);
  EXPECT_FALSE(x.empty()) << a;
  if (x == y) return;
  size_t i = 0;
  while (i < x.size() && i < y.size() && x[i] == y[i]) i++;
  ADD_FAILURE() << a << " (" << x.size() << " bytes) and " << b << " (" << y.size()
                << " bytes) differ first at byte " << i;
}

std::vector<std::string> expert_files(const std::string& pkg) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(pkg + "/experts")) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

json manifest_without_provenance(const std::string& pkg) {
  json j = read_json(manifest_path(pkg));
  EXPECT_TRUE(j.contains("provenance"));
  j.erase("provenance");
  return j;
}

// resident.bin and every expert file byte-identical; moeflux.json equal but for provenance and,
// when `ignore_arch`, the model block's arch field.
void expect_same_package(const std::string& a, const std::string& b, bool ignore_arch = false) {
  expect_same_file(resident_path(a), resident_path(b));
  const auto fa = expert_files(a), fb = expert_files(b);
  EXPECT_EQ(fa, fb);
  EXPECT_FALSE(fa.empty()) << "no expert files in " << a;
  for (const auto& f : fa) expect_same_file(a + "/experts/" + f, b + "/experts/" + f);
  json ja = manifest_without_provenance(a), jb = manifest_without_provenance(b);
  if (ignore_arch) {
    ja["model"].erase("arch");
    jb["model"].erase("arch");
  }
  EXPECT_EQ(ja, jb) << "moeflux.json differs (JSON patch a -> b): " << json::diff(ja, jb).dump();
}

bool has_resident(const std::string& pkg, const std::string& name) {
  return read_manifest(pkg).find(name) != nullptr;
}

// ---------------------------------------------------------------------------------------------
// Rewrites.

// Per-expert `<p>experts.E.{gate,up,down}_proj.weight` -> fused `<p>experts.gate_up_proj` [E, 2I, H]
// (per expert: gate rows, then up rows) and `<p>experts.down_proj` [E, H, I], as transformers 5
// holds them (Qwen3MoeExperts & co.). `suffix` is "" or ".weight".
Tensors fuse_experts(Tensors ts, const std::string& suffix) {
  static const std::regex re(R"(^(.*\.mlp\.)experts\.(\d+)\.(gate|up|down)_proj\.weight$)");
  std::map<std::string, int> n_experts;  // per prefix
  for (const auto& t : ts) {
    std::smatch m;
    if (std::regex_match(t.name, m, re))
      n_experts[m[1]] = std::max(n_experts[m[1]], std::stoi(m[2]) + 1);
  }
  EXPECT_FALSE(n_experts.empty()) << "no per-expert tensors to fuse";
  for (const auto& [p, E] : n_experts) {
    Tensor gu{p + "experts.gate_up_proj" + suffix, DType::kF32, {}, {}};
    Tensor dn{p + "experts.down_proj" + suffix, DType::kF32, {}, {}};
    for (int e = 0; e < E; e++) {
      Tensor g = take(ts, fmt::format("{}experts.{}.gate_proj.weight", p, e));
      Tensor u = take(ts, fmt::format("{}experts.{}.up_proj.weight", p, e));
      Tensor d = take(ts, fmt::format("{}experts.{}.down_proj.weight", p, e));
      if (e == 0) {
        gu.dtype = dn.dtype = g.dtype;
        gu.shape = {E, 2 * g.shape[0], g.shape[1]};
        dn.shape = {E, d.shape[0], d.shape[1]};
      }
      append(gu.bytes, g.bytes);
      append(gu.bytes, u.bytes);
      append(dn.bytes, d.bytes);
    }
    ts.push_back(std::move(gu));
    ts.push_back(std::move(dn));
  }
  return ts;
}

// Replaces the first occurrence of `from` in every tensor name that contains it.
Tensors rename_tensors(Tensors ts, const std::string& from, const std::string& to) {
  for (auto& t : ts) {
    auto pos = t.name.find(from);
    if (pos != std::string::npos) t.name.replace(pos, from.size(), to);
  }
  return ts;
}

// Every float tensor converted to `dtype` (values must survive the trip; checked by callers).
Tensors to_dtype(Tensors ts, DType dtype) {
  for (auto& t : ts) {
    const size_t n = t.bytes.size() / dtype_size(t.dtype);
    std::vector<float> f(n);
    to_f32(t.dtype, t.bytes.data(), f.data(), n);
    t.bytes.assign(n * dtype_size(dtype), 0);
    from_f32(dtype, f.data(), t.bytes.data(), n);
    t.dtype = dtype;
  }
  return ts;
}

// ---------------------------------------------------------------------------------------------
// 1. Fused 3-D experts.

struct FusedCase {
  std::string fixture, suffix;
};

void PrintTo(const FusedCase& c, std::ostream* os) { *os << c.fixture << " suffix '" << c.suffix << "'"; }

class FusedExperts : public ::testing::TestWithParam<FusedCase> {};

TEST_P(FusedExperts, SamePackageAsPerExpertSpelling) {
  const auto& c = GetParam();
  TempDir tmp;
  Tensors fused = fuse_experts(load_tensors(fixture_dir(c.fixture)), c.suffix);
  // The rewrite really is the fused spelling: no per-expert tensor is left.
  for (const auto& t : fused) ASSERT_EQ(t.name.find(".experts.0."), std::string::npos) << t.name;
  const std::string ck = write_checkpoint(tmp, "fused", c.fixture, fused);
  convert(fixture_dir(c.fixture), tmp / "a");
  convert(ck, tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
}

INSTANTIATE_TEST_SUITE_P(
    Spellings, FusedExperts,
    ::testing::Values(FusedCase{"qwen3_5_moe", ""}, FusedCase{"qwen3_5_moe", ".weight"},
                      FusedCase{"qwen3_moe", ""}, FusedCase{"qwen3_moe", ".weight"},
                      // a dense layer among MoE layers; tied embeddings
                      FusedCase{"qwen3_moe_v2", ""}, FusedCase{"qwen3_next_v2", ""}),
    [](const auto& info) {
      return info.param.fixture + (info.param.suffix.empty() ? "_bare" : "_weight_suffix");
    });

// ---------------------------------------------------------------------------------------------
// 2. Sharded checkpoints (model-0000N-of-00003.safetensors + model.safetensors.index.json).

class Sharded : public ::testing::TestWithParam<std::string> {};

TEST_P(Sharded, SamePackageAsSingleFile) {
  const std::string fixture = GetParam();
  TempDir tmp;
  const std::string ck = write_checkpoint(tmp, "sharded", fixture, load_tensors(fixture_dir(fixture)),
                                          std::nullopt, /*shards=*/3);
  ASSERT_FALSE(fs::exists(ck + "/model.safetensors"));
  for (int s = 1; s <= 3; s++)
    ASSERT_TRUE(fs::exists(ck + fmt::format("/model-{:05d}-of-00003.safetensors", s)));
  EXPECT_EQ(read_json(ck + "/model.safetensors.index.json")["weight_map"].size(),
            load_tensors(fixture_dir(fixture)).size());
  convert(fixture_dir(fixture), tmp / "a");
  convert(ck, tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Sharded,
                         ::testing::Values("qwen3_5_moe", "qwen3_next_v2", "mixtral_v2",
                                           "qwen3_5_moe_vl"));

// ---------------------------------------------------------------------------------------------
// 3. Multimodal nesting: model.language_model. prefix, text_config, vision and mtp tensors.

json wrap_multimodal(json text) {
  json top = json::object();
  top["architectures"] = {"Qwen3_5MoeForConditionalGeneration"};
  top["model_type"] = "qwen3_5_moe";
  top["tie_word_embeddings"] = text.value("tie_word_embeddings", false);
  text.erase("model_type");
  text.erase("architectures");
  top["text_config"] = std::move(text);
  return top;
}

Tensors nest_multimodal(Tensors ts) {
  for (auto& t : ts)
    if (t.name.starts_with("model.")) t.name = "model.language_model." + t.name.substr(6);
  ts.push_back(bf16_zeros("model.visual.patch_embed.proj.weight", {32, 3, 2, 4, 4}));
  ts.push_back(bf16_zeros("model.visual.blocks.0.norm1.weight", {32}));
  ts.push_back(bf16_zeros("mtp.fc.weight", {48, 96}));
  ts.push_back(bf16_zeros("mtp.layers.0.input_layernorm.weight", {48}));
  return ts;
}

TEST(Multimodal, NestedPrefixAndTextConfigGiveSamePackage) {
  const std::string fx = "qwen3_5_moe_v2";
  TempDir tmp;
  const json cfg = wrap_multimodal(read_json(fixture_dir(fx) + "/config.json"));
  ASSERT_FALSE(cfg["text_config"].contains("model_type"));
  ASSERT_TRUE(cfg["tie_word_embeddings"].get<bool>());
  const std::string ck = write_checkpoint(tmp, "vl", fx, nest_multimodal(load_tensors(fixture_dir(fx))), cfg);
  convert(fixture_dir(fx), tmp / "a");
  ConvertReport r = convert(ck, tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
  EXPECT_TRUE(has_note(r, "skipped 2 vision tensors")) << fmt::format("{}", fmt::join(r.notes, "; "));
  EXPECT_TRUE(has_note(r, "skipped 2 mtp")) << fmt::format("{}", fmt::join(r.notes, "; "));
  // The notes travel into the provenance block.
  EXPECT_EQ(read_json(manifest_path(tmp / "b"))["provenance"]["notes"].size(), r.notes.size());
}

TEST(Multimodal, TieWordEmbeddingsAtTopLevelOnly) {
  // Multimodal configs may carry tie_word_embeddings only on the wrapper.
  const std::string fx = "qwen3_5_moe_v2";
  TempDir tmp;
  json cfg = wrap_multimodal(read_json(fixture_dir(fx) + "/config.json"));
  cfg["text_config"].erase("tie_word_embeddings");
  const std::string ck = write_checkpoint(tmp, "vl", fx, nest_multimodal(load_tensors(fixture_dir(fx))), cfg);
  convert(fixture_dir(fx), tmp / "a");
  convert(ck, tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
  EXPECT_FALSE(has_resident(tmp / "b", "lm_head"));
}

TEST(Multimodal, FlattenedVlFixtureGivesSamePackage) {
  // The reverse direction on the real multimodal fixture: its text part as a flat
  // qwen3_5_moe_text checkpoint (vision tensors dropped) converts to the same package.
  const std::string fx = "qwen3_5_moe_vl";
  TempDir tmp;
  const json top = read_json(fixture_dir(fx) + "/config.json");
  json text = top["text_config"];
  text["model_type"] = "qwen3_5_moe_text";
  text["architectures"] = {"Qwen3_5MoeForCausalLM"};
  text["tie_word_embeddings"] = top["tie_word_embeddings"];
  Tensors ts = load_tensors(fixture_dir(fx));
  ASSERT_TRUE(has_prefix(ts, "model.visual."));
  std::erase_if(ts, [](const Tensor& t) { return t.name.starts_with("model.visual."); });
  ts = rename_tensors(ts, "model.language_model.", "model.");
  const std::string ck = write_checkpoint(tmp, "flat", fx, ts, text);
  ConvertReport ra = convert(fixture_dir(fx), tmp / "a");
  ConvertReport rb = convert(ck, tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
  EXPECT_TRUE(has_note(ra, "vision tensors"));
  EXPECT_FALSE(has_note(rb, "vision tensors"));
}

// ---------------------------------------------------------------------------------------------
// 4. Qwen3-Next fused in_proj_qkvz / in_proj_ba vs the Qwen3.5 split projections.
//
// HF Qwen3NextGatedDeltaNet.fix_query_key_value_ordering views in_proj_qkvz's output as
// [num_k_heads, 2*dk + 2*(nv/nk)*dv] and splits each key-head group into q [dk], k [dk],
// v [(nv/nk)*dv], z [(nv/nk)*dv]; in_proj_ba's output as [num_k_heads, 2*(nv/nk)] split into
// b [nv/nk], a [nv/nk]. Heads are then flattened in group order, and conv1d runs over
// cat(q, k, v) — the Qwen3.5 in_proj_qkv layout [q all heads | k all heads | v all heads].
// The split below is written from that description, not with the converter's code.

Tensors next_to_qwen35(Tensors ts, const json& cfg) {
  const int64_t nk = cfg["linear_num_key_heads"], nv = cfg["linear_num_value_heads"];
  const int64_t dk = cfg["linear_key_head_dim"], dv = cfg["linear_value_head_dim"];
  const int64_t r = nv / nk;
  const int n_layers = cfg["num_hidden_layers"];
  int split = 0;
  for (int l = 0; l < n_layers; l++) {
    const std::string la = fmt::format("model.layers.{}.linear_attn.", l);
    if (!find_tensor(ts, la + "in_proj_qkvz.weight")) continue;
    const Tensor qkvz = take(ts, la + "in_proj_qkvz.weight");
    const Tensor ba = take(ts, la + "in_proj_ba.weight");
    const int64_t H = qkvz.shape[1];
    EXPECT_EQ(qkvz.shape[0], nk * (2 * dk + 2 * r * dv));
    EXPECT_EQ(ba.shape[0], nk * 2 * r);
    // Group g of qkvz: rows [g*G, (g+1)*G) = q_g | k_g | v_g | z_g.
    const int64_t G = 2 * dk + 2 * r * dv;
    std::vector<uint8_t> q, k, v, z, b, a;
    for (int64_t g = 0; g < nk; g++) {
      append(q, rows(qkvz, g * G, dk));
      append(k, rows(qkvz, g * G + dk, dk));
      append(v, rows(qkvz, g * G + 2 * dk, r * dv));
      append(z, rows(qkvz, g * G + 2 * dk + r * dv, r * dv));
      append(b, rows(ba, g * 2 * r, r));
      append(a, rows(ba, g * 2 * r + r, r));
    }
    std::vector<uint8_t> qkv = q;
    append(qkv, k);
    append(qkv, v);
    const DType dt = qkvz.dtype;
    ts.push_back({la + "in_proj_qkv.weight", dt, {2 * nk * dk + nv * dv, H}, qkv});
    ts.push_back({la + "in_proj_z.weight", dt, {nv * dv, H}, z});
    ts.push_back({la + "in_proj_b.weight", ba.dtype, {nv, H}, b});
    ts.push_back({la + "in_proj_a.weight", ba.dtype, {nv, H}, a});
    split++;
  }
  EXPECT_GT(split, 0) << "no in_proj_qkvz to split";
  return ts;
}

TEST(QwenNextFusedProjections, SplitIntoQwen35LayoutGivesSameWeights) {
  const std::string fx = "qwen3_next";
  TempDir tmp;
  const json next_cfg = read_json(fixture_dir(fx) + "/config.json");
  ASSERT_TRUE(next_cfg["norm_topk_prob"].get<bool>());  // Qwen3.5 always renormalises
  ASSERT_EQ(next_cfg["mlp_only_layers"].size(), 0u);    // and has no dense layers
  json cfg = next_cfg;
  cfg["model_type"] = "qwen3_5_moe_text";
  cfg["architectures"] = {"Qwen3_5MoeForCausalLM"};
  for (const char* k : {"decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "intermediate_size"})
    cfg.erase(k);
  const Tensors ts = next_to_qwen35(load_tensors(fixture_dir(fx)), next_cfg);
  ASSERT_FALSE(find_tensor(ts, "model.layers.0.linear_attn.in_proj_qkvz.weight"));
  const std::string ck = write_checkpoint(tmp, "as_qwen35", fx, ts, cfg);
  ConvertReport ra = convert(fixture_dir(fx), tmp / "a");
  ConvertReport rb = convert(ck, tmp / "b");
  EXPECT_EQ(ra.resident_bytes, rb.resident_bytes);
  EXPECT_EQ(ra.expert_bytes, rb.expert_bytes);
  // The packages differ only in the model's arch ("qwen3_next" vs "qwen3_5_moe"), so the
  // manifests are compared with the model block's arch left out: every other model field, the
  // resident table (names, offsets, dtypes, shapes), the expert layout and the tokenizer list
  // must be equal, and resident.bin and the expert files byte-identical.
  const json ma = read_json(manifest_path(tmp / "a")), mb = read_json(manifest_path(tmp / "b"));
  EXPECT_EQ(ma["model"]["arch"], "qwen3_next");
  EXPECT_EQ(mb["model"]["arch"], "qwen3_5_moe");
  for (auto it = ma["model"].begin(); it != ma["model"].end(); ++it) {
    if (it.key() == "arch") continue;
    EXPECT_TRUE(mb["model"].contains(it.key())) << it.key();
    EXPECT_EQ(it.value(), mb["model"].value(it.key(), json())) << "model." << it.key();
  }
  EXPECT_EQ(ma["model"].size(), mb["model"].size());
  expect_same_package(tmp / "a", tmp / "b", /*ignore_arch=*/true);
}

// ---------------------------------------------------------------------------------------------
// 5. Mixtral: block_sparse_moe.experts.E.w1/w2/w3 + block_sparse_moe.gate (original) vs
// mlp.experts.E.gate_proj/down_proj/up_proj + mlp.gate and the fused mlp.experts.gate_up_proj
// (transformers 5's module names). w1 = gate, w3 = up, w2 = down.

Tensors mixtral_to_mlp(Tensors ts) {
  static const std::regex re(R"(^(.*)\.block_sparse_moe\.(.*)$)");
  int n = 0;
  for (auto& t : ts) {
    std::smatch m;
    if (!std::regex_match(t.name, m, re)) continue;
    std::string rest = m[2];
    for (auto [from, to] : {std::pair{".w1.", ".gate_proj."}, {".w3.", ".up_proj."}, {".w2.", ".down_proj."}}) {
      auto pos = rest.find(from);
      if (pos != std::string::npos) rest.replace(pos, std::strlen(from), to);
    }
    t.name = std::string(m[1]) + ".mlp." + rest;
    n++;
  }
  EXPECT_GT(n, 0) << "no block_sparse_moe tensors";
  return ts;
}

class MixtralSpelling : public ::testing::TestWithParam<std::string> {};

TEST_P(MixtralSpelling, MlpNamesGiveSamePackage) {
  const std::string fx = GetParam();
  TempDir tmp;
  const Tensors orig = load_tensors(fixture_dir(fx));
  ASSERT_TRUE(find_tensor(orig, "model.layers.0.block_sparse_moe.experts.0.w1.weight"));
  const Tensors mlp = mixtral_to_mlp(orig);
  ASSERT_TRUE(find_tensor(mlp, "model.layers.0.mlp.experts.0.gate_proj.weight"));
  ASSERT_TRUE(find_tensor(mlp, "model.layers.0.mlp.gate.weight"));
  ASSERT_FALSE(has_prefix(mlp, "model.layers.0.block_sparse_moe."));
  convert(fixture_dir(fx), tmp / "a");
  convert(write_checkpoint(tmp, "mlp", fx, mlp), tmp / "b");
  expect_same_package(tmp / "a", tmp / "b");
  convert(write_checkpoint(tmp, "fused", fx, fuse_experts(mlp, "")), tmp / "c");
  expect_same_package(tmp / "a", tmp / "c");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MixtralSpelling, ::testing::Values("mixtral", "mixtral_v2"));

// ---------------------------------------------------------------------------------------------
// 6. On-disk dtype: F32 and F16 copies of a bf16 checkpoint, converted with --dtype bf16, give
// the bf16 original's package; --dtype f32 gives bit-identical logits (bf16 -> f32 is exact and
// compute is f32).

// bf16 values that do not survive bf16 -> f16 -> f32 (f16 has 5 exponent bits: tiny values
// lose bits as f16 subnormals) are set to zero, so that the bf16 and f16 files hold the same
// numbers. Returns how many were changed.
size_t make_f16_exact(Tensors& ts) {
  size_t changed = 0;
  for (auto& t : ts) {
    EXPECT_EQ(t.dtype, DType::kBF16) << t.name;
    uint16_t* p = reinterpret_cast<uint16_t*>(t.bytes.data());
    for (size_t i = 0; i < t.bytes.size() / 2; i++) {
      const float x = bf16_to_f32(p[i]);
      if (f16_to_f32(f32_to_f16(x)) != x) {
        p[i] = 0;
        changed++;
      }
    }
  }
  return changed;
}

class DiskDtype : public ::testing::TestWithParam<std::string> {};

TEST_P(DiskDtype, F32AndF16CheckpointsGiveBf16Package) {
  const std::string fx = GetParam();
  TempDir tmp;
  const Tensors orig = load_tensors(fixture_dir(fx));
  convert(fixture_dir(fx), tmp / "bf16_default");
  convert(fixture_dir(fx), tmp / "bf16", DType::kBF16);
  expect_same_package(tmp / "bf16_default", tmp / "bf16");

  // F32 on disk: bf16 -> f32 is exact, so --dtype bf16 recovers the original bits.
  const std::string ck32 = write_checkpoint(tmp, "f32", fx, to_dtype(orig, DType::kF32));
  ASSERT_EQ(Checkpoint(ck32).get("model.embed_tokens.weight").dtype, DType::kF32);
  convert(ck32, tmp / "from_f32", DType::kBF16);
  expect_same_package(tmp / "bf16", tmp / "from_f32");

  // F16 on disk, against a bf16 checkpoint holding exactly the same values.
  Tensors exact = orig;
  size_t changed = make_f16_exact(exact);
  size_t total = 0;
  for (const auto& t : exact) total += t.bytes.size() / 2;
  EXPECT_LT(changed, total / 100) << "too many bf16 values outside f16's range";
  const std::string ck_bf16 = write_checkpoint(tmp, "bf16_f16exact", fx, exact);
  const Tensors as_f16 = to_dtype(exact, DType::kF16);
  for (size_t i = 0; i < exact.size(); i++) {  // the F16 file holds the same numbers
    std::vector<float> x(exact[i].bytes.size() / 2), y(x.size());
    to_f32(DType::kBF16, exact[i].bytes.data(), x.data(), x.size());
    to_f32(DType::kF16, as_f16[i].bytes.data(), y.data(), y.size());
    ASSERT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * 4)) << exact[i].name;
  }
  const std::string ck16 = write_checkpoint(tmp, "f16", fx, as_f16);
  convert(ck_bf16, tmp / "bf16_exact", DType::kBF16);
  convert(ck16, tmp / "from_f16", DType::kBF16);
  expect_same_package(tmp / "bf16_exact", tmp / "from_f16");
}

TEST_P(DiskDtype, F32PackageGivesBitIdenticalLogits) {
  const std::string fx = GetParam();
  TempDir tmp;
  convert(fixture_dir(fx), tmp / "bf16");
  convert(fixture_dir(fx), tmp / "f32", DType::kF32);
  const Manifest m = read_manifest(tmp / "f32");
  ASSERT_EQ(m.find("embed")->dtype, DType::kF32);
  ASSERT_EQ(m.experts.parts[0].dtype, DType::kF32);
  ASSERT_EQ(read_manifest(tmp / "bf16").find("embed")->dtype, DType::kBF16);
  const std::vector<int32_t> tokens = {3, 17, 250};
  const RunResult a = run_tokens(tmp / "bf16", tokens, 2);
  const RunResult b = run_tokens(tmp / "f32", tokens, 2);
  ASSERT_EQ(a.logits.size(), b.logits.size());
  ASSERT_FALSE(a.logits.empty());
  EXPECT_EQ(0, std::memcmp(a.logits.data(), b.logits.data(), a.logits.size() * sizeof(float)))
      << "max |dlogit| " << max_abs_diff(a.logits.data(), b.logits.data(), a.logits.size());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DiskDtype,
                         ::testing::Values("qwen3_5_moe_v2", "qwen3_moe_v2", "mixtral_v2",
                                           "qwen3_next_v2"));

// ---------------------------------------------------------------------------------------------
// 7. tie_word_embeddings.

class TiedEmbeddings : public ::testing::TestWithParam<std::string> {};

TEST_P(TiedEmbeddings, NoLmHeadAndRedundantLmHeadIsSkippedWithNote) {
  const std::string fx = GetParam();
  TempDir tmp;
  ASSERT_TRUE(read_json(fixture_dir(fx) + "/config.json")["tie_word_embeddings"].get<bool>());
  Tensors ts = load_tensors(fixture_dir(fx));
  ASSERT_FALSE(find_tensor(ts, "lm_head.weight"));
  ConvertReport ra = convert(fixture_dir(fx), tmp / "a");
  EXPECT_FALSE(has_resident(tmp / "a", "lm_head"));
  EXPECT_TRUE(has_resident(tmp / "a", "embed"));
  EXPECT_FALSE(has_note(ra, "lm_head"));

  Tensor head = *find_tensor(ts, "model.embed_tokens.weight");
  head.name = "lm_head.weight";
  ts.push_back(head);
  ConvertReport rb = convert(write_checkpoint(tmp, "with_head", fx, ts), tmp / "b");
  EXPECT_TRUE(has_note(rb, "lm_head.weight skipped")) << fmt::format("{}", fmt::join(rb.notes, "; "));
  EXPECT_FALSE(has_resident(tmp / "b", "lm_head"));
  expect_same_package(tmp / "a", tmp / "b");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TiedEmbeddings,
                         ::testing::Values("qwen3_5_moe_v2", "qwen3_moe_v2", "qwen3_next_v2"));

TEST(UntiedEmbeddings, LmHeadIsResident) {
  for (const char* fx : {"qwen3_5_moe", "mixtral_v2", "qwen3_5_moe_vl"}) {
    SCOPED_TRACE(fx);
    EXPECT_TRUE(has_resident(converted_fixture(fx), "lm_head"));
  }
}

// ---------------------------------------------------------------------------------------------
// moeflux inspect.

// Sizes as `inspect` and the progress lines print them, written out (not from format_bytes).
TEST(Inspect, SizesReadAsBinaryUnits) {
  const std::pair<uint64_t, const char*> cases[] = {
      {0, "0 B"},
      {1023, "1023 B"},
      {1024, "1.00 KiB"},
      {1536, "1.50 KiB"},
      {1048575, "1024.00 KiB"},  // rounds up on print, unit chosen before rounding
      {10485760, "10.00 MiB"},
      {uint64_t(209) << 30, "209.00 GiB"},
      {uint64_t(3) << 40, "3.00 TiB"},
      {uint64_t(5000) << 40, "5000.00 TiB"},
  };
  for (const auto& [n, want] : cases) EXPECT_EQ(format_bytes(n), want) << n;
}

TEST(Inspect, PrintsResidentExpertSplit) {
  // Literal: resident = the manifest's resident tensors (qwen3_5_moe 1005248 bytes, norms widened
  // to f32; mixtral_v2 72320), experts = the checkpoint's expert tensors (1572864 and 82944
  // bytes), summed and formatted outside this code base (python3 over moeflux.json and
  // model.safetensors), not by format_bytes.
  const std::pair<const char*, const char*> cases[] = {
      {"qwen3_5_moe", "split       resident 981.69 KiB : experts 1.50 MiB (39.0% resident)\n"},
      {"mixtral_v2", "split       resident 70.62 KiB : experts 81.00 KiB (46.6% resident)\n"},
  };
  for (const auto& [fx, want] : cases) {
    SCOPED_TRACE(fx);
    const std::string& pkg = converted_fixture(fx);
    CliResult r = run_cli("inspect " + pkg);
    ASSERT_EQ(r.code, 0) << r.err;
    const Manifest m = read_manifest(pkg);
    EXPECT_NE(r.out.find(want), std::string::npos) << "want: " << want << "got:\n" << r.out;
    EXPECT_NE(r.out.find("arch        " + m.spec.arch), std::string::npos) << r.out;
  }
}

}  // namespace
}  // namespace moeflux::test
