// The demo model (tests/data/demo: the HF checkpoint trained by tools/train_demo.py; models/demo:
// its q4 package, the built-in default) against what Hugging Face computed for it on the GPU
// machine (tests/data/demo/hf_reference.json): the tokenizer gives HF's ids for the validation
// text, and the engine's perplexity equals HF's.
#include <nlohmann/json.hpp>

#include <cmath>
#include <regex>

#include "test_util.h"
#include "text/tokenizer.h"

namespace moeflux::test {
namespace {

const std::string kDemo = "demo";

nlohmann::json hf_reference() {
  return nlohmann::json::parse(read_file(fixture_dir(kDemo) + "/hf_reference.json"));
}

TEST(Demo, TokenizerGivesHfIdsOnTheValidationText) {
  const nlohmann::json ref = hf_reference();
  const std::string text = read_file(fixture_dir(kDemo) + "/valid.txt");
  ASSERT_EQ(sha256_hex(text.data(), text.size()), ref["valid_sha256"].get<std::string>());
  const Tokenizer tok = Tokenizer::load(fixture_dir(kDemo) + "/tokenizer.json");
  const std::vector<int32_t> ids = tok.encode(text, false);
  EXPECT_EQ(ids.size(), ref["valid_tokens"].get<size_t>());
  // HF's sha256 over the ids as little-endian int32 (this machine is little-endian).
  const std::string want = ref["valid_token_ids_sha256"].get<std::string>().substr(0, 64);
  EXPECT_EQ(sha256_hex(ids.data(), ids.size() * sizeof(int32_t)), want);
  EXPECT_EQ(tok.decode(ids), text);
}

// `moeflux perplexity` on the unquantised package, windows of 512, against HF's per-window NLL
// sums over the same windows.
TEST(Demo, PerplexityEqualsHf) {
  const nlohmann::json ref = hf_reference();
  const nlohmann::json* r512 = nullptr;
  for (const auto& r : ref["results"])
    if (r["ctx"] == 512) r512 = &r;
  ASSERT_NE(r512, nullptr);
  const auto sums = (*r512)["window_nll_sums"].get<std::vector<double>>();
  const int per_window = (*r512)["scored_per_window"].get<int>();
#ifdef MF_TEST_ASAN
  const int windows = 6;  // the whole text takes minutes under ASan
#else
  const int windows = int(sums.size());
#endif
  double hf_sum = 0;
  for (int w = 0; w < windows; w++) hf_sum += sums[size_t(w)];
  const double hf_nll = hf_sum / (double(windows) * per_window);
  if (windows == int(sums.size())) {
    EXPECT_NEAR(hf_nll, (*r512)["mean_nll"].get<double>(), 1e-9);
  }

  const CliResult r = run_cli(fmt::format("perplexity -m {} -f {}/valid.txt --ctx 512 --chunks {}",
                                          converted_fixture(kDemo), fixture_dir(kDemo), windows));
  ASSERT_EQ(r.code, 0) << r.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(ppl = ([0-9.]+) \+/- ([0-9.]+) .*mean NLL ([0-9.]+))")))
      << r.out;
  const double ppl = std::stod(m[1]), nll = std::stod(m[3]);
  // The issue's bar is 0.5% of the perplexity; the engine is far inside it, so hold it to
  // 1e-4 in the mean NLL (0.01% of the perplexity), which a real numeric regression crosses.
  EXPECT_LT(std::abs(ppl / std::exp(hf_nll) - 1.0), 0.005);
  EXPECT_NEAR(nll, hf_nll, 1e-4);
  EXPECT_NE(r.out.find(fmt::format("{} windows of 512, {} tokens scored", windows, windows * per_window)),
            std::string::npos)
      << r.out;
}

// models/demo is what `convert --quant q4` makes of the checkpoint (it cannot go stale).
TEST(Demo, ShippedPackageIsTheQ4ConversionOfTheCheckpoint) {
  TempDir tmp;
  ConvertOptions opt;
  opt.progress = false;
  opt.quant = quant_recipe("q4");
  convert_checkpoint(fixture_dir(kDemo), tmp / "q4", opt);
  const std::string shipped = std::string(MOEFLUX_SOURCE_DIR) + "/models/demo";
  for (const auto& e : std::filesystem::recursive_directory_iterator(tmp.path())) {
    if (!e.is_regular_file()) continue;
    const std::string rel = std::filesystem::relative(e.path(), tmp / "q4").string();
    SCOPED_TRACE(rel);
    if (rel == "moeflux.json") {
      auto a = nlohmann::json::parse(read_file(e.path().string()));
      auto b = nlohmann::json::parse(read_file(shipped + "/" + rel));
      a["provenance"].erase("source");
      b["provenance"].erase("source");
      EXPECT_EQ(a, b);
    } else {
      EXPECT_TRUE(read_file(e.path().string()) == read_file(shipped + "/" + rel))
          << "differs from the committed package: regenerate with "
             "`moeflux convert --quant q4 tests/data/demo models/demo`";
    }
  }
}

// The fast int8 path's quality (issue 15; cpu/qdot.h): KL(--exact || --int8) over the
// demo's q8 conversion, the first 16 windows of 512 of the validation text. The issue's bar is
// 0.005; measured 0.0040 +/- 0.0002 on these windows, 0.0044 on all 186
// (docs/2026-12-03-cpu-int8.md). Dropping the exact output projections (Context::matmul_exact)
// gives 0.0054, so the test can fail.
TEST(Demo, Int8KlAgainstExactOnQ8IsWithinTheBar) {
  TempDir tmp;
  ConvertOptions opt;
  opt.progress = false;
  opt.quant = quant_recipe("q8");
  convert_checkpoint(fixture_dir(kDemo), tmp / "q8", opt);
  const CliResult r = run_cli(
      fmt::format("perplexity -m {} -f {}/valid.txt --ctx 512 --chunks 16 --int8 --kl-exact -t 2",
                  tmp / "q8", fixture_dir(kDemo)));
  ASSERT_EQ(r.code, 0) << r.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(kl  = ([0-9.]+) \+/- ([0-9.]+))"))) << r.out;
  const double kl = std::stod(m[1]);
  EXPECT_LE(kl, 0.005) << r.out;
  EXPECT_GT(kl, 1e-4) << "the int8 path did not run: " << r.out;  // exact vs exact gives 0
}

}  // namespace
}  // namespace moeflux::test
