// `moeflux perplexity`: llama.cpp-style perplexity of a text. The text is tokenised whole (no
// BOS added) and cut into non-overlapping windows of --ctx tokens from the start (the remainder
// is dropped); each window is evaluated from a cleared session and the tokens at window
// positions ctx/2 .. ctx-1 are scored, each predicted from the window's tokens before it.
// Prints ppl = exp(mean NLL) ± ppl * stderr(NLL), as llama.cpp does.
//
// --kl-ref <package> also runs a reference package (e.g. the unquantised one) over the same
// windows and reports the mean KL divergence KL(ref || this) over the scored positions, its
// stderr, and how often both agree on the top token. --kl-exact takes the model itself as the
// reference, run with --exact (the fast int8 path's quality). The reference always runs exact.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "text/tokenizer.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace moeflux::cli {
namespace {

// log-softmax of `v` into `out` in double.
void log_softmax(const float* v, int n, std::vector<double>& out) {
  out.resize(size_t(n));
  const double mx = *std::max_element(v, v + n);
  double sum = 0;
  for (int i = 0; i < n; i++) sum += std::exp(double(v[i]) - mx);
  const double lse = mx + std::log(sum);
  for (int i = 0; i < n; i++) out[size_t(i)] = double(v[i]) - lse;
}

struct MeanErr {
  double sum = 0, sum2 = 0;
  uint64_t n = 0;
  void add(double v) {
    sum += v;
    sum2 += v * v;
    n++;
  }
  double mean() const { return n ? sum / double(n) : 0.0; }
  double stderr_() const {
    if (n < 2) return 0.0;
    const double m = mean();
    return std::sqrt(std::max(0.0, sum2 / double(n) - m * m) / double(n - 1));
  }
};

int cmd_perplexity(const ModelOptions& mo, const std::string& file, const std::string& tok_path,
                   const std::string& kl_ref, bool kl_exact, int max_windows) {
  const int ctx = mo.ctx > 0 ? mo.ctx : 512;
  if (ctx < 4) fail(ErrorKind::kInvalidArgument, "--ctx {}: need at least 4 tokens per window", ctx);
  Loaded L = open_model(mo);
  const ModelSpec& s = L.model->spec();
  const std::string tp = tok_path.empty() ? L.model->dir() + "/tokenizer.json" : tok_path;
  if (!std::filesystem::exists(tp))
    fail(ErrorKind::kIo, "{}: no tokenizer (convert from a checkpoint that has tokenizer.json, or pass --tokenizer)", tp);
  Tokenizer tok = Tokenizer::load(tp);
  const std::string text = read_text_file(file);
  auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.encode(text, false);
  const double tok_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int windows = int(ids.size() / size_t(ctx));
  if (max_windows > 0) windows = std::min(windows, max_windows);
  if (windows == 0)
    fail(ErrorKind::kInvalidArgument, "{}: {} tokens is less than one window of --ctx {}", file,
         ids.size(), ctx);
  for (int32_t id : ids)
    if (id >= s.vocab_size)
      fail(ErrorKind::kInvalidArgument, "{}: the tokenizer gives id {}, past the model's vocabulary of {}",
           tp, id, s.vocab_size);
  fmt::print(stderr, "perplexity: {} tokens ({:.1f} MB/s tokenising), {} windows of {}, scoring positions {}..{}\n",
             ids.size(), double(text.size()) / 1e6 / std::max(tok_s, 1e-9), windows, ctx, ctx / 2, ctx - 1);

  SessionParams sp = session_params(mo);
  sp.ctx = ctx;
  Session session(*L.model, *L.backend, *L.store, sp);
  std::unique_ptr<Model> ref_model;
  std::unique_ptr<ExpertStore> ref_store;
  std::unique_ptr<Context> ref_backend;  // before ref_session, which releases into it
  std::unique_ptr<Session> ref_session;
  if (!kl_ref.empty() && kl_exact)
    fail(ErrorKind::kInvalidArgument, "--kl-ref and --kl-exact: give one reference");
  if (kl_exact || !kl_ref.empty())
    ref_backend = L.backend->device().context(ContextOptions{L.backend->threads(), true});
  if (kl_exact) {
    SessionParams rp = sp;
    ref_session = std::make_unique<Session>(*L.model, *ref_backend, *L.store, rp);
  } else if (!kl_ref.empty()) {
    ref_model = Model::load(kl_ref);
    if (ref_model->spec().vocab_size != s.vocab_size)
      fail(ErrorKind::kInvalidArgument, "--kl-ref {}: vocabulary {} differs from the model's {}",
           kl_ref, ref_model->spec().vocab_size, s.vocab_size);
    ref_store = std::make_unique<ExpertStore>(*ref_model);
    SessionParams rp;
    rp.ctx = ctx;
    ref_session = std::make_unique<Session>(*ref_model, *ref_backend, *ref_store, rp);
  }

  const int V = s.vocab_size, first = ctx / 2;
  std::vector<float> logits(size_t(ctx) * V), ref_logits;
  if (ref_session) ref_logits.resize(logits.size());
  std::vector<double> lp, rlp;
  MeanErr nll, kl;
  uint64_t same_top = 0;
  auto e0 = std::chrono::steady_clock::now();
  for (int w = 0; w < windows; w++) {
    const int32_t* win = ids.data() + size_t(w) * ctx;
    session.clear();
    session.eval(win, ctx, logits.data(), true);
    if (ref_session) {
      ref_session->clear();
      ref_session->eval(win, ctx, ref_logits.data(), true);
    }
    for (int j = first; j < ctx; j++) {
      const float* row = logits.data() + size_t(j - 1) * V;
      log_softmax(row, V, lp);
      nll.add(-lp[size_t(win[j])]);
      if (ref_session) {
        const float* rrow = ref_logits.data() + size_t(j - 1) * V;
        log_softmax(rrow, V, rlp);
        double d = 0;
        for (int i = 0; i < V; i++) d += std::exp(rlp[size_t(i)]) * (rlp[size_t(i)] - lp[size_t(i)]);
        kl.add(d);
        same_top += std::max_element(row, row + V) - row == std::max_element(rrow, rrow + V) - rrow;
      }
    }
    const double ppl = std::exp(nll.mean());
    fmt::print(stderr, "[{}/{}] ppl {:.4f}\n", w + 1, windows, ppl);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
  const double ppl = std::exp(nll.mean());
  fmt::print("ppl = {:.4f} +/- {:.4f}  ({} windows of {}, {} tokens scored, mean NLL {:.6f})\n", ppl,
             ppl * nll.stderr_(), windows, ctx, nll.n, nll.mean());
  if (ref_session)
    fmt::print("kl  = {:.6f} +/- {:.6f}  vs {} (same top token {:.2f}%)\n", kl.mean(), kl.stderr_(),
               kl_exact ? std::string("--exact") : kl_ref, 100.0 * double(same_top) / double(kl.n));
  fmt::print(stderr, "{:.1f} tokens/s evaluated; {}\n", double(windows) * ctx / secs,
             store_summary(*L.store, windows * ctx));
  if (mo.stats) print_store_stats(*L.store, stderr);
  return 0;
}

}  // namespace

Command add_perplexity(CLI::App& app) {
  struct Args {
    ModelOptions mo;
    std::string file, tokenizer, kl_ref;
    int chunks = 0;
    bool kl_exact = false;
  };
  auto a = std::make_shared<Args>();
  auto* p = app.add_subcommand("perplexity", "perplexity of a text file (llama.cpp-style windows of --ctx, default 512)");
  add_model_options(p, a->mo);
  p->add_option("-f,--file", a->file, "text file")->required();
  p->add_option("--tokenizer", a->tokenizer, "tokenizer.json (default: the package's)");
  p->add_option("--kl-ref", a->kl_ref, "reference package: also report KL(ref || model)");
  p->add_flag("--kl-exact", a->kl_exact,
              "also report KL(model run with --exact || model as run), e.g. with --int8");
  p->add_option("--chunks", a->chunks, "at most this many windows (0: all)");
  return {p, [a] { return cmd_perplexity(a->mo, a->file, a->tokenizer, a->kl_ref, a->kl_exact, a->chunks); }};
}

}  // namespace moeflux::cli
