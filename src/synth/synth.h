// Random-weight packages of real models' shapes, written straight in the package format
// (`moeflux synth`, docs/2026-11-26-synth.md), so speed can be measured without downloads.
//
// Nothing is held whole: every file is described as byte ranges with a generator each, and is
// produced in bounded chunks (two buffers of kSynthChunkBytes) generated in parallel while the
// previous chunk is written. Random values come from a counter-based generator keyed by
// (seed, tensor name, position), so the bytes do not depend on the thread count or the chunking,
// and a `--layers N` cut holds the same bytes as the first N layers of the whole model.
//
// Quantised matrices are made directly in packed form: random u32 words with one bf16 scale s
// and bias -(2^b - 1)/2 * s per group give values uniform on a symmetric grid of 2^b levels
// (std = s * sqrt((4^b - 1) / 12)).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "convert/convert.h"
#include "format/package.h"
#include "format/spec.h"

namespace moeflux {

constexpr uint64_t kSynthChunkBytes = 32ull << 20;  // two of them in flight: <= 64 MiB held

struct SynthPreset {
  std::string name;
  std::string hf_model;              // the Hugging Face repository whose config.json it follows
  std::string model_type;            // config.json model_type (provenance, `moeflux inspect`)
  double total_b = 0, active_b = 0;  // published parameter counts, billions (0: none)
};

// The presets, in the order `--help` lists them.
const std::vector<SynthPreset>& synth_presets();
// "tiny, qwen3.5-35b-a3b, ..." for error messages.
std::string synth_preset_names();
// The normalised spec of a preset. Throws Error(kInvalidArgument) listing the presets.
ModelSpec synth_spec(const std::string& preset);
const SynthPreset& synth_preset(const std::string& name);
// The first `layers` layers of `spec` (layer kinds kept). Throws Error(kInvalidArgument) naming
// --layers when layers is not in [1, spec.n_layers].
ModelSpec cut_layers(const ModelSpec& spec, int layers, const std::string& what = "");

// Parameter counts from the spec alone. `active` is what one token uses: everything except the
// experts it was not routed to (embedding table included, as Mistral's 12.9B and Qwen's 3.3B
// for Qwen3-30B-A3B count it).
struct ParamCount {
  uint64_t total = 0, active = 0, embedding = 0;
};
ParamCount count_params(const ModelSpec& spec);

struct SynthOptions {
  std::string preset = "custom";  // provenance only
  std::string quant = "q4";       // a convert recipe: none | q8 | q4 | q2
  uint64_t seed = 0;
  // Expert popularity: router rows are biased so expert of popularity rank r (1-based, a random
  // order per layer) gets a logit offset of -skew * ln(r): Zipf-like with exponent `skew`.
  // 0: every expert equally likely.
  double routing_skew = 0;
  // Depth the value scales are sized for: block outputs are scaled so the residual stream grows
  // by about sqrt(2) over `full_layers` layers. 0: spec.n_layers. A --layers cut passes the
  // preset's depth so its layers are the whole model's first layers, bytes included.
  int full_layers = 0;
  std::string tokenizer;  // tokenizer.json to copy in (with tokenizer_config.json beside it)
  int threads = 0;        // generator threads; 0: one per core
  bool progress = true;
  bool force = false;  // replace an existing package in out_dir (whole; never a mix)
};

struct SynthReport {
  uint64_t resident_bytes = 0;  // resident.bin
  uint64_t expert_bytes = 0;    // all expert files (count x stride x layers)
  uint64_t total_bytes() const { return resident_bytes + expert_bytes; }
  double seconds = 0;  // generating and writing, tokenizer and manifest included
};

// The manifest a synth package of `spec` has under `quant` (offsets, sizes), without writing.
Manifest synth_plan(const ModelSpec& spec, const std::string& quant);

// Writes the package into `out_dir`, which must not exist, be empty, or with opt.force hold a
// package (replaced whole). The files are written into a temporary directory beside it and
// renamed into place when complete (util/atomic_file.h). Throws Error naming the directory or
// file (not writable, not empty, not enough space, tokenizer too large).
SynthReport synth_package(const ModelSpec& spec, const std::string& out_dir,
                          const SynthOptions& opt);

}  // namespace moeflux
