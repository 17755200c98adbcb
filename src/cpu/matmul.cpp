// matmul_rows: a scalar reference, an AVX2+FMA+F16C path and an AVX-512 (F+BW) path, all with
// the one summation order described in matmul.h, so they are bit-identical to each other.
//
// Every SIMD path has two drivers over the same arithmetic:
//   * stream (small T, the decode case): R rows at a time; each 16-column chunk of each row is
//     made f32 in registers (loaded, widened or dequantised) and FMA'd into the U tokens' lane
//     accumulators. At T = 1 this is a pure streaming read of the weights; R independent rows
//     give R independent FMA chains, which hide the FMA latency (one output's lanes are one
//     serial chain by definition).
//   * panel (larger T, prefill): a panel of rows is widened/dequantised once into an f32
//     scratch that stays in L2, then a register-blocked R x U micro-kernel runs every token
//     over it, so dequantisation is paid once per weight, not once per token.
// Both produce, per (row, token, lane), the same FMA sequence on the same f32 weights, then the
// same reduction tree, so which driver ran (which depends on T) never shows in the bits.
#include "cpu/matmul.h"

// GCC 12's AVX-512 headers build their "undefined" vectors as `__m512 __Y = __Y;`, which its own
// -Wuninitialized then reports at every use (GCC PR 105593, fixed in 13). Clang has no
// -Wmaybe-uninitialized (and no such report).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "format/mxfp4.h"
#include "format/quant.h"
#include "util/error.h"
#include "util/half.h"

namespace moeflux {

namespace {

constexpr int kLanes = 16;

// Loops over the R rows / U tokens of a register block carry `#pragma GCC unroll`: they must be
// unrolled for their accumulators to live in registers, and -O2 does not do it by itself.

// The rows of a weight matrix, whatever its dtype. Row r of a quantised matrix: words
// data + r*words_per_row, scales/biases + r*groups_per_row. MXFP4 reads as a 4-bit quantised
// matrix with groups of 32 (its nibbles are packed LSB-first like q4's codes) whose group
// parameter is the e8m0 scale (e8m0 + r*groups_per_row) instead of a bf16 scale and bias.
struct WeightView {
  DType dtype;
  int bits;  // 8/4/2 for quantised, 4 for mxfp4, 0 for float dtypes
  int group;
  int64_t cols;
  const void* data;
  const uint16_t* scales;
  const uint16_t* biases;
  const uint8_t* e8m0;
  int64_t words_per_row, groups_per_row;

  explicit WeightView(const Mat& W)
      : dtype(W.dtype),
        bits(is_quant_dtype(W.dtype) ? quant_bits(W.dtype) : W.dtype == DType::kMxfp4 ? 4 : 0),
        group(W.dtype == DType::kMxfp4 ? kMxfp4Group : W.group),
        cols(W.cols),
        data(W.data),
        scales(W.scales),
        biases(W.biases),
        e8m0(W.dtype == DType::kMxfp4 ? W.e8m0 : nullptr) {
    words_per_row = bits ? cols * bits / 32 : 0;
    groups_per_row = bits ? cols / group : 0;
  }
  const float* f32_row(int64_t r) const { return static_cast<const float*>(data) + r * cols; }
  const uint16_t* u16_row(int64_t r) const { return static_cast<const uint16_t*>(data) + r * cols; }
  const uint32_t* q_row(int64_t r) const {
    return static_cast<const uint32_t*>(data) + r * words_per_row;
  }
  const uint16_t* s_row(int64_t r) const { return scales + r * groups_per_row; }
  const uint16_t* b_row(int64_t r) const { return biases + r * groups_per_row; }
  const uint8_t* e_row(int64_t r) const { return e8m0 + r * groups_per_row; }
};

// Exact f32 values of one row (dequantize_row for quantised dtypes: the definition).
void widen_row_scalar(const WeightView& w, int64_t r, float* out) {
  switch (w.dtype) {
    case DType::kF32:
      std::memcpy(out, w.f32_row(r), size_t(w.cols) * sizeof(float));
      return;
    case DType::kBF16:
      for (int64_t c = 0; c < w.cols; c++) out[c] = bf16_to_f32(w.u16_row(r)[c]);
      return;
    case DType::kF16:
      for (int64_t c = 0; c < w.cols; c++) out[c] = f16_to_f32(w.u16_row(r)[c]);
      return;
    case DType::kMxfp4:
      mxfp4_dequantize_row(static_cast<const uint8_t*>(w.data) + r * w.cols / 2, w.e_row(r), w.cols,
                           out);
      return;
    default:
      dequantize_row(w.q_row(r), w.s_row(r), w.b_row(r), w.cols, w.bits, w.group, out);
  }
}

// Starts loading the bf16 scales and biases of rows [r, r1) into cache. The stream drivers call
// it for the next block of rows before working on the current one: read on demand, each block's
// few KiB of parameters were a cold miss the hardware prefetchers had not seen coming
// (bf16_to_f32 was ~9% of decode time).
void prefetch_group_params(const WeightView& wv, int64_t r, int64_t r1) {
  if (r >= r1) return;
  if (wv.e8m0) {
    const auto* e = reinterpret_cast<const char*>(wv.e_row(r));
    for (int64_t o = 0; o < (r1 - r) * wv.groups_per_row; o += 64) _mm_prefetch(e + o, _MM_HINT_T0);
    return;
  }
  const auto* s = reinterpret_cast<const char*>(wv.s_row(r));
  const auto* b = reinterpret_cast<const char*>(wv.b_row(r));
  const int64_t bytes = (r1 - r) * wv.groups_per_row * int64_t(sizeof(uint16_t));
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(s + o, _MM_HINT_T0);
    _mm_prefetch(b + o, _MM_HINT_T0);
  }
}

// Per-thread f32 scratch buffers: a row (scalar path) or a panel (SIMD mat-mul), the f32 scales
// and biases of a block of quantised rows, and a packed block of tokens.
enum ScratchSlot { kPanelScratch, kParamScratch, kXScratch };
float* scratch(ScratchSlot slot, size_t n) {
  thread_local std::vector<float> buf[3];
  if (buf[slot].size() < n) buf[slot].resize(n);
  return buf[slot].data();
}

// ---------------------------------------------------------------------------------------------
// Scalar reference.

float reduce_lanes_scalar(float* a) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; j++) a[j] = a[j] + a[j + w];
  return a[0];
}

float dot_lanes_scalar(const float* w, const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] = std::fma(w[c + j], x[c + j], acc[j]);
  for (int j = 0; c + j < n; j++) acc[j] = std::fma(w[c + j], x[c + j], acc[j]);
  return reduce_lanes_scalar(acc);
}

void matmul_scalar(const Mat& W, int64_t r0, int64_t r1, const float* x, int T, float* y,
                   int64_t ys) {
  const WeightView wv(W);
  float* row = W.dtype == DType::kF32 ? nullptr : scratch(kPanelScratch, size_t(W.cols));
  for (int64_t r = r0; r < r1; r++) {
    const float* w = row ? row : wv.f32_row(r);
    if (row) widen_row_scalar(wv, r, row);
    for (int t = 0; t < T; t++) y[t * ys + r] = dot_lanes_scalar(w, x + t * W.cols, W.cols);
  }
}

// Rows per panel of the SIMD mat-mul drivers: the f32 panel (rows x cols) about 256 KiB so it
// stays in L2 while every token block runs over it; a multiple of 4 (the micro-kernel's R).
int64_t panel_rows(int64_t cols) {
  const int64_t r = (int64_t(256) << 10) / (std::max<int64_t>(cols, 1) * 4);
  return std::clamp<int64_t>(r / 4 * 4, 4, 64);
}

int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// ---------------------------------------------------------------------------------------------
// Quantised weights on the SIMD paths.
//
// Code q of a group decodes to fl(fl(q * s) + b) (dequantize_row). q * s is exact in f32 (q has
// at most 8 significant bits and s, a bf16, 8), so that equals fl(q * s + b) = fma(q, s, b): one
// instruction, the same bits. (Only a q * s that overflows f32 would differ; no scale written by
// quantize_rows comes near.) q4 and q2 go further: a group has only 16 (4) distinct weights, so
// they are decoded once per group into a 16-lane table and each weight is a table lookup.

// Scales and biases of a block of quantised rows as f32, [rows * groups_per_row] each, so the
// kernels broadcast them straight from memory.
struct GroupParams {
  const float* s;
  const float* b;
};

// e8m0 scale bytes as f32 (e8m0_scale's bits): 2^(e - 127) is the f32 with exponent field e
// for e in [1, 254]; e = 0 is the subnormal 2^-127; 255 is NaN.
void e8m0_to_f32(const uint8_t* e, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) {
    const uint32_t v = e[i];
    const uint32_t bits = v == 0 ? 0x00400000u : v == 255 ? 0x7fc00000u : v << 23;
    std::memcpy(out + i, &bits, sizeof bits);
  }
}

// Stream drivers take rows in blocks of this many for one GroupParams conversion.
constexpr int64_t kParamRows = 64;
// The quantised stream kernels prefetch the rows this many R-row blocks ahead.
constexpr int kPrefetchBlocks = 2;

// ---------------------------------------------------------------------------------------------
// AVX-512 (F + BW). One zmm = one output's 16 lanes.

#define MF_AVX512 __attribute__((target("avx512f,avx512bw")))

// 16 columns [c, c+16) of a float row as exact f32.
struct F32x16 {
  using Elem = float;
  MF_AVX512 static __m512 load(const float* p, int64_t c) { return _mm512_loadu_ps(p + c); }
  static float scalar(float v) { return v; }
};
struct Bf16x16 {
  using Elem = uint16_t;
  MF_AVX512 static __m512 load(const uint16_t* p, int64_t c) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static float scalar(uint16_t v) { return bf16_to_f32(v); }
};
struct F16x16 {
  using Elem = uint16_t;
  MF_AVX512 static __m512 load(const uint16_t* p, int64_t c) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c)));
  }
  static float scalar(uint16_t v) { return f16_to_f32(v); }
};

// Decoders of the 16 columns [c, c+16) of a packed row (c a multiple of 16), given the group's
// decoded state. kPermuted: lane j holds column pi(j) = 8 * (j % 2) + j / 2 of the chunk rather
// than column j (see Q4x16); the kernels then permute x the same way and the sums back.
struct Q8x16 {
  static constexpr int kBits = 8;
  static constexpr bool kPermuted = false;
  struct Group {
    __m512 s, b;
  };
  MF_AVX512 static Group group(float s, float b) { return {_mm512_set1_ps(s), _mm512_set1_ps(b)}; }
  MF_AVX512 static __m512 weights(const uint32_t* p, int64_t c, const Group& g) {
    const __m128i v =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(p) + c));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), g.s, g.b);
  }
};
struct Q4x16 {
  // The chunk's two words are broadcast to every qword; lane j takes word j % 2 shifted right
  // by 4 * (j / 2): no cross-lane shuffle, and vpermps looks the code up in the group's table
  // using only the low 4 bits of the lane, so no mask either.
  static constexpr int kBits = 4;
  static constexpr bool kPermuted = true;
  struct Group {
    __m512 table;
  };
  MF_AVX512 static Group group(float s, float b) {
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return {_mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b))};
  }
  MF_AVX512 static __m512 weights(const uint32_t* p, int64_t c, const Group& g) {
    long long two;
    std::memcpy(&two, p + uint64_t(c) / 8, sizeof two);
    const __m512i sh = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(two), sh), g.table);
  }
};
struct Q2x16 {
  // One word holds the chunk; lane j shifted by 2j has its code in bits 0-1 and the next code's
  // in bits 2-3, so the table repeats its 4 values.
  static constexpr int kBits = 2;
  static constexpr bool kPermuted = false;
  struct Group {
    __m512 table;
  };
  MF_AVX512 static Group group(float s, float b) {
    const __m512 q = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    return {_mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b))};
  }
  MF_AVX512 static __m512 weights(const uint32_t* p, int64_t c, const Group& g) {
    const __m512i sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(int(p[uint64_t(c) / 16])), sh),
                                 g.table);
  }
};

// MXFP4 as Q4x16 reads q4: the same nibble order and lane permutation, the group's table the 16
// e2m1 values times its scale (exact in f32, as mxfp4_dequantize_row makes them); `s` is the
// scale as f32 (e8m0_to_f32), b unused.
struct Mx4x16 {
  static constexpr int kBits = 4;
  static constexpr bool kPermuted = true;
  struct Group {
    __m512 table;
  };
  MF_AVX512 static Group group(float s, float) {
    return {_mm512_mul_ps(_mm512_loadu_ps(kE2m1Values), _mm512_set1_ps(s))};
  }
  MF_AVX512 static __m512 weights(const uint32_t* p, int64_t c, const Group& g) {
    return Q4x16::weights(p, c, Q4x16::Group{g.table});
  }
};

// x in pi order (lane j = column pi(j)), and a pi-ordered vector back to column order.
MF_AVX512 inline __m512 to_pi_512(__m512 v) {
  return _mm512_permutexvar_ps(
      _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0), v);
}
MF_AVX512 inline __m512 from_pi_512(__m512 v) {
  return _mm512_permutexvar_ps(
      _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0), v);
}

// The lane tree of matmul.h on one vector.
MF_AVX512 inline float reduce_512(__m512 a) {
  const __m256 lo = _mm512_castps512_ps256(a);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  const __m256 b = _mm256_add_ps(lo, hi);                                               // +8
  const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));  // +4
  const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));                                  // +2
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));                         // +1
}

// The same tree on 16 vectors at once (shuffles shared between outputs): out[k] = tree(v[k]).
MF_AVX512 inline void reduce16_512(const __m512* v, float* out) {
  __m512 l1[8], l2[4], l3[2];
#pragma GCC unroll 32
  for (int k = 0; k < 8; k++) {  // [a0..7 | b0..7] + [a8..15 | b8..15]
    const __m512 a = v[2 * k], b = v[2 * k + 1];
    l1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  }
#pragma GCC unroll 32
  for (int k = 0; k < 4; k++) {  // quarters [a, b, c, d]: lanes 0-3 + lanes 4-7 of each
    const __m512 a = l1[2 * k], b = l1[2 * k + 1];
    l2[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
  }
#pragma GCC unroll 32
  for (int k = 0; k < 2; k++) {  // in each quarter: [x0+x2, x1+x3, y0+y2, y1+y3]
    const __m512 a = l2[2 * k], b = l2[2 * k + 1];
    l3[k] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xee));
  }
  const __m512 r =
      _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88), _mm512_shuffle_ps(l3[0], l3[1], 0xdd));
  // Quarter q of r holds, in order, the outputs of v[q], v[q+4], v[q+8], v[q+12].
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, r);
#pragma GCC unroll 32
  for (int q = 0; q < 4; q++)
#pragma GCC unroll 32
    for (int i = 0; i < 4; i++) out[q + 4 * i] = tmp[4 * q + i];
}

// y[u*ys + i] = tree(acc[i*U + u]) for an R x U block.
template <int R, int U>
MF_AVX512 inline void store_block_512(const __m512* acc, float* y, int64_t ys) {
  constexpr int N = R * U;
  if constexpr (N >= 8) {
    float out[16 * ((N + 15) / 16)];
#pragma GCC unroll 32
    for (int k0 = 0; k0 < N; k0 += 16) {
      __m512 v[16];
#pragma GCC unroll 32
      for (int k = 0; k < 16; k++) v[k] = k0 + k < N ? acc[k0 + k] : _mm512_setzero_ps();
      reduce16_512(v, out + k0);
    }
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) y[u * ys + i] = out[i * U + u];
  } else {
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) y[u * ys + i] = reduce_512(acc[i * U + u]);
  }
}

// R float rows (row i at w + i*ld) times U tokens (token u at x + u*n): the stream kernel.
template <class D, int R, int U>
MF_AVX512 void block_float_512(const typename D::Elem* w, int64_t ld, int64_t n, const float* x,
                               float* y, int64_t ys) {
  __m512 acc[R * U];
#pragma GCC unroll 32
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    __m512 xv[U];
#pragma GCC unroll 32
    for (int u = 0; u < U; u++) xv[u] = _mm512_loadu_ps(x + u * n + c);
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      const __m512 wv = D::load(w + i * ld, c);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) acc[i * U + u] = _mm512_fmadd_ps(wv, xv[u], acc[i * U + u]);
    }
  }
  if (c < n) {  // masked lanes keep their sums untouched (a +0 term would turn -0 into +0)
    const int m = int(n - c);
    const __mmask16 k = __mmask16((1u << m) - 1);
    __m512 xv[U];
#pragma GCC unroll 32
    for (int u = 0; u < U; u++) xv[u] = _mm512_maskz_loadu_ps(k, x + u * n + c);
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      float wt[kLanes] = {};
      for (int j = 0; j < m; j++) wt[j] = D::scalar(w[i * ld + c + j]);
      const __m512 wv = _mm512_loadu_ps(wt);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++)
        acc[i * U + u] = _mm512_mask3_fmadd_ps(wv, xv[u], acc[i * U + u], k);
    }
  }
  store_block_512<R, U>(acc, y, ys);
}

MF_AVX512 void bf16_to_f32_512(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) _mm512_storeu_ps(out + i, Bf16x16::load(in, i));
  for (; i < n; i++) out[i] = bf16_to_f32(in[i]);
}

MF_AVX512 GroupParams group_params_512(const WeightView& wv, int64_t r, int64_t rows) {
  const int64_t n = rows * wv.groups_per_row;
  float* out = scratch(kParamScratch, size_t(2 * n));
  if (wv.e8m0) {
    e8m0_to_f32(wv.e_row(r), n, out);
    return {out, out};
  }
  bf16_to_f32_512(wv.s_row(r), n, out);
  bf16_to_f32_512(wv.b_row(r), n, out + n);
  return {out, out + n};
}

// R quantised rows from row r times U tokens, decoding in registers. gp: the f32 scales and
// biases of these rows (row i at gp.s + i * groups_per_row).
template <class Q, int R, int U>
MF_AVX512 void block_quant_512(const WeightView& wv, int64_t r, GroupParams gp, const float* x,
                               float* y, int64_t ys) {
  const int64_t n = wv.cols, G = wv.group, gpr = wv.groups_per_row;
  __m512 acc[R * U];
#pragma GCC unroll 32
  for (auto& a : acc) a = _mm512_setzero_ps();
  const uint32_t* q = wv.q_row(r);
  for (int64_t g = 0; g < gpr; g++) {
    typename Q::Group grp[R];
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) grp[i] = Q::group(gp.s[i * gpr + g], gp.b[i * gpr + g]);
      // Rows two blocks ahead, same columns: a packed row advances only 4-16 bytes per chunk, too
      // slowly across R interleaved rows for the hardware prefetchers alone to keep DRAM busy
      // (248320x2048 q4 at T = 1 on 2 threads: 17 -> 33 GB/s; 1, 2, 4 or 8 blocks ahead and
      // L1 or L2 hints measured within noise of each other).
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)
      _mm_prefetch(reinterpret_cast<const char*>(q + (kPrefetchBlocks * R + i) * wv.words_per_row +
                                                 g * G * Q::kBits / 32),
                   _MM_HINT_T0);
    for (int64_t c = g * G; c < (g + 1) * G; c += kLanes) {
      __m512 xv[U];
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) {
        xv[u] = _mm512_loadu_ps(x + u * n + c);
        if constexpr (Q::kPermuted) xv[u] = to_pi_512(xv[u]);
      }
#pragma GCC unroll 32
      for (int i = 0; i < R; i++) {
        const __m512 w = Q::weights(q + i * wv.words_per_row, c, grp[i]);
#pragma GCC unroll 32
        for (int u = 0; u < U; u++) acc[i * U + u] = _mm512_fmadd_ps(w, xv[u], acc[i * U + u]);
      }
    }
  }
  if constexpr (Q::kPermuted) {
#pragma GCC unroll 32
    for (auto& a : acc) a = from_pi_512(a);
  }
  store_block_512<R, U>(acc, y, ys);
}

// The panel driver's weights: rows [r, r + rows) as exact f32, packed for the micro-kernel.
// Rows go in blocks of 4, chunk-major within a block (the 4 rows' 16 columns of chunk k side by
// side), so one micro-kernel call reads its weights as one sequential stream; rows after the
// last whole block follow one by one, also chunk-major. (Row-major with 2048 columns, the 4 rows
// were 4 short streams 8 KiB apart that the prefetchers followed badly and that aliased in L1:
// 48x2048 f32 T = 48 ran at 123 GFLOP/s on one core, against 165 for 48x512.) A last partial
// chunk is padded with zeros, which the kernel masks off.
struct PanelLayout {
  int64_t rows, chunks, full;  // full: the rows in whole blocks of 4
  PanelLayout(int64_t rows_, int64_t cols)
      : rows(rows_), chunks((cols + kLanes - 1) / kLanes), full(rows_ / 4 * 4) {}
  // Floats from the panel start to chunk k of row i.
  int64_t at(int64_t i, int64_t k) const {
    return i < full ? ((i / 4 * chunks + k) * 4 + i % 4) * kLanes
                    : (full * chunks + (i - full) * chunks + k) * kLanes;
  }
};

template <class D>
MF_AVX512 void pack_float_512(const typename D::Elem* w, int64_t n, const PanelLayout& L,
                              float* dst) {
  for (int64_t i = 0; i < L.rows; i++) {
    const typename D::Elem* src = w + i * n;
    int64_t k = 0;
    for (; (k + 1) * kLanes <= n; k++)
      _mm512_storeu_ps(dst + L.at(i, k), D::load(src, k * kLanes));
    if (k * kLanes < n) {
      float t[kLanes] = {};
      for (int64_t c = k * kLanes; c < n; c++) t[c - k * kLanes] = D::scalar(src[c]);
      _mm512_storeu_ps(dst + L.at(i, k), _mm512_loadu_ps(t));
    }
  }
}

template <class Q>
MF_AVX512 void pack_quant_512(const WeightView& wv, int64_t r, const PanelLayout& L, float* dst) {
  const int64_t gpr = wv.groups_per_row;
  const GroupParams gp = group_params_512(wv, r, L.rows);
  for (int64_t i = 0; i < L.rows; i++) {
    const uint32_t* q = wv.q_row(r + i);
    for (int64_t g = 0; g < gpr; g++) {
      const typename Q::Group grp = Q::group(gp.s[i * gpr + g], gp.b[i * gpr + g]);
      for (int64_t c = g * wv.group; c < (g + 1) * wv.group; c += kLanes) {
        __m512 w = Q::weights(q, c, grp);
        if constexpr (Q::kPermuted) w = from_pi_512(w);
        _mm512_storeu_ps(dst + L.at(i, c / kLanes), w);
      }
    }
  }
}

// U tokens of x, chunk-major ([chunk][token][16]), the last partial chunk padded with zeros.
MF_AVX512 void pack_x_512(const float* x, int64_t n, int U, int64_t chunks, float* dst) {
  for (int64_t k = 0; k < chunks; k++) {
    const int64_t m = std::min<int64_t>(kLanes, n - k * kLanes);
    const __mmask16 mask = __mmask16((1u << m) - 1);
    for (int u = 0; u < U; u++)
      _mm512_storeu_ps(dst + (k * U + u) * kLanes,
                       _mm512_maskz_loadu_ps(mask, x + u * n + k * kLanes));
  }
}

// The panel micro-kernel: R packed rows (chunk k of row i at w + (k*R + i)*16) times U packed
// tokens (chunk k of token u at xp + (k*U + u)*16); tail > 0: the last chunk has that many
// columns.
template <int R, int U>
MF_AVX512 void micro_512(const float* w, const float* xp, int64_t chunks, int tail, float* y,
                         int64_t ys) {
  __m512 acc[R * U];
#pragma GCC unroll 32
  for (auto& a : acc) a = _mm512_setzero_ps();
  const int64_t full = tail ? chunks - 1 : chunks;
  for (int64_t k = 0; k < full; k++) {
    const float* xk = xp + k * U * kLanes;
    const float* wk = w + k * R * kLanes;
    __m512 xv[U];
#pragma GCC unroll 32
    for (int u = 0; u < U; u++) xv[u] = _mm512_loadu_ps(xk + u * kLanes);
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      const __m512 wv = _mm512_loadu_ps(wk + i * kLanes);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) acc[i * U + u] = _mm512_fmadd_ps(wv, xv[u], acc[i * U + u]);
    }
  }
  if (tail) {  // masked lanes keep their sums untouched (a +0 term would turn -0 into +0)
    const __mmask16 m = __mmask16((1u << tail) - 1);
    const float* xk = xp + full * U * kLanes;
    const float* wk = w + full * R * kLanes;
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      const __m512 wv = _mm512_loadu_ps(wk + i * kLanes);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++)
        acc[i * U + u] =
            _mm512_mask3_fmadd_ps(wv, _mm512_loadu_ps(xk + u * kLanes), acc[i * U + u], m);
    }
  }
  store_block_512<R, U>(acc, y, ys);
}

// Runtime U -> template U.
template <class D, int R>
MF_AVX512 void block_float_512_u(int U, const typename D::Elem* w, int64_t ld, int64_t n,
                                 const float* x, float* y, int64_t ys) {
  switch (U) {
    case 1:
      return block_float_512<D, R, 1>(w, ld, n, x, y, ys);
    case 2:
      return block_float_512<D, R, 2>(w, ld, n, x, y, ys);
    case 3:
      return block_float_512<D, R, 3>(w, ld, n, x, y, ys);
    default:
      return block_float_512<D, R, 4>(w, ld, n, x, y, ys);
  }
}

template <int R>
MF_AVX512 void micro_512_u(int U, const float* w, const float* xp, int64_t chunks, int tail,
                           float* y, int64_t ys) {
  switch (U) {
    case 1:
      return micro_512<R, 1>(w, xp, chunks, tail, y, ys);
    case 2:
      return micro_512<R, 2>(w, xp, chunks, tail, y, ys);
    case 3:
      return micro_512<R, 3>(w, xp, chunks, tail, y, ys);
    case 4:
      return micro_512<R, 4>(w, xp, chunks, tail, y, ys);
    case 5:
      return micro_512<R, 5>(w, xp, chunks, tail, y, ys);
    default:
      return micro_512<R, 6>(w, xp, chunks, tail, y, ys);
  }
}

template <class Q, int R>
MF_AVX512 void block_quant_512_u(int U, const WeightView& wv, int64_t r, GroupParams gp,
                                 const float* x, float* y, int64_t ys) {
  switch (U) {
    case 1:
      return block_quant_512<Q, R, 1>(wv, r, gp, x, y, ys);
    case 2:
      return block_quant_512<Q, R, 2>(wv, r, gp, x, y, ys);
    case 3:
      return block_quant_512<Q, R, 3>(wv, r, gp, x, y, ys);
    default:
      return block_quant_512<Q, R, 4>(wv, r, gp, x, y, ys);
  }
}

// T up to kStreamMaxT512 goes to the stream driver, which runs a row block over the tokens
// kStreamU512 at a time (decoding the block's weights again, from L1, for each group of
// tokens): below that T the panel's packing does not pay for itself.
constexpr int kStreamMaxT512 = 16;
constexpr int kStreamU512 = 4;
constexpr int kPanelU512 = 6;      // micro-kernel: 4 rows x 6 tokens = 24 zmm accumulators

// A packed panel (PanelLayout) of n columns times all T tokens, in 4 x 6 blocks.
MF_AVX512 void panel_512(const float* wp, const PanelLayout& L, int64_t n, const float* x, int T,
                         float* y, int64_t ys) {
  const int tail = int(n % kLanes);
  float* xp = scratch(kXScratch, size_t(kPanelU512 * L.chunks * kLanes));
  for (int t = 0; t < T; t += kPanelU512) {
    const int U = std::min(kPanelU512, T - t);
    pack_x_512(x + t * n, n, U, L.chunks, xp);
    for (int64_t i = 0; i < L.full; i += 4)
      micro_512_u<4>(U, wp + L.at(i, 0), xp, L.chunks, tail, y + t * ys + i, ys);
    for (int64_t i = L.full; i < L.rows; i++)
      micro_512_u<1>(U, wp + L.at(i, 0), xp, L.chunks, tail, y + t * ys + i, ys);
  }
}

template <class D>
MF_AVX512 void matmul_float_512(const WeightView& wv, int64_t r0, int64_t r1, const float* x, int T,
                                float* y, int64_t ys) {
  const int64_t n = wv.cols;
  const auto* w = static_cast<const typename D::Elem*>(wv.data);
  if (T <= kStreamMaxT512) {
    int64_t r = r0;
    if (T == 1)
      for (; r + 8 <= r1; r += 8) block_float_512<D, 8, 1>(w + r * n, n, n, x, y + r, ys);
    for (; r + 4 <= r1; r += 4)
      for (int t = 0; t < T; t += kStreamU512)
        block_float_512_u<D, 4>(std::min(kStreamU512, T - t), w + r * n, n, n, x + t * n,
                                y + t * ys + r, ys);
    for (; r < r1; r++)
      for (int t = 0; t < T; t += kStreamU512)
        block_float_512_u<D, 1>(std::min(kStreamU512, T - t), w + r * n, n, n, x + t * n,
                                y + t * ys + r, ys);
    return;
  }
  const int64_t P = panel_rows(n);
  float* buf = scratch(kPanelScratch, size_t(P * round_up(n, kLanes)));
  for (int64_t r = r0; r < r1; r += P) {
    const PanelLayout L(std::min(P, r1 - r), n);
    pack_float_512<D>(w + r * n, n, L, buf);
    panel_512(buf, L, n, x, T, y + r, ys);
  }
}

template <class Q>
MF_AVX512 void matmul_quant_512(const WeightView& wv, int64_t r0, int64_t r1, const float* x, int T,
                                float* y, int64_t ys) {
  if (T <= kStreamMaxT512) {
    const int64_t gpr = wv.groups_per_row;
    for (int64_t rb = r0; rb < r1; rb += kParamRows) {
      const int64_t rb1 = std::min(r1, rb + kParamRows);
      prefetch_group_params(wv, rb1, std::min(r1, rb1 + kParamRows));
      const GroupParams gp = group_params_512(wv, rb, rb1 - rb);
      auto at = [&](int64_t r) {
        return GroupParams{gp.s + (r - rb) * gpr, gp.b + (r - rb) * gpr};
      };
      const int64_t n = wv.cols;
      int64_t r = rb;
      if (T == 1)
        for (; r + 8 <= rb1; r += 8) block_quant_512<Q, 8, 1>(wv, r, at(r), x, y + r, ys);
      for (; r + 4 <= rb1; r += 4)
        for (int t = 0; t < T; t += kStreamU512)
          block_quant_512_u<Q, 4>(std::min(kStreamU512, T - t), wv, r, at(r), x + t * n,
                                  y + t * ys + r, ys);
      for (; r < rb1; r++)
        for (int t = 0; t < T; t += kStreamU512)
          block_quant_512_u<Q, 1>(std::min(kStreamU512, T - t), wv, r, at(r), x + t * n,
                                  y + t * ys + r, ys);
    }
    return;
  }
  const int64_t n = wv.cols, P = panel_rows(n);
  float* buf = scratch(kPanelScratch, size_t(P * n));
  for (int64_t r = r0; r < r1; r += P) {
    const PanelLayout L(std::min(P, r1 - r), n);
    pack_quant_512<Q>(wv, r, L, buf);
    panel_512(buf, L, n, x, T, y + r, ys);
  }
}

MF_AVX512 void matmul_avx512(const Mat& W, int64_t r0, int64_t r1, const float* x, int T, float* y,
                             int64_t ys) {
  const WeightView wv(W);
  switch (W.dtype) {
    case DType::kF32:
      return matmul_float_512<F32x16>(wv, r0, r1, x, T, y, ys);
    case DType::kBF16:
      return matmul_float_512<Bf16x16>(wv, r0, r1, x, T, y, ys);
    case DType::kF16:
      return matmul_float_512<F16x16>(wv, r0, r1, x, T, y, ys);
    case DType::kQ8:
      return matmul_quant_512<Q8x16>(wv, r0, r1, x, T, y, ys);
    case DType::kQ4:
      return matmul_quant_512<Q4x16>(wv, r0, r1, x, T, y, ys);
    case DType::kMxfp4:
      return matmul_quant_512<Mx4x16>(wv, r0, r1, x, T, y, ys);
    default:
      return matmul_quant_512<Q2x16>(wv, r0, r1, x, T, y, ys);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C. One output's 16 lanes are two ymm: lanes 0-7 and 8-15.

#define MF_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 columns [c, c+8) of a float row as exact f32.
struct F32x8 {
  using Elem = float;
  MF_AVX2 static __m256 load(const float* p, int64_t c) { return _mm256_loadu_ps(p + c); }
  static float scalar(float v) { return v; }
};
struct Bf16x8 {
  using Elem = uint16_t;
  MF_AVX2 static __m256 load(const uint16_t* p, int64_t c) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static float scalar(uint16_t v) { return bf16_to_f32(v); }
};
struct F16x8 {
  using Elem = uint16_t;
  MF_AVX2 static __m256 load(const uint16_t* p, int64_t c) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c)));
  }
  static float scalar(uint16_t v) { return f16_to_f32(v); }
};

// Decoders of the 16 columns [c, c+16) of a packed row into lanes 0-7 (lo) and 8-15 (hi).
struct Q8x8 {
  static constexpr int kBits = 8;
  struct Group {
    __m256 s, b;
  };
  MF_AVX2 static Group group(float s, float b) { return {_mm256_set1_ps(s), _mm256_set1_ps(b)}; }
  MF_AVX2 static void weights(const uint32_t* p, int64_t c, const Group& g, __m256& lo,
                              __m256& hi) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(p) + c;
    const __m128i v0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
    const __m128i v1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8));
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v0)), g.s, g.b);
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v1)), g.s, g.b);
  }
};
struct Q4x8 {
  static constexpr int kBits = 4;
  struct Group {
    __m256 s, b;
  };
  MF_AVX2 static Group group(float s, float b) { return {_mm256_set1_ps(s), _mm256_set1_ps(b)}; }
  MF_AVX2 static void weights(const uint32_t* p, int64_t c, const Group& g, __m256& lo,
                              __m256& hi) {
    const uint32_t* w = p + uint64_t(c) / 8;
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    const __m256i m = _mm256_set1_epi32(0xf);
    const __m256i q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w[0])), sh), m);
    const __m256i q1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w[1])), sh), m);
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), g.s, g.b);
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), g.s, g.b);
  }
};
struct Q2x8 {
  // Table lookup as Q2x16: vpermps reads the low 3 bits of each shifted word.
  static constexpr int kBits = 2;
  struct Group {
    __m256 table;
  };
  MF_AVX2 static Group group(float s, float b) {
    const __m256 q = _mm256_set_ps(3, 2, 1, 0, 3, 2, 1, 0);
    return {_mm256_fmadd_ps(q, _mm256_set1_ps(s), _mm256_set1_ps(b))};
  }
  MF_AVX2 static void weights(const uint32_t* p, int64_t c, const Group& g, __m256& lo,
                              __m256& hi) {
    const __m256i w = _mm256_set1_epi32(int(p[uint64_t(c) / 16]));
    const __m256i sh0 = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
    const __m256i sh1 = _mm256_set_epi32(30, 28, 26, 24, 22, 20, 18, 16);
    lo = _mm256_permutevar8x32_ps(g.table, _mm256_srlv_epi32(w, sh0));
    hi = _mm256_permutevar8x32_ps(g.table, _mm256_srlv_epi32(w, sh1));
  }
};

// MXFP4: per group the 8 magnitudes times the scale; code bit 3 flips the sign in (code 8 is
// -0, as in mxfp4_dequantize_row). `s` is the scale as f32 (e8m0_to_f32), b unused.
struct Mx4x8 {
  static constexpr int kBits = 4;
  struct Group {
    __m256 mags;
  };
  MF_AVX2 static Group group(float s, float) {
    return {_mm256_mul_ps(_mm256_loadu_ps(kE2m1Values), _mm256_set1_ps(s))};
  }
  MF_AVX2 static __m256 decode8(uint32_t word, const Group& g) {
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    const __m256i code = _mm256_srlv_epi32(_mm256_set1_epi32(int(word)), sh);
    const __m256 v = _mm256_permutevar8x32_ps(g.mags, code);  // reads bits 0-2
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(8)), 28);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(sign));
  }
  MF_AVX2 static void weights(const uint32_t* p, int64_t c, const Group& g, __m256& lo,
                              __m256& hi) {
    const uint32_t* w = p + uint64_t(c) / 8;
    lo = decode8(w[0], g);
    hi = decode8(w[1], g);
  }
};

// The lane tree on one output held as (lanes 0-7, lanes 8-15).
MF_AVX2 inline float reduce_256(__m256 lo, __m256 hi) {
  const __m256 b = _mm256_add_ps(lo, hi);                                               // +8
  const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));  // +4
  const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));                                  // +2
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));                         // +1
}

// The tree on 8 outputs at once: out[k] = tree(lo[k], hi[k]).
MF_AVX2 inline void reduce8_256(const __m256* lo, const __m256* hi, float* out) {
  __m256 l1[8], l2[4], l3[2];
#pragma GCC unroll 32
  for (int k = 0; k < 8; k++) l1[k] = _mm256_add_ps(lo[k], hi[k]);
#pragma GCC unroll 32
  for (int k = 0; k < 4; k++) {  // [a0..3 | b0..3] + [a4..7 | b4..7]
    const __m256 a = l1[2 * k], b = l1[2 * k + 1];
    l2[k] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
#pragma GCC unroll 32
  for (int k = 0; k < 2; k++) {
    const __m256 a = l2[2 * k], b = l2[2 * k + 1];
    l3[k] = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xee));
  }
  const __m256 r =
      _mm256_add_ps(_mm256_shuffle_ps(l3[0], l3[1], 0x88), _mm256_shuffle_ps(l3[0], l3[1], 0xdd));
  // Half h of r holds the outputs of l1[h], l1[h+2], l1[h+4], l1[h+6].
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, r);
#pragma GCC unroll 32
  for (int h = 0; h < 2; h++)
#pragma GCC unroll 32
    for (int i = 0; i < 4; i++) out[h + 2 * i] = tmp[4 * h + i];
}

template <int R, int U>
MF_AVX2 inline void store_block_256(const __m256* lo, const __m256* hi, float* y, int64_t ys) {
  constexpr int N = R * U;
  if constexpr (N >= 4) {
    float out[8 * ((N + 7) / 8)];
#pragma GCC unroll 32
    for (int k0 = 0; k0 < N; k0 += 8) {
      __m256 l[8], h[8];
#pragma GCC unroll 32
      for (int k = 0; k < 8; k++) {
        l[k] = k0 + k < N ? lo[k0 + k] : _mm256_setzero_ps();
        h[k] = k0 + k < N ? hi[k0 + k] : _mm256_setzero_ps();
      }
      reduce8_256(l, h, out + k0);
    }
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) y[u * ys + i] = out[i * U + u];
  } else {
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) y[u * ys + i] = reduce_256(lo[i * U + u], hi[i * U + u]);
  }
}

// One half of R float rows (row i at w + i*ld) times U tokens: lanes 0-7 (h = 0) or 8-15
// (h = 1) of every output, i.e. columns c with c % 16 in [8h, 8h + 8). Doing the halves one
// after the other keeps 12 accumulators, the U x vectors and a weight vector within the 16 ymm
// registers (both halves at once would need twice the accumulators).
template <class D, int R, int U>
MF_AVX2 inline __attribute__((always_inline)) void half_float_256(int h, const typename D::Elem* w,
                                                                  int64_t ld, int64_t n,
                                                                  const float* x, __m256* acc) {
#pragma GCC unroll 32
  for (int k = 0; k < R * U; k++) acc[k] = _mm256_setzero_ps();
  const int64_t full = n / kLanes * kLanes;
  for (int64_t c = 8 * h; c < full; c += kLanes) {
    __m256 xv[U];
#pragma GCC unroll 32
    for (int u = 0; u < U; u++) xv[u] = _mm256_loadu_ps(x + u * n + c);
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      const __m256 wv = D::load(w + i * ld, c);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) acc[i * U + u] = _mm256_fmadd_ps(wv, xv[u], acc[i * U + u]);
    }
  }
  const int64_t c = full + 8 * h;
  const int m = int(std::min<int64_t>(8, n - c));
  if (m > 0) {  // padded copies; lanes past the end keep their sums (blend, not a +0 term)
    alignas(32) int32_t lane[8];
    for (int j = 0; j < 8; j++) lane[j] = j < m ? -1 : 0;
    const __m256 k = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<__m256i*>(lane)));
    __m256 xv[U];
#pragma GCC unroll 32
    for (int u = 0; u < U; u++) {
      float xt[8] = {};
      std::memcpy(xt, x + u * n + c, size_t(m) * sizeof(float));
      xv[u] = _mm256_loadu_ps(xt);
    }
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) {
      float wt[8] = {};
      for (int j = 0; j < m; j++) wt[j] = D::scalar(w[i * ld + c + j]);
      const __m256 wv = _mm256_loadu_ps(wt);
#pragma GCC unroll 32
      for (int u = 0; u < U; u++) {
        __m256& a = acc[i * U + u];
        a = _mm256_blendv_ps(a, _mm256_fmadd_ps(wv, xv[u], a), k);
      }
    }
  }
}

template <class D, int R, int U>
MF_AVX2 void block_float_256(const typename D::Elem* w, int64_t ld, int64_t n, const float* x,
                             float* y, int64_t ys) {
  __m256 lo[R * U], hi[R * U];
  half_float_256<D, R, U>(0, w, ld, n, x, lo);
  half_float_256<D, R, U>(1, w, ld, n, x, hi);
  store_block_256<R, U>(lo, hi, y, ys);
}

MF_AVX2 void bf16_to_f32_256(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Bf16x8::load(in, i));
  for (; i < n; i++) out[i] = bf16_to_f32(in[i]);
}

MF_AVX2 GroupParams group_params_256(const WeightView& wv, int64_t r, int64_t rows) {
  const int64_t n = rows * wv.groups_per_row;
  float* out = scratch(kParamScratch, size_t(2 * n));
  if (wv.e8m0) {
    e8m0_to_f32(wv.e_row(r), n, out);
    return {out, out};
  }
  bf16_to_f32_256(wv.s_row(r), n, out);
  bf16_to_f32_256(wv.b_row(r), n, out + n);
  return {out, out + n};
}

template <class Q, int R, int U>
MF_AVX2 void block_quant_256(const WeightView& wv, int64_t r, GroupParams gp, const float* x,
                             float* y, int64_t ys) {
  const int64_t n = wv.cols, G = wv.group, gpr = wv.groups_per_row;
  __m256 lo[R * U], hi[R * U];
#pragma GCC unroll 32
  for (int k = 0; k < R * U; k++) lo[k] = hi[k] = _mm256_setzero_ps();
  const uint32_t* q = wv.q_row(r);
  for (int64_t g = 0; g < gpr; g++) {
    typename Q::Group grp[R];
#pragma GCC unroll 32
    for (int i = 0; i < R; i++) grp[i] = Q::group(gp.s[i * gpr + g], gp.b[i * gpr + g]);
#pragma GCC unroll 32
    for (int i = 0; i < R; i++)  // as block_quant_512
      _mm_prefetch(reinterpret_cast<const char*>(q + (kPrefetchBlocks * R + i) * wv.words_per_row +
                                                 g * G * Q::kBits / 32),
                   _MM_HINT_T0);
    for (int64_t c = g * G; c < (g + 1) * G; c += kLanes) {
#pragma GCC unroll 32
      for (int i = 0; i < R; i++) {
        __m256 w0, w1;
        Q::weights(q + i * wv.words_per_row, c, grp[i], w0, w1);
#pragma GCC unroll 32
        for (int u = 0; u < U; u++) {
          lo[i * U + u] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + u * n + c), lo[i * U + u]);
          hi[i * U + u] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + u * n + c + 8), hi[i * U + u]);
        }
      }
    }
  }
  store_block_256<R, U>(lo, hi, y, ys);
}

template <class D>
MF_AVX2 void widen_float_256(const typename D::Elem* w, int64_t n, int64_t rows, float* dst,
                             int64_t ld) {
  for (int64_t i = 0; i < rows; i++) {
    const typename D::Elem* src = w + i * n;
    float* d = dst + i * ld;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(d + c, D::load(src, c));
    for (; c < n; c++) d[c] = D::scalar(src[c]);
  }
}

template <class Q>
MF_AVX2 void widen_quant_256(const WeightView& wv, int64_t r, int64_t rows, float* dst,
                             int64_t ld) {
  const int64_t gpr = wv.groups_per_row;
  const GroupParams gp = group_params_256(wv, r, rows);
  for (int64_t i = 0; i < rows; i++) {
    const uint32_t* q = wv.q_row(r + i);
    float* d = dst + i * ld;
    for (int64_t g = 0; g < gpr; g++) {
      const typename Q::Group grp = Q::group(gp.s[i * gpr + g], gp.b[i * gpr + g]);
      for (int64_t c = g * wv.group; c < (g + 1) * wv.group; c += kLanes) {
        __m256 w0, w1;
        Q::weights(q, c, grp, w0, w1);
        _mm256_storeu_ps(d + c, w0);
        _mm256_storeu_ps(d + c + 8, w1);
      }
    }
  }
}

constexpr int kPanelU256 = 3;  // micro-kernel: 4 rows x 3 tokens = 12 ymm per half

template <class D, int R>
MF_AVX2 void block_float_256_u(int U, const typename D::Elem* w, int64_t ld, int64_t n,
                               const float* x, float* y, int64_t ys) {
  switch (U) {
    case 1:
      return block_float_256<D, R, 1>(w, ld, n, x, y, ys);
    case 2:
      return block_float_256<D, R, 2>(w, ld, n, x, y, ys);
    default:
      return block_float_256<D, R, 3>(w, ld, n, x, y, ys);
  }
}

MF_AVX2 void panel_f32_256(const float* w, int64_t ld, int64_t rows, int64_t n, const float* x,
                           int T, float* y, int64_t ys) {
  for (int t = 0; t < T; t += kPanelU256) {
    const int U = std::min(kPanelU256, T - t);
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
      block_float_256_u<F32x8, 4>(U, w + i * ld, ld, n, x + t * n, y + t * ys + i, ys);
    for (; i < rows; i++)
      block_float_256_u<F32x8, 1>(U, w + i * ld, ld, n, x + t * n, y + t * ys + i, ys);
  }
}

template <class D>
MF_AVX2 void matmul_float_256(const WeightView& wv, int64_t r0, int64_t r1, const float* x, int T,
                              float* y, int64_t ys) {
  const int64_t n = wv.cols;
  const auto* w = static_cast<const typename D::Elem*>(wv.data);
  if (T == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) block_float_256<D, 4, 1>(w + r * n, n, n, x, y + r, ys);
    for (; r < r1; r++) block_float_256<D, 1, 1>(w + r * n, n, n, x, y + r, ys);
    return;
  }
  const int64_t P = panel_rows(n);
  if constexpr (std::is_same_v<D, F32x8>) {
    for (int64_t r = r0; r < r1; r += P)
      panel_f32_256(w + r * n, n, std::min(P, r1 - r), n, x, T, y + r, ys);
  } else {
    const int64_t ld = round_up(n, kLanes);
    float* buf = scratch(kPanelScratch, size_t(P * ld));
    for (int64_t r = r0; r < r1; r += P) {
      const int64_t rows = std::min(P, r1 - r);
      widen_float_256<D>(w + r * n, n, rows, buf, ld);
      panel_f32_256(buf, ld, rows, n, x, T, y + r, ys);
    }
  }
}

template <class Q>
MF_AVX2 void matmul_quant_256(const WeightView& wv, int64_t r0, int64_t r1, const float* x, int T,
                              float* y, int64_t ys) {
  if (T <= 2) {
    const int64_t gpr = wv.groups_per_row;
    for (int64_t rb = r0; rb < r1; rb += kParamRows) {
      const int64_t rb1 = std::min(r1, rb + kParamRows);
      prefetch_group_params(wv, rb1, std::min(r1, rb1 + kParamRows));
      const GroupParams gp = group_params_256(wv, rb, rb1 - rb);
      auto at = [&](int64_t r) {
        return GroupParams{gp.s + (r - rb) * gpr, gp.b + (r - rb) * gpr};
      };
      int64_t r = rb;
      if (T == 1) {
        for (; r + 4 <= rb1; r += 4) block_quant_256<Q, 4, 1>(wv, r, at(r), x, y + r, ys);
        for (; r < rb1; r++) block_quant_256<Q, 1, 1>(wv, r, at(r), x, y + r, ys);
      } else {
        for (; r + 2 <= rb1; r += 2) block_quant_256<Q, 2, 2>(wv, r, at(r), x, y + r, ys);
        for (; r < rb1; r++) block_quant_256<Q, 1, 2>(wv, r, at(r), x, y + r, ys);
      }
    }
    return;
  }
  const int64_t n = wv.cols, P = panel_rows(n);
  float* buf = scratch(kPanelScratch, size_t(P * n));
  for (int64_t r = r0; r < r1; r += P) {
    const int64_t rows = std::min(P, r1 - r);
    widen_quant_256<Q>(wv, r, rows, buf, n);
    panel_f32_256(buf, n, rows, n, x, T, y + r, ys);
  }
}

MF_AVX2 void matmul_avx2(const Mat& W, int64_t r0, int64_t r1, const float* x, int T, float* y,
                         int64_t ys) {
  const WeightView wv(W);
  switch (W.dtype) {
    case DType::kF32:
      return matmul_float_256<F32x8>(wv, r0, r1, x, T, y, ys);
    case DType::kBF16:
      return matmul_float_256<Bf16x8>(wv, r0, r1, x, T, y, ys);
    case DType::kF16:
      return matmul_float_256<F16x8>(wv, r0, r1, x, T, y, ys);
    case DType::kQ8:
      return matmul_quant_256<Q8x8>(wv, r0, r1, x, T, y, ys);
    case DType::kQ4:
      return matmul_quant_256<Q4x8>(wv, r0, r1, x, T, y, ys);
    case DType::kMxfp4:
      return matmul_quant_256<Mx4x8>(wv, r0, r1, x, T, y, ys);
    default:
      return matmul_quant_256<Q2x8>(wv, r0, r1, x, T, y, ys);
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

using MatmulFn = void (*)(const Mat&, int64_t, int64_t, const float*, int, float*, int64_t);

// F16C from cpuid leaf 1 (ECX bit 29): clang before 16 (Debian 12's 14, which builds the fuzz
// targets) has no "f16c" for __builtin_cpu_supports. The AVX state F16C needs the OS to save is
// checked by the "avx2" test next to it.
bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

KernelPath detect_path() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return KernelPath::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
    return KernelPath::kAvx2;
  return KernelPath::kScalar;
}

MatmulFn path_fn(KernelPath p) {
  switch (p) {
    case KernelPath::kAvx512:
      return matmul_avx512;
    case KernelPath::kAvx2:
      return matmul_avx2;
    default:
      return matmul_scalar;
  }
}

struct Active {
  std::atomic<KernelPath> path{best_kernel_path()};
  std::atomic<MatmulFn> fn{path_fn(best_kernel_path())};
};

Active& active() {
  static Active a;
  return a;
}

}  // namespace

KernelPath best_kernel_path() {
  static const KernelPath best = detect_path();
  return best;
}

bool kernel_path_supported(KernelPath p) {
  switch (p) {
    case KernelPath::kAvx512:
      return best_kernel_path() == KernelPath::kAvx512;
    case KernelPath::kAvx2:
      return best_kernel_path() != KernelPath::kScalar;
    default:
      return true;
  }
}

void set_kernel_path(KernelPath p) {
  if (p == KernelPath::kAuto) p = best_kernel_path();
  if (!kernel_path_supported(p))
    fail(ErrorKind::kUnsupported, "kernel path {} is not supported by this CPU",
         kernel_path_name(p));
  active().path = p;
  active().fn = path_fn(p);
}

KernelPath active_kernel_path() {
  return active().path;
}

const char* kernel_path_name(KernelPath p) {
  switch (p) {
    case KernelPath::kAuto:
      return "auto";
    case KernelPath::kScalar:
      return "scalar";
    case KernelPath::kAvx2:
      return "avx2";
    case KernelPath::kAvx512:
      return "avx512";
  }
  return "?";
}

void matmul_rows(const Mat& W, int64_t r0, int64_t r1, const float* x, int T, float* y,
                 int64_t y_stride) {
  if (r0 >= r1 || T <= 0) return;
  MF_CHECK(r0 >= 0 && r1 <= W.rows);
  if (W.dtype == DType::kMxfp4)
    MF_CHECK(W.e8m0 && W.cols % kMxfp4Group == 0);
  else if (is_quant_dtype(W.dtype))
    MF_CHECK(W.group > 0 && W.group % 32 == 0 && W.cols % W.group == 0 && W.scales && W.biases);
  else
    MF_CHECK(W.dtype == DType::kF32 || W.dtype == DType::kBF16 || W.dtype == DType::kF16);
  active().fn.load(std::memory_order_relaxed)(W, r0, r1, x, T, y, y_stride);
}

}  // namespace moeflux
