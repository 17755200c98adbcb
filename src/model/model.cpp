#include "model/model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "util/error.h"

namespace moeflux {

Mat mat_view(const PackedTensor& t, const uint8_t* base) {
  Mat m{t.dtype, t.shape[0], t.shape.size() > 1 ? t.shape[1] : 1, base};
  if (is_quant_dtype(t.dtype)) {
    const QuantLayout q = quant_layout(m.rows, m.cols, quant_bits(t.dtype), t.group);
    m.scales = reinterpret_cast<const uint16_t*>(base + q.packed_bytes);
    m.biases = reinterpret_cast<const uint16_t*>(base + q.packed_bytes + q.scales_bytes);
    m.group = t.group;
  }
  return m;
}

void mat_row_f32(const Mat& m, int64_t r, float* out) {
  if (is_quant_dtype(m.dtype)) {
    const int bits = quant_bits(m.dtype);
    const int64_t wpr = m.cols * bits / 32, gpr = m.cols / m.group;
    dequantize_row(static_cast<const uint32_t*>(m.data) + r * wpr, m.scales + r * gpr,
                   m.biases + r * gpr, m.cols, bits, m.group, out);
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
  const int64_t H = s.hidden_size, V = s.vocab_size;

  // Expert parts must have the shapes the spec implies.
  if (!m->manifest_.experts.layers.empty()) {
    const auto& parts = m->manifest_.experts.parts;
    const std::vector<std::vector<int64_t>> want = {{s.moe_ffn, H}, {s.moe_ffn, H}, {H, s.moe_ffn}};
    const char* names[3] = {"gate", "up", "down"};
    if (parts.size() != 3)
      fail(ErrorKind::kFormat, "{}: experts.parts must list gate, up, down", manifest_path(dir));
    for (size_t p = 0; p < 3; p++)
      if (parts[p].name != names[p] || parts[p].shape != want[p])
        fail(ErrorKind::kFormat, "{}: expert part {} is '{}' [{}], expected '{}' [{}]",
             manifest_path(dir), p, parts[p].name, fmt::join(parts[p].shape, ", "), names[p],
             fmt::join(want[p], ", "));
  }

  m->embed = m->bind_mat("embed", V, H);
  m->final_norm = m->bind_vec("final_norm", {H});
  m->lm_head = s.tie_embeddings ? m->embed : m->bind_mat("lm_head", V, H);
  int moe_index = 0;
  for (int l = 0; l < s.n_layers; l++) {
    LayerWeights w;
    const std::string p = fmt::format("blk.{}.", l);
    w.attn = s.attn[size_t(l)];
    w.ffn = s.ffn[size_t(l)];
    w.attn_norm = m->bind_vec(p + "attn_norm", {H});
    w.ffn_norm = m->bind_vec(p + "ffn_norm", {H});
    if (w.attn == AttnKind::kFull) {
      const int64_t kv = int64_t(s.n_kv_heads) * s.head_dim, hq = int64_t(s.n_heads) * s.head_dim;
      w.q = m->bind_mat(p + "attn_q", s.q_rows(), H);
      w.k = m->bind_mat(p + "attn_k", kv, H);
      w.v = m->bind_mat(p + "attn_v", kv, H);
      w.o = m->bind_mat(p + "attn_o", H, hq);
      if (s.qk_norm) {
        w.q_norm = m->bind_vec(p + "attn_q_norm", {s.head_dim});
        w.k_norm = m->bind_vec(p + "attn_k_norm", {s.head_dim});
      }
    } else {
      const int64_t qkv = s.lin_qkv_dim(), vd = s.lin_value_dim(), nv = s.lin_v_heads;
      w.lin_qkv = m->bind_mat(p + "lin_qkv", qkv, H);
      w.lin_z = m->bind_mat(p + "lin_z", vd, H);
      w.lin_b = m->bind_mat(p + "lin_b", nv, H);
      w.lin_a = m->bind_mat(p + "lin_a", nv, H);
      w.lin_out = m->bind_mat(p + "lin_out", H, vd);
      w.conv = m->bind_vec(p + "lin_conv", {qkv, s.conv_kernel});
      w.A_log = m->bind_vec(p + "lin_A_log", {nv});
      w.dt_bias = m->bind_vec(p + "lin_dt_bias", {nv});
      w.lin_norm = m->bind_vec(p + "lin_norm", {s.lin_v_dim});
    }
    if (w.ffn == FfnKind::kMoe) {
      w.router = m->bind_mat(p + "moe_router", s.n_experts, H, /*f32_only=*/true);
      if (s.shared_ffn > 0) {
        w.sh_gate = m->bind_mat(p + "shexp_gate", s.shared_ffn, H);
        w.sh_up = m->bind_mat(p + "shexp_up", s.shared_ffn, H);
        w.sh_down = m->bind_mat(p + "shexp_down", H, s.shared_ffn);
        w.sh_router = m->bind_mat(p + "shexp_router", 1, H, /*f32_only=*/true);
      }
      w.moe_index = moe_index++;
    } else {
      w.ffn_gate = m->bind_mat(p + "ffn_gate", s.dense_ffn, H);
      w.ffn_up = m->bind_mat(p + "ffn_up", s.dense_ffn, H);
      w.ffn_down = m->bind_mat(p + "ffn_down", H, s.dense_ffn);
    }
    m->layers.push_back(w);
  }
  return m;
}

}  // namespace moeflux
