// qmatmul_rows: the int8 dot-product path (numerics in qdot.h). Three paths: a scalar
// reference, AVX2 (vpmaddubsw) and AVX-512 VNNI (vpdpbusd on zmm). Integer sums are exact, so
// the paths need only share the float combine, which they do op for op (one fma chain per
// output over the blocks, one over the groups for the bias, then one add).
//
// Layout of the work (SIMD): rows in panels of 16, repacked so that each int32 lane of a
// vector is one row (see "SIMD" below); the activations' 4 bytes of a step are broadcast, so
// after a block's 8 steps the lanes hold the 16 rows' exact block sums and the float combine
// costs 3 vector ops per 16 rows, token and 32-column block, with no horizontal reduction. The
// quantised activations are stored with each 32-column block in the order the weight decoder
// yields codes, so a q4 or q2 block is repacked with shifts and masks.
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
constexpr int kLanes8 = 8;   // lanes of the activation sums

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


// ---------------------------------------------------------------------------------------------
// Scalar reference.

inline int code_at(const uint8_t* row, int bits, int64_t c) {
  const int64_t bit = c * bits;
  return (row[bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
}

void qmatmul_scalar(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                    int64_t ys) {
  const QView w(W);
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t* row = w.row(r);
    const uint16_t* s = w.s_row(r);
    const uint16_t* b = w.b_row(r);
    for (int t = 0; t < xa.T; t++) {
      const int8_t* xq = xa.q.data() + size_t(t) * w.cols;
      const float* d = xa.d.data() + size_t(t) * w.nb;
      const float* gs = xa.gs.data() + size_t(t) * w.gpr;
      float acc = 0.0f;
      for (int64_t k = 0; k < w.nb; k++) {
        int32_t isum = 0;
        for (int p = 0; p < kBlock; p++)
          isum += code_at(row, w.bits, k * kBlock + block_col(w.bits, p)) *
                  int32_t(xq[k * kBlock + p]);
        const float sd = bf16_to_f32(s[k / w.bpg]) * d[k];
        acc = std::fma(float(isum), sd, acc);
      }
      float bacc = 0.0f;
      for (int64_t g = 0; g < w.gpr; g++) bacc = std::fma(bf16_to_f32(b[g]), gs[g], bacc);
      y[t * ys + r] = acc + bacc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SIMD. Rows go in panels of kPanel = 16: a panel's codes are first repacked so that one
// 64-byte vector holds, for one 4-position step j of one 32-column block k, the 4 codes of each
// of the 16 rows (lane i = row i, as u8, in the decoder's position order 4j..4j+3); the scales
// and biases of the panel become f32 [group][16 rows]. The kernel then broadcasts the 4
// activation bytes of step j of a token to every lane and takes the dot product of all 16 rows
// at once (vpdpbusd; vpmaddubsw + vpmaddwd on AVX2): after the 8 steps of a block each int32
// lane is isum_k of its row, exact, and the float combine of qdot.h runs on 16 rows per
// instruction: cvt, mul (s_g * d_k), fma. A panel is repacked once per call and serves every
// token, so prefill pays the repack once per weight.

constexpr int kPanel = 16;

#define MF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MF_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
// The code sources must inline into the kernels, or their 8 vectors go through memory.
#define MF_VNNI_INLINE                                                                        \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) \
  inline

// Per-thread scratch: the repacked codes [nb][8][16] u32 and the scales, biases [gpr][16].
struct PanelScratch {
  std::vector<uint32_t> codes;
  std::vector<float> s, b;
};
PanelScratch& panel_scratch(int64_t nb, int64_t gpr) {
  thread_local PanelScratch p;
  if (p.codes.size() < size_t(nb) * 8 * kPanel) p.codes.resize(size_t(nb) * 8 * kPanel);
  if (p.s.size() < size_t(gpr) * kPanel) {
    p.s.resize(size_t(gpr) * kPanel);
    p.b.resize(size_t(gpr) * kPanel);
  }
  return p;
}

// 4 x 4 transpose of dwords inside each 128-bit lane: y[m] lane L = row (m + 4L); out[j]
// element 4L + e = dword j of y[e] lane L, i.e. of row 4L + e.
MF_AVX2 inline void transpose4(const __m256i* y, __m256i* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpackhi_epi32(y[0], y[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(y[2], y[3]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
  out[0] = _mm256_unpacklo_epi64(t0, t2);
  out[1] = _mm256_unpackhi_epi64(t0, t2);
  out[2] = _mm256_unpacklo_epi64(t1, t3);
  out[3] = _mm256_unpackhi_epi64(t1, t3);
}

MF_AVX2 inline __m256i load2x128(const uint8_t* lo, const uint8_t* hi) {
  return _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// The panel's scales and biases as f32 [group][16 rows] (lanes past n: 0). Two groups per
// 32-bit gather (AVX2: two gathers of 8 lanes); bf16 -> f32 is a shift.
MF_AVX2 void convert_params(const QView& w, int64_t r, int n, PanelScratch& ps) {
  float* s = ps.s.data();
  float* b = ps.b.data();
  if (n < kPanel || w.gpr % 2) {
    for (int i = 0; i < kPanel; i++) {
      const uint16_t* sr = w.s_row(r + (i < n ? i : 0));
      const uint16_t* br = w.b_row(r + (i < n ? i : 0));
      for (int64_t g = 0; g < w.gpr; g++) {
        s[g * kPanel + i] = i < n ? bf16_to_f32(sr[g]) : 0.0f;
        b[g * kPanel + i] = i < n ? bf16_to_f32(br[g]) : 0.0f;
      }
    }
    return;
  }
  // Lane i reads the 4 bytes at row (r + i)'s group g: index gpr * i, in units of 2 bytes.
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(int(w.gpr)));
  const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
  for (int h = 0; h < 2; h++) {
    const uint16_t* s0 = w.s_row(r + 8 * h);
    const uint16_t* b0 = w.b_row(r + 8 * h);
    for (int64_t g = 0; g < w.gpr; g += 2) {
      const __m256i sv = _mm256_i32gather_epi32(reinterpret_cast<const int*>(s0 + g), idx, 2);
      const __m256i bv = _mm256_i32gather_epi32(reinterpret_cast<const int*>(b0 + g), idx, 2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + g * kPanel + 8 * h),
                          _mm256_slli_epi32(sv, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + (g + 1) * kPanel + 8 * h),
                          _mm256_and_si256(sv, hi));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + g * kPanel + 8 * h),
                          _mm256_slli_epi32(bv, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + (g + 1) * kPanel + 8 * h),
                          _mm256_and_si256(bv, hi));
    }
  }
}

// Repacks rows [r, r + n) (n <= 16; lanes past n repeat row r with zero scale and bias, so
// they stay finite and are never stored) into the scratch.
MF_AVX2 void repack_panel(const QView& w, int64_t r, int n, PanelScratch& ps) {
  const uint8_t* rows[kPanel];
  for (int i = 0; i < kPanel; i++) rows[i] = w.row(r + (i < n ? i : 0));
  uint32_t* out = ps.codes.data();
  const int64_t blk_bytes = int64_t(kBlock) * w.bits / 8;
  for (int64_t k = 0; k < w.nb; k++) {
    const int64_t o = k * blk_bytes;
    __m256i* dst = reinterpret_cast<__m256i*>(out + k * 8 * kPanel);
    for (int h = 0; h < 2; h++) {  // lanes 8h .. 8h + 7
      const uint8_t* const* rr = rows + 8 * h;
      __m256i y[4], tj[4];
      if (w.bits == 4) {
        for (int m = 0; m < 4; m++) y[m] = load2x128(rr[m] + o, rr[m + 4] + o);
        transpose4(y, tj);
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        for (int j = 0; j < 4; j++) {
          _mm256_storeu_si256(dst + 2 * j + h, _mm256_and_si256(tj[j], m4));
          _mm256_storeu_si256(dst + 2 * (j + 4) + h,
                              _mm256_and_si256(_mm256_srli_epi16(tj[j], 4), m4));
        }
      } else if (w.bits == 8) {
        for (int half = 0; half < 2; half++) {
          for (int m = 0; m < 4; m++)
            y[m] = load2x128(rr[m] + o + 16 * half, rr[m + 4] + o + 16 * half);
          transpose4(y, tj);
          for (int j = 0; j < 4; j++) _mm256_storeu_si256(dst + 2 * (j + 4 * half) + h, tj[j]);
        }
      } else {  // 2 bits: 8 bytes a row; step j = dword (j % 2) >> 2 (j / 2), masked
        long long q[8];
        for (int m = 0; m < 8; m++) std::memcpy(&q[m], rr[m] + o, 8);
        const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        const __m256i a =
            _mm256_permutevar8x32_epi32(_mm256_setr_epi64x(q[0], q[1], q[2], q[3]), idx);
        const __m256i bq =
            _mm256_permutevar8x32_epi32(_mm256_setr_epi64x(q[4], q[5], q[6], q[7]), idx);
        const __m256i d0 = _mm256_permute2x128_si256(a, bq, 0x20);  // dword 0 of rows 0..7
        const __m256i d1 = _mm256_permute2x128_si256(a, bq, 0x31);  // dword 1
        const __m256i m2 = _mm256_set1_epi8(0x03);
        for (int j = 0; j < 8; j++) {
          const __m256i v = (j % 2) ? d1 : d0;
          _mm256_storeu_si256(dst + 2 * j + h,
                              _mm256_and_si256(_mm256_srli_epi32(v, 2 * (j / 2)), m2));
        }
      }
    }
  }
  convert_params(w, r, n, ps);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// AVX-512 VNNI: 16 lanes in one zmm; U tokens share each code vector. The codes of a block
// come from the scratch (ScratchSrc: a panel repacked once for many tokens) or, for a few
// tokens (decode), are repacked in registers as they are used (DirectSrc, q8 and q4), which
// saves the scratch's stores and loads.
namespace vnni {
constexpr int kU = 8;        // tokens per register block
constexpr int kDirectT = 4;  // up to this many tokens, q8/q4 codes are repacked in registers

struct ScratchSrc {
  const __m512i* pk;
  MF_VNNI_INLINE void block(int64_t k, __m512i* wv) const {
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) wv[j] = _mm512_loadu_si512(pk + k * 8 + j);
  }
};

// 16 rows' 16 bytes at offset o: z[m] lane L = row m + 4L; then the 4 x 4 dword transpose in
// each lane: t[j] element 4L + e = dword j of row 4L + e.
MF_VNNI_INLINE void transpose16(const uint8_t* const* rows, int64_t o, __m512i* t) {
  __m512i z[4];
  _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) {
    const auto ld = [&](int i) {
      return _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + o));
    };
    z[m] = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(ld(m)), ld(m + 4), 1),
                           ld(m + 8), 2),
        ld(m + 12), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  t[0] = _mm512_unpacklo_epi64(t0, t2);
  t[1] = _mm512_unpackhi_epi64(t0, t2);
  t[2] = _mm512_unpacklo_epi64(t1, t3);
  t[3] = _mm512_unpackhi_epi64(t1, t3);
}

template <int Bits>
struct DirectSrc {
  const uint8_t* const* rows;
  MF_VNNI_INLINE void block(int64_t k, __m512i* wv) const {
    if constexpr (Bits == 4) {
      __m512i t[4];
      transpose16(rows, k * 16, t);
      const __m512i m4 = _mm512_set1_epi8(0x0f);
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
        wv[j] = _mm512_and_si512(t[j], m4);
        wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(t[j], 4), m4);
      }
    } else {
      transpose16(rows, k * 32, wv);
      transpose16(rows, k * 32 + 16, wv + 4);
    }
  }
};

template <int U, class Src>
MF_VNNI void kernel(const QView& w, const Src& src, const PanelScratch& ps,
                    const QuantizedActs& xa, int t0, int n, float* y, int64_t r, int64_t ys) {
  const int64_t nb = w.nb, cols = w.cols;
  const int8_t* xq[U];
  const float* d[U];
  _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
    xq[u] = xa.q.data() + size_t(t0 + u) * cols;
    d[u] = xa.d.data() + size_t(t0 + u) * nb;
  }
  __m512 acc[U];
  _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) acc[u] = _mm512_setzero_ps();
  const float* sp = ps.s.data();  // the scales of block k's group
  int kg = 0;                     // block k's index in its group
  for (int64_t k = 0; k < nb; k++) {
    __m512i wv[8];
    src.block(k, wv);
    __m512i ia[U];
    _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) ia[u] = _mm512_setzero_si512();
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
      _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) ia[u] = _mm512_dpbusd_epi32(
          ia[u], wv[j], _mm512_set1_epi32(load_i32(xq[u] + k * kBlock + 4 * j)));
    }
    const __m512 sv = _mm512_loadu_ps(sp);
    _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) acc[u] = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(ia[u]), _mm512_mul_ps(sv, _mm512_set1_ps(d[u][k])), acc[u]);
    if (++kg == w.bpg) {
      kg = 0;
      sp += kPanel;
    }
  }
  const __mmask16 m = __mmask16((1u << n) - 1);
  for (int u = 0; u < U; u++) {
    const float* gs = xa.gs.data() + size_t(t0 + u) * w.gpr;
    __m512 bacc = _mm512_setzero_ps();
    for (int64_t g = 0; g < w.gpr; g++)
      bacc = _mm512_fmadd_ps(_mm512_loadu_ps(ps.b.data() + g * kPanel), _mm512_set1_ps(gs[g]),
                             bacc);
    _mm512_mask_storeu_ps(y + (t0 + u) * ys + r, m, _mm512_add_ps(acc[u], bacc));
  }
}

// Every token of xa from t0 on, in register blocks of kU (tails: fewer).
template <class Src>
MF_VNNI void tokens(const QView& w, const Src& src, const PanelScratch& ps,
                    const QuantizedActs& xa, int t0, int n, float* y, int64_t r, int64_t ys) {
  const int T = xa.T;
  for (; t0 + kU <= T; t0 += kU) kernel<kU>(w, src, ps, xa, t0, n, y, r, ys);
  switch (T - t0) {
    case 1: return kernel<1>(w, src, ps, xa, t0, n, y, r, ys);
    case 2: return kernel<2>(w, src, ps, xa, t0, n, y, r, ys);
    case 3: return kernel<3>(w, src, ps, xa, t0, n, y, r, ys);
    case 4: return kernel<4>(w, src, ps, xa, t0, n, y, r, ys);
    case 5: return kernel<5>(w, src, ps, xa, t0, n, y, r, ys);
    case 6: return kernel<6>(w, src, ps, xa, t0, n, y, r, ys);
    case 7: return kernel<7>(w, src, ps, xa, t0, n, y, r, ys);
    default: return;
  }
}

template <int Bits>
MF_VNNI void qmatmul_bits(const QView& w, int64_t r0, int64_t r1, const QuantizedActs& xa,
                          float* y, int64_t ys) {
  PanelScratch& ps = panel_scratch(w.nb, w.gpr);
  const ScratchSrc scratch{reinterpret_cast<const __m512i*>(ps.codes.data())};
  for (int64_t r = r0; r < r1; r += kPanel) {
    const int n = int(std::min<int64_t>(kPanel, r1 - r));
    if constexpr (Bits == 2) {
      repack_panel(w, r, n, ps);
      tokens(w, scratch, ps, xa, 0, n, y, r, ys);
    } else {
      const uint8_t* rows[kPanel];
      for (int i = 0; i < kPanel; i++) rows[i] = w.row(r + (i < n ? i : 0));
      convert_params(w, r, n, ps);
      const DirectSrc<Bits> direct{rows};
      if (xa.T <= kDirectT) {
        tokens(w, direct, ps, xa, 0, n, y, r, ys);
      } else {
        auto* out = reinterpret_cast<__m512i*>(ps.codes.data());
        for (int64_t k = 0; k < w.nb; k++) {
          __m512i wv[8];
          direct.block(k, wv);
          for (int j = 0; j < 8; j++) _mm512_storeu_si512(out + k * 8 + j, wv[j]);
        }
        tokens(w, scratch, ps, xa, 0, n, y, r, ys);
      }
    }
  }
}
MF_VNNI void qmatmul(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                     int64_t ys) {
  const QView w(W);
  switch (w.bits) {
    case 8: return qmatmul_bits<8>(w, r0, r1, xa, y, ys);
    case 4: return qmatmul_bits<4>(w, r0, r1, xa, y, ys);
    default: return qmatmul_bits<2>(w, r0, r1, xa, y, ys);
  }
}
}  // namespace vnni

// AVX2: the 16 lanes as two ymm halves. vpmaddubsw (u8 x s8 pairs into int16) then vpmaddwd
// by 1 into int32. A q8 code (up to 255) times 127, twice, would saturate int16, so q8 codes
// are taken as ws = q - 128: |ws| (up to 128, a valid u8) times xq with ws's sign, at most
// 2 * 128 * 127 per pair; 128 * (the block's sum of xq) is added back to every lane before the
// float combine, so the int32 isum_k is the same as on the other paths.
namespace avx2 {
constexpr int kU = 2;
template <int Bits, int U>
MF_AVX2 void kernel(const QView& w, const PanelScratch& ps, const QuantizedActs& xa, int t0,
                    int n, float* y, int64_t r, int64_t ys) {
  const int64_t nb = w.nb, cols = w.cols;
  const auto* pk = reinterpret_cast<const __m256i*>(ps.codes.data());
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq[U];
  const float* d[U];
  const int32_t* qs[U];
  for (int u = 0; u < U; u++) {
    xq[u] = xa.q.data() + size_t(t0 + u) * cols;
    d[u] = xa.d.data() + size_t(t0 + u) * nb;
    qs[u] = xa.qs.data() + size_t(t0 + u) * nb;
  }
  __m256 acc[U][2];
  for (int u = 0; u < U; u++) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  const float* sp = ps.s.data();  // the scales of block k's group
  int kg = 0;                     // block k's index in its group
  for (int64_t k = 0; k < nb; k++) {
    __m256i ia[U][2];
    _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) ia[u][0] = ia[u][1] =
        _mm256_setzero_si256();
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
      _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
        const __m256i wv = _mm256_loadu_si256(pk + (k * 8 + j) * 2 + h);
        if constexpr (Bits == 8) {
          const __m256i ws = _mm256_xor_si256(wv, _mm256_set1_epi8(char(0x80)));  // q - 128
          const __m256i wa = _mm256_abs_epi8(ws);  // |ws| <= 128 as u8
          _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
            const __m256i xv = _mm256_set1_epi32(load_i32(xq[u] + k * kBlock + 4 * j));
            ia[u][h] = _mm256_add_epi32(
                ia[u][h], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, ws)),
                                            ones));
          }
        } else {
          _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
            const __m256i xv = _mm256_set1_epi32(load_i32(xq[u] + k * kBlock + 4 * j));
            ia[u][h] = _mm256_add_epi32(
                ia[u][h], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
          }
        }
      }
    }
    _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
      const __m256 dv = _mm256_set1_ps(d[u][k]);
      __m256i off = _mm256_setzero_si256();
      if constexpr (Bits == 8) off = _mm256_set1_epi32(qs[u][k] * 128);
      _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) acc[u][h] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(_mm256_add_epi32(ia[u][h], off)),
          _mm256_mul_ps(_mm256_loadu_ps(sp + 8 * h), dv), acc[u][h]);
    }
    if (++kg == w.bpg) {
      kg = 0;
      sp += kPanel;
    }
  }
  for (int u = 0; u < U; u++) {
    const float* gs = xa.gs.data() + size_t(t0 + u) * w.gpr;
    alignas(32) float out[kPanel];
    for (int h = 0; h < 2; h++) {
      __m256 bacc = _mm256_setzero_ps();
      for (int64_t g = 0; g < w.gpr; g++)
        bacc = _mm256_fmadd_ps(_mm256_loadu_ps(ps.b.data() + g * kPanel + 8 * h),
                               _mm256_set1_ps(gs[g]), bacc);
      _mm256_store_ps(out + 8 * h, _mm256_add_ps(acc[u][h], bacc));
    }
    std::memcpy(y + (t0 + u) * ys + r, out, size_t(n) * sizeof(float));
  }
}
template <int Bits>
MF_AVX2 void qmatmul_bits(const QView& w, int64_t r0, int64_t r1, const QuantizedActs& xa,
                          float* y, int64_t ys) {
  PanelScratch& ps = panel_scratch(w.nb, w.gpr);
  const int T = xa.T;
  for (int64_t r = r0; r < r1; r += kPanel) {
    const int n = int(std::min<int64_t>(kPanel, r1 - r));
    repack_panel(w, r, n, ps);
    int t0 = 0;
    for (; t0 + kU <= T; t0 += kU) kernel<Bits, kU>(w, ps, xa, t0, n, y, r, ys);
    if (t0 < T) kernel<Bits, 1>(w, ps, xa, t0, n, y, r, ys);
  }
}
MF_AVX2 void qmatmul(const Mat& W, int64_t r0, int64_t r1, const QuantizedActs& xa, float* y,
                     int64_t ys) {
  const QView w(W);
  switch (w.bits) {
    case 8: return qmatmul_bits<8>(w, r0, r1, xa, y, ys);
    case 4: return qmatmul_bits<4>(w, r0, r1, xa, y, ys);
    default: return qmatmul_bits<2>(w, r0, r1, xa, y, ys);
  }
}
}  // namespace avx2

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
      return vnni::qmatmul;
    case QdotPath::kAvx2:
      return avx2::qmatmul;
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
  const int64_t groups = cols / group, bpg = group / kBlock;
  out.gs.resize(size_t(T) * size_t(groups));
  const bool simd = active().path.load(std::memory_order_relaxed) != QdotPath::kScalar;
  for (int t = 0; t < T; t++) {
    for (int64_t k = 0; k < blocks; k++) {
      const size_t o = size_t(t) * blocks + size_t(k);
      const float* xb = x + size_t(t) * cols + k * kBlock;
      int8_t* qb = out.q.data() + size_t(t) * cols + k * kBlock;
      if (simd)
        quantize_block_avx2(xb, bits, qb, out.d[o], out.xs[o], out.qs[o]);
      else
        quantize_block_scalar(xb, bits, qb, out.d[o], out.xs[o], out.qs[o]);
    }
    // The group sums of x: its blocks' xs, left to right.
    const float* xs = out.xs.data() + size_t(t) * blocks;
    for (int64_t g = 0; g < groups; g++) {
      float sum = xs[g * bpg];
      for (int64_t k = 1; k < bpg; k++) sum = sum + xs[g * bpg + k];
      out.gs[size_t(t) * groups + size_t(g)] = sum;
    }
  }
}

bool qdot_group_supported(int group) { return group > 0 && group % kBlock == 0; }

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
