// The gated delta rule (Gated DeltaNet core) over T tokens by the chunked WY form, for the CPU
// backend's deltanet_chunked (engine/backend.h). The token-by-token recurrence stays in
// cpu_backend.cpp; this is the same map computed another way:
//
// In a chunk of n tokens with cumulative log-decay G_i = g_0 + ... + g_i, the n rank-1 updates of
// the recurrence collapse (UT transform, as HF's torch_chunk_gated_delta_rule) into
//   A[i][j]  = -beta_i (k_i . k_j) exp(G_i - G_j)   (j < i),  Tm = (I - A)^-1 by substitution
//   U = Tm (beta V),  W = Tm (beta exp(G) K),  V' = U - W S
//   O = (exp(G) Q) S + ((Q K^T) o exp(G_i - G_j), j <= i) V'
//   S <- exp(G_{n-1}) S + (exp(G_{n-1} - G) K)^T V'
// so the state is read and written once per chunk instead of once per token, and the work is
// small matrix products. Not bit-identical to the recurrence (the sums run in another order);
// tests/session_test.cpp bounds the difference.
#pragma once

#include <cstdint>

namespace moeflux {

// Heads [h0, h1) of the gated delta rule, token by token (the recurrence; Context::deltanet).
// Per element the same operations in the same order as the plain loop over S (decay, S^T k,
// rank-1 update, S^T q, no FMA), so decode and prefill give the same bits; the passes are fused
// per block of columns so S is read from L2 once per token instead of four times.
void deltanet_recurrent_heads(const float* qkv, const float* g, const float* beta, float* state,
                              float* out, int T, int nk, int nv, int dk, int dv, int h0, int h1);

// Heads [h0, h1) of the gated delta rule, chunked. Layout as Context::deltanet: qkv [T, C] with
// C = 2*nk*dk + nv*dv (q heads | k heads | v heads), g/beta [T, nv], state [nv, dk, dv] updated,
// out [T, nv*dv]. q and k are L2-normalised per head here and q scaled by 1/sqrt(dk), exactly
// as the recurrence does (same l2norm). PRECONDITIONS: chunk >= 1, nv % nk == 0.
void deltanet_chunked_heads(const float* qkv, const float* g, const float* beta, float* state,
                            float* out, int T, int nk, int nv, int dk, int dv, int chunk, int h0,
                            int h1);

}  // namespace moeflux
