// `moeflux synth`: a random-weight package of a real model's shape (src/synth/synth.h).
#include <fmt/format.h>

#include <memory>

#include "cli/commands.h"
#include "synth/synth.h"
#include "util/error.h"
#include "util/progress.h"

namespace moeflux::cli {
namespace {

struct SynthArgs {
  std::string preset, out, quant = "q4", tokenizer;
  int layers = -1;  // -1: all
  uint64_t seed = 0;
  double skew = 0;
  int threads = 0;
  bool quiet = false, dry_run = false, list = false, force = false;
};

uint64_t package_bytes(const Manifest& m) {
  return m.resident_bytes + m.experts.stride * uint64_t(m.experts.count) * m.experts.layers.size();
}

int cmd_list() {
  fmt::print("{:<20} {:>6} {:>16} {:>16} {:>11} {:>11}  {}\n", "preset", "layers", "params (B)",
             "active (B)", "q4", "q4 8 lay.", "shape of");
  for (const auto& p : synth_presets()) {
    const ModelSpec s = synth_spec(p.name);
    const ParamCount c = count_params(s);
    auto with_published = [](uint64_t n, double pub) {
      return pub > 0 ? fmt::format("{:.2f} ({:g})", double(n) / 1e9, pub)
                     : fmt::format("{:.3f}", double(n) / 1e9);
    };
    fmt::print(
        "{:<20} {:>6} {:>16} {:>16} {:>11} {:>11}  {}\n", p.name, s.n_layers,
        with_published(c.total, p.total_b), with_published(c.active, p.active_b),
        format_bytes(package_bytes(synth_plan(s, "q4"))),
        format_bytes(package_bytes(synth_plan(cut_layers(s, std::min(8, s.n_layers)), "q4"))),
        p.hf_model);
  }
  fmt::print(
      "(published counts in parentheses; active = all but the experts a token is not "
      "routed to)\n");
  return 0;
}

int cmd_synth(const SynthArgs& a) {
  if (a.list) return cmd_list();
  if (a.preset.empty())
    fail(ErrorKind::kInvalidArgument, "--preset is required (presets: {})", synth_preset_names());
  const ModelSpec full = synth_spec(a.preset);
  const ModelSpec spec =
      a.layers >= 0 || a.layers < -1 ? cut_layers(full, a.layers, a.preset) : full;
  quant_recipe(a.quant);  // names the recipes when the name is wrong
  const Manifest plan = synth_plan(spec, a.quant);
  const ParamCount c = count_params(spec);
  if (a.dry_run) {
    fmt::print(
        "{} ({} of {} layers), --quant {}: {} parameters ({} active), package {} "
        "(resident {}, experts {})\n",
        a.preset, spec.n_layers, full.n_layers, a.quant, c.total, c.active,
        format_bytes(package_bytes(plan)), format_bytes(plan.resident_bytes),
        format_bytes(package_bytes(plan) - plan.resident_bytes));
    return 0;
  }
  if (a.out.empty()) fail(ErrorKind::kInvalidArgument, "missing the output package directory");
  SynthOptions opt;
  opt.preset = a.preset;
  opt.quant = a.quant;
  opt.seed = a.seed;
  opt.routing_skew = a.skew;
  opt.full_layers = full.n_layers;
  opt.tokenizer = a.tokenizer;
  opt.threads = a.threads;
  opt.progress = !a.quiet;
  opt.force = a.force;
  const SynthReport r = synth_package(spec, a.out, opt);
  fmt::print(stderr, "wrote {}: {} ({} layers), resident {}, experts {} in {:.2f}s ({:.0f} MB/s)\n",
             a.out, a.preset, spec.n_layers, format_bytes(r.resident_bytes),
             format_bytes(r.expert_bytes), r.seconds, double(r.total_bytes()) / 1e6 / r.seconds);
  return 0;
}

}  // namespace

Command add_synth(CLI::App& app) {
  auto a = std::make_shared<SynthArgs>();
  auto* c = app.add_subcommand(
      "synth", "write a random-weight package of a real model's shape (for speed measurements)");
  c->add_option("package_dir", a->out, 
                "output package directory (must not exist or be empty, unless --force)");
  c->add_option("--preset", a->preset, "model shape: " + synth_preset_names());
  c->add_option("--layers", a->layers,
                "keep the first N layers (default: all; the layer pattern is kept)");
  c->add_option("--quant", a->quant,
                "quantisation recipe as convert's: none, q8, q4 (default: experts/attention/"
                "shared/embedding q4, lm_head q8), q2, mxfp4 (experts MXFP4, the rest bf16: "
                "gpt-oss as released)");
  c->add_option("--seed", a->seed, "random seed (the same seed writes the same bytes)");
  c->add_option("--routing-skew", a->skew,
                "expert popularity: the expert of rank r gets router logit offset -S*ln(r) "
                "(Zipf-like; 0: uniform; 0.25: the top 10% of experts take ~30% of selections, "
                "1: ~90%)");
  c->add_option("--tokenizer", a->tokenizer,
                "tokenizer.json to copy into the package (tokenizer_config.json beside it too)");
  c->add_option("-t,--threads", a->threads, "generator threads (0: one per core)");
  c->add_flag("-q,--quiet", a->quiet, "no progress bar");
  c->add_flag("--force", a->force,
              "replace the package already in package_dir, whole, once the new one is complete");
  c->add_flag("--dry-run", a->dry_run, "print the parameter count and package size, write nothing");
  c->add_flag("--list", a->list, "list the presets with parameter counts and q4 sizes");
  return {c, [a] { return cmd_synth(*a); }};
}

}  // namespace moeflux::cli
