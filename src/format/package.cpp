#include "format/package.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/stat.h>

#include <algorithm>

#include "format/mxfp4.h"
#include "util/error.h"
#include "util/json.h"
#include "util/mapped_file.h"

namespace moeflux {

using json = nlohmann::json;

int64_t PackedTensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

uint64_t PackedTensor::expected_bytes() const {
  if (is_quant_dtype(dtype))
    return shape.size() == 2 ? quant_layout(shape[0], shape[1], quant_bits(dtype), group).total() : 0;
  if (dtype == DType::kMxfp4)
    return shape.size() == 2 && shape[1] % kMxfp4Group == 0 ? mxfp4_bytes(shape[0], shape[1]) : 0;
  return uint64_t(numel()) * dtype_size(dtype);
}

const PackedTensor* Manifest::find(const std::string& name) const {
  for (const auto& t : resident)
    if (t.name == name) return &t;
  return nullptr;
}

std::string manifest_path(const std::string& dir) { return dir + "/moeflux.json"; }
std::string resident_path(const std::string& dir) { return dir + "/resident.bin"; }
std::string expert_file_path(const std::string& dir, int layer) {
  return fmt::format("{}/experts/layer-{:03d}.bin", dir, layer);
}

namespace {

json tensor_to_json(const PackedTensor& t) {
  json q = nullptr;
  if (is_quant_dtype(t.dtype)) q = json{{"group_size", t.group}};
  return json{{"name", t.name},   {"offset", t.offset}, {"nbytes", t.nbytes},
              {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"quant", q}};
}

struct Reader {
  std::string where;

  const json& field(const json& j, const char* k, const std::string& ctx) const {
    if (!j.is_object() || !j.contains(k))
      fail(ErrorKind::kFormat, "{}: {}missing field '{}'", where, ctx, k);
    return j[k];
  }
  uint64_t get_u64(const json& j, const char* k, const std::string& ctx = "") const {
    const json& v = field(j, k, ctx);
    if (!v.is_number_unsigned())
      fail(ErrorKind::kFormat, "{}: {}field '{}' must be a non-negative integer, got {}", where,
           ctx, k, json_brief(v));
    return v.get<uint64_t>();
  }
  std::string get_str(const json& j, const char* k, const std::string& ctx = "") const {
    const json& v = field(j, k, ctx);
    if (!v.is_string())
      fail(ErrorKind::kFormat, "{}: {}field '{}' must be a string", where, ctx, k);
    return v.get<std::string>();
  }

  PackedTensor tensor(const json& j, const std::string& ctx) const {
    PackedTensor t;
    t.name = get_str(j, "name", ctx);
    std::string c = ctx + "tensor '" + t.name + "': ";
    t.offset = get_u64(j, "offset", c);
    t.nbytes = get_u64(j, "nbytes", c);
    std::string dt = get_str(j, "dtype", c);
    if (!dtype_from_name(dt, &t.dtype) ||
        !((is_float_dtype(t.dtype) && t.dtype != DType::kF64) || is_quant_dtype(t.dtype) ||
          t.dtype == DType::kMxfp4))
      fail(ErrorKind::kFormat, "{}: {}unsupported dtype '{}'", where, c, dt);
    const json& shape = field(j, "shape", c);
    if (!shape.is_array() || shape.empty() || shape.size() > 4)
      fail(ErrorKind::kFormat, "{}: {}field 'shape' must be an array of 1-4 sizes", where, c);
    uint64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() == 0 || d.get<uint64_t>() > (1ull << 32))
        fail(ErrorKind::kFormat, "{}: {}bad dimension {} in shape", where, c, json_brief(d));
      // Four dims of up to 2^32 overflow 64 bits (numel() and the byte count would wrap).
      if (numel > (uint64_t(1) << 48) / d.get<uint64_t>())
        fail(ErrorKind::kFormat, "{}: {}shape {} is implausibly large", where, c,
             json_brief(shape));
      numel *= d.get<uint64_t>();
      t.shape.push_back(d.get<int64_t>());
    }
    if (is_quant_dtype(t.dtype)) {
      const json& q = field(j, "quant", c);
      t.group = int(get_u64(q, "group_size", c + "quant: "));
      if (t.shape.size() != 2 || !quantisable(t.shape[1], quant_bits(t.dtype), t.group))
        fail(ErrorKind::kFormat, "{}: {}{} with group_size {} does not fit shape [{}]", where, c, dt,
             t.group, fmt::join(t.shape, ", "));
    } else if (t.dtype == DType::kMxfp4 &&
               (t.shape.size() != 2 || t.shape[1] % kMxfp4Group != 0)) {
      fail(ErrorKind::kFormat, "{}: {}mxfp4 needs a matrix of whole groups of 32, not shape [{}]",
           where, c, fmt::join(t.shape, ", "));
    } else if (j.contains("quant") && !j["quant"].is_null()) {
      fail(ErrorKind::kFormat, "{}: {}field 'quant' must be null for dtype {}", where, c, dt);
    }
    if (t.expected_bytes() != t.nbytes)
      fail(ErrorKind::kFormat, "{}: {}{} x {} needs {} bytes, manifest says {}", where, c, dt,
           fmt::format("[{}]", fmt::join(t.shape, ", ")), t.expected_bytes(), t.nbytes);
    return t;
  }
};

uint64_t file_size_or_fail(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    fail(ErrorKind::kIo, "{}: missing package file", path);
  return uint64_t(st.st_size);
}

void check_no_overlap(std::vector<const PackedTensor*> ts, const std::string& where) {
  std::sort(ts.begin(), ts.end(), [](auto a, auto b) { return a->offset < b->offset; });
  for (size_t i = 1; i < ts.size(); i++)
    if (ts[i]->offset < ts[i - 1]->offset + ts[i - 1]->nbytes)
      fail(ErrorKind::kFormat, "{}: tensors '{}' and '{}' overlap", where, ts[i - 1]->name,
           ts[i]->name);
}

}  // namespace

json Manifest::to_json() const {
  json res = json::array();
  for (const auto& t : resident) res.push_back(tensor_to_json(t));
  json parts = json::array();
  for (const auto& t : experts.parts) parts.push_back(tensor_to_json(t));
  json spec_json;
  moeflux::to_json(spec_json, spec);
  return json{{"format", "moeflux"},
              {"format_version", format_version},
              {"model", spec_json},
              {"resident", {{"file", "resident.bin"}, {"bytes", resident_bytes}, {"tensors", res}}},
              {"experts",
               {{"count", experts.count},
                {"bytes", experts.bytes},
                {"stride", experts.stride},
                {"parts", parts},
                {"layers", experts.layers}}},
              {"tokenizer", tokenizer_files},
              {"provenance", provenance}};
}

void write_manifest(const std::string& dir, const Manifest& m) {
  write_text_file(manifest_path(dir), m.to_json().dump(1) + "\n");
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = manifest_path(dir);
  if (!file_exists(path))
    fail(ErrorKind::kIo, "{}: not a moeflux package (no moeflux.json)", dir);
  const json j = parse_json(read_text_file(path), path);
  Reader r{path};
  if (!j.is_object() || !j.contains("format") || j["format"] != "moeflux")
    fail(ErrorKind::kFormat, "{}: not a moeflux manifest (field 'format' != \"moeflux\")", path);
  Manifest m;
  uint64_t version = r.get_u64(j, "format_version");
  if (version != kPackageFormatVersion)
    fail(ErrorKind::kUnsupported, "{}: package format version {} (this moeflux reads {})", path,
         version, kPackageFormatVersion);
  m.format_version = int(version);
  m.spec = spec_from_json(r.field(j, "model", ""), path);
  const ModelSpec& s = m.spec;

  const json& res = r.field(j, "resident", "");
  m.resident_bytes = r.get_u64(res, "bytes", "resident: ");
  const json& tensors = r.field(res, "tensors", "resident: ");
  if (!tensors.is_array()) fail(ErrorKind::kFormat, "{}: resident.tensors must be an array", path);
  std::vector<const PackedTensor*> all;
  for (const auto& t : tensors) m.resident.push_back(r.tensor(t, "resident "));
  for (const auto& t : m.resident) {
    if (t.offset % kFileAlign)
      fail(ErrorKind::kFormat, "{}: resident tensor '{}' offset {} is not {}-byte aligned", path,
           t.name, t.offset, kFileAlign);
    if (t.nbytes > m.resident_bytes || t.offset > m.resident_bytes - t.nbytes)  // no wrap-around
      fail(ErrorKind::kFormat,
           "{}: resident tensor '{}' ({} bytes at offset {}) runs past resident.bin ({} bytes)",
           path, t.name, t.nbytes, t.offset, m.resident_bytes);
    all.push_back(&t);
  }
  check_no_overlap(all, path + " resident");
  for (size_t i = 0; i < m.resident.size(); i++)
    for (size_t k = i + 1; k < m.resident.size(); k++)
      if (m.resident[i].name == m.resident[k].name)
        fail(ErrorKind::kFormat, "{}: resident tensor '{}' listed twice", path, m.resident[i].name);

  const json& ex = r.field(j, "experts", "");
  const uint64_t count = r.get_u64(ex, "count", "experts: ");
  if (count > (1u << 20))
    fail(ErrorKind::kFormat, "{}: experts.count {} is implausibly large", path, count);
  m.experts.count = int(count);
  m.experts.bytes = r.get_u64(ex, "bytes", "experts: ");
  m.experts.stride = r.get_u64(ex, "stride", "experts: ");
  const json& parts = r.field(ex, "parts", "experts: ");
  if (!parts.is_array()) fail(ErrorKind::kFormat, "{}: experts.parts must be an array", path);
  for (const auto& t : parts) m.experts.parts.push_back(r.tensor(t, "expert part "));
  const json& layers = r.field(ex, "layers", "experts: ");
  if (!layers.is_array()) fail(ErrorKind::kFormat, "{}: experts.layers must be an array", path);
  for (const auto& l : layers) {
    if (!l.is_number_unsigned() || l.get<uint64_t>() >= uint64_t(s.n_layers))
      fail(ErrorKind::kFormat, "{}: experts.layers entry {} is not a layer index", path,
           json_brief(l));
    m.experts.layers.push_back(l.get<int>());
  }
  std::vector<int> want;
  for (int i = 0; i < s.n_layers; i++)
    if (s.ffn[size_t(i)] == FfnKind::kMoe) want.push_back(i);
  if (m.experts.layers != want)
    fail(ErrorKind::kFormat, "{}: experts.layers [{}] does not match the MoE layers [{}]", path,
         fmt::join(m.experts.layers, ", "), fmt::join(want, ", "));
  if (!want.empty()) {
    if (m.experts.count != s.n_experts)
      fail(ErrorKind::kFormat, "{}: experts.count {} != model n_experts {}", path, m.experts.count,
           s.n_experts);
    if (m.experts.stride % kFileAlign || m.experts.stride < m.experts.bytes ||
        m.experts.stride > (uint64_t(1) << 40))  // count x stride must not wrap
      fail(ErrorKind::kFormat,
           "{}: experts.stride {} must be a multiple of {}, >= bytes {} and at most 1 TiB", path,
           m.experts.stride, kFileAlign, m.experts.bytes);
    std::vector<const PackedTensor*> ps;
    for (const auto& p : m.experts.parts) {
      if (p.offset % kPartAlign || p.nbytes > m.experts.bytes ||
          p.offset > m.experts.bytes - p.nbytes)  // no wrap-around
        fail(ErrorKind::kFormat,
             "{}: expert part '{}' ({} bytes at offset {}) is misaligned or outside the "
             "{}-byte record",
             path, p.name, p.nbytes, p.offset, m.experts.bytes);
      ps.push_back(&p);
    }
    check_no_overlap(ps, path + " expert parts");
  }
  if (j.contains("tokenizer") && j["tokenizer"].is_array())
    for (const auto& t : j["tokenizer"])
      if (t.is_string()) m.tokenizer_files.push_back(t.get<std::string>());
  if (j.contains("provenance")) m.provenance = j["provenance"];

  // The files on disk must be as long as the manifest says (a truncated copy fails here, not
  // with a fault in the middle of a forward pass).
  uint64_t rsize = file_size_or_fail(resident_path(dir));
  if (rsize != m.resident_bytes)
    fail(ErrorKind::kFormat, "{}: is {} bytes, manifest says {} (truncated or corrupted?)",
         resident_path(dir), rsize, m.resident_bytes);
  for (int l : m.experts.layers) {
    std::string p = expert_file_path(dir, l);
    uint64_t want_size = uint64_t(m.experts.count) * m.experts.stride;
    uint64_t have = file_size_or_fail(p);
    if (have != want_size)
      fail(ErrorKind::kFormat, "{}: is {} bytes, expected {} ({} experts x {} stride): truncated?",
           p, have, want_size, m.experts.count, m.experts.stride);
  }
  return m;
}

ExpertLayout make_expert_layout(const ModelSpec& spec, std::vector<PackedTensor> parts) {
  ExpertLayout ex;
  uint64_t off = 0;
  for (PackedTensor& t : parts) {
    off = align_up(off, kPartAlign);
    t.offset = off;
    off += t.nbytes;
  }
  ex.parts = std::move(parts);
  ex.count = spec.n_experts;
  ex.bytes = off;
  ex.stride = align_up(off, kFileAlign);
  for (int l = 0; l < spec.n_layers; l++)
    if (spec.ffn[size_t(l)] == FfnKind::kMoe) ex.layers.push_back(l);
  return ex;
}

}  // namespace moeflux
