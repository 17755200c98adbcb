// Chat templates: the Jinja interpreter (text/jinja.h) and the apply_chat_template front end
// (text/chat_template.h).
//
// Where the expected strings come from:
//  - ChatTemplateGolden: tests/data/tokenizer/qwen3/golden.json, rendered by transformers'
//    apply_chat_template (copied from ../shared/tokenizer/qwen3).
//  - ChatTemplateTransformers: tests/data/chat_templates/*.renderings.json, the official Mixtral
//    and Qwen3.5 templates rendered by transformers (tools/refs/render_chat_templates.py).
//  - ChatTemplateQwen3: derived by hand, by walking the template text
//    (tests/data/tokenizer/qwen3) statement by statement for the given messages; each test says
//    which branches it exercises.
//  - ChatTemplateJinja: Jinja2 3.1 semantics as documented and as implemented in jinja2's
//    lexer/parser/filters, with HF's environment (trim_blocks, lstrip_blocks, its tojson).
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include "text/chat_template.h"
#include "text/jinja.h"
#include "util/error.h"

namespace moeflux {
namespace {

using Json = nlohmann::ordered_json;

std::string data_path(const std::string& rel) {
  return std::string(MOEFLUX_TEST_DATA) + "/" + rel;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string render(std::string_view src, const Json& ctx = Json::object()) {
  return jinja::Template(src, "test").render(ctx);
}

// Runs f, which must throw moeflux::Error; returns it.
Error error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a moeflux::Error";
  return Error(ErrorKind::kInternal, "");
}

void expect_error(const std::function<void()>& f, ErrorKind kind,
                  const std::vector<std::string>& parts) {
  Error e = error_of(f);
  EXPECT_EQ(int(e.kind()), int(kind)) << e.what();
  for (auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
}

ChatMessage msg(std::string role, std::string content) {
  ChatMessage m;
  m.role = std::move(role);
  m.content = std::move(content);
  return m;
}

Json weather_tool() {
  return Json::parse(R"({"type": "function", "function": {"name": "get_weather",
      "description": "Get the current weather", "parameters": {"type": "object",
      "properties": {"city": {"type": "string"}}, "required": ["city"]}}})");
}

// tojson of weather_tool(): json.dumps with ", " / ": " separators, keys in insertion order.
const char* kWeatherToolJson =
    R"({"type": "function", "function": {"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})";

ChatTemplate qwen3() {
  return ChatTemplate::from_tokenizer_config(data_path("tokenizer/qwen3/tokenizer_config.json"));
}

ChatTemplate mixtral() {
  return ChatTemplate::from_tokenizer_config(data_path("tokenizer/mixtral/tokenizer_config.json"));
}

// ================================================================================================
// The 8 golden renderings (transformers' apply_chat_template output), byte for byte.

TEST(ChatTemplateGolden, Qwen3MatchesTransformers) {
  Json golden = Json::parse(read_text(data_path("tokenizer/qwen3/golden.json")));
  ChatTemplate t = qwen3();
  ASSERT_EQ(golden["chat"].size(), 8u);
  for (auto& entry : golden["chat"]) {
    std::vector<ChatMessage> msgs;
    for (auto& m : entry["messages"])
      msgs.push_back(msg(m["role"].get<std::string>(), m["content"].get<std::string>()));
    Json extra = {{"enable_thinking", entry["enable_thinking"].get<bool>()}};
    EXPECT_EQ(t.render(msgs, true, extra), entry["text"].get<std::string>()) << entry.dump();
    // The JSON entry point renders the same.
    EXPECT_EQ(t.render_json(entry["messages"], true, extra), entry["text"].get<std::string>());
  }
}

// ================================================================================================
// Qwen3 (tests/data/tokenizer/qwen3/tokenizer_config.json), beyond the golden set.

// The `if tools` header: system text + "\n\n", "# Tools..." preamble, one tojson line per tool,
// then the <tool_call> format instructions and <|im_end|>.
std::string qwen3_tools_header(const std::string& system) {
  return "<|im_start|>system\n" + system +
         "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
         "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" +
         kWeatherToolJson +
         "\n</tools>\n\nFor each function call, return a json object with function name and "
         "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
         "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";
}

TEST(ChatTemplateQwen3, ToolCallAndToolResponse) {
  // Derivation: tools -> header (the system message goes into it, so the loop skips message 0
  // because loop.first). last_query_index = 1 (the user turn). The assistant turn (index 2 > 1,
  // not last, no reasoning) takes the plain branch: "<|im_start|>assistant\n" + "" and, content
  // being empty, no "\n" before the first <tool_call>; `tool_call.function` is truthy so the
  // function dict is used, arguments is a mapping -> tojson. The tool turn follows an assistant:
  // "<|im_start|>user" then the <tool_response> block and, being last, "<|im_end|>\n".
  std::vector<ChatMessage> msgs = {msg("system", "You are helpful."),
                                   msg("user", "What's the weather in Paris?"),
                                   msg("assistant", ""), msg("tool", R"({"temperature": 21})")};
  msgs[2].tool_calls = Json::parse(
      R"([{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])");
  std::string expected = qwen3_tools_header("You are helpful.") +
                         "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
                         "<|im_start|>assistant\n<tool_call>\n"
                         R"({"name": "get_weather", "arguments": {"city": "Paris"}})"
                         "\n</tool_call><|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n"
                         "</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n";
  Json extra = {{"tools", Json::array({weather_tool()})}};
  EXPECT_EQ(qwen3().render(msgs, true, extra), expected);
}

TEST(ChatTemplateQwen3, ParallelToolCallsThenFinalAnswer) {
  // Derivation: last_query_index = 1. Assistant #2 has content, so "\n" precedes the first
  // <tool_call> and every later one; the second call's arguments are a JSON string (OpenAI
  // style) and are printed as-is. The two tool turns share one "<|im_start|>user" ...
  // "<|im_end|>" (previous/next role checks). The final assistant turn is loop.last and after
  // the last query, so it gets an (empty) <think> block. tojson keeps "Zürich" unescaped
  // (ensure_ascii=False). No generation prompt.
  std::vector<ChatMessage> msgs = {
      msg("system", "You are helpful."),     msg("user", "Weather in Zürich and Paris?"),
      msg("assistant", "Let me check."),     msg("tool", R"({"temperature": 21})"),
      msg("tool", R"({"temperature": 18})"), msg("assistant", "Zürich: 21 °C, Paris: 18 °C.")};
  msgs[2].tool_calls = Json::parse(R"([
      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
      {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}])");
  std::string expected =
      qwen3_tools_header("You are helpful.") +
      "<|im_start|>user\nWeather in Zürich and Paris?<|im_end|>\n"
      "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
      R"({"name": "get_weather", "arguments": {"city": "Zürich"}})"
      "\n</tool_call>\n<tool_call>\n"
      R"({"name": "get_weather", "arguments": {"city": "Paris"}})"
      "\n</tool_call><|im_end|>\n"
      "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response>"
      "\n<tool_response>\n{\"temperature\": 18}\n</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n"
      "Zürich: 21 °C, Paris: 18 °C.<|im_end|>\n";
  Json extra = {{"tools", Json::array({weather_tool()})}};
  EXPECT_EQ(qwen3().render(msgs, false, extra), expected);
}

TEST(ChatTemplateQwen3, ReasoningInThinkTags) {
  ChatTemplate t = qwen3();
  // An assistant turn before the last user query: the <think> part is split off
  // (content.split('</think>')) and dropped.
  std::vector<ChatMessage> earlier = {
      msg("user", "Hi"), msg("assistant", "<think>\nThe user greets me.\n</think>\n\nHello!"),
      msg("user", "How are you?")};
  EXPECT_EQ(t.render(earlier, true, {{"enable_thinking", true}}),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n");

  // The last turn, after the last query: reasoning is kept, re-wrapped as
  // "<think>\n" + reasoning.strip('\n') + "\n</think>\n\n" + content.lstrip('\n').
  std::vector<ChatMessage> inline_think = {
      msg("user", "2+2?"), msg("assistant", "<think>\n\nPondering.\n\n</think>\n\n\n4")};
  EXPECT_EQ(t.render(inline_think, false),
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nPondering.\n</think>\n\n4<|im_end|>\n");

  // reasoning_content given as a field takes precedence over parsing the content.
  std::vector<ChatMessage> field = {msg("user", "2+2?"), msg("assistant", "4")};
  field[1].reasoning_content = "Add them.";
  EXPECT_EQ(t.render(field, false),
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n");
}

// ================================================================================================
// Mixtral and Qwen3.5: the official template texts against transformers' own rendering.
// tests/data/chat_templates/<name>.renderings.json were written by
// tools/refs/render_chat_templates.py (transformers' render_jinja_template, the function behind
// apply_chat_template) from chat_templates/conversations.json; SOURCE there says where each
// template text comes from. Where transformers raised, our engine must fail with the template's
// own message.

void expect_matches_transformers(const std::string& name) {
  Json doc = Json::parse(read_text(data_path("chat_templates/" + name + ".renderings.json")));
  const std::string tpl_path = data_path(doc["template"].get<std::string>());
  ChatTemplate t =
      tpl_path.ends_with(".json")
          ? ChatTemplate::from_tokenizer_config(tpl_path)
          : ChatTemplate::from_source(read_text(tpl_path), doc["special_tokens"], name);
  ASSERT_GE(doc["cases"].size(), 10u);
  // gpt-oss's template prints strftime_now("%Y-%m-%d"): the renderings were made with it pinned
  // to doc["fixed_date"]; ours prints today's date there.
  std::string fixed, today;
  if (doc.contains("fixed_date")) {
    fixed = "Current date: " + doc["fixed_date"].get<std::string>() + "\n";
    today = "Current date: " + render("{{ strftime_now('%Y-%m-%d') }}") + "\n";
  }
  for (auto& c : doc["cases"]) {
    SCOPED_TRACE(name + " / " + c["name"].get<std::string>());
    auto run = [&] {
      return t.render_json(c["messages"], c["add_generation_prompt"].get<bool>(), c["kwargs"]);
    };
    if (c.contains("text")) {
      std::string want = c["text"].get<std::string>();
      if (!fixed.empty()) {
        const size_t at = want.find(fixed);
        ASSERT_NE(at, std::string::npos) << "no '" << fixed << "' in the rendering";
        want.replace(at, fixed.size(), today);
      }
      EXPECT_EQ(run(), want);
    } else {
      expect_error(run, ErrorKind::kInvalidArgument, {c["error"]["message"].get<std::string>()});
    }
  }
}

TEST(ChatTemplateTransformers, MixtralMatches) {
  expect_matches_transformers("mixtral");
}
TEST(ChatTemplateTransformers, MixtralDec2023Matches) {
  expect_matches_transformers("mixtral_dec2023");
}
TEST(ChatTemplateTransformers, Qwen35Matches) {
  expect_matches_transformers("qwen3_5_moe");
}
// gpt-oss's harmony template (chat_templates/gpt_oss.jinja; issue 17): system/developer
// messages, reasoning effort, builtin and function tools (the TypeScript-like schema rendering),
// tool calls and responses, thinking kept or dropped, and its four raise_exception paths.
TEST(ChatTemplateTransformers, GptOssMatches) {
  ASSERT_TRUE(std::filesystem::exists(data_path("chat_templates/gpt_oss.renderings.json")))
      << "run tools/refs/render_chat_templates.py on the GPU machine (DEVICE_READY.md)";
  expect_matches_transformers("gpt_oss");
}

// A second, independent rendering of the December 2023 Mixtral template: huggingface.js's Jinja
// engine test (packages/jinja/test/e2e.test.js, TEST_CUSTOM_TEMPLATES
// ["mistralai/Mixtral-8x7B-Instruct-v0.1"], commit 029db6ba; chat_templates/SOURCE), whose
// template text is byte-identical to ours and whose expected string is copied here as it is.
TEST(ChatTemplateMixtral, HuggingfaceJsRendering) {
  ChatTemplate t = ChatTemplate::from_source(
      read_text(data_path("chat_templates/mixtral_dec2023.jinja")),
      Json{{"bos_token", "<s>"}, {"eos_token", "</s>"}}, "mixtral_dec2023");
  Json messages = Json::array(
      {{{"role", "user"}, {"content", "Hello, how are you?"}},
       {{"role", "assistant"}, {"content", "I'm doing great. How can I help you today?"}},
       {{"role", "user"}, {"content", "I'd like to show off how chat templating works!"}}});
  EXPECT_EQ(t.render_json(messages, false, Json::object()),
            "<s>[INST] Hello, how are you? [/INST]I'm doing great. How can I help you today?</s>"
            "[INST] I'd like to show off how chat templating works! [/INST]");
}

// What the renderings do not check: the special tokens read from tokenizer_config.json, and
// where a raise_exception() error points.
TEST(ChatTemplateMixtral, TokensAndErrorLocation) {
  ChatTemplate t = mixtral();
  EXPECT_EQ(t.bos_token(), "<s>");
  EXPECT_EQ(t.eos_token(), "</s>");
  // The raise_exception call is on line 11 of the template.
  expect_error(
      [&] {
        t.render({msg("user", "a"), msg("user", "b")}, true);
      },
      ErrorKind::kInvalidArgument, {"conversation roles must alternate", "line 11"});
}

// ================================================================================================
// Front end: loading, fallbacks, variables.

TEST(ChatTemplateFrontEnd, BuiltinChatml) {
  ChatTemplate t = ChatTemplate::builtin_chatml();
  std::vector<ChatMessage> msgs = {msg("system", "S"), msg("user", "U"), msg("assistant", "A")};
  EXPECT_EQ(t.render(msgs, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
            "<|im_start|>assistant\nA<|im_end|>\n");
  EXPECT_EQ(t.render({msg("user", "U")}, true),
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(t.eos_token(), "<|im_end|>");
}

class ChatTemplateConfig : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("moeflux_chat_template_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary) << text;
    return (dir_ / name).string();
  }
  std::filesystem::path dir_;
};

TEST_F(ChatTemplateConfig, NamedTemplatesAndTokenObjects) {
  // HF picks "tool_use" when tools are passed and it exists, else "default".
  Json cfg = {
      {"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}, {"lstrip", false}}},
      {"eos_token", "</s>"},
      {"unk_token", nullptr},
      {"chat_template",
       Json::array({{{"name", "tool_use"}, {"template", "T{{ tools|length }}{{ bos_token }}"}},
                    {{"name", "default"},
                     {"template",
                      "D{{ bos_token }}{{ eos_token }}[{{ unk_token }}]"
                      "{{ tools is none }}{{ documents is none }}"}}})}};
  ChatTemplate t = ChatTemplate::from_tokenizer_config(write("tokenizer_config.json", cfg.dump()));
  EXPECT_EQ(t.render({msg("user", "x")}, false), "D<s></s>[]TrueTrue");
  EXPECT_EQ(t.render({msg("user", "x")}, false, {{"tools", Json::array({1, 2})}}), "T2<s>");
}

TEST_F(ChatTemplateConfig, FallsBackToChatTemplateJinja) {
  // Newer checkpoints keep the template beside tokenizer_config.json.
  std::string cfg = write("tokenizer_config.json", R"({"eos_token": "<|im_end|>"})");
  expect_error([&] { ChatTemplate::from_tokenizer_config(cfg); }, ErrorKind::kFormat,
               {"no \"chat_template\""});
  write("chat_template.jinja", read_text(data_path("tokenizer/qwen3_5_moe/chat_template.jinja")));
  ChatTemplate t = ChatTemplate::from_tokenizer_config(cfg);
  EXPECT_EQ(t.render({msg("user", "Hi")}, true),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
}

TEST_F(ChatTemplateConfig, ErrorsNameTheFile) {
  std::string bad = write("tokenizer_config.json", "{\"chat_template\": ");
  expect_error([&] { ChatTemplate::from_tokenizer_config(bad); }, ErrorKind::kFormat,
               {"tokenizer_config.json", "invalid JSON"});
  std::string syntax = write("tokenizer_config.json", R"({"chat_template": "ok\n{% if %}"})");
  expect_error([&] { ChatTemplate::from_tokenizer_config(syntax); }, ErrorKind::kFormat,
               {"tokenizer_config.json chat_template", "line 2, column 7"});
  expect_error([&] { ChatTemplate::from_tokenizer_config((dir_ / "missing.json").string()); },
               ErrorKind::kIo, {"missing.json"});
}

// ================================================================================================
// The interpreter, construct by construct.

TEST(ChatTemplateJinja, WhitespaceControlAndHfDefaults) {
  // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before one goes.
  EXPECT_EQ(render("{% if true %}\nyes\n{% endif %}\nafter"), "yes\nafter");
  EXPECT_EQ(render("<ul>\n{% for i in [1, 2] %}\n  <li>{{ i }}</li>\n{% endfor %}\n</ul>"),
            "<ul>\n  <li>1</li>\n  <li>2</li>\n</ul>");
  EXPECT_EQ(render("  {% if true %}x{% endif %}"), "x");
  EXPECT_EQ(render("a  {% if true %}x{% endif %}"), "a  x");  // not only whitespace before it
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");   // + disables lstrip
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");   // + disables trim
  EXPECT_EQ(render("  {{ 'x' }}"), "  x");                    // expressions are not lstripped
  EXPECT_EQ(render("a  \n {{- 'b' -}}  \n c"), "abc");
  EXPECT_EQ(render("{%- if true -%}  \n  x  \n  {%- endif %}"), "x");
  EXPECT_EQ(render("a\n{# comment #}\nb"), "a\nb");
  EXPECT_EQ(render("a{# {{ not rendered }} #}b"), "ab");
  EXPECT_EQ(render("a\n    {#- c -#}\n    b"), "ab");
  // One trailing newline of the template is dropped (keep_trailing_newline=False); \r\n -> \n.
  EXPECT_EQ(render("x\n"), "x");
  EXPECT_EQ(render("x\n\n"), "x\n");
  EXPECT_EQ(render("a\r\nb\rc"), "a\nb\nc");
  EXPECT_EQ(render("{ not a tag } {{ '{{' }} }}"), "{ not a tag } {{ }}");
  jinja::Options raw;
  raw.trim_blocks = raw.lstrip_blocks = false;
  raw.keep_trailing_newline = true;
  EXPECT_EQ(jinja::Template("  {% if true %}\nx{% endif %}\n", "t", raw).render(Json::object()),
            "  \nx\n");
}

TEST(ChatTemplateJinja, IfElifElse) {
  const char* src = "{% if n > 1 %}many{% elif n == 1 %}one{% else %}none{% endif %}";
  EXPECT_EQ(render(src, {{"n", 5}}), "many");
  EXPECT_EQ(render(src, {{"n", 1}}), "one");
  EXPECT_EQ(render(src, {{"n", 0}}), "none");
  EXPECT_EQ(render("{% if missing %}a{% endif %}{% if [] %}b{% endif %}{% if {} %}c{% endif %}"
                   "{% if '' %}d{% endif %}{% if 0.0 %}e{% endif %}{% if none %}f{% endif %}"
                   "{% if ' ' %}g{% endif %}"),
            "g");
}

TEST(ChatTemplateJinja, ForLoopVariables) {
  EXPECT_EQ(render("{% for x in ['a', 'b', 'c'] %}{{ loop.index }}-{{ loop.index0 }}-"
                   "{{ loop.first }}-{{ loop.last }}-{{ loop.length }}-{{ loop.revindex }};"
                   "{% endfor %}"),
            "1-0-True-False-3-3;2-1-False-False-3-2;3-2-False-True-3-1;");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.previtem|default('-') }}"
                   "{{ loop.nextitem|default('-') }} {% endfor %}"),
            "-2 13 2- ");
  EXPECT_EQ(render("{% for i in range(3) %}{{ loop.cycle('a', 'b') }}{% endfor %}"), "aba");
  EXPECT_EQ(render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in range(10) if x is even %}{{ loop.index }}:{{ x }} {% endfor %}"),
            "1:0 2:2 3:4 4:6 5:8 ");
  EXPECT_EQ(render("{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }} "
                   "{% endfor %}{{ loop.index }}|{% endfor %}"),
            "1x1 1y2 1|2x1 2y2 2|");
  Json ctx = Json::parse(R"({"d": {"b": 1, "a": 2}})");
  EXPECT_EQ(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", ctx), "b=1;a=2;");
  EXPECT_EQ(render("{% for k, v in d|items %}{{ k }}={{ v }};{% endfor %}", ctx), "b=1;a=2;");
  EXPECT_EQ(render("{% for (k, v) in [[1, 2], [3, 4]] %}{{ k + v }},{% endfor %}"), "3,7,");
  EXPECT_EQ(render("{% for k in d %}{{ k }}{% endfor %}", ctx), "ba");
  EXPECT_EQ(render("{% for c in 'añb' %}[{{ c }}]{% endfor %}"), "[a][ñ][b]");
  EXPECT_EQ(render("{% for i in range(10) %}{% if i == 4 %}{% break %}{% endif %}"
                   "{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}"),
            "023");
  expect_error([] { render("{% for a, b in [[1, 2, 3]] %}{% endfor %}"); },
               ErrorKind::kInvalidArgument, {"too many values to unpack"});
}

TEST(ChatTemplateJinja, SetScopingAndNamespace) {
  // Loop bodies get a fresh frame per iteration that reads the outer value; nothing leaks out.
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}"
                   "{{ x }}"),
            "231");
  // `if` has no scope of its own.
  EXPECT_EQ(render("{% if true %}{% set y = 'in' %}{% endif %}{{ y }}"), "in");
  // namespace() is the way to carry state out of a loop.
  EXPECT_EQ(render("{% set ns = namespace(n=0, seen=false) %}{% for i in [1, 2, 3] %}"
                   "{% set ns.n = ns.n + i %}{% set ns.seen = true %}{% endfor %}"
                   "{{ ns.n }} {{ ns.seen }} {{ ns.missing is defined }}"),
            "6 True False");
  EXPECT_EQ(render("{% set a, b = 1, 2 %}{{ b }}{{ a }}"), "21");
  EXPECT_EQ(render("{% set ns = namespace() %}{% set ns.a, b = 'xy' %}{{ ns.a }}{{ b }}"), "xy");
  // Python-style ':' before %} is accepted on statements that open a body.
  EXPECT_EQ(render("{% if 0: %}a{% elif 1: %}b{% else: %}c{% endif %}{% for i in [1]: %}{{ i }}"
                   "{% endfor %}"),
            "b1");
  EXPECT_EQ(render("{% set x %}a{{ 1 + 1 }}b{% endset %}[{{ x }}]"), "[a2b]");
  EXPECT_EQ(render("{% set x | upper %}abc{% endset %}{{ x }}"), "ABC");
  expect_error([] { render("{% set d = {} %}{% set d.x = 1 %}"); }, ErrorKind::kInvalidArgument,
               {"non-namespace", "line 1, column 20"});
}

TEST(ChatTemplateJinja, MacrosAndFilterBlocks) {
  EXPECT_EQ(render("{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!"
                   "{% endmacro %}{{ greet('Ann') }} {{ greet('Bob', greeting='Hi') }}"),
            "Hello, Ann! Hi, Bob!");
  EXPECT_EQ(render("{% macro f(a, b=a * 2) %}{{ a }},{{ b }}{% endmacro %}{{ f(3) }}|{{ f(1, 5) }}"
                   "|{{ f(3)|length }}"),
            "3,6|1,5|3");
  // A macro sees template globals and top-level variables, not its caller's loop variables.
  EXPECT_EQ(render("{% set top = 'T' %}{% macro m() %}{{ top }}{{ i }}{{ g }}{% endmacro %}"
                   "{% for i in [1] %}{{ m() }}{% endfor %}",
                   {{"g", "G"}}),
            "TG");
  EXPECT_EQ(render("{% filter upper %}abc{{ 'd' }}{% endfilter %}"), "ABCD");
  EXPECT_EQ(render("{% macro f(a, b, c=3) %}{{ a }}{{ b }}{{ c }}{% endmacro %}"
                   "{{ f(*[1, 2]) }}{{ f(1, **{'b': 5, 'c': 6}) }}"),
            "123156");
  EXPECT_EQ(render("{% generation %}kept{% endgeneration %}"), "kept");
  expect_error([] { render("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}"); },
               ErrorKind::kInvalidArgument, {"takes not more than 1 argument"});
  expect_error([] { render("{% macro m(a) %}{% endmacro %}{{ m(b=1) }}"); },
               ErrorKind::kInvalidArgument, {"has no argument 'b'"});
}

TEST(ChatTemplateJinja, LiteralsAndPythonStr) {
  EXPECT_EQ(render("{{ [1, 'a', none, true, 1.5, 'it\\'s'] }}"),
            R"([1, 'a', None, True, 1.5, "it's"])");
  EXPECT_EQ(render("{{ {'a': [1], 'b': {'c': none}} }}"), "{'a': [1], 'b': {'c': None}}");
  EXPECT_EQ(render("{{ (1,) }}{{ (1, 2) }}{{ () }}"), "(1,)(1, 2)()");
  EXPECT_EQ(render("{{ 'a' 'b' }}{{ \"it's\" }}{{ 'say \"hi\"' }}"), "abit'ssay \"hi\"");
  EXPECT_EQ(render(R"({{ 'a\tb\\n\u00e9\x41\101' }})"), std::string("a\tb\\n") + "é" + "AA");
  EXPECT_EQ(
      render("{{ 1_000 }} {{ 1.5e3 }} {{ 1e20 }} {{ 1e-5 }} {{ 0.0001 }} {{ 1e15 }} {{ 1e16 }}"),
      "1000 1500.0 1e+20 1e-05 0.0001 1000000000000000.0 1e+16");
  EXPECT_EQ(render("{{ True }}{{ False }}{{ None }}"), "TrueFalseNone");
}

TEST(ChatTemplateJinja, Arithmetic) {
  EXPECT_EQ(
      render("{{ 10 / 4 }}|{{ 10 // 4 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 7 % -3 }}|{{ 2 ** 10 }}"
             "|{{ 4 / 2 }}|{{ 0.1 + 0.2 }}|{{ 2 ** 3 ** 2 }}|{{ 1 + 2 * 3 - 4 }}"
             "|{{ (1 + 2) * 3 }}|{{ -2 ** 2 }}|{{ 7.5 // 2 }}|{{ true + 1 }}"),
      "2.5|2|-4|2|-2|1024|2.0|0.30000000000000004|64|3|9|4|3.0|2");
  EXPECT_EQ(render("{{ 'ab' * 3 }}{{ [0] * 2 }}{{ [1] + [2] }}{{ 'a' + 'b' }}"),
            "ababab[0, 0][1, 2]ab");
  // ~ stringifies (None -> "None", undefined -> "") and binds tighter than + and -.
  EXPECT_EQ(render("{{ 1 ~ 'a' ~ none ~ missing }}|{{ 'x' ~ 2 * 3 }}"), "1aNone|x6");
  expect_error([] { render("line one\n{{ 1 + 'a' }}"); }, ErrorKind::kInvalidArgument,
               {"unsupported operand type(s) for +: 'int' and 'str'", "line 2, column 6"});
  expect_error([] { render("{{ 1 // 0 }}"); }, ErrorKind::kInvalidArgument, {"by zero"});
  expect_error([] { render("{{ 9223372036854775807 + 1 }}"); }, ErrorKind::kInvalidArgument,
               {"overflow"});
}

TEST(ChatTemplateJinja, ComparisonsLogicAndTernary) {
  EXPECT_EQ(
      render("{{ 'b' in 'abc' }}{{ 3 not in [1, 2] }}{{ 'k' in {'k': 1} }}{{ 1 < 2 < 3 }}"
             "{{ 3 > 2 > 2 }}{{ 1 == 1.0 }}{{ true == 1 }}{{ 'a' != 'b' }}{{ [1, 2] == [1, 2] }}"
             "{{ 'a' < 'b' }}{{ 'x' in missing }}"),
      "TrueTrueTrueTrueFalseTrueTrueTrueTrueTrueFalse");
  EXPECT_EQ(render("{{ 0 or 'b' }}{{ 'a' and 'c' }}{{ none or [] }}{{ not 0 }}{{ not 'a' }}"),
            "bc[]TrueFalse");
  EXPECT_EQ(render("{{ 'y' if 1 else 'n' }}{{ 'y' if 0 else 'n' }}[{{ 'y' if 0 }}]"
                   "{{ 'a' if false else 'b' if true else 'c' }}"),
            "yn[]b");
  expect_error([] { render("{{ 1 < 'a' }}"); }, ErrorKind::kInvalidArgument,
               {"'<' not supported between instances of 'int' and 'str'"});
}

TEST(ChatTemplateJinja, Tests) {
  EXPECT_EQ(render("{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 'a' is string }}"
                   "{{ 1 is number }}{{ 1.5 is float }}{{ 1 is integer }}{{ true is integer }}"
                   "{{ {} is mapping }}{{ [] is iterable }}{{ 'a' is sequence }}{{ 5 is sequence }}"
                   "{{ true is true }}{{ 0 is false }}{{ 3 is odd }}{{ 4 is divisibleby 2 }}"
                   "{{ x is not none }}{{ 'abc' is lower }}{{ x is sameas 1 }}{{ 2 is in [1, 2] }}"
                   "{{ true is boolean }}{{ 1 is eq 1 }}{{ range is callable }}",
                   {{"x", 1}}),
            "TrueTrueTrueTrueTrueTrueTrueFalseTrueTrueTrueFalseTrueFalseTrueTrueTrueTrueTrueTrue"
            "TrueTrueTrue");
}

TEST(ChatTemplateJinja, AttributesItemsAndUndefined) {
  Json ctx = Json::parse(R"({"d": {"k": "v", "n": {"m": 1}, "items": "key"}, "l": [1, 2, 3],
                             "none_val": null})");
  EXPECT_EQ(render("{{ d.k }}{{ d['n'].m }}{{ d.n['m'] }}{{ l[0] }}{{ l[-1] }}{{ l.1 }}", ctx),
            "v11132");
  // Missing attributes and keys are undefined: falsy, print as "", length 0.
  EXPECT_EQ(render("[{{ d.missing }}][{{ d['missing'] }}][{{ l[10] }}][{{ none_val.x }}]"
                   "[{{ missing }}][{{ missing|length }}][{{ missing is iterable }}]"
                   "[{{ d.missing is defined }}]",
                   ctx),
            "[][][][][][0][True][False]");
  // d.items is the method (getattr wins), d['items'] the key.
  EXPECT_EQ(render("{{ d['items'] }} {{ d.items()|length }}", ctx), "key 3");
  // Using an undefined value is an error naming it.
  expect_error([&] { render("{{ missing.attr }}", ctx); }, ErrorKind::kInvalidArgument,
               {"'missing' is undefined"});
  expect_error([&] { render("{{ d.missing.deeper }}", ctx); }, ErrorKind::kInvalidArgument,
               {"has no attribute 'missing'"});
  expect_error([&] { render("{{ missing + 1 }}", ctx); }, ErrorKind::kInvalidArgument,
               {"'missing' is undefined"});
  expect_error([&] { render("{% for x in none_val %}{% endfor %}", ctx); },
               ErrorKind::kInvalidArgument, {"'NoneType' object is not iterable"});
}

TEST(ChatTemplateJinja, Slicing) {
  EXPECT_EQ(render("{{ [1, 2, 3, 4][::-1] }}{{ [1, 2, 3, 4][-2:] }}{{ [1, 2, 3, 4][1:3] }}"
                   "{{ [1, 2, 3, 4][::2] }}{{ [1, 2, 3][5:] }}"),
            "[4, 3, 2, 1][3, 4][2, 3][1, 3][]");
  EXPECT_EQ(render("{{ 'hello'[1:3] }}{{ 'abc'[::-1] }}{{ 'hello'[:-1] }}"), "elcbahell");
  EXPECT_EQ(render("{{ '日本語'|length }}{{ '日本語'[1] }}{{ '日本語'[::-1] }}{{ '日本語'[-2:] }}"),
            "3本語本日本語");
}

TEST(ChatTemplateJinja, StringMethods) {
  EXPECT_EQ(render("{{ 'a,b,,c'.split(',') }}{{ '  a  b '.split() }}{{ 'a b c'.split(' ', 1) }}"
                   "{{ 'a b c'.rsplit(' ', 1) }}{{ 'x</think>y'.split('</think>')[-1] }}"),
            "['a', 'b', '', 'c']['a', 'b']['a', 'b c']['a b', 'c']y");
  EXPECT_EQ(render("{{ 'xxhixx'.strip('x') }}|{{ '\\n\\nhi\\n'.lstrip('\\n') }}|"
                   "{{ '  hi  '.rstrip() }}|{{ '\\u3000hi '.strip() }}|{{ 'abcba'.strip('ab') }}"),
            "hi|hi\n|  hi|hi|c");
  EXPECT_EQ(render("{{ 'Hello'.startswith('He') }}{{ 'Hello'.endswith(('x', 'lo')) }}"
                   "{{ 'Hello'.startswith('lo') }}"),
            "TrueTrueFalse");
  EXPECT_EQ(render("{{ '{} + {} = {sum}'.format(1, 2, sum=3) }}|{{ '{0}{0}{{}}'.format('a') }}"),
            "1 + 2 = 3|aa{}");
  EXPECT_EQ(
      render("{{ 'abc'.upper() }}{{ 'ABC'.lower() }}{{ 'a-b'.replace('-', '+') }}"
             "{{ 'banana'.count('a') }}{{ 'banana'.find('n') }}{{ 'héllo'.find('l') }}"
             "{{ 'hello world'.title() }}{{ 'hELLO'.capitalize() }}{{ ', '.join(['a', 'b']) }}"
             "{{ 'ab'.replace('', '-') }}{{ 'a\\nb'.splitlines() }}"),
      "ABCabca+b322Hello WorldHelloa, b-a-b-['a', 'b']");
  Json d = Json::parse(R"({"d": {"a": 1, "b": 2}})");
  EXPECT_EQ(render("{{ d.keys()|list }}{{ d.values()|list }}{{ d.get('a') }}{{ d.get('z', 0) }}"
                   "{{ d.get('z') }}{{ d.items() }}",
                   d),
            "['a', 'b'][1, 2]10Nonedict_items([('a', 1), ('b', 2)])");
  EXPECT_EQ(
      render(
          "{{ ' a b '.split(None, 1) }}{{ ' a b '.rsplit(None, 1) }}{{ ' a b '.split(none, 0) }}"),
      "['a', 'b '][' a', 'b']['a b ']");
  expect_error([] { render("{{ 'a'.nosuch() }}"); }, ErrorKind::kInvalidArgument,
               {"'str object' has no attribute 'nosuch'"});
  expect_error([] { render("{{ [1].append(2) }}"); }, ErrorKind::kInvalidArgument, {"immutable"});
}

TEST(ChatTemplateJinja, Filters) {
  EXPECT_EQ(render("{{ 'abc'|upper }}{{ 'ABC'|lower }}{{ '  x  '|trim }}{{ 'xxyxx'|trim('x') }}"
                   "{{ [1, 2, 3]|length }}{{ {'a': 1}|count }}{{ 'hello world'|title }}"
                   "{{ 'hELLO'|capitalize }}"),
            "ABCabcxy31Hello WorldHello");
  EXPECT_EQ(render("{{ missing|default('d') }}{{ ''|default('d', true) }}[{{ ''|default('d') }}]"
                   "{{ none|default('x') }}{{ missing|d('e') }}"),
            "dd[]Nonee");
  EXPECT_EQ(render("{{ [1, 2, 3]|join(', ') }}|{{ [1, 2, 3]|first }}{{ [1, 2, 3]|last }}|"
                   "{{ 'ab'|list }}|{{ {'a': 1}|items|list }}|{{ 42|string ~ '!' }}"),
            "1, 2, 3|13|['a', 'b']|[('a', 1)]|42!");
  EXPECT_EQ(render("{{ 3.7|int }}{{ '42'|int + 1 }}{{ 'x'|int }}{{ '3.5'|int }}{{ 'x'|int(7) }}"
                   "{{ '2.5'|float }}{{ 2|float }}"),
            "343037"
            "2.52.0");
  EXPECT_EQ(render("{{ 2.5|round }}{{ 3.5|round }}{{ 2.675|round(2) }}{{ 2.1|round(0, 'ceil') }}"
                   "{{ -3|abs }}{{ [1, 2, 3]|sum }}{{ [1, 5, 3]|max }}{{ [4, 2, 8]|min }}"),
            "2.04.02.673.03652");
  EXPECT_EQ(render("{{ 'a-b'|replace('-', '+') }}{{ 'aaa'|replace('a', 'b', 2) }}{{ 'a<b'|e }}"
                   "{{ '<b>'|safe }}"),
            "a+bbbaa&lt;b<b>");
  EXPECT_EQ(
      render("{{ [3, 1, 2]|sort }}{{ ['b', 'A', 'a']|sort }}{{ [3, 1, 2]|sort(reverse=true) }}"
             "{{ [1, 2, 2, 3, 1]|unique|list }}{{ [1, 2, 3]|reverse|list }}{{ 'abc'|reverse }}"
             "{{ {'b': 1, 'a': 2}|dictsort }}"),
      "[1, 2, 3]['A', 'a', 'b'][3, 2, 1][1, 2, 3][3, 2, 1]cba[('a', 2), ('b', 1)]");
  Json ctx = Json::parse(R"({"msgs": [{"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]})");
  EXPECT_EQ(
      render("{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }}"
             "{{ msgs|rejectattr('role', 'equalto', 'user')|map(attribute='content')|join }}"
             "{{ [1, 2, 3, 4]|select('even')|list }}{{ [0, 1, '']|select|list }}"
             "{{ [1, 2, 3, 4]|reject('odd')|list }}{{ ['a', 'b']|map('upper')|join }}"
             "{{ msgs|map(attribute='missing', default='-')|join }}"
             "{{ msgs|sort(attribute='content', reverse=true)|map(attribute='content')|join }}",
             ctx),
      "['a', 'c']b[2, 4][1][2, 4]AB---cba");
  EXPECT_EQ(render("{{ 'a\\nb'|indent(2) }}|{{ 'a\\n\\nb'|indent(2, true) }}|"
                   "{{ 'a\\n\\nb'|indent('> ', blank=true) }}"),
            "a\n  b|  a\n\n  b|a\n> \n> b");
}

TEST(ChatTemplateJinja, ToJsonMatchesHfJsonDumps) {
  Json ctx = Json::parse(R"({"x": {"b": [1, 2.5, null, true], "a": "é\"\n<>&\u0001"}})");
  EXPECT_EQ(render("{{ x|tojson }}", ctx), R"({"b": [1, 2.5, null, true], "a": "é\"\n<>&\u0001"})");
  EXPECT_EQ(render("{{ x|tojson(indent=2) }}", ctx),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n"
            "  \"a\": \"é\\\"\\n<>&\\u0001\"\n}");
  EXPECT_EQ(render("{{ x|tojson(sort_keys=true) }}", ctx),
            R"({"a": "é\"\n<>&\u0001", "b": [1, 2.5, null, true]})");
  EXPECT_EQ(render("{{ x|tojson(ensure_ascii=true) }}", ctx),
            R"({"b": [1, 2.5, null, true], "a": "\u00e9\"\n<>&\u0001"})");
  EXPECT_EQ(render("{{ x|tojson(separators=(',', ':')) }}", ctx),
            R"({"b":[1,2.5,null,true],"a":"é\"\n<>&\u0001"})");
  EXPECT_EQ(render("{{ {'k': 1.0, 'e': 1e-7, 'big': 1e22, 'neg': -0.5, 'u': '😀'}|tojson }}"
                   "{{ []|tojson(indent=2) }}{{ {}|tojson }}{{ 'x'|tojson }}{{ none|tojson }}"),
            R"({"k": 1.0, "e": 1e-07, "big": 1e+22, "neg": -0.5, "u": "😀"}[]{}"x"null)");
  EXPECT_EQ(render("{{ '😀'|tojson(true) }}"), R"("\ud83d\ude00")");  // HF: 1st arg is ensure_ascii
  expect_error([] { render("{{ missing|tojson }}"); }, ErrorKind::kInvalidArgument,
               {"not JSON serializable"});
}

TEST(ChatTemplateJinja, Globals) {
  EXPECT_EQ(render("{{ range(3)|list }}{{ range(2, 10, 3)|list }}{{ range(3, 0, -1)|list }}"
                   "{{ range(0)|list }}"),
            "[0, 1, 2][2, 5, 8][3, 2, 1][]");
  EXPECT_EQ(render("{{ dict(a=1, b=2) }}{{ namespace({'x': 1}).x }}"), "{'a': 1, 'b': 2}1");
  EXPECT_EQ(render("{{ strftime_now('%Y')|length }}"), "4");
  expect_error([] { render("ok\n  {{ raise_exception('boom: ' ~ 42) }}"); },
               ErrorKind::kInvalidArgument, {"boom: 42", "line 2, column 6"});
  // A template variable shadows a global.
  EXPECT_EQ(render("{{ range }}", {{"range", "mine"}}), "mine");
}

TEST(ChatTemplateJinja, SyntaxErrorsNameLineAndColumn) {
  auto parse = [](const char* src) { return [src] { jinja::Template t(src, "tpl"); }; };
  expect_error(parse("{{ x }}\n  {{ y | nosuch }}"), ErrorKind::kUnsupported,
               {"tpl: line 2, column 10: unknown filter 'nosuch'"});
  expect_error(parse("{{ x is nosuchtest }}"), ErrorKind::kUnsupported,
               {"line 1, column 9", "unknown test 'nosuchtest'"});
  expect_error(parse("{% for m in ms %}{{ m|nosuch }}{% endfor %}"), ErrorKind::kUnsupported,
               {"line 1, column 23", "unknown filter 'nosuch'"});
  // Like Jinja 3, inside an `if` or an inline if-expression an unknown filter or test only fails
  // if it is evaluated, so a template with an exotic filter in an untaken branch still renders.
  EXPECT_EQ(
      render("{% if false %}{{ x|nosuch }}{% elif false %}{{ x is nosuchtest }}{% endif %}ok"),
      "ok");
  EXPECT_EQ(render("{{ x|nosuch if false else 1 }}"), "1");
  expect_error([] { render("{% if true %}\n  {{ x|nosuch }}{% endif %}"); },
               ErrorKind::kUnsupported, {"line 2, column 8", "unknown filter 'nosuch'"});
  expect_error(parse("{% if x %}\nabc\n{% endfor %}"), ErrorKind::kFormat,
               {"line 3, column 4", "unexpected tag 'endfor'"});
  expect_error(parse("{% for x in y %}abc"), ErrorKind::kFormat,
               {"line 1, column 20", "expected 'endfor' or 'else'"});
  expect_error(parse("{{ 'abc' }"), ErrorKind::kFormat, {"line 1, column 10", "unexpected '}'"});
  expect_error(parse("a\n{{ (1 + 2 }}"), ErrorKind::kFormat, {"line 2"});
  expect_error(parse("{{ a ! b }}"), ErrorKind::kFormat,
               {"line 1, column 6", "unexpected char '!'"});
  expect_error(parse("{{ 'unterminated }}"), ErrorKind::kFormat, {"unterminated string"});
  expect_error(parse("{# never closed"), ErrorKind::kFormat, {"missing end of comment tag"});
  expect_error(parse("{% include 'x.html' %}"), ErrorKind::kUnsupported,
               {"unsupported tag 'include'"});
  expect_error(parse("{% frobnicate %}"), ErrorKind::kUnsupported, {"unknown tag 'frobnicate'"});
  expect_error(parse("{% break %}"), ErrorKind::kFormat, {"'break' outside of a loop"});
  expect_error(parse("{{ f(a=1, 2) }}"), ErrorKind::kFormat, {"positional argument follows"});
  expect_error(parse("{{ }}"), ErrorKind::kFormat, {"line 1, column 4"});
  expect_error(parse("{% if %}"), ErrorKind::kFormat, {"line 1, column 7"});
  expect_error(parse("{{ x is defined is defined }}"), ErrorKind::kFormat, {"line 1"});
}

TEST(ChatTemplateJinja, LimitsTurnIntoErrors) {
  expect_error([] { render("{% for i in range(100000000) %}{% endfor %}"); },
               ErrorKind::kInvalidArgument, {"item limit"});
  expect_error([] { render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"); },
               ErrorKind::kInvalidArgument, {"depth limit"});
  expect_error([] { render("{{ 'x' * 100000000000 }}"); }, ErrorKind::kInvalidArgument,
               {"byte limit"});
  expect_error([] { render("{{ [1] * 100000000000 }}"); }, ErrorKind::kInvalidArgument,
               {"item limit"});
  expect_error(
      [] { render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"); },
      ErrorKind::kFormat, {"nested more than"});
  // Quadratic string growth runs out of steps instead of running for hours.
  jinja::Options small;
  small.max_steps = 100000;
  expect_error(
      [&] {
        jinja::Template(
            "{% set ns = namespace(s='') %}{% for i in range(1000000) %}"
            "{% set ns.s = ns.s ~ 'xxxxxxxxxxxxxxxx' %}{% endfor %}",
            "t", small)
            .render(Json::object());
      },
      ErrorKind::kInvalidArgument, {"budget"});
}

// ================================================================================================
// Mutation fuzzing: any mutated template either renders or throws moeflux::Error.

TEST(ChatTemplateFuzz, MutatedTemplatesRenderOrThrowError) {
  Json qwen3_cfg = Json::parse(read_text(data_path("tokenizer/qwen3/tokenizer_config.json")));
  Json mixtral_cfg = Json::parse(read_text(data_path("tokenizer/mixtral/tokenizer_config.json")));
  const std::vector<std::string> bases = {
      qwen3_cfg["chat_template"].get<std::string>(), qwen3_cfg["chat_template"].get<std::string>(),
      read_text(data_path("tokenizer/qwen3_5_moe/chat_template.jinja")),
      mixtral_cfg["chat_template"].get<std::string>()};
  static const char* kSnippets[] = {"{%",
                                    "%}",
                                    "{{",
                                    "}}",
                                    "{#",
                                    "#}",
                                    "-",
                                    "+",
                                    "(",
                                    ")",
                                    "[",
                                    "]",
                                    "{",
                                    "}",
                                    "'",
                                    "\"",
                                    "\\",
                                    "|",
                                    ".",
                                    ",",
                                    ":",
                                    "~",
                                    "*",
                                    "**",
                                    "//",
                                    "%",
                                    "==",
                                    " in ",
                                    " not ",
                                    " if ",
                                    " else ",
                                    " is ",
                                    "endif",
                                    "endfor",
                                    "{% endfor %}",
                                    "{% endif %}",
                                    "{% for x in messages %}",
                                    "{% if x %}",
                                    "loop.index",
                                    "loop.previtem",
                                    "|tojson",
                                    "|length",
                                    "|items",
                                    "|trim",
                                    "|tojson(indent=2)",
                                    "namespace(a=1)",
                                    "range(99999999)",
                                    "'x' * 999999999",
                                    "[1] * 99999999",
                                    "10 ** 99",
                                    "messages",
                                    "messages[::-1]",
                                    "message.content",
                                    ".split('a')",
                                    "raise_exception('r')",
                                    "{% macro m(a) %}{{ m(a) }}{% endmacro %}{{ m(1) }}",
                                    "{% break %}",
                                    "\xff",
                                    "\xe6\x97\xa5",
                                    "\n",
                                    " ",
                                    "0",
                                    "-1",
                                    "none",
                                    "true",
                                    "{% set ns.x = 1 %}",
                                    "ns.multi_step_tool",
                                    "{%- ",
                                    " -%}",
                                    "{% set x %}",
                                    "{% endset %}",
                                    "{{ x.y.z }}",
                                    "'\\u00e9'",
                                    "'\\x4'",
                                    "9223372036854775807",
                                    "1e308 * 10"};
  Json tool_call = Json::parse(
      R"([{"type": "function", "function": {"name": "f", "arguments": {"a": [1, {"b": "c"}]}}}])");
  const std::vector<Json> contexts = {
      Json{{"messages", Json::array({{{"role", "system"}, {"content", "S"}},
                                     {{"role", "user"}, {"content", "Hi <tool_response>"}},
                                     {{"role", "assistant"}, {"content", "<think>r</think>A"}},
                                     {{"role", "user"}, {"content", "日本語"}}})},
           {"add_generation_prompt", true},
           {"enable_thinking", false},
           {"bos_token", "<s>"},
           {"eos_token", "</s>"}},
      Json{{"messages",
            Json::array({{{"role", "user"}, {"content", "Q"}},
                         {{"role", "assistant"}, {"content", ""}, {"tool_calls", tool_call}},
                         {{"role", "tool"}, {"content", "R"}}})},
           {"tools", Json::array({weather_tool()})},
           {"add_generation_prompt", false}}};

  jinja::Options opt;
  opt.max_steps = 200000;
  opt.max_string_bytes = size_t{1} << 20;
  opt.max_list_items = 100000;
  std::mt19937 rng(20240601);
  auto pick = [&](size_t n) { return n == 0 ? size_t(0) : size_t(rng() % n); };
  constexpr int kIterations = 1500;
  int rendered = 0, errors = 0;
  auto start = std::chrono::steady_clock::now();
  for (int it = 0; it < kIterations; ++it) {
    std::string s = bases[size_t(it) % bases.size()];
    int mutations = 1 + int(rng() % 4);
    for (int k = 0; k < mutations; ++k) {
      size_t pos = pick(s.size() + 1);
      switch (rng() % 5) {
        case 0:
          s.erase(pos, pick(24));
          break;
        case 1:
          s.insert(pos, kSnippets[pick(std::size(kSnippets))]);
          break;
        case 2:
          s.insert(pick(s.size() + 1), s.substr(pos, pick(80)));
          break;
        case 3:
          if (!s.empty()) s[pick(s.size())] = char(rng() & 0xFF);
          break;
        default:
          s.insert(pos, 1, " {}%#-+|'\"()[]"[pick(14)]);
          break;
      }
    }
    try {
      jinja::Template t(s, "fuzz", opt);
      t.render(contexts[size_t(it) % contexts.size()]);
      ++rendered;
    } catch (const Error&) {
      ++errors;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << it << ": non-moeflux exception " << e.what() << "\n" << s;
      break;
    }
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "[fuzz] " << kIterations << " mutated templates: " << rendered << " rendered, "
            << errors << " rejected with moeflux::Error, " << secs << " s\n";
  EXPECT_GT(rendered, 50);
  EXPECT_GT(errors, 50);
}

}  // namespace
}  // namespace moeflux
