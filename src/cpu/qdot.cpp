// qmatmul_rows: the int8 dot-product path (numerics in qdot.h). Three paths: a scalar
// reference, AVX2 (vpmaddubsw) and AVX-512 VNNI (vpdpbusd, on 256-bit vectors). Integer sums
// are exact, so the paths need only share the float combine, which they do op for op.
//
// Layout of the work: the integer sum of each 32-column block (one ymm of codes, one of
// activations) for R rows x U tokens is kept as 8 int32 partial sums per (row, token, block)
// and reduced 8 blocks at a time when the float combine runs. The quantised
// activations are stored with each 32-column block in the order the weight decoder yields
// codes, so a q4 or q2 block is decoded with one shift and one mask, no shuffles.
#include "cpu/qdot.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "format/quant.h"
#include "util/error.h"
#include "util/half.h"

namespace moeflux {

namespace {

constexpr int kBlock = 32;   // columns per decoded block
constexpr int kLanes8 = 8;   // float lanes of the combine

// Column of position p (0..31) of a 32-column block, in the order the decoders yield codes.
//  q8: in order. q4: byte k holds columns 2k (low nibble) and 2k+1, so the low nibbles of the
//  block's 16 bytes come first, then the high ones. q2: byte k holds columns 4k+j at bits 2j;
//  position 8j+k is column 4k+j.
inline int block_col(int bits, int p) {
  switch (bits) {
    case 8:
      return p;
    case 4:
      return p < 16 ? 2 * p : 2 * (p - 16) + 1;
    default:
      return 4 * (p % 8) + p / 8;
  }
}

// The rows of a quantised matrix.
struct QView {
  int bits, group;
  int64_t cols, row_bytes, gpr;
  int64_t nb;  // 32-column blocks per row
  int bpg;     // blocks per group
  const uint8_t* data;
  const uint16_t* scales;
  const uint16_t* biases;
  explicit QView(const Mat& W)
      : bits(quant_bits(W.dtype)),
        group(W.group),
        cols(W.cols),
        row_bytes(W.cols * quant_bits(W.dtype) / 8),
        gpr(W.cols / W.group),
        nb(W.cols / kBlock),
        bpg(W.group / kBlock),
        data(static_cast<const uint8_t*>(W.data)),
        scales(W.scales),
        biases(W.biases) {}
  const uint8_t* row(int64_t r) const { return data + r * row_bytes; }
  const uint16_t* s_row(int64_t r) const { return scales + r * gpr; }
  const uint16_t* b_row(int64_t r) const { return biases + r * gpr; }
};

// Per-thread scratch of the SIMD drivers: 8 int32 partial sums per (row, token, block).
int32_t* raw_scratch(size_t n) {
  thread_local std::vector<int32_t> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---------------------------------------------------------------------------------------------
// Scalar reference.

inline int code_at(const uint8_t* row, int bits, int64_t c) {
  const int64_t bit = c * bits;
  return (row[bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
}

// The float combine of qdot.h from the blocks' integer sums.
float combine_scalar(const int32_t* isum, int64_t nb, int bpg, const uint16_t* s,
                     const uint16_t* b, const float* d, const float* xs) {
  float acc[kLanes8] = {};
  const int64_t padded = (nb + kLanes8 - 1) / kLanes8 * kLanes8;
  for (int64_t k = 0; k < padded; k++) {
    const bool in = k < nb;
    const float fi = in ? float(isum[k]) : 0.0f;
    const float sd = in ? bf16_to_f32(s[k / bpg]) * d[k] : 0.0f;
    const float bb = in ? bf16_to_f32(b[k / bpg]) : 0.0f, xx = in ? xs[k] : 0.0f;
    float& a = acc[k % kLanes8];
    a = std::fma(fi, sd, a);
    a = std::fma(bb, xx, a);
  }
  for (int j = 0; j < 4; j++) acc[j] = acc[j] + acc[j + 4];
  for (int j = 0; j < 2; j++) acc[j] = acc[j] + acc[j + 2];
  return acc[0] + acc[1];
}

void qmatmul_scalar(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                    int64_t ys) {
  const QView w(W);
  std::vector<int32_t> isum(size_t(w.nb));
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t* row = w.row(r);
    for (int t = 0; t < xa.T; t++) {
      const int8_t* xq = xa.q.data() + size_t(t) * w.cols;
      for (int64_t k = 0; k < w.nb; k++) {
        int32_t acc = 0;
        for (int p = 0; p < kBlock; p++)
          acc += code_at(row, w.bits, k * kBlock + block_col(w.bits, p)) *
                 int32_t(xq[k * kBlock + p]);
        isum[size_t(k)] = acc;
      }
      y[t * ys + r] = combine_scalar(isum.data(), w.nb, w.bpg, w.s_row(r), w.b_row(r),
                                     xa.d.data() + size_t(t) * w.nb,
                                     xa.xs.data() + size_t(t) * w.nb);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SIMD: one template over the instruction set (AVX2 or VNNI), the weight format and the R x U
// register block.

#define MF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MF_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// Decoders: the 32 codes of columns [c, c+32) of a row as u8, in block_col order.
// Q4: the block's 16 bytes in both halves; the high half shifted right by 4 (64-bit lanes:
// bits of the next byte land above the nibble and the mask drops them).
// Q2: the block's 8 bytes in all four qwords, qword j shifted right by 2j.
#define MF_DECODERS(ATTR)                                                                   \
  struct Q8Dec {                                                                            \
    static constexpr int kBits = 8;                                                         \
    ATTR static __m256i load(const uint8_t* row, int64_t c) {                               \
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));                 \
    }                                                                                       \
  };                                                                                        \
  struct Q4Dec {                                                                            \
    static constexpr int kBits = 4;                                                         \
    ATTR static __m256i load(const uint8_t* row, int64_t c) {                               \
      const __m256i v = _mm256_broadcastsi128_si256(                                        \
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));                  \
      return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)),         \
                              _mm256_set1_epi8(0x0f));                                      \
    }                                                                                       \
  };                                                                                        \
  struct Q2Dec {                                                                            \
    static constexpr int kBits = 2;                                                         \
    ATTR static __m256i load(const uint8_t* row, int64_t c) {                               \
      long long v;                                                                          \
      std::memcpy(&v, row + c / 4, sizeof v);                                               \
      return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(v),                      \
                                                _mm256_set_epi64x(6, 4, 2, 0)),             \
                              _mm256_set1_epi8(0x03));                                      \
    }                                                                                       \
  };

// The combine of qdot.h on 8 blocks at a time (lanes = blocks k0..k0+7), then the lane tree.
// raw: 8 int32 partial sums per block. qs: non-null when the integer sums lack 128 * sum(xq)
// (q8 on AVX2: codes are taken as q - 128 there). The group parameters of 8 blocks are the
// bf16 at k0 / bpg on, spread by `spread` (lane k takes k / bpg).
#define MF_COMBINE(ATTR)                                                                    \
  ATTR inline __m256i reduce8_epi32(const __m256i* v) {                                     \
    const __m256i a01 = _mm256_hadd_epi32(v[0], v[1]), a23 = _mm256_hadd_epi32(v[2], v[3]); \
    const __m256i a45 = _mm256_hadd_epi32(v[4], v[5]), a67 = _mm256_hadd_epi32(v[6], v[7]); \
    const __m256i lo = _mm256_hadd_epi32(a01, a23), hi = _mm256_hadd_epi32(a45, a67);       \
    return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20),                        \
                            _mm256_permute2x128_si256(lo, hi, 0x31));                       \
  }                                                                                         \
  /* 8 bf16 from p (only `avail` of them readable) as f32, spread. */                       \
  ATTR inline __m256 params8(const uint16_t* p, int64_t avail, __m256i spread) {            \
    __m128i h;                                                                              \
    if (avail >= 8) {                                                                       \
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));                             \
    } else {                                                                                \
      alignas(16) uint16_t t[8] = {};                                                       \
      for (int64_t k = 0; k < avail; k++) t[k] = p[k];                                      \
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(t));                              \
    }                                                                                       \
    const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  \
    return _mm256_permutevar8x32_ps(v, spread);                                             \
  }                                                                                         \
  ATTR float combine(const int32_t* raw, const QView& w, const uint16_t* s,                 \
                     const uint16_t* b, const float* d, const float* xs, const int32_t* qs) { \
    const int bpg = w.bpg;                                                                  \
    const __m256i spread =                                                                  \
        bpg == 1   ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)                              \
        : bpg == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)                              \
        : bpg == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)                              \
                   : _mm256_setzero_si256();                                                \
    __m256 acc = _mm256_setzero_ps();                                                       \
    const auto* rv = reinterpret_cast<const __m256i*>(raw);                                 \
    for (int64_t k0 = 0; k0 < w.nb; k0 += kLanes8) {                                        \
      const int n = int(std::min<int64_t>(kLanes8, w.nb - k0));                             \
      __m256i v[8];                                                                         \
      for (int k = 0; k < 8; k++)                                                           \
        v[k] = k < n ? _mm256_loadu_si256(rv + k0 + k) : _mm256_setzero_si256();            \
      __m256i is = reduce8_epi32(v);                                                        \
      const int64_t g0 = k0 / bpg;                                                          \
      __m256 sv = params8(s + g0, w.gpr - g0, spread);                                      \
      const __m256 bv = params8(b + g0, w.gpr - g0, spread);                                \
      __m256 dv, xv;                                                                        \
      if (n == kLanes8) {                                                                   \
        dv = _mm256_loadu_ps(d + k0);                                                       \
        xv = _mm256_loadu_ps(xs + k0);                                                      \
        if (qs)                                                                             \
          is = _mm256_add_epi32(                                                            \
              is, _mm256_slli_epi32(                                                        \
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + k0)), 7));   \
      } else {                                                                              \
        /* past the last block: s = d = xs = 0 (qdot.h) */                                  \
        alignas(32) float dt[8] = {}, xt[8] = {}, m[8] = {};                                \
        alignas(32) int32_t qt[8] = {};                                                     \
        for (int k = 0; k < n; k++) {                                                       \
          dt[k] = d[k0 + k];                                                                \
          xt[k] = xs[k0 + k];                                                               \
          m[k] = 1.0f;                                                                      \
          if (qs) qt[k] = qs[k0 + k];                                                       \
        }                                                                                   \
        dv = _mm256_load_ps(dt);                                                            \
        xv = _mm256_load_ps(xt);                                                            \
        sv = _mm256_mul_ps(sv, _mm256_load_ps(m));                                          \
        if (qs)                                                                             \
          is = _mm256_add_epi32(                                                            \
              is, _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<__m256i*>(qt)), 7)); \
      }                                                                                     \
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(sv, dv), acc);            \
      acc = _mm256_fmadd_ps(bv, xv, acc);                                                   \
    }                                                                                       \
    const __m128 c =                                                                        \
        _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)); /* +4 */    \
    const __m128 e = _mm_add_ps(c, _mm_movehl_ps(c, c));                       /* +2 */    \
    return _mm_cvtss_f32(_mm_add_ss(e, _mm_shuffle_ps(e, e, 1)));             /* +1 */    \
  }

// The driver: rows in panels whose packed bytes stay in L2 while every token block runs over
// them; inside, R x U register blocks (tails with 1 row, fewer tokens).
#define MF_DRIVER(ATTR)                                                                       \
  template <class Q, int R, int U>                                                            \
  ATTR void int_sums(const QView& w, int64_t r, const int8_t* xq, int32_t* raw) {             \
    const int64_t nb = w.nb, n = w.cols;                                                      \
    for (int64_t k = 0; k < nb; k++) {                                                        \
      const int64_t c = k * kBlock;                                                           \
      __m256i xv[U];                                                                          \
      _Pragma("GCC unroll 32") for (int u = 0; u < U; u++) xv[u] =                            \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + u * n + c));               \
      _Pragma("GCC unroll 32") for (int i = 0; i < R; i++) {                                  \
        const __m256i wv = Q::load(w.row(r + i), c);                                          \
        _Pragma("GCC unroll 32") for (int u = 0; u < U; u++) _mm256_storeu_si256(             \
            reinterpret_cast<__m256i*>(raw + ((i * U + u) * nb + k) * 8),                     \
            dot<Q::kBits>(_mm256_setzero_si256(), wv, xv[u]));                                \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  template <class Q, int R, int U>                                                            \
  ATTR void block(const QView& w, int64_t r, const QuantizedActs& xa, int t0, int32_t* raw,   \
                  float* y, int64_t ys) {                                                     \
    int_sums<Q, R, U>(w, r, xa.q.data() + size_t(t0) * w.cols, raw);                          \
    const int32_t* qs = kOffsetQ8 && Q::kBits == 8 ? xa.qs.data() : nullptr;                  \
    for (int i = 0; i < R; i++)                                                               \
      for (int u = 0; u < U; u++) {                                                           \
        const size_t o = size_t(t0 + u) * w.nb;                                               \
        y[(t0 + u) * ys + r + i] =                                                            \
            combine(raw + (i * U + u) * w.nb * 8, w, w.s_row(r + i), w.b_row(r + i),          \
                    xa.d.data() + o, xa.xs.data() + o, qs ? qs + o : nullptr);                \
      }                                                                                       \
  }                                                                                           \
  template <class Q, int R>                                                                   \
  ATTR void block_u(int U, const QView& w, int64_t r, const QuantizedActs& xa, int t0,        \
                    int32_t* raw, float* y, int64_t ys) {                                     \
    switch (U) {                                                                              \
      case 1: return block<Q, R, 1>(w, r, xa, t0, raw, y, ys);                                \
      case 2: return block<Q, R, 2>(w, r, xa, t0, raw, y, ys);                                \
      case 3: return block<Q, R, 3>(w, r, xa, t0, raw, y, ys);                                \
      default: return block<Q, R, kPrefillU>(w, r, xa, t0, raw, y, ys);                       \
    }                                                                                         \
  }                                                                                           \
  template <class Q>                                                                          \
  ATTR void qmatmul(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,  \
                    int64_t ys) {                                                             \
    const QView w(W);                                                                         \
    const int T = xa.T;                                                                       \
    int32_t* raw = raw_scratch(size_t(kMaxRU) * size_t(w.nb) * 8);                           \
    if (T == 1) {                                                                             \
      int64_t r = r0;                                                                         \
      for (; r + kDecodeR <= r1; r += kDecodeR) block<Q, kDecodeR, 1>(w, r, xa, 0, raw, y, ys); \
      for (; r < r1; r++) block<Q, 1, 1>(w, r, xa, 0, raw, y, ys);                            \
      return;                                                                                 \
    }                                                                                         \
    const int64_t panel =                                                                     \
        std::clamp<int64_t>((int64_t(128) << 10) / std::max<int64_t>(w.row_bytes, 1) /        \
                                kPrefillR * kPrefillR, kPrefillR, 256);                       \
    for (int64_t rp = r0; rp < r1; rp += panel) {                                             \
      const int64_t rp1 = std::min(r1, rp + panel);                                           \
      for (int t0 = 0; t0 < T; t0 += kPrefillU) {                                             \
        const int U = std::min(kPrefillU, T - t0);                                            \
        int64_t r = rp;                                                                       \
        for (; r + kPrefillR <= rp1; r += kPrefillR)                                          \
          block_u<Q, kPrefillR>(U, w, r, xa, t0, raw, y, ys);                                 \
        for (; r < rp1; r++) block_u<Q, 1>(U, w, r, xa, t0, raw, y, ys);                      \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  ATTR void qmatmul_path(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa,       \
                         float* y, int64_t ys) {                                              \
    switch (W.dtype) {                                                                        \
      case DType::kQ8: return qmatmul<Q8Dec>(W, r0, r1, xa, y, ys);                           \
      case DType::kQ4: return qmatmul<Q4Dec>(W, r0, r1, xa, y, ys);                           \
      default: return qmatmul<Q2Dec>(W, r0, r1, xa, y, ys);                                   \
    }                                                                                         \
  }

// AVX2: u8 x s8 pairs by vpmaddubsw, then vpmaddwd by 1 into int32. A q8 code (up to 255)
// times 127, twice, would saturate int16, so q8 codes are taken as ws = q - 128: |ws| (up to
// 128, a valid u8) times xq with ws's sign, at most 2 * 128 * 127 per pair; the 128 * sum(xq)
// left out is added back in the combine (kOffsetQ8).
namespace avx2 {
constexpr bool kOffsetQ8 = true;
constexpr int kDecodeR = 4, kPrefillR = 4, kPrefillU = 1, kMaxRU = 4;
MF_DECODERS(MF_AVX2)
MF_COMBINE(MF_AVX2)
template <int Bits>
MF_AVX2 inline __m256i dot(__m256i acc, __m256i w, __m256i x) {
  __m256i p;
  if constexpr (Bits == 8) {
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80)));  // q - 128
    p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));  // |ws|<=128 as u8
  } else {
    p = _mm256_maddubs_epi16(w, x);
  }
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
MF_DRIVER(MF_AVX2)
}  // namespace avx2

// AVX-512 VNNI on ymm (EVEX: 32 vector registers, so larger register blocks): vpdpbusd sums
// four u8 x s8 products into each int32 lane with no intermediate saturation.
namespace vnni {
constexpr bool kOffsetQ8 = false;
constexpr int kDecodeR = 4, kPrefillR = 4, kPrefillU = 1, kMaxRU = 4;
MF_DECODERS(MF_VNNI)
MF_COMBINE(MF_VNNI)
template <int Bits>
MF_VNNI inline __m256i dot(__m256i acc, __m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(acc, w, x);
}
MF_DRIVER(MF_VNNI)
}  // namespace vnni

// ---------------------------------------------------------------------------------------------
// Dispatch.

using QmatmulFn = void (*)(const Mat&, int64_t, int64_t, const QuantizedActs&, float*, int64_t);

QdotPath detect_path() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return QdotPath::kVnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return QdotPath::kAvx2;
  return QdotPath::kScalar;
}

QmatmulFn path_fn(QdotPath p) {
  switch (p) {
    case QdotPath::kVnni:
      return vnni::qmatmul_path;
    case QdotPath::kAvx2:
      return avx2::qmatmul_path;
    default:
      return qmatmul_scalar;
  }
}

struct Active {
  std::atomic<QdotPath> path{best_qdot_path()};
  std::atomic<QmatmulFn> fn{path_fn(best_qdot_path())};
};
Active& active() {
  static Active a;
  return a;
}

// One 32-column block of activations (qdot.h): d = max|x| / 127, xq = nearbyint(x * (1 / d)) clamped to
// [-127, 127], stored in block_col order; xs = the sum of x in 8 lanes (lane j: the x with
// c = j (mod 8), left to right) added by the tree j += j+4, j += j+2, j += j+1; qs = sum xq.
// The AVX2 form does the same operations (a NaN aside), so it gives the same bytes.
void quantize_block_scalar(const float* x, int bits, int8_t* q, float& d, float& xs,
                           int32_t& qs) {
  constexpr int group = kBlock;
  float amax = 0.0f, lane[kLanes8] = {};
  for (int c = 0; c < group; c++) {
    amax = std::max(amax, std::fabs(x[c]));  // a NaN is skipped here; xs carries it
    lane[c % kLanes8] += x[c];
  }
  for (int j = 0; j < 4; j++) lane[j] = lane[j] + lane[j + 4];
  for (int j = 0; j < 2; j++) lane[j] = lane[j] + lane[j + 2];
  xs = lane[0] + lane[1];
  d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t sum = 0;
  for (int c0 = 0; c0 < group; c0 += kBlock)
    for (int p = 0; p < kBlock; p++) {
      // fmin/fmax also map a NaN product (Inf * 0) into range.
      const float v =
          std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(x[c0 + block_col(bits, p)] * id)));
      q[c0 + p] = int8_t(v);
      sum += int8_t(v);
    }
  qs = sum;
}

MF_AVX2 void quantize_block_avx2(const float* x, int bits, int8_t* q, float& d, float& xs,
                                 int32_t& qs) {
  constexpr int group = kBlock;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
  for (int c = 0; c < group; c += kLanes8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    sm = _mm256_add_ps(sm, v);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sm), _mm256_extractf128_ps(sm, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  xs = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  d = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  for (int c0 = 0; c0 < group; c0 += kBlock) {
    __m256i i[4];
    for (int k = 0; k < 4; k++) {
      const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c0 + 8 * k), id),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      i[k] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
      sum = _mm256_add_epi32(sum, i[k]);
    }
    // int32 -> int8 in column order (the packs work per 128-bit lane; the permute undoes it).
    __m256i b = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
        natural);
    if (bits == 4) {  // even columns, then odd ones
      b = _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11,
                                                  13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
                                                  7, 9, 11, 13, 15));
      b = _mm256_permute4x64_epi64(b, 0xd8);  // qwords 0, 2, 1, 3
    } else if (bits == 2) {  // position 8j + k = column 4k + j
      b = _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7,
                                                  11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10,
                                                  14, 3, 7, 11, 15));
      b = _mm256_permutevar8x32_epi32(b, natural);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c0), b);
  }
  const __m128i s4i = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  const __m128i s2i = _mm_add_epi32(s4i, _mm_unpackhi_epi64(s4i, s4i));
  qs = _mm_cvtsi128_si32(_mm_add_epi32(s2i, _mm_shuffle_epi32(s2i, 1)));
}

}  // namespace

void quantize_acts(const float* x, int T, int64_t cols, int group, int bits, QuantizedActs& out) {
  MF_CHECK(qdot_group_supported(group) && cols % group == 0);
  MF_CHECK(bits == 8 || bits == 4 || bits == 2);
  const int64_t blocks = cols / kBlock;
  out.T = T;
  out.cols = cols;
  out.group = group;
  out.bits = bits;
  out.blocks = blocks;
  out.q.resize(size_t(T) * size_t(cols));
  out.d.resize(size_t(T) * size_t(blocks));
  out.xs.resize(size_t(T) * size_t(blocks));
  out.qs.resize(size_t(T) * size_t(blocks));
  const bool simd = active().path.load(std::memory_order_relaxed) != QdotPath::kScalar;
  for (int t = 0; t < T; t++)
    for (int64_t k = 0; k < blocks; k++) {
      const size_t o = size_t(t) * blocks + size_t(k);
      const float* xb = x + size_t(t) * cols + k * kBlock;
      int8_t* qb = out.q.data() + size_t(t) * cols + k * kBlock;
      if (simd)
        quantize_block_avx2(xb, bits, qb, out.d[o], out.xs[o], out.qs[o]);
      else
        quantize_block_scalar(xb, bits, qb, out.d[o], out.xs[o], out.qs[o]);
    }
}

bool qdot_group_supported(int group) {
  const int bpg = group / kBlock;
  return group > 0 && group % kBlock == 0 && (8 % bpg == 0 || bpg % 8 == 0);
}

QdotPath best_qdot_path() {
  static const QdotPath best = detect_path();
  return best;
}

bool qdot_path_supported(QdotPath p) {
  switch (p) {
    case QdotPath::kVnni:
      return best_qdot_path() == QdotPath::kVnni;
    case QdotPath::kAvx2:
      return best_qdot_path() != QdotPath::kScalar;
    default:
      return true;
  }
}

void set_qdot_path(QdotPath p) {
  if (p == QdotPath::kAuto) p = best_qdot_path();
  if (!qdot_path_supported(p))
    fail(ErrorKind::kUnsupported, "int8 kernel path {} is not supported by this CPU",
         qdot_path_name(p));
  active().path = p;
  active().fn = path_fn(p);
}

QdotPath active_qdot_path() { return active().path; }

const char* qdot_path_name(QdotPath p) {
  switch (p) {
    case QdotPath::kAuto:
      return "auto";
    case QdotPath::kScalar:
      return "scalar";
    case QdotPath::kAvx2:
      return "avx2";
    case QdotPath::kVnni:
      return "avx512-vnni";
  }
  return "?";
}

void qmatmul_rows(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                  int64_t y_stride) {
  if (r0 >= r1 || xa.T <= 0) return;
  MF_CHECK(r0 >= 0 && r1 <= W.rows);
  MF_CHECK(is_quant_dtype(W.dtype) && W.scales && W.biases);
  MF_CHECK(xa.bits == quant_bits(W.dtype) && xa.group == W.group && xa.cols == W.cols);
  MF_CHECK(qdot_group_supported(W.group));
  active().fn.load(std::memory_order_relaxed)(W, r0, r1, xa, y, y_stride);
}

}  // namespace moeflux
