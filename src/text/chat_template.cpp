#include "text/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "util/error.h"
#include "util/json.h"

namespace moeflux {

namespace {

using Json = nlohmann::ordered_json;

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::kIo, "{}: cannot open", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(ErrorKind::kIo, "{}: read error", path);
  return ss.str();
}

Json parse_json_file(const std::string& path) {
  return parse_json<Json>(read_file(path), path);
}

// transformers' special_tokens_map: the tokens that are set, as strings. A token may be written
// as an AddedToken object {"content": "<s>", ...} in older configs.
Json special_tokens_of(const Json& cfg, const std::string& path) {
  Json out = Json::object();
  auto token_text = [&](const Json& v, const std::string& key) -> std::optional<std::string> {
    if (v.is_null()) return std::nullopt;
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v["content"].is_string())
      return v["content"].get<std::string>();
    fail(ErrorKind::kFormat, "{}: \"{}\" must be a string or an object with \"content\"", path,
         key);
  };
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"}) {
    if (!cfg.contains(key)) continue;
    if (auto t = token_text(cfg[key], key)) out[key] = *t;
  }
  if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
    Json list = Json::array();
    for (auto& v : cfg["additional_special_tokens"])
      if (auto t = token_text(v, "additional_special_tokens")) list.push_back(*t);
    out["additional_special_tokens"] = list;
  }
  return out;
}

}  // namespace

Json to_json(const ChatMessage& m) {
  Json j = Json::object();
  j["role"] = m.role;
  j["content"] = m.content;
  if (m.reasoning_content) j["reasoning_content"] = *m.reasoning_content;
  if (!m.tool_calls.is_null()) j["tool_calls"] = m.tool_calls;
  if (m.name) j["name"] = *m.name;
  if (m.tool_call_id) j["tool_call_id"] = *m.tool_call_id;
  return j;
}

ChatTemplate ChatTemplate::from_source(const std::string& source, const Json& special_tokens,
                                       const std::string& name) {
  ChatTemplate t;
  t.templates_.push_back(Named{"default", source, jinja::Template(source, name)});
  if (special_tokens.is_object()) t.special_tokens_ = special_tokens;
  return t;
}

ChatTemplate ChatTemplate::from_tokenizer_config(const std::string& path) {
  Json cfg = parse_json_file(path);
  if (!cfg.is_object()) fail(ErrorKind::kFormat, "{}: expected a JSON object", path);
  ChatTemplate t;
  t.special_tokens_ = special_tokens_of(cfg, path);

  Json tpl = cfg.contains("chat_template") ? cfg["chat_template"] : Json();
  std::string origin = path + " chat_template";
  if (tpl.is_null()) {
    auto dir = std::filesystem::path(path).parent_path();
    auto jinja_file = dir / "chat_template.jinja";
    auto json_file = dir / "chat_template.json";
    if (std::filesystem::exists(jinja_file)) {
      tpl = read_file(jinja_file.string());
      origin = jinja_file.string();
    } else if (std::filesystem::exists(json_file)) {
      Json j = parse_json_file(json_file.string());
      if (j.is_object() && j.contains("chat_template")) tpl = j["chat_template"];
      origin = json_file.string() + " chat_template";
    }
    if (tpl.is_null())
      fail(ErrorKind::kFormat,
           "{}: no \"chat_template\" (and no chat_template.jinja or chat_template.json beside "
           "it); use the built-in ChatML template instead",
           path);
  }

  if (tpl.is_string()) {
    std::string src = tpl.get<std::string>();
    t.templates_.push_back(Named{"default", src, jinja::Template(src, origin)});
  } else if (tpl.is_array()) {
    // [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
    for (auto& e : tpl) {
      if (!e.is_object() || !e.contains("name") || !e["name"].is_string() ||
          !e.contains("template") || !e["template"].is_string())
        fail(ErrorKind::kFormat,
             "{}: each chat_template entry needs string \"name\" and \"template\"", path);
      std::string name = e["name"].get<std::string>();
      std::string src = e["template"].get<std::string>();
      Named n{name, src, jinja::Template(src, origin + " '" + name + "'")};
      if (name == "default")
        t.templates_.insert(t.templates_.begin(), std::move(n));
      else
        t.templates_.push_back(std::move(n));
    }
    if (t.templates_.empty() || t.templates_.front().name != "default")
      fail(ErrorKind::kFormat, "{}: chat_template lists no template named \"default\"", path);
  } else {
    fail(ErrorKind::kFormat, "{}: \"chat_template\" must be a string or a list", path);
  }
  return t;
}

ChatTemplate ChatTemplate::builtin_chatml() {
  // The ChatML template HF used as its default, which Qwen models follow.
  static const char* kChatml =
      "{% for message in messages %}"
      "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
      "{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  Json tokens = Json::object();
  tokens["eos_token"] = "<|im_end|>";
  return from_source(kChatml, tokens, "built-in ChatML template");
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt, const Json& extra) const {
  Json list = Json::array();
  for (auto& m : messages) list.push_back(to_json(m));
  return render_json(list, add_generation_prompt, extra);
}

std::string ChatTemplate::render_json(const Json& messages, bool add_generation_prompt,
                                      const Json& extra) const {
  if (!messages.is_array())
    fail(ErrorKind::kInvalidArgument, "chat template: messages must be a JSON array");
  if (!extra.is_object() && !extra.is_null())
    fail(ErrorKind::kInvalidArgument, "chat template: extra variables must be a JSON object");
  // Same variables, same order, as transformers' render_jinja_template.
  Json ctx = Json::object();
  ctx["messages"] = messages;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  ctx["add_generation_prompt"] = add_generation_prompt;
  for (auto& [k, v] : special_tokens_.items()) ctx[k] = v;
  if (extra.is_object())
    for (auto& [k, v] : extra.items()) ctx[k] = v;

  const Named* chosen = &templates_.front();
  if (!ctx["tools"].is_null())
    for (auto& n : templates_)
      if (n.name == "tool_use") chosen = &n;
  return chosen->tpl.render(ctx);
}

std::string ChatTemplate::bos_token() const {
  return special_tokens_.contains("bos_token") ? special_tokens_["bos_token"].get<std::string>()
                                               : "";
}

std::string ChatTemplate::eos_token() const {
  return special_tokens_.contains("eos_token") ? special_tokens_["eos_token"].get<std::string>()
                                               : "";
}

}  // namespace moeflux
