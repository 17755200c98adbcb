// HF checkpoint directory -> moeflux package. Every checkpoint quirk is resolved here, so the
// runtime reads one normalised form (see format/package.h for the layout and README for names).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "format/dtype.h"
#include "format/schema.h"  // TensorClass: what a matrix is for, the recipe's key

namespace moeflux {

struct QuantRecipe {
  std::string name = "none";
  std::map<TensorClass, DType> dtype;  // absent: unquantised (the float dtype of the package)
  int group = 64;                      // preferred group size; 128 and 32 are tried when it doesn't fit
};

// Named recipes: "none", "q8", "q4" (experts, attention, linear attention, shared expert,
// embedding q4; lm_head q8 — 4.5 / 8.5 bits per weight), "q2" (experts q2, the rest as q4).
QuantRecipe quant_recipe(const std::string& name);
// Per-class override: cls is one of experts, attn (full and linear attention), shared, dense,
// embed, lm-head; dtype one of q8, q4, q2, none.
void override_recipe(QuantRecipe& r, const std::string& cls, const std::string& dtype);

struct ConvertOptions {
  std::optional<DType> dtype;  // unquantised matrices; default: the checkpoint's own float dtype
  QuantRecipe quant;           // float tensors only: MLX-quantised matrices are kept as they are
  bool progress = true;
  bool force = false;  // replace an existing package in out_dir (whole; never a mix)
};

struct ConvertReport {
  std::vector<std::string> notes;  // skipped tensors, ties, unquantisable matrices (one line each)
  uint64_t resident_bytes = 0;
  uint64_t expert_bytes = 0;  // all layers, all experts (used bytes, not padding)
};

// Writes into a temporary directory beside out_dir and renames it into place when complete
// (util/atomic_file.h): a failure leaves out_dir as it was. out_dir must not exist, be empty,
// or with opt.force hold a package; it may not be, lie inside or contain hf_dir.
ConvertReport convert_checkpoint(const std::string& hf_dir, const std::string& out_dir,
                                 const ConvertOptions& opt);

}  // namespace moeflux
