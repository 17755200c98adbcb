// A Jinja2 interpreter for the subset that models' chat templates use.
//
// Semantics follow what transformers' apply_chat_template does: an ImmutableSandboxedEnvironment
// with trim_blocks=True, lstrip_blocks=True and the loopcontrols extension ({% break %},
// {% continue %}), HF's own `tojson` filter (json.dumps with ensure_ascii=False, so ", " and ": "
// separators unless indent is given) and the `raise_exception` / `strftime_now` globals.
// Values behave like the Python objects Jinja would see: str() of None is "None", of True is
// "True", of a list is its Python repr; a missing attribute or key is `undefined` (falsy, renders
// as ""), while using an undefined value (attribute, call, arithmetic) is an error, as in Jinja.
//
// Supported: {{ }}, {% %}, {# #}, whitespace control (-, +), if/elif/else, for (loop.*, for-else,
// `if` filter, tuple unpacking), set (name, tuple, ns.attr, block form), macro, filter blocks,
// break/continue, generation (HF); literals, lists, dicts, tuples, attribute/item access,
// slicing, arithmetic, ~, comparisons (chained), and/or/not, in/not in, tests, filters, string,
// dict and list methods. Not supported: inheritance, include/import, call blocks, recursive loops,
// `with`, `raw`, autoescape. Case mapping (upper/lower/title) is ASCII-only.
//
// Every failure is a moeflux::Error whose message names the template, line and column:
// syntax errors (kFormat), unknown filters/tests/tags (kUnsupported, at parse time),
// raise_exception() and runtime type errors (kInvalidArgument). Limits on steps, nesting depth,
// and string/list sizes turn pathological templates into errors instead of hangs or crashes.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace moeflux::jinja {

struct Options {
  bool trim_blocks = true;    // drop the first newline after a block tag
  bool lstrip_blocks = true;  // strip spaces/tabs before a block tag at the start of a line
  bool keep_trailing_newline = false;
  // Work budget: one step per statement, loop iteration and call, plus one per 64 bytes copied
  // and per container element scanned. Real chat templates use well under 1% of it.
  int64_t max_steps = 20'000'000;
  int max_nesting = 100;  // parser: nested expressions / blocks
  int max_depth = 500;    // runtime: nested evaluation incl. macro calls (C++ stack guard)
  size_t max_string_bytes = size_t{64} << 20;
  size_t max_list_items = 1'000'000;
};

class Template {
 public:
  // Parses `source`; throws Error naming `name`, line and column on a syntax error.
  explicit Template(std::string_view source, std::string name = "template", Options options = {});
  ~Template();
  Template(const Template&);
  Template(Template&&) noexcept;
  Template& operator=(const Template&);
  Template& operator=(Template&&) noexcept;

  // `context` must be an object: its members are the template's variables. Object member order
  // is kept (it shows in `tojson` and `items()`), hence ordered_json.
  std::string render(const nlohmann::ordered_json& context) const;

  const std::string& name() const;

  struct Program;

 private:
  std::shared_ptr<const Program> program_;
};

}  // namespace moeflux::jinja
