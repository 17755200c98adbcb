// Session memory and snapshots, and the chunked Gated DeltaNet:
//   * the recurrence and deltanet_chunked match a double-precision scalar reference written in
//     this file (DESIGN.md §1) within a float rounding bound; deltanet_chunked equals the
//     recurrence within 1e-5 (relative to the largest magnitude) on the outputs and the final state, for T inside / at / across chunk boundaries, with and
//     without an initial state; and a session prefilling with it stays within the unquantised
//     tolerance of the recurrence;
//   * seq_rm then continuing gives the bits of a fresh session fed the kept prefix, whatever
//     checkpoints exist; middle ranges and bad positions are refused without changing anything;
//     a failed evaluation makes the session refuse until it is rewound;
//   * save -> clear -> load -> next token is bit-identical to never having saved; snapshots of
//     another model, version or a truncated/corrupted one (every header field, bit flips, random
//     bytes, crafted fields under a valid checksum) are refused and change nothing.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>

#include "cpu/kernels.h"
#include "test_util.h"

namespace moeflux::test {
namespace {

// ---- chunked DeltaNet against the recurrence ---------------------------------------------------

struct DeltaInputs {
  std::vector<float> qkv, g, beta, state;
};

DeltaInputs random_delta_inputs(int T, const DeltaNetParams& p, bool with_state, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  const int C = 2 * p.k_heads * p.k_dim + p.v_heads * p.v_dim;
  DeltaInputs in;
  in.qkv.resize(size_t(T) * C);
  for (auto& x : in.qkv) x = nd(rng);
  in.g.resize(size_t(T) * p.v_heads);
  in.beta.resize(in.g.size());
  // As the model makes them: g = -exp(A_log) softplus(.) < 0 (some near 0: slow decay, some
  // strong), beta = sigmoid(.) in (0, 1).
  for (auto& x : in.g) x = -0.01f - 3.0f * ud(rng) * ud(rng);
  for (auto& x : in.beta) x = ud(rng);
  in.state.assign(size_t(p.v_heads) * p.k_dim * p.v_dim, 0.0f);
  if (with_state)
    for (auto& x : in.state) x = 0.3f * nd(rng);
  return in;
}

// Runs one form; returns out [T, nv*dv] followed by the final state.
std::vector<float> run_delta(Context& be, const DeltaInputs& in, int T, const DeltaNetParams& p,
                             int chunk) {
  std::vector<float> state = in.state;
  std::vector<float> out(size_t(T) * p.v_heads * p.v_dim);
  // The CPU backend's memory is host memory, but go through the interface anyway.
  float* d_qkv = be.alloc(in.qkv.size());
  float* d_g = be.alloc(in.g.size());
  float* d_b = be.alloc(in.beta.size());
  float* d_s = be.alloc(state.size());
  float* d_o = be.alloc(out.size());
  be.upload(d_qkv, in.qkv.data(), in.qkv.size());
  be.upload(d_g, in.g.data(), in.g.size());
  be.upload(d_b, in.beta.data(), in.beta.size());
  be.upload(d_s, state.data(), state.size());
  if (chunk == 0)
    be.deltanet(d_qkv, d_g, d_b, d_s, d_o, T, p);
  else
    be.deltanet_chunked(d_qkv, d_g, d_b, d_s, d_o, T, p, chunk);
  be.download(out.data(), d_o, out.size());
  be.download(state.data(), d_s, state.size());
  for (float* x : {d_qkv, d_g, d_b, d_s, d_o}) be.release(x);
  out.insert(out.end(), state.begin(), state.end());
  return out;
}

double rel_err(const float* ref, const float* got, size_t n) {
  double mx = 0, d = 0;
  for (size_t i = 0; i < n; i++) {
    mx = std::max(mx, double(std::fabs(ref[i])));
    d = std::max(d, double(std::fabs(ref[i] - got[i])));
  }
  return mx > 0 ? d / mx : d;
}

// The gated delta rule of DESIGN.md §1 written out in double precision with plain loops and
// nothing from the engine (no l2norm/axpy kernels), so neither form is checked against itself.
// Per v-head h (k-head h / (nv/nk), HF's repeat_interleave) and token t:
//   q, k L2-normalised (x / sqrt(sum x^2 + 1e-6), HF's l2norm), q /= sqrt(dk);
//   S *= exp(g);  delta = (v - S^T k) beta;  S += k (x) delta;  o = S^T q.
// Returns out [T, nv*dv] followed by the final state [nv, dk, dv].
std::vector<double> reference_deltanet(const DeltaInputs& in, int T, const DeltaNetParams& p) {
  const int nk = p.k_heads, nv = p.v_heads, dk = p.k_dim, dv = p.v_dim;
  const int C = 2 * nk * dk + nv * dv, ratio = nv / nk;
  std::vector<double> out(size_t(T) * nv * dv), state(in.state.begin(), in.state.end());
  std::vector<double> q(static_cast<size_t>(dk)), k(static_cast<size_t>(dk)), delta(static_cast<size_t>(dv));
  auto normalised = [](const float* x, int n, std::vector<double>& y) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += double(x[i]) * double(x[i]);
    for (int i = 0; i < n; i++) y[size_t(i)] = double(x[i]) / std::sqrt(ss + 1e-6);
  };
  for (int h = 0; h < nv; h++) {
    const int kh = h / ratio;
    double* S = state.data() + size_t(h) * dk * dv;  // [dk, dv]
    for (int t = 0; t < T; t++) {
      const float* row = in.qkv.data() + size_t(t) * C;
      normalised(row + size_t(kh) * dk, dk, q);
      normalised(row + size_t(nk + kh) * dk, dk, k);
      for (double& x : q) x /= std::sqrt(double(dk));
      const float* v = row + size_t(2 * nk) * dk + size_t(h) * dv;
      const double decay = std::exp(double(in.g[size_t(t) * nv + h]));
      const double beta = in.beta[size_t(t) * nv + h];
      for (size_t i = 0; i < size_t(dk) * dv; i++) S[i] *= decay;
      for (int j = 0; j < dv; j++) {
        double sk = 0;
        for (int i = 0; i < dk; i++) sk += S[size_t(i) * dv + j] * k[size_t(i)];
        delta[size_t(j)] = (double(v[j]) - sk) * beta;
      }
      for (int i = 0; i < dk; i++)
        for (int j = 0; j < dv; j++) S[size_t(i) * dv + j] += k[size_t(i)] * delta[size_t(j)];
      for (int j = 0; j < dv; j++) {
        double o = 0;
        for (int i = 0; i < dk; i++) o += S[size_t(i) * dv + j] * q[size_t(i)];
        out[size_t(t) * nv * dv + size_t(h) * dv + j] = o;
      }
    }
  }
  out.insert(out.end(), state.begin(), state.end());
  return out;
}

// max |ref - got| / max |ref| over n values.
double rel_err_vs(const double* ref, const float* got, size_t n) {
  double mx = 0, d = 0;
  for (size_t i = 0; i < n; i++) {
    mx = std::max(mx, std::fabs(ref[i]));
    d = std::max(d, std::fabs(ref[i] - double(got[i])));
  }
  return mx > 0 ? d / mx : d;
}

// Float rounding bound for T tokens relative to the largest magnitude: each token's float
// update rounds once per multiply/add along a dot product of dk terms plus a few scalar steps
// (decay, v - S^T k, beta, the rank-1 add, and the L2 norm's ~4 roundings), u = 2^-24 each, and
// the error injected at one token is carried on (exp(g) < 1 and I - beta k k^T with |k| = 1,
// beta in (0, 1) do not amplify it), so it grows at most linearly in T: (T + 1)(dk + 8) u. The
// output o = S^T q adds one more dot product: the same bound with T + 1 covers it.
double float_bound(int T, const DeltaNetParams& p) {
  return double(T + 1) * double(p.k_dim + 8) * std::ldexp(1.0, -24);
}

TEST(DeltaNetRecurrence, MatchesADoubleReference) {
  auto be = make_cpu_context(2);
  for (const DeltaNetParams& p : {DeltaNetParams{2, 4, 16, 16}, DeltaNetParams{1, 2, 32, 80},
                                  DeltaNetParams{2, 4, 128, 128}, DeltaNetParams{2, 2, 24, 40}}) {
    for (bool with_state : {false, true}) {
      SCOPED_TRACE(::testing::Message() << p.k_dim << " x " << p.v_dim << (with_state ? " with" : " without")
                                        << " initial state");
      const int T = 40;
      const DeltaInputs in = random_delta_inputs(T, p, with_state, 3);
      const auto got = run_delta(*be, in, T, p, 0);
      const auto ref = reference_deltanet(in, T, p);
      ASSERT_EQ(got.size(), ref.size());
      const size_t no = size_t(T) * p.v_heads * p.v_dim;
      const double e_out = rel_err_vs(ref.data(), got.data(), no);
      const double e_state = rel_err_vs(ref.data() + no, got.data() + no, ref.size() - no);
      std::printf("[deltanet] recurrence dk %3d dv %3d: rel err out %.2e state %.2e (bound %.2e)\n",
                  p.k_dim, p.v_dim, e_out, e_state, float_bound(T, p));
      EXPECT_LE(e_out, float_bound(T, p)) << "outputs";
      EXPECT_LE(e_state, float_bound(T, p)) << "final state";
    }
  }
}

TEST(DeltaNetChunked, MatchesTheRecurrence) {
  auto be = make_cpu_context(2);
  struct Shape {
    DeltaNetParams p;
    int chunk;
    std::vector<int> Ts;
  };
#if MF_TEST_ASAN
  const std::vector<int> big_T = {1, 64, 130};
#else
  const std::vector<int> big_T = {1, 37, 64, 65, 200, 512};
#endif
  const std::vector<Shape> shapes = {
      {{2, 4, 16, 16}, 64, {1, 2, 5, 63, 64, 65, 127, 128, 129, 300}},
      {{1, 3, 32, 16}, 16, {1, 15, 16, 17, 50}},  // dk != dv, ratio 3, small chunks
      {{2, 2, 24, 40}, 7, {1, 6, 7, 8, 22}},      // dims not a multiple of 16, odd chunk
      {{16, 32, 128, 128}, 64, big_T},            // Qwen3.5-35B-A3B's shapes
  };
  uint32_t seed = 1;
  for (const Shape& sh : shapes)
    for (int T : sh.Ts)
      for (bool with_state : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "nk " << sh.p.k_heads << " nv " << sh.p.v_heads << " dk " << sh.p.k_dim
                     << " dv " << sh.p.v_dim << " chunk " << sh.chunk << " T " << T
                     << (with_state ? " with" : " without") << " initial state");
        const DeltaInputs in = random_delta_inputs(T, sh.p, with_state, seed++);
        const auto ref = run_delta(*be, in, T, sh.p, 0);
        const auto got = run_delta(*be, in, T, sh.p, sh.chunk);
        const size_t no = size_t(T) * sh.p.v_heads * sh.p.v_dim;
        EXPECT_LE(rel_err(ref.data(), got.data(), no), 1e-5) << "outputs";
        EXPECT_LE(rel_err(ref.data() + no, got.data() + no, ref.size() - no), 1e-5)
            << "final state";
        // and both against the double-precision reference, within float rounding
        const auto exact = reference_deltanet(in, T, sh.p);
        const double bound = float_bound(T, sh.p);
        EXPECT_LE(rel_err_vs(exact.data(), got.data(), no), bound) << "chunked outputs";
        EXPECT_LE(rel_err_vs(exact.data() + no, got.data() + no, exact.size() - no), bound)
            << "chunked final state";
      }
}

TEST(DeltaNetChunked, SameBitsForAnyThreadCount) {
  const DeltaNetParams p{2, 4, 32, 32};
  const DeltaInputs in = random_delta_inputs(150, p, true, 99);
  auto be1 = make_cpu_context(1);
  const auto base = run_delta(*be1, in, 150, p, 64);
  for (int threads : {2, 3}) {
    auto be = make_cpu_context(threads);
    const auto r = run_delta(*be, in, 150, p, 64);
    EXPECT_EQ(0, std::memcmp(r.data(), base.data(), base.size() * sizeof(float))) << threads;
  }
}

// ---- sessions ----------------------------------------------------------------------------------

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Context> be;
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<Session> session;
  explicit Loaded(const std::string& fixture, SessionParams sp = {},
                  std::shared_ptr<ExpertReader> reader = nullptr) {
    model = Model::load(converted_fixture(fixture));
    be = make_cpu_context(1);  // tiny models: a second thread only adds hand-offs
    ExpertStoreOptions o;
    o.reader = std::move(reader);
    store = std::make_unique<ExpertStore>(*model, o);
    session = std::make_unique<Session>(*model, *be, *store, sp);
  }
  int vocab() const { return model->spec().vocab_size; }
  // A new session on the same model, backend and store.
  void renew(SessionParams sp = {}) {
    session.reset();
    session = std::make_unique<Session>(*model, *be, *store, sp);
  }
  // Logits of the last of `toks` evaluated as one batch.
  std::vector<float> eval(const std::vector<int32_t>& toks) {
    std::vector<float> l(static_cast<size_t>(vocab()));
    session->eval(toks.data(), int(toks.size()), l.data(), false);
    return l;
  }
  std::vector<uint8_t> save() const {
    std::vector<uint8_t> b(session->state_size());
    session->state_save(b.data(), b.size());
    return b;
  }
};

std::vector<int32_t> chunk_tokens(const std::string& fixture) {
  SafetensorsFile ref(fixture_dir(fixture) + "/reference.safetensors");
  return read_i32(ref, "tokens_chunk");
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(SessionPrefill, ChunkedDeltaNetWithinTheUnquantisedTolerance) {
  for (const char* fixture : {"qwen3_5_moe", "qwen3_next", "qwen3_next_v2"}) {
    SCOPED_TRACE(fixture);
    const auto toks = chunk_tokens(fixture);
    const int T = int(toks.size());
    Loaded rec(fixture);
    SessionParams sp;
    sp.deltanet_chunked_min_tokens = 2;
    sp.deltanet_chunk = 16;  // several chunks in the fixture's prompt
    Loaded chk(fixture, sp);
    const int V = rec.vocab();
    std::vector<float> a(size_t(T) * V), b(size_t(T) * V);
    rec.session->eval(toks.data(), T, a.data(), true);
    chk.session->eval(toks.data(), T, b.data(), true);
    EXPECT_LE(max_abs_diff(a.data(), b.data(), a.size()), 1e-3f * max_abs(a.data(), a.size()));
    for (int t = 0; t < T; t++)
      EXPECT_EQ(argmax(a.data() + size_t(t) * V, V), argmax(b.data() + size_t(t) * V, V)) << t;
  }
}

// A prompt evaluated in micro-batches of 7 or 1 tokens gives every logit and hidden state of the
// whole-prompt evaluation bit for bit, and leaves the same state behind (the next token agrees).
TEST(SessionPrefill, MicroBatchesChangeNoBit) {
  for (const char* fixture : {"qwen3_5_moe", "qwen3_next", "mixtral", "qwen3_moe"}) {
    SCOPED_TRACE(fixture);
    const auto toks = chunk_tokens(fixture);
    const int T = int(toks.size());
    ASSERT_GT(T, 20);
    Loaded whole(fixture);
    const int V = whole.vocab(), L = whole.model->spec().n_layers;
    const size_t H = size_t(whole.model->spec().hidden_size);
    auto run = [&](Loaded& m, std::vector<std::vector<float>>& hid) {
      std::vector<float> logits(size_t(T) * V);
      hid.assign(size_t(L) + 1, {});
      std::vector<int> calls(size_t(L) + 1, 0);
      m.session->eval(toks.data(), T, logits.data(), true, [&](int i, const float* h, int n) {
        calls[size_t(i)]++;
        hid[size_t(i)].assign(h, h + size_t(n) * H);
      });
      for (int i = 0; i <= L; i++) EXPECT_EQ(calls[size_t(i)], 1) << "hidden index " << i;
      const int32_t next = toks[0];
      logits.resize(logits.size() + size_t(V));
      m.session->eval(&next, 1, logits.data() + size_t(T) * V, false);
      return logits;
    };
    std::vector<std::vector<float>> h_whole, h_ub;
    const auto ref = run(whole, h_whole);
    for (int ub : {7, 1}) {
      SCOPED_TRACE(ub);
      SessionParams sp;
      sp.ubatch = ub;
      Loaded m(fixture, sp);
      const auto got = run(m, h_ub);
      EXPECT_TRUE(same_bits(ref, got));
      for (int i = 0; i <= L; i++) EXPECT_TRUE(same_bits(h_whole[size_t(i)], h_ub[size_t(i)])) << i;
    }
  }
}

TEST(SessionPrefill, MicroBatchBelowOneRefused) {
  SessionParams sp;
  sp.ubatch = 0;
  EXPECT_THROW(Loaded("qwen3_moe", sp), Error);
}

class SeqRm : public ::testing::TestWithParam<std::string> {};

// Prompt of 40, 12 decoded tokens, another prompt of 30: then seq_rm to many points and continue
// with 3 tokens; every logit equals a fresh session fed the kept prefix and the same 3 tokens.
TEST_P(SeqRm, ContinuingEqualsAFreshSessionOnThePrefix) {
  const std::string fixture = GetParam();
  const auto all = chunk_tokens(fixture);
  ASSERT_GE(all.size(), size_t(85));
  const std::vector<int32_t> tail = {all[80], all[81], all[82]};
  Loaded m(fixture);
  for (int p0 : {0, 1, 40, 45, 52, 81}) {
    // What a fresh session fed the kept prefix and the same 3 tokens gives.
    m.renew();
    std::vector<int32_t> prefix(all.begin(), all.begin() + p0);
    if (!prefix.empty()) m.eval(prefix);
    std::vector<float> want;
    for (int32_t t : tail) want = m.eval({t});
    for (int checkpoints : {0, 1, 4}) {
      SCOPED_TRACE(::testing::Message() << "checkpoints " << checkpoints << " p0 " << p0);
      SessionParams sp;
      sp.checkpoints = checkpoints;
      sp.checkpoint_interval = 5;
      m.renew(sp);
      m.eval(std::vector<int32_t>(all.begin(), all.begin() + 40));
      for (int t = 40; t < 52; t++) m.eval({all[size_t(t)]});
      m.eval(std::vector<int32_t>(all.begin() + 52, all.begin() + 82));
      ASSERT_EQ(m.session->pos(), 82);
      EXPECT_LE(m.session->checkpoint_count(), checkpoints);
      m.session->seq_rm(p0, -1);
      EXPECT_EQ(m.session->pos(), p0);
      EXPECT_EQ(m.session->pos_max(), p0 - 1);
      ASSERT_EQ(m.session->tokens(), prefix);
      std::vector<float> got;
      for (int32_t t : tail) got = m.eval({t});
      EXPECT_TRUE(same_bits(got, want));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, SeqRm,
                         ::testing::Values("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"));

TEST(SeqRm, CheckpointsAreBoundedAndTakenAtPromptEndsAndIntervals) {
  SessionParams sp;
  sp.checkpoints = 3;
  sp.checkpoint_interval = 4;
  Loaded m("qwen3_5_moe", sp);
  const auto all = chunk_tokens("qwen3_5_moe");
  m.eval(std::vector<int32_t>(all.begin(), all.begin() + 10));  // prompt end: 10
  EXPECT_EQ(m.session->checkpoint_positions(), std::vector<int>({10}));
  for (int t = 10; t < 19; t++) m.eval({all[size_t(t)]});  // decode: 14, 18
  EXPECT_EQ(m.session->checkpoint_positions(), std::vector<int>({10, 14, 18}));
  m.eval(std::vector<int32_t>(all.begin() + 19, all.begin() + 21));  // prompt end: 21, drops 10
  EXPECT_EQ(m.session->checkpoint_positions(), std::vector<int>({14, 18, 21}));
  m.session->seq_rm(16, -1);  // restores 14, replays 2, checkpoints 16
  EXPECT_EQ(m.session->checkpoint_positions(), std::vector<int>({14, 16}));
  m.session->clear();
  EXPECT_EQ(m.session->checkpoint_count(), 0);
  EXPECT_EQ(m.session->pos_max(), -1);
  // Pure-attention models need none.
  Loaded a("qwen3_moe", sp);
  a.eval(std::vector<int32_t>(all.begin(), all.begin() + 10));
  EXPECT_EQ(a.session->checkpoint_count(), 0);
}

TEST(SeqRm, RefusesBadRangesAndMiddleRangesWithoutChangingAnything) {
  for (const char* fixture : {"qwen3_5_moe", "qwen3_moe"}) {
    SCOPED_TRACE(fixture);
    const auto all = chunk_tokens(fixture);
    Loaded m(fixture);
    m.eval(std::vector<int32_t>(all.begin(), all.begin() + 30));
    const auto before = m.save();
    struct Case {
      int p0, p1;
      ErrorKind kind;
    };
    for (const Case& c :
         {Case{-1, -1, ErrorKind::kInvalidArgument}, Case{31, -1, ErrorKind::kInvalidArgument},
          Case{10, 5, ErrorKind::kInvalidArgument}, Case{10, 20, ErrorKind::kUnsupported},
          Case{0, 29, ErrorKind::kUnsupported}}) {
      SCOPED_TRACE(::testing::Message() << "[" << c.p0 << ", " << c.p1 << ")");
      try {
        m.session->seq_rm(c.p0, c.p1);
        ADD_FAILURE() << "expected an error";
      } catch (const Error& e) {
        EXPECT_EQ(int(e.kind()), int(c.kind)) << e.what();
      }
      EXPECT_EQ(m.save(), before);
    }
    // Empty ranges and ranges past the end are fine.
    m.session->seq_rm(30, -1);
    m.session->seq_rm(12, 12);
    EXPECT_EQ(m.save(), before);
    m.session->seq_rm(25, 1000);
    EXPECT_EQ(m.session->pos(), 25);
  }
}

// Reads expert files with pread; fails every read while `broken`.
class SwitchableReader : public ExpertReader {
 public:
  explicit SwitchableReader(const Model& m) {
    for (int layer : m.manifest().experts.layers) {
      fds_.push_back(::open(expert_file_path(m.dir(), layer).c_str(), O_RDONLY));
      if (fds_.back() < 0) throw std::runtime_error("open failed");
    }
  }
  ~SwitchableReader() override {
    for (int fd : fds_) ::close(fd);
  }
  void read(int file, uint64_t off, uint64_t n, uint8_t* dst) override {
    if (broken) fail(ErrorKind::kIo, "injected read error");
    if (::pread(fds_[size_t(file)], dst, n, off_t(off)) != ssize_t(n))
      fail(ErrorKind::kIo, "short read");
  }
  std::atomic<bool> broken{false};

 private:
  std::vector<int> fds_;
};

TEST(SeqRm, AFailedEvaluationIsNeverContinuedFrom) {
  auto model = Model::load(converted_fixture("qwen3_5_moe"));
  auto reader = std::make_shared<SwitchableReader>(*model);
  ExpertStoreOptions o;
  o.cache_bytes = 0;  // every token reads
  o.reader = reader;
  ExpertStore store(*model, o);
  auto be = make_cpu_context(2);
  Session s(*model, *be, store);
  const auto all = chunk_tokens("qwen3_5_moe");
  const int V = model->spec().vocab_size;
  std::vector<float> got(static_cast<size_t>(V)), want(static_cast<size_t>(V));
  s.eval(all.data(), 20, nullptr, false);
  reader->broken = true;
  EXPECT_THROW(s.eval(all.data() + 20, 5, nullptr, false), Error);
  EXPECT_FALSE(s.valid());
  EXPECT_EQ(s.pos(), 20);
  reader->broken = false;
  EXPECT_THROW(s.eval(all.data() + 20, 1, nullptr, false), Error) << "continued from a "
                                                                     "half-updated state";
  EXPECT_THROW(s.state_save(std::vector<uint8_t>(s.state_size()).data(), s.state_size()), Error);
  s.seq_rm(20, -1);  // rewinds to the checkpoint at 20: consistent again
  EXPECT_TRUE(s.valid());
  s.eval(all.data() + 20, 1, got.data(), false);
  Loaded fresh("qwen3_5_moe");
  fresh.session->eval(all.data(), 21, want.data(), false);
  EXPECT_TRUE(same_bits(got, want));
}

// ---- snapshots ---------------------------------------------------------------------------------

class Snapshot : public ::testing::TestWithParam<std::string> {};

TEST_P(Snapshot, SaveClearLoadContinuesBitIdentically) {
  const std::string fixture = GetParam();
  const auto all = chunk_tokens(fixture);
  const std::vector<int32_t> prompt(all.begin(), all.begin() + 33);
  Loaded ref(fixture);
  ref.eval(prompt);
  for (int t = 33; t < 37; t++) ref.eval({all[size_t(t)]});
  const auto snap = ref.save();
  const auto want = ref.eval({all[37]});  // never saved: the next token
  const auto want2 = ref.eval({all[38]});

  Loaded m(fixture);
  m.eval(prompt);
  for (int t = 33; t < 37; t++) m.eval({all[size_t(t)]});
  ASSERT_EQ(m.save(), snap) << "same history, same bytes";
  m.session->clear();
  m.eval({all[5], all[9]});  // something else in between
  m.session->state_load(snap.data(), snap.size());
  EXPECT_EQ(m.session->pos(), 37);
  EXPECT_EQ(m.session->tokens(), std::vector<int32_t>(all.begin(), all.begin() + 37));
  EXPECT_TRUE(same_bits(m.eval({all[37]}), want));
  EXPECT_TRUE(same_bits(m.eval({all[38]}), want2));

  // Into another session with a larger context, then rewound through the loaded checkpoint.
  SessionParams sp;
  sp.ctx = 200;
  Loaded other(fixture, sp);
  other.session->state_load(snap.data(), snap.size());
  EXPECT_TRUE(same_bits(other.eval({all[37]}), want));
  other.session->seq_rm(37, -1);
  EXPECT_TRUE(same_bits(other.eval({all[37]}), want));
}

INSTANTIATE_TEST_SUITE_P(Archs, Snapshot,
                         ::testing::Values("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"));

TEST(Snapshot, RefusesAnotherModelAndIncompatibleSessions) {
  Loaded a("qwen3_5_moe");
  a.eval({3, 17, 250});
  const auto snap = a.save();
  auto expect_refused = [&](Session& s, SnapshotError::Reason r) {
    try {
      s.state_load(snap.data(), snap.size());
      ADD_FAILURE() << "accepted";
    } catch (const SnapshotError& e) {
      EXPECT_EQ(e.reason(), r) << e.what();
    }
  };
  Loaded b("qwen3_next");
  b.eval({5});
  const auto b_before = b.save();
  expect_refused(*b.session, SnapshotError::kModel);
  EXPECT_EQ(b.save(), b_before);
  SessionParams fewer;
  fewer.experts_per_token = 1;
  Loaded c("qwen3_5_moe", fewer);
  expect_refused(*c.session, SnapshotError::kParams);
  SessionParams small;
  small.ctx = 2;
  Loaded d("qwen3_5_moe", small);
  expect_refused(*d.session, SnapshotError::kParams);
}

// The checksum the header carries, recomputed (to craft inconsistent fields under a valid one).
void reseal(std::vector<uint8_t>& s) {
  std::memset(s.data() + 32, 0, 8);
  const uint64_t h = fnv1a64(s.data(), s.size());
  std::memcpy(s.data() + 32, &h, 8);
}

template <typename T>
void put_at(std::vector<uint8_t>& s, size_t off, T v) {
  std::memcpy(s.data() + off, &v, sizeof v);
}

TEST(Snapshot, EveryMutationIsRefusedAndChangesNothing) {
  for (const char* fixture : {"qwen3_5_moe", "qwen3_moe"}) {
    SCOPED_TRACE(fixture);
    Loaded m(fixture);
    const auto all = chunk_tokens(fixture);
    m.eval(std::vector<int32_t>(all.begin(), all.begin() + 9));
    const auto good = m.save();
    const auto next = [&] {  // the logits the next token gets when nothing changed
      Loaded r(fixture);
      r.eval(std::vector<int32_t>(all.begin(), all.begin() + 10));
      std::vector<float> l = r.eval({all[10]});
      return l;
    }();
    // attempts: mutations tried; refusals: those refused with a SnapshotError of a non-internal
    // kind that left the session's bytes as they were.
    int attempts = 0, refusals = 0;
    auto refused = [&](const std::vector<uint8_t>& bad, const std::string& what) {
      attempts++;
      bool ok = false;
      try {
        m.session->state_load(bad.data(), bad.size());
        ADD_FAILURE() << what << ": accepted";
      } catch (const SnapshotError& e) {
        EXPECT_NE(e.kind(), ErrorKind::kInternal) << what;
        ok = e.kind() != ErrorKind::kInternal;
      } catch (const std::exception& e) {
        ADD_FAILURE() << what << ": not a SnapshotError: " << e.what();
      }
      if (m.save() != good) {
        ADD_FAILURE() << what << ": changed the session";
        m.session->state_load(good.data(), good.size());
        ok = false;
      }
      refusals += ok;
    };
    // Truncations: every length of the header and around every section, and random ones.
    std::mt19937 rng(5);
    for (size_t n = 0; n <= kSnapshotHeaderBytes + 8; n++)
      refused(std::vector<uint8_t>(good.begin(), good.begin() + ptrdiff_t(n)),
              "truncated to " + std::to_string(n));
    for (int i = 0; i < 40; i++) {
      const size_t n = kSnapshotHeaderBytes + rng() % (good.size() - kSnapshotHeaderBytes);
      refused(std::vector<uint8_t>(good.begin(), good.begin() + ptrdiff_t(n)),
              "truncated to " + std::to_string(n));
    }
    refused(std::vector<uint8_t>(good.begin(), good.end() - 1), "one byte short");
    {
      auto longer = good;
      longer.push_back(0);
      refused(longer, "one byte long");
    }
    // Every bit of every header byte.
    for (size_t i = 0; i < kSnapshotHeaderBytes; i++)
      for (int bit = 0; bit < 8; bit++) {
        auto bad = good;
        bad[i] ^= uint8_t(1u << bit);
        refused(bad, "header byte " + std::to_string(i) + " bit " + std::to_string(bit));
      }
    // Bit flips in the payload.
    for (int i = 0; i < 200; i++) {
      auto bad = good;
      const size_t at = kSnapshotHeaderBytes + rng() % (good.size() - kSnapshotHeaderBytes);
      bad[at] ^= uint8_t(1u << (rng() % 8));
      refused(bad, "payload byte " + std::to_string(at));
    }
    // Random bytes, with and without a valid magic.
    for (size_t n : {size_t(1), size_t(63), size_t(64), size_t(100), good.size()}) {
      std::vector<uint8_t> bad(n);
      for (auto& b : bad) b = uint8_t(rng());
      refused(bad, "random " + std::to_string(n));
      if (n >= 8) {
        std::memcpy(bad.data(), good.data(), 8);
        refused(bad, "random with magic " + std::to_string(n));
      }
    }
    // Fields made inconsistent under a valid checksum.
    struct Crafted {
      const char* what;
      std::function<void(std::vector<uint8_t>&)> edit;
    };
    const int32_t vocab = m.model->spec().vocab_size;
    const std::vector<Crafted> crafted = {
        {"version 2", [](auto& s) { put_at<uint32_t>(s, 8, 2); }},
        {"header length 65", [](auto& s) { put_at<uint32_t>(s, 12, 65); }},
        {"payload size + 4", [](auto& s) { put_at<uint64_t>(s, 24, s.size() - 60); }},
        {"position + 1", [](auto& s) { put_at<int32_t>(s, 40, 10); }},
        {"position - 1", [](auto& s) { put_at<int32_t>(s, 40, 8); }},
        {"negative position", [](auto& s) { put_at<int32_t>(s, 40, -1); }},
        {"huge position", [](auto& s) { put_at<int32_t>(s, 40, 0x7fffffff); }},
        {"layers + 1", [](auto& s) { put_at<int32_t>(s, 44, 99); }},
        {"experts per token 0", [](auto& s) { put_at<int32_t>(s, 48, 0); }},
        {"flags", [](auto& s) { put_at<uint32_t>(s, 52, 1); }},
        {"reserved", [](auto& s) { put_at<uint64_t>(s, 56, 1); }},
        {"token = vocab", [vocab](auto& s) { put_at<int32_t>(s, 64 + 4, vocab); }},
        {"token < 0", [](auto& s) { put_at<int32_t>(s, 64, -5); }},
        {"model", [](auto& s) { s[16] ^= 1; }},
    };
    for (const Crafted& c : crafted) {
      auto bad = good;
      c.edit(bad);
      reseal(bad);
      refused(bad, c.what);
    }
    // Every mutation was refused cleanly, and all of them ran: the count follows from the
    // sections above (truncations H + 9 + 40 + 2, header bits 8 H, payload flips 200, random
    // buffers 5 + 4 with a magic, crafted fields), H the header size.
    const int H = int(kSnapshotHeaderBytes);
    EXPECT_EQ(attempts, (H + 9) + 40 + 2 + 8 * H + 200 + (5 + 4) + int(crafted.size()));
    EXPECT_EQ(refusals, attempts);
    // Still the same session: continuing gives the never-touched logits.
    m.eval({all[9]});
    EXPECT_TRUE(same_bits(m.eval({all[10]}), next));
  }
}

}  // namespace
}  // namespace moeflux::test
