#include "cpu/deltanet.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"

// Vectorised per target (MF_CLONES, kernels.h). No FMA contraction (-ffp-contract=off): every
// clone does the same multiplies and adds, so both forms give the same bits on every CPU.

namespace moeflux {

namespace {

typedef float v16 __attribute__((vector_size(64)));

// C[M, N] += A[M, K] * B[K, N], row-major with leading dimensions lda, ldb, ldc. Each C element
// accumulates its K terms in increasing k (the blocked and the plain loops agree bit for bit).
MF_CLONES void gemm_acc(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                        float* C, int ldc) {
  int i = 0;
  if (N % 32 == 0) {
    // 4 rows x 32 columns of C in registers while k runs; B rows are streamed.
    for (; i + 4 <= M; i += 4)
      for (int j = 0; j < N; j += 32) {
        v16 c[4][2];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
          std::memcpy(&c[r][0], C + size_t(i + r) * ldc + j, 64);
          std::memcpy(&c[r][1], C + size_t(i + r) * ldc + j + 16, 64);
        }
        for (int k = 0; k < K; k++) {
          v16 b0, b1;
          std::memcpy(&b0, B + size_t(k) * ldb + j, 64);
          std::memcpy(&b1, B + size_t(k) * ldb + j + 16, 64);
#pragma GCC unroll 4
          for (int r = 0; r < 4; r++) {
            const float a = A[size_t(i + r) * lda + k];
            c[r][0] += a * b0;
            c[r][1] += a * b1;
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
          std::memcpy(C + size_t(i + r) * ldc + j, &c[r][0], 64);
          std::memcpy(C + size_t(i + r) * ldc + j + 16, &c[r][1], 64);
        }
      }
  }
  for (; i < M; i++) {
    float* c = C + size_t(i) * ldc;
    for (int k = 0; k < K; k++) {
      const float a = A[size_t(i) * lda + k];
      const float* b = B + size_t(k) * ldb;
      for (int j = 0; j < N; j++) c[j] += a * b[j];
    }
  }
}

// One token of one head of the recurrence, in place on S [dk, dv]:
//   S *= decay; delta = (v - S^T k) * beta; S += k (outer) delta; o = S^T q
// Every element sees exactly the operations of the plain four-pass loop (cpu_backend.cpp's
// original form) in the same order: a column of S only meets its own delta and o elements, so
// the passes run per block of 64 columns, with that block's delta and o in registers and the
// block (dk x 64 floats) in L1 between the two passes.
MF_CLONES void recurrent_token(float* S, const float* qn, const float* kn, const float* v,
                               float decay, float bt, float* o, int dk, int dv) {
  int j = 0;
  for (; j + 64 <= dv; j += 64) {
    v16 d[4] = {}, acc[4] = {};
    for (int i = 0; i < dk; i++) {
      float* s = S + size_t(i) * dv + j;
      const float k = kn[i];
#pragma GCC unroll 4
      for (int u = 0; u < 4; u++) {
        v16 x;
        std::memcpy(&x, s + 16 * u, 64);
        x = x * decay;
        std::memcpy(s + 16 * u, &x, 64);
        d[u] += k * x;
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; u++) {
      v16 vv;
      std::memcpy(&vv, v + j + 16 * u, 64);
      d[u] = (vv - d[u]) * bt;
    }
    for (int i = 0; i < dk; i++) {
      float* s = S + size_t(i) * dv + j;
      const float k = kn[i], q = qn[i];
#pragma GCC unroll 4
      for (int u = 0; u < 4; u++) {
        v16 x;
        std::memcpy(&x, s + 16 * u, 64);
        x = x + k * d[u];
        std::memcpy(s + 16 * u, &x, 64);
        acc[u] += q * x;
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; u++) std::memcpy(o + j + 16 * u, &acc[u], 64);
  }
  // The columns left (dv not a multiple of 64), one at a time, same operations.
  for (; j < dv; j++) {
    float d = 0, acc = 0;
    for (int i = 0; i < dk; i++) {
      float& x = S[size_t(i) * dv + j];
      x = x * decay;
      d += kn[i] * x;
    }
    d = (v[j] - d) * bt;
    for (int i = 0; i < dk; i++) {
      float& x = S[size_t(i) * dv + j];
      x = x + kn[i] * d;
      acc += qn[i] * x;
    }
    o[j] = acc;
  }
}

}  // namespace

void deltanet_recurrent_heads(const float* qkv, const float* g, const float* beta, float* state,
                              float* out, int T, int nk, int nv, int dk, int dv, int h0, int h1) {
  const int C = 2 * nk * dk + nv * dv, ratio = nv / nk;
  const float scale = 1.0f / std::sqrt(float(dk));
  std::vector<float> qn(static_cast<size_t>(dk)), kn(static_cast<size_t>(dk));
  for (int h = h0; h < h1; h++) {
    const int kh = h / ratio;
    float* S = state + size_t(h) * dk * dv;  // [dk, dv]
    for (int t = 0; t < T; t++) {
      const float* row = qkv + size_t(t) * C;
      l2norm(row + size_t(kh) * dk, qn.data(), dk);
      l2norm(row + size_t(nk + kh) * dk, kn.data(), dk);
      for (auto& x : qn) x *= scale;
      recurrent_token(S, qn.data(), kn.data(), row + size_t(2 * nk) * dk + size_t(h) * dv,
                      std::exp(g[size_t(t) * nv + h]), beta[size_t(t) * nv + h],
                      out + size_t(t) * nv * dv + size_t(h) * dv, dk, dv);
    }
  }
}

void deltanet_chunked_heads(const float* qkv, const float* g, const float* beta, float* state,
                            float* out, int T, int nk, int nv, int dk, int dv, int chunk, int h0,
                            int h1) {
  const int C = 2 * nk * dk + nv * dv, ratio = nv / nk, L = chunk;
  const float scale = 1.0f / std::sqrt(float(dk));
  const size_t Ldk = size_t(L) * dk, Ldv = size_t(L) * dv, LL = size_t(L) * L;
  // per-chunk scratch: rows are tokens of the chunk
  std::vector<float> q(Ldk), k(Ldk), kt(Ldk), qe(Ldk), kb(Ldk), kdt(Ldk), w(Ldk);  // [L, dk]
  std::vector<float> vb(Ldv), u(Ldv), vn(Ldv), o(Ldv);                             // [L, dv]
  std::vector<float> kk(LL), qk(LL), tm(LL), p(LL);                                // [L, L]
  std::vector<float> row(static_cast<size_t>(L)), G(static_cast<size_t>(L)),
      bt(static_cast<size_t>(L));
  for (int h = h0; h < h1; h++) {
    const int kh = h / ratio;
    float* S = state + size_t(h) * dk * dv;  // [dk, dv]
    for (int c0 = 0; c0 < T; c0 += L) {
      const int n = std::min(L, T - c0);
      // Normalised q (scaled) and k of the chunk's tokens, the cumulative decay G, beta.
      std::fill(kt.begin(), kt.end(), 0.0f);
      for (int i = 0; i < n; i++) {
        const float* r = qkv + size_t(c0 + i) * C;
        float* qi = q.data() + size_t(i) * dk;
        float* ki = k.data() + size_t(i) * dk;
        l2norm(r + size_t(kh) * dk, qi, dk);
        l2norm(r + size_t(nk + kh) * dk, ki, dk);
        for (int m = 0; m < dk; m++) qi[m] *= scale;
        for (int m = 0; m < dk; m++) kt[size_t(m) * L + i] = ki[m];
        G[size_t(i)] = (i ? G[size_t(i - 1)] : 0.0f) + g[size_t(c0 + i) * nv + h];
        bt[size_t(i)] = beta[size_t(c0 + i) * nv + h];
      }
      // K K^T and Q K^T, [n, L] (columns past n are zero).
      std::fill(kk.begin(), kk.end(), 0.0f);
      std::fill(qk.begin(), qk.end(), 0.0f);
      gemm_acc(n, L, dk, k.data(), dk, kt.data(), L, kk.data(), L);
      gemm_acc(n, L, dk, q.data(), dk, kt.data(), L, qk.data(), L);
      // A (strictly lower), then Tm = (I - A)^-1 row by row: row i of Tm below the diagonal is
      // a_i + a_i * Tm[:i, :i] with a_i the original row (HF's loop).
      std::fill(tm.begin(), tm.end(), 0.0f);
      for (int i = 0; i < n; i++) {
        float* ti = tm.data() + size_t(i) * L;
        for (int j = 0; j < i; j++)
          row[size_t(j)] =
              -(bt[size_t(i)] * kk[size_t(i) * L + j]) * std::exp(G[size_t(i)] - G[size_t(j)]);
        for (int j = 0; j < i; j++) ti[j] = row[size_t(j)];
        for (int m = 1; m < i; m++) {
          const float a = row[size_t(m)];
          const float* tmr = tm.data() + size_t(m) * L;
          for (int j = 0; j < m; j++) ti[j] += a * tmr[j];
        }
        ti[i] = 1.0f;
      }
      // U = Tm (beta V), W = Tm (beta exp(G) K).
      for (int i = 0; i < n; i++) {
        const float* vi = qkv + size_t(c0 + i) * C + size_t(2 * nk) * dk + size_t(h) * dv;
        const float b = bt[size_t(i)], bg = b * std::exp(G[size_t(i)]);
        for (int j = 0; j < dv; j++) vb[size_t(i) * dv + j] = vi[j] * b;
        for (int m = 0; m < dk; m++) kb[size_t(i) * dk + m] = k[size_t(i) * dk + m] * bg;
      }
      std::fill(u.begin(), u.begin() + std::ptrdiff_t(n) * dv, 0.0f);
      std::fill(w.begin(), w.begin() + std::ptrdiff_t(n) * dk, 0.0f);
      gemm_acc(n, dv, n, tm.data(), L, vb.data(), dv, u.data(), dv);
      gemm_acc(n, dk, n, tm.data(), L, kb.data(), dk, w.data(), dk);
      // V' = U - W S.
      std::fill(vn.begin(), vn.begin() + std::ptrdiff_t(n) * dv, 0.0f);
      gemm_acc(n, dv, dk, w.data(), dk, S, dv, vn.data(), dv);
      for (size_t i = 0; i < size_t(n) * dv; i++) vn[i] = u[i] - vn[i];
      // O = (exp(G) Q) S + P V' with P = (Q K^T) o exp(G_i - G_j), j <= i.
      for (int i = 0; i < n; i++) {
        const float e = std::exp(G[size_t(i)]);
        for (int m = 0; m < dk; m++) qe[size_t(i) * dk + m] = q[size_t(i) * dk + m] * e;
        float* pi = p.data() + size_t(i) * L;
        for (int j = 0; j <= i; j++)
          pi[j] = qk[size_t(i) * L + j] * std::exp(G[size_t(i)] - G[size_t(j)]);
        for (int j = i + 1; j < n; j++) pi[j] = 0.0f;
      }
      std::fill(o.begin(), o.begin() + std::ptrdiff_t(n) * dv, 0.0f);
      gemm_acc(n, dv, dk, qe.data(), dk, S, dv, o.data(), dv);
      gemm_acc(n, dv, n, p.data(), L, vn.data(), dv, o.data(), dv);
      for (int i = 0; i < n; i++)
        std::memcpy(out + size_t(c0 + i) * nv * dv + size_t(h) * dv, o.data() + size_t(i) * dv,
                    size_t(dv) * sizeof(float));
      // S = exp(G_last) S + (exp(G_last - G) K)^T V'.
      const float glast = G[size_t(n - 1)], el = std::exp(glast);
      for (size_t i = 0; i < size_t(dk) * dv; i++) S[i] *= el;
      for (int i = 0; i < n; i++) {
        const float e = std::exp(glast - G[size_t(i)]);
        for (int m = 0; m < dk; m++) kdt[size_t(m) * L + i] = k[size_t(i) * dk + m] * e;
      }
      gemm_acc(dk, dv, n, kdt.data(), L, vn.data(), dv, S, dv);
    }
  }
}

}  // namespace moeflux
