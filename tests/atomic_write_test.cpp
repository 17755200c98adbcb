// Writes that are all-or-nothing (util/atomic_file.h, docs/2026-12-03-atomic-writes.md):
// convert and synth stage the package beside the target and rename it into place, refuse a
// non-empty target without --force and replace it whole with it, refuse the checkpoint's own
// directory; output files never land on a package's files nor replace a file without --force;
// a package replaced under a loaded Model does not leak into it.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <cstring>
#include <map>

#include "byte_tokenizer.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "synth/synth.h"
#include "test_util.h"
#include "util/atomic_file.h"
#include "util/mapped_file.h"

namespace moeflux::test {
namespace {

namespace fs = std::filesystem;

constexpr const char* kFixture = "qwen3_moe";

ConvertOptions quiet_convert(bool force = false) {
  ConvertOptions o;
  o.progress = false;
  o.force = force;
  return o;
}

// Every file under `dir` (relative path -> bytes).
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[fs::relative(e.path(), dir).string()] = read_file(e.path().string());
  return files;
}

// Names in `dir` that a staged write leaves behind when it fails to clean up.
std::vector<std::string> leftovers(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.find(".partial-") != std::string::npos || n.find(".old-") != std::string::npos ||
        n.find(".tmp-") != std::string::npos)
      out.push_back(n);
  }
  return out;
}

void touch(const std::string& path, const std::string& text = "x") {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// A pid that belonged to a process that has exited.
pid_t dead_pid() {
  const pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  ::waitpid(p, nullptr, 0);
  return p;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(AtomicWrite, ConvertRefusesANonEmptyTargetAndForceReplacesItWhole) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  convert_checkpoint(fixture_dir(kFixture), tmp / "fresh", quiet_convert());
  // Files only the old package has: a converter that writes in place would keep them.
  touch(pkg + "/tokenizer.json", "old tokenizer");
  touch(pkg + "/experts/layer-099.bin");

  const std::string msg = error_of([&] { convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert()); });
  EXPECT_NE(msg.find(pkg), std::string::npos) << msg;
  EXPECT_NE(msg.find("not empty"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--force"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(pkg + "/experts/layer-099.bin"));

  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert(true));
  EXPECT_EQ(snapshot(pkg), snapshot(tmp / "fresh")) << "not replaced whole";
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});

  // A non-empty directory that is not a package is never replaced, --force or not.
  touch(tmp / "notes/keep.txt");
  const std::string np = error_of([&] { convert_checkpoint(fixture_dir(kFixture), tmp / "notes", quiet_convert(true)); });
  EXPECT_NE(np.find("no moeflux package"), std::string::npos) << np;
  EXPECT_TRUE(fs::exists(tmp / "notes/keep.txt"));
  // An empty directory is a fine target.
  fs::create_directory(tmp / "empty");
  convert_checkpoint(fixture_dir(kFixture), tmp / "empty", quiet_convert());
  EXPECT_EQ(snapshot(tmp / "empty"), snapshot(tmp / "fresh"));
}

TEST(AtomicWrite, FailedConvertLeavesTheOldPackageAndNoPartialDirectory) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  const auto before = snapshot(pkg);
  // A checkpoint that fails late: every tensor is written, then its tokenizer.json (a
  // directory) cannot be copied.
  const std::string ck = tmp / "ck";
  fs::copy(fixture_dir(kFixture), ck, fs::copy_options::recursive);
  fs::remove(ck + "/tokenizer.json");
  fs::create_directory(ck + "/tokenizer.json");
  EXPECT_ANY_THROW(convert_checkpoint(ck, pkg, quiet_convert(true)));
  EXPECT_EQ(snapshot(pkg), before) << "the old package was touched";
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});
  EXPECT_ANY_THROW(convert_checkpoint(ck, tmp / "new", quiet_convert()));
  EXPECT_FALSE(fs::exists(tmp / "new")) << "a failed conversion left an output directory";
}

TEST(AtomicWrite, AStaleTemporaryFromAKilledRunDoesNotBlock) {
  TempDir tmp;
  const std::string stale = tmp / fmt::format(".pkg.partial-{}", dead_pid());
  touch(stale + "/resident.bin", "half");
  convert_checkpoint(fixture_dir(kFixture), tmp / "pkg", quiet_convert());
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});

  SynthOptions o;
  o.progress = false;
  const std::string stale2 = tmp / fmt::format(".syn.partial-{}", dead_pid());
  touch(stale2 + "/experts/layer-000.bin", "half");
  synth_package(synth_spec("tiny"), tmp / "syn", o);
  EXPECT_FALSE(fs::exists(stale2));
  const auto first = snapshot(tmp / "syn");
  touch(tmp / "syn/extra");
  EXPECT_NE(error_of([&] { synth_package(synth_spec("tiny"), tmp / "syn", o); }).find("--force"),
            std::string::npos);
  o.force = true;
  synth_package(synth_spec("tiny"), tmp / "syn", o);
  EXPECT_EQ(snapshot(tmp / "syn"), first);
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});
}

TEST(AtomicWrite, ConvertRefusesTheCheckpointDirectory) {
  TempDir tmp;
  const std::string ck = tmp / "ck";
  fs::copy(fixture_dir(kFixture), ck, fs::copy_options::recursive);
  const auto before = snapshot(ck);
  for (const std::string& out : {ck, ck + "/", ck + "/pkg", tmp.path(), ck + "/../ck"}) {
    const std::string msg = error_of([&] { convert_checkpoint(ck, out, quiet_convert(true)); });
    EXPECT_NE(msg.find("checkpoint directory"), std::string::npos) << out << ": " << msg;
  }
  EXPECT_EQ(snapshot(ck), before);
  const CliResult r = run_cli(fmt::format("convert -q {} {} --force", ck, ck));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("checkpoint directory"), std::string::npos) << r.err;
}

TEST(AtomicWrite, ConvertCliNeedsForceToReplace) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  ASSERT_EQ(run_cli(fmt::format("convert -q {} {}", fixture_dir(kFixture), pkg)).code, 0);
  const CliResult r = run_cli(fmt::format("convert -q {} {}", fixture_dir(kFixture), pkg));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  EXPECT_EQ(run_cli(fmt::format("convert -q --force {} {}", fixture_dir(kFixture), pkg)).code, 0);
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});
}

std::vector<float> eval_logits(const Model& model, const std::vector<int32_t>& toks) {
  auto be = make_cpu_context(1);
  ExpertStore store(model);
  Session s(model, *be, store);
  std::vector<float> logits(size_t(model.spec().vocab_size) * toks.size());
  s.eval(toks.data(), int(toks.size()), logits.data(), true);
  return logits;
}

TEST(AtomicWrite, APackageReplacedUnderALoadedModelIsNotMixedInAndIsReported) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  const std::vector<int32_t> toks = {5, 6, 7, 300};
  const std::vector<float> want = eval_logits(*Model::load(pkg), toks);
  auto model = Model::load(pkg);
  EXPECT_EQ(model->changed_on_disk(), "");
  // Re-converted (q8: other bytes in every file) while loaded; the store is made afterwards,
  // so a store that opened the expert files by name would read the new experts.
  ConvertOptions q8 = quiet_convert(true);
  q8.quant = quant_recipe("q8");
  convert_checkpoint(fixture_dir(kFixture), pkg, q8);
  const std::string changed = model->changed_on_disk();
  EXPECT_NE(changed.find(pkg), std::string::npos) << changed;
  EXPECT_NE(changed.find("replaced"), std::string::npos) << changed;
  const std::vector<float> got = eval_logits(*model, toks);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
      << "the loaded model read the new package";
  EXPECT_EQ(Model::load(pkg)->changed_on_disk(), "");
  EXPECT_NE(max_abs_diff(eval_logits(*Model::load(pkg), toks).data(), want.data(), want.size()), 0.0f)
      << "the replacement is not another package";
}

TEST(AtomicWrite, AMappedResidentCutShortIsAnErrorNotSigbus) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  auto model = Model::load(pkg, /*use_mmap=*/true);
  auto be = make_cpu_context(1);
  ExpertStore store(*model);
  Session s(*model, *be, store);
  const std::vector<int32_t> toks = {5, 6, 7};
  std::vector<float> logits(1024);
  s.eval(toks.data(), 3, logits.data(), false);
  ASSERT_EQ(::truncate(resident_path(pkg).c_str(), 4096), 0);
  const std::string changed = model->changed_on_disk();
  EXPECT_NE(changed.find("rewritten in place"), std::string::npos) << changed;
  try {
    s.eval(toks.data(), 3, logits.data(), false);
    FAIL() << "evaluated over a truncated map";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIo);
    EXPECT_NE(std::string(e.what()).find("resident.bin: shrank"), std::string::npos) << e.what();
  }
}

TEST(AtomicWrite, DumpLogitsNeverLandsOnThePackageAndNeedsForceToReplace) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  const std::string resident = read_file(resident_path(pkg));
  fs::create_symlink(resident_path(pkg), tmp / "link.safetensors");
  for (const std::string& target : {resident_path(pkg), tmp / "link.safetensors", manifest_path(pkg)}) {
    for (const char* force : {"", " --force"}) {
      const CliResult r = run_cli(fmt::format("eval -m {} --tokens 1,2 --dump-logits {}{}", pkg, target, force));
      EXPECT_EQ(r.code, 1) << target << force << ": " << r.err;
      EXPECT_NE(r.err.find("a file of the package being read"), std::string::npos) << r.err;
    }
  }
  EXPECT_EQ(read_file(resident_path(pkg)), resident);
  const std::string out = tmp / "dump.safetensors";
  ASSERT_EQ(run_cli(fmt::format("eval -m {} --tokens 1,2 --dump-logits {}", pkg, out)).code, 0);
  const std::string first = read_file(out);
  const CliResult again = run_cli(fmt::format("eval -m {} --tokens 1,2 --dump-logits {}", pkg, out));
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.err.find("--force"), std::string::npos) << again.err;
  EXPECT_EQ(run_cli(fmt::format("eval -m {} --tokens 3 --dump-logits {} --force", pkg, out)).code, 0);
  EXPECT_NE(read_file(out), first);
  EXPECT_EQ(leftovers(tmp.path()), std::vector<std::string>{});
}

TEST(AtomicWrite, ChatSaveRefusesAnExistingFileUnlessBanged) {
  TempDir tmp;
  const std::string pkg = tmp / "pkg";
  convert_checkpoint(fixture_dir(kFixture), pkg, quiet_convert());
  touch(pkg + "/tokenizer.json", byte_tokenizer_json());
  touch(pkg + "/tokenizer_config.json", chatml_tokenizer_config_json());
  touch(tmp / "conv.json", "keep");
  touch(tmp / "in.txt", fmt::format("hi\n/save {0}\n/save {1}\n/save! {1}\n", resident_path(pkg),
                                    tmp / "conv.json"));
  const std::string cmd = fmt::format("{} chat -m {} --temp 0 -n 2 -t 1 <{} >{} 2>{}", MOEFLUX_BIN,
                                      pkg, tmp / "in.txt", tmp / "out.txt", tmp / "err.txt");
  const int rc = std::system(cmd.c_str());
  const std::string err = read_file(tmp / "err.txt");
  EXPECT_EQ(rc, 0) << err;
  EXPECT_NE(err.find("a file of the package being read"), std::string::npos) << err;
  EXPECT_NE(err.find("/save! " + (tmp / "conv.json") + " replaces it"), std::string::npos) << err;
  EXPECT_NE(err.find("saved 2 messages to " + (tmp / "conv.json")), std::string::npos) << err;
  EXPECT_NE(read_file(tmp / "conv.json"), "keep");
}

}  // namespace
}  // namespace moeflux::test
