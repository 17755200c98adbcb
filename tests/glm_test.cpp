// GLM-4.5 / GLM-4.5-Air (Glm4MoeForCausalLM, issue 17): the parts that do not need the HF
// fixture. The config.json reader on the spellings transformers 5 writes and the hub's, with
// Glm4MoeConfig's defaults for absent fields, and its errors on malformed configs; the package
// spec round trip; the converter on a hand-built checkpoint (q/k/v biases, q/k norm, per-expert
// and fused expert spellings, the MTP layer skipped with a note, a missing or unexpected bias
// named); and a session on a small random GLM package (prefill == decode bit for bit, threads).
// The forward pass against HF is in oracle_test.cpp (fixtures glm4_moe, glm4_moe_noqknorm).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "format/hf_config.h"
#include "synth/synth.h"
#include "test_util.h"
#include "util/half.h"

namespace moeflux::test {
namespace {

// A GLM-4.5 config.json as transformers 5 writes it (partial_rotary_factor at the top and in
// rope_parameters), of the fixture glm4_moe's shape.
nlohmann::json glm_config() {
  return {{"model_type", "glm4_moe"},
          {"architectures", {"Glm4MoeForCausalLM"}},
          {"attention_bias", true},
          {"vocab_size", 256},
          {"hidden_size", 64},
          {"intermediate_size", 48},
          {"moe_intermediate_size", 16},
          {"num_hidden_layers", 3},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 24},
          {"n_shared_experts", 1},
          {"n_routed_experts", 8},
          {"routed_scaling_factor", 2.5},
          {"n_group", 2},
          {"topk_group", 1},
          {"num_experts_per_tok", 2},
          {"first_k_dense_replace", 1},
          {"norm_topk_prob", true},
          {"use_qk_norm", true},
          {"num_nextn_predict_layers", 1},
          {"partial_rotary_factor", 0.5},
          {"max_position_embeddings", 4096},
          {"rms_norm_eps", 1e-5},
          {"eos_token_id", {1, 2}},
          {"bos_token_id", 0},
          {"pad_token_id", nullptr},
          {"tie_word_embeddings", false},
          {"rope_parameters",
           {{"rope_type", "default"}, {"rope_theta", 1000000.0}, {"partial_rotary_factor", 0.5}}}};
}

HfConfig read_config(const nlohmann::json& j) {
  TempDir d;
  std::ofstream(d / "config.json") << j.dump();
  return read_hf_config(d.path());
}

TEST(GlmConfig, ReadsTransformers5Spelling) {
  const HfConfig c = read_config(glm_config());
  const ModelSpec& s = c.spec;
  EXPECT_EQ(s.arch, "glm4_moe");
  EXPECT_EQ(s.attn, std::vector<AttnKind>(3, AttnKind::kFull));
  EXPECT_EQ(s.ffn, (std::vector<FfnKind>{FfnKind::kDense, FfnKind::kMoe, FfnKind::kMoe}));
  EXPECT_EQ(s.n_heads, 4);
  EXPECT_EQ(s.n_kv_heads, 2);
  EXPECT_EQ(s.head_dim, 24);  // config.head_dim, not hidden / heads
  EXPECT_EQ(s.rope_dim, 12);  // int(24 * 0.5): rotate-half on the first 12 dims of each head
  EXPECT_EQ(s.rope_theta, 1e6);
  EXPECT_TRUE(s.qkv_bias);
  EXPECT_TRUE(s.qk_norm);
  EXPECT_FALSE(s.attn_output_gate);
  EXPECT_FALSE(c.norm_one_plus);
  EXPECT_EQ(s.kv_floats_per_pos(AttnKind::kFull), 2 * 2 * 24);
  EXPECT_EQ(s.n_experts, 8);
  EXPECT_EQ(s.top_k, 2);
  EXPECT_EQ(s.moe_ffn, 16);
  EXPECT_EQ(s.router, RouterKind::kSigmoid);
  EXPECT_TRUE(s.router_bias);
  EXPECT_EQ(s.n_group, 2);
  EXPECT_EQ(s.topk_group, 1);
  EXPECT_EQ(s.routed_scale, 2.5);
  EXPECT_TRUE(s.norm_topk_prob);
  EXPECT_EQ(s.shared_ffn, 16);
  EXPECT_FALSE(s.shared_gate);
  EXPECT_EQ(s.dense_ffn, 48);
  EXPECT_EQ(s.rms_eps, 1e-5f);
  EXPECT_EQ(s.eos_ids, (std::vector<int>{1, 2}));

  // The hub's spelling (GLM-4.5-Air's config.json as published: rope_theta and
  // partial_rotary_factor at the top, rope_scaling null), and Glm4MoeConfig's defaults for what
  // it leaves out: partial_rotary_factor 0.5, first_k_dense_replace 1, n_shared_experts 1,
  // use_qk_norm false, routed_scaling_factor 1, norm_topk_prob true, one group.
  nlohmann::json j = glm_config();
  j.erase("rope_parameters");
  j["rope_scaling"] = nullptr;
  j["rope_theta"] = 1000000;
  for (const char* k : {"partial_rotary_factor", "first_k_dense_replace", "n_shared_experts",
                        "use_qk_norm", "routed_scaling_factor", "norm_topk_prob", "n_group",
                        "topk_group", "head_dim"})
    j.erase(k);
  const ModelSpec a = read_config(j).spec;
  EXPECT_EQ(a.head_dim, 16);  // hidden / heads
  EXPECT_EQ(a.rope_dim, 8);
  EXPECT_EQ(a.rope_theta, 1e6);
  EXPECT_FALSE(a.qk_norm);
  EXPECT_TRUE(a.qkv_bias);
  EXPECT_EQ(a.ffn, (std::vector<FfnKind>{FfnKind::kDense, FfnKind::kMoe, FfnKind::kMoe}));
  EXPECT_EQ(a.shared_ffn, 16);
  EXPECT_EQ(a.routed_scale, 1.0);
  EXPECT_TRUE(a.norm_topk_prob);
  EXPECT_EQ(a.n_group, 1);
  EXPECT_EQ(a.topk_group, 1);

  // num_local_experts (Glm4MoeConfig's attribute_map) for n_routed_experts; no biases.
  j = glm_config();
  j.erase("n_routed_experts");
  j["num_local_experts"] = 8;
  j["attention_bias"] = false;
  j["first_k_dense_replace"] = 0;
  const ModelSpec b = read_config(j).spec;
  EXPECT_EQ(b.n_experts, 8);
  EXPECT_FALSE(b.qkv_bias);
  EXPECT_EQ(b.ffn, std::vector<FfnKind>(3, FfnKind::kMoe));
}

TEST(GlmConfig, MalformedConfigsAreRefusedNamingTheField) {
  auto refused = [](nlohmann::json j, const std::string& needle) {
    try {
      read_config(j);
      ADD_FAILURE() << "accepted; expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
    }
  };
  nlohmann::json j = glm_config();
  j.erase("n_routed_experts");
  refused(j, "n_routed_experts");
  j = glm_config();
  j["attention_bias"] = "yes";
  refused(j, "attention_bias");
  j = glm_config();
  j["use_qk_norm"] = 1;
  refused(j, "use_qk_norm");
  j = glm_config();
  j["rope_parameters"]["partial_rotary_factor"] = 1.5;
  refused(j, "partial_rotary_factor");
  j = glm_config();
  j["head_dim"] = 10;  // int(10 * 0.5) = 5 rotary dims: odd
  j["rope_parameters"]["partial_rotary_factor"] = 0.5;
  refused(j, "partial_rotary_factor");
  j = glm_config();
  j["n_group"] = 3;  // 8 experts do not split into 3 groups
  refused(j, "n_group");
  j = glm_config();
  j["num_experts_per_tok"] = 5;  // more than the 4 experts of the one kept group
  refused(j, "num_experts_per_tok");
  j = glm_config();
  j["routed_scaling_factor"] = "2.5";
  refused(j, "routed_scaling_factor");
  j = glm_config();
  j["first_k_dense_replace"] = -1;
  refused(j, "first_k_dense_replace");
  j = glm_config();
  j["n_shared_experts"] = nlohmann::json::array();
  refused(j, "n_shared_experts");
  j = glm_config();
  j["rope_parameters"]["rope_type"] = "yarn";
  refused(j, "yarn");
  j = glm_config();
  j["hidden_act"] = "gelu";
  refused(j, "hidden_act");
  j = glm_config();
  j["first_k_dense_replace"] = 1;
  j.erase("intermediate_size");  // the dense layer's size
  refused(j, "intermediate_size");
}

TEST(GlmSpec, PackageJsonRoundTrip) {
  const ModelSpec s = read_config(glm_config()).spec;
  nlohmann::json j;
  to_json(j, s);
  EXPECT_EQ(j["arch"], "glm4_moe");
  EXPECT_EQ(j["qkv_bias"], true);
  ASSERT_TRUE(j.contains("routing"));
  const ModelSpec r = spec_from_json(j, "test");
  EXPECT_TRUE(r.qkv_bias);
  nlohmann::json j2;
  to_json(j2, r);
  EXPECT_EQ(j.dump(), j2.dump());
  // Without biases the field is not written (every other arch's manifest is as before).
  ModelSpec q = s;
  q.qkv_bias = false;
  nlohmann::json jq;
  to_json(jq, q);
  EXPECT_FALSE(jq.contains("qkv_bias"));
  EXPECT_FALSE(spec_from_json(jq, "test").qkv_bias);
  // A package that says qkv_bias must say it as a boolean; and only with full attention.
  j["qkv_bias"] = 1;
  EXPECT_THROW(spec_from_json(j, "test"), Error);
  ModelSpec m = s;
  m.arch = "deepseek_v3";
  m.attn.assign(3, AttnKind::kMla);
  m.q_lora_rank = 0;
  m.kv_lora_rank = 8;
  m.v_head_dim = 8;
  m.rope_dim = 8;
  try {
    m.validate("test", SpecNaming::kPackage);
    ADD_FAILURE() << "qkv_bias on MLA layers accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.qkv_bias"), std::string::npos) << e.what();
  }
}

// The presets at the real sizes (config.json of zai-org/GLM-4.5 and GLM-4.5-Air, and the
// Megatron arguments of their training scripts: 92 / 46 layers, 3 / 1 dense, hidden 5120 / 4096,
// 96 q-heads and 8 kv-heads of 128, q/k norm on GLM-4.5 only, 160 / 128 experts top-8 of
// 1536 / 1408, one shared expert, routed scale 2.5 / 1, rotary 0.5, theta 1e6); the KV cache
// per token that `inspect` prints for them: 2 x 8 x 128 floats per layer.
TEST(GlmPresets, RealShapesAndKvBytesPerToken) {
  const ModelSpec g = synth_spec("glm-4.5"), a = synth_spec("glm-4.5-air");
  EXPECT_EQ(g.arch, "glm4_moe");
  EXPECT_EQ(g.n_layers, 92);
  EXPECT_EQ(std::count(g.ffn.begin(), g.ffn.end(), FfnKind::kDense), 3);
  EXPECT_EQ(g.hidden_size, 5120);
  EXPECT_EQ(g.dense_ffn, 12288);
  EXPECT_EQ(g.n_experts, 160);
  EXPECT_EQ(g.moe_ffn, 1536);
  EXPECT_TRUE(g.qk_norm);
  EXPECT_EQ(g.routed_scale, 2.5);
  EXPECT_EQ(a.n_layers, 46);
  EXPECT_EQ(std::count(a.ffn.begin(), a.ffn.end(), FfnKind::kDense), 1);
  EXPECT_EQ(a.hidden_size, 4096);
  EXPECT_EQ(a.dense_ffn, 10944);
  EXPECT_EQ(a.n_experts, 128);
  EXPECT_EQ(a.moe_ffn, 1408);
  EXPECT_FALSE(a.qk_norm);
  EXPECT_EQ(a.routed_scale, 1.0);
  for (const ModelSpec* s : {&g, &a}) {
    EXPECT_EQ(s->vocab_size, 151552);
    EXPECT_EQ(s->n_heads, 96);
    EXPECT_EQ(s->n_kv_heads, 8);
    EXPECT_EQ(s->head_dim, 128);
    EXPECT_EQ(s->rope_dim, 64);
    EXPECT_TRUE(s->qkv_bias);
    EXPECT_EQ(s->top_k, 8);
    EXPECT_EQ(s->shared_ffn, s->moe_ffn);
  }
  auto kv_bytes = [](const ModelSpec& s) {
    int64_t f = 0;
    for (auto k : s.attn) f += s.kv_floats_per_pos(k);
    return f * 4;  // f32, as inspect prints first
  };
  EXPECT_EQ(kv_bytes(g), 753664);  // 92 x 2048 floats; 376,832 in bf16
  EXPECT_EQ(kv_bytes(a), 376832);  // 46 x 2048 floats; 188,416 in bf16
}

// ---- The converter on a hand-built checkpoint ------------------------------------------------

// glm_config()'s shape with random bf16 weights: layer 0 dense, layers 1-2 MoE, and an MTP
// layer 3 (a few of its tensors, as GLM-4.5 checkpoints store it: model.layers.{n}.eh_proj,
// enorm, hnorm, shared_head.head and a decoder layer). Experts per expert (experts.E.*_proj)
// or, with `fused`, in transformers 5's 3-D spelling (experts.gate_up_proj, experts.down_proj).
struct Ckpt {
  std::map<std::string, std::vector<float>> values;
  std::map<std::string, std::vector<int64_t>> shape;
};

Ckpt make_glm_checkpoint() {
  Ckpt c;
  std::mt19937 g(4500);
  std::uniform_real_distribution<float> u(-1, 1);
  const int H = 64, nh = 4, nkv = 2, hd = 24, E = 8, I = 16, D = 48, V = 256;
  auto add = [&](const std::string& n, std::vector<int64_t> shape, bool norm = false) {
    int64_t numel = 1;
    for (auto d : shape) numel *= d;
    std::vector<float> v(static_cast<size_t>(numel));
    for (auto& x : v) x = bf16_to_f32(f32_to_bf16(norm ? 1.0f + 0.1f * u(g) : u(g)));
    c.values[n] = std::move(v);
    c.shape[n] = std::move(shape);
  };
  add("model.embed_tokens.weight", {V, H});
  add("model.norm.weight", {H}, true);
  add("lm_head.weight", {V, H});
  for (int l = 0; l < 4; l++) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {H}, true);
    add(p + "post_attention_layernorm.weight", {H}, true);
    add(p + "self_attn.q_proj.weight", {nh * hd, H});
    add(p + "self_attn.q_proj.bias", {nh * hd});
    add(p + "self_attn.k_proj.weight", {nkv * hd, H});
    add(p + "self_attn.k_proj.bias", {nkv * hd});
    add(p + "self_attn.v_proj.weight", {nkv * hd, H});
    add(p + "self_attn.v_proj.bias", {nkv * hd});
    add(p + "self_attn.o_proj.weight", {H, nh * hd});
    add(p + "self_attn.q_norm.weight", {hd}, true);
    add(p + "self_attn.k_norm.weight", {hd}, true);
    if (l == 0) {
      add(p + "mlp.gate_proj.weight", {D, H});
      add(p + "mlp.up_proj.weight", {D, H});
      add(p + "mlp.down_proj.weight", {H, D});
      continue;
    }
    add(p + "mlp.gate.weight", {E, H});
    add(p + "mlp.gate.e_score_correction_bias", {E});
    for (const char* m : {"gate_proj", "up_proj"})
      add(p + "mlp.shared_experts." + m + ".weight", {I, H});
    add(p + "mlp.shared_experts.down_proj.weight", {H, I});
    for (int e = 0; e < E; e++) {
      for (const char* m : {"gate_proj", "up_proj"})
        add(p + fmt::format("mlp.experts.{}.{}.weight", e, m), {I, H});
      add(p + fmt::format("mlp.experts.{}.down_proj.weight", e), {H, I});
    }
    if (l == 3) {  // the MTP module's own tensors
      add(p + "eh_proj.weight", {H, 2 * H});
      add(p + "enorm.weight", {H}, true);
      add(p + "hnorm.weight", {H}, true);
      add(p + "shared_head.norm.weight", {H}, true);
      add(p + "shared_head.head.weight", {V, H});
    }
  }
  return c;
}

void write_glm_checkpoint(const Ckpt& c, const std::string& dir, const nlohmann::json& cfg,
                          bool fused, const std::string& drop = "") {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << cfg.dump();
  std::map<std::string, std::vector<float>> vals = c.values;
  std::map<std::string, std::vector<int64_t>> shapes = c.shape;
  if (fused) {
    const int E = 8, I = 16, H = 64;
    for (int l = 1; l < 3; l++) {
      const std::string p = fmt::format("model.layers.{}.mlp.experts.", l);
      std::vector<float> gu, dn;
      for (int e = 0; e < E; e++) {
        for (const char* m : {"gate_proj", "up_proj"}) {
          const std::string n = fmt::format("{}{}.{}.weight", p, e, m);
          gu.insert(gu.end(), vals[n].begin(), vals[n].end());
        }
        const std::string d = fmt::format("{}{}.down_proj.weight", p, e);
        dn.insert(dn.end(), vals[d].begin(), vals[d].end());
        for (const char* m : {"gate_proj", "up_proj", "down_proj"}) {
          vals.erase(fmt::format("{}{}.{}.weight", p, e, m));
          shapes.erase(fmt::format("{}{}.{}.weight", p, e, m));
        }
      }
      vals[p + "gate_up_proj"] = gu;
      shapes[p + "gate_up_proj"] = {E, 2 * I, H};
      vals[p + "down_proj"] = dn;
      shapes[p + "down_proj"] = {E, H, I};
    }
  }
  std::vector<TensorToWrite> out;
  std::vector<std::vector<uint8_t>> bufs;
  bufs.reserve(vals.size());
  for (const auto& [name, v] : vals) {
    if (name == drop) continue;
    if (name.ends_with("e_score_correction_bias")) {  // f32, as HF keeps it
      bufs.emplace_back(v.size() * 4);
      std::memcpy(bufs.back().data(), v.data(), v.size() * 4);
      out.push_back({name, DType::kF32, shapes.at(name), bufs.back().data()});
      continue;
    }
    bufs.emplace_back(v.size() * 2);
    for (size_t i = 0; i < v.size(); i++) {
      const uint16_t h = f32_to_bf16(v[i]);
      std::memcpy(bufs.back().data() + 2 * i, &h, 2);
    }
    out.push_back({name, DType::kBF16, shapes.at(name), bufs.back().data()});
  }
  write_safetensors(dir + "/model.safetensors", out);
}

TEST(GlmConvert, BiasesNormsAndRoutingLandWhereTheEngineReadsThem) {
  const Ckpt c = make_glm_checkpoint();
  TempDir d;
  write_glm_checkpoint(c, d / "ckpt", glm_config(), false);
  ConvertOptions o;
  o.progress = false;
  const ConvertReport r = convert_checkpoint(d / "ckpt", d / "pkg", o);
  // The MTP layer (checkpoint layer num_hidden_layers = 3) is skipped with a note.
  const int mtp_tensors = int(std::count_if(c.values.begin(), c.values.end(), [](const auto& kv) {
    return kv.first.starts_with("model.layers.3.");
  }));
  bool noted = false;
  for (const auto& n : r.notes)
    noted |= n == fmt::format("skipped {} mtp (multi-token prediction) tensors", mtp_tensors);
  EXPECT_TRUE(noted) << fmt::format("notes: {}", fmt::join(r.notes, " | "));

  auto m = Model::load(d / "pkg");
  ASSERT_EQ(m->layers.size(), 3u);
  auto vec = [](const float* p, size_t n) { return std::vector<float>(p, p + n); };
  for (int l = 0; l < 3; l++) {
    SCOPED_TRACE(l);
    const LayerWeights& w = m->layers[size_t(l)];
    const std::string p = fmt::format("model.layers.{}.self_attn.", l);
    ASSERT_TRUE(w.q_bias && w.k_bias && w.v_bias);
    EXPECT_EQ(vec(w.q_bias, 96), c.values.at(p + "q_proj.bias"));
    EXPECT_EQ(vec(w.k_bias, 48), c.values.at(p + "k_proj.bias"));
    EXPECT_EQ(vec(w.v_bias, 48), c.values.at(p + "v_proj.bias"));
    // RMSNorm weights as they are (GLM scales by w, not 1 + w).
    ASSERT_TRUE(w.q_norm && w.k_norm);
    EXPECT_EQ(vec(w.q_norm, 24), c.values.at(p + "q_norm.weight"));
    EXPECT_EQ(vec(w.k_norm, 24), c.values.at(p + "k_norm.weight"));
    std::vector<float> row(64);
    mat_row_f32(w.q, 5, row.data());
    const auto& q = c.values.at(p + "q_proj.weight");
    EXPECT_EQ(row, std::vector<float>(q.begin() + 5 * 64, q.begin() + 6 * 64));
    if (l == 0) {
      EXPECT_EQ(w.ffn, FfnKind::kDense);
      continue;
    }
    EXPECT_EQ(w.ffn, FfnKind::kMoe);
    ASSERT_TRUE(w.router_bias);
    EXPECT_EQ(vec(w.router_bias, 8),
              c.values.at(fmt::format("model.layers.{}.mlp.gate.e_score_correction_bias", l)));
    EXPECT_TRUE(w.sh_gate);
    EXPECT_FALSE(w.sh_router) << "GLM's shared expert has no gate";
  }

  // It runs (head_dim 24: 12 rotary dims of 24, GQA 4/2), prompt and decode alike.
  const std::vector<int32_t> toks = {3, 17, 250, 99, 4};
  const RunResult run = run_tokens(d / "pkg", toks, 2);
  ASSERT_EQ(run.logits.size(), toks.size() * 256);
  for (float x : run.logits) ASSERT_TRUE(std::isfinite(x));
  {
    ExpertStore store(*m);
    auto be = make_cpu_context(1);
    Session one(*m, *be, store);
    std::vector<float> last(256);
    for (int32_t t : toks) one.eval(&t, 1, last.data(), false);
    EXPECT_EQ(std::memcmp(last.data(), run.logits.data() + 4 * 256, 256 * sizeof(float)), 0)
        << "one-token decode differs from the prompt's last position";
  }

  // transformers 5's fused expert spelling converts to the same package, byte for byte.
  write_glm_checkpoint(c, d / "ckpt_fused", glm_config(), true);
  convert_checkpoint(d / "ckpt_fused", d / "pkg_fused", o);
  EXPECT_EQ(read_file(d / "pkg/resident.bin"), read_file(d / "pkg_fused/resident.bin"));
  for (int l : {1, 2}) {
    const std::string f = fmt::format("/experts/layer-{:03}.bin", l);
    EXPECT_EQ(read_file(d / "pkg" + f), read_file(d / "pkg_fused" + f)) << f;
  }
}

TEST(GlmConvert, MissingOrUnexpectedBiasesAreNamed) {
  const Ckpt c = make_glm_checkpoint();
  TempDir d;
  ConvertOptions o;
  o.progress = false;
  // attention_bias true but a bias is missing: the error names the tensor.
  write_glm_checkpoint(c, d / "missing", glm_config(), false, "model.layers.1.self_attn.k_proj.bias");
  try {
    convert_checkpoint(d / "missing", d / "pkg1", o);
    ADD_FAILURE() << "converted without model.layers.1.self_attn.k_proj.bias";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.self_attn.k_proj.bias"),
              std::string::npos)
        << e.what();
  }
  // attention_bias false with biases in the checkpoint: refused, naming a bias (not dropped).
  nlohmann::json j = glm_config();
  j["attention_bias"] = false;
  write_glm_checkpoint(c, d / "unexpected", j, false);
  try {
    convert_checkpoint(d / "unexpected", d / "pkg2", o);
    ADD_FAILURE() << "biases dropped silently";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("_proj.bias"), std::string::npos) << e.what();
  }
}

// ---- A session on a small random GLM package -------------------------------------------------

class GlmSession : public SynthSessionTest {
 protected:
  void SetUp() override {
    ModelSpec s = read_config(glm_config()).spec;
    s.vocab_size = 300;
    s.eos_ids = {1};
    s.moe_ffn = s.shared_ffn = 64;  // multiples of 32 so quantised matrices fit too
    s.dense_ffn = 64;
    s.head_dim = 32;
    s.rope_dim = 16;
    s.validate("small GLM", SpecNaming::kPackage);
    synth_and_load(s, 7);
  }
};

TEST_F(GlmSession, PrefillEqualsDecodeAndThreadsDoNotChangeBits) {
  ASSERT_TRUE(model_->layers[0].q_bias) << "synth wrote no attention biases";
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
  auto one = make_cpu_context(1), three = make_cpu_context(3);
  Session c(*model_, *one, *store_), d(*model_, *three, *store_);
  EXPECT_EQ(eval(c, toks), eval(d, toks));
}

}  // namespace
}  // namespace moeflux::test
