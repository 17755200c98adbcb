#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "util/error.h"

namespace moeflux::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "moeflux-test-XXXXXX").string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

const std::string& converted_fixture(const std::string& name) {
  static std::mutex mu;
  static TempDir root;
  static std::map<std::string, std::string> done;
  std::lock_guard<std::mutex> lk(mu);
  auto it = done.find(name);
  if (it != done.end()) return it->second;
  std::string out = root / name;
  ConvertOptions opt;
  opt.progress = false;
  convert_checkpoint(fixture_dir(name), out, opt);
  return done[name] = out;
}

RunResult run_tokens(const std::string& package, const std::vector<int32_t>& tokens, int threads,
                     bool want_hidden) {
  auto model = Model::load(package);
  auto be = make_cpu_backend(threads);
  ExpertStore store(*model);
  Session s(*model, *be, store);
  RunResult r;
  const int V = model->spec().vocab_size, H = model->spec().hidden_size;
  r.logits.resize(tokens.size() * size_t(V));
  HiddenSink sink;
  if (want_hidden)
    sink = [&](int i, const float* h, int T) { r.hidden[i].assign(h, h + size_t(T) * H); };
  s.eval(tokens.data(), int(tokens.size()), r.logits.data(), true, sink);
  return r;
}

std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  if (!t) throw std::runtime_error("reference lacks " + name);
  std::vector<float> out(size_t(t->numel()));
  to_f32(t->dtype, t->data, out.data(), out.size());
  return out;
}

std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  if (!t || t->dtype != DType::kI32) throw std::runtime_error("reference lacks i32 " + name);
  std::vector<int32_t> out(size_t(t->numel()));
  std::memcpy(out.data(), t->data, t->nbytes);
  return out;
}

double cosine(const float* a, const float* b, size_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < n; i++) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

float max_abs(const float* a, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; i++) m = std::max(m, std::fabs(a[i]));
  return m;
}

float max_abs_diff(const float* a, const float* b, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; i++) {
    float d = std::fabs(a[i] - b[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

int argmax(const float* v, int n) { return int(std::max_element(v, v + n) - v); }

CliResult run_cli(const std::string& args) {
  TempDir tmp;
  std::string cmd = std::string(MOEFLUX_BIN) + " " + args + " >" + (tmp / "out") + " 2>" +
                    (tmp / "err") + " </dev/null";
  int rc = std::system(cmd.c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  CliResult r;
  r.code = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  r.out = slurp(tmp / "out");
  r.err = slurp(tmp / "err");
  return r;
}

}  // namespace moeflux::test
