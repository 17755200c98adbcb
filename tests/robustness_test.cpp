// Bad input (DESIGN.md §6): a broken checkpoint, config.json, package, flag or token list fails
// with a non-zero exit (CLI) or a moeflux::Error (library), ONE error line that names the
// file / tensor / field / position at fault, and no crash. Ends with a deterministic mutation
// fuzz of the safetensors and manifest parsers (the libFuzzer targets are in tests/fuzz/).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <optional>
#include <nlohmann/json.hpp>
#include <random>
#include <typeinfo>

#include "format/package.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "test_util.h"
#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"
#include "util/thread_pool.h"

namespace moeflux::test {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Needles = std::vector<std::string>;

constexpr const char* kFixture = "qwen3_moe";  // 4 layers, all full attention + MoE, vocab 1024

// ---------------------------------------------------------------------------------------------
// Assertions

// One line, no sanitizer report, and every needle in it.
void check_message(const std::string& msg, const Needles& needles) {
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "error spans several lines:\n" << msg;
  EXPECT_EQ(msg.find("Sanitizer"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("runtime error"), std::string::npos) << msg;
  for (const auto& n : needles)
    EXPECT_NE(msg.find(n), std::string::npos) << "error does not mention '" << n << "':\n" << msg;
}

// `moeflux <args>` exits 1 (not a signal, not 0) with exactly one line on stderr.
void expect_cli_error(const std::string& args, const Needles& needles) {
  SCOPED_TRACE("moeflux " + args);
  const CliResult r = run_cli(args);
  EXPECT_EQ(r.code, 1) << (r.code > 128 ? "killed by a signal\n" : "") << r.err;
  const std::string prefix = "moeflux: error: ";
  ASSERT_TRUE(r.err.starts_with(prefix) && r.err.ends_with("\n")) << "stderr:\n" << r.err;
  check_message(r.err.substr(prefix.size(), r.err.size() - prefix.size() - 1), needles);
  EXPECT_EQ(r.out, "") << "stdout on failure";
}

// `f` throws a moeflux::Error (of `kind`, when given) whose message names every needle.
void expect_error(const std::function<void()>& f, const Needles& needles,
                  std::optional<ErrorKind> kind = std::nullopt) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << fmt::format("{}", needles);
  } catch (const Error& e) {
    check_message(e.what(), needles);
    if (kind) {
      EXPECT_EQ(int(e.kind()), int(*kind)) << e.what();
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw " << typeid(e).name() << " instead of moeflux::Error: " << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Scratch checkpoints and packages (fixtures are read-only: copies go to a TempDir)

// Replaces the file with a new one: unlink first, because ext4 flushes a file that is truncated
// and rewritten in place (auto_da_alloc), which makes thousands of rewrites take seconds.
void write_bytes(const std::string& path, const std::string& bytes) {
  ::unlink(path.c_str());
  write_text_file(path, bytes);
}

// A checkpoint directory `dir` made from a fixture: config.json passed through `edit_config`,
// model.safetensors rewritten through `edit_tensors` (when given), other files linked.
using TensorEdit = std::function<void(std::vector<TensorToWrite>&, std::deque<std::vector<uint8_t>>&)>;
std::string make_checkpoint(const std::string& dir, const std::string& fixture,
                            const std::function<void(json&)>& edit_config,
                            const TensorEdit& edit_tensors = nullptr) {
  fs::create_directories(dir);
  const std::string src = fixture_dir(fixture);
  for (const auto& e : fs::directory_iterator(src)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || (edit_tensors && name == "model.safetensors")) continue;
    fs::create_symlink(e.path(), dir + "/" + name);
  }
  json cfg = json::parse(read_text_file(src + "/config.json"));
  if (edit_config) edit_config(cfg);
  write_text_file(dir + "/config.json", cfg.dump(2));
  if (edit_tensors) {
    SafetensorsFile in(src + "/model.safetensors");
    std::vector<TensorToWrite> ts;
    for (const auto& [name, t] : in.tensors()) ts.push_back({name, t.dtype, t.shape, t.data});
    std::deque<std::vector<uint8_t>> storage;  // data of replaced tensors
    edit_tensors(ts, storage);
    write_safetensors(dir + "/model.safetensors", ts);
  }
  return dir;
}

TensorToWrite& tensor(std::vector<TensorToWrite>& ts, const std::string& name) {
  for (auto& t : ts)
    if (t.name == name) return t;
  throw std::runtime_error("fixture lacks " + name);
}

// A writable copy of the converted fixture package, moeflux.json passed through `edit`.
std::string make_package(const std::string& dir, const std::function<void(json&)>& edit = nullptr) {
  fs::copy(converted_fixture(kFixture), dir, fs::copy_options::recursive);
  if (edit) {
    json m = json::parse(read_text_file(manifest_path(dir)));
    edit(m);
    write_text_file(manifest_path(dir), m.dump(1));
  }
  return dir;
}

json& resident_entry(json& m, const std::string& name) {
  for (auto& t : m["resident"]["tensors"])
    if (t["name"] == name) return t;
  throw std::runtime_error("package lacks " + name);
}
const json& resident_entry(const json& m, const std::string& name) {
  for (const auto& t : m.at("resident").at("tensors"))
    if (t.at("name") == name) return t;
  throw std::runtime_error("package lacks " + name);
}

void truncate_file(const std::string& path, uint64_t size) {
  fs::resize_file(path, size);
}

// A safetensors file from a header text and a data section; `len` overrides the length word.
std::string raw_safetensors(const std::string& header, size_t data_bytes,
                            std::optional<uint64_t> len = std::nullopt) {
  std::string out(8, '\0');
  const uint64_t n = len ? *len : header.size();
  for (int i = 0; i < 8; i++) out[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return out + header + std::string(data_bytes, '\x11');
}

// ---------------------------------------------------------------------------------------------
// 1-4. Checkpoints: architecture, missing / mis-shaped / mis-typed tensors, broken safetensors

TEST(Robustness, ConvertRejectsUnknownArchitecture) {
  TempDir tmp;
  auto ck = make_checkpoint(tmp / "ck", kFixture, [](json& c) { c["model_type"] = "llama"; });
  expect_cli_error(fmt::format("convert -q {} {}", ck, tmp / "out"),
                   {"config.json", "model_type", "'llama'", "not supported"});
  EXPECT_FALSE(fs::exists(tmp / "out")) << "a failed conversion left an output directory";
  auto nt = make_checkpoint(tmp / "nt", kFixture, [](json& c) { c.erase("model_type"); });
  expect_cli_error(fmt::format("convert -q {} {}", nt, tmp / "out"),
                   {"config.json", "missing field 'model_type'"});
}

TEST(Robustness, ConvertNamesMissingTensor) {
  TempDir tmp;
  for (const std::string victim :
       {"model.layers.3.mlp.experts.15.up_proj.weight", "model.layers.1.self_attn.k_proj.weight",
        "model.norm.weight", "lm_head.weight"}) {
    const std::string dir = tmp / fmt::format("ck{}", victim.size());
    make_checkpoint(dir, kFixture, nullptr, [&](auto& ts, auto&) {
      std::erase_if(ts, [&](const TensorToWrite& t) { return t.name == victim; });
    });
    expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"),
                     {dir, "missing tensor '" + victim + "'"});
  }
}

TEST(Robustness, ConvertNamesMisShapedTensor) {
  TempDir tmp;
  struct Case {
    std::string name;
    std::vector<int64_t> shape;
    std::string actual, expected;
  };
  const std::vector<Case> cases = {
      {"model.layers.2.self_attn.k_proj.weight", {64, 48}, "[64, 48]", "[64, 64]"},
      {"model.layers.1.mlp.experts.7.down_proj.weight", {64, 31}, "[64, 31]", "[64, 32]"},
      {"model.layers.0.mlp.gate.weight", {16, 64, 1}, "[16, 64, 1]", "[16, 64]"},
      {"model.embed_tokens.weight", {1000, 64}, "[1000, 64]", "[1024, 64]"},
      {"model.layers.3.input_layernorm.weight", {63}, "[63]", "[64]"},
  };
  for (size_t i = 0; i < cases.size(); i++) {
    const Case& c = cases[i];
    const std::string dir = tmp / fmt::format("ck{}", i);
    make_checkpoint(dir, kFixture, nullptr, [&](auto& ts, auto& storage) {
      TensorToWrite& t = tensor(ts, c.name);
      int64_t n = 1;
      for (auto d : c.shape) n *= d;
      storage.emplace_back(size_t(n) * dtype_size(t.dtype), uint8_t(0));
      t.shape = c.shape;
      t.data = storage.back().data();
    });
    expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"),
                     {"model.safetensors", "tensor '" + c.name + "'", "has shape " + c.actual,
                      "expected " + c.expected});
  }
}

TEST(Robustness, ConvertNamesWrongDtypeAndUnusedTensor) {
  TempDir tmp;
  const std::string name = "model.layers.2.self_attn.o_proj.weight";
  std::vector<int32_t> ints(64 * 64);
  make_checkpoint(tmp / "dt", kFixture, nullptr, [&](auto& ts, auto&) {
    TensorToWrite& t = tensor(ts, name);  // bf16 [64, 128]: same bytes as i32 [64, 64]
    t.dtype = DType::kI32;
    t.shape = {64, 64};
    t.data = ints.data();
  });
  expect_cli_error(fmt::format("convert -q {} {}", tmp / "dt", tmp / "out"),
                   {"model.safetensors", "'" + name + "'", "dtype I32", "expected a float type"});

  const std::vector<float> extra(4, 0.0f);
  make_checkpoint(tmp / "ex", kFixture, nullptr, [&](auto& ts, auto&) {
    ts.push_back({"model.layers.0.self_attn.q_proj.bias", DType::kF32, {4}, extra.data()});
  });
  expect_cli_error(fmt::format("convert -q {} {}", tmp / "ex", tmp / "out"),
                   {"'model.layers.0.self_attn.q_proj.bias'", "is not used by a qwen3_moe model"});
}

TEST(Robustness, ConvertNamesTruncatedSafetensors) {
  TempDir tmp;
  const std::string whole = read_text_file(fixture_dir(kFixture) + "/model.safetensors");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; i++) header_len |= uint64_t(uint8_t(whole[size_t(i)])) << (8 * i);
  struct Case {
    size_t size;
    Needles needles;
  };
  const std::vector<Case> cases = {
      {whole.size() - 1000, {"runs past the end of the data section", "file truncated?"}},
      {size_t(8 + header_len / 2),
       {fmt::format("header claims {} bytes, file has {}", header_len, header_len / 2)}},
      {5, {"truncated safetensors file (5 bytes)"}},
      {0, {"truncated safetensors file (0 bytes)"}},
  };
  for (size_t i = 0; i < cases.size(); i++) {
    const std::string dir = tmp / fmt::format("ck{}", i);
    make_checkpoint(dir, kFixture, nullptr);
    fs::remove(dir + "/model.safetensors");
    write_bytes(dir + "/model.safetensors", whole.substr(0, cases[i].size));
    Needles n = cases[i].needles;
    n.push_back(dir + "/model.safetensors");
    expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"), n);
  }
}

TEST(Robustness, SafetensorsHeaderErrors) {
  TempDir tmp;
  const std::string path = tmp / "t.safetensors";
  auto t = [](const std::string& name, const std::string& dtype, const std::string& shape,
              uint64_t b, uint64_t e) {
    return fmt::format(R"("{}":{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}})", name, dtype,
                       shape, b, e);
  };
  struct Case {
    std::string what, bytes;
    Needles needles;
  };
  const std::vector<Case> cases = {
      {"overlap", raw_safetensors("{" + t("a", "F32", "[4]", 0, 16) + "," +
                                  t("b", "F32", "[4]", 8, 24) + "}", 24),
       {"tensors 'a' and 'b' overlap"}},
      {"dtype x shape != bytes", raw_safetensors("{" + t("w", "F32", "[4]", 0, 12) + "}", 12),
       {"tensor 'w'", "F32 x [4] needs 16 bytes but data_offsets span 12"}},
      {"bf16 x shape != bytes", raw_safetensors("{" + t("w", "BF16", "[3, 2]", 0, 24) + "}", 24),
       {"tensor 'w'", "BF16 x [3, 2] needs 12 bytes but data_offsets span 24"}},
      {"malformed json", raw_safetensors(R"({"w": {"dtype": "F32",)", 0),
       {"malformed safetensors header JSON at byte"}},
      {"number out of range", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [1e400]}})", 0),
       {"malformed safetensors header JSON", "number overflow"}},
      {"header not an object", raw_safetensors("[1, 2]", 0), {"not a JSON object"}},
      {"entry not an object", raw_safetensors(R"({"w": 7})", 0), {"tensor 'w'", "not an object"}},
      {"unknown dtype", raw_safetensors("{" + t("w", "F7", "[1]", 0, 1) + "}", 1),
       {"tensor 'w'", "unknown dtype 'F7'"}},
      {"negative dim", raw_safetensors("{" + t("w", "F32", "[-1]", 0, 4) + "}", 4),
       {"tensor 'w'", "non-negative integers"}},
      {"shape overflow",
       raw_safetensors("{" + t("w", "F32", "[4294967296, 4294967296]", 0, 4) + "}", 4),
       {"tensor 'w'", "shape overflows"}},
      {"reversed offsets", raw_safetensors("{" + t("w", "U8", "[0]", 8, 4) + "}", 8),
       {"tensor 'w'", "data_offsets [8, 4] are reversed"}},
      {"offsets past the end", raw_safetensors("{" + t("w", "U8", "[8]", 0, 8) + "}", 4),
       {"tensor 'w'", "runs past the end of the data section (4 bytes)"}},
      {"missing offsets", raw_safetensors(R"({"w":{"dtype":"F32","shape":[1]}})", 4),
       {"tensor 'w'", "'data_offsets'"}},
      {"metadata not an object", raw_safetensors(R"({"__metadata__":[1]})", 0),
       {"__metadata__ is not an object"}},
      {"header length past the end", raw_safetensors("{}", 0, uint64_t(1) << 63),
       {"header claims 9223372036854775808 bytes, file has 2"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    write_bytes(path, c.bytes);
    Needles n = c.needles;
    n.push_back(path);
    expect_error([&] { SafetensorsFile f(path); }, n, ErrorKind::kFormat);
  }
  expect_error([&] { SafetensorsFile f(tmp / "nope.safetensors"); },
               {tmp / "nope.safetensors", "cannot open"}, ErrorKind::kIo);
  expect_error([&] { SafetensorsFile f(tmp.path()); }, {tmp.path(), "is a directory"},
               ErrorKind::kIo);
}

TEST(Robustness, ShardIndexErrors) {
  TempDir tmp;
  auto index = [&](const std::string& dir, const std::string& text) {
    make_checkpoint(dir, kFixture, nullptr);
    write_text_file(dir + "/model.safetensors.index.json", text);
  };
  index(tmp / "a", R"({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})");
  expect_cli_error(fmt::format("convert -q {} {}", tmp / "a", tmp / "out"),
                   {tmp / "a/model-00002-of-00002.safetensors", "cannot open"});
  index(tmp / "b", R"({"weight_map": [}})");
  expect_cli_error(fmt::format("convert -q {} {}", tmp / "b", tmp / "out"),
                   {"model.safetensors.index.json", "invalid JSON"});
  index(tmp / "c", R"({"weight_map": {"model.norm.weight": "../../etc/passwd"}})");
  expect_cli_error(fmt::format("convert -q {} {}", tmp / "c", tmp / "out"),
                   {"model.safetensors.index.json", "weight_map['model.norm.weight']",
                    "not a plain file name"});
}

// ---------------------------------------------------------------------------------------------
// 5. config.json

TEST(Robustness, ConfigErrorsNameTheField) {
  TempDir tmp;
  struct Case {
    std::string fixture;
    std::function<void(json&)> edit;
    Needles needles;
  };
  const std::vector<Case> cases = {
      {kFixture, [](json& c) { c.erase("hidden_size"); }, {"missing field 'hidden_size'"}},
      {kFixture, [](json& c) { c["hidden_size"] = "64"; },
       {"field 'hidden_size' must be an integer, got \"64\""}},
      {kFixture, [](json& c) { c["num_experts_per_tok"] = 2.5; },
       {"field 'num_experts_per_tok' must be an integer, got 2.5"}},
      {kFixture, [](json& c) { c["rms_norm_eps"] = "tiny"; },
       {"field 'rms_norm_eps' must be a number"}},
      {kFixture, [](json& c) { c["tie_word_embeddings"] = "no"; },
       {"field 'tie_word_embeddings' must be true or false"}},
      {kFixture, [](json& c) { c["vocab_size"] = -3; }, {"field 'vocab_size' = -3 is out of range"}},
      {kFixture, [](json& c) { c["num_key_value_heads"] = 3; },
       {"field 'num_key_value_heads'", "3 does not divide num_attention_heads 4"}},
      {kFixture, [](json& c) { c["num_experts_per_tok"] = 17; },
       {"field 'num_experts_per_tok'", "17 must be in [1, num_experts=16]"}},
      {kFixture, [](json& c) { c["eos_token_id"] = 5000; },
       {"field 'eos_token_id'", "5000 is outside the vocabulary [0, 1024)"}},
      {kFixture, [](json& c) { c["rope_parameters"]["rope_type"] = "yarn"; },
       {"rope_type 'yarn' is not supported"}},
      {kFixture, [](json& c) { c["hidden_act"] = "gelu"; }, {"hidden_act 'gelu' is not supported"}},
      {kFixture, [](json& c) { c["eos_token_id"] = json::array({1, "two"}); },
       {"field 'eos_token_id' must hold token ids, got \"two\""}},
      {"qwen3_5_moe", [](json& c) { c["layer_types"].erase(7); },
       {"field 'layer_types' must list 8 layer kinds", "got 7 entries"}},
      {"qwen3_5_moe", [](json& c) { c["layer_types"][1] = "sliding_attention"; },
       {"layer_types[1] = \"sliding_attention\" is not supported"}},
      {"qwen3_5_moe", [](json& c) { c["linear_num_value_heads"] = 3; },
       {"field 'linear_num_value_heads'", "is not a multiple of linear_num_key_heads"}},
      {"qwen3_5_moe_vl", [](json& c) { c["text_config"] = "oops"; },
       {"field 'text_config' must be an object"}},
  };
  for (size_t i = 0; i < cases.size(); i++) {
    const std::string dir = tmp / fmt::format("ck{}", i);
    make_checkpoint(dir, cases[i].fixture, cases[i].edit);
    Needles n = cases[i].needles;
    n.push_back(dir + "/config.json");
    expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"), n);
  }
  // Malformed JSON names the file and the byte.
  const std::string dir = make_checkpoint(tmp / "bad", kFixture, nullptr);
  fs::remove(dir + "/config.json");
  write_text_file(dir + "/config.json", "{\"model_type\": \"qwen3_moe\",\n \"hidden_size\": 64,,}");
  expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"),
                   {dir + "/config.json", "invalid JSON at byte 48"});
  // A number beyond double range is malformed JSON too (nlohmann throws out_of_range for it).
  std::string text = read_text_file(fixture_dir(kFixture) + "/config.json");
  text.replace(text.find("1000000.0"), 9, "1e400");
  write_text_file(dir + "/config.json", text);
  expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"),
                   {dir + "/config.json", "invalid JSON", "number overflow"});
  fs::remove(dir + "/config.json");
  expect_cli_error(fmt::format("convert -q {} {}", dir, tmp / "out"),
                   {dir + "/config.json", "cannot open"});
}

// ---------------------------------------------------------------------------------------------
// 6-7. Packages: truncated, missing and corrupted files

// Sizes of the converted fixture package, as its manifest states them.
json fixture_manifest() {
  return json::parse(read_text_file(manifest_path(converted_fixture(kFixture))));
}

TEST(Robustness, TruncatedPackageNamesTheFile) {
  TempDir tmp;
  const json man = fixture_manifest();
  const uint64_t resident_bytes = man["resident"]["bytes"];
  const uint64_t layer_bytes = man["experts"]["stride"].get<uint64_t>() * man["experts"]["count"].get<uint64_t>();
  const std::string a = make_package(tmp / "a");
  truncate_file(resident_path(a), 100000);
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2", a),
                   {resident_path(a), fmt::format("is 100000 bytes, manifest says {}", resident_bytes),
                    "truncated"});

  const std::string b = make_package(tmp / "b");
  truncate_file(expert_file_path(b, 2), layer_bytes - 1);
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2", b),
                   {expert_file_path(b, 2),
                    fmt::format("is {} bytes, expected {}", layer_bytes - 1, layer_bytes),
                    "truncated?"});

  const std::string c = make_package(tmp / "c");
  fs::remove(expert_file_path(c, 3));
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2", c),
                   {expert_file_path(c, 3), "missing package file"});

  const std::string d = make_package(tmp / "d");
  fs::remove(manifest_path(d));
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2", d),
                   {d, "not a moeflux package (no moeflux.json)"});
  expect_cli_error(fmt::format("inspect {}", tmp / "none"), {tmp / "none", "not a moeflux package"});
}

// A resident.bin of random bytes passes every size check; the forward pass must stop at the
// first layer whose output is NaN/Inf and say so (it used to print NaN logits and exit 0).
TEST(Robustness, RandomResidentWeightsAreANumericError) {
  TempDir tmp;
  const std::string dir = make_package(tmp / "r");
  const uint64_t n = fs::file_size(resident_path(dir));
  std::mt19937_64 rng(18);
  std::string bytes(n, '\0');
  for (uint64_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(bytes.data() + i, &v, std::min<uint64_t>(8, n - i));
  }
  write_bytes(resident_path(dir), bytes);
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2,3", dir),
                   {"produced NaN/Inf at position", "package resident weights corrupt?"});
  auto model = Model::load(dir);
  ExpertStore store(*model, ExpertStoreOptions{});
  auto be = make_cpu_context(1);
  Session s(*model, *be, store);
  const std::vector<int32_t> toks = {1, 2, 3};
  expect_error([&] { s.eval(toks.data(), 3, nullptr, false); },
               {"layer ", "produced NaN/Inf at position "}, ErrorKind::kNumeric);
}

// Thread counts: more than 4x the cores is refused by every front door (it used to start
// 10,000 threads whose spin-waits livelocked the machine).
TEST(Robustness, AbsurdThreadCountsAreRefused) {
  expect_error([] { ThreadPool p(100000); }, {"threads = 100000 is more than", "cores"},
               ErrorKind::kInvalidArgument);
  expect_error([] { make_cpu_context(max_threads() + 1); }, {"is more than"},
               ErrorKind::kInvalidArgument);
  EXPECT_EQ(resolve_threads(max_threads(), "t"), max_threads());
  EXPECT_GE(resolve_threads(0, "t"), 1);
}

TEST(Robustness, CorruptedManifestNamesTheField) {
  TempDir tmp;
  const json man = fixture_manifest();
  const uint64_t resident_bytes = man["resident"]["bytes"], record = man["experts"]["bytes"];
  const uint64_t up_bytes = man["experts"]["parts"][1]["nbytes"];
  const std::string v_dtype = resident_entry(man, "blk.0.attn_v")["dtype"];
  const uint64_t v_bytes = resident_entry(man, "blk.0.attn_v")["nbytes"];
  struct Case {
    std::function<void(json&)> edit;
    Needles needles;
  };
  const std::vector<Case> cases = {
      {[](json& m) { m["format_version"] = 99; }, {"package format version 99", "reads 1"}},
      {[](json& m) { m["format_version"] = "1"; },
       {"field 'format_version' must be a non-negative integer, got \"1\""}},
      {[](json& m) { m["format"] = "gguf"; }, {"not a moeflux manifest", "'format'"}},
      {[](json& m) { m["model"]["hidden_size"] = "64"; },
       {"model field 'hidden_size' must be an integer, got \"64\""}},
      {[](json& m) { m["model"].erase("vocab_size"); }, {"model field 'vocab_size' is missing"}},
      {[](json& m) { m["model"]["attn"][2] = "sliding"; },
       {"model field 'attn' has unknown kind \"sliding\""}},
      {[](json& m) { m["model"]["n_kv_heads"] = 3; },
       {"model.n_kv_heads = 3 does not divide model.n_heads = 4"}},
      // Impossible values name moeflux.json's own fields, not the HF config's.
      {[](json& m) { m["model"]["arch"] = "llama"; },
       {"model.arch = \"llama\" is not a known arch (qwen3_5_moe, qwen3_next, qwen3_moe, "
        "mixtral, deepseek_v3, glm4_moe, gpt_oss)"}},
      {[](json& m) { m["model"]["ctx_train"] = 0; }, {"model.ctx_train = 0 must be > 0"}},
      {[](json& m) { m["model"]["hidden_size"] = -1; }, {"model.hidden_size = -1 must be > 0"}},
      {[](json& m) { m["model"]["top_k"] = 17; },
       {"model.top_k = 17 must be in [1, model.n_experts = 16]"}},
      {[](json& m) { m["model"]["rope_dim"] = 3; }, {"model.rope_dim = 3", "must be even"}},
      {[](json& m) { m["model"]["bos_id"] = 1 << 30; }, {"model.bos_id = 1073741824"}},
      {[](json& m) { m["resident"]["tensors"] = 5; }, {"resident.tensors must be an array"}},
      {[&](json& m) { resident_entry(m, "blk.1.attn_k")["offset"] = resident_bytes; },
       {"resident tensor 'blk.1.attn_k'",
        fmt::format("runs past resident.bin ({} bytes)", resident_bytes)}},
      // offset + nbytes wraps around 2^64: must still be caught.
      {[](json& m) { resident_entry(m, "blk.1.attn_k")["offset"] = uint64_t(0) - 4096; },
       {"resident tensor 'blk.1.attn_k'", "runs past resident.bin"}},
      {[](json& m) { resident_entry(m, "blk.1.attn_k")["offset"] = 4097; },
       {"resident tensor 'blk.1.attn_k' offset 4097 is not 4096-byte aligned"}},
      {[](json& m) {
         resident_entry(m, "blk.1.attn_k")["offset"] = resident_entry(m, "blk.1.attn_q")["offset"];
       },
       {"overlap", "'blk.1.attn_k'", "'blk.1.attn_q'"}},
      {[](json& m) { resident_entry(m, "blk.0.attn_v")["nbytes"] = 100; },
       {"tensor 'blk.0.attn_v'",
        fmt::format("{} x [64, 64] needs {} bytes, manifest says 100", v_dtype, v_bytes)}},
      {[](json& m) { resident_entry(m, "blk.0.attn_v")["dtype"] = "i32"; },
       {"tensor 'blk.0.attn_v'", "unsupported dtype 'i32'"}},
      {[](json& m) {
         resident_entry(m, "blk.0.attn_v")["shape"] = {64, -64};
       },
       {"tensor 'blk.0.attn_v'", "bad dimension -64 in shape"}},
      {[](json& m) {
         resident_entry(m, "blk.0.attn_v")["shape"] = {65536, 65536, 65536, 65536};
       },
       {"tensor 'blk.0.attn_v'", "implausibly large"}},
      {[](json& m) { resident_entry(m, "blk.0.attn_v")["name"] = "blk.0.attn_k"; },
       {"'blk.0.attn_k' listed twice"}},
      // Shapes that disagree with the model spec: found when binding, expected vs actual.
      {[](json& m) {
         resident_entry(m, "embed")["shape"] = {64, 1024};
       },
       {"tensor 'embed' has shape [64, 1024], expected [1024, 64]"}},
      {[](json& m) {
         resident_entry(m, "blk.2.attn_o")["shape"] = {128, 64};
       },
       {"tensor 'blk.2.attn_o' has shape [128, 64], expected [64, 128]"}},
      {[](json& m) {
         json& t = resident_entry(m, "blk.3.ffn_norm");  // f32 [64] -> bf16 [64]
         t["dtype"] = "bf16";
         t["nbytes"] = 128;
       },
       {"tensor 'blk.3.ffn_norm' has dtype bf16, expected f32"}},
      {[](json& m) {
         auto& ts = m["resident"]["tensors"];
         for (size_t i = 0; i < ts.size(); i++)
           if (ts[i]["name"] == "blk.2.attn_k") ts.erase(i);
       },
       {"missing tensor 'blk.2.attn_k'"}},
      {[](json& m) {
         m["experts"]["parts"][2]["shape"] = {32, 64};
       },
       {"expert part 2 is 'down' [32, 64], expected 'down' [64, 32]"}},
      {[&](json& m) { m["experts"]["parts"][1]["offset"] = record - up_bytes + 64; },
       {"expert part 'up'", fmt::format("outside the {}-byte record", record)}},
      {[](json& m) { m["experts"]["count"] = 8; }, {"experts.count 8 != model n_experts 16"}},
      {[&](json& m) { m["experts"]["stride"] = record + 100; },
       {fmt::format("experts.stride {}", record + 100)}},
      {[](json& m) {
         m["experts"]["layers"] = {0, 1, 3};
       },
       {"experts.layers [0, 1, 3] does not match the MoE layers [0, 1, 2, 3]"}},
      {[](json& m) {
         m["experts"]["layers"] = {0, 1, 2, 9};
       },
       {"experts.layers entry 9 is not a layer index"}},
  };
  for (size_t i = 0; i < cases.size(); i++) {
    const std::string dir = make_package(tmp / fmt::format("p{}", i), cases[i].edit);
    Needles n = cases[i].needles;
    n.push_back(manifest_path(dir));
    expect_cli_error(fmt::format("eval -m {} --tokens 1,2", dir), n);
  }
  const std::string dir = make_package(tmp / "bad");
  write_text_file(manifest_path(dir), R"({"format": "moeflux", "format_version": 1,)");
  expect_cli_error(fmt::format("inspect {}", dir), {manifest_path(dir), "invalid JSON at byte"});
  write_text_file(manifest_path(dir), R"({"format": "moeflux", "format_version": 1e400})");
  expect_cli_error(fmt::format("inspect {}", dir), {manifest_path(dir), "invalid JSON"});
}

// The pre-parse scan: depth counts [ and { outside strings (escaped quotes stay inside); the
// brief quote stops at 40 characters whatever the value's size.
TEST(Robustness, JsonLimitScan) {
  const JsonLimits lim{3, 1000};
  EXPECT_EQ(json_limit_violation(R"([[[1]]])", lim), "");
  EXPECT_NE(json_limit_violation(R"([[[[1]]]])", lim).find("deeper than 3 levels"),
            std::string::npos);
  EXPECT_EQ(json_limit_violation(R"(["[[[[\"[[[[", {"a": "{{{{"}])", lim), "");
  EXPECT_NE(json_limit_violation(std::string(1001, ' '), lim).find("1000 bytes"),
            std::string::npos);
  EXPECT_EQ(json_brief(json::parse(R"({"a": [1, 2]})")), R"({"a":[1,2]})");
  const std::string b = json_brief(json(std::vector<int>(100000, 7)));
  EXPECT_LT(b.size(), 50u) << b;
  EXPECT_TRUE(b.ends_with("…")) << b;
  EXPECT_EQ(quote_brief(std::string(50, 'x')), "\"" + std::string(40, 'x') + "\"…");
}

// Hostile JSON in the files we read: nested 100,000 deep (once a stack overflow, in printing the
// value into the error), refused before parsing, naming the file and the limit; a bad value nested
// within the limit is quoted in an error as a short prefix, not whole.
TEST(Robustness, DeeplyNestedJsonNamesFileAndLimit) {
  TempDir tmp;
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string limit = "nested deeper than 128 levels";

  const std::string pkg = make_package(tmp / "pkg");
  write_bytes(manifest_path(pkg), R"({"format": "moeflux", "format_version": )" + deep + "}");
  expect_cli_error(fmt::format("inspect {}", pkg), {manifest_path(pkg), limit});

  const std::string ckpt = make_checkpoint(tmp / "ckpt", kFixture, nullptr);
  fs::remove(ckpt + "/config.json");
  write_bytes(ckpt + "/config.json", R"({"model_type": "qwen3_moe", "hidden_size": )" + deep + "}");
  expect_cli_error(fmt::format("convert -q {} {}", ckpt, tmp / "out"),
                   {ckpt + "/config.json", limit});

  const std::string tj = tmp / "tokenizer.json";
  write_bytes(tj, R"({"model": {"type": "BPE", "vocab": )" + deep + "}}");
  expect_error([&] { Tokenizer::load(tj); }, {tj, limit}, ErrorKind::kFormat);

  const std::string tc = tmp / "tokenizer_config.json";
  write_bytes(tc, R"({"chat_template": )" + deep + "}");
  expect_error([&] { ChatTemplate::from_tokenizer_config(tc); }, {tc, limit}, ErrorKind::kFormat);

  // Within the limit, a wrong value is quoted by its first 40 characters.
  const std::string wide = std::string(100, '[') + std::string(100, ']');
  const std::string q = make_package(tmp / "q", [&](json& m) {
    m["model"]["vocab_size"] = json::parse(wide);
  });
  const CliResult r = run_cli(fmt::format("inspect {}", q));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("vocab_size"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("[[[[…"), std::string::npos) << r.err;
  EXPECT_LT(r.err.size(), 400u) << r.err;
}

// ---------------------------------------------------------------------------------------------
// 8-9. Token lists and flags

TEST(Robustness, TokenErrorsNameIdAndPosition) {
  const std::string& pkg = converted_fixture(kFixture);
  auto ev = [&](const std::string& tokens) { return fmt::format("eval -m {} --tokens={}", pkg, tokens); };
  expect_cli_error(ev("-5,1,2"), {"token id -5 at position 0", "out of range [0, 1024)"});
  expect_cli_error(ev("1,2,1024"), {"token id 1024 at position 2", "out of range [0, 1024)"});
  expect_cli_error(ev("1,2,3,2147483647"), {"token id 2147483647 at position 3"});
  expect_cli_error(ev("1,x,3"), {"--tokens", "'x' at position 1 is not a token id"});
  expect_cli_error(ev("1,2,3.5"), {"--tokens", "'3.5' at position 2 is not a token id"});
  expect_cli_error(ev("1,99999999999"), {"--tokens", "'99999999999' at position 1"});
  expect_cli_error(ev("1,,3"), {"--tokens", "empty item at position 1"});
  expect_cli_error(ev("1,2,"), {"--tokens", "empty item at position 2"});
  expect_cli_error(ev("' '"), {"--tokens", "empty item at position 0"});
  // Library: the same check, before any state changes.
  auto model = Model::load(pkg);
  auto be = make_cpu_context(1);
  ExpertStore store(*model);
  Session s(*model, *be, store);
  const std::vector<int32_t> bad = {3, 4, -1};
  expect_error([&] { s.eval(bad.data(), 3, nullptr, false); }, {"token id -1 at position 2"},
               ErrorKind::kInvalidArgument);
  EXPECT_EQ(s.pos(), 0);
  expect_error([&] { s.eval(bad.data(), 0, nullptr, false); }, {"no tokens"},
               ErrorKind::kInvalidArgument);
}

TEST(Robustness, FlagErrors) {
  TempDir tmp;
  const std::string& pkg = converted_fixture(kFixture);
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2 --dump-hidden", pkg),
                   {"--dump-hidden needs --dump-logits"});
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2,3,4,5 --ctx 3", pkg),
                   {"--ctx 3 is too small", "5 prompt tokens"});
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2 --greedy 4 --ctx 4", pkg),
                   {"--ctx 4 is too small", "need 5 positions"});
  EXPECT_EQ(run_cli(fmt::format("eval -m {} --tokens 1,2 --greedy 4 --ctx 5", pkg)).code, 0);
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2 --ctx -5", pkg), {"--ctx: -5 is negative"});
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2 --threads -2", pkg),
                   {"--threads: -2 is negative"});
  expect_cli_error(fmt::format("eval -m {} --tokens 1,2 --dump-logits {}", pkg, tmp / "no/such/x"),
                   {tmp / "no/such/x", "directory", "does not exist"});
  expect_cli_error(fmt::format("convert -q {} {} --dtype q3", fixture_dir(kFixture), tmp / "o"),
                   {"--dtype: 'q3'"});
  // Library: a full context is refused before any state changes.
  auto model = Model::load(pkg);
  auto be = make_cpu_context(1);
  ExpertStore store(*model);
  Session s(*model, *be, store, [] { SessionParams p; p.ctx = 4; return p; }());
  const std::vector<int32_t> toks = {1, 2, 3};
  s.eval(toks.data(), 3, nullptr, false);
  expect_error([&] { s.eval(toks.data(), 2, nullptr, false); },
               {"2 tokens at position 3 exceed the context of 4 positions"},
               ErrorKind::kInvalidArgument);
  EXPECT_EQ(s.pos(), 3);
}

// ---------------------------------------------------------------------------------------------
// 10. Files that change under a loaded model; memory that cannot be had

TEST(Robustness, ExpertFileShrinksAfterLoad) {
  TempDir tmp;
  const std::string dir = make_package(tmp / "p");
  auto model = Model::load(dir);
  auto be = make_cpu_context(1);
  ExpertStore store(*model);
  Session s(*model, *be, store);
  // Inside expert 0 of MoE layer 1, so every expert of that layer is cut short: the error names
  // whichever of the routed ones a reader finished first.
  truncate_file(expert_file_path(dir, 1), 100);
  const std::vector<int32_t> toks = {5, 6, 7};
  std::vector<float> logits(1024);
  expect_error([&] { s.eval(toks.data(), 3, logits.data(), false); },
               {" of layer 1", expert_file_path(dir, 1), "unexpected end of file", "truncated?"},
               ErrorKind::kIo);
  // The session refuses again (same error), it does not go on with half-read experts.
  s.clear();
  expect_error([&] { s.eval(toks.data(), 3, logits.data(), false); }, {expert_file_path(dir, 1)});
  // A removed file is still readable through the open descriptor; a fresh load names it.
  fs::remove(expert_file_path(dir, 1));
  expect_error([&] { Model::load(dir); }, {expert_file_path(dir, 1), "missing package file"});
}

TEST(Robustness, OutOfMemoryIsAnError) {
#ifdef MF_TEST_ASAN
  GTEST_SKIP() << "AddressSanitizer aborts on impossible allocations";
#else
  auto be = make_cpu_context(1);
  expect_error([&] { be->alloc(size_t(1) << 60); }, {"out of memory"}, ErrorKind::kOutOfMemory);
  // A context that cannot be allocated: an error, not a crash (before the fix: SIGSEGV).
  const CliResult r = run_cli(
      fmt::format("eval -m {} --tokens 1,2 --ctx 2000000000", converted_fixture(kFixture)));
  if (r.code != 0) {  // with overcommit the allocation may succeed; then it must simply work
    EXPECT_EQ(r.code, 1) << r.err;
    check_message(r.err.substr(0, r.err.size() - 1), {"out of memory"});
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Mutation fuzz of the parsers: fixed seeds, every input must either parse or throw
// moeflux::Error (not kInternal) naming the file; never crash, hang or throw anything else.

const std::vector<std::string> kTokens = {
    "{", "}", "[", "]", "\"", ",", ":", "0", "1", "-1", "1.5", "-0", "1e400", "4096", "12288",
    "4294967296", "18446744073709551615", "18446744073709551616", "9223372036854775807", "null",
    "true", "false", "\"\"", "[]", "{}", "\"F32\"", "\"BF16\"", "\"F16\"", "\"I64\"", "\"BOOL\"",
    "\"U8\"", "\"F64\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"__metadata__\"",
    "\"f32\"", "\"bf16\"", "\"q4\"", "\"full\"", "\"linear\"", "\"moe\"", "\"dense\"", "\"name\"",
    "\"offset\"", "\"nbytes\"", "\\u0000", "\xff", std::string(1, '\0'), " "};

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}
  size_t below(size_t n) { return n ? size_t(rng_() % n) : 0; }
  bool chance(int percent) { return below(100) < size_t(percent); }
  const std::string& token() { return kTokens[below(kTokens.size())]; }

  // Byte-level edits of a text: bit flips, token insert/replace, delete, splice, truncate.
  void mutate_text(std::string& s) {
    switch (below(6)) {
      case 0:
        for (size_t n = 1 + below(8); n-- && !s.empty();) s[below(s.size())] ^= char(1 << below(8));
        break;
      case 1: s.insert(below(s.size() + 1), token()); break;
      case 2: {
        size_t p = below(s.size() + 1);
        s.replace(p, below(8), token());
        break;
      }
      case 3: {
        size_t p = below(s.size() + 1);
        s.erase(p, 1 + below(16));
        break;
      }
      case 4: {  // copy a piece of the text elsewhere (repeats keys, nests objects)
        size_t p = below(s.size() + 1), n = below(64);
        std::string piece = s.substr(p, n);
        s.insert(below(s.size() + 1), piece);
        break;
      }
      case 5:
        if (!s.empty()) s.resize(below(s.size()));
        break;
    }
  }

  // A number in the text replaced by an interesting one (targets offsets, sizes, shapes).
  void mutate_number(std::string& s) {
    std::vector<size_t> starts;
    for (size_t i = 0; i < s.size(); i++)
      if (isdigit(uint8_t(s[i])) && (i == 0 || !isdigit(uint8_t(s[i - 1])))) starts.push_back(i);
    if (starts.empty()) return;
    size_t p = starts[below(starts.size())], e = p;
    while (e < s.size() && isdigit(uint8_t(s[e]))) e++;
    static const char* kNums[] = {"0", "1", "2", "3", "4", "7", "8", "15", "16", "-1", "63", "64",
                                  "65", "4095", "4096", "4097", "1.0", "1e9", "2147483647",
                                  "2147483648", "4294967295", "4294967296",
                                  "18446744073709547520", "18446744073709551615",
                                  "18446744073709551616", "9223372036854775808"};
    std::string n = chance(30) ? std::to_string(below(100000)) : kNums[below(std::size(kNums))];
    s.replace(p, e - p, n);
  }

  // Structured edit of a parsed JSON document: a random leaf set to an interesting value, or a
  // random member/element removed.
  void mutate_json(json& j) {
    const json flat = j.flatten();
    if (flat.empty()) return;
    auto it = flat.begin();
    std::advance(it, long(below(flat.size())));
    json::json_pointer ptr(it.key());
    if (chance(15) && !ptr.empty()) {
      json& parent = j[ptr.parent_pointer()];
      const std::string last = ptr.back();
      if (parent.is_object()) parent.erase(last);
      else if (parent.is_array() && !parent.empty()) parent.erase(size_t(std::stoul(last)) % parent.size());
      return;
    }
    static const json kValues = json::parse(R"([0, 1, 2, 3, -1, -2, 4095, 4096, 4097, 12288,
        2147483647, 2147483648, 4294967296, 9223372036854775807, 18446744073709547520,
        18446744073709551615, -9223372036854775808, 0.5, 1.5, 1e300, -1e300, 1e-300, "", "x",
        "f32", "bf16", "f16", "q4", "full", "linear", "moe", "dense", "gate", "up", "down", null,
        true, false, [], {}, [0], [64, 64], [1024, 64], {"a": 1}])");
    json v;
    switch (below(3)) {
      case 0: v = kValues[below(kValues.size())]; break;
      case 1: v = int64_t(below(70000)) - 100; break;
      case 2: {  // another leaf's value
        auto o = flat.begin();
        std::advance(o, long(below(flat.size())));
        v = o.value();
        break;
      }
    }
    j[ptr] = v;
  }

 private:
  std::mt19937_64 rng_;
};

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; i++) s[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return s;
}

TEST(RobustnessFuzz, SafetensorsMutations) {
  TempDir tmp;
  const std::string path = tmp / "f.safetensors";
  {
    std::vector<float> a(6, 1.5f);
    std::vector<uint16_t> b(4, 0x3f80);
    std::vector<int32_t> c = {7, -7};
    write_safetensors(path, {{"a", DType::kF32, {2, 3}, a.data()},
                             {"b.weight", DType::kBF16, {4}, b.data()},
                             {"c", DType::kI32, {2}, c.data()},
                             {"empty", DType::kF16, {0, 5}, nullptr}},
                      {{"format", "pt"}});
  }
  const std::string base = read_text_file(path);
  uint64_t base_len = 0;
  for (int i = 0; i < 8; i++) base_len |= uint64_t(uint8_t(base[size_t(i)])) << (8 * i);
  const std::string base_header = base.substr(8, base_len), base_data = base.substr(8 + base_len);

  const auto t0 = std::chrono::steady_clock::now();
  int parsed = 0, rejected = 0;
  volatile uint8_t sink = 0;
  constexpr int kIters = 4000;
  for (int it = 0; it < kIters; it++) {
    Mutator m(0x5afe7e25u + uint64_t(it));
    std::string header = base_header, data = base_data, bytes;
    const int kind = int(m.below(10));
    if (kind < 6) {  // header text edits, length word rewritten (mostly) to match
      for (size_t n = 1 + m.below(3); n--;) {
        if (m.chance(40)) m.mutate_number(header);
        else m.mutate_text(header);
      }
      bytes = le64(m.chance(85) ? header.size() : base_len) + header + data;
    } else if (kind < 8) {  // raw bit flips and truncations anywhere
      bytes = base;
      for (size_t n = 1 + m.below(3); n--;) {
        if (m.chance(70)) {
          if (!bytes.empty()) bytes[m.below(bytes.size())] ^= char(1 << m.below(8));
        } else {
          bytes.resize(m.below(bytes.size() + 1));
        }
      }
    } else {  // random header length word
      static const uint64_t kLens[] = {0, 1, 2, 7, 8, uint64_t(1) << 32, uint64_t(1) << 63,
                                       ~uint64_t(0), (100u << 20) + 1};
      uint64_t len = m.chance(50) ? kLens[m.below(std::size(kLens))]
                                  : base_len + m.below(64) - 32;
      bytes = le64(len) + header + data;
    }
    write_bytes(path, bytes);
    try {
      SafetensorsFile f(path);
      for (const auto& [name, t] : f.tensors()) {
        ASSERT_EQ(t.nbytes, uint64_t(t.numel()) * dtype_size(t.dtype)) << name;
        uint8_t sum = 0;  // every byte of every tensor must be readable
        for (uint64_t i = 0; i < t.nbytes; i++) sum ^= t.data[i];
        sink = sum;
      }
      parsed++;
    } catch (const Error& e) {
      rejected++;
      ASSERT_NE(e.kind(), ErrorKind::kInternal) << "iteration " << it << ": " << e.what();
      ASSERT_NE(std::string(e.what()).find(path), std::string::npos)
          << "iteration " << it << ": error does not name the file: " << e.what();
      ASSERT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << ": threw " << typeid(e).name() << ": " << e.what();
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("parsed", parsed);
  RecordProperty("rejected", rejected);
  RecordProperty("checksum", int(sink));
  RecordProperty("seconds", fmt::format("{:.1f}", secs));
  EXPECT_GT(parsed, 0);
  EXPECT_GT(rejected, kIters / 2);
  // No time bound: whether an input makes the parser slow is fuzz_safetensors' question
  // (scripts/fuzz.sh fails on an input slower than 60 s); a wall-clock bound here would depend
  // on the machine's load. The seconds are recorded above.
}

TEST(RobustnessFuzz, ManifestMutations) {
  TempDir tmp;
  const std::string dir = make_package(tmp / "p");
  const std::string base_text = read_text_file(manifest_path(dir));
  const json base = json::parse(base_text);
  auto be = make_cpu_context(1);
  const std::vector<int32_t> toks = {3, 1, 4};
  std::vector<float> logits(size_t(3) * 4096);

  const auto t0 = std::chrono::steady_clock::now();
  int loaded = 0, evaluated = 0, rejected = 0;
  constexpr int kIters = 2500;
  for (int it = 0; it < kIters; it++) {
    Mutator m(0x3a41f357u + uint64_t(it));
    std::string text;
    if (m.chance(60)) {  // structured: 1-3 edits of parsed JSON
      json j = base;
      for (size_t n = 1 + m.below(3); n--;) m.mutate_json(j);
      text = j.dump(m.chance(50) ? 1 : -1);
    } else {  // textual
      text = m.chance(50) ? base_text : base.dump();
      for (size_t n = 1 + m.below(3); n--;) {
        if (m.chance(40)) m.mutate_number(text);
        else m.mutate_text(text);
      }
    }
    write_bytes(manifest_path(dir), text);
    try {
      auto model = Model::load(dir);
      loaded++;
      ExpertStore store(*model);
      Session s(*model, *be, store, [] { SessionParams p; p.ctx = 8; return p; }());
      const int V = model->spec().vocab_size;
      std::vector<int32_t> t = toks;
      for (auto& x : t) x %= V;
      if (size_t(V) * 3 > logits.size()) logits.resize(size_t(V) * 3);
      s.eval(t.data(), 3, logits.data(), true);
      evaluated++;
    } catch (const Error& e) {
      rejected++;
      ASSERT_NE(e.kind(), ErrorKind::kInternal) << "iteration " << it << ": " << e.what();
      ASSERT_NE(std::string(e.what()).find(dir), std::string::npos)
          << "iteration " << it << ": error does not name the package: " << e.what();
      ASSERT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << ": threw " << typeid(e).name() << ": " << e.what()
             << "\nmanifest:\n" << text;
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("loaded", loaded);
  RecordProperty("evaluated", evaluated);
  RecordProperty("rejected", rejected);
  RecordProperty("seconds", fmt::format("{:.1f}", secs));
  EXPECT_GT(evaluated, 0);
  EXPECT_GT(rejected, kIters / 2);
  // As above: slowness is fuzz_manifest's question, not a wall-clock bound's.
}

}  // namespace
}  // namespace moeflux::test
