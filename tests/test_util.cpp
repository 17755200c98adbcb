#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include "synth/synth.h"
#include "util/error.h"

namespace moeflux::test {

namespace fs = std::filesystem;

TempDir::TempDir() : TempDir(fs::temp_directory_path().string()) {}

TempDir::TempDir(const std::string& parent) {
  std::string tmpl = (fs::path(parent) / "moeflux-test-XXXXXX").string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data()))
    throw std::runtime_error("mkdtemp " + tmpl + ": " + std::strerror(errno));
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
  std::string flat = name;  // "gpt_oss/bf16": one directory under root
  std::replace(flat.begin(), flat.end(), '/', '_');
  std::string out = root / flat;
  ConvertOptions opt;
  opt.progress = false;
  convert_checkpoint(fixture_dir(name), out, opt);
  return done[name] = out;
}

RunResult run_tokens(const std::string& package, const std::vector<int32_t>& tokens, int threads,
                     bool want_hidden) {
  auto model = Model::load(package);
  auto be = make_cpu_context(threads);
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

std::string sha256_hex(const void* data, size_t n) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::vector<uint8_t> m(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + n);
  m.push_back(0x80);
  while (m.size() % 64 != 56) m.push_back(0);
  for (int i = 7; i >= 0; i--) m.push_back(uint8_t((uint64_t(n) * 8) >> (i * 8)));
  auto rot = [](uint32_t x, int r) { return (x >> r) | (x << (32 - r)); };
  for (size_t off = 0; off < m.size(); off += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
      w[i] = uint32_t(m[off + 4 * i]) << 24 | uint32_t(m[off + 4 * i + 1]) << 16 |
             uint32_t(m[off + 4 * i + 2]) << 8 | uint32_t(m[off + 4 * i + 3]);
    for (int i = 16; i < 64; i++) {
      const uint32_t s0 = rot(w[i - 15], 7) ^ rot(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rot(w[i - 2], 17) ^ rot(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
      const uint32_t t1 = hh + (rot(e, 6) ^ rot(e, 11) ^ rot(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rot(a, 2) ^ rot(a, 13) ^ rot(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  std::string out;
  for (uint32_t v : h) out += fmt::format("{:08x}", v);
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void SynthSessionTest::synth_and_load(const ModelSpec& spec, uint64_t seed) {
  SynthOptions o;
  o.quant = "none";
  o.progress = false;
  o.seed = seed;
  synth_package(spec, dir_ / "pkg", o);
  model_ = Model::load(dir_ / "pkg");
  store_ = std::make_unique<ExpertStore>(*model_);
}

std::vector<float> SynthSessionTest::eval(Session& s, const std::vector<int32_t>& toks) {
  std::vector<float> l(size_t(model_->spec().vocab_size));
  s.eval(toks.data(), int(toks.size()), l.data(), false);
  return l;
}

}  // namespace moeflux::test
