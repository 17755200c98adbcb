#include "format/safetensors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/json.h"

namespace moeflux {

using json = nlohmann::json;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const uint64_t size = file_.size();
  if (size < 8) fail(ErrorKind::kFormat, "{}: truncated safetensors file ({} bytes)", path, size);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; i++) header_len |= uint64_t(file_.data()[i]) << (8 * i);
  if (header_len > size - 8)
    fail(ErrorKind::kFormat, "{}: truncated safetensors file: header claims {} bytes, file has {}",
         path, header_len, size - 8);
  if (header_len > (100u << 20))
    fail(ErrorKind::kFormat, "{}: safetensors header of {} bytes is implausibly large", path,
         header_len);
  const uint8_t* hdr = file_.data() + 8;
  const std::string_view text(reinterpret_cast<const char*>(hdr), header_len);
  if (std::string why = json_limit_violation(text, kJsonFileLimits); !why.empty())
    fail(ErrorKind::kFormat, "{}: safetensors header JSON {}", path, why);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(ErrorKind::kFormat, "{}: malformed safetensors header JSON at byte {}: {}", path, e.byte,
         json_error_brief(e));
  } catch (const json::exception& e) {  // e.g. a number that overflows a double
    fail(ErrorKind::kFormat, "{}: malformed safetensors header JSON: {}", path,
         json_error_brief(e));
  }
  if (!j.is_object()) fail(ErrorKind::kFormat, "{}: safetensors header is not a JSON object", path);
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<std::string> range_names;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(ErrorKind::kFormat, "{}: __metadata__ is not an object", path);
      for (auto m = v.begin(); m != v.end(); ++m)
        if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
      continue;
    }
    auto bad = [&](const std::string& what) {
      fail(ErrorKind::kFormat, "{}: tensor '{}': {}", path, name, what);
    };
    if (!v.is_object()) bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) bad("missing or non-string 'dtype'");
    if (!v.contains("shape") || !v["shape"].is_array()) bad("missing or non-array 'shape'");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      bad("missing or malformed 'data_offsets'");
    TensorInfo t;
    t.name = name;
    t.file = path;
    if (!dtype_from_st_name(v["dtype"].get<std::string>(), &t.dtype))
      bad(fmt::format("unknown dtype '{}'", v["dtype"].get<std::string>()));
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad("shape entries must be non-negative integers");
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim)
        bad("shape overflows");
      numel *= dim;
      t.shape.push_back(int64_t(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad("data_offsets must be non-negative integers");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e) bad(fmt::format("data_offsets [{}, {}] are reversed", b, e));
    if (e > data_size)
      bad(fmt::format("data [{}, {}) runs past the end of the data section ({} bytes): "
                      "file truncated?",
                      b, e, data_size));
    t.nbytes = e - b;
    if (t.nbytes != numel * dtype_size(t.dtype))
      bad(fmt::format("{} x {} needs {} bytes but data_offsets span {}", dtype_st_name(t.dtype),
                      t.shape_str(), numel * dtype_size(t.dtype), t.nbytes));
    t.data = file_.data() + data_start + b;
    if (t.nbytes > 0) {
      ranges.push_back({b, e});
      range_names.push_back(name);
    }
    tensors_.emplace(name, std::move(t));
  }
  std::vector<size_t> order(ranges.size());
  for (size_t i = 0; i < order.size(); i++) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  for (size_t i = 1; i < order.size(); i++) {
    const auto& prev = ranges[order[i - 1]];
    const auto& cur = ranges[order[i]];
    if (cur.first < prev.second)
      fail(ErrorKind::kFormat, "{}: tensors '{}' and '{}' overlap in the data section", path,
           range_names[order[i - 1]], range_names[order[i]]);
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) fail(ErrorKind::kIo, "{}: not a directory", dir);
  std::vector<std::string> shard_files;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (fs::exists(index_path)) {
    json j = parse_json(read_text_file(index_path), index_path);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(ErrorKind::kFormat, "{}: missing object 'weight_map'", index_path);
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail(ErrorKind::kFormat, "{}: weight_map['{}'] is not a file name", index_path, it.key());
      auto f = it.value().get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        fail(ErrorKind::kFormat, "{}: weight_map['{}'] = '{}' is not a plain file name",
             index_path, it.key(), f);
      if (std::find(shard_files.begin(), shard_files.end(), f) == shard_files.end())
        shard_files.push_back(f);
    }
    std::sort(shard_files.begin(), shard_files.end());
  } else if (fs::exists(dir + "/model.safetensors")) {
    shard_files.push_back("model.safetensors");
  } else {
    fail(ErrorKind::kIo, "{}: no model.safetensors or model.safetensors.index.json", dir);
  }
  for (const auto& f : shard_files) {
    files_.push_back(std::make_unique<SafetensorsFile>(dir + "/" + f));
    for (const auto& [name, info] : files_.back()->tensors()) {
      auto [it, inserted] = index_.emplace(name, &info);
      if (!inserted)
        fail(ErrorKind::kFormat, "{}: tensor '{}' appears in both {} and {}", dir, name,
             it->second->file, info.file);
    }
  }
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const TensorInfo& Checkpoint::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(ErrorKind::kFormat, "{}: missing tensor '{}'", dir_, name);
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : index_) out.push_back(k);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json hdr = json::object();
  if (!metadata.empty()) hdr["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    uint64_t n = dtype_size(t.dtype);
    for (auto d : t.shape) n *= uint64_t(d);
    hdr[t.name] = {{"dtype", dtype_st_name(t.dtype)},
                   {"shape", t.shape},
                   {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string h = hdr.dump();
  while ((h.size() + 8) % 8) h.push_back(' ');
  FileWriter w(path);
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
  w.write(len, 8);
  w.write(h.data(), h.size());
  for (const auto& t : tensors) {
    uint64_t n = dtype_size(t.dtype);
    for (auto d : t.shape) n *= uint64_t(d);
    w.write(t.data, n);
  }
  w.close();
}

}  // namespace moeflux
