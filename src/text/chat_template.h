// Chat messages -> prompt text, the way transformers' apply_chat_template renders a model's
// `chat_template` (see text/jinja.h for the interpreter and its HF-compatible settings).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "text/jinja.h"

namespace moeflux {

// One turn. Optional fields are left out of the message dict when unset, so a template's
// `message.reasoning_content is defined` sees what it would see under HF.
struct ChatMessage {
  std::string role;  // "system", "user", "assistant", "tool"
  std::string content;
  std::optional<std::string> reasoning_content;
  // null, or OpenAI-style [{"type": "function", "function": {"name": ..., "arguments": {...}}}].
  // ordered_json because key order shows in the prompt (tojson keeps insertion order).
  nlohmann::ordered_json tool_calls;
  std::optional<std::string> name;
  std::optional<std::string> tool_call_id;
};

class ChatTemplate {
 public:
  // Reads tokenizer_config.json: "chat_template" (a string, or a list of {name, template} of which
  // "default" is used, and "tool_use" when tools are passed, as HF does) and the special tokens
  // (bos_token, eos_token, ...; a string or an {"content": ...} object). When the file has no
  // chat_template, chat_template.jinja and then chat_template.json beside it are tried (newer HF
  // checkpoints keep the template there). Throws Error(kFormat/kIo) naming the file.
  static ChatTemplate from_tokenizer_config(const std::string& path);

  // A template given as text; `special_tokens` holds bos_token, eos_token, ... (strings).
  static ChatTemplate from_source(const std::string& source,
                                  const nlohmann::ordered_json& special_tokens = {},
                                  const std::string& name = "chat template");

  // Fallback for packages without a template: Qwen-style ChatML,
  // "<|im_start|>{role}\n{content}<|im_end|>\n" per turn, "<|im_start|>assistant\n" to prompt.
  static ChatTemplate builtin_chatml();

  // Renders with HF's variables: messages, tools (null unless given), documents (null),
  // add_generation_prompt, the special tokens; then every member of `extra` (e.g.
  // {"enable_thinking": false}, {"tools": [...]}) is added or overrides.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  // Same, with messages already as JSON (e.g. multimodal content lists from an HTTP request).
  std::string render_json(
      const nlohmann::ordered_json& messages, bool add_generation_prompt,
      const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  // "" when the tokenizer config does not set it.
  std::string bos_token() const;
  std::string eos_token() const;
  const std::string& source() const { return templates_.front().source; }

 private:
  struct Named {
    std::string name;  // "default", "tool_use", ...
    std::string source;
    jinja::Template tpl;
  };
  std::vector<Named> templates_;  // front() is the default
  nlohmann::ordered_json special_tokens_ = nlohmann::ordered_json::object();
};

nlohmann::ordered_json to_json(const ChatMessage& m);

}  // namespace moeflux
