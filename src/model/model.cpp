#include "model/model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>

#include "format/mxfp4.h"
#include "format/schema.h"
#include "util/error.h"

namespace moeflux {

Mat mat_view(const PackedTensor& t, const uint8_t* base) {
  Mat m{t.dtype, t.shape[0], t.shape.size() > 1 ? t.shape[1] : 1, base};
  if (is_quant_dtype(t.dtype)) {
    const QuantLayout q = quant_layout(m.rows, m.cols, quant_bits(t.dtype), t.group);
    m.scales = reinterpret_cast<const uint16_t*>(base + q.packed_bytes);
    m.biases = reinterpret_cast<const uint16_t*>(base + q.packed_bytes + q.scales_bytes);
    m.group = t.group;
  } else if (t.dtype == DType::kMxfp4) {
    m.e8m0 = base + mxfp4_packed_bytes(m.rows, m.cols);
    m.group = kMxfp4Group;
  }
  return m;
}

Mat mat_rows(const Mat& m, int64_t r0, int64_t n) {
  MF_CHECK(r0 >= 0 && n >= 0 && r0 + n <= m.rows);
  Mat v = m;
  v.rows = n;
  const auto* base = static_cast<const uint8_t*>(m.data);
  if (is_quant_dtype(m.dtype)) {
    const int64_t wpr = m.cols * quant_bits(m.dtype) / 32, gpr = m.cols / m.group;
    v.data = base + size_t(r0 * wpr) * sizeof(uint32_t);
    v.scales = m.scales + r0 * gpr;
    v.biases = m.biases + r0 * gpr;
  } else if (m.dtype == DType::kMxfp4) {
    v.data = base + size_t(r0 * m.cols / 2);
    v.e8m0 = m.e8m0 + r0 * (m.cols / kMxfp4Group);
  } else {
    v.data = base + size_t(r0 * m.cols) * dtype_size(m.dtype);
  }
  return v;
}

void mat_row_f32(const Mat& m, int64_t r, float* out) {
  if (is_quant_dtype(m.dtype)) {
    const int bits = quant_bits(m.dtype);
    const int64_t wpr = m.cols * bits / 32, gpr = m.cols / m.group;
    dequantize_row(static_cast<const uint32_t*>(m.data) + r * wpr, m.scales + r * gpr,
                   m.biases + r * gpr, m.cols, bits, m.group, out);
  } else if (m.dtype == DType::kMxfp4) {
    mxfp4_dequantize_row(static_cast<const uint8_t*>(m.data) + r * m.cols / 2,
                         m.e8m0 + r * (m.cols / kMxfp4Group), m.cols, out);
  } else {
    to_f32(m.dtype, static_cast<const uint8_t*>(m.data) + size_t(r * m.cols) * dtype_size(m.dtype),
           out, size_t(m.cols));
  }
}

const PackedTensor& Model::find(const std::string& name) {
  const PackedTensor* t = manifest_.find(name);
  if (!t) fail(ErrorKind::kFormat, "{}: missing tensor '{}'", manifest_path(dir_), name);
  return *t;
}

Mat Model::bind_mat(const std::string& name, int64_t rows, int64_t cols, bool f32_only) {
  const PackedTensor& t = find(name);
  if (t.shape != std::vector<int64_t>{rows, cols})
    fail(ErrorKind::kFormat, "{}: tensor '{}' has shape [{}], expected [{}, {}]",
         manifest_path(dir_), name, fmt::join(t.shape, ", "), rows, cols);
  if (f32_only && t.dtype != DType::kF32)
    fail(ErrorKind::kFormat, "{}: tensor '{}' has dtype {}, expected f32", manifest_path(dir_),
         name, dtype_name(t.dtype));
  return mat_view(t, resident_.data() + t.offset);
}

const float* Model::bind_vec(const std::string& name, std::vector<int64_t> shape) {
  const PackedTensor& t = find(name);
  if (t.shape != shape)
    fail(ErrorKind::kFormat, "{}: tensor '{}' has shape [{}], expected [{}]", manifest_path(dir_),
         name, fmt::join(t.shape, ", "), fmt::join(shape, ", "));
  if (t.dtype != DType::kF32)
    fail(ErrorKind::kFormat, "{}: tensor '{}' has dtype {}, expected f32", manifest_path(dir_),
         name, dtype_name(t.dtype));
  return reinterpret_cast<const float*>(resident_.data() + t.offset);
}

namespace {

// The LayerWeights field each layer tensor of the schema (format/schema.h) binds to.
using MatField = Mat LayerWeights::*;
using VecField = const float* LayerWeights::*;
const std::map<std::string, MatField, std::less<>> kMatFields = {
    {"attn_q", &LayerWeights::q},           {"attn_k", &LayerWeights::k},
    {"attn_v", &LayerWeights::v},           {"attn_o", &LayerWeights::o},
    {"lin_qkv", &LayerWeights::lin_qkv},    {"lin_z", &LayerWeights::lin_z},
    {"lin_b", &LayerWeights::lin_b},        {"lin_a", &LayerWeights::lin_a},
    {"lin_out", &LayerWeights::lin_out},    {"moe_router", &LayerWeights::router},
    {"shexp_gate", &LayerWeights::sh_gate}, {"shexp_up", &LayerWeights::sh_up},
    {"shexp_down", &LayerWeights::sh_down}, {"shexp_router", &LayerWeights::sh_router},
    {"ffn_gate", &LayerWeights::ffn_gate},  {"ffn_up", &LayerWeights::ffn_up},
    {"ffn_down", &LayerWeights::ffn_down},  {"attn_q_a", &LayerWeights::q_a},
    {"attn_q_b", &LayerWeights::q_b},       {"attn_kv_a", &LayerWeights::kv_a},
    {"attn_k_b", &LayerWeights::k_b},       {"attn_v_b", &LayerWeights::v_b},
};
const std::map<std::string, VecField, std::less<>> kVecFields = {
    {"attn_norm", &LayerWeights::attn_norm},
    {"ffn_norm", &LayerWeights::ffn_norm},
    {"attn_q_norm", &LayerWeights::q_norm},
    {"attn_k_norm", &LayerWeights::k_norm},
    {"lin_conv", &LayerWeights::conv},
    {"lin_A_log", &LayerWeights::A_log},
    {"lin_dt_bias", &LayerWeights::dt_bias},
    {"lin_norm", &LayerWeights::lin_norm},
    {"attn_q_a_norm", &LayerWeights::q_a_norm},
    {"attn_kv_a_norm", &LayerWeights::kv_a_norm},
    {"moe_router_bias", &LayerWeights::router_bias},
    {"attn_q_bias", &LayerWeights::q_bias},
    {"attn_k_bias", &LayerWeights::k_bias},
    {"attn_v_bias", &LayerWeights::v_bias},
    {"attn_o_bias", &LayerWeights::o_bias},
    {"attn_sinks", &LayerWeights::sinks},
    {"moe_router_logit_bias", &LayerWeights::router_logit_bias},
    {"moe_gate_bias", &LayerWeights::gate_bias},
    {"moe_up_bias", &LayerWeights::up_bias},
    {"moe_down_bias", &LayerWeights::down_bias},
};

}  // namespace

Model::~Model() {
  for (int fd : expert_fds_) ::close(fd);
}

std::string Model::changed_on_disk() const {
  const FileIdentity man = file_identity(manifest_path(dir_));
  const FileIdentity res = file_identity(resident_path(dir_));
  const char* what = !man.exists || !res.exists ? "removed"
                     : man.dev != manifest_id_.dev || man.ino != manifest_id_.ino ||
                             res.dev != resident_.identity().dev || res.ino != resident_.identity().ino
                         ? "replaced"
                     : !(man == manifest_id_) || !(res == resident_.identity()) ? "rewritten in place"
                                                                                 : nullptr;
  if (!what) return "";
  return fmt::format("{}: the package on disk was {} after it was loaded; this process goes on "
                     "with the loaded one (restart to use the new one)",
                     dir_, what);
}

void Model::check_resident() const {
  uint64_t now = 0;
  if (resident_.shrunk(&now))
    fail(ErrorKind::kIo,
         "{}: shrank from {} to {} bytes under the running process (rewritten in place, not "
         "replaced); restart to load the package again",
         resident_.path(), resident_.size(), now);
}

std::unique_ptr<Model> Model::load(const std::string& dir, bool use_mmap) {
  auto m = std::unique_ptr<Model>(new Model());
  m->dir_ = dir;
  // The files are opened one after another by name; a package renamed into place meanwhile
  // would give a mix, so each is checked against its name once all are open.
  const FileIdentity dir_id = file_identity(dir);
  m->manifest_id_ = file_identity(manifest_path(dir));
  m->manifest_ = read_manifest(dir);
  m->resident_ = MappedFile(resident_path(dir), use_mmap ? MappedFile::kMap : MappedFile::kRead);
  for (int layer : m->manifest_.experts.layers) {
    const std::string path = expert_file_path(dir, layer);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(ErrorKind::kIo, "{}: cannot open: {}", path, std::strerror(errno));
    m->expert_fds_.push_back(fd);
  }
  auto same = [](const FileIdentity& a, const FileIdentity& b) {
    return a.exists && b.exists && a.dev == b.dev && a.ino == b.ino;
  };
  bool stable = same(file_identity(dir), dir_id) &&
                file_identity(manifest_path(dir)) == m->manifest_id_ &&
                same(file_identity(resident_path(dir)), m->resident_.identity());
  for (size_t i = 0; stable && i < m->expert_fds_.size(); i++)
    stable = same(file_identity(expert_file_path(dir, m->manifest_.experts.layers[i])),
                  fd_identity(m->expert_fds_[i]));
  if (!stable)
    fail(ErrorKind::kIo, "{}: the package changed on disk while it was loading; load it again",
         dir);
  const ModelSpec& s = m->manifest_.spec;

  // Expert parts must have the shapes the spec implies.
  if (!m->manifest_.experts.layers.empty()) {
    const auto& parts = m->manifest_.experts.parts;
    const std::vector<TensorSpec> want = expert_schema(s);
    if (parts.size() != want.size())
      fail(ErrorKind::kFormat, "{}: experts.parts must list gate, up, down", manifest_path(dir));
    for (size_t p = 0; p < want.size(); p++)
      if (parts[p].name != want[p].name || parts[p].shape != want[p].shape)
        fail(ErrorKind::kFormat, "{}: expert part {} is '{}' [{}], expected '{}' [{}]",
             manifest_path(dir), p, parts[p].name, fmt::join(parts[p].shape, ", "), want[p].name,
             fmt::join(want[p].shape, ", "));
  }

  // Every tensor of the schema, bound to its field; the schema decides which exist.
  m->layers.resize(size_t(s.n_layers));
  int moe_index = 0;
  for (int l = 0; l < s.n_layers; l++) {
    LayerWeights& w = m->layers[size_t(l)];
    w.attn = s.attn[size_t(l)];
    w.ffn = s.ffn[size_t(l)];
    if (w.ffn == FfnKind::kMoe) w.moe_index = moe_index++;
  }
  for (const TensorSpec& t : resident_schema(s)) {
    if (t.role == TensorRole::kNorm || t.role == TensorRole::kVector) {
      const float* v = m->bind_vec(t.name, t.shape);
      if (t.layer < 0) {
        MF_CHECK(t.key == "final_norm");
        m->final_norm = v;
      } else {
        m->layers[size_t(t.layer)].*kVecFields.at(t.key) = v;
      }
    } else {
      const Mat mat = m->bind_mat(t.name, t.shape[0], t.shape[1],
                                  /*f32_only=*/t.role == TensorRole::kRouter);
      if (t.layer < 0) {
        MF_CHECK(t.key == "embed" || t.key == "lm_head");
        (t.key == "embed" ? m->embed : m->lm_head) = mat;
      } else {
        m->layers[size_t(t.layer)].*kMatFields.at(t.key) = mat;
      }
    }
  }
  if (s.tie_embeddings) m->lm_head = m->embed;
  return m;
}

}  // namespace moeflux
