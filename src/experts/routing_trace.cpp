#include "experts/routing_trace.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "util/atomic_file.h"
#include "util/error.h"
#include "util/hash.h"

namespace moeflux {

namespace {

constexpr char kMagic[8] = {'M', 'F', 'T', 'R', 'A', 'C', 'E', '\0'};
constexpr uint64_t kVersion = 1;
// Sanity bounds: far above any real model, low enough that a corrupt count cannot make the
// reader allocate gigabytes.
constexpr uint64_t kMaxLayers = 1 << 16, kMaxExperts = 1 << 20, kMaxTokens = 1 << 24;

int bits_for(int n_experts) {
  int b = 1;
  while ((uint64_t(1) << b) < uint64_t(n_experts)) b++;
  return b;
}

void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(uint8_t(v | 0x80));
    v >>= 7;
  }
  out.push_back(uint8_t(v));
}

class Reader {
 public:
  Reader(const std::vector<uint8_t>& b, size_t end, const std::string& name)
      : b_(b), end_(end), name_(name) {}
  size_t pos() const { return pos_; }
  template <typename... Args>
  [[noreturn]] void bad(size_t at, fmt::format_string<Args...> f, Args&&... args) const {
    fail(ErrorKind::kFormat, "{}: byte {}: {}", name_, at,
         fmt::format(f, std::forward<Args>(args)...));
  }
  uint64_t varint(const char* what) {
    const size_t at = pos_;
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (pos_ >= end_) bad(at, "{}: truncated", what);
      if (shift > 63) bad(at, "{}: varint longer than 10 bytes", what);
      const uint8_t c = b_[pos_++];
      v |= uint64_t(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
  }
  uint64_t bounded(const char* what, uint64_t lo, uint64_t hi) {
    const size_t at = pos_;
    const uint64_t v = varint(what);
    if (v < lo || v > hi) bad(at, "{} = {} is not in [{}, {}]", what, v, lo, hi);
    return v;
  }
  const uint8_t* take(size_t n, const char* what) {
    if (end_ - pos_ < n)
      bad(pos_, "{}: truncated ({} bytes wanted, {} left)", what, n, end_ - pos_);
    const uint8_t* p = b_.data() + pos_;
    pos_ += n;
    return p;
  }

 private:
  const std::vector<uint8_t>& b_;
  size_t pos_ = 0, end_;
  const std::string& name_;
};

}  // namespace

std::vector<uint8_t> RoutingTrace::encode() const {
  MF_CHECK(n_experts > 0 && k > 0 && k <= n_experts && int(layers.size()) == n_moe_layers);
  std::vector<uint8_t> out(kMagic, kMagic + 8);
  put_varint(out, kVersion);
  put_varint(out, model.size());
  out.insert(out.end(), model.begin(), model.end());
  put_varint(out, uint64_t(n_moe_layers));
  put_varint(out, uint64_t(n_experts));
  put_varint(out, uint64_t(k));
  for (int l : layers) put_varint(out, uint64_t(l));
  put_varint(out, records.size());
  const int bits = bits_for(n_experts);
  for (const TraceRecord& r : records) {
    MF_CHECK(r.moe_index >= 0 && r.moe_index < n_moe_layers && r.tokens > 0 &&
             r.experts.size() == size_t(r.tokens) * size_t(k));
    out.push_back(uint8_t(r.phase));
    put_varint(out, uint64_t(r.moe_index));
    put_varint(out, uint64_t(r.tokens));
    uint64_t acc = 0;
    int have = 0;
    for (int e : r.experts) {
      MF_CHECK(e >= 0 && e < n_experts);
      acc |= uint64_t(e) << have;
      have += bits;
      while (have >= 8) {
        out.push_back(uint8_t(acc));
        acc >>= 8;
        have -= 8;
      }
    }
    if (have > 0) out.push_back(uint8_t(acc));
  }
  const uint64_t h = fnv1a64(out.data(), out.size());
  for (int i = 0; i < 8; i++) out.push_back(uint8_t(h >> (8 * i)));
  return out;
}

RoutingTrace RoutingTrace::decode(const std::vector<uint8_t>& b, const std::string& name) {
  if (b.size() < 8 + 8)
    fail(ErrorKind::kFormat, "{}: byte 0: {} bytes is too short for a routing trace", name,
         b.size());
  if (std::memcmp(b.data(), kMagic, 8) != 0)
    fail(ErrorKind::kFormat, "{}: byte 0: not a moeflux routing trace (no MFTRACE magic)", name);
  const size_t body = b.size() - 8;
  Reader r(b, body, name);
  r.take(8, "magic");
  RoutingTrace t;
  {
    const size_t at = r.pos();
    const uint64_t v = r.varint("version");
    if (v != kVersion) r.bad(at, "version {} (this moeflux reads version {})", v, kVersion);
  }
  const uint64_t name_len = r.bounded("model name length", 0, 4096);
  const uint8_t* np = r.take(size_t(name_len), "model name");
  t.model.assign(reinterpret_cast<const char*>(np), size_t(name_len));
  t.n_moe_layers = int(r.bounded("MoE layers", 1, kMaxLayers));
  t.n_experts = int(r.bounded("experts", 1, kMaxExperts));
  t.k = int(r.bounded("k", 1, uint64_t(t.n_experts)));
  for (int i = 0; i < t.n_moe_layers; i++)
    t.layers.push_back(int(r.bounded("layer index", 0, kMaxLayers * 16)));
  const uint64_t n_rec = r.varint("record count");
  // Every record takes at least 3 bytes: a count past that is corrupt, not a reason to allocate.
  if (n_rec > (body - r.pos()) / 3 + 1)
    r.bad(r.pos(), "record count {} does not fit in the {} bytes left", n_rec, body - r.pos());
  t.records.reserve(size_t(n_rec));
  const int bits = bits_for(t.n_experts);
  // seen[e] == stamp: e already listed for the current token (stamp counts tokens).
  std::vector<uint64_t> seen(size_t(t.n_experts), 0);
  uint64_t stamp = 0;
  for (uint64_t i = 0; i < n_rec; i++) {
    TraceRecord rec;
    const size_t at = r.pos();
    const uint8_t phase = *r.take(1, "record phase");
    if (phase > 1) r.bad(at, "record {}: phase {} is not 0 (decode) or 1 (prompt)", i, phase);
    rec.phase = TraceRecord::Phase(phase);
    rec.moe_index = int(r.bounded("record MoE layer", 0, uint64_t(t.n_moe_layers - 1)));
    rec.tokens = int(r.bounded("record tokens", 1, kMaxTokens));
    const uint64_t n = uint64_t(rec.tokens) * uint64_t(t.k);
    const size_t nbytes = size_t((n * uint64_t(bits) + 7) / 8);
    const size_t data_at = r.pos();
    const uint8_t* p = r.take(nbytes, "record experts");
    rec.experts.resize(size_t(n));
    uint64_t acc = 0;
    int have = 0;
    size_t byte = 0;
    for (size_t j = 0; j < size_t(n); j++) {
      while (have < bits) {
        acc |= uint64_t(p[byte++]) << have;
        have += 8;
      }
      const int e = int(acc & ((uint64_t(1) << bits) - 1));
      acc >>= bits;
      have -= bits;
      const size_t tok = j / size_t(t.k);
      if (j % size_t(t.k) == 0) stamp++;
      if (e >= t.n_experts)
        r.bad(data_at + j * size_t(bits) / 8, "record {}: expert {} is not below {}", i, e,
              t.n_experts);
      if (seen[size_t(e)] == stamp)
        r.bad(data_at + j * size_t(bits) / 8, "record {}: token {} lists expert {} twice", i, tok,
              e);
      seen[size_t(e)] = stamp;
      rec.experts[j] = e;
    }
    t.records.push_back(std::move(rec));
  }
  if (r.pos() != body)
    r.bad(r.pos(), "{} bytes after the last record, before the checksum", body - r.pos());
  uint64_t want = 0;
  for (int i = 0; i < 8; i++) want |= uint64_t(b[body + size_t(i)]) << (8 * i);
  if (fnv1a64(b.data(), body) != want)
    fail(ErrorKind::kFormat, "{}: byte {}: checksum mismatch (the trace is corrupt)", name, body);
  return t;
}

void RoutingTrace::save(const std::string& path) const {
  const std::vector<uint8_t> bytes = encode();
  StagedFile f(path);
  {
    std::ofstream o(f.path(), std::ios::binary);
    o.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    if (!o) fail(ErrorKind::kIo, "{}: cannot write the trace", path);
  }
  f.commit();
}

RoutingTrace RoutingTrace::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::kIo, "{}: cannot open: {}", path, std::strerror(errno));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  if (in.bad()) fail(ErrorKind::kIo, "{}: read failed", path);
  return decode(bytes, path);
}

}  // namespace moeflux
