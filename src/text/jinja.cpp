// Jinja2 subset interpreter: lexer -> parser -> AST -> tree-walking renderer. See jinja.h.
//
// Where Jinja's behaviour is subtle the code follows jinja2 3.1 (lexer.py, parser.py,
// runtime.py, filters.py, tests.py) and says so; Python semantics (str(), repr(), json.dumps,
// slicing, floor division, str methods) are reproduced where chat templates can observe them.
#include "text/jinja.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "util/error.h"

namespace moeflux::jinja {
namespace detail {

// A failure raised below the node that knows its position; Interp::eval/exec attach the
// position of the innermost node and turn it into a moeflux::Error.
struct Fault {
  ErrorKind kind;
  std::string msg;
};

[[noreturn]] void fault(std::string msg, ErrorKind kind = ErrorKind::kInvalidArgument) {
  throw Fault{kind, std::move(msg)};
}

// ------------------------------------------------------------------------------------------------
// UTF-8

struct Decoded {
  uint32_t cp;
  size_t len;
};

// Invalid bytes decode as one unit each (cp 0xDC00+byte, as Python's surrogateescape would), so
// slicing by code point never splits or drops input bytes.
Decoded decode_at(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return {c, 1};
  size_t need;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) {
    need = 1, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    need = 2, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    need = 3, cp = c & 0x07;
  } else {
    return {0xDC00u + c, 1};
  }
  if (i + need >= s.size()) return {0xDC00u + c, 1};
  for (size_t k = 1; k <= need; ++k) {
    auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {0xDC00u + c, 1};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {cp, need + 1};
}

void append_utf8(std::string& out, uint32_t cp) {
  if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) cp = 0xFFFD;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// str.isspace() / the `\s` of Python's re module.
bool is_py_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// Python indexes strings by code point; this maps code point indices to byte offsets.
class CpIndex {
 public:
  explicit CpIndex(std::string_view s) : s_(s), ascii_(is_ascii(s)) {
    if (ascii_) return;
    for (size_t i = 0; i < s.size(); i += decode_at(s, i).len) off_.push_back(i);
    off_.push_back(s.size());
  }
  size_t size() const { return ascii_ ? s_.size() : off_.size() - 1; }
  size_t byte(size_t i) const { return ascii_ ? i : off_[i]; }
  std::string_view at(size_t i) const { return s_.substr(byte(i), byte(i + 1) - byte(i)); }

 private:
  std::string_view s_;
  bool ascii_;
  std::vector<size_t> off_;
};

size_t cp_count(std::string_view s) {
  size_t n = 0;
  for (char c : s)
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++n;
  return n;
}

std::vector<uint32_t> code_points(std::string_view s) {
  std::vector<uint32_t> cps;
  for (size_t i = 0; i < s.size();) {
    Decoded d = decode_at(s, i);
    cps.push_back(d.cp);
    i += d.len;
  }
  return cps;
}

// str.strip/lstrip/rstrip; `chars` null means whitespace.
std::string_view py_strip(std::string_view s, const std::vector<uint32_t>* chars, bool left,
                          bool right) {
  auto strip_it = [&](uint32_t cp) {
    return chars ? std::find(chars->begin(), chars->end(), cp) != chars->end() : is_py_space(cp);
  };
  CpIndex idx(s);
  size_t b = 0, e = idx.size();
  if (left)
    while (b < e && strip_it(decode_at(s, idx.byte(b)).cp)) ++b;
  if (right)
    while (e > b && strip_it(decode_at(s, idx.byte(e - 1)).cp)) --e;
  return s.substr(idx.byte(b), idx.byte(e) - idx.byte(b));
}

std::string ascii_lower(std::string_view s) {
  std::string r(s);
  for (char& c : r)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return r;
}

std::string ascii_upper(std::string_view s) {
  std::string r(s);
  for (char& c : r)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  return r;
}

bool is_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// ------------------------------------------------------------------------------------------------
// Values

struct Value;
struct ListData;
struct DictData;
struct Function;
struct Interp;

struct Undefined {
  std::string hint;  // the UndefinedError message if this value is used
};
struct NoneT {};
struct NsRef {
  std::shared_ptr<DictData> d;  // namespace(): the one mutable object a template can make
};

using ListPtr = std::shared_ptr<const ListData>;
using DictPtr = std::shared_ptr<const DictData>;
using FnPtr = std::shared_ptr<const Function>;

struct Value {
  std::variant<Undefined, NoneT, bool, int64_t, double, std::string, ListPtr, DictPtr, NsRef, FnPtr>
      v;

  static Value undefined(std::string hint) { return Value{Undefined{std::move(hint)}}; }
  static Value none() { return Value{NoneT{}}; }
  static Value boolean(bool b) { return Value{b}; }
  static Value integer(int64_t i) { return Value{i}; }
  static Value number(double d) { return Value{d}; }
  static Value string(std::string s) { return Value{std::move(s)}; }
  static Value list(std::vector<Value> items, bool tuple = false);
  static Value dict(DictData d);

  bool is_undefined() const { return std::holds_alternative<Undefined>(v); }
  bool is_none() const { return std::holds_alternative<NoneT>(v); }
  bool is_bool() const { return std::holds_alternative<bool>(v); }
  bool is_int() const { return std::holds_alternative<int64_t>(v); }
  bool is_float() const { return std::holds_alternative<double>(v); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  bool is_list() const { return std::holds_alternative<ListPtr>(v); }
  bool is_dict() const { return std::holds_alternative<DictPtr>(v); }
  bool is_ns() const { return std::holds_alternative<NsRef>(v); }
  bool is_fn() const { return std::holds_alternative<FnPtr>(v); }
  bool is_integral() const { return is_int() || is_bool(); }  // Python: bool is an int
  bool is_numeric() const { return is_integral() || is_float(); }

  bool as_bool() const { return std::get<bool>(v); }
  int64_t to_int() const { return is_bool() ? (as_bool() ? 1 : 0) : std::get<int64_t>(v); }
  double to_double() const { return is_float() ? std::get<double>(v) : double(to_int()); }
  const std::string& str() const { return std::get<std::string>(v); }
  const ListData& list() const { return *std::get<ListPtr>(v); }
  const DictData& dict() const { return *std::get<DictPtr>(v); }
  DictData& ns() const { return *std::get<NsRef>(v).d; }
  const Function& fn() const { return *std::get<FnPtr>(v); }
  const std::string& hint() const { return std::get<Undefined>(v).hint; }
};

// What Python object a sequence stands for. Templates can observe the difference: a tuple
// prints as (1, 2); d.items() prints as dict_items([...]) and is not JSON serializable; the
// results of map/select/unique/|items/|reverse are generators, which are always truthy, have
// no len() and cannot be indexed.
enum class Seq : uint8_t { kList, kTuple, kView, kIterator };

struct ListData {
  std::vector<Value> items;
  Seq kind = Seq::kList;
  const char* name = "list";  // Python type name
  bool plain() const { return kind == Seq::kList || kind == Seq::kTuple; }
  bool tuple() const { return kind == Seq::kTuple; }
};

// Insertion-ordered string-keyed map, like a Python dict built from JSON.
struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(std::string_view k) const {
    for (auto& [key, val] : items)
      if (key == k) return &val;
    return nullptr;
  }
  void set(std::string k, Value val) {
    for (auto& [key, old] : items)
      if (key == k) {
        old = std::move(val);
        return;
      }
    items.emplace_back(std::move(k), std::move(val));
  }
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

struct Function {
  std::string name;
  std::function<Value(Interp&, CallArgs&)> call;
};

Value make_seq(std::vector<Value> items, Seq kind, const char* name) {
  auto d = std::make_shared<ListData>();
  d->items = std::move(items);
  d->kind = kind;
  d->name = name;
  return Value{ListPtr(std::move(d))};
}

Value Value::list(std::vector<Value> items, bool tuple) {
  return make_seq(std::move(items), tuple ? Seq::kTuple : Seq::kList, tuple ? "tuple" : "list");
}

Value dict_view(std::vector<Value> items, const char* name) {
  return make_seq(std::move(items), Seq::kView, name);
}

Value generator(std::vector<Value> items, const char* name = "generator") {
  return make_seq(std::move(items), Seq::kIterator, name);
}

Value Value::dict(DictData d) {
  return Value{DictPtr(std::make_shared<DictData>(std::move(d)))};
}

Value make_fn(std::string name, std::function<Value(Interp&, CallArgs&)> f) {
  return Value{FnPtr(std::make_shared<Function>(Function{std::move(name), std::move(f)}))};
}

const char* type_name(const Value& v) {
  switch (v.v.index()) {
    case 0:
      return "Undefined";
    case 1:
      return "NoneType";
    case 2:
      return "bool";
    case 3:
      return "int";
    case 4:
      return "float";
    case 5:
      return "str";
    case 6:
      return v.list().name;
    case 7:
      return "dict";
    case 8:
      return "Namespace";
    default:
      return "function";
  }
}

bool truthy(const Value& v) {
  switch (v.v.index()) {
    case 0:
      return false;
    case 1:
      return false;
    case 2:
      return v.as_bool();
    case 3:
      return v.to_int() != 0;
    case 4:
      return v.to_double() != 0.0;
    case 5:
      return !v.str().empty();
    case 6:
      return v.list().kind == Seq::kIterator || !v.list().items.empty();
    case 7:
      return !v.dict().items.empty();
    default:
      return true;
  }
}

// repr(float), which str() and json.dumps also use: shortest round-trip digits, positional
// notation for 1e-4 <= |x| < 1e16, else exponent notation with at least two exponent digits.
std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view sci(buf, r.ptr - buf);  // [-]d[.ddd]e[+-]xx
  bool neg = sci[0] == '-';
  if (neg) sci.remove_prefix(1);
  size_t epos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, epos))
    if (c != '.') digits += c;
  int exp = 0;
  std::from_chars(sci.data() + epos + 1 + (sci[epos + 1] == '+' ? 1 : 0), sci.data() + sci.size(),
                  exp);
  int decpt = exp + 1;  // value = 0.DIGITS * 10^decpt
  std::string out = neg ? "-" : "";
  if (decpt > 16 || decpt < -3) {
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (decpt <= 0) {
    out += "0." + std::string(size_t(-decpt), '0') + digits;
  } else if (size_t(decpt) >= digits.size()) {
    out += digits + std::string(size_t(decpt) - digits.size(), '0') + ".0";
  } else {
    out += digits.substr(0, size_t(decpt)) + "." + digits.substr(size_t(decpt));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// AST

struct Node {
  int line = 0, col = 0;
};

struct Expr : Node {
  virtual ~Expr() = default;
  virtual Value eval(Interp& ip) const = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

enum class Flow { kNormal, kBreak, kContinue };

struct Stmt : Node {
  virtual ~Stmt() = default;
  virtual Flow exec(Interp& ip) const = 0;
};
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

using FilterFn = Value (*)(Interp&, const Value&, CallArgs&);
using TestFn = bool (*)(Interp&, const Value&, CallArgs&);
const std::unordered_map<std::string, FilterFn>& filters();
const std::unordered_map<std::string, TestFn>& tests();

// ------------------------------------------------------------------------------------------------
// Interpreter state

struct Scope {
  std::vector<std::pair<std::string, Value>> vars;
  const Value* find(std::string_view name) const {
    for (auto& [k, v] : vars)
      if (k == name) return &v;
    return nullptr;
  }
  void set(std::string name, Value v) {
    for (auto& [k, old] : vars)
      if (k == name) {
        old = std::move(v);
        return;
      }
    vars.emplace_back(std::move(name), std::move(v));
  }
};

struct MacroStmt;

struct Interp {
  const std::string& name;
  const Options& opt;
  // scopes[0]: render context, scopes[1]: template-level `set`s, then loop and macro frames.
  // Lookups walk down to `base` (the innermost macro frame), then jump to [1] and [0], which is
  // how a top-level macro sees globals but not its caller's loop variables.
  std::vector<Scope> scopes;
  size_t base = 1;
  std::string* out = nullptr;
  int64_t steps = 0;
  int depth = 0;

  Interp(const std::string& n, const Options& o) : name(n), opt(o) {}

  [[noreturn]] void fail_at(const Node& n, ErrorKind kind, const std::string& msg) const {
    fail(kind, "{}: line {}, column {}: {}", name, n.line, n.col, msg);
  }

  void charge(int64_t units) {
    steps += units;
    if (steps > opt.max_steps)
      fault(fmt::format("template exceeded its budget of {} steps", opt.max_steps));
  }
  void charge_bytes(size_t n) { charge(1 + int64_t(n / 64)); }
  void check_len(size_t n) const {
    if (n > opt.max_string_bytes)
      fault(fmt::format("string result exceeds the {} byte limit", opt.max_string_bytes));
  }
  void check_items(size_t n) const {
    if (n > opt.max_list_items)
      fault(fmt::format("list result exceeds the {} item limit", opt.max_list_items));
  }

  struct DepthGuard {
    Interp& ip;
    DepthGuard(Interp& i, const Node& n) : ip(i) {
      if (++ip.depth > ip.opt.max_depth) {
        --ip.depth;
        ip.fail_at(n, ErrorKind::kInvalidArgument,
                   fmt::format("template nesting exceeds the depth limit of {}", ip.opt.max_depth));
      }
    }
    ~DepthGuard() { --ip.depth; }
  };

  Value eval(const Expr& e) {
    DepthGuard g(*this, e);
    try {
      return e.eval(*this);
    } catch (const Fault& f) {
      fail_at(e, f.kind, f.msg);
    }
  }

  Flow exec(const Stmt& s) {
    DepthGuard g(*this, s);
    try {
      charge(1);
      return s.exec(*this);
    } catch (const Fault& f) {
      fail_at(s, f.kind, f.msg);
    }
  }

  Flow exec(const Body& body) {
    for (auto& s : body) {
      Flow f = exec(*s);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Value lookup(std::string_view n) const;
  void assign(std::string n, Value v) { scopes.back().set(std::move(n), std::move(v)); }

  // Python semantics
  void write_str(const Value& v, std::string& o, int d = 0);
  void write_repr(const Value& v, std::string& o, int d = 0);
  std::string to_str(const Value& v) {
    if (v.is_string()) return v.str();
    std::string s;
    write_str(v, s);
    return s;
  }
  std::vector<Value> iterate(const Value& v);
  size_t length(const Value& v);
  Value get_attr(const Value& obj, const std::string& attr);
  Value get_item(const Value& obj, const Value& key);
  Value call(const Value& callee, CallArgs& args);
  Value call_macro(const MacroStmt& m, CallArgs& args);
  Value apply_filter(const std::string& fname, const Value& v, CallArgs& args);
  bool apply_test(const std::string& tname, const Value& v, CallArgs& args);
};

[[noreturn]] void undefined_error(const Value& v) {
  fault(v.hint());
}

// ------------------------------------------------------------------------------------------------
// str() / repr()

void write_py_string_repr(const std::string& s, std::string& o) {
  char q = '\'';
  if (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) q = '"';
  o += q;
  for (size_t i = 0; i < s.size();) {
    Decoded d = decode_at(s, i);
    uint32_t cp = d.cp;
    if (cp == uint32_t(q) || cp == '\\') {
      o += '\\';
      o += char(cp);
    } else if (cp == '\n') {
      o += "\\n";
    } else if (cp == '\r') {
      o += "\\r";
    } else if (cp == '\t') {
      o += "\\t";
    } else if (cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp < 0xA0)) {
      o += fmt::format("\\x{:02x}", cp);
    } else if (cp >= 0xDC80 && cp <= 0xDCFF && d.len == 1) {
      o += fmt::format("\\udc{:02x}", cp & 0xFF);  // an invalid byte
    } else {
      o.append(s, i, d.len);
    }
    i += d.len;
  }
  o += q;
}

void Interp::write_str(const Value& v, std::string& o, int d) {
  if (d > opt.max_depth) fault("value nested too deeply to print");
  switch (v.v.index()) {
    case 0:
      break;
    case 1:
      o += "None";
      break;
    case 2:
      o += v.as_bool() ? "True" : "False";
      break;
    case 3:
      o += std::to_string(v.to_int());
      break;
    case 4:
      o += py_float_repr(v.to_double());
      break;
    case 5:
      o += v.str();
      break;
    default:
      write_repr(v, o, d);
      return;
  }
  check_len(o.size());
}

void Interp::write_repr(const Value& v, std::string& o, int d) {
  if (d > opt.max_depth) fault("value nested too deeply to print");
  charge(1);
  switch (v.v.index()) {
    case 0:
      o += "Undefined";
      break;
    case 5:
      write_py_string_repr(v.str(), o);
      break;
    case 6: {
      const ListData& l = v.list();
      if (l.kind == Seq::kIterator) {
        o += fmt::format("<{} object>", l.name);
        break;
      }
      if (l.kind == Seq::kView) o += std::string(l.name) + "(";
      o += l.tuple() ? '(' : '[';
      for (size_t i = 0; i < l.items.size(); ++i) {
        if (i) o += ", ";
        write_repr(l.items[i], o, d + 1);
      }
      if (l.tuple() && l.items.size() == 1) o += ',';
      o += l.tuple() ? ')' : ']';
      if (l.kind == Seq::kView) o += ')';
      break;
    }
    case 7:
    case 8: {
      const DictData& dd = v.is_dict() ? v.dict() : v.ns();
      if (v.is_ns()) o += "<Namespace ";
      o += '{';
      bool first = true;
      for (auto& [k, val] : dd.items) {
        if (!first) o += ", ";
        first = false;
        write_py_string_repr(k, o);
        o += ": ";
        write_repr(val, o, d + 1);
      }
      o += '}';
      if (v.is_ns()) o += '>';
      break;
    }
    case 9:
      o += fmt::format("<function {}>", v.fn().name);
      break;
    default:
      write_str(v, o, d);
      return;
  }
  check_len(o.size());
}

// ------------------------------------------------------------------------------------------------
// json.dumps(x, ensure_ascii=..., indent=..., separators=..., sort_keys=...), as HF's tojson.

struct JsonStyle {
  bool ensure_ascii = false;
  bool pretty = false;
  std::string indent;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

void write_json_string(const std::string& s, std::string& o, bool ensure_ascii) {
  o += '"';
  for (size_t i = 0; i < s.size();) {
    Decoded d = decode_at(s, i);
    uint32_t cp = d.cp;
    switch (cp) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\r':
        o += "\\r";
        break;
      case '\t':
        o += "\\t";
        break;
      case '\b':
        o += "\\b";
        break;
      case '\f':
        o += "\\f";
        break;
      default:
        if (cp < 0x20) {
          o += fmt::format("\\u{:04x}", cp);
        } else if (ensure_ascii && cp >= 0x80) {
          if (cp >= 0x10000) {
            uint32_t c = cp - 0x10000;
            o += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
          } else {
            o += fmt::format("\\u{:04x}", cp);
          }
        } else {
          o.append(s, i, d.len);
        }
    }
    i += d.len;
  }
  o += '"';
}

void write_json(Interp& ip, const Value& v, std::string& o, const JsonStyle& st, int level) {
  if (level > ip.opt.max_depth) fault("value nested too deeply for tojson");
  ip.charge(1);
  auto newline = [&](int lvl) {
    o += '\n';
    for (int i = 0; i < lvl; ++i) o += st.indent;
  };
  switch (v.v.index()) {
    case 1:
      o += "null";
      break;
    case 2:
      o += v.as_bool() ? "true" : "false";
      break;
    case 3:
      o += std::to_string(v.to_int());
      break;
    case 4: {
      double d = v.to_double();
      if (std::isnan(d))
        o += "NaN";
      else if (std::isinf(d))
        o += d < 0 ? "-Infinity" : "Infinity";
      else
        o += py_float_repr(d);
      break;
    }
    case 5:
      write_json_string(v.str(), o, st.ensure_ascii);
      break;
    case 6: {
      if (!v.list().plain())
        fault(fmt::format("Object of type {} is not JSON serializable", v.list().name));
      const auto& items = v.list().items;
      if (items.empty()) {
        o += "[]";
        break;
      }
      o += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) o += st.item_sep;
        if (st.pretty) newline(level + 1);
        write_json(ip, items[i], o, st, level + 1);
      }
      if (st.pretty) newline(level);
      o += ']';
      break;
    }
    case 7: {
      const auto& items = v.dict().items;
      if (items.empty()) {
        o += "{}";
        break;
      }
      std::vector<const std::pair<std::string, Value>*> order;
      for (auto& kv : items) order.push_back(&kv);
      if (st.sort_keys)
        std::stable_sort(order.begin(), order.end(),
                         [](auto* a, auto* b) { return a->first < b->first; });
      o += '{';
      for (size_t i = 0; i < order.size(); ++i) {
        if (i) o += st.item_sep;
        if (st.pretty) newline(level + 1);
        write_json_string(order[i]->first, o, st.ensure_ascii);
        o += st.key_sep;
        write_json(ip, order[i]->second, o, st, level + 1);
      }
      if (st.pretty) newline(level);
      o += '}';
      break;
    }
    default:
      fault(fmt::format("Object of type {} is not JSON serializable", type_name(v)));
  }
  ip.check_len(o.size());
}

Value from_json(const nlohmann::ordered_json& j, int depth) {
  if (depth > 256) fault("JSON value nested more than 256 levels deep");
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      auto u = j.get<uint64_t>();
      if (u > uint64_t(INT64_MAX)) return Value::number(double(u));
      return Value::integer(int64_t(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (auto& e : j) items.push_back(from_json(e, depth + 1));
      return Value::list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      DictData d;
      for (auto& [k, e] : j.items()) d.items.emplace_back(k, from_json(e, depth + 1));
      return Value::dict(std::move(d));
    }
    default:
      fault("binary JSON values are not supported");
  }
}

// ------------------------------------------------------------------------------------------------
// Equality, ordering, containment (Python ==, <, in)

bool equal(Interp& ip, const Value& a, const Value& b, int d = 0) {
  if (d > ip.opt.max_depth) fault("value nested too deeply to compare");
  if (a.is_numeric() && b.is_numeric()) {
    if (a.is_float() || b.is_float()) return a.to_double() == b.to_double();
    return a.to_int() == b.to_int();
  }
  if (a.v.index() != b.v.index()) return false;
  switch (a.v.index()) {
    case 0:
    case 1:
      return true;
    case 5:
      return a.str() == b.str();
    case 6: {
      if (!a.list().plain() || a.list().kind != b.list().kind)
        return std::get<ListPtr>(a.v) == std::get<ListPtr>(b.v);
      const auto &x = a.list().items, &y = b.list().items;
      if (x.size() != y.size()) return false;
      ip.charge(int64_t(x.size()));
      for (size_t i = 0; i < x.size(); ++i)
        if (!equal(ip, x[i], y[i], d + 1)) return false;
      return true;
    }
    case 7: {
      const auto &x = a.dict(), &y = b.dict();
      if (x.items.size() != y.items.size()) return false;
      ip.charge(int64_t(x.items.size()));
      for (auto& [k, v] : x.items) {
        const Value* o = y.find(k);
        if (!o || !equal(ip, v, *o, d + 1)) return false;
      }
      return true;
    }
    case 8:
      return std::get<NsRef>(a.v).d == std::get<NsRef>(b.v).d;
    case 9:
      return std::get<FnPtr>(a.v) == std::get<FnPtr>(b.v);
    default:
      return false;
  }
}

// Python's a < b (sign of three-way compare); faults on unorderable types.
int compare(Interp& ip, const Value& a, const Value& b, const char* op, int d = 0) {
  if (a.is_undefined()) undefined_error(a);
  if (b.is_undefined()) undefined_error(b);
  if (a.is_numeric() && b.is_numeric()) {
    if (a.is_float() || b.is_float()) {
      double x = a.to_double(), y = b.to_double();
      return x < y ? -1 : (x > y ? 1 : 0);
    }
    int64_t x = a.to_int(), y = b.to_int();
    return x < y ? -1 : (x > y ? 1 : 0);
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
    return c < 0 ? -1 : (c > 0 ? 1 : 0);
  }
  if (a.is_list() && b.is_list() && a.list().plain() && a.list().kind == b.list().kind &&
      d <= ip.opt.max_depth) {
    const auto &x = a.list().items, &y = b.list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (!equal(ip, x[i], y[i])) return compare(ip, x[i], y[i], op, d + 1);
    }
    return x.size() < y.size() ? -1 : (x.size() > y.size() ? 1 : 0);
  }
  fault(fmt::format("'{}' not supported between instances of '{}' and '{}'", op, type_name(a),
                    type_name(b)));
}

bool contains(Interp& ip, const Value& container, const Value& item) {
  switch (container.v.index()) {
    case 0:
      return false;  // Undefined iterates as empty
    case 5:
      if (!item.is_string())
        fault(
            fmt::format("'in <string>' requires string as left operand, not {}", type_name(item)));
      ip.charge_bytes(container.str().size());
      return container.str().find(item.str()) != std::string::npos;
    case 6:
      ip.charge(int64_t(container.list().items.size()));
      for (auto& e : container.list().items)
        if (equal(ip, e, item)) return true;
      return false;
    case 7:
      return item.is_string() && container.dict().find(item.str()) != nullptr;
    default:
      fault(fmt::format("argument of type '{}' is not iterable", type_name(container)));
  }
}

// ------------------------------------------------------------------------------------------------
// Arithmetic

int64_t add_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) fault("integer overflow");
  return r;
}
int64_t sub_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) fault("integer overflow");
  return r;
}
int64_t mul_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fault("integer overflow");
  return r;
}

int64_t py_floordiv(int64_t a, int64_t b) {
  if (b == 0) fault("integer division or modulo by zero");
  if (a == INT64_MIN && b == -1) fault("integer overflow");
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

int64_t py_mod(int64_t a, int64_t b) {
  if (b == 0) fault("integer division or modulo by zero");
  if (b == -1) return 0;
  int64_t r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}

double py_fmod(double a, double b) {
  if (b == 0) fault("float modulo");
  double r = std::fmod(a, b);
  if (r == 0) return std::copysign(0.0, b);  // the sign of the divisor, as CPython
  if ((r < 0) != (b < 0)) r += b;
  return r;
}

enum class BinOp { kAdd, kSub, kMul, kDiv, kFloorDiv, kMod, kPow, kConcat, kAnd, kOr };

const char* binop_symbol(BinOp op) {
  switch (op) {
    case BinOp::kAdd:
      return "+";
    case BinOp::kSub:
      return "-";
    case BinOp::kMul:
      return "*";
    case BinOp::kDiv:
      return "/";
    case BinOp::kFloorDiv:
      return "//";
    case BinOp::kMod:
      return "%";
    case BinOp::kPow:
      return "**";
    case BinOp::kConcat:
      return "~";
    case BinOp::kAnd:
      return "and";
    case BinOp::kOr:
      return "or";
  }
  return "?";
}

Value repeat(Interp& ip, const Value& seq, int64_t n) {
  if (n <= 0) return seq.is_string() ? Value::string("") : Value::list({});
  if (seq.is_string()) {
    const std::string& s = seq.str();
    if (!s.empty() && uint64_t(n) > ip.opt.max_string_bytes / s.size()) ip.check_len(SIZE_MAX);
    ip.charge_bytes(s.size() * size_t(n));
    std::string r;
    r.reserve(s.size() * size_t(n));
    for (int64_t i = 0; i < n; ++i) r += s;
    return Value::string(std::move(r));
  }
  const auto& items = seq.list().items;
  if (!items.empty() && uint64_t(n) > ip.opt.max_list_items / items.size())
    ip.check_items(SIZE_MAX);
  ip.charge(int64_t(items.size()) * n);
  std::vector<Value> r;
  r.reserve(items.size() * size_t(n));
  for (int64_t i = 0; i < n; ++i) r.insert(r.end(), items.begin(), items.end());
  return Value::list(std::move(r), seq.list().tuple());
}

Value arith(Interp& ip, BinOp op, const Value& a, const Value& b) {
  if (a.is_undefined()) undefined_error(a);
  if (b.is_undefined()) undefined_error(b);
  auto unsupported = [&]() -> Value {
    fault(fmt::format("unsupported operand type(s) for {}: '{}' and '{}'", binop_symbol(op),
                      type_name(a), type_name(b)));
  };
  if (a.is_numeric() && b.is_numeric()) {
    bool fl = a.is_float() || b.is_float();
    if (op == BinOp::kDiv) {
      if (b.to_double() == 0) fault("division by zero");
      return Value::number(a.to_double() / b.to_double());
    }
    if (fl) {
      double x = a.to_double(), y = b.to_double();
      switch (op) {
        case BinOp::kAdd:
          return Value::number(x + y);
        case BinOp::kSub:
          return Value::number(x - y);
        case BinOp::kMul:
          return Value::number(x * y);
        case BinOp::kFloorDiv:
          if (y == 0) fault("float floor division by zero");
          return Value::number(std::floor(x / y));
        case BinOp::kMod:
          return Value::number(py_fmod(x, y));
        case BinOp::kPow: {
          if (x == 0 && y < 0) fault("0.0 cannot be raised to a negative power");
          double r = std::pow(x, y);
          if (std::isinf(r) && std::isfinite(x) && std::isfinite(y))
            fault("(34, 'Numerical result out of range')");
          return Value::number(r);
        }
        default:
          return unsupported();
      }
    }
    int64_t x = a.to_int(), y = b.to_int();
    switch (op) {
      case BinOp::kAdd:
        return Value::integer(add_checked(x, y));
      case BinOp::kSub:
        return Value::integer(sub_checked(x, y));
      case BinOp::kMul:
        return Value::integer(mul_checked(x, y));
      case BinOp::kFloorDiv:
        return Value::integer(py_floordiv(x, y));
      case BinOp::kMod:
        return Value::integer(py_mod(x, y));
      case BinOp::kPow: {
        if (y < 0) {
          if (x == 0) fault("0.0 cannot be raised to a negative power");
          return Value::number(std::pow(double(x), double(y)));
        }
        int64_t acc = 1, base = x;
        for (int64_t e = y; e > 0; e >>= 1) {
          if (e & 1) acc = mul_checked(acc, base);
          if (e > 1) base = mul_checked(base, base);
        }
        return Value::integer(acc);
      }
      default:
        return unsupported();
    }
  }
  if (op == BinOp::kAdd) {
    if (a.is_string() && b.is_string()) {
      ip.check_len(a.str().size() + b.str().size());
      ip.charge_bytes(a.str().size() + b.str().size());
      return Value::string(a.str() + b.str());
    }
    if (a.is_list() && b.is_list() && a.list().plain() && a.list().kind == b.list().kind) {
      ip.check_items(a.list().items.size() + b.list().items.size());
      ip.charge(int64_t(a.list().items.size() + b.list().items.size()));
      std::vector<Value> r = a.list().items;
      r.insert(r.end(), b.list().items.begin(), b.list().items.end());
      return Value::list(std::move(r), a.list().tuple());
    }
  }
  if (op == BinOp::kMul) {
    auto seq = [](const Value& x) { return x.is_string() || (x.is_list() && x.list().plain()); };
    if (seq(a) && b.is_integral()) return repeat(ip, a, b.to_int());
    if (seq(b) && a.is_integral()) return repeat(ip, b, a.to_int());
  }
  if (op == BinOp::kMod && a.is_string())
    fault("printf-style '%' string formatting is not supported; use format()",
          ErrorKind::kUnsupported);
  return unsupported();
}

// ------------------------------------------------------------------------------------------------
// Argument binding for builtins

class Params {
 public:
  Params(const char* fname, CallArgs& a, std::initializer_list<const char*> names,
         size_t required = 0)
      : names_(names), slots_(names.size(), nullptr) {
    if (a.pos.size() > names_.size())
      fault(fmt::format("{}() takes at most {} argument(s) ({} given)", fname, names_.size(),
                        a.pos.size()));
    for (size_t i = 0; i < a.pos.size(); ++i) slots_[i] = &a.pos[i];
    for (auto& [k, v] : a.kw) {
      size_t i = 0;
      while (i < names_.size() && k != names_[i]) ++i;
      if (i == names_.size())
        fault(fmt::format("{}() got an unexpected keyword argument '{}'", fname, k));
      if (slots_[i]) fault(fmt::format("{}() got multiple values for argument '{}'", fname, k));
      slots_[i] = &v;
    }
    for (size_t i = 0; i < required; ++i)
      if (!slots_[i]) fault(fmt::format("{}() missing required argument '{}'", fname, names_[i]));
  }
  bool has(size_t i) const { return slots_[i] != nullptr; }
  // An explicit None counts as "not given", as for Python defaults of None.
  bool given(size_t i) const { return has(i) && !slots_[i]->is_none(); }
  const Value& get(size_t i) const { return *slots_[i]; }
  Value get_or(size_t i, Value def) const { return has(i) ? *slots_[i] : std::move(def); }

 private:
  std::vector<const char*> names_;
  std::vector<const Value*> slots_;
};

const std::string& want_str(const Value& v, const char* what) {
  if (!v.is_string()) fault(fmt::format("{} must be a string, not '{}'", what, type_name(v)));
  return v.str();
}

int64_t want_int(const Value& v, const char* what) {
  if (!v.is_integral()) fault(fmt::format("{} must be an integer, not '{}'", what, type_name(v)));
  return v.to_int();
}

// ------------------------------------------------------------------------------------------------
// Sequences

std::vector<Value> Interp::iterate(const Value& v) {
  switch (v.v.index()) {
    case 0:
      return {};
    case 5: {
      const std::string& s = v.str();
      charge_bytes(s.size());
      std::vector<Value> r;
      for (size_t i = 0; i < s.size();) {
        size_t n = decode_at(s, i).len;
        r.push_back(Value::string(s.substr(i, n)));
        i += n;
      }
      return r;
    }
    case 6:
      charge(int64_t(v.list().items.size()));
      return v.list().items;
    case 7: {
      charge(int64_t(v.dict().items.size()));
      std::vector<Value> r;
      for (auto& [k, val] : v.dict().items) r.push_back(Value::string(k));
      return r;
    }
    default:
      fault(fmt::format("'{}' object is not iterable", type_name(v)));
  }
}

size_t Interp::length(const Value& v) {
  switch (v.v.index()) {
    case 0:
      return 0;
    case 5:
      return cp_count(v.str());
    case 6:
      if (v.list().kind == Seq::kIterator) break;
      return v.list().items.size();
    case 7:
      return v.dict().items.size();
    default:
      break;
  }
  fault(fmt::format("object of type '{}' has no len()", type_name(v)));
}

// slice.indices(): clamp start/stop for a sequence of length n, Python rules.
void slice_indices(int64_t n, const Value& vstart, const Value& vstop, const Value& vstep,
                   int64_t& start, int64_t& stop, int64_t& step) {
  step = vstep.is_none() ? 1 : want_int(vstep, "slice step");
  if (step == 0) fault("slice step cannot be zero");
  auto adjust = [&](const Value& v, int64_t def, int64_t lo, int64_t hi) {
    if (v.is_none()) return def;
    int64_t i = want_int(v, "slice index");
    if (i < 0) {
      i += n;
      if (i < lo) i = lo;
    } else if (i > hi) {
      i = hi;
    }
    return i;
  };
  if (step > 0) {
    start = adjust(vstart, 0, 0, n);
    stop = adjust(vstop, n, 0, n);
  } else {
    start = adjust(vstart, n - 1, -1, n - 1);
    stop = adjust(vstop, -1, -1, n - 1);
  }
}

Value slice_value(Interp& ip, const Value& obj, const Value& a, const Value& b, const Value& c) {
  if (obj.is_undefined()) undefined_error(obj);
  if (!obj.is_string() && !(obj.is_list() && obj.list().plain()))
    return Value::undefined(fmt::format("'{}' object is not subscriptable", type_name(obj)));
  int64_t start, stop, step;
  if (obj.is_string()) {
    CpIndex idx(obj.str());
    slice_indices(int64_t(idx.size()), a, b, c, start, stop, step);
    std::string r;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) r += idx.at(size_t(i));
    ip.charge_bytes(r.size());
    return Value::string(std::move(r));
  }
  const auto& items = obj.list().items;
  slice_indices(int64_t(items.size()), a, b, c, start, stop, step);
  std::vector<Value> r;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) r.push_back(items[size_t(i)]);
  ip.charge(int64_t(r.size()));
  return Value::list(std::move(r), obj.list().tuple());
}

// ------------------------------------------------------------------------------------------------
// Methods of str, dict and list that templates call (`s.startswith(...)`, `d.items()`).

Value str_method(Interp& ip, const std::string& s, const std::string& m, CallArgs& a);

bool is_str_method(const std::string& m) {
  static const char* names[] = {
      "startswith", "endswith", "split",   "rsplit",  "splitlines",   "strip",       "lstrip",
      "rstrip",     "replace",  "upper",   "lower",   "title",        "capitalize",  "find",
      "rfind",      "index",    "count",   "join",    "format",       "isdigit",     "isalpha",
      "isalnum",    "isspace",  "isupper", "islower", "removeprefix", "removesuffix"};
  for (const char* n : names)
    if (m == n) return true;
  return false;
}

Value bound(const Value& self, const std::string& m,
            Value (*impl)(Interp&, const Value&, const std::string&, CallArgs&)) {
  return make_fn(m, [self, m, impl](Interp& ip, CallArgs& a) { return impl(ip, self, m, a); });
}

Value dict_method(Interp& ip, const Value& self, const std::string& m, CallArgs& a) {
  const DictData& d = self.dict();
  if (m == "items") {
    Params p("items", a, {});
    std::vector<Value> r;
    for (auto& [k, v] : d.items) r.push_back(Value::list({Value::string(k), v}, true));
    ip.charge(int64_t(r.size()));
    return dict_view(std::move(r), "dict_items");
  }
  if (m == "keys" || m == "values") {
    Params p(m.c_str(), a, {});
    std::vector<Value> r;
    for (auto& [k, v] : d.items) r.push_back(m == "keys" ? Value::string(k) : v);
    ip.charge(int64_t(r.size()));
    return dict_view(std::move(r), m == "keys" ? "dict_keys" : "dict_values");
  }
  if (m == "get") {
    Params p("get", a, {"key", "default"}, 1);
    const Value* v = p.get(0).is_string() ? d.find(p.get(0).str()) : nullptr;
    return v ? *v : p.get_or(1, Value::none());
  }
  fault(fmt::format("dict.{}() is not allowed: the chat-template sandbox is immutable", m));
}

Value list_method(Interp& ip, const Value& self, const std::string& m, CallArgs& a) {
  const auto& items = self.list().items;
  if (m == "index" || m == "count") {
    Params p(m.c_str(), a, {"value"}, 1);
    ip.charge(int64_t(items.size()));
    int64_t n = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!equal(ip, items[i], p.get(0))) continue;
      if (m == "index") return Value::integer(int64_t(i));
      ++n;
    }
    if (m == "index") fault("list.index(x): x not in list");
    return Value::integer(n);
  }
  fault(fmt::format("list.{}() is not allowed: the chat-template sandbox is immutable", m));
}

Value str_method_thunk(Interp& ip, const Value& self, const std::string& m, CallArgs& a) {
  return str_method(ip, self.str(), m, a);
}

Value Interp::get_attr(const Value& obj, const std::string& attr) {
  auto missing = [&]() {
    return Value::undefined(fmt::format("'{} object' has no attribute '{}'", type_name(obj), attr));
  };
  switch (obj.v.index()) {
    case 0:
      undefined_error(obj);
    case 5:
      return is_str_method(attr) ? bound(obj, attr, str_method_thunk) : missing();
    case 6: {
      static const char* methods[] = {"index",  "count",   "append", "extend", "insert", "pop",
                                      "remove", "reverse", "sort",   "clear",  "copy"};
      for (const char* n : methods)
        if (attr == n) return bound(obj, attr, list_method);
      return missing();
    }
    case 7: {
      // Jinja tries getattr() before [] for `d.name`, so methods win over keys of the same name.
      static const char* methods[] = {"items", "keys",    "values",     "get",   "update",
                                      "pop",   "popitem", "setdefault", "clear", "copy"};
      for (const char* n : methods)
        if (attr == n) return bound(obj, attr, dict_method);
      const Value* v = obj.dict().find(attr);
      return v ? *v : missing();
    }
    case 8: {
      const Value* v = obj.ns().find(attr);
      return v ? *v : missing();
    }
    default:
      return missing();
  }
}

Value Interp::get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) undefined_error(obj);
  auto missing = [&]() {
    std::string k;
    write_repr(key, k);
    return Value::undefined(fmt::format("'{} object' has no element {}", type_name(obj), k));
  };
  if (((obj.is_list() && obj.list().plain()) || obj.is_string()) && key.is_integral()) {
    int64_t i = key.to_int();
    if (obj.is_list()) {
      int64_t n = int64_t(obj.list().items.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return missing();
      return obj.list().items[size_t(i)];
    }
    CpIndex idx(obj.str());
    int64_t n = int64_t(idx.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) return missing();
    return Value::string(std::string(idx.at(size_t(i))));
  }
  if (obj.is_dict() && key.is_string()) {
    if (const Value* v = obj.dict().find(key.str())) return *v;
  }
  // Environment.getitem falls back to getattr() for string keys.
  if (key.is_string()) {
    Value v = get_attr(obj, key.str());
    return v.is_undefined() ? missing() : v;
  }
  return missing();
}

// ------------------------------------------------------------------------------------------------
// Calls and macros

Value Interp::call(const Value& callee, CallArgs& args) {
  if (callee.is_undefined()) undefined_error(callee);
  if (!callee.is_fn()) fault(fmt::format("'{}' object is not callable", type_name(callee)));
  charge(1);
  FnPtr keep = std::get<FnPtr>(callee.v);  // the callee may be a temporary bound method
  return keep->call(*this, args);
}

Value Interp::lookup(std::string_view n) const {
  for (size_t i = scopes.size(); i-- > base;)
    if (const Value* v = scopes[i].find(n)) return *v;
  if (base > 1)
    if (const Value* v = scopes[1].find(n)) return *v;
  if (const Value* v = scopes[0].find(n)) return *v;
  return Value::undefined(fmt::format("'{}' is undefined", n));
}

// ------------------------------------------------------------------------------------------------
// Expressions

struct Literal : Expr {
  Value value;
  Value eval(Interp&) const override { return value; }
};

struct NameExpr : Expr {
  std::string name;
  Value eval(Interp& ip) const override;
};

struct ListExpr : Expr {
  std::vector<ExprPtr> items;
  bool tuple = false;
  Value eval(Interp& ip) const override {
    std::vector<Value> r;
    r.reserve(items.size());
    for (auto& e : items) r.push_back(ip.eval(*e));
    return Value::list(std::move(r), tuple);
  }
};

struct DictExpr : Expr {
  std::vector<std::pair<ExprPtr, ExprPtr>> items;
  Value eval(Interp& ip) const override {
    DictData d;
    for (auto& [k, v] : items) {
      Value key = ip.eval(*k);
      if (!key.is_string())
        fault(fmt::format("dict keys must be strings here, not '{}'", type_name(key)),
              ErrorKind::kUnsupported);
      d.set(key.str(), ip.eval(*v));
    }
    return Value::dict(std::move(d));
  }
};

struct GetAttr : Expr {
  ExprPtr obj;
  std::string attr;
  Value eval(Interp& ip) const override {
    Value o = ip.eval(*obj);
    return ip.get_attr(o, attr);
  }
};

struct GetItem : Expr {
  ExprPtr obj, key;
  Value eval(Interp& ip) const override {
    Value o = ip.eval(*obj);
    Value k = ip.eval(*key);
    return ip.get_item(o, k);
  }
};

struct SliceExpr : Expr {
  ExprPtr obj, start, stop, step;  // any of start/stop/step may be null
  Value eval(Interp& ip) const override {
    Value o = ip.eval(*obj);
    Value a = start ? ip.eval(*start) : Value::none();
    Value b = stop ? ip.eval(*stop) : Value::none();
    Value c = step ? ip.eval(*step) : Value::none();
    return slice_value(ip, o, a, b, c);
  }
};

struct ArgExprs {
  std::vector<ExprPtr> pos;
  std::vector<std::pair<std::string, ExprPtr>> kw;
  ExprPtr star, starstar;  // f(*args, **kwargs)
  CallArgs eval(Interp& ip) const {
    CallArgs a;
    for (auto& e : pos) a.pos.push_back(ip.eval(*e));
    for (auto& [k, e] : kw) a.kw.emplace_back(k, ip.eval(*e));
    if (star)
      for (auto& v : ip.iterate(ip.eval(*star))) a.pos.push_back(std::move(v));
    if (starstar) {
      Value d = ip.eval(*starstar);
      if (!d.is_dict())
        fault(fmt::format("argument after ** must be a mapping, not {}", type_name(d)));
      for (auto& [k, v] : d.dict().items) a.kw.emplace_back(k, v);
    }
    return a;
  }
};

struct CallExpr : Expr {
  ExprPtr callee;
  ArgExprs args;
  Value eval(Interp& ip) const override {
    Value f = ip.eval(*callee);
    CallArgs a = args.eval(ip);
    return ip.call(f, a);
  }
};

struct FilterExpr : Expr {
  ExprPtr value;
  std::string name;
  ArgExprs args;
  Value eval(Interp& ip) const override {
    Value v = ip.eval(*value);
    CallArgs a = args.eval(ip);
    return ip.apply_filter(name, v, a);
  }
};

struct TestExpr : Expr {
  ExprPtr value;
  std::string name;
  ArgExprs args;
  Value eval(Interp& ip) const override {
    Value v = ip.eval(*value);
    CallArgs a = args.eval(ip);
    return Value::boolean(ip.apply_test(name, v, a));
  }
};

enum class UnOp { kNeg, kPos, kNot };

struct UnaryExpr : Expr {
  UnOp op;
  ExprPtr operand;
  Value eval(Interp& ip) const override {
    Value v = ip.eval(*operand);
    if (op == UnOp::kNot) return Value::boolean(!truthy(v));
    if (v.is_undefined()) undefined_error(v);
    if (v.is_float()) return Value::number(op == UnOp::kNeg ? -v.to_double() : v.to_double());
    if (v.is_integral()) {
      int64_t i = v.to_int();
      if (op == UnOp::kNeg && i == INT64_MIN) fault("integer overflow");
      return Value::integer(op == UnOp::kNeg ? -i : i);
    }
    fault(fmt::format("bad operand type for unary {}: '{}'", op == UnOp::kNeg ? '-' : '+',
                      type_name(v)));
  }
};

struct BinaryExpr : Expr {
  BinOp op;
  ExprPtr lhs, rhs;
  Value eval(Interp& ip) const override {
    Value a = ip.eval(*lhs);
    // and/or return an operand, as in Python.
    if (op == BinOp::kAnd) return truthy(a) ? ip.eval(*rhs) : a;
    if (op == BinOp::kOr) return truthy(a) ? a : ip.eval(*rhs);
    Value b = ip.eval(*rhs);
    if (op == BinOp::kConcat) {
      std::string s = ip.to_str(a);
      std::string t = ip.to_str(b);
      ip.check_len(s.size() + t.size());
      ip.charge_bytes(s.size() + t.size());
      return Value::string(s + t);
    }
    return arith(ip, op, a, b);
  }
};

enum class CmpOp { kEq, kNe, kLt, kLe, kGt, kGe, kIn, kNotIn };

struct CompareExpr : Expr {
  ExprPtr first;
  std::vector<std::pair<CmpOp, ExprPtr>> rest;  // a < b < c is (a < b) and (b < c)
  Value eval(Interp& ip) const override {
    Value left = ip.eval(*first);
    for (auto& [op, e] : rest) {
      Value right = ip.eval(*e);
      bool r = false;
      switch (op) {
        case CmpOp::kEq:
          r = equal(ip, left, right);
          break;
        case CmpOp::kNe:
          r = !equal(ip, left, right);
          break;
        case CmpOp::kLt:
          r = compare(ip, left, right, "<") < 0;
          break;
        case CmpOp::kLe:
          r = compare(ip, left, right, "<=") <= 0;
          break;
        case CmpOp::kGt:
          r = compare(ip, left, right, ">") > 0;
          break;
        case CmpOp::kGe:
          r = compare(ip, left, right, ">=") >= 0;
          break;
        case CmpOp::kIn:
          r = contains(ip, right, left);
          break;
        case CmpOp::kNotIn:
          r = !contains(ip, right, left);
          break;
      }
      if (!r) return Value::boolean(false);
      left = std::move(right);
    }
    return Value::boolean(true);
  }
};

struct CondExpr : Expr {
  ExprPtr cond, then, otherwise;  // otherwise may be null
  Value eval(Interp& ip) const override {
    if (truthy(ip.eval(*cond))) return ip.eval(*then);
    if (otherwise) return ip.eval(*otherwise);
    return Value::undefined(
        "the inline if-expression evaluated to false and no else section was defined");
  }
};

// ------------------------------------------------------------------------------------------------
// Statements

struct TextStmt : Stmt {
  std::string text;
  Flow exec(Interp& ip) const override {
    ip.charge_bytes(text.size());
    *ip.out += text;
    ip.check_len(ip.out->size());
    return Flow::kNormal;
  }
};

struct OutputStmt : Stmt {
  ExprPtr expr;
  Flow exec(Interp& ip) const override {
    Value v = ip.eval(*expr);
    size_t before = ip.out->size();
    ip.write_str(v, *ip.out);
    ip.charge_bytes(ip.out->size() - before);
    ip.check_len(ip.out->size());
    return Flow::kNormal;
  }
};

struct IfStmt : Stmt {
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body otherwise;
  Flow exec(Interp& ip) const override {
    for (auto& [cond, body] : branches)
      if (truthy(ip.eval(*cond))) return ip.exec(body);
    return ip.exec(otherwise);
  }
};

void bind_targets(Interp& ip, const std::vector<std::string>& targets, const Value& v) {
  if (targets.size() == 1) {
    ip.assign(targets[0], v);
    return;
  }
  std::vector<Value> parts = ip.iterate(v);
  if (parts.size() != targets.size())
    fault(parts.size() > targets.size()
              ? fmt::format("too many values to unpack (expected {})", targets.size())
              : fmt::format("not enough values to unpack (expected {}, got {})", targets.size(),
                            parts.size()));
  for (size_t i = 0; i < targets.size(); ++i) ip.assign(targets[i], parts[i]);
}

struct ForStmt : Stmt {
  std::vector<std::string> targets;
  ExprPtr iter, filter;
  Body body, otherwise;

  Flow exec(Interp& ip) const override {
    std::vector<Value> items = ip.iterate(ip.eval(*iter));
    if (filter) {
      std::vector<Value> kept;
      for (auto& it : items) {
        ip.scopes.emplace_back();
        bind_targets(ip, targets, it);
        bool keep = truthy(ip.eval(*filter));
        ip.scopes.pop_back();
        if (keep) kept.push_back(std::move(it));
      }
      items = std::move(kept);
    }
    if (items.empty()) return ip.exec(otherwise);
    const int64_t n = int64_t(items.size());
    for (int64_t i = 0; i < n; ++i) {
      ip.charge(1);
      // A fresh frame per iteration: Jinja re-initialises loop-body variables each time round.
      ip.scopes.emplace_back();
      bind_targets(ip, targets, items[size_t(i)]);
      DictData loop;
      loop.items.reserve(12);
      loop.items.emplace_back("index", Value::integer(i + 1));
      loop.items.emplace_back("index0", Value::integer(i));
      loop.items.emplace_back("revindex", Value::integer(n - i));
      loop.items.emplace_back("revindex0", Value::integer(n - i - 1));
      loop.items.emplace_back("first", Value::boolean(i == 0));
      loop.items.emplace_back("last", Value::boolean(i == n - 1));
      loop.items.emplace_back("length", Value::integer(n));
      loop.items.emplace_back("depth", Value::integer(1));
      loop.items.emplace_back("depth0", Value::integer(0));
      if (i > 0) loop.items.emplace_back("previtem", items[size_t(i - 1)]);
      if (i + 1 < n) loop.items.emplace_back("nextitem", items[size_t(i + 1)]);
      loop.items.emplace_back("cycle", make_fn("cycle", [i](Interp&, CallArgs& a) {
                                if (a.pos.empty()) fault("no items for cycling given");
                                return a.pos[size_t(i) % a.pos.size()];
                              }));
      ip.assign("loop", Value::dict(std::move(loop)));
      Flow f = ip.exec(body);
      ip.scopes.pop_back();
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }
};

struct SetTarget {
  std::string name;
  std::string attr;  // non-empty: `set ns.attr = ...`
};

void assign_target(Interp& ip, const SetTarget& t, Value v) {
  if (t.attr.empty()) {
    ip.assign(t.name, std::move(v));
    return;
  }
  Value ns = ip.lookup(t.name);
  if (!ns.is_ns())
    fault(fmt::format("cannot assign attribute on non-namespace object '{}' ({})", t.name,
                      type_name(ns)));
  ns.ns().set(t.attr, std::move(v));
}

struct SetStmt : Stmt {
  std::vector<SetTarget> targets;  // more than one: unpack
  ExprPtr value;
  Flow exec(Interp& ip) const override {
    Value v = ip.eval(*value);
    if (targets.size() == 1) {
      assign_target(ip, targets[0], std::move(v));
      return Flow::kNormal;
    }
    std::vector<Value> parts = ip.iterate(v);
    if (parts.size() != targets.size())
      fault(parts.size() > targets.size()
                ? fmt::format("too many values to unpack (expected {})", targets.size())
                : fmt::format("not enough values to unpack (expected {}, got {})", targets.size(),
                              parts.size()));
    for (size_t i = 0; i < targets.size(); ++i) assign_target(ip, targets[i], parts[i]);
    return Flow::kNormal;
  }
};

struct FilterCall {
  Node pos;
  std::string name;
  ArgExprs args;
};

Value apply_filter_chain(Interp& ip, const std::vector<FilterCall>& chain, Value v) {
  for (auto& f : chain) {
    CallArgs a = f.args.eval(ip);
    try {
      v = ip.apply_filter(f.name, v, a);
    } catch (const Fault& e) {
      ip.fail_at(f.pos, e.kind, e.msg);
    }
  }
  return v;
}

std::string capture(Interp& ip, const Body& body) {
  std::string buf;
  std::string* saved = ip.out;
  ip.out = &buf;
  ip.exec(body);
  ip.out = saved;
  return buf;
}

struct SetBlockStmt : Stmt {
  std::string target;
  std::vector<FilterCall> filters;
  Body body;
  Flow exec(Interp& ip) const override {
    Value v = apply_filter_chain(ip, filters, Value::string(capture(ip, body)));
    ip.assign(target, std::move(v));
    return Flow::kNormal;
  }
};

struct FilterBlockStmt : Stmt {
  std::vector<FilterCall> filters;
  Body body;
  Flow exec(Interp& ip) const override {
    Value v = apply_filter_chain(ip, filters, Value::string(capture(ip, body)));
    ip.write_str(v, *ip.out);
    ip.check_len(ip.out->size());
    return Flow::kNormal;
  }
};

struct MacroStmt : Stmt {
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // aligned with params; null = required
  Body body;
  Flow exec(Interp& ip) const override {
    const MacroStmt* self = this;
    ip.assign(name,
              make_fn(name, [self](Interp& in, CallArgs& a) { return in.call_macro(*self, a); }));
    return Flow::kNormal;
  }
};

Value Interp::call_macro(const MacroStmt& m, CallArgs& args) {
  if (args.pos.size() > m.params.size())
    fault(fmt::format("macro '{}' takes not more than {} argument(s)", m.name, m.params.size()));
  Scope frame;
  std::vector<bool> bound_(m.params.size(), false);
  for (size_t i = 0; i < args.pos.size(); ++i) {
    frame.set(m.params[i], args.pos[i]);
    bound_[i] = true;
  }
  for (auto& [k, v] : args.kw) {
    size_t i = std::find(m.params.begin(), m.params.end(), k) - m.params.begin();
    if (i == m.params.size()) fault(fmt::format("macro '{}' has no argument '{}'", m.name, k));
    if (bound_[i])
      fault(fmt::format("macro '{}' got multiple values for argument '{}'", m.name, k));
    frame.set(k, v);
    bound_[i] = true;
  }
  size_t saved_base = base;
  scopes.push_back(std::move(frame));
  base = scopes.size() - 1;
  for (size_t i = 0; i < m.params.size(); ++i) {
    if (bound_[i]) continue;
    Value v = m.defaults[i] ? eval(*m.defaults[i])
                            : Value::undefined(fmt::format("'{}' is undefined", m.params[i]));
    scopes.back().set(m.params[i], std::move(v));
  }
  std::string result = capture(*this, m.body);
  scopes.pop_back();
  base = saved_base;
  return Value::string(std::move(result));
}

struct LoopControlStmt : Stmt {
  Flow flow;
  Flow exec(Interp&) const override { return flow; }
};

struct PassThroughStmt : Stmt {  // {% generation %}: HF's assistant-mask marker, renders its body
  Body body;
  Flow exec(Interp& ip) const override { return ip.exec(body); }
};

// ------------------------------------------------------------------------------------------------
// Globals: range, namespace, dict, raise_exception, strftime_now

Value global_range(Interp& ip, CallArgs& a) {
  Params p("range", a, {"start", "stop", "step"}, 1);
  int64_t start = 0, stop, step = 1;
  if (p.has(1)) {
    start = want_int(p.get(0), "range() argument");
    stop = want_int(p.get(1), "range() argument");
    if (p.has(2)) step = want_int(p.get(2), "range() argument");
  } else {
    stop = want_int(p.get(0), "range() argument");
  }
  if (step == 0) fault("range() arg 3 must not be zero");
  __int128 n = 0;
  if (step > 0 && stop > start) n = ((__int128)stop - start + step - 1) / step;
  if (step < 0 && stop < start) n = ((__int128)start - stop - step - 1) / -step;
  if (n > (__int128)ip.opt.max_list_items)
    fault(fmt::format("range() of {} items exceeds the {} item limit", (long long)n,
                      ip.opt.max_list_items));
  ip.charge(int64_t(n));
  std::vector<Value> r;
  r.reserve(size_t(n));
  for (int64_t i = 0; i < int64_t(n); ++i)
    r.push_back(Value::integer(int64_t((__int128)start + (__int128)i * step)));
  return Value::list(std::move(r));
}

DictData kwargs_dict(Interp& ip, CallArgs& a, const char* fname) {
  DictData d;
  if (a.pos.size() > 1) fault(fmt::format("{}() takes at most 1 positional argument", fname));
  if (a.pos.size() == 1) {
    const Value& src = a.pos[0];
    if (src.is_undefined()) undefined_error(src);
    if (src.is_dict()) {
      d = src.dict();
    } else if (src.is_ns()) {
      d = src.ns();
    } else {
      for (auto& pair : ip.iterate(src)) {
        std::vector<Value> kv = ip.iterate(pair);
        if (kv.size() != 2 || !kv[0].is_string())
          fault(fmt::format("{}(): expected (str, value) pairs", fname));
        d.set(kv[0].str(), kv[1]);
      }
    }
  }
  for (auto& [k, v] : a.kw) d.set(k, v);
  return d;
}

Value global_namespace(Interp& ip, CallArgs& a) {
  return Value{NsRef{std::make_shared<DictData>(kwargs_dict(ip, a, "namespace"))}};
}

Value global_dict(Interp& ip, CallArgs& a) {
  return Value::dict(kwargs_dict(ip, a, "dict"));
}

Value global_raise(Interp& ip, CallArgs& a) {
  Params p("raise_exception", a, {"message"}, 1);
  fault("template raised: " + ip.to_str(p.get(0)));
}

Value global_strftime_now(Interp&, CallArgs& a) {
  Params p("strftime_now", a, {"format"}, 1);
  const std::string& f = want_str(p.get(0), "strftime_now() format");
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[512];
  size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
  return Value::string(std::string(buf, n));
}

const Scope& globals() {
  static const Scope g = [] {
    Scope s;
    s.set("range", make_fn("range", global_range));
    s.set("namespace", make_fn("namespace", global_namespace));
    s.set("dict", make_fn("dict", global_dict));
    s.set("raise_exception", make_fn("raise_exception", global_raise));
    s.set("strftime_now", make_fn("strftime_now", global_strftime_now));
    return s;
  }();
  return g;
}

Value NameExpr::eval(Interp& ip) const {
  Value v = ip.lookup(name);
  if (v.is_undefined())
    if (const Value* g = globals().find(name)) return *g;
  return v;
}

// ------------------------------------------------------------------------------------------------
// String methods

std::vector<uint32_t> strip_chars(const Params& p, size_t i) {
  return code_points(want_str(p.get(i), "strip characters"));
}

// str.split / str.rsplit
Value py_split(Interp& ip, const std::string& s, const Value* sep, int64_t maxsplit, bool right) {
  ip.charge_bytes(s.size());
  std::vector<std::string> parts;
  if (!sep || sep->is_none()) {
    // Runs of whitespace separate; leading/trailing whitespace never yields empty strings.
    std::vector<std::pair<size_t, size_t>> words;  // byte ranges
    for (size_t i = 0; i < s.size();) {
      Decoded d = decode_at(s, i);
      if (is_py_space(d.cp)) {
        i += d.len;
        continue;
      }
      size_t b = i;
      while (i < s.size()) {
        Decoded e = decode_at(s, i);
        if (is_py_space(e.cp)) break;
        i += e.len;
      }
      words.emplace_back(b, i);
    }
    if (maxsplit < 0 || size_t(maxsplit) >= words.size()) {
      for (auto [b, e] : words) parts.push_back(s.substr(b, e - b));
    } else if (!right) {
      for (size_t k = 0; k < size_t(maxsplit); ++k)
        parts.push_back(s.substr(words[k].first, words[k].second - words[k].first));
      // The remainder keeps its trailing whitespace: '  a b c '.split(None, 1) == ['a', 'b c '].
      parts.push_back(s.substr(words[size_t(maxsplit)].first));
    } else {
      size_t keep = words.size() - size_t(maxsplit);
      parts.push_back(s.substr(0, words[keep - 1].second));  // keeps leading whitespace
      for (size_t k = keep; k < words.size(); ++k)
        parts.push_back(s.substr(words[k].first, words[k].second - words[k].first));
    }
  } else {
    const std::string& sp = want_str(*sep, "split() separator");
    if (sp.empty()) fault("empty separator");
    if (!right) {
      size_t b = 0;
      int64_t n = 0;
      while (maxsplit < 0 || n < maxsplit) {
        size_t at = s.find(sp, b);
        if (at == std::string::npos) break;
        parts.push_back(s.substr(b, at - b));
        b = at + sp.size();
        ++n;
      }
      parts.push_back(s.substr(b));
    } else {
      size_t e = s.size();
      int64_t n = 0;
      std::vector<std::string> rev;
      while (maxsplit < 0 || n < maxsplit) {
        if (e < sp.size()) break;
        size_t at = s.rfind(sp, e - sp.size());
        if (at == std::string::npos) break;
        rev.push_back(s.substr(at + sp.size(), e - at - sp.size()));
        e = at;
        ++n;
      }
      rev.push_back(s.substr(0, e));
      parts.assign(rev.rbegin(), rev.rend());
    }
  }
  ip.check_items(parts.size());
  std::vector<Value> r;
  for (auto& p : parts) r.push_back(Value::string(std::move(p)));
  return Value::list(std::move(r));
}

std::vector<std::string> py_splitlines(const std::string& s, bool keepends) {
  std::vector<std::string> lines;
  size_t b = 0;
  for (size_t i = 0; i < s.size();) {
    Decoded d = decode_at(s, i);
    uint32_t c = d.cp;
    bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
               c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) {
      i += d.len;
      continue;
    }
    size_t end = i + d.len;
    if (c == '\r' && end < s.size() && s[end] == '\n') ++end;
    lines.push_back(s.substr(b, (keepends ? end : i) - b));
    b = i = end;
  }
  if (b < s.size()) lines.push_back(s.substr(b));
  return lines;
}

std::string py_replace(Interp& ip, const std::string& s, const std::string& old,
                       const std::string& rep, int64_t count) {
  std::string r;
  if (old.empty()) {
    // Python inserts `rep` before every code point and at the end.
    CpIndex idx(s);
    size_t n = idx.size() + 1;
    if (count >= 0 && size_t(count) < n) n = size_t(count);
    ip.check_len(s.size() + n * rep.size());
    size_t k = 0;
    for (size_t i = 0; i < idx.size(); ++i) {
      if (k < n) r += rep, ++k;
      r += idx.at(i);
    }
    if (k < n) r += rep;
  } else {
    size_t b = 0;
    int64_t n = 0;
    while (count < 0 || n < count) {
      size_t at = s.find(old, b);
      if (at == std::string::npos) break;
      r.append(s, b, at - b);
      r += rep;
      b = at + old.size();
      ++n;
      ip.check_len(r.size());
    }
    r.append(s, b);
  }
  ip.check_len(r.size());
  ip.charge_bytes(r.size());
  return r;
}

std::string py_title(std::string_view s) {
  std::string r(s);
  bool prev_cased = false;
  for (char& c : r) {
    if (is_alpha(c)) {
      c = prev_cased ? char(std::tolower(static_cast<unsigned char>(c)))
                     : char(std::toupper(static_cast<unsigned char>(c)));
      prev_cased = true;
    } else {
      prev_cased = false;
    }
  }
  return r;
}

std::string py_capitalize(std::string_view s) {
  std::string r = ascii_lower(s);
  if (!r.empty() && r[0] >= 'a' && r[0] <= 'z') r[0] = char(r[0] - 'a' + 'A');
  return r;
}

// str.format with {}, {0}, {name}, {{ and }}, and !s / !r conversions; no format specs.
std::string py_format(Interp& ip, const std::string& f, CallArgs& a) {
  std::string r;
  size_t auto_idx = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    char c = f[i];
    if (c == '}') {
      if (i + 1 < f.size() && f[i + 1] == '}') {
        r += '}', ++i;
        continue;
      }
      fault("Single '}' encountered in format string");
    }
    if (c != '{') {
      r += c;
      continue;
    }
    if (i + 1 < f.size() && f[i + 1] == '{') {
      r += '{', ++i;
      continue;
    }
    size_t e = f.find('}', i);
    if (e == std::string::npos) fault("Single '{' encountered in format string");
    std::string field = f.substr(i + 1, e - i - 1);
    char conv = 's';
    if (size_t bang = field.find('!'); bang != std::string::npos) {
      if (bang + 2 != field.size() || (field[bang + 1] != 's' && field[bang + 1] != 'r'))
        fault("unsupported conversion in format string", ErrorKind::kUnsupported);
      conv = field[bang + 1];
      field.resize(bang);
    }
    if (field.find_first_of(":.[") != std::string::npos)
      fault("format specs and field attributes are not supported in format()",
            ErrorKind::kUnsupported);
    const Value* v = nullptr;
    if (field.empty() || std::all_of(field.begin(), field.end(), is_digit)) {
      size_t k = field.empty() ? auto_idx++ : size_t(std::stoul(field.substr(0, 9)));
      if (k >= a.pos.size()) fault("Replacement index out of range for positional args tuple");
      v = &a.pos[k];
    } else {
      for (auto& [name, val] : a.kw)
        if (name == field) v = &val;
      if (!v) fault(fmt::format("format(): no argument named '{}'", field));
    }
    if (conv == 'r') {
      ip.write_repr(*v, r);
    } else {
      ip.write_str(*v, r);
    }
    ip.check_len(r.size());
    i = e;
  }
  ip.charge_bytes(r.size());
  return r;
}

int64_t cp_index_of_byte(const std::string& s, size_t byte) {
  return int64_t(cp_count(std::string_view(s).substr(0, byte)));
}

Value str_method(Interp& ip, const std::string& s, const std::string& m, CallArgs& a) {
  if (m == "startswith" || m == "endswith") {
    Params p(m.c_str(), a, {"prefix"}, 1);
    std::vector<Value> options;
    if (p.get(0).is_list())
      options = p.get(0).list().items;
    else
      options.push_back(p.get(0));
    for (auto& o : options) {
      const std::string& x = want_str(o, "prefix/suffix");
      bool hit = m == "startswith"
                     ? s.compare(0, x.size(), x) == 0
                     : (s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0);
      if (hit) return Value::boolean(true);
    }
    return Value::boolean(false);
  }
  if (m == "split" || m == "rsplit") {
    Params p(m.c_str(), a, {"sep", "maxsplit"});
    int64_t maxsplit = p.has(1) ? want_int(p.get(1), "maxsplit") : -1;
    return py_split(ip, s, p.has(0) ? &p.get(0) : nullptr, maxsplit, m == "rsplit");
  }
  if (m == "splitlines") {
    Params p("splitlines", a, {"keepends"});
    std::vector<Value> r;
    for (auto& l : py_splitlines(s, p.has(0) && truthy(p.get(0)))) r.push_back(Value::string(l));
    ip.charge(int64_t(r.size()));
    return Value::list(std::move(r));
  }
  if (m == "strip" || m == "lstrip" || m == "rstrip") {
    Params p(m.c_str(), a, {"chars"});
    std::vector<uint32_t> chars;
    if (p.given(0)) chars = strip_chars(p, 0);
    ip.charge_bytes(s.size());
    return Value::string(
        std::string(py_strip(s, p.given(0) ? &chars : nullptr, m != "rstrip", m != "lstrip")));
  }
  if (m == "replace") {
    Params p("replace", a, {"old", "new", "count"}, 2);
    int64_t count = p.has(2) ? want_int(p.get(2), "replace() count") : -1;
    return Value::string(py_replace(ip, s, want_str(p.get(0), "replace() old"),
                                    want_str(p.get(1), "replace() new"), count));
  }
  if (m == "upper" || m == "lower" || m == "title" || m == "capitalize") {
    Params p(m.c_str(), a, {});
    ip.charge_bytes(s.size());
    if (m == "upper") return Value::string(ascii_upper(s));
    if (m == "lower") return Value::string(ascii_lower(s));
    if (m == "title") return Value::string(py_title(s));
    return Value::string(py_capitalize(s));
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "count") {
    Params p(m.c_str(), a, {"sub"}, 1);
    const std::string& sub = want_str(p.get(0), "substring");
    ip.charge_bytes(s.size());
    if (m == "count") {
      if (sub.empty()) return Value::integer(int64_t(cp_count(s)) + 1);
      int64_t n = 0;
      for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) ++n;
      return Value::integer(n);
    }
    size_t at = m == "rfind" ? s.rfind(sub) : s.find(sub);
    if (at == std::string::npos) {
      if (m == "index") fault("substring not found");
      return Value::integer(-1);
    }
    return Value::integer(cp_index_of_byte(s, at));
  }
  if (m == "join") {
    Params p("join", a, {"iterable"}, 1);
    std::string r;
    bool first = true;
    for (auto& v : ip.iterate(p.get(0))) {
      if (!v.is_string())
        fault(fmt::format("sequence item: expected str instance, {} found", type_name(v)));
      if (!first) r += s;
      first = false;
      r += v.str();
      ip.check_len(r.size());
    }
    ip.charge_bytes(r.size());
    return Value::string(std::move(r));
  }
  if (m == "format") return Value::string(py_format(ip, s, a));
  if (m == "removeprefix" || m == "removesuffix") {
    Params p(m.c_str(), a, {"affix"}, 1);
    const std::string& x = want_str(p.get(0), "affix");
    if (m == "removeprefix" && s.compare(0, x.size(), x) == 0)
      return Value::string(s.substr(x.size()));
    if (m == "removesuffix" && s.size() >= x.size() &&
        s.compare(s.size() - x.size(), x.size(), x) == 0)
      return Value::string(s.substr(0, s.size() - x.size()));
    return Value::string(s);
  }
  // is*() predicates (ASCII classes; any non-ASCII code point counts as alphabetic).
  Params p(m.c_str(), a, {});
  if (s.empty()) return Value::boolean(false);
  auto all = [&](auto pred) {
    for (uint32_t c : code_points(s))
      if (!pred(c)) return false;
    return true;
  };
  if (m == "isdigit") return Value::boolean(all([](uint32_t c) { return c >= '0' && c <= '9'; }));
  if (m == "isalpha")
    return Value::boolean(all([](uint32_t c) { return c >= 0x80 || is_alpha(char(c)); }));
  if (m == "isalnum")
    return Value::boolean(
        all([](uint32_t c) { return c >= 0x80 || is_alpha(char(c)) || is_digit(char(c)); }));
  if (m == "isspace") return Value::boolean(all(is_py_space));
  bool has_cased = false;
  for (char c : s) has_cased |= is_alpha(c);
  if (m == "isupper") return Value::boolean(has_cased && ascii_upper(s) == s);
  if (m == "islower") return Value::boolean(has_cased && ascii_lower(s) == s);
  fault(fmt::format("str.{}() is not supported", m), ErrorKind::kUnsupported);
}

// ------------------------------------------------------------------------------------------------
// Filters (jinja2/filters.py, plus HF's tojson)

// Resolves "a.b.0" the way Jinja's make_attrgetter does.
Value attr_path(Interp& ip, const Value& item, const std::string& path) {
  Value v = item;
  size_t b = 0;
  while (true) {
    size_t e = path.find('.', b);
    std::string part = path.substr(b, e == std::string::npos ? std::string::npos : e - b);
    if (!part.empty() && std::all_of(part.begin(), part.end(), is_digit) && part.size() < 18)
      v = ip.get_item(v, Value::integer(std::stoll(part)));
    else
      v = ip.get_item(v, Value::string(part));
    if (e == std::string::npos) return v;
    b = e + 1;
  }
}

Value f_default(Interp&, const Value& v, CallArgs& a) {
  Params p("default", a, {"default_value", "boolean"});
  bool boolean = p.has(1) && truthy(p.get(1));
  if (v.is_undefined() || (boolean && !truthy(v))) return p.get_or(0, Value::string(""));
  return v;
}

Value f_length(Interp& ip, const Value& v, CallArgs& a) {
  Params p("length", a, {});
  return Value::integer(int64_t(ip.length(v)));
}

Value f_first(Interp& ip, const Value& v, CallArgs& a) {
  Params p("first", a, {});
  if (v.is_list()) {
    if (v.list().items.empty()) return Value::undefined("No first item, sequence was empty.");
    return v.list().items.front();
  }
  auto items = ip.iterate(v);
  if (items.empty()) return Value::undefined("No first item, sequence was empty.");
  return items.front();
}

Value f_last(Interp& ip, const Value& v, CallArgs& a) {
  Params p("last", a, {});
  if (v.is_list() && v.list().kind == Seq::kIterator)
    fault(fmt::format("'{}' object is not reversible", v.list().name));
  if (v.is_list()) {
    if (v.list().items.empty()) return Value::undefined("No last item, sequence was empty.");
    return v.list().items.back();
  }
  auto items = ip.iterate(v);
  if (items.empty()) return Value::undefined("No last item, sequence was empty.");
  return items.back();
}

Value f_list(Interp& ip, const Value& v, CallArgs& a) {
  Params p("list", a, {});
  return Value::list(ip.iterate(v));
}

Value f_items(Interp& ip, const Value& v, CallArgs& a) {
  Params p("items", a, {});
  if (v.is_undefined()) return generator({});
  if (!v.is_dict())
    fault(fmt::format("Can only get item pairs from a mapping, not '{}'", type_name(v)));
  std::vector<Value> r;
  for (auto& [k, val] : v.dict().items) r.push_back(Value::list({Value::string(k), val}, true));
  ip.charge(int64_t(r.size()));
  return generator(std::move(r));
}

Value f_string(Interp& ip, const Value& v, CallArgs& a) {
  Params p("string", a, {});
  return Value::string(ip.to_str(v));
}

Value f_safe(Interp& ip, const Value& v, CallArgs& a) {
  Params p("safe", a, {});
  return Value::string(ip.to_str(v));  // Markup(value): a string; no autoescaping here
}

Value f_trim(Interp& ip, const Value& v, CallArgs& a) {
  Params p("trim", a, {"chars"});
  std::string s = ip.to_str(v);
  std::vector<uint32_t> chars;
  if (p.given(0)) chars = strip_chars(p, 0);
  ip.charge_bytes(s.size());
  return Value::string(std::string(py_strip(s, p.given(0) ? &chars : nullptr, true, true)));
}

Value f_upper(Interp& ip, const Value& v, CallArgs& a) {
  Params p("upper", a, {});
  return Value::string(ascii_upper(ip.to_str(v)));
}

Value f_lower(Interp& ip, const Value& v, CallArgs& a) {
  Params p("lower", a, {});
  return Value::string(ascii_lower(ip.to_str(v)));
}

// Jinja's title filter is not str.title(): a word starts after '-', whitespace, '(', '{', '[' or
// '<', and is its first character upper-cased plus the rest lower-cased.
Value f_title(Interp& ip, const Value& v, CallArgs& a) {
  Params p("title", a, {});
  std::string s = ip.to_str(v), r;
  bool at_word_start = true;
  for (size_t i = 0; i < s.size();) {
    Decoded d = decode_at(s, i);
    bool sep = d.cp == '-' || d.cp == '(' || d.cp == '{' || d.cp == '[' || d.cp == '<' ||
               is_py_space(d.cp);
    std::string_view ch(s.data() + i, d.len);
    if (sep)
      r += ch;
    else
      r += at_word_start ? ascii_upper(ch) : ascii_lower(ch);
    at_word_start = sep;
    i += d.len;
  }
  ip.charge_bytes(r.size());
  return Value::string(std::move(r));
}

Value f_capitalize(Interp& ip, const Value& v, CallArgs& a) {
  Params p("capitalize", a, {});
  return Value::string(py_capitalize(ip.to_str(v)));
}

Value f_replace(Interp& ip, const Value& v, CallArgs& a) {
  Params p("replace", a, {"old", "new", "count"}, 2);
  int64_t count = p.given(2) ? want_int(p.get(2), "replace() count") : -1;
  return Value::string(
      py_replace(ip, ip.to_str(v), ip.to_str(p.get(0)), ip.to_str(p.get(1)), count));
}

Value f_join(Interp& ip, const Value& v, CallArgs& a) {
  Params p("join", a, {"d", "attribute"});
  std::string sep = p.has(0) ? ip.to_str(p.get(0)) : "";
  std::string r;
  bool first = true;
  for (auto& item : ip.iterate(v)) {
    if (!first) r += sep;
    first = false;
    ip.write_str(p.given(1) ? attr_path(ip, item, ip.to_str(p.get(1))) : item, r);
    ip.check_len(r.size());
  }
  ip.charge_bytes(r.size());
  return Value::string(std::move(r));
}

Value f_int(Interp& ip, const Value& v, CallArgs& a) {
  Params p("int", a, {"default", "base"});
  Value def = p.get_or(0, Value::integer(0));
  int base = p.has(1) ? int(want_int(p.get(1), "int() base")) : 10;
  if (v.is_undefined()) undefined_error(v);  // int(Undefined) raises
  if (v.is_integral()) return Value::integer(v.to_int());
  if (v.is_float()) {
    double d = v.to_double();
    if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return def;
    return Value::integer(int64_t(d));
  }
  if (v.is_string()) {
    std::string s(py_strip(v.str(), nullptr, true, true));
    s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
    if (base < 2 || base > 36) return def;
    int64_t out = 0;
    const char* b = s.data() + (!s.empty() && s[0] == '+' ? 1 : 0);
    auto r = std::from_chars(b, s.data() + s.size(), out, base);
    if (!s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size())
      return Value::integer(out);
    double d = 0;  // Jinja retries as float: int("3.7") -> 3
    auto rf = std::from_chars(s.data(), s.data() + s.size(), d);
    if (base == 10 && !s.empty() && rf.ec == std::errc() && rf.ptr == s.data() + s.size() &&
        std::isfinite(d) && std::fabs(d) < 9.2e18)
      return Value::integer(int64_t(d));
  }
  return def;
}

Value f_float(Interp&, const Value& v, CallArgs& a) {
  Params p("float", a, {"default"});
  Value def = p.get_or(0, Value::number(0.0));
  if (v.is_undefined()) undefined_error(v);
  if (v.is_numeric()) return Value::number(v.to_double());
  if (v.is_string()) {
    std::string s(py_strip(v.str(), nullptr, true, true));
    double d = 0;
    auto r = std::from_chars(s.data(), s.data() + s.size(), d);
    if (!s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size()) return Value::number(d);
  }
  return def;
}

Value f_abs(Interp&, const Value& v, CallArgs& a) {
  Params p("abs", a, {});
  if (v.is_float()) return Value::number(std::fabs(v.to_double()));
  if (v.is_integral()) {
    if (v.to_int() == INT64_MIN) fault("integer overflow");
    return Value::integer(std::llabs(v.to_int()));
  }
  fault(fmt::format("bad operand type for abs(): '{}'", type_name(v)));
}

Value f_round(Interp&, const Value& v, CallArgs& a) {
  Params p("round", a, {"precision", "method"});
  int64_t prec = p.has(0) ? want_int(p.get(0), "round() precision") : 0;
  std::string method = p.has(1) ? want_str(p.get(1), "round() method") : "common";
  if (!v.is_numeric()) fault(fmt::format("round() of '{}'", type_name(v)));
  double x = v.to_double(), scale = std::pow(10.0, double(prec));
  if (method == "common" && v.is_integral() && prec >= 0) return Value::integer(v.to_int());
  if (method == "common") {
    // Python's round() rounds the exact binary value half-to-even in decimal (round(2.675, 2) is
    // 2.67); glibc's printf does the same.
    if (prec >= 0 && prec <= 30 && std::isfinite(x)) {
      char buf[512];
      int n = std::snprintf(buf, sizeof buf, "%.*f", int(prec), x);
      double r = 0;
      if (n > 0 && size_t(n) < sizeof buf) std::from_chars(buf, buf + n, r);
      return Value::number(r);
    }
    return Value::number(std::nearbyint(x * scale) / scale);
  }
  if (method == "floor") return Value::number(std::floor(x * scale) / scale);
  if (method == "ceil") return Value::number(std::ceil(x * scale) / scale);
  fault("method must be 'common', 'ceil' or 'floor'");
}

// HF: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
Value f_tojson(Interp& ip, const Value& v, CallArgs& a) {
  Params p("tojson", a, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonStyle st;
  st.ensure_ascii = p.has(0) && truthy(p.get(0));
  if (p.given(1)) {
    st.pretty = true;
    st.item_sep = ",";
    if (p.get(1).is_string()) {
      st.indent = p.get(1).str();
    } else {
      int64_t n = want_int(p.get(1), "tojson() indent");
      ip.check_len(size_t(std::clamp<int64_t>(n, 0, INT64_MAX / 2)));
      st.indent = std::string(size_t(std::max<int64_t>(n, 0)), ' ');
    }
  }
  if (p.given(2)) {
    std::vector<Value> seps = ip.iterate(p.get(2));
    if (seps.size() != 2 || !seps[0].is_string() || !seps[1].is_string())
      fault("tojson() separators must be a pair of strings");
    st.item_sep = seps[0].str();
    st.key_sep = seps[1].str();
  }
  st.sort_keys = p.has(3) && truthy(p.get(3));
  std::string o;
  write_json(ip, v, o, st, 0);
  ip.charge_bytes(o.size());
  return Value::string(std::move(o));
}

bool less_for_sort(Interp& ip, const Value& a, const Value& b, bool case_sensitive) {
  if (!case_sensitive && a.is_string() && b.is_string())
    return ascii_lower(a.str()) < ascii_lower(b.str());
  return compare(ip, a, b, "<") < 0;
}

Value sort_key(Interp& ip, const Value& item, const Params& p, size_t attr_slot) {
  return p.given(attr_slot) ? attr_path(ip, item, ip.to_str(p.get(attr_slot))) : item;
}

Value f_sort(Interp& ip, const Value& v, CallArgs& a) {
  Params p("sort", a, {"reverse", "case_sensitive", "attribute"});
  bool reverse = p.has(0) && truthy(p.get(0));
  bool cs = p.has(1) && truthy(p.get(1));
  std::vector<Value> items = ip.iterate(v);
  std::vector<std::pair<Value, Value>> keyed;
  for (auto& it : items) keyed.emplace_back(sort_key(ip, it, p, 2), it);
  ip.charge(int64_t(items.size()) * 20);
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    return reverse ? less_for_sort(ip, y.first, x.first, cs)
                   : less_for_sort(ip, x.first, y.first, cs);
  });
  std::vector<Value> r;
  for (auto& [k, it] : keyed) r.push_back(std::move(it));
  return Value::list(std::move(r));
}

Value f_dictsort(Interp& ip, const Value& v, CallArgs& a) {
  Params p("dictsort", a, {"case_sensitive", "by", "reverse"});
  if (!v.is_dict()) fault("dictsort() requires a mapping");
  bool cs = p.has(0) && truthy(p.get(0));
  bool by_value = p.has(1) && ip.to_str(p.get(1)) == "value";
  bool reverse = p.has(2) && truthy(p.get(2));
  std::vector<Value> pairs;
  for (auto& [k, val] : v.dict().items) pairs.push_back(Value::list({Value::string(k), val}, true));
  ip.charge(int64_t(pairs.size()) * 20);
  std::stable_sort(pairs.begin(), pairs.end(), [&](const Value& x, const Value& y) {
    const Value& kx = x.list().items[by_value ? 1 : 0];
    const Value& ky = y.list().items[by_value ? 1 : 0];
    return reverse ? less_for_sort(ip, ky, kx, cs) : less_for_sort(ip, kx, ky, cs);
  });
  return Value::list(std::move(pairs));
}

Value f_unique(Interp& ip, const Value& v, CallArgs& a) {
  Params p("unique", a, {"case_sensitive", "attribute"});
  bool cs = p.has(0) && truthy(p.get(0));
  std::vector<Value> r, keys;
  for (auto& it : ip.iterate(v)) {
    Value k = sort_key(ip, it, p, 1);
    if (!cs && k.is_string()) k = Value::string(ascii_lower(k.str()));
    ip.charge(int64_t(keys.size()));
    bool seen = false;
    for (auto& o : keys)
      if (equal(ip, o, k)) seen = true;
    if (seen) continue;
    keys.push_back(std::move(k));
    r.push_back(it);
  }
  return generator(std::move(r));
}

// A string comes back reversed; a list or dict as Python's reversed() iterator; anything else
// iterable as a reversed list (filters.py do_reverse).
Value f_reverse(Interp& ip, const Value& v, CallArgs& a) {
  Params p("reverse", a, {});
  if (v.is_string()) {
    CpIndex idx(v.str());
    std::string r;
    for (size_t i = idx.size(); i-- > 0;) r += idx.at(i);
    return Value::string(std::move(r));
  }
  if (v.is_undefined()) return generator({}, "reversed");
  std::vector<Value> items = ip.iterate(v);
  std::reverse(items.begin(), items.end());
  if (v.is_dict()) return generator(std::move(items), "dict_reversekeyiterator");
  if (v.is_list() && v.list().kind != Seq::kIterator)
    return generator(std::move(items), v.list().kind == Seq::kView ? "dict_reverseitemiterator"
                                                                   : "list_reverseiterator");
  return Value::list(std::move(items));
}

Value minmax(Interp& ip, const Value& v, CallArgs& a, bool want_max) {
  Params p(want_max ? "max" : "min", a, {"case_sensitive", "attribute"});
  bool cs = p.has(0) && truthy(p.get(0));
  std::vector<Value> items = ip.iterate(v);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  size_t best = 0;
  Value best_key = sort_key(ip, items[0], p, 1);
  for (size_t i = 1; i < items.size(); ++i) {
    Value k = sort_key(ip, items[i], p, 1);
    bool better =
        want_max ? less_for_sort(ip, best_key, k, cs) : less_for_sort(ip, k, best_key, cs);
    if (better) best = i, best_key = std::move(k);
  }
  return items[best];
}

Value f_min(Interp& ip, const Value& v, CallArgs& a) {
  return minmax(ip, v, a, false);
}
Value f_max(Interp& ip, const Value& v, CallArgs& a) {
  return minmax(ip, v, a, true);
}

Value f_sum(Interp& ip, const Value& v, CallArgs& a) {
  Params p("sum", a, {"attribute", "start"});
  Value acc = p.get_or(1, Value::integer(0));
  for (auto& it : ip.iterate(v))
    acc = arith(ip, BinOp::kAdd, acc, p.given(0) ? attr_path(ip, it, ip.to_str(p.get(0))) : it);
  return acc;
}

Value f_map(Interp& ip, const Value& v, CallArgs& a) {
  std::vector<Value> items = ip.iterate(v);
  std::vector<Value> r;
  const Value* attribute = nullptr;
  const Value* def = nullptr;
  for (auto& [k, val] : a.kw) {
    if (k == "attribute")
      attribute = &val;
    else if (k == "default")
      def = &val;
  }
  if (attribute) {
    if (!a.pos.empty() || a.kw.size() != (def ? 2u : 1u))
      fault("map(attribute=...) takes only 'attribute' and 'default'");
    for (auto& it : items) {
      Value x = attr_path(ip, it, ip.to_str(*attribute));
      r.push_back(x.is_undefined() && def ? *def : x);
    }
    return generator(std::move(r));
  }
  if (a.pos.empty()) fault("map() needs a filter name or attribute=");
  std::string fname = want_str(a.pos[0], "map() filter name");
  CallArgs rest;
  rest.pos.assign(a.pos.begin() + 1, a.pos.end());
  rest.kw = a.kw;
  for (auto& it : items) {
    CallArgs copy = rest;
    r.push_back(ip.apply_filter(fname, it, copy));
  }
  return generator(std::move(r));
}

// select/reject/selectattr/rejectattr
Value select_impl(Interp& ip, const Value& v, CallArgs& a, bool by_attr, bool keep_if) {
  std::vector<Value> items = ip.iterate(v);
  size_t k = 0;
  std::string attr;
  if (by_attr) {
    if (a.pos.empty()) fault("selectattr/rejectattr need an attribute name");
    attr = ip.to_str(a.pos[0]);
    k = 1;
  }
  std::string test;
  CallArgs targs;
  if (a.pos.size() > k) {
    test = want_str(a.pos[k], "test name");
    targs.pos.assign(a.pos.begin() + long(k) + 1, a.pos.end());
  }
  targs.kw = a.kw;
  std::vector<Value> r;
  for (auto& it : items) {
    Value x = by_attr ? attr_path(ip, it, attr) : it;
    bool ok;
    if (test.empty()) {
      ok = truthy(x);
    } else {
      CallArgs copy = targs;
      ok = ip.apply_test(test, x, copy);
    }
    if (ok == keep_if) r.push_back(it);
  }
  return generator(std::move(r));
}

Value f_select(Interp& ip, const Value& v, CallArgs& a) {
  return select_impl(ip, v, a, false, true);
}
Value f_reject(Interp& ip, const Value& v, CallArgs& a) {
  return select_impl(ip, v, a, false, false);
}
Value f_selectattr(Interp& ip, const Value& v, CallArgs& a) {
  return select_impl(ip, v, a, true, true);
}
Value f_rejectattr(Interp& ip, const Value& v, CallArgs& a) {
  return select_impl(ip, v, a, true, false);
}

Value f_attr(Interp& ip, const Value& v, CallArgs& a) {
  Params p("attr", a, {"name"}, 1);
  return ip.get_attr(v, ip.to_str(p.get(0)));
}

// Jinja 3 indent(): width may be a string; the first line and blank lines are left alone unless
// first=True / blank=True.
Value f_indent(Interp& ip, const Value& v, CallArgs& a) {
  Params p("indent", a, {"width", "first", "blank"});
  std::string ind;
  if (p.has(0) && p.get(0).is_string()) {
    ind = p.get(0).str();
  } else {
    int64_t w = p.has(0) ? want_int(p.get(0), "indent() width") : 4;
    ip.check_len(size_t(std::clamp<int64_t>(w, 0, INT64_MAX / 2)));
    ind = std::string(size_t(std::max<int64_t>(w, 0)), ' ');
  }
  bool first = p.has(1) && truthy(p.get(1));
  bool blank = p.has(2) && truthy(p.get(2));
  if (v.is_undefined()) undefined_error(v);
  if (!v.is_string())  // Jinja does `s += "\n"` first
    fault(fmt::format("unsupported operand type(s) for +=: '{}' and 'str'", type_name(v)));
  std::vector<std::string> lines = py_splitlines(v.str() + "\n", false);
  std::string r;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i) r += '\n';
    if ((i > 0 || first) && (blank || !lines[i].empty())) r += ind;
    r += lines[i];
    ip.check_len(r.size());
  }
  ip.charge_bytes(r.size());
  return Value::string(std::move(r));
}

Value f_escape(Interp& ip, const Value& v, CallArgs& a) {
  Params p("escape", a, {});
  std::string r;
  for (char c : ip.to_str(v)) {
    switch (c) {
      case '&':
        r += "&amp;";
        break;
      case '<':
        r += "&lt;";
        break;
      case '>':
        r += "&gt;";
        break;
      case '"':
        r += "&#34;";
        break;
      case '\'':
        r += "&#39;";
        break;
      default:
        r += c;
    }
  }
  ip.check_len(r.size());
  return Value::string(std::move(r));
}

// len(re.findall(r"\w+", str(s))); non-ASCII code points count as word characters.
Value f_wordcount(Interp& ip, const Value& v, CallArgs& a) {
  Params p("wordcount", a, {});
  std::string s = ip.to_str(v);
  int64_t n = 0;
  bool in_word = false;
  for (char c : s) {
    bool w = is_alpha(c) || is_digit(c) || c == '_' || static_cast<unsigned char>(c) >= 0x80;
    if (w && !in_word) ++n;
    in_word = w;
  }
  ip.charge_bytes(s.size());
  return Value::integer(n);
}

const std::unordered_map<std::string, FilterFn>& filters() {
  static const std::unordered_map<std::string, FilterFn> m = {
      {"abs", f_abs},           {"attr", f_attr},       {"capitalize", f_capitalize},
      {"count", f_length},      {"d", f_default},       {"default", f_default},
      {"dictsort", f_dictsort}, {"e", f_escape},        {"escape", f_escape},
      {"first", f_first},       {"float", f_float},     {"indent", f_indent},
      {"int", f_int},           {"items", f_items},     {"join", f_join},
      {"last", f_last},         {"length", f_length},   {"list", f_list},
      {"lower", f_lower},       {"map", f_map},         {"max", f_max},
      {"min", f_min},           {"reject", f_reject},   {"rejectattr", f_rejectattr},
      {"replace", f_replace},   {"reverse", f_reverse}, {"round", f_round},
      {"safe", f_safe},         {"select", f_select},   {"selectattr", f_selectattr},
      {"sort", f_sort},         {"string", f_string},   {"sum", f_sum},
      {"title", f_title},       {"tojson", f_tojson},   {"trim", f_trim},
      {"unique", f_unique},     {"upper", f_upper},     {"wordcount", f_wordcount},
  };
  return m;
}

Value Interp::apply_filter(const std::string& fname, const Value& v, CallArgs& args) {
  auto it = filters().find(fname);
  if (it == filters().end())
    fault(fmt::format("unknown filter '{}'", fname), ErrorKind::kUnsupported);
  charge(1);
  return it->second(*this, v, args);
}

// ------------------------------------------------------------------------------------------------
// Tests (jinja2/tests.py)

bool t_defined(Interp&, const Value& v, CallArgs&) {
  return !v.is_undefined();
}
bool t_undefined(Interp&, const Value& v, CallArgs&) {
  return v.is_undefined();
}
bool t_none(Interp&, const Value& v, CallArgs&) {
  return v.is_none();
}
bool t_boolean(Interp&, const Value& v, CallArgs&) {
  return v.is_bool();
}
bool t_true(Interp&, const Value& v, CallArgs&) {
  return v.is_bool() && v.as_bool();
}
bool t_false(Interp&, const Value& v, CallArgs&) {
  return v.is_bool() && !v.as_bool();
}
bool t_integer(Interp&, const Value& v, CallArgs&) {
  return v.is_int();
}
bool t_float(Interp&, const Value& v, CallArgs&) {
  return v.is_float();
}
bool t_number(Interp&, const Value& v, CallArgs&) {
  return v.is_numeric();
}
bool t_string(Interp&, const Value& v, CallArgs&) {
  return v.is_string();
}
bool t_mapping(Interp&, const Value& v, CallArgs&) {
  return v.is_dict();
}
// Undefined has __iter__, __len__ and __getitem__, so Jinja calls it iterable and a sequence.
bool t_iterable(Interp&, const Value& v, CallArgs&) {
  return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
}
bool t_sequence(Interp& ip, const Value& v, CallArgs& a) {
  return t_iterable(ip, v, a) && !(v.is_list() && !v.list().plain());
}
bool t_callable(Interp&, const Value& v, CallArgs&) {
  return v.is_fn() || v.is_undefined();
}
bool t_escaped(Interp&, const Value&, CallArgs&) {
  return false;
}

const Value& one_arg(CallArgs& a, const char* name) {
  if (a.pos.size() + a.kw.size() != 1) fault(fmt::format("test '{}' takes one argument", name));
  return a.pos.empty() ? a.kw[0].second : a.pos[0];
}

bool t_eq(Interp& ip, const Value& v, CallArgs& a) {
  return equal(ip, v, one_arg(a, "eq"));
}
bool t_ne(Interp& ip, const Value& v, CallArgs& a) {
  return !equal(ip, v, one_arg(a, "ne"));
}
bool t_lt(Interp& ip, const Value& v, CallArgs& a) {
  return compare(ip, v, one_arg(a, "lt"), "<") < 0;
}
bool t_le(Interp& ip, const Value& v, CallArgs& a) {
  return compare(ip, v, one_arg(a, "le"), "<=") <= 0;
}
bool t_gt(Interp& ip, const Value& v, CallArgs& a) {
  return compare(ip, v, one_arg(a, "gt"), ">") > 0;
}
bool t_ge(Interp& ip, const Value& v, CallArgs& a) {
  return compare(ip, v, one_arg(a, "ge"), ">=") >= 0;
}
bool t_in(Interp& ip, const Value& v, CallArgs& a) {
  return contains(ip, one_arg(a, "in"), v);
}

bool t_sameas(Interp& ip, const Value& v, CallArgs& a) {
  const Value& o = one_arg(a, "sameas");
  if (v.v.index() != o.v.index()) return false;
  if (v.is_list()) return std::get<ListPtr>(v.v) == std::get<ListPtr>(o.v);
  if (v.is_dict()) return std::get<DictPtr>(v.v) == std::get<DictPtr>(o.v);
  return equal(ip, v, o);
}

// value % n as Python computes it for numbers (tests.py: `value % 2 == 1` etc.).
double num_mod(Interp& ip, const Value& v, const Value& n) {
  Value r = arith(ip, BinOp::kMod, v, n);
  return r.to_double();
}

bool t_odd(Interp& ip, const Value& v, CallArgs&) {
  return num_mod(ip, v, Value::integer(2)) == 1;
}
bool t_even(Interp& ip, const Value& v, CallArgs&) {
  return num_mod(ip, v, Value::integer(2)) == 0;
}
bool t_divisibleby(Interp& ip, const Value& v, CallArgs& a) {
  return num_mod(ip, v, one_arg(a, "divisibleby")) == 0;
}

bool t_lower(Interp& ip, const Value& v, CallArgs& a) {
  CallArgs none;
  return truthy(str_method(ip, ip.to_str(v), "islower", none));
}
bool t_upper(Interp& ip, const Value& v, CallArgs& a) {
  CallArgs none;
  return truthy(str_method(ip, ip.to_str(v), "isupper", none));
}

const std::unordered_map<std::string, TestFn>& tests() {
  static const std::unordered_map<std::string, TestFn> m = {
      {"defined", t_defined},
      {"undefined", t_undefined},
      {"none", t_none},
      {"boolean", t_boolean},
      {"true", t_true},
      {"false", t_false},
      {"integer", t_integer},
      {"float", t_float},
      {"number", t_number},
      {"string", t_string},
      {"mapping", t_mapping},
      {"iterable", t_iterable},
      {"sequence", t_sequence},
      {"callable", t_callable},
      {"escaped", t_escaped},
      {"eq", t_eq},
      {"equalto", t_eq},
      {"==", t_eq},
      {"ne", t_ne},
      {"!=", t_ne},
      {"lt", t_lt},
      {"lessthan", t_lt},
      {"<", t_lt},
      {"le", t_le},
      {"<=", t_le},
      {"gt", t_gt},
      {"greaterthan", t_gt},
      {">", t_gt},
      {"ge", t_ge},
      {">=", t_ge},
      {"in", t_in},
      {"sameas", t_sameas},
      {"odd", t_odd},
      {"even", t_even},
      {"divisibleby", t_divisibleby},
      {"lower", t_lower},
      {"upper", t_upper},
  };
  return m;
}

bool Interp::apply_test(const std::string& tname, const Value& v, CallArgs& args) {
  auto it = tests().find(tname);
  if (it == tests().end()) fault(fmt::format("unknown test '{}'", tname), ErrorKind::kUnsupported);
  static const char* no_args[] = {"defined", "undefined", "none",     "boolean",  "true",
                                  "false",   "integer",   "float",    "number",   "string",
                                  "mapping", "iterable",  "sequence", "callable", "escaped",
                                  "odd",     "even",      "lower",    "upper"};
  if (!args.pos.empty() || !args.kw.empty())
    for (const char* n : no_args)
      if (tname == n) fault(fmt::format("test '{}' takes no arguments", tname));
  return it->second(*this, v, args);
}

// ------------------------------------------------------------------------------------------------
// Lexer (jinja2/lexer.py)

enum class Tok : uint8_t {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string text;
  int64_t ival = 0;
  double fval = 0;
  int line = 1, col = 1;
};

class Lexer {
 public:
  Lexer(std::string_view source, const Options& opt, const std::string& name)
      : opt_(opt), name_(name) {
    // Jinja normalises every newline to \n and, without keep_trailing_newline, drops one final
    // newline of the whole source before lexing.
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
        src_ += '\n';
      } else {
        src_ += source[i];
      }
    }
    if (!opt.keep_trailing_newline && !src_.empty() && src_.back() == '\n') src_.pop_back();
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    const size_t n = src_.size();
    size_t pos = 0;
    bool line_starting = true;
    while (pos < n) {
      size_t t = find_tag(pos);
      if (t == std::string::npos) {
        emit(Tok::kData, pos, src_.substr(pos));
        break;
      }
      char kind = src_[t + 1];
      char sign = (t + 2 < n && (src_[t + 2] == '-' || src_[t + 2] == '+')) ? src_[t + 2] : 0;
      std::string_view text(src_.data() + pos, t - pos);
      if (sign == '-') {
        text = py_strip(text, nullptr, false, true);
      } else if (sign != '+' && opt_.lstrip_blocks && kind != '{') {
        // Strip the spaces between the line start and a block/comment tag, if only spaces.
        size_t nl = text.rfind('\n');
        size_t l = nl == std::string_view::npos ? 0 : nl + 1;
        if ((l > 0 || line_starting) && l < text.size() &&
            py_strip(text.substr(l), nullptr, true, false).empty())
          text = text.substr(0, l);
      }
      if (!text.empty()) emit(Tok::kData, pos, std::string(text));
      size_t p = t + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        size_t e = src_.find("#}", p);
        if (e == std::string::npos) error(t, "missing end of comment tag");
        char esign = (e > p && (src_[e - 1] == '-' || src_[e - 1] == '+')) ? src_[e - 1] : 0;
        pos = after_tag_end(e + 2, esign, true);
      } else {
        pos = lex_tag(p, kind, t);
      }
      line_starting = pos > 0 && src_[pos - 1] == '\n';
    }
    emit(Tok::kEof, n);
    return std::move(out_);
  }

 private:
  std::string src_;
  const Options& opt_;
  const std::string& name_;
  std::vector<size_t> line_starts_;
  std::vector<Token> out_;
  std::vector<char> brackets_;

  std::pair<int, int> linecol(size_t pos) const {
    size_t li = size_t(std::upper_bound(line_starts_.begin(), line_starts_.end(), pos) -
                       line_starts_.begin()) -
                1;
    size_t start = line_starts_[li];
    return {int(li + 1), int(cp_count(std::string_view(src_).substr(start, pos - start)) + 1)};
  }

  [[noreturn]] void error(size_t pos, const std::string& msg) const {
    auto [l, c] = linecol(pos);
    fail(ErrorKind::kFormat, "{}: line {}, column {}: {}", name_, l, c, msg);
  }

  Token& emit(Tok t, size_t pos, std::string text = {}) {
    auto [l, c] = linecol(std::min(pos, src_.size()));
    out_.push_back(Token{t, std::move(text), 0, 0, l, c});
    return out_.back();
  }

  size_t find_tag(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string::npos; i = src_.find('{', i + 1))
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#'))
        return i;
    return std::string::npos;
  }

  size_t skip_space(size_t p) const {
    while (p < src_.size()) {
      Decoded d = decode_at(src_, p);
      if (!is_py_space(d.cp)) break;
      p += d.len;
    }
    return p;
  }

  size_t after_tag_end(size_t pos, char sign, bool block_like) const {
    if (sign == '-') return skip_space(pos);
    if (sign != '+' && block_like && opt_.trim_blocks && pos < src_.size() && src_[pos] == '\n')
      return pos + 1;
    return pos;
  }

  size_t lex_tag(size_t p, char kind, size_t tag_pos) {
    const bool var = kind == '{';
    emit(var ? Tok::kVarBegin : Tok::kBlockBegin, tag_pos);
    const char* end = var ? "}}" : "%}";
    brackets_.clear();
    while (true) {
      p = skip_space(p);
      if (p >= src_.size())
        error(tag_pos, fmt::format("unexpected end of template, expected '{}'", end));
      if (brackets_.empty()) {
        char c = src_[p];
        if ((c == '-' || (c == '+' && !var)) && src_.compare(p + 1, 2, end) == 0) {
          emit(var ? Tok::kVarEnd : Tok::kBlockEnd, p);
          return after_tag_end(p + 3, c, !var);
        }
        if (src_.compare(p, 2, end) == 0) {
          emit(var ? Tok::kVarEnd : Tok::kBlockEnd, p);
          return after_tag_end(p + 2, 0, !var);
        }
      }
      p = lex_token(p);
    }
  }

  size_t lex_token(size_t p) {
    const size_t n = src_.size();
    char c = src_[p];
    if (is_alpha(c) || c == '_') {
      size_t b = p;
      while (p < n && (is_alpha(src_[p]) || is_digit(src_[p]) || src_[p] == '_')) ++p;
      emit(Tok::kName, b, src_.substr(b, p - b));
      return p;
    }
    if (is_digit(c)) return lex_number(p);
    if (c == '\'' || c == '"') return lex_string(p);
    static const char* two[] = {"//", "**", "==", "!=", "<=", ">="};
    for (const char* op : two)
      if (src_.compare(p, 2, op) == 0) {
        emit(Tok::kOp, p, op);
        return p + 2;
      }
    static const std::string_view one = "+-*/%~<>=()[]{},.:|";
    if (one.find(c) == std::string_view::npos) {
      Decoded d = decode_at(src_, p);
      error(p, d.cp >= 0x20 && d.cp < 0x7F ? fmt::format("unexpected char '{}'", c)
                                           : fmt::format("unexpected char U+{:04X}", d.cp));
    }
    if (c == '(' || c == '[' || c == '{') {
      brackets_.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    } else if (c == ')' || c == ']' || c == '}') {
      if (brackets_.empty()) error(p, fmt::format("unexpected '{}'", c));
      if (brackets_.back() != c)
        error(p, fmt::format("unexpected '{}', expected '{}'", c, brackets_.back()));
      brackets_.pop_back();
    }
    emit(Tok::kOp, p, std::string(1, c));
    return p + 1;
  }

  size_t digits(size_t p) const {
    while (p < src_.size() &&
           (is_digit(src_[p]) || (src_[p] == '_' && p + 1 < src_.size() && is_digit(src_[p + 1]))))
      ++p;
    return p;
  }

  size_t lex_number(size_t b) {
    const size_t n = src_.size();
    size_t p = digits(b);
    bool is_float = false;
    // After '.', as in `foo.0.1`, only integers: Jinja's float regex has a (?<!\.) lookbehind.
    bool after_dot = !out_.empty() && out_.back().type == Tok::kOp && out_.back().text == ".";
    if (!after_dot && p + 1 < n && src_[p] == '.' && is_digit(src_[p + 1])) {
      is_float = true;
      p = digits(p + 1);
    }
    if (!after_dot && p < n && (src_[p] == 'e' || src_[p] == 'E')) {
      size_t q = p + 1;
      if (q < n && (src_[q] == '+' || src_[q] == '-')) ++q;
      if (q < n && is_digit(src_[q])) {
        is_float = true;
        p = digits(q);
      }
    }
    std::string text = src_.substr(b, p - b);
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    Token& t = emit(is_float ? Tok::kFloat : Tok::kInt, b, text);
    if (is_float) {
      std::from_chars(text.data(), text.data() + text.size(), t.fval);
    } else {
      auto r = std::from_chars(text.data(), text.data() + text.size(), t.ival);
      if (r.ec != std::errc()) error(b, "integer literal too large");
    }
    return p;
  }

  static int hexval(char c) {
    if (is_digit(c)) return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  // Python "unicode_escape" decoding, which Jinja applies to string literals.
  size_t lex_string(size_t b) {
    const size_t n = src_.size();
    char q = src_[b];
    size_t p = b + 1;
    std::string s;
    while (true) {
      if (p >= n) error(b, "unterminated string literal");
      char c = src_[p];
      if (c == q) break;
      if (c != '\\') {
        s += c;
        ++p;
        continue;
      }
      if (p + 1 >= n) error(b, "unterminated string literal");
      char d = src_[p + 1];
      p += 2;
      auto hex = [&](int count) {
        uint32_t v = 0;
        for (int k = 0; k < count; ++k) {
          int h = p < n ? hexval(src_[p]) : -1;
          if (h < 0) error(p - 2 - size_t(k), fmt::format("truncated \\{} escape in string", d));
          v = v * 16 + uint32_t(h);
          ++p;
        }
        return v;
      };
      switch (d) {
        case '\n':
          break;
        case '\\':
          s += '\\';
          break;
        case '\'':
          s += '\'';
          break;
        case '"':
          s += '"';
          break;
        case 'a':
          s += '\a';
          break;
        case 'b':
          s += '\b';
          break;
        case 'f':
          s += '\f';
          break;
        case 'n':
          s += '\n';
          break;
        case 'r':
          s += '\r';
          break;
        case 't':
          s += '\t';
          break;
        case 'v':
          s += '\v';
          break;
        case 'x':
          append_utf8(s, hex(2));
          break;
        case 'u':
          append_utf8(s, hex(4));
          break;
        case 'U': {
          uint32_t v = hex(8);
          if (v > 0x10FFFF) error(p - 10, "illegal Unicode character in \\U escape");
          append_utf8(s, v);
          break;
        }
        case 'N':
          error(p - 2, "\\N{...} escapes are not supported");
        default:
          if (d >= '0' && d <= '7') {
            uint32_t v = uint32_t(d - '0');
            for (int k = 0; k < 2 && p < n && src_[p] >= '0' && src_[p] <= '7'; ++k, ++p)
              v = v * 8 + uint32_t(src_[p] - '0');
            append_utf8(s, v);
          } else {
            s += '\\';  // unknown escapes stay as written
            s += d;
          }
      }
    }
    emit(Tok::kString, b, std::move(s));
    return p + 1;
  }
};

// ------------------------------------------------------------------------------------------------
// Parser (jinja2/parser.py)

template <typename T>
std::unique_ptr<T> make_node(const Token& at) {
  auto n = std::make_unique<T>();
  n->line = at.line;
  n->col = at.col;
  return n;
}

class Parser {
 public:
  Parser(std::vector<Token> toks, const std::string& name, const Options& opt)
      : t_(std::move(toks)), name_(name), opt_(opt) {}

  Body parse_template() {
    std::string ended;
    Body body = parse_body({}, &ended);
    for (auto& p : pending_)
      if (!p.soft) error(p.at, p.what, ErrorKind::kUnsupported);
    return body;
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
  const std::string& name_;
  const Options& opt_;
  int nesting_ = 0;
  int loop_depth_ = 0;

  // Jinja 3 rejects an unknown filter or test when compiling, except inside an `if` statement
  // or an inline if-expression ("soft" frames), where it only fails if evaluated. Unknown names
  // are collected here and judged once the enclosing construct is known.
  struct Pending {
    Token at;
    std::string what;
    bool soft;
  };
  std::vector<Pending> pending_;
  bool soft_ = false;

  void unknown(const Token& at, std::string what) {
    pending_.push_back(Pending{at, std::move(what), soft_});
  }

  // Runs `parse` in a hard (body of for/macro/set/filter) or soft (if) frame.
  template <typename F>
  auto in_frame(bool soft, F&& parse) {
    bool saved = soft_;
    soft_ = soft;
    auto r = parse();
    soft_ = saved;
    return r;
  }

  struct Nest {
    Parser& p;
    Nest(Parser& parser, const Token& at) : p(parser) {
      if (++p.nesting_ > p.opt_.max_nesting)
        p.error(at, fmt::format("template nested more than {} levels deep", p.opt_.max_nesting));
    }
    ~Nest() { --p.nesting_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  bool at_op(std::string_view op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool at_name(std::string_view n) const { return cur().type == Tok::kName && cur().text == n; }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::kData:
        return "template data";
      case Tok::kVarBegin:
        return "'{{'";
      case Tok::kVarEnd:
        return "end of print statement";
      case Tok::kBlockBegin:
        return "'{%'";
      case Tok::kBlockEnd:
        return "end of statement block";
      case Tok::kName:
        return fmt::format("'{}'", t.text);
      case Tok::kString:
        return "string literal";
      case Tok::kInt:
      case Tok::kFloat:
        return "number";
      case Tok::kOp:
        return fmt::format("'{}'", t.text);
      case Tok::kEof:
        return "end of template";
    }
    return "token";
  }

  [[noreturn]] void error(const Token& t, const std::string& msg,
                          ErrorKind kind = ErrorKind::kFormat) const {
    fail(kind, "{}: line {}, column {}: {}", name_, t.line, t.col, msg);
  }

  void expect_op(std::string_view op) {
    if (!at_op(op)) error(cur(), fmt::format("expected '{}', got {}", op, describe(cur())));
    next();
  }

  std::string expect_name() {
    if (cur().type != Tok::kName)
      error(cur(), fmt::format("expected a name, got {}", describe(cur())));
    std::string n = cur().text;
    next();
    return n;
  }

  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd)
      error(cur(), fmt::format("expected end of statement block, got {}", describe(cur())));
    next();
  }

  // A statement that opens a body may end with ':' before '%}' ("for Python compatibility").
  void expect_body_start() {
    if (at_op(":")) next();
    expect_block_end();
  }

  // Parses until a block tag named in `ends`; leaves the cursor on that tag's name.
  Body parse_body(const std::vector<std::string>& ends, std::string* ended) {
    Body body;
    while (true) {
      const Token& t = cur();
      switch (t.type) {
        case Tok::kData: {
          auto s = make_node<TextStmt>(t);
          s->text = t.text;
          body.push_back(std::move(s));
          next();
          break;
        }
        case Tok::kVarBegin: {
          auto s = make_node<OutputStmt>(t);
          next();
          s->expr = parse_tuple(true);
          if (cur().type != Tok::kVarEnd)
            error(cur(), fmt::format("expected end of print statement, got {}", describe(cur())));
          next();
          body.push_back(std::move(s));
          break;
        }
        case Tok::kBlockBegin: {
          const Token& nm = peek();
          if (nm.type != Tok::kName)
            error(nm, fmt::format("expected a tag name, got {}", describe(nm)));
          if (std::find(ends.begin(), ends.end(), nm.text) != ends.end()) {
            next();
            *ended = nm.text;
            return body;
          }
          next();
          body.push_back(parse_statement());
          break;
        }
        case Tok::kEof:
          if (!ends.empty()) {
            std::string want;
            for (auto& e : ends) want += (want.empty() ? "'" : " or '") + e + "'";
            error(t, "unexpected end of template, expected " + want);
          }
          return body;
        default:
          error(t, fmt::format("unexpected {}", describe(t)));
      }
    }
  }

  StmtPtr parse_statement() {
    const Token tag = cur();
    Nest guard(*this, tag);
    const std::string name = tag.text;
    next();
    if (name == "if") return parse_if(tag);
    if (name == "for") return parse_for(tag);
    if (name == "set") return parse_set(tag);
    if (name == "macro") return parse_macro(tag);
    if (name == "filter") return parse_filter_block(tag);
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) error(tag, fmt::format("'{}' outside of a loop", name));
      auto s = make_node<LoopControlStmt>(tag);
      s->flow = name == "break" ? Flow::kBreak : Flow::kContinue;
      expect_block_end();
      return s;
    }
    if (name == "generation") {
      auto s = make_node<PassThroughStmt>(tag);
      expect_body_start();
      std::string ended;
      s->body = parse_body({"endgeneration"}, &ended);
      next();
      expect_block_end();
      return s;
    }
    static const char* unsupported[] = {"block", "extends", "include",    "import",
                                        "from",  "with",    "autoescape", "raw",
                                        "call",  "do",      "trans",      "print"};
    for (const char* u : unsupported)
      if (name == u) error(tag, fmt::format("unsupported tag '{}'", name), ErrorKind::kUnsupported);
    static const char* closers[] = {"endif",  "endfor",   "else",      "elif",
                                    "endset", "endmacro", "endfilter", "endgeneration"};
    for (const char* c : closers)
      if (name == c) error(tag, fmt::format("unexpected tag '{}'", name));
    error(tag, fmt::format("unknown tag '{}'", name), ErrorKind::kUnsupported);
  }

  StmtPtr parse_if(const Token& tag) {
    return in_frame(true, [&] { return parse_if_soft(tag); });
  }

  StmtPtr parse_if_soft(const Token& tag) {
    auto s = make_node<IfStmt>(tag);
    ExprPtr cond = parse_tuple(false);
    expect_body_start();
    while (true) {
      std::string ended;
      Body body = parse_body({"elif", "else", "endif"}, &ended);
      s->branches.emplace_back(std::move(cond), std::move(body));
      next();
      if (ended == "elif") {
        cond = parse_tuple(false);
        expect_body_start();
        continue;
      }
      if (ended == "else") {
        expect_body_start();
        s->otherwise = parse_body({"endif"}, &ended);
        next();
      }
      expect_block_end();
      return s;
    }
  }

  std::vector<std::string> parse_target_names() {
    std::vector<std::string> names;
    bool paren = at_op("(");
    if (paren) next();
    names.push_back(expect_name());
    while (at_op(",")) {
      next();
      if ((paren && at_op(")")) || at_name("in")) break;
      names.push_back(expect_name());
    }
    if (paren) expect_op(")");
    for (auto& n : names)
      if (n == "true" || n == "false" || n == "none" || n == "True" || n == "False" || n == "None")
        error(cur(), fmt::format("cannot assign to '{}'", n));
    return names;
  }

  StmtPtr parse_for(const Token& tag) {
    auto s = make_node<ForStmt>(tag);
    s->targets = parse_target_names();
    if (!at_name("in")) error(cur(), fmt::format("expected 'in', got {}", describe(cur())));
    next();
    s->iter = parse_tuple(false);
    if (at_name("if")) {
      next();
      s->filter = parse_expr();
    }
    if (at_name("recursive"))
      error(cur(), "recursive loops are not supported", ErrorKind::kUnsupported);
    expect_body_start();
    std::string ended;
    ++loop_depth_;
    s->body = in_frame(false, [&] { return parse_body({"endfor", "else"}, &ended); });
    --loop_depth_;
    next();
    if (ended == "else") {
      expect_body_start();
      s->otherwise = parse_body({"endfor"}, &ended);
      next();
    }
    expect_block_end();
    return s;
  }

  FilterCall parse_one_filter() {
    const Token nm = cur();
    FilterCall fc;
    fc.pos.line = nm.line;
    fc.pos.col = nm.col;
    fc.name = parse_dotted_name();
    if (!filters().count(fc.name)) unknown(nm, fmt::format("unknown filter '{}'", fc.name));
    if (at_op("(")) fc.args = parse_call_args();
    return fc;
  }

  // `upper|trim` for {% filter %}, `|upper|trim` (possibly empty) after {% set x %}.
  std::vector<FilterCall> parse_filter_chain(bool leading_pipe) {
    std::vector<FilterCall> chain;
    if (!leading_pipe) chain.push_back(parse_one_filter());
    while (at_op("|")) {
      next();
      chain.push_back(parse_one_filter());
    }
    return chain;
  }

  SetTarget parse_set_target() {
    SetTarget t;
    t.name = expect_name();
    if (at_op(".")) {
      next();
      t.attr = expect_name();
    }
    if (t.attr.empty() && (t.name == "true" || t.name == "false" || t.name == "none" ||
                           t.name == "True" || t.name == "False" || t.name == "None"))
      error(cur(), fmt::format("cannot assign to '{}'", t.name));
    return t;
  }

  StmtPtr parse_set(const Token& tag) {
    std::vector<SetTarget> targets;
    bool paren = at_op("(");
    if (paren) next();
    targets.push_back(parse_set_target());
    while (at_op(",")) {
      next();
      if (paren && at_op(")")) break;
      targets.push_back(parse_set_target());
    }
    if (paren) expect_op(")");
    if (at_op("=")) {
      next();
      auto s = make_node<SetStmt>(tag);
      s->targets = std::move(targets);
      s->value = parse_tuple(true);
      expect_block_end();
      return s;
    }
    if (targets.size() != 1 || !targets[0].attr.empty())
      error(cur(), fmt::format("expected '=', got {}", describe(cur())));
    auto s = make_node<SetBlockStmt>(tag);
    s->target = targets[0].name;
    s->filters = parse_filter_chain(true);
    expect_body_start();
    std::string ended;
    s->body = in_frame(false, [&] { return parse_body({"endset"}, &ended); });
    next();
    expect_block_end();
    return s;
  }

  StmtPtr parse_macro(const Token& tag) {
    auto s = make_node<MacroStmt>(tag);
    s->name = expect_name();
    expect_op("(");
    while (!at_op(")")) {
      if (!s->params.empty()) {
        expect_op(",");
        if (at_op(")")) break;
      }
      s->params.push_back(expect_name());
      if (at_op("=")) {
        next();
        s->defaults.push_back(parse_expr());
      } else {
        if (!s->defaults.empty() && s->defaults.back())
          error(cur(), "non-default argument follows default argument");
        s->defaults.push_back(nullptr);
      }
    }
    next();
    expect_body_start();
    int saved = loop_depth_;
    loop_depth_ = 0;
    std::string ended;
    s->body = in_frame(false, [&] { return parse_body({"endmacro"}, &ended); });
    loop_depth_ = saved;
    next();
    if (cur().type == Tok::kName && cur().text == s->name) next();
    expect_block_end();
    return s;
  }

  StmtPtr parse_filter_block(const Token& tag) {
    auto s = make_node<FilterBlockStmt>(tag);
    s->filters = parse_filter_chain(false);
    expect_body_start();
    std::string ended;
    s->body = in_frame(false, [&] { return parse_body({"endfilter"}, &ended); });
    next();
    expect_block_end();
    return s;
  }

  // --- expressions ------------------------------------------------------------------------------

  bool at_tuple_end() const {
    Tok t = cur().type;
    return t == Tok::kVarEnd || t == Tok::kBlockEnd || t == Tok::kEof || at_op(")");
  }

  ExprPtr parse_tuple(bool with_condexpr) {
    const Token start = cur();
    ExprPtr first = with_condexpr ? parse_expr() : parse_or();
    if (!at_op(",")) return first;
    auto t = make_node<ListExpr>(start);
    t->tuple = true;
    t->items.push_back(std::move(first));
    while (at_op(",")) {
      next();
      if (at_tuple_end()) break;
      t->items.push_back(with_condexpr ? parse_expr() : parse_or());
    }
    return t;
  }

  ExprPtr parse_expr() {
    Nest guard(*this, cur());
    const size_t mark = pending_.size();
    ExprPtr e = parse_or();
    while (at_name("if")) {
      for (size_t k = mark; k < pending_.size(); ++k) pending_[k].soft = true;
      auto c = make_node<CondExpr>(cur());
      next();
      c->cond = parse_or();
      if (at_name("else")) {
        next();
        c->otherwise = parse_expr();
      }
      c->then = std::move(e);
      e = std::move(c);
      for (size_t k = mark; k < pending_.size(); ++k) pending_[k].soft = true;
    }
    return e;
  }

  ExprPtr binary(const Token& at, BinOp op, ExprPtr l, ExprPtr r) {
    auto b = make_node<BinaryExpr>(at);
    b->op = op;
    b->lhs = std::move(l);
    b->rhs = std::move(r);
    return b;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (at_name("or")) {
      const Token at = cur();
      next();
      e = binary(at, BinOp::kOr, std::move(e), parse_and());
    }
    return e;
  }

  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (at_name("and")) {
      const Token at = cur();
      next();
      e = binary(at, BinOp::kAnd, std::move(e), parse_not());
    }
    return e;
  }

  ExprPtr parse_not() {
    if (at_name("not")) {
      Nest guard(*this, cur());
      auto u = make_node<UnaryExpr>(cur());
      next();
      u->op = UnOp::kNot;
      u->operand = parse_not();
      return u;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    const Token start = cur();
    ExprPtr e = parse_math1();
    std::vector<std::pair<CmpOp, ExprPtr>> ops;
    while (true) {
      CmpOp op;
      if (cur().type == Tok::kOp && cur().text == "==")
        op = CmpOp::kEq;
      else if (cur().type == Tok::kOp && cur().text == "!=")
        op = CmpOp::kNe;
      else if (cur().type == Tok::kOp && cur().text == "<")
        op = CmpOp::kLt;
      else if (cur().type == Tok::kOp && cur().text == "<=")
        op = CmpOp::kLe;
      else if (cur().type == Tok::kOp && cur().text == ">")
        op = CmpOp::kGt;
      else if (cur().type == Tok::kOp && cur().text == ">=")
        op = CmpOp::kGe;
      else if (at_name("in"))
        op = CmpOp::kIn;
      else if (at_name("not") && peek().type == Tok::kName && peek().text == "in") {
        next();
        op = CmpOp::kNotIn;
      } else {
        break;
      }
      next();
      ops.emplace_back(op, parse_math1());
    }
    if (ops.empty()) return e;
    auto c = make_node<CompareExpr>(start);
    c->first = std::move(e);
    c->rest = std::move(ops);
    return c;
  }

  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (at_op("+") || at_op("-")) {
      const Token at = cur();
      next();
      e = binary(at, at.text == "+" ? BinOp::kAdd : BinOp::kSub, std::move(e), parse_concat());
    }
    return e;
  }

  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (at_op("~")) {
      const Token at = cur();
      next();
      e = binary(at, BinOp::kConcat, std::move(e), parse_math2());
    }
    return e;
  }

  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (at_op("*") || at_op("/") || at_op("//") || at_op("%")) {
      const Token at = cur();
      next();
      BinOp op = at.text == "*"    ? BinOp::kMul
                 : at.text == "/"  ? BinOp::kDiv
                 : at.text == "//" ? BinOp::kFloorDiv
                                   : BinOp::kMod;
      e = binary(at, op, std::move(e), parse_pow());
    }
    return e;
  }

  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (at_op("**")) {  // left-associative in Jinja, unlike Python
      const Token at = cur();
      next();
      e = binary(at, BinOp::kPow, std::move(e), parse_unary(true));
    }
    return e;
  }

  ExprPtr parse_unary(bool with_filter) {
    Nest guard(*this, cur());
    ExprPtr e;
    if (at_op("-") || at_op("+")) {
      auto u = make_node<UnaryExpr>(cur());
      u->op = at_op("-") ? UnOp::kNeg : UnOp::kPos;
      next();
      u->operand = parse_unary(false);
      e = std::move(u);
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token t = cur();
    switch (t.type) {
      case Tok::kName: {
        next();
        auto lit = make_node<Literal>(t);
        if (t.text == "true" || t.text == "True")
          lit->value = Value::boolean(true);
        else if (t.text == "false" || t.text == "False")
          lit->value = Value::boolean(false);
        else if (t.text == "none" || t.text == "None")
          lit->value = Value::none();
        else {
          auto n = make_node<NameExpr>(t);
          n->name = t.text;
          return n;
        }
        return lit;
      }
      case Tok::kString: {
        std::string s;
        while (cur().type == Tok::kString) {  // adjacent literals concatenate
          s += cur().text;
          next();
        }
        auto lit = make_node<Literal>(t);
        lit->value = Value::string(std::move(s));
        return lit;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        next();
        auto lit = make_node<Literal>(t);
        lit->value = t.type == Tok::kInt ? Value::integer(t.ival) : Value::number(t.fval);
        return lit;
      }
      case Tok::kOp:
        if (t.text == "(") {
          next();
          if (at_op(")")) {
            next();
            auto l = make_node<ListExpr>(t);
            l->tuple = true;
            return l;
          }
          ExprPtr e = parse_tuple(true);
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          next();
          auto l = make_node<ListExpr>(t);
          while (!at_op("]")) {
            if (!l->items.empty()) {
              expect_op(",");
              if (at_op("]")) break;
            }
            l->items.push_back(parse_expr());
          }
          next();
          return l;
        }
        if (t.text == "{") {
          next();
          auto d = make_node<DictExpr>(t);
          while (!at_op("}")) {
            if (!d->items.empty()) {
              expect_op(",");
              if (at_op("}")) break;
            }
            ExprPtr k = parse_expr();
            expect_op(":");
            d->items.emplace_back(std::move(k), parse_expr());
          }
          next();
          return d;
        }
        break;
      default:
        break;
    }
    error(t, fmt::format("unexpected {}", describe(t)));
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (at_op(".")) {
        const Token dot = cur();
        next();
        if (cur().type == Tok::kName) {
          auto g = make_node<GetAttr>(dot);
          g->obj = std::move(e);
          g->attr = cur().text;
          next();
          e = std::move(g);
        } else if (cur().type == Tok::kInt) {
          auto g = make_node<GetItem>(dot);
          auto lit = make_node<Literal>(cur());
          lit->value = Value::integer(cur().ival);
          g->obj = std::move(e);
          g->key = std::move(lit);
          next();
          e = std::move(g);
        } else {
          error(cur(), fmt::format("expected a name after '.', got {}", describe(cur())));
        }
      } else if (at_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (at_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    const Token lb = cur();
    next();
    ExprPtr start;
    if (!at_op(":")) {
      // x[], x[a, b]: Jinja subscripts with a tuple (which then finds nothing).
      if (at_op("]") || (start = parse_expr(), at_op(","))) {
        auto key = make_node<ListExpr>(lb);
        key->tuple = true;
        if (start) key->items.push_back(std::move(start));
        while (at_op(",")) {
          next();
          if (at_op("]")) break;
          key->items.push_back(parse_expr());
        }
        start = std::move(key);
      }
      if (!at_op(":")) {
        expect_op("]");
        auto g = make_node<GetItem>(lb);
        g->obj = std::move(obj);
        g->key = std::move(start);
        return g;
      }
    }
    next();  // ':'
    auto s = make_node<SliceExpr>(lb);
    s->obj = std::move(obj);
    s->start = std::move(start);
    if (!at_op("]") && !at_op(":")) s->stop = parse_expr();
    if (at_op(":")) {
      next();
      if (!at_op("]")) s->step = parse_expr();
    }
    expect_op("]");
    return s;
  }

  ArgExprs parse_call_args() {
    expect_op("(");
    ArgExprs a;
    while (!at_op(")")) {
      if (!a.pos.empty() || !a.kw.empty() || a.star || a.starstar) {
        expect_op(",");
        if (at_op(")")) break;
      }
      if (at_op("*") || at_op("**")) {
        bool two = at_op("**");
        next();
        (two ? a.starstar : a.star) = parse_expr();
        continue;
      }
      if (a.star || a.starstar) error(cur(), "invalid syntax for function call expression");
      if (cur().type == Tok::kName && peek().type == Tok::kOp && peek().text == "=") {
        std::string key = cur().text;
        next();
        next();
        a.kw.emplace_back(std::move(key), parse_expr());
      } else {
        if (!a.kw.empty()) error(cur(), "positional argument follows keyword argument");
        a.pos.push_back(parse_expr());
      }
    }
    next();
    return a;
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto c = make_node<CallExpr>(cur());
    c->line = callee->line;  // report calls where the callee is written, not at '('
    c->col = callee->col;
    c->callee = std::move(callee);
    c->args = parse_call_args();
    return c;
  }

  std::string parse_dotted_name() {
    std::string n = expect_name();
    while (at_op(".") && peek().type == Tok::kName) {
      next();
      n += "." + expect_name();
    }
    return n;
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (at_op("|")) {
        next();
        const Token nm = cur();
        auto f = make_node<FilterExpr>(nm);
        f->name = parse_dotted_name();
        if (!filters().count(f->name)) unknown(nm, fmt::format("unknown filter '{}'", f->name));
        if (at_op("(")) f->args = parse_call_args();
        f->value = std::move(e);
        e = std::move(f);
      } else if (at_name("is")) {
        e = parse_test(std::move(e));
      } else if (at_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_test(ExprPtr e) {
    const Token is = cur();
    next();
    bool negated = false;
    if (at_name("not")) {
      next();
      negated = true;
    }
    const Token nm = cur();
    auto t = make_node<TestExpr>(nm);
    t->name = parse_dotted_name();
    if (!tests().count(t->name)) unknown(nm, fmt::format("unknown test '{}'", t->name));
    if (at_op("(")) {
      t->args = parse_call_args();
    } else if ((cur().type == Tok::kName || cur().type == Tok::kString || cur().type == Tok::kInt ||
                cur().type == Tok::kFloat || at_op("[") || at_op("{")) &&
               !at_name("else") && !at_name("or") && !at_name("and")) {
      // `x is divisibleby 3`, `x is sameas false`: one argument without parentheses.
      if (at_name("is")) error(cur(), "You cannot chain multiple tests with is");
      t->args.pos.push_back(parse_postfix(parse_primary()));
    }
    t->value = std::move(e);
    if (!negated) return t;
    auto u = make_node<UnaryExpr>(is);
    u->op = UnOp::kNot;
    u->operand = std::move(t);
    return u;
  }
};

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Template

struct Template::Program {
  std::string name;
  Options options;
  detail::Body body;
};

Template::Template(std::string_view source, std::string name, Options options) {
  auto p = std::make_shared<Program>();
  p->name = std::move(name);
  p->options = options;
  detail::Lexer lexer(source, p->options, p->name);
  detail::Parser parser(lexer.run(), p->name, p->options);
  p->body = parser.parse_template();
  program_ = std::move(p);
}

Template::~Template() = default;
Template::Template(const Template&) = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(const Template&) = default;
Template& Template::operator=(Template&&) noexcept = default;

const std::string& Template::name() const {
  return program_->name;
}

std::string Template::render(const nlohmann::ordered_json& context) const {
  const Program& p = *program_;
  if (!context.is_object())
    fail(ErrorKind::kInvalidArgument, "{}: the render context must be a JSON object", p.name);
  detail::Interp ip(p.name, p.options);
  ip.scopes.emplace_back();
  try {
    for (auto& [k, v] : context.items()) ip.scopes[0].set(k, detail::from_json(v, 0));
  } catch (const detail::Fault& f) {
    fail(f.kind, "{}: render context: {}", p.name, f.msg);
  }
  ip.scopes.emplace_back();
  ip.base = 1;
  std::string out;
  ip.out = &out;
  ip.exec(p.body);
  return out;
}

}  // namespace moeflux::jinja
