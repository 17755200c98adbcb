// DeepSeek-V3 (issue 17): the parts that do not need the HF fixture. YaRN frequencies and
// scales against values worked out from HF's formulas (transformers 5.17
// modeling_rope_utils._compute_yarn_parameters, DeepseekV3Attention.scaling) in double; the
// config.json reader on hand-written configs; the package spec round trip; and the MLA session
// on a small random-weight package: prefill == decode bit for bit, snapshots, seq_rm, and a KV
// cache of (kv_lora_rank + qk_rope_head_dim) floats per position per layer.
// The forward pass against HF is in oracle_test.cpp (fixtures deepseek_v3, deepseek_v3_noqlora).
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "convert/tiktoken.h"
#include "engine/rope.h"
#include "format/hf_config.h"
#include "synth/synth.h"
#include "test_util.h"
#include "text/tokenizer.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

ModelSpec yarn_spec(int rope_dim, double theta, double factor, int orig, double mscale,
                    double mscale_all_dim) {
  ModelSpec s;
  s.arch = "deepseek_v3";
  s.attn = {AttnKind::kMla};
  s.head_dim = 128 + rope_dim;
  s.rope_dim = rope_dim;
  s.rope_theta = theta;
  s.rope_scaling.kind = RopeScaling::kYarn;
  s.rope_scaling.factor = factor;
  s.rope_scaling.orig_ctx = orig;
  s.rope_scaling.mscale = mscale;
  s.rope_scaling.mscale_all_dim = mscale_all_dim;
  return s;
}

struct Rng {
  explicit Rng(uint32_t seed) : g(seed) {}
  float uni() { return std::uniform_real_distribution<float>(-1, 1)(g); }
  std::mt19937 g;
};

void expect_rel(double got, double want, double rel, const std::string& what) {
  EXPECT_LE(std::fabs(got - want), rel * std::fabs(want))
      << what << ": got " << got << " want " << want;
}

// The fixture's shape: rope dim 8, theta 1e4, factor 4, original context 64, beta 32/1:
// correction range [floor(-0.497), ceil(1.008)] = [0, 2], ramp (0, .5, 1, 1), so the first
// frequency is extrapolated, the second blended half and half, the last two interpolated.
TEST(Yarn, InverseFrequenciesOfTheFixtureShape) {
  ModelSpec s = yarn_spec(8, 10000, 4, 64, 1.0, 0.8);
  s.head_dim = 20;
  const auto inv = rope_inv_freq(s);
  const double want[] = {1.0, 0.5 * 0.1 + 0.5 * 0.025, 1 / 400.0, 1 / 4000.0};
  ASSERT_EQ(inv.size(), 4u);
  for (int i = 0; i < 4; i++) expect_rel(inv[size_t(i)], want[i], 4e-7, fmt::format("inv[{}]", i));
  // cos/sin factor get_mscale(4, 1) / get_mscale(4, 0.8); softmax scale 20^-1/2 get_mscale(4,
  // 0.8)^2
  expect_rel(rope_cos_sin_scale(s), (1 + 0.1 * std::log(4.0)) / (1 + 0.08 * std::log(4.0)), 1e-15,
             "cos/sin scale");
  expect_rel(rope_cos_sin_scale(s), 1.0249579607969668, 1e-15, "cos/sin scale literal");
  expect_rel(attention_scale(s), 0.2759546461363348, 1e-15, "attention scale");
}

// DeepSeek-V3's config: rope dim 64, theta 1e4, factor 40, original context 4096, beta 32/1,
// mscale = mscale_all_dim = 1: correction range [10, 23]; cos/sin unscaled, softmax scale
// 192^-1/2 (1 + 0.1 ln 40)^2.
TEST(Yarn, InverseFrequenciesOfDeepSeekV3) {
  const ModelSpec s = yarn_spec(64, 10000, 40, 4096, 1.0, 1.0);
  const auto inv = rope_inv_freq(s);
  ASSERT_EQ(inv.size(), 32u);
  const std::pair<int, double> want[] = {{0, 1.0},
                                         {9, 0.07498942093324558},
                                         {10, 0.056234132519034905},
                                         {11, 0.03900692656714386},
                                         {16, 0.0055},
                                         {22, 0.0001778279410038922},
                                         {23, 3.33380358040831e-05},
                                         {31, 3.33380358040831e-06}};
  for (auto [i, w] : want) expect_rel(inv[size_t(i)], w, 8e-7, fmt::format("inv[{}]", i));
  EXPECT_EQ(rope_cos_sin_scale(s), 1.0);
  expect_rel(attention_scale(s), 0.1352337788608801, 1e-15, "attention scale");
}

TEST(Yarn, DefaultRopeIsUnscaled) {
  ModelSpec s = yarn_spec(8, 50000, 1, 0, 0, 0);
  s.rope_scaling = {};
  s.head_dim = 20;
  const auto inv = rope_inv_freq(s);
  for (int i = 0; i < 4; i++)
    expect_rel(inv[size_t(i)], std::pow(50000.0, -2.0 * i / 8), 4e-7, fmt::format("inv[{}]", i));
  EXPECT_EQ(rope_cos_sin_scale(s), 1.0);
  expect_rel(attention_scale(s), 1 / std::sqrt(20.0), 1e-15, "attention scale");
  // get_mscale(scale <= 1) is 1 whatever mscale is.
  EXPECT_EQ(yarn_get_mscale(1.0, 5.0), 1.0);
  EXPECT_EQ(yarn_get_mscale(0.5, 5.0), 1.0);
}

// E4M3 ("e4m3fn") decoding against values worked out by hand from the format: bias 7,
// subnormals m * 2^-9, no infinities, S.1111.111 NaN, max 448.
TEST(Fp8, E4m3Decoding) {
  const std::pair<uint8_t, float> want[] = {
      {0x00, 0.0f},         {0x01, 0.001953125f},  // smallest subnormal 2^-9
      {0x07, 0.013671875f},                        // largest subnormal 7 * 2^-9
      {0x08, 0.015625f},                           // smallest normal 2^-6
      {0x38, 1.0f},         {0x3c, 1.5f},         {0x40, 2.0f},          {0x41, 2.25f},
      {0x77, 240.0f},       {0x78, 256.0f},       {0x7e, 448.0f},  // max
      {0xb8, -1.0f},        {0xfe, -448.0f},      {0x81, -0.001953125f},
  };
  for (auto [b, v] : want) EXPECT_EQ(e4m3_to_f32(b), v) << "byte 0x" << std::hex << int(b);
  EXPECT_TRUE(std::signbit(e4m3_to_f32(0x80)) && e4m3_to_f32(0x80) == 0.0f);  // -0
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xff)));
  // Every other byte is finite, and the encoding is monotonic in the magnitude bits.
  for (int b = 0; b < 0x7f; b++) {
    EXPECT_TRUE(std::isfinite(e4m3_to_f32(uint8_t(b)))) << b;
    if (b + 1 < 0x7f) {
      EXPECT_LT(e4m3_to_f32(uint8_t(b)), e4m3_to_f32(uint8_t(b + 1))) << b;
    }
    EXPECT_EQ(e4m3_to_f32(uint8_t(b | 0x80)), -e4m3_to_f32(uint8_t(b))) << b;
  }
}

// A DeepSeek-V3 config.json, as transformers 5 writes it (rope_parameters) or as the hub
// checkpoints spell it (rope_scaling with "type").
nlohmann::json ds_config() {
  return {{"model_type", "deepseek_v3"},
          {"architectures", {"DeepseekV3ForCausalLM"}},
          {"vocab_size", 1024},
          {"hidden_size", 64},
          {"intermediate_size", 48},
          {"moe_intermediate_size", 16},
          {"num_hidden_layers", 3},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 4},
          {"n_shared_experts", 1},
          {"n_routed_experts", 16},
          {"routed_scaling_factor", 2.5},
          {"kv_lora_rank", 24},
          {"q_lora_rank", 32},
          {"qk_rope_head_dim", 8},
          {"v_head_dim", 10},
          {"qk_nope_head_dim", 12},
          {"head_dim", 8},
          {"n_group", 4},
          {"topk_group", 2},
          {"num_experts_per_tok", 4},
          {"first_k_dense_replace", 1},
          {"norm_topk_prob", true},
          {"max_position_embeddings", 256},
          {"rms_norm_eps", 1e-6},
          {"eos_token_id", 1},
          {"bos_token_id", 0},
          {"tie_word_embeddings", false},
          {"rope_parameters",
           {{"rope_type", "yarn"},
            {"rope_theta", 10000.0},
            {"factor", 4.0},
            {"original_max_position_embeddings", 64},
            {"mscale", 1.0},
            {"mscale_all_dim", 0.8},
            {"beta_fast", 32.0},
            {"beta_slow", 1.0}}}};
}

HfConfig read_config(const nlohmann::json& j) {
  TempDir d;
  std::ofstream(d / "config.json") << j.dump();
  return read_hf_config(d.path());
}

TEST(DeepSeekConfig, ReadsMlaRoutingAndYarn) {
  const HfConfig c = read_config(ds_config());
  const ModelSpec& s = c.spec;
  EXPECT_EQ(s.arch, "deepseek_v3");
  EXPECT_EQ(s.attn, std::vector<AttnKind>(3, AttnKind::kMla));
  EXPECT_EQ(s.ffn, (std::vector<FfnKind>{FfnKind::kDense, FfnKind::kMoe, FfnKind::kMoe}));
  EXPECT_EQ(s.head_dim, 20);  // qk_nope + qk_rope, not config.head_dim
  EXPECT_EQ(s.rope_dim, 8);
  EXPECT_EQ(s.mla_nope_dim(), 12);
  EXPECT_EQ(s.q_lora_rank, 32);
  EXPECT_EQ(s.kv_lora_rank, 24);
  EXPECT_EQ(s.v_head_dim, 10);
  EXPECT_FALSE(s.qk_norm);
  EXPECT_FALSE(s.attn_output_gate);
  EXPECT_EQ(s.kv_floats_per_pos(AttnKind::kMla), 32);
  EXPECT_EQ(s.router, RouterKind::kSigmoid);
  EXPECT_TRUE(s.router_bias);
  EXPECT_EQ(s.n_group, 4);
  EXPECT_EQ(s.topk_group, 2);
  EXPECT_EQ(s.routed_scale, 2.5);
  EXPECT_EQ(s.shared_ffn, 16);
  EXPECT_FALSE(s.shared_gate);
  EXPECT_EQ(s.dense_ffn, 48);
  EXPECT_EQ(s.rope_scaling.kind, RopeScaling::kYarn);
  EXPECT_EQ(s.rope_scaling.factor, 4.0);
  EXPECT_EQ(s.rope_scaling.orig_ctx, 64);
  EXPECT_EQ(s.rope_scaling.mscale_all_dim, 0.8);
  EXPECT_TRUE(c.rope_interleave);  // the HF default

  // The hub's spelling: rope_scaling {"type": "yarn"}, rope_theta at the top, q_lora_rank null.
  nlohmann::json j = ds_config();
  j["rope_scaling"] = j["rope_parameters"];
  j.erase("rope_parameters");
  j["rope_scaling"].erase("rope_type");
  j["rope_scaling"].erase("rope_theta");
  j["rope_scaling"]["type"] = "yarn";
  j["rope_theta"] = 10000.0;
  j["q_lora_rank"] = nullptr;
  j["rope_interleave"] = false;
  j["model_type"] = "kimi_k2";
  const HfConfig k = read_config(j);
  EXPECT_EQ(k.spec.arch, "deepseek_v3");
  EXPECT_EQ(k.spec.q_lora_rank, 0);
  EXPECT_EQ(k.spec.rope_scaling.kind, RopeScaling::kYarn);
  EXPECT_EQ(k.spec.rope_scaling.beta_fast, 32.0);
  EXPECT_FALSE(k.rope_interleave);
}

TEST(DeepSeekConfig, RefusesWhatItDoesNotImplement) {
  auto refused = [](nlohmann::json j, const std::string& needle) {
    try {
      read_config(j);
      ADD_FAILURE() << "accepted; expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  nlohmann::json j = ds_config();
  j["scoring_func"] = "softmax";
  refused(j, "scoring_func");
  j = ds_config();
  j["topk_method"] = "group_limited_greedy";
  refused(j, "topk_method");
  j = ds_config();
  j["n_group"] = 3;  // 16 experts do not split into 3 groups
  refused(j, "n_group");
  j = ds_config();
  j["num_experts_per_tok"] = 9;  // more than 2 groups of 4 hold
  refused(j, "num_experts_per_tok");
  j = ds_config();
  j["rope_parameters"].erase("original_max_position_embeddings");
  refused(j, "original_max_position_embeddings");
  j = ds_config();
  j["rope_parameters"]["rope_type"] = "longrope";
  refused(j, "longrope");
}

TEST(DeepSeekSpec, PackageJsonRoundTrip) {
  const ModelSpec s = read_config(ds_config()).spec;
  nlohmann::json j;
  to_json(j, s);
  ASSERT_TRUE(j.contains("mla"));
  ASSERT_TRUE(j.contains("rope_scaling"));
  ASSERT_TRUE(j.contains("routing"));
  const ModelSpec r = spec_from_json(j, "test");
  nlohmann::json j2;
  to_json(j2, r);
  EXPECT_EQ(j.dump(), j2.dump());
  // A spec of another arch writes none of the new sections (its manifest is as before).
  ModelSpec q = s;
  q.arch = "qwen3_moe";
  q.attn.assign(3, AttnKind::kFull);
  q.rope_scaling = {};
  q.router = RouterKind::kSoftmax;
  q.router_bias = false;
  q.n_group = q.topk_group = 1;
  q.routed_scale = 1;
  q.shared_gate = true;
  nlohmann::json jq;
  to_json(jq, q);
  EXPECT_FALSE(jq.contains("mla") || jq.contains("rope_scaling") || jq.contains("routing"));
}

// ---- The converter on a hand-built checkpoint ------------------------------------------------

// A DeepSeek-V3 checkpoint of ds_config()'s shape with random weights, written twice: with bf16
// weights, and with the same weights as FP8 (every matrix of the attention, the dense MLP and
// the experts) plus weight_scale_inv per 4x8 block. The values are chosen on the e4m3 grid
// times power-of-two block scales, so the bf16 checkpoint holds exactly what the FP8 one
// dequantises to.
struct DsCheckpoint {
  std::map<std::string, std::vector<float>> values;  // HF name -> [rows * cols]
  std::map<std::string, std::pair<int64_t, int64_t>> shape;
  std::set<std::string> fp8;  // names stored as FP8 in the FP8 checkpoint
};

DsCheckpoint make_ds_checkpoint() {
  DsCheckpoint c;
  const int H = 64, nh = 4, L = 24, R = 8, nope = 12, vd = 10, qa = 32, E = 16, I = 16, D = 48;
  Rng rng(2500);
  // No zero byte: a -0 would find +0's byte below.
  std::uniform_int_distribution<int> byte(1, 0x7e), sgn(0, 1), ex(-3, 2);
  auto add = [&](const std::string& n, int64_t r, int64_t cols, bool fp8, bool norm = false) {
    std::vector<float> v(size_t(r * cols));
    if (fp8) {
      // e4m3 values times a power-of-two scale per 4x8 block
      const int64_t bpr = (cols + 7) / 8;
      std::vector<float> sc(size_t(((r + 3) / 4) * bpr));
      for (auto& x : sc) x = std::ldexp(1.0f, ex(rng.g) - 6);
      for (int64_t i = 0; i < r; i++)
        for (int64_t j = 0; j < cols; j++)
          v[size_t(i * cols + j)] = e4m3_to_f32(uint8_t(byte(rng.g) | (sgn(rng.g) << 7))) *
                                    sc[size_t((i / 4) * bpr + j / 8)];
      c.fp8.insert(n);
    } else {
      for (auto& x : v) x = bf16_to_f32(f32_to_bf16(norm ? 1.0f + 0.1f * rng.uni() : rng.uni()));
    }
    c.values[n] = std::move(v);
    c.shape[n] = {r, cols};
  };
  add("model.embed_tokens.weight", 1024, H, false);
  add("model.norm.weight", 1, H, false, true);
  add("lm_head.weight", 1024, H, false);
  for (int l = 0; l < 3; l++) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", 1, H, false, true);
    add(p + "post_attention_layernorm.weight", 1, H, false, true);
    add(p + "self_attn.q_a_proj.weight", qa, H, true);
    add(p + "self_attn.q_a_layernorm.weight", 1, qa, false, true);
    add(p + "self_attn.q_b_proj.weight", nh * (nope + R), qa, true);
    add(p + "self_attn.kv_a_proj_with_mqa.weight", L + R, H, true);
    add(p + "self_attn.kv_a_layernorm.weight", 1, L, false, true);
    add(p + "self_attn.kv_b_proj.weight", nh * (nope + vd), L, true);
    add(p + "self_attn.o_proj.weight", H, nh * vd, true);
    if (l == 0) {
      add(p + "mlp.gate_proj.weight", D, H, true);
      add(p + "mlp.up_proj.weight", D, H, true);
      add(p + "mlp.down_proj.weight", H, D, true);
      continue;
    }
    add(p + "mlp.gate.weight", E, H, false);
    add(p + "mlp.gate.e_score_correction_bias", 1, E, false);
    for (const char* m : {"gate_proj", "up_proj"})
      add(p + "mlp.shared_experts." + m + ".weight", I, H, true);
    add(p + "mlp.shared_experts.down_proj.weight", H, I, true);
    for (int e = 0; e < E; e++) {
      for (const char* m : {"gate_proj", "up_proj"})
        add(p + fmt::format("mlp.experts.{}.{}.weight", e, m), I, H, true);
      add(p + fmt::format("mlp.experts.{}.down_proj.weight", e), H, I, true);
    }
  }
  return c;
}

// Writes the checkpoint (bf16, or FP8 where c.fp8 says) with ds_config() into `dir`.
void write_ds_checkpoint(const DsCheckpoint& c, const std::string& dir, bool as_fp8) {
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = ds_config();
  if (as_fp8)
    cfg["quantization_config"] = {{"quant_method", "fp8"},
                                  {"fmt", "e4m3"},
                                  {"activation_scheme", "dynamic"},
                                  {"weight_block_size", {4, 8}}};
  std::ofstream(dir + "/config.json") << cfg.dump();
  std::vector<TensorToWrite> out;
  std::vector<std::vector<uint8_t>> bufs;
  bufs.reserve(2 * c.values.size());
  for (const auto& [name, v] : c.values) {
    const auto [r, cols] = c.shape.at(name);
    const bool one_d = r == 1;
    std::vector<int64_t> shape = one_d ? std::vector<int64_t>{cols} : std::vector<int64_t>{r, cols};
    if (as_fp8 && c.fp8.count(name)) {
      // Encode: per 4x8 block the first power-of-two scale 2^k (k in [-9, -4], the generator's
      // range) under which every value of the block is an e4m3 value; any such k dequantises to
      // the same values.
      const int64_t bpr = (cols + 7) / 8;
      std::vector<float> sc(size_t(((r + 3) / 4) * bpr), 0.0f);
      std::vector<uint8_t> q(size_t(r * cols));
      for (int64_t bi = 0; bi < (r + 3) / 4; bi++)
        for (int64_t bj = 0; bj < bpr; bj++) {
          for (int k = -9; k <= -4; k++) {
            const float s = std::ldexp(1.0f, k);
            bool ok = true;
            for (int64_t i = bi * 4; ok && i < std::min(r, bi * 4 + 4); i++)
              for (int64_t j = bj * 8; ok && j < std::min(cols, bj * 8 + 8); j++) {
                const float x = v[size_t(i * cols + j)] / s;
                int found = -1;
                for (int b = 0; b < 256 && found < 0; b++)
                  if (e4m3_to_f32(uint8_t(b)) == x) found = b;
                ok = found >= 0;
                if (ok) q[size_t(i * cols + j)] = uint8_t(found);
              }
            if (ok) {
              sc[size_t(bi * bpr + bj)] = s;
              break;
            }
          }
          ASSERT_NE(sc[size_t(bi * bpr + bj)], 0.0f) << name;
        }
      bufs.emplace_back(q);
      out.push_back({name, DType::kF8E4M3, shape, bufs.back().data()});
      const std::string base = name.substr(0, name.size() - 7);  // ".weight"
      bufs.emplace_back(sc.size() * 4);
      std::memcpy(bufs.back().data(), sc.data(), sc.size() * 4);
      out.push_back(
          {base + ".weight_scale_inv", DType::kF32, {(r + 3) / 4, bpr}, bufs.back().data()});
    } else {
      bufs.emplace_back(v.size() * 2);
      for (size_t i = 0; i < v.size(); i++) {
        const uint16_t h = f32_to_bf16(v[i]);
        std::memcpy(bufs.back().data() + 2 * i, &h, 2);
      }
      out.push_back({name, DType::kBF16, shape, bufs.back().data()});
    }
  }
  write_safetensors(dir + "/model.safetensors", out);
}

TEST(DeepSeekConvert, Fp8ImportsTheSameWeightsAsBf16) {
  const DsCheckpoint c = make_ds_checkpoint();
  TempDir d;
  write_ds_checkpoint(c, d / "bf16", false);
  write_ds_checkpoint(c, d / "fp8", true);
  if (HasFatalFailure()) return;
  ConvertOptions o;
  o.progress = false;
  convert_checkpoint(d / "bf16", d / "pkg_bf16", o);
  const ConvertReport r = convert_checkpoint(d / "fp8", d / "pkg_fp8", o);
  // Same bytes: the FP8 weights dequantise exactly to the bf16 checkpoint's values.
  EXPECT_EQ(read_file(d / "pkg_bf16/resident.bin"), read_file(d / "pkg_fp8/resident.bin"));
  for (int l : {1, 2}) {
    const std::string f = fmt::format("/experts/layer-{:03}.bin", l);
    EXPECT_EQ(read_file(d / "pkg_bf16" + f), read_file(d / "pkg_fp8" + f)) << f;
  }
  // And quantised on import like any float weight.
  o.quant = quant_recipe("q8");
  EXPECT_NO_THROW(convert_checkpoint(d / "fp8", d / "pkg_fp8_q8", o));
  (void)r;
}

TEST(DeepSeekConvert, SplitsKvBAndPermutesTheRopeRows) {
  const DsCheckpoint c = make_ds_checkpoint();
  TempDir d;
  write_ds_checkpoint(c, d / "ckpt", false);
  ConvertOptions o;
  o.progress = false;
  convert_checkpoint(d / "ckpt", d / "pkg", o);
  auto m = Model::load(d / "pkg");
  const int nh = 4, L = 24, R = 8, nope = 12, vd = 10, qk = nope + R;
  auto row = [&](const Mat& w, int64_t r) {
    std::vector<float> v(size_t(w.cols));
    mat_row_f32(w, r, v.data());
    return v;
  };
  for (int l = 0; l < 3; l++) {
    const LayerWeights& w = m->layers[size_t(l)];
    const std::string p = fmt::format("model.layers.{}.self_attn.", l);
    const auto& kvb = c.values.at(p + "kv_b_proj.weight");
    for (int h = 0; h < nh; h++) {
      for (int cc = 0; cc < L; cc++) {
        const auto kb = row(w.k_b, h * L + cc);
        for (int i = 0; i < nope; i++)
          ASSERT_EQ(kb[size_t(i)], kvb[size_t((h * (nope + vd) + i) * L + cc)]) << l << " " << h;
      }
      for (int i = 0; i < vd; i++)
        ASSERT_EQ(row(w.v_b, h * vd + i),
                  std::vector<float>(kvb.begin() + (h * (nope + vd) + nope + i) * L,
                                     kvb.begin() + (h * (nope + vd) + nope + i + 1) * L));
      // q_b: per head the nope rows as they are, the rope rows de-interleaved (0 2 4 6 1 3 5 7).
      const auto& qb = c.values.at(p + "q_b_proj.weight");
      const int perm[R] = {0, 2, 4, 6, 1, 3, 5, 7};
      for (int j = 0; j < qk; j++) {
        const int src = h * qk + (j < nope ? j : nope + perm[j - nope]);
        ASSERT_EQ(row(w.q_b, h * qk + j),
                  std::vector<float>(qb.begin() + src * 32, qb.begin() + (src + 1) * 32))
            << "q_b layer " << l << " head " << h << " row " << j;
      }
    }
    const auto& kva = c.values.at(p + "kv_a_proj_with_mqa.weight");
    const int perm[R] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int j = 0; j < L + R; j++) {
      const int src = j < L ? j : L + perm[j - L];
      ASSERT_EQ(row(w.kv_a, j),
                std::vector<float>(kva.begin() + src * 64, kva.begin() + (src + 1) * 64))
          << "kv_a layer " << l << " row " << j;
    }
    if (l > 0) {
      const auto& b =
          c.values.at(fmt::format("model.layers.{}.mlp.gate.e_score_correction_bias", l));
      ASSERT_TRUE(w.router_bias);
      EXPECT_EQ(std::vector<float>(w.router_bias, w.router_bias + 16), b);
      EXPECT_FALSE(w.sh_router) << "DeepSeek's shared expert has no gate";
    }
  }
}

// ---- Kimi K2's tiktoken tokenizer ---------------------------------------------------------------

std::string b64(const std::string& bytes) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < bytes.size(); i += 3) {
    uint32_t w = uint32_t(uint8_t(bytes[i])) << 16;
    if (i + 1 < bytes.size()) w |= uint32_t(uint8_t(bytes[i + 1])) << 8;
    if (i + 2 < bytes.size()) w |= uint32_t(uint8_t(bytes[i + 2]));
    out += k[(w >> 18) & 63];
    out += k[(w >> 12) & 63];
    out += i + 1 < bytes.size() ? k[(w >> 6) & 63] : '=';
    out += i + 2 < bytes.size() ? k[w & 63] : '=';
  }
  return out;
}

// A tiktoken file of the 256 bytes (rank = byte) and a few merged tokens, a tokenizer_config
// with two of the reserved ids named, and what the generated tokenizer.json must do with them,
// worked out by hand: whole pre-tokens in the vocabulary are taken as they are (tiktoken), the
// rest merged by rank; Han characters split from other letters (the class intersection); a
// special token's text becomes its id.
TEST(KimiTokenizer, TiktokenFileBecomesATokenizer) {
  TempDir d;
  std::string model;
  // ranks 256..264; 世界 and o世 have no merge path (世 alone is no token): reachable only whole
  const std::vector<std::string> extra = {
      "he", "ll", "hell", "hello", "\xe4\xb8\x96\xe7\x95\x8c", "o\xe4\xb8\x96", " w", "or", " wor"};
  for (int b = 0; b < 256; b++)
    model += b64(std::string(1, char(b))) + " " + std::to_string(b) + "\n";
  for (size_t i = 0; i < extra.size(); i++)
    model += b64(extra[i]) + " " + std::to_string(256 + i) + "\n";
  std::ofstream(d / "tiktoken.model") << model;
  nlohmann::json cfg = {{"added_tokens_decoder",
                         {{"265", {{"content", "[BOS]"}, {"special", true}}},
                          {"267", {{"content", "<|im_end|>"}, {"special", true}}}}}};
  std::ofstream(d / "tokenizer_config.json") << cfg.dump();
  const std::string js = tiktoken_to_tokenizer_json(d / "tiktoken.model",
                                                    d / "tokenizer_config.json", kKimiK2Pattern, 4);
  const Tokenizer tok = Tokenizer::from_json(js, "generated");
  EXPECT_EQ(tok.vocab_size(), 269);
  // "hello" is a vocabulary token (259): taken whole. " world" is not: merged by rank, " w"
  // (262), "or" (263), " wor" (264), then l, d.
  EXPECT_EQ(tok.encode("hello world"), (std::vector<int32_t>{259, 264, 'l', 'd'}));
  // "hellx": merges by rank: h e -> he (256), l l -> ll (257), he ll -> hell (258), then x.
  EXPECT_EQ(tok.encode("hellx"), (std::vector<int32_t>{258, 'x'}));
  // "hello世界": Han is a pre-token of its own (without the intersection the whole string would
  // be one pre-token, giving 259 and six bytes); 世界 is then taken whole (260).
  EXPECT_EQ(tok.encode("hello\xe4\xb8\x96\xe7\x95\x8c"), (std::vector<int32_t>{259, 260}));
  {
    // The same file with the intersection dropped (plain [\p{Lu}...\p{M}], Han included) does
    // give 259 and six bytes: the check above tells the two apart.
    std::string naive = kKimiK2Pattern;
    for (size_t at; (at = naive.find("(?!\\p{Han})")) != std::string::npos;) naive.erase(at, 11);
    const Tokenizer t2 = Tokenizer::from_json(
        tiktoken_to_tokenizer_json(d / "tiktoken.model", d / "tokenizer_config.json", naive, 4),
        "naive");
    EXPECT_EQ(t2.encode("hello\xe4\xb8\x96\xe7\x95\x8c"),
              (std::vector<int32_t>{259, 0xe4, 0xb8, 0x96, 0xe7, 0x95, 0x8c}));
  }
  // Digits in threes; specials by name, the unnamed ones reserved.
  EXPECT_EQ(tok.encode("12345"), (std::vector<int32_t>{'1', '2', '3', '4', '5'}));
  EXPECT_EQ(tok.encode("[BOS]hello<|im_end|>"), (std::vector<int32_t>{265, 259, 267}));
  EXPECT_EQ(tok.token_id("<|reserved_token_266|>"), 266);
  EXPECT_TRUE(tok.is_special(268));
  EXPECT_EQ(tok.decode(tok.encode("hello wor\xe4\xb8\x96\xe7\x95\x8c!\n")),
            "hello wor\xe4\xb8\x96\xe7\x95\x8c!\n");
  // A malformed line is an error naming the file and line.
  std::ofstream(d / "bad.model") << b64("a") << " 0\nnot-base64 1\n";
  try {
    tiktoken_to_tokenizer_json(d / "bad.model", "", kKimiK2Pattern, 0);
    ADD_FAILURE() << "accepted a malformed line";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.model:2"), std::string::npos) << e.what();
  }
}

// A small MLA model (2 layers: dense then MoE, q_lora, YaRN, 4 groups) as a random package.
ModelSpec small_mla_spec() {
  ModelSpec s = read_config(ds_config()).spec;
  s.vocab_size = 300;
  s.hidden_size = 64;
  s.n_layers = 2;
  s.attn.assign(2, AttnKind::kMla);
  s.ffn = {FfnKind::kDense, FfnKind::kMoe};
  s.kv_lora_rank = 32;  // multiples of 32 so q8 fits too
  s.q_lora_rank = 64;
  s.rope_dim = 8;
  s.head_dim = 8 + 32;
  s.v_head_dim = 32;
  s.moe_ffn = 64;
  s.shared_ffn = 64;
  s.dense_ffn = 64;
  s.eos_ids = {1};
  s.validate("small MLA", SpecNaming::kPackage);
  return s;
}

class MlaSession : public SynthSessionTest {
 protected:
  void SetUp() override {
    synth_and_load(small_mla_spec(), 5);
  }
};

TEST_F(MlaSession, PrefillEqualsDecodeAndCacheIsTheLatent) {
  const std::vector<int32_t> toks = {3, 17, 250, 99, 4, 4, 212, 8, 9, 10};
  auto be = make_cpu_context(2);
  Session a(*model_, *be, *store_);
  const auto la = eval(a, toks);
  Session b(*model_, *be, *store_);
  std::vector<float> lb;
  for (int32_t t : toks) lb = eval(b, {t});
  ASSERT_EQ(la.size(), lb.size());
  EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * sizeof(float)), 0)
      << "prefill and one-token decode differ";
  // The snapshot holds per position the token and (kv_lora + rope) f32 per layer: 40 floats x
  // 2 layers, not 2 x heads x head_dim.
  const ModelSpec& s = model_->spec();
  const size_t per_pos = sizeof(int32_t) + size_t(s.n_layers) * (32 + 8) * sizeof(float);
  EXPECT_EQ(a.state_size(), kSnapshotHeaderBytes + toks.size() * per_pos);
  // Save, load into a fresh session, continue: the same next logits as continuing a.
  std::vector<uint8_t> snap(a.state_size());
  a.state_save(snap.data(), snap.size());
  Session c(*model_, *be, *store_);
  c.state_load(snap.data(), snap.size());
  EXPECT_EQ(eval(a, {42}), eval(c, {42}));
  // seq_rm back to 5 positions then the same tokens again: the logits of the full run.
  a.seq_rm(5, -1);
  EXPECT_EQ(a.pos(), 5);
  const auto again = eval(a, std::vector<int32_t>(toks.begin() + 5, toks.end()));
  EXPECT_EQ(again, la);
}

TEST_F(MlaSession, ThreadsDoNotChangeBits) {
  const std::vector<int32_t> toks = {5, 6, 7, 8, 200, 201};
  auto one = make_cpu_context(1), three = make_cpu_context(3);
  Session a(*model_, *one, *store_), b(*model_, *three, *store_);
  EXPECT_EQ(eval(a, toks), eval(b, toks));
}

TEST_F(MlaSession, ExpertsPerTokenBeyondTheKeptGroupsIsRefused) {
  auto be = make_cpu_context(1);
  SessionParams p;
  p.experts_per_token = 9;  // two groups of 4 are kept
  EXPECT_THROW(Session(*model_, *be, *store_, p), Error);
}

}  // namespace
}  // namespace moeflux::test
