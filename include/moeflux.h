/* moeflux C API: load a model package, run sessions over it, rewind and snapshot them.
 *
 * C11 (and C++) compatible. Opaque handles; parameters come from *_default_params() and are
 * then adjusted field by field. Every function that can fail returns 0 (MF_OK) on success and
 * one of the negative MF_ERR_* codes below otherwise; mf_last_error() then holds a one-line
 * message naming the file, field or position at fault. No function throws or aborts on bad
 * input.
 *
 * Threads: a model (and its expert cache) may be shared by any number of sessions, each used
 * by one thread at a time; different sessions may run on different threads at once. A session
 * is not itself thread-safe. mf_model_free must come after every session of the model is freed.
 *
 *   mf_model* model;
 *   mf_model_params mp = mf_model_default_params();
 *   mp.threads = 8;
 *   if (mf_model_load("qwen3.5-35b-q4", &mp, &model) != MF_OK) {
 *     fprintf(stderr, "%s\n", mf_last_error());
 *     return 1;
 *   }
 *   mf_session* s;
 *   mf_session_new(model, NULL, &s);
 *   float* logits = malloc(sizeof(float) * mf_model_n_vocab(model));
 *   mf_eval_prompt(s, prompt, n_prompt, logits);      // batched prefill, last token's logits
 *   mf_eval_token(s, next, logits);                   // one token at a time
 *   mf_session_free(s);
 *   mf_model_free(model);
 */
#ifndef MOEFLUX_H
#define MOEFLUX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define MF_API __attribute__((visibility("default")))
#else
#define MF_API
#endif

/* Return codes. */
enum {
  MF_OK = 0,
  MF_ERR_INVALID_ARGUMENT = -1, /* a null pointer, a parameter out of its range */
  MF_ERR_IO = -2,               /* a file could not be opened or read (bad path, EIO) */
  MF_ERR_FORMAT = -3,           /* a malformed package, or a corrupted/truncated snapshot or one
                                   of another snapshot version */
  MF_ERR_UNSUPPORTED = -4,      /* valid, but not something this engine does (e.g. removing a
                                   middle range with mf_memory_seq_rm, a backend not built) */
  MF_ERR_BAD_TOKEN = -5,        /* a token id outside [0, n_vocab) */
  MF_ERR_CONTEXT_FULL = -6,     /* the tokens do not fit in the session's context */
  MF_ERR_OUT_OF_RANGE = -7,     /* mf_memory_seq_rm positions outside the sequence */
  MF_ERR_BUFFER_TOO_SMALL = -8, /* mf_state_save: the buffer is smaller than mf_state_size */
  MF_ERR_MODEL_MISMATCH = -9,   /* a snapshot of another model, or of a session whose settings
                                   this one cannot continue (experts per token, context) */
  MF_ERR_STATE_INVALID = -10,   /* an evaluation failed midway (e.g. an expert read error), so
                                   the session's state is partly updated: evaluation refuses
                                   until mf_memory_clear, mf_memory_seq_rm or mf_state_load */
  MF_ERR_OUT_OF_MEMORY = -11,   /* an allocation failed (activations, expert buffers, cache) */
  MF_ERR_INTERNAL = -12,        /* a bug in moeflux */
  MF_ERR_NUMERIC = -13          /* a layer produced NaN/Inf (the message names the layer and
                                   position; usually corrupt package weights). Like any failed
                                   evaluation the session is then MF_ERR_STATE_INVALID until
                                   cleared, rewound or loaded */
};

typedef struct mf_model mf_model;
typedef struct mf_session mf_session;

typedef enum mf_backend {
  MF_BACKEND_CPU = 0,
  MF_BACKEND_CUDA = 1, /* MF_ERR_UNSUPPORTED (with the reason in mf_last_error) when this build
                          has no CUDA or the machine no usable GPU */
  MF_BACKEND_AUTO = 2  /* CUDA when usable, else the CPU */
} mf_backend;

typedef enum mf_io_engine {
  MF_IO_AUTO = 0, /* io_uring when built with it and the kernel allows, else pread */
  MF_IO_PREAD = 1,
  MF_IO_URING = 2
} mf_io_engine;

typedef struct mf_model_params {
  mf_backend backend;          /* MF_BACKEND_CPU */
  int32_t threads;             /* compute threads of each session (0: one per core; more than
                                  4x the cores is MF_ERR_INVALID_ARGUMENT) */
  int64_t expert_cache_bytes;  /* expert cache budget, shared by the model's sessions:
                                  -1 = default (half the available memory after the resident
                                  weights, at most all experts), 0 = no cache */
  bool prefetch;               /* speculate the next layer's experts and read them early */
  int32_t experts_per_token;   /* routed experts per token (0: the model's top-k); fewer trades
                                  quality for bytes read. Sessions may override it. */
  int32_t io_readers;          /* expert reader threads (pread) or queue depth (io_uring),
                                  in [1, 256] */
  bool direct_io;              /* O_DIRECT reads of the expert files (bypass the page cache) */
  mf_io_engine io_engine;
  bool exact;                  /* CPU numerics on quantised weights: true (default) f32
                                  activations, the reference; false: activations quantised to
                                  int8 and integer dot products, within the quantised tolerance.
                                  Appended field: take it from mf_model_default_params() */
} mf_model_params;

typedef struct mf_session_params {
  int32_t n_ctx;                 /* positions (0: min(n_ctx_train, 4096)) */
  int32_t threads;               /* -1: the model's; 0: one per core; at most 4x the cores */
  int32_t experts_per_token;     /* -1: the model's setting; 0: the model's top-k */
  int32_t checkpoints;           /* recurrent-state checkpoints kept for mf_memory_seq_rm on models
                                    with linear attention (0: none, rewinds replay from 0) */
  int32_t checkpoint_interval;   /* tokens between checkpoints taken during decoding (0: only at
                                    the end of each multi-token eval) */
  int32_t deltanet_chunked_min;  /* prompts of at least this many tokens use the chunked Gated
                                    DeltaNet form (faster where it is; not bit-identical to the
                                    token-by-token recurrence); 0 = never, -1 = the default */
} mf_session_params;

/* "0.2.0" */
MF_API const char* mf_version(void);
/* The message of the last failed call on this thread ("" if none failed yet). Valid until the
 * next failing call on this thread. */
MF_API const char* mf_last_error(void);
/* "MF_ERR_FORMAT" for MF_ERR_FORMAT, ...; "unknown" for anything else. */
MF_API const char* mf_error_name(int code);

/* ---- models ---------------------------------------------------------------------------------- */

MF_API mf_model_params mf_model_default_params(void);
/* Loads a package directory (moeflux convert / synth output). params NULL: defaults. On failure
 * *model is set to NULL. MF_ERR_IO / MF_ERR_FORMAT name the file at fault. */
MF_API int mf_model_load(const char* path, const mf_model_params* params, mf_model** model);
MF_API void mf_model_free(mf_model* model); /* NULL is a no-op */

/* Model facts; MF_ERR_INVALID_ARGUMENT for a NULL model. */
MF_API int32_t mf_model_n_vocab(const mf_model* model);
MF_API int32_t mf_model_n_ctx_train(const mf_model* model);
MF_API int32_t mf_model_n_layers(const mf_model* model);
MF_API int32_t mf_model_n_embd(const mf_model* model);
/* The end-of-sequence token (the first if the model has several), or -1 when it has none or the
 * model is NULL. */
MF_API int32_t mf_model_eos(const mf_model* model);
/* Whether `token` is one of the model's end-of-sequence tokens. */
MF_API bool mf_model_is_eos(const mf_model* model, int32_t token);
/* Identity carried by snapshots: a hash of the manifest, resident size and norm weights. */
MF_API uint64_t mf_model_fingerprint(const mf_model* model);

/* ---- sessions -------------------------------------------------------------------------------- */

MF_API mf_session_params mf_session_default_params(void);
/* A new, empty session of `model` with its own compute backend; params NULL: defaults. */
MF_API int mf_session_new(mf_model* model, const mf_session_params* params, mf_session** session);
MF_API void mf_session_free(mf_session* session); /* NULL is a no-op */
MF_API int32_t mf_session_n_ctx(const mf_session* session);
/* Positions held (the next token goes there); MF_ERR_INVALID_ARGUMENT for NULL. */
MF_API int32_t mf_session_n_past(const mf_session* session);

/* Evaluates n tokens at the current position as one batch (prefill) and appends them. With
 * logits non-NULL it receives the last token's n_vocab logits. MF_ERR_BAD_TOKEN,
 * MF_ERR_CONTEXT_FULL and MF_ERR_INVALID_ARGUMENT (n == 0, tokens NULL) change nothing. */
MF_API int mf_eval_prompt(mf_session* session, const int32_t* tokens, size_t n, float* logits);
/* The same for one token (decode). */
MF_API int mf_eval_token(mf_session* session, int32_t token, float* logits);

/* ---- memory ---------------------------------------------------------------------------------- */

/* Forgets every position (and checkpoint); the session is as new. */
MF_API int mf_memory_clear(mf_session* session);
/* Removes positions [p0, p1) (p1 < 0: to the end) so the next token goes at p0.
 *   0 <= p0 <= n_past, and p1 < 0 or p1 >= p0, else MF_ERR_OUT_OF_RANGE.
 *   Only a tail can be removed: p0 < p1 < n_past is MF_ERR_UNSUPPORTED (nothing changes).
 *   Attention KV is cut. Linear-attention (Gated DeltaNet) state cannot be rewound: the newest
 *   checkpoint at or before p0 (or the empty state) is restored and the kept tokens after it are
 *   evaluated again, so the session holds exactly what a fresh one fed the first p0 tokens
 *   would. That re-evaluation can fail like any evaluation (MF_ERR_IO, then the session is
 *   MF_ERR_STATE_INVALID until cleared, rewound or loaded). */
MF_API int mf_memory_seq_rm(mf_session* session, int32_t p0, int32_t p1);
/* The last position holding a token (n_past - 1), -1 when empty (or session NULL). */
MF_API int32_t mf_memory_seq_pos_max(const mf_session* session);

/* ---- snapshots ------------------------------------------------------------------------------- */

/* Bytes mf_state_save writes now (0 for NULL). Grows with the position (KV rows). */
MF_API size_t mf_state_size(const mf_session* session);
/* Writes the session (positions, tokens, KV, linear state) into buf: a versioned header with the
 * model's fingerprint and an FNV-1a 64 checksum, then the payload. MF_ERR_BUFFER_TOO_SMALL when
 * size < mf_state_size (then *written, if non-NULL, is the size needed). */
MF_API int mf_state_save(mf_session* session, void* buf, size_t size, size_t* written);
/* Replaces the session's state by a snapshot. Refused, with the session unchanged:
 * MF_ERR_FORMAT (not a snapshot, another version, truncated, corrupted), MF_ERR_MODEL_MISMATCH
 * (another model, other experts per token, a context too small). */
MF_API int mf_state_load(mf_session* session, const void* buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* MOEFLUX_H */
