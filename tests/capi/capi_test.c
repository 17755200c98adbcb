/* The C API from C11: every function, every error path, and the properties that matter through
 * it (prefill == token by token, seq_rm == a fresh session on the prefix, save/clear/load ==
 * never saved, sessions sharing a model from threads).
 *
 *   moeflux_capi_test <hybrid package> <attention-only package> <scratch copy of the hybrid>
 *
 * The packages are tests/data/qwen3_5_moe and tests/data/qwen3_moe converted by the CLI
 * (tests/CMakeLists.txt); the scratch copy gets its expert files truncated under a loaded model
 * to make an evaluation fail midway. Prints one line per failed check; exits non-zero if any. */
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moeflux.h"

static int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
              #cond, mf_last_error());                                              \
      g_failures++;                                                                 \
    }                                                                               \
  } while (0)

/* rc must be `code`, and an error must leave a message. */
#define CHECK_RC(expr, code)                                                              \
  do {                                                                                    \
    int rc_ = (expr);                                                                     \
    if (rc_ != (code)) {                                                                  \
      fprintf(stderr, "%s:%d: %s returned %s (%d), expected %s (last error: %s)\n", __FILE__, \
              __LINE__, #expr, mf_error_name(rc_), rc_, mf_error_name(code), mf_last_error()); \
      g_failures++;                                                                       \
    } else if ((code) != MF_OK && mf_last_error()[0] == '\0') {                           \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #expr); \
      g_failures++;                                                                       \
    }                                                                                     \
  } while (0)

static const int32_t kPrompt[] = {3, 17, 250, 9, 41, 77, 5, 123, 64, 2, 200, 31, 8, 90, 11, 150};
enum { kPromptLen = sizeof kPrompt / sizeof kPrompt[0] };

static mf_model* load(const char* path) {
  mf_model_params mp = mf_model_default_params();
  mp.threads = 2;
  mf_model* m = NULL;
  CHECK_RC(mf_model_load(path, &mp, &m), MF_OK);
  if (!m) {
    fprintf(stderr, "cannot continue without %s\n", path);
    exit(1);
  }
  return m;
}

static mf_session* new_session(mf_model* m, int32_t n_ctx) {
  mf_session_params sp = mf_session_default_params();
  sp.n_ctx = n_ctx;
  sp.threads = 1;
  mf_session* s = NULL;
  CHECK_RC(mf_session_new(m, &sp, &s), MF_OK);
  if (!s) exit(1);
  return s;
}

static float* logits_buf(const mf_model* m) {
  return calloc((size_t)mf_model_n_vocab(m), sizeof(float));
}

static int same(const float* a, const float* b, const mf_model* m) {
  return memcmp(a, b, sizeof(float) * (size_t)mf_model_n_vocab(m)) == 0;
}

static void test_misc(void) {
  CHECK(strlen(mf_version()) > 0);
  CHECK(strcmp(mf_error_name(MF_ERR_FORMAT), "MF_ERR_FORMAT") == 0);
  CHECK(strcmp(mf_error_name(MF_ERR_OUT_OF_MEMORY), "MF_ERR_OUT_OF_MEMORY") == 0);
  CHECK(strcmp(mf_error_name(MF_ERR_NUMERIC), "MF_ERR_NUMERIC") == 0);
  CHECK(strcmp(mf_error_name(12345), "unknown") == 0);
}

static void test_model(const char* path) {
  mf_model* m = (mf_model*)0x1;
  mf_model_params mp = mf_model_default_params();
  CHECK(mp.backend == MF_BACKEND_CPU && mp.expert_cache_bytes == -1 && mp.io_readers >= 1);
  CHECK_RC(mf_model_load(NULL, &mp, &m), MF_ERR_INVALID_ARGUMENT);
  CHECK(m == NULL);
  CHECK_RC(mf_model_load(path, &mp, NULL), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_model_load("/nonexistent/moeflux/package", &mp, &m), MF_ERR_IO);
  CHECK(strstr(mf_last_error(), "/nonexistent/moeflux/package") != NULL);
  CHECK(m == NULL);
  {
    mf_model_params bad = mp;
    bad.backend = MF_BACKEND_CUDA;
    {
      /* Loads on a machine with a usable GPU; elsewhere refused, saying why. */
      const int rc = mf_model_load(path, &bad, &m);
      if (rc == MF_OK) {
        mf_model_free(m);
        m = NULL;
      } else {
        CHECK_RC(rc, MF_ERR_UNSUPPORTED);
        CHECK(strstr(mf_last_error(), "cuda") != NULL || strstr(mf_last_error(), "CUDA") != NULL);
      }
    }
    bad = mp;
    bad.backend = (mf_backend)7;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    bad = mp;
    bad.threads = -1;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    bad = mp;
    bad.threads = 100000; /* more than 4x the cores */
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    CHECK(strstr(mf_last_error(), "threads = 100000 is more than") != NULL);
    bad = mp;
    bad.io_readers = 0;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    bad = mp;
    bad.expert_cache_bytes = -2;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    bad = mp;
    bad.io_engine = (mf_io_engine)9;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    bad = mp;
    bad.experts_per_token = 100000;
    CHECK_RC(mf_model_load(path, &bad, &m), MF_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
  }
  /* Every I/O setting loads (and computes the same logits: the store never changes a bit). */
  {
    float *a = NULL, *b = NULL;
    mf_model* ref = load(path);
    mf_session* s = new_session(ref, 0);
    a = logits_buf(ref);
    b = logits_buf(ref);
    CHECK_RC(mf_eval_prompt(s, kPrompt, kPromptLen, a), MF_OK);
    mf_session_free(s);
    mf_model_params other = mp;
    other.expert_cache_bytes = 0;
    other.io_readers = 3;
    other.io_engine = MF_IO_PREAD;
    other.prefetch = true;
    CHECK_RC(mf_model_load(path, &other, &m), MF_OK);
    s = new_session(m, 0);
    CHECK_RC(mf_eval_prompt(s, kPrompt, kPromptLen, b), MF_OK);
    CHECK(same(a, b, ref));
    mf_session_free(s);
    mf_model_free(m);
    /* Fewer experts per token: another result, and snapshots say so. */
    other = mp;
    other.experts_per_token = 1;
    CHECK_RC(mf_model_load(path, &other, &m), MF_OK);
    s = new_session(m, 0);
    CHECK_RC(mf_eval_prompt(s, kPrompt, kPromptLen, b), MF_OK);
    CHECK(!same(a, b, ref));
    mf_session_free(s);
    mf_model_free(m);
    mf_model_free(ref);
    free(a);
    free(b);
  }
  m = load(path);
  CHECK(mf_model_n_vocab(m) > 250);
  CHECK(mf_model_n_ctx_train(m) > 0);
  CHECK(mf_model_n_layers(m) > 0);
  CHECK(mf_model_n_embd(m) > 0);
  CHECK(mf_model_eos(m) >= -1 && mf_model_eos(m) < mf_model_n_vocab(m));
  if (mf_model_eos(m) >= 0) CHECK(mf_model_is_eos(m, mf_model_eos(m)));
  CHECK(!mf_model_is_eos(m, -7));
  CHECK(mf_model_fingerprint(m) != 0);
  CHECK(mf_model_n_vocab(NULL) == MF_ERR_INVALID_ARGUMENT);
  CHECK(mf_model_n_ctx_train(NULL) == MF_ERR_INVALID_ARGUMENT);
  CHECK(mf_model_n_layers(NULL) == MF_ERR_INVALID_ARGUMENT);
  CHECK(mf_model_n_embd(NULL) == MF_ERR_INVALID_ARGUMENT);
  CHECK(mf_model_eos(NULL) == -1);
  CHECK(!mf_model_is_eos(NULL, 0));
  CHECK(mf_model_fingerprint(NULL) == 0);
  mf_model_free(m);
  mf_model_free(NULL);
}

static void test_session_and_eval(mf_model* m) {
  mf_session* s = (mf_session*)0x1;
  mf_session_params sp = mf_session_default_params();
  CHECK(sp.n_ctx == 0 && sp.threads == -1 && sp.checkpoints >= 0);
  CHECK_RC(mf_session_new(NULL, &sp, &s), MF_ERR_INVALID_ARGUMENT);
  CHECK(s == NULL);
  CHECK_RC(mf_session_new(m, &sp, NULL), MF_ERR_INVALID_ARGUMENT);
  {
    mf_session_params bad = sp;
    bad.n_ctx = -1;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.threads = -2;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.threads = 100000;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.experts_per_token = 100000;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.checkpoints = -1;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.checkpoint_interval = -1;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    bad = sp;
    bad.deltanet_chunked_min = -2;
    CHECK_RC(mf_session_new(m, &bad, &s), MF_ERR_INVALID_ARGUMENT);
    CHECK(s == NULL);
  }
  CHECK_RC(mf_session_new(m, NULL, &s), MF_OK); /* defaults */
  CHECK(mf_session_n_ctx(s) > 0);
  mf_session_free(s);
  mf_session_free(NULL);
  CHECK(mf_session_n_ctx(NULL) == MF_ERR_INVALID_ARGUMENT);
  CHECK(mf_session_n_past(NULL) == MF_ERR_INVALID_ARGUMENT);

  s = new_session(m, 32);
  float* a = logits_buf(m);
  float* b = logits_buf(m);
  const int32_t V = mf_model_n_vocab(m);
  CHECK(mf_session_n_ctx(s) == 32);
  CHECK_RC(mf_eval_prompt(NULL, kPrompt, 3, a), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_eval_prompt(s, NULL, 3, a), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_eval_prompt(s, kPrompt, 0, a), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_eval_token(NULL, 3, a), MF_ERR_INVALID_ARGUMENT);
  {
    const int32_t bad1[] = {3, -1, 5};
    const int32_t bad2[] = {3, 4, V};
    CHECK_RC(mf_eval_prompt(s, bad1, 3, a), MF_ERR_BAD_TOKEN);
    CHECK_RC(mf_eval_prompt(s, bad2, 3, a), MF_ERR_BAD_TOKEN);
    CHECK(strstr(mf_last_error(), "position 2") != NULL);
    CHECK_RC(mf_eval_token(s, V, a), MF_ERR_BAD_TOKEN);
    CHECK_RC(mf_eval_token(s, -3, a), MF_ERR_BAD_TOKEN);
  }
  CHECK(mf_session_n_past(s) == 0);
  {
    int32_t too_many[33];
    for (int i = 0; i < 33; i++) too_many[i] = i;
    CHECK_RC(mf_eval_prompt(s, too_many, 33, a), MF_ERR_CONTEXT_FULL);
    CHECK(mf_session_n_past(s) == 0);
    CHECK_RC(mf_eval_prompt(s, too_many, 32, NULL), MF_OK); /* exactly full; no logits wanted */
    CHECK(mf_session_n_past(s) == 32);
    CHECK_RC(mf_eval_token(s, 1, a), MF_ERR_CONTEXT_FULL);
  }
  /* Prefill == token by token, bit for bit (the recurrence; the default threshold). */
  CHECK_RC(mf_memory_clear(s), MF_OK);
  CHECK(mf_session_n_past(s) == 0 && mf_memory_seq_pos_max(s) == -1);
  CHECK_RC(mf_eval_prompt(s, kPrompt, kPromptLen, a), MF_OK);
  CHECK(mf_session_n_past(s) == kPromptLen);
  CHECK(mf_memory_seq_pos_max(s) == kPromptLen - 1);
  CHECK_RC(mf_memory_clear(s), MF_OK);
  for (int i = 0; i < kPromptLen; i++)
    CHECK_RC(mf_eval_token(s, kPrompt[i], i + 1 == kPromptLen ? b : NULL), MF_OK);
  CHECK(same(a, b, m));
  CHECK_RC(mf_memory_clear(NULL), MF_ERR_INVALID_ARGUMENT);
  mf_session_free(s);
  free(a);
  free(b);
}

/* Logits after `n` prompt tokens then `next`, on a fresh session. */
static void fresh_logits(mf_model* m, int n, int32_t next, float* out) {
  mf_session* f = new_session(m, 64);
  if (n > 0) CHECK_RC(mf_eval_prompt(f, kPrompt, (size_t)n, NULL), MF_OK);
  CHECK_RC(mf_eval_token(f, next, out), MF_OK);
  mf_session_free(f);
}

static void test_memory(mf_model* m, int hybrid) {
  mf_session* s = new_session(m, 64);
  float* a = logits_buf(m);
  float* b = logits_buf(m);
  CHECK(mf_memory_seq_pos_max(NULL) == -1);
  CHECK_RC(mf_memory_seq_rm(NULL, 0, -1), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_eval_prompt(s, kPrompt, 10, NULL), MF_OK);
  for (int i = 10; i < kPromptLen; i++) CHECK_RC(mf_eval_token(s, kPrompt[i], NULL), MF_OK);
  CHECK_RC(mf_memory_seq_rm(s, -1, -1), MF_ERR_OUT_OF_RANGE);
  CHECK_RC(mf_memory_seq_rm(s, kPromptLen + 1, -1), MF_ERR_OUT_OF_RANGE);
  CHECK_RC(mf_memory_seq_rm(s, 5, 4), MF_ERR_OUT_OF_RANGE);
  CHECK_RC(mf_memory_seq_rm(s, 5, 8), MF_ERR_UNSUPPORTED); /* a middle range */
  CHECK(strstr(mf_last_error(), "middle") != NULL);
  CHECK(mf_session_n_past(s) == kPromptLen);
  CHECK_RC(mf_memory_seq_rm(s, 5, 5), MF_OK);                    /* empty */
  CHECK_RC(mf_memory_seq_rm(s, kPromptLen, -1), MF_OK);          /* empty */
  CHECK(mf_session_n_past(s) == kPromptLen);
  /* Rewind to several points (between, at and before checkpoints), continue, compare. */
  const int points[] = {13, 10, 7, 0};
  for (int i = 0; i < 4; i++) {
    const int p0 = points[i];
    CHECK_RC(mf_memory_seq_rm(s, p0, i % 2 ? 1000 : -1), MF_OK);
    CHECK(mf_session_n_past(s) == p0);
    CHECK(mf_memory_seq_pos_max(s) == p0 - 1);
    CHECK_RC(mf_eval_token(s, 99, a), MF_OK);
    fresh_logits(m, p0, 99, b);
    CHECK(same(a, b, m));
    /* back to the whole prompt for the next point */
    CHECK_RC(mf_memory_seq_rm(s, p0, -1), MF_OK);
    CHECK_RC(mf_eval_prompt(s, kPrompt + p0, (size_t)(kPromptLen - p0), NULL), MF_OK);
    CHECK(mf_session_n_past(s) == kPromptLen);
  }
  /* Without checkpoints a hybrid model replays from 0: the same bits, just slower. */
  {
    mf_session_params sp = mf_session_default_params();
    sp.checkpoints = 0;
    sp.threads = 1;
    mf_session* n = NULL;
    CHECK_RC(mf_session_new(m, &sp, &n), MF_OK);
    CHECK_RC(mf_eval_prompt(n, kPrompt, kPromptLen, NULL), MF_OK);
    CHECK_RC(mf_memory_seq_rm(n, 9, -1), MF_OK);
    CHECK_RC(mf_eval_token(n, 99, a), MF_OK);
    fresh_logits(m, 9, 99, b);
    CHECK(same(a, b, m));
    mf_session_free(n);
  }
  CHECK_RC(mf_memory_clear(s), MF_OK);
  CHECK(mf_session_n_past(s) == 0 && mf_memory_seq_pos_max(s) == -1);
  CHECK_RC(mf_eval_token(s, 99, a), MF_OK);
  fresh_logits(m, 0, 99, b);
  CHECK(same(a, b, m));
  (void)hybrid;
  mf_session_free(s);
  free(a);
  free(b);
}

static void test_state(mf_model* m, mf_model* other) {
  mf_session* s = new_session(m, 64);
  float* a = logits_buf(m);
  float* b = logits_buf(m);
  size_t written = 123;
  CHECK(mf_state_size(NULL) == 0);
  CHECK_RC(mf_state_save(NULL, a, 10, &written), MF_ERR_INVALID_ARGUMENT);
  CHECK(written == 0);
  CHECK_RC(mf_state_load(NULL, a, 10), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_state_load(s, NULL, 10), MF_ERR_INVALID_ARGUMENT);

  const size_t empty = mf_state_size(s);
  CHECK(empty >= 64);
  CHECK_RC(mf_eval_prompt(s, kPrompt, 12, NULL), MF_OK);
  const size_t n = mf_state_size(s);
  CHECK(n > empty);
  unsigned char* snap = malloc(n + 16);
  CHECK_RC(mf_state_save(s, snap, n - 1, &written), MF_ERR_BUFFER_TOO_SMALL);
  CHECK(written == n);
  CHECK_RC(mf_state_save(s, NULL, n, &written), MF_ERR_INVALID_ARGUMENT);
  CHECK_RC(mf_state_save(s, snap + 1, n, &written), MF_OK); /* unaligned is fine */
  CHECK(written == n);
  memmove(snap, snap + 1, n);
  CHECK_RC(mf_state_save(s, snap, n + 16, NULL), MF_OK);

  /* never saved: the next token */
  CHECK_RC(mf_eval_token(s, kPrompt[12], a), MF_OK);
  /* save -> clear -> load -> next token */
  CHECK_RC(mf_memory_clear(s), MF_OK);
  CHECK_RC(mf_eval_prompt(s, kPrompt + 3, 5, NULL), MF_OK);
  CHECK_RC(mf_state_load(s, snap, n), MF_OK);
  CHECK(mf_session_n_past(s) == 12);
  CHECK_RC(mf_eval_token(s, kPrompt[12], b), MF_OK);
  CHECK(same(a, b, m));

  /* Bad snapshots: refused, and the session continues as if nothing happened. */
  CHECK_RC(mf_memory_seq_rm(s, 12, -1), MF_OK);
  CHECK_RC(mf_state_load(s, snap, 10), MF_ERR_FORMAT);  /* shorter than the header */
  CHECK_RC(mf_state_load(s, snap, n - 1), MF_ERR_FORMAT); /* truncated */
  CHECK(strstr(mf_last_error(), "truncated") != NULL);
  CHECK_RC(mf_state_load(s, snap, n + 1), MF_ERR_FORMAT); /* trailing byte */
  snap[n / 2] ^= 0x10;
  CHECK_RC(mf_state_load(s, snap, n), MF_ERR_FORMAT);     /* corrupted */
  CHECK(strstr(mf_last_error(), "checksum") != NULL);
  snap[n / 2] ^= 0x10;
  snap[0] ^= 1;
  CHECK_RC(mf_state_load(s, snap, n), MF_ERR_FORMAT);     /* not a snapshot */
  snap[0] ^= 1;
  snap[8] ^= 2;
  CHECK_RC(mf_state_load(s, snap, n), MF_ERR_FORMAT);     /* another version */
  CHECK(strstr(mf_last_error(), "version") != NULL);
  snap[8] ^= 2;
  CHECK(mf_session_n_past(s) == 12);
  CHECK_RC(mf_eval_token(s, kPrompt[12], b), MF_OK);
  CHECK(same(a, b, m));
  {
    /* another model */
    mf_session* o = new_session(other, 64);
    CHECK_RC(mf_state_load(o, snap, n), MF_ERR_MODEL_MISMATCH);
    CHECK(mf_session_n_past(o) == 0);
    mf_session_free(o);
    /* a context too small for it */
    o = new_session(m, 8);
    CHECK_RC(mf_state_load(o, snap, n), MF_ERR_MODEL_MISMATCH);
    mf_session_free(o);
    /* a larger one is fine */
    o = new_session(m, 200);
    CHECK_RC(mf_state_load(o, snap, n), MF_OK);
    CHECK_RC(mf_eval_token(o, kPrompt[12], b), MF_OK);
    CHECK(same(a, b, m));
    mf_session_free(o);
  }
  free(snap);
  mf_session_free(s);
  free(a);
  free(b);
}

/* Several sessions of one model (one expert cache), one per thread, at once. */
typedef struct {
  mf_model* model;
  float* logits;
  int rc;
} worker_arg;

static void* worker(void* p) {
  worker_arg* w = p;
  mf_session_params sp = mf_session_default_params();
  sp.threads = 1;
  sp.n_ctx = 64;
  mf_session* s = NULL;
  w->rc = mf_session_new(w->model, &sp, &s);
  if (w->rc) return NULL;
  for (int round = 0; round < 3 && !w->rc; round++) {
    w->rc = mf_eval_prompt(s, kPrompt, 8, NULL);
    for (int i = 8; i < kPromptLen && !w->rc; i++)
      w->rc = mf_eval_token(s, kPrompt[i], w->logits);
    if (!w->rc) w->rc = mf_memory_seq_rm(s, 4, -1);
    if (!w->rc) w->rc = mf_memory_clear(s);
  }
  if (!w->rc) w->rc = mf_eval_prompt(s, kPrompt, kPromptLen, w->logits);
  mf_session_free(s);
  return NULL;
}

static void test_threads(const char* path) {
  mf_model_params mp = mf_model_default_params();
  mp.threads = 1;
  mp.prefetch = true;
  mf_model* m = NULL;
  CHECK_RC(mf_model_load(path, &mp, &m), MF_OK);
  if (!m) return;
  float* want = logits_buf(m);
  mf_session* s = new_session(m, 64);
  CHECK_RC(mf_eval_prompt(s, kPrompt, kPromptLen, want), MF_OK);
  mf_session_free(s);
  enum { kThreads = 4 };
  pthread_t th[kThreads];
  worker_arg args[kThreads];
  for (int i = 0; i < kThreads; i++) {
    args[i].model = m;
    args[i].logits = logits_buf(m);
    args[i].rc = -100;
    CHECK(pthread_create(&th[i], NULL, worker, &args[i]) == 0);
  }
  for (int i = 0; i < kThreads; i++) {
    pthread_join(th[i], NULL);
    CHECK_RC(args[i].rc, MF_OK);
    CHECK(same(want, args[i].logits, m));
    free(args[i].logits);
  }
  free(want);
  mf_model_free(m);
}

/* Expert files truncated under a loaded model (no cache): an evaluation fails midway. */
static void test_failed_eval(const char* scratch) {
  mf_model_params mp = mf_model_default_params();
  mp.threads = 1;
  mp.expert_cache_bytes = 0;
  mf_model* m = NULL;
  CHECK_RC(mf_model_load(scratch, &mp, &m), MF_OK);
  if (!m) return;
  float* a = logits_buf(m);
  mf_session* s = new_session(m, 64);
  CHECK_RC(mf_eval_prompt(s, kPrompt, 10, NULL), MF_OK); /* checkpoint at 10 */
  const size_t n = mf_state_size(s);
  void* snap = malloc(n);
  CHECK_RC(mf_state_save(s, snap, n, NULL), MF_OK);
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/experts", scratch);
  DIR* d = opendir(dir);
  CHECK(d != NULL);
  if (d) {
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.') continue;
      char f[8192];
      snprintf(f, sizeof f, "%s/%s", dir, e->d_name);
      CHECK(truncate(f, 0) == 0);
    }
    closedir(d);
  }
  CHECK_RC(mf_eval_token(s, 5, a), MF_ERR_IO);
  CHECK(mf_session_n_past(s) == 10);
  CHECK_RC(mf_eval_token(s, 5, a), MF_ERR_STATE_INVALID);
  CHECK_RC(mf_eval_prompt(s, kPrompt, 3, a), MF_ERR_STATE_INVALID);
  CHECK_RC(mf_state_save(s, snap, n, NULL), MF_ERR_STATE_INVALID);
  /* Rewinding to a checkpoint (no replay needed) or loading a snapshot makes it valid again. */
  CHECK_RC(mf_memory_seq_rm(s, 10, -1), MF_OK);
  CHECK_RC(mf_state_save(s, snap, n, NULL), MF_OK);
  CHECK_RC(mf_eval_token(s, 5, a), MF_ERR_IO);
  CHECK_RC(mf_state_load(s, snap, n), MF_OK);
  CHECK_RC(mf_eval_token(s, 5, a), MF_ERR_IO);
  /* A rewind that must replay tokens fails like an evaluation (the files are gone). */
  CHECK_RC(mf_memory_seq_rm(s, 7, -1), MF_ERR_IO);
  CHECK_RC(mf_eval_token(s, 5, a), MF_ERR_STATE_INVALID);
  CHECK_RC(mf_memory_clear(s), MF_OK);
  CHECK(mf_session_n_past(s) == 0);
  free(snap);
  free(a);
  mf_session_free(s);
  mf_model_free(m);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s <hybrid package> <attention-only package> <scratch package>\n",
            argv[0]);
    return 2;
  }
  test_misc();
  test_model(argv[1]);
  mf_model* hybrid = load(argv[1]);
  mf_model* attn = load(argv[2]);
  test_session_and_eval(hybrid);
  test_session_and_eval(attn);
  test_memory(hybrid, 1);
  test_memory(attn, 0);
  test_state(hybrid, attn);
  test_state(attn, hybrid);
  test_threads(argv[1]);
  test_failed_eval(argv[3]);
  mf_model_free(hybrid);
  mf_model_free(attn);
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("capi_test: all checks passed\n");
  return g_failures ? 1 : 0;
}
