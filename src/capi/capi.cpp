// The C API (include/moeflux.h) over Model, ExpertStore and Session. Every entry point catches
// everything: an Error becomes its MF_ERR_* code and mf_last_error's message.
#include "moeflux.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "engine/backend.h"
#include "engine/session.h"
#include "experts/expert_store.h"
#include "model/model.h"
#include "util/error.h"
#include "util/thread_pool.h"

struct mf_model {
  moeflux::Device* device = nullptr;  // the process's device of the asked backend
  std::unique_ptr<moeflux::Model> model;
  std::unique_ptr<moeflux::ExpertStore> store;
  mf_model_params params;
  uint64_t fingerprint = 0;
};

struct mf_session {
  mf_model* model = nullptr;
  std::unique_ptr<moeflux::Context> backend;
  std::unique_ptr<moeflux::Session> session;
};

namespace {

using moeflux::Error;
using moeflux::ErrorKind;

thread_local std::string g_last_error;

int set_error(int code, const std::string& msg) noexcept {
  try {
    g_last_error = msg;
  } catch (...) {  // no memory for the message: keep the code, drop the text
    g_last_error.clear();
  }
  return code;
}

int code_of(ErrorKind k) {
  switch (k) {
    case ErrorKind::kInvalidArgument:
      return MF_ERR_INVALID_ARGUMENT;
    case ErrorKind::kFormat:
      return MF_ERR_FORMAT;
    case ErrorKind::kUnsupported:
      return MF_ERR_UNSUPPORTED;
    case ErrorKind::kIo:
      return MF_ERR_IO;
    case ErrorKind::kOutOfMemory:
      return MF_ERR_OUT_OF_MEMORY;
    case ErrorKind::kNumeric:
      return MF_ERR_NUMERIC;
    case ErrorKind::kInternal:
      return MF_ERR_INTERNAL;
  }
  return MF_ERR_INTERNAL;
}

// Runs fn, turning any exception into a code + message. fn returns an MF code itself.
template <typename Fn>
int guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const moeflux::SnapshotError& e) {
    const bool mismatch = e.reason() == moeflux::SnapshotError::kModel ||
                          e.reason() == moeflux::SnapshotError::kParams;
    return set_error(mismatch ? MF_ERR_MODEL_MISMATCH : MF_ERR_FORMAT, e.what());
  } catch (const Error& e) {
    return set_error(code_of(e.kind()), e.what());
  } catch (const std::bad_alloc&) {
    return set_error(MF_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return set_error(MF_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(MF_ERR_INTERNAL, "internal error: unknown exception");
  }
}

int null_arg(const char* fn, const char* what) noexcept {
  try {
    return set_error(MF_ERR_INVALID_ARGUMENT, std::string(fn) + ": " + what + " is NULL");
  } catch (...) {
    return MF_ERR_INVALID_ARGUMENT;
  }
}

int eval(mf_session* s, const int32_t* tokens, size_t n, float* logits, const char* fn) {
  if (!s) return null_arg(fn, "session");
  if (!tokens) return null_arg(fn, "tokens");
  return guarded([&]() -> int {
    if (n == 0) return set_error(MF_ERR_INVALID_ARGUMENT, std::string(fn) + ": no tokens (n = 0)");
    const moeflux::Session& ss = *s->session;
    if (n > uint64_t(ss.ctx() - ss.pos()))  // also keeps n within int
      return set_error(MF_ERR_CONTEXT_FULL,
                       fmt::format("{}: context full: {} tokens at position {} exceed the "
                                   "context of {} positions",
                                   fn, n, ss.pos(), ss.ctx()));
    // The session checks the ids, the context and its state before changing anything; past
    // those a failure is one inside the forward pass (an expert read, memory, NaN), and the
    // session then refuses further evaluation (MF_ERR_STATE_INVALID) until reset.
    try {
      s->session->eval(tokens, int(n), logits, false);
    } catch (const moeflux::EvalError& e) {
      using R = moeflux::EvalError;
      const int code = e.reason() == R::kBadToken       ? MF_ERR_BAD_TOKEN
                       : e.reason() == R::kContextFull  ? MF_ERR_CONTEXT_FULL
                       : e.reason() == R::kStateInvalid ? MF_ERR_STATE_INVALID
                                                        : MF_ERR_INVALID_ARGUMENT;
      return set_error(code, fmt::format("{}: {}", fn, e.what()));
    }
    return MF_OK;
  });
}

// The value a C caller stored in an enum field, read as the int it is: in C++ loading an enum
// object that holds a value outside its enumerators is undefined (UBSan stops on it), and
// callers may store anything there.
template <typename E>
int enum_value(const E& e) {
  static_assert(sizeof(E) == sizeof(int));
  int v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

moeflux::IoEngine io_engine(int e) {
  switch (e) {
    case MF_IO_PREAD:
      return moeflux::IoEngine::kPread;
    case MF_IO_URING:
      return moeflux::IoEngine::kUring;
    default:
      return moeflux::IoEngine::kAuto;
  }
}

}  // namespace

extern "C" {

const char* mf_version(void) {
  return MOEFLUX_VERSION;
}

const char* mf_last_error(void) {
  return g_last_error.c_str();
}

const char* mf_error_name(int code) {
  switch (code) {
    case MF_OK:
      return "MF_OK";
    case MF_ERR_INVALID_ARGUMENT:
      return "MF_ERR_INVALID_ARGUMENT";
    case MF_ERR_IO:
      return "MF_ERR_IO";
    case MF_ERR_FORMAT:
      return "MF_ERR_FORMAT";
    case MF_ERR_UNSUPPORTED:
      return "MF_ERR_UNSUPPORTED";
    case MF_ERR_BAD_TOKEN:
      return "MF_ERR_BAD_TOKEN";
    case MF_ERR_CONTEXT_FULL:
      return "MF_ERR_CONTEXT_FULL";
    case MF_ERR_OUT_OF_RANGE:
      return "MF_ERR_OUT_OF_RANGE";
    case MF_ERR_BUFFER_TOO_SMALL:
      return "MF_ERR_BUFFER_TOO_SMALL";
    case MF_ERR_MODEL_MISMATCH:
      return "MF_ERR_MODEL_MISMATCH";
    case MF_ERR_STATE_INVALID:
      return "MF_ERR_STATE_INVALID";
    case MF_ERR_OUT_OF_MEMORY:
      return "MF_ERR_OUT_OF_MEMORY";
    case MF_ERR_INTERNAL:
      return "MF_ERR_INTERNAL";
    case MF_ERR_NUMERIC:
      return "MF_ERR_NUMERIC";
    default:
      return "unknown";
  }
}

mf_model_params mf_model_default_params(void) {
  mf_model_params p;
  p.backend = MF_BACKEND_CPU;
  p.threads = 0;
  p.expert_cache_bytes = -1;
  p.prefetch = false;
  p.experts_per_token = 0;
  p.io_readers = 4;
  p.direct_io = false;
  p.io_engine = MF_IO_AUTO;
  p.exact = true;
  return p;
}

int mf_model_load(const char* path, const mf_model_params* params, mf_model** out) {
  if (!out) return null_arg("mf_model_load", "model (output)");
  *out = nullptr;
  if (!path) return null_arg("mf_model_load", "path");
  return guarded([&]() -> int {
    const mf_model_params p = params ? *params : mf_model_default_params();
    const int backend = enum_value(p.backend), io = enum_value(p.io_engine);
    if (backend != MF_BACKEND_CPU && backend != MF_BACKEND_CUDA && backend != MF_BACKEND_AUTO)
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_model_load: unknown backend {}", backend));
    moeflux::Device* device = nullptr;
    try {
      device = &moeflux::get_device(backend == MF_BACKEND_CPU    ? moeflux::BackendKind::kCpu
                                    : backend == MF_BACKEND_CUDA ? moeflux::BackendKind::kCuda
                                                                 : moeflux::BackendKind::kAuto);
    } catch (const Error& e) {
      return set_error(MF_ERR_UNSUPPORTED, std::string("mf_model_load: ") + e.what());
    }
    if (p.threads < 0)
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_model_load: threads = {} is negative", p.threads));
    moeflux::resolve_threads(p.threads, "mf_model_load: threads");
    if (p.expert_cache_bytes < -1)
      return set_error(
          MF_ERR_INVALID_ARGUMENT,
          fmt::format("mf_model_load: expert_cache_bytes = {} (-1 = default, 0 = none)",
                      p.expert_cache_bytes));
    if (p.io_readers < 1)
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_model_load: io_readers = {} < 1", p.io_readers));
    if (io != MF_IO_AUTO && io != MF_IO_PREAD && io != MF_IO_URING)
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_model_load: unknown io_engine {}", io));
    auto m = std::make_unique<mf_model>();
    m->device = device;
    m->params = p;
    m->model = moeflux::Model::load(path);
    const int n_experts = m->model->spec().n_experts;
    if (p.experts_per_token < 0 || p.experts_per_token > n_experts)
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_model_load: experts_per_token = {} is not in [0, {}]",
                                   p.experts_per_token, n_experts));
    moeflux::ExpertStoreOptions so;
    so.cache_bytes = p.expert_cache_bytes;
    so.readers = p.io_readers;
    so.direct_io = p.direct_io;
    so.io = io_engine(io);
    so.prefetch = p.prefetch;
    so.memory = &device->expert_memory();
    m->store = std::make_unique<moeflux::ExpertStore>(*m->model, so);
    // As the CLI: on a GPU, experts that all fit are loaded now and stay resident.
    const auto& ex = m->model->manifest().experts;
    if (!device->expert_memory().host_visible() &&
        m->store->options().cache_bytes >= int64_t(ex.stride * uint64_t(ex.count) * ex.layers.size()))
      m->store->load_all();
    m->fingerprint = moeflux::model_fingerprint(*m->model);
    *out = m.release();
    return MF_OK;
  });
}

void mf_model_free(mf_model* model) {
  delete model;
}

int32_t mf_model_n_vocab(const mf_model* m) {
  return m ? m->model->spec().vocab_size : null_arg("mf_model_n_vocab", "model");
}
int32_t mf_model_n_ctx_train(const mf_model* m) {
  return m ? m->model->spec().ctx_train : null_arg("mf_model_n_ctx_train", "model");
}
int32_t mf_model_n_layers(const mf_model* m) {
  return m ? m->model->spec().n_layers : null_arg("mf_model_n_layers", "model");
}
int32_t mf_model_n_embd(const mf_model* m) {
  return m ? m->model->spec().hidden_size : null_arg("mf_model_n_embd", "model");
}
int32_t mf_model_eos(const mf_model* m) {
  if (!m) {
    null_arg("mf_model_eos", "model");
    return -1;
  }
  const auto& ids = m->model->spec().eos_ids;
  return ids.empty() ? -1 : ids[0];
}
bool mf_model_is_eos(const mf_model* m, int32_t token) {
  if (!m) return null_arg("mf_model_is_eos", "model"), false;
  const auto& ids = m->model->spec().eos_ids;
  return std::find(ids.begin(), ids.end(), token) != ids.end();
}
uint64_t mf_model_fingerprint(const mf_model* m) {
  if (!m) return null_arg("mf_model_fingerprint", "model"), 0;
  return m->fingerprint;
}

mf_session_params mf_session_default_params(void) {
  const moeflux::SessionParams d;
  mf_session_params p;
  p.n_ctx = 0;
  p.threads = -1;
  p.experts_per_token = -1;
  p.checkpoints = d.checkpoints;
  p.checkpoint_interval = d.checkpoint_interval;
  p.deltanet_chunked_min = -1;
  return p;
}

int mf_session_new(mf_model* model, const mf_session_params* params, mf_session** out) {
  if (!out) return null_arg("mf_session_new", "session (output)");
  *out = nullptr;
  if (!model) return null_arg("mf_session_new", "model");
  return guarded([&]() -> int {
    const mf_session_params p = params ? *params : mf_session_default_params();
    auto bad = [](const char* field, int v) {
      return set_error(MF_ERR_INVALID_ARGUMENT,
                       fmt::format("mf_session_new: {} = {} is out of range", field, v));
    };
    // Only the C API's own sentinels (-1: the model's / the default) are checked here; n_ctx,
    // checkpoints and checkpoint_interval go to the Session as they are, which checks them.
    if (p.threads < -1) return bad("threads", p.threads);
    moeflux::resolve_threads(p.threads, "mf_session_new: threads");
    if (p.experts_per_token < -1) return bad("experts_per_token", p.experts_per_token);
    if (p.deltanet_chunked_min < -1) return bad("deltanet_chunked_min", p.deltanet_chunked_min);
    const moeflux::SessionParams defaults;
    moeflux::SessionParams sp;
    sp.ctx = p.n_ctx;
    sp.experts_per_token =
        p.experts_per_token >= 0 ? p.experts_per_token : model->params.experts_per_token;
    sp.checkpoints = p.checkpoints;
    sp.checkpoint_interval = p.checkpoint_interval;
    sp.deltanet_chunked_min_tokens =
        p.deltanet_chunked_min >= 0 ? p.deltanet_chunked_min : defaults.deltanet_chunked_min_tokens;
    auto s = std::make_unique<mf_session>();
    s->model = model;
    // Each session its own context (its queue; on the CPU its own thread pool).
    s->backend = model->device->context(moeflux::ContextOptions{
        p.threads >= 0 ? p.threads : model->params.threads, model->params.exact});
    s->session = std::make_unique<moeflux::Session>(*model->model, *s->backend, *model->store, sp);
    *out = s.release();
    return MF_OK;
  });
}

void mf_session_free(mf_session* s) {
  if (!s) return;
  s->session.reset();  // before the backend that holds its memory
  delete s;
}

int32_t mf_session_n_ctx(const mf_session* s) {
  return s ? s->session->ctx() : null_arg("mf_session_n_ctx", "session");
}
int32_t mf_session_n_past(const mf_session* s) {
  return s ? s->session->pos() : null_arg("mf_session_n_past", "session");
}

int mf_eval_prompt(mf_session* s, const int32_t* tokens, size_t n, float* logits) {
  return eval(s, tokens, n, logits, "mf_eval_prompt");
}

int mf_eval_token(mf_session* s, int32_t token, float* logits) {
  return eval(s, &token, 1, logits, "mf_eval_token");
}

int mf_memory_clear(mf_session* s) {
  if (!s) return null_arg("mf_memory_clear", "session");
  return guarded([&]() -> int {
    s->session->clear();
    return MF_OK;
  });
}

int mf_memory_seq_rm(mf_session* s, int32_t p0, int32_t p1) {
  if (!s) return null_arg("mf_memory_seq_rm", "session");
  return guarded([&]() -> int {
    const int pos = s->session->pos();
    if (p0 < 0 || p0 > pos || (p1 >= 0 && p1 < p0))
      return set_error(MF_ERR_OUT_OF_RANGE,
                       fmt::format("mf_memory_seq_rm: [{}, {}) is not a range of the sequence "
                                   "[0, {}) (0 <= p0 <= {}, p1 < 0 or p1 >= p0)",
                                   p0, p1, pos, pos));
    s->session->seq_rm(p0, p1);  // a middle range: MF_ERR_UNSUPPORTED
    return MF_OK;
  });
}

int32_t mf_memory_seq_pos_max(const mf_session* s) {
  if (!s) {
    null_arg("mf_memory_seq_pos_max", "session");
    return -1;
  }
  return s->session->pos_max();
}

size_t mf_state_size(const mf_session* s) {
  if (!s) return null_arg("mf_state_size", "session"), 0;
  return s->session->state_size();
}

int mf_state_save(mf_session* s, void* buf, size_t size, size_t* written) {
  if (written) *written = 0;
  if (!s) return null_arg("mf_state_save", "session");
  return guarded([&]() -> int {
    const size_t need = s->session->state_size();
    if (!s->session->valid())
      return set_error(MF_ERR_STATE_INVALID,
                       "mf_state_save: the session's state is invalid (an "
                       "evaluation failed midway); nothing to save");
    if (size < need) {
      if (written) *written = need;
      return set_error(
          MF_ERR_BUFFER_TOO_SMALL,
          fmt::format("mf_state_save: the buffer holds {} bytes, the snapshot needs {}", size,
                      need));
    }
    if (!buf) return null_arg("mf_state_save", "buf");
    s->session->state_save(buf, size);
    if (written) *written = need;
    return MF_OK;
  });
}

int mf_state_load(mf_session* s, const void* buf, size_t size) {
  if (!s) return null_arg("mf_state_load", "session");
  if (!buf) return null_arg("mf_state_load", "buf");
  return guarded([&]() -> int {
    s->session->state_load(buf, size);
    return MF_OK;
  });
}

}  // extern "C"
