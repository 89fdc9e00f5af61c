// Fused attention on the emulator (attention_contract.h): few query rows by a per-head kernel (attend_few_rows_bf16
// on AVX512-BF16, attend_few_rows on AVX-512, attend_few_rows_avx2 on the avx2 set, else the unpacked GEMM
// kernels), many rows cache-blocked in blocks of query rows of one head (attend_many_rows: on AMX, on the avx2 set
// its own fused AVX2 kernel, else the active GEMM kernel set); the softmax in fp32 between the products, P rounded
// to bf16 and the division by the row sum after PV.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../packing.h"
#include "emulator.h"
#include "emulator_attention_avx512.h"
#include "emulator_isa.h"

namespace xdna::kernels {
namespace {

// exp(x) for x <= 0 in fp32 as 2^t, t = x log2(e) rounded to fp32: 2^n exact by the exponent bits (n = rint(t)) times
// a degree-3 polynomial in f = t - n (exact), |f| <= 1/2 (a relative minimax fit of 2^f, fp32 coefficients). P is
// rounded to bf16 (2^-8) right after, so a long polynomial buys nothing: checked over every float in [-87, 0], the
// relative error is at most 2^-13.6 here and in emulator_attention_avx512.h's FMA form (attention_contract.h's
// allowance: 2^-13.5; most of it the fit's 2^-13.7, the rest t's rounding, at most 87 2^-24). Branch-free so that
// the row loop vectorises. Below -87 it returns 0: the exact value (< 2^-125) is lost against the row's largest
// weight, exp(0) = 1. The constants: emu::kExp2Poly (emulator_attention_avx512.h).
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);
  const float t = xc * emu::kLog2e;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (|t| < 2^22)
  const float f = t - n;
  const float p = ((emu::kExp2Poly[3] * f + emu::kExp2Poly[2]) * f + emu::kExp2Poly[1]) * f + emu::kExp2Poly[0];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : p * scale;
}

// round_to_bf16 without its NaN case (exp_nonpositive never returns NaN), so that the row loop vectorises.
inline float round_finite_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A float's bits as an int32 that orders like the float (NaNs aside): integer max reductions vectorise, float
// ones (NaN semantics) do not.
inline int32_t ordered_key(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b ^ ((b >> 31) & 0x7fffffff);
}

// One row of scores: scaled, the mask row added (mask: null or T floats), max subtracted, exp'd and rounded to bf16
// in place; returns the row sum l. NaN or +Inf among the scores (or only -Inf) makes the row NaN, as ORT's Softmax
// gives; under the NaN rule (zero_nan) its weights are 0 instead and l is 1 (attention_contract.h).
// Cloned per ISA (GCC picks one at load time): AVX-512 and AVX2 run the row loops 16 and 8 wide. No FMA
// contraction (CMakeLists), so every clone gives the same bits.
__attribute__((target_clones("avx512f", "avx2", "default"))) float softmax_row(float* s, int64_t T, float scale,
                                                                               const float* mask, bool zero_nan) {
  int32_t nan = 0, max_key = std::numeric_limits<int32_t>::min();
  for (int64_t t = 0; t < T; ++t) s[t] *= scale;
  if (mask)
    for (int64_t t = 0; t < T; ++t) s[t] += mask[t];
  for (int64_t t = 0; t < T; ++t) nan |= s[t] != s[t];
  for (int64_t t = 0; t < T; ++t) max_key = std::max(max_key, ordered_key(s[t]));
  const int32_t mb = max_key ^ ((max_key >> 31) & 0x7fffffff);
  float mx;
  std::memcpy(&mx, &mb, sizeof mx);
  if (nan || !std::isfinite(mx)) {
    std::fill(s, s + T, zero_nan ? 0.f : std::numeric_limits<float>::quiet_NaN());
    return zero_nan ? 1.f : std::numeric_limits<float>::quiet_NaN();
  }
  for (int64_t t = 0; t < T; ++t) s[t] = round_finite_to_bf16(exp_nonpositive(s[t] - mx));
  // 16 partial sums: one serial chain would cost an add's latency per score (the order is not in the contract).
  constexpr int64_t L = 16;
  float sum_l[L] = {};
  int64_t t = 0;
  for (; t + L <= T; t += L)
    for (int64_t j = 0; j < L; ++j) sum_l[j] += s[t + j];
  for (; t < T; ++t) sum_l[0] += s[t];
  float l = 0.f;
  for (int64_t j = 0; j < L; ++j) l += sum_l[j];
  return l;
}

// Row m of a head's mask, or null.
inline const float* mask_row(const AttentionHead& h, int64_t m) { return h.mask ? h.mask + m * h.mask_stride_m : nullptr; }

// Softmax over the M rows of T scores of each of `count` heads (row r at s + r * T, head r / M), sums into l; then
// nothing else touches them.
void softmax_rows(float* s, float* l, const AttentionShape& sh, const AttentionHead* heads, size_t count,
                  int threads) {
  constexpr int64_t kRowsPerTask = 16;
  const int64_t rows = static_cast<int64_t>(count) * sh.M, T = sh.T;
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  emulator_parallel_for(rows * T < (int64_t{1} << 16) ? 1 : threads, tasks, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask; r < std::min(rows, (task + 1) * kRowsPerTask); ++r)
      l[r] = softmax_row(s + r * T, T, sh.scale, mask_row(heads[r / sh.M], r % sh.M), sh.zero_nan_rows);
  });
}

void divide_rows(float* o, int64_t ldo, int64_t M, int64_t Dv, const float* l) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < Dv; ++n) o[m * ldo + n] /= l[m];
}

// The helpers below are always inlined, so their vector ABI (-Wpsabi) never shows. They and attend_few_rows are
// built for avx512f (few_row_kernel checks the CPU first), so that they may use its intrinsics.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC push_options
#pragma GCC target("avx512f")
// 16 fp32 lanes as GCC vector extensions: one zmm in attend_few_rows (built for avx512f).
using f32x16 = float __attribute__((vector_size(64)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

__attribute__((always_inline)) inline f32x16 load_f32x16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// round_to_bf16 on 16 lanes, NaN kept a quiet NaN as f32_to_bf16 does.
__attribute__((always_inline)) inline f32x16 round_to_bf16_x16(const f32x16& x) {
  const u32x16 u = reinterpret_cast<const u32x16&>(x);
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  // x != x: one unordered compare (this file is built without -ffast-math, so it stays a NaN test).
  u32x16 r = x != x ? (u & 0xffff0000u) | 0x00400000u : rounded;
  return reinterpret_cast<f32x16&>(r);
}

// 16 consecutive K or V elements as the contract reads them: fp32 rounded to bf16, or bf16 widened (exact).
__attribute__((always_inline)) inline f32x16 load_bf16_x16(const float* p) { return round_to_bf16_x16(load_f32x16(p)); }
// One widening load (VPMOVZXWD from memory): GCC 12 lowers __builtin_convertvector u16x16 -> u32x16 to two
// half-width widenings plus an extract and an insert, four shuffle-port uops per vector (as in
// emulator_kernels.inc's load_bf16). The same bits.
__attribute__((always_inline)) inline f32x16 load_bf16_x16(const uint16_t* p) {
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<const f32x16&>(w);
}
inline float load_bf16(const float* p) { return round_to_bf16(*p); }
inline float load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }

// The 16 lanes summed as a tree (lane j with lane j + 8, then + 4, ...).
__attribute__((always_inline)) inline float sum_lanes(const f32x16& v) {
  using f32x8 = float __attribute__((vector_size(32)));
  using f32x4 = float __attribute__((vector_size(16)));
  const f32x8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// Four keys' 16-lane partial sums reduced to their four sums at once (a fixed tree: the same bits on every ISA).
__attribute__((always_inline)) inline void sum_lanes_x4(const f32x16* acc, float* out) {
  using f32x8 = float __attribute__((vector_size(32)));
  using f32x4 = float __attribute__((vector_size(16)));
  const f32x16 ab = __builtin_shufflevector(acc[0], acc[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(acc[0], acc[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const f32x16 cd = __builtin_shufflevector(acc[2], acc[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(acc[2], acc[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes: a a a a b b b b c c c c d d d d
  const f32x16 abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                      __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const f32x8 pairs = __builtin_shufflevector(abcd, abcd, 0, 1, 4, 5, 8, 9, 12, 13) +
                      __builtin_shufflevector(abcd, abcd, 2, 3, 6, 7, 10, 11, 14, 15);
  const f32x4 sums = __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) + __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
  std::memcpy(out, &sums, sizeof sums);
}

// Scores of R query rows (qb: bf16 Q rows, D apart) against all T keys, four keys at a time: per key one 16-lane
// dot product per row, the key's row rounded once for all R rows, the accumulators in registers.
template <int R, typename KV>
__attribute__((always_inline)) inline void scores_rows(const float* qb, const KV* k, int64_t ldk, int64_t T,
                                                       int64_t D, float* s) {
  const int64_t D16 = D / kLanes * kLanes;
  constexpr int kKeys = 4;
  int64_t t = 0;
  for (; t + kKeys <= T; t += kKeys) {
    f32x16 acc[R][kKeys] = {};
    for (int64_t d = 0; d < D16; d += kLanes) {
      f32x16 kv[kKeys];
      for (int j = 0; j < kKeys; ++j) kv[j] = load_bf16_x16(k + (t + j) * ldk + d);
      for (int r = 0; r < R; ++r) {
        const f32x16 qv = load_f32x16(qb + r * D + d);
        for (int j = 0; j < kKeys; ++j) acc[r][j] += qv * kv[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      sum_lanes_x4(acc[r], s + r * T + t);
      for (int64_t d = D16; d < D; ++d)
        for (int j = 0; j < kKeys; ++j) s[r * T + t + j] += qb[r * D + d] * load_bf16(k + (t + j) * ldk + d);
    }
  }
  for (; t < T; ++t) {
    const KV* kr = k + t * ldk;
    f32x16 acc[R] = {};
    for (int64_t d = 0; d < D16; d += kLanes) {
      const f32x16 kv = load_bf16_x16(kr + d);
      for (int r = 0; r < R; ++r) acc[r] += load_f32x16(qb + r * D + d) * kv;
    }
    for (int r = 0; r < R; ++r) {
      float tail = 0.f;
      for (int64_t d = D16; d < D; ++d) tail += qb[r * D + d] * load_bf16(kr + d);
      s[r * T + t] = sum_lanes(acc[r]) + tail;
    }
  }
}

// O[r][n0 + 16 j + i] = (P V) / l for R rows of bf16 weights p (T apart) and NB blocks of 16 columns from n0: V
// rounded to bf16 as read, each key's V row (NB blocks) read once for all R rows, the sums in registers.
template <int R, int NB, typename KV>
__attribute__((always_inline)) inline void weighted_values_block(const float* p, int64_t T, const float* l,
                                                                 const KV* v, int64_t ldv, float* o,
                                                                 int64_t ldo) {
  f32x16 acc[R][NB] = {};
  for (int64_t t = 0; t < T; ++t) {
    f32x16 vv[NB];
    for (int j = 0; j < NB; ++j) vv[j] = load_bf16_x16(v + t * ldv + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float w = p[r * T + t];
      for (int j = 0; j < NB; ++j) acc[r][j] += w * vv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      const f32x16 out = acc[r][j] / l[r];
      std::memcpy(o + r * ldo + j * kLanes, &out, sizeof out);
    }
}

// O rows = (P V) / l for R rows: 64 columns at a time (a head of 64 in one pass over V), then 16, then a scalar tail.
template <int R, typename KV>
__attribute__((always_inline)) inline void weighted_values_rows(const float* p, const float* l, const KV* v,
                                                                 int64_t ldv, int64_t T, int64_t Dv, float* o,
                                                                 int64_t ldo) {
  int64_t n = 0;
  for (; n + 4 * kLanes <= Dv; n += 4 * kLanes) weighted_values_block<R, 4, KV>(p, T, l, v + n, ldv, o + n, ldo);
  for (; n + kLanes <= Dv; n += kLanes) weighted_values_block<R, 1, KV>(p, T, l, v + n, ldv, o + n, ldo);
  for (int r = 0; r < R; ++r)
    for (int64_t c = n; c < Dv; ++c) {
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) sum += p[r * T + t] * load_bf16(v + t * ldv + c);
      o[r * ldo + c] = sum / l[r];
    }
}

// One head with few query rows (M <= kUnpackedMaxM), K as rows (K[t][d] = kt[t * kt_stride_t + d]) and V as rows
// (V[t][n] = v[t * v_stride_t + n]), in one pass while the head's K and V are hot: QK^T as dot products over d,
// the softmax, PV accumulated over t, then the division; K and V rounded to bf16 as they are read, rows taken 5 at
// a time. s holds M * T scores, qb M * D. Every product is exact (bf16 x bf16), so FMA or not gives the same bits.
// K and V are each fp32 or bf16 (KT, VT: float or uint16_t). Built for avx512f only: see few_row_kernel.
template <typename KT, typename VT>
void attend_few_rows(const AttentionShape& shape, const AttentionHead& h,
                                                         const KT* k, const VT* v, float* s, float* qb, float* l) {
  const int64_t M = shape.M, T = shape.T, D = shape.D, Dv = shape.Dv;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t d = 0; d < D; ++d) qb[m * D + d] = round_to_bf16(h.q[m * h.ldq + d]);
  constexpr int64_t kRowBlock = 5;  // five beams' rows in one pass over K and V (25 of avx512's 32 registers)
  for (int64_t m = 0; m < M; m += kRowBlock) {
    const float* q_rows = qb + m * D;
    float* s_rows = s + m * T;
    switch (std::min(kRowBlock, M - m)) {
      case 1: scores_rows<1>(q_rows, k, h.kt_stride_t, T, D, s_rows); break;
      case 2: scores_rows<2>(q_rows, k, h.kt_stride_t, T, D, s_rows); break;
      case 3: scores_rows<3>(q_rows, k, h.kt_stride_t, T, D, s_rows); break;
      case 4: scores_rows<4>(q_rows, k, h.kt_stride_t, T, D, s_rows); break;
      default: scores_rows<5>(q_rows, k, h.kt_stride_t, T, D, s_rows); break;
    }
  }
  for (int64_t m = 0; m < M; ++m) l[m] = softmax_row(s + m * T, T, shape.scale, mask_row(h, m), shape.zero_nan_rows);
  for (int64_t m = 0; m < M; m += kRowBlock) {
    const float* p_rows = s + m * T;
    float* o_rows = h.o + m * h.ldo;
    switch (std::min(kRowBlock, M - m)) {
      case 1: weighted_values_rows<1>(p_rows, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 2: weighted_values_rows<2>(p_rows, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 3: weighted_values_rows<3>(p_rows, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 4: weighted_values_rows<4>(p_rows, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      default: weighted_values_rows<5>(p_rows, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
    }
  }
}

#pragma GCC pop_options

// ---- Few query rows on AVX512-BF16 (VDPBF16PS): K and V read as bf16 pairs, no widening ----
// The same contract as attend_few_rows with other sum orders (the contract leaves them free): S by VDPBF16PS over
// pairs of d (K's bf16 rows read as they lie, Q rounded to bf16 once), sixteen keys' 16-lane sums reduced together;
// P V by VDPBF16PS over pairs of keys (two V rows interleaved, P's bf16 pair broadcast). Every product is exact; the
// instruction treats subnormal inputs as zero and flushes subnormal sums, which the contract allows (gemm_contract.h;
// the tests' absolute TINY), as TDPBF16PS in the many-row path does. Each row's arithmetic is its own and no sum
// depends on a key's position in its block, so the bits do not depend on M, on the rows grouped or on the threads.
#define XDNA_BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Growing per-thread scratch, never value-initialised (the previous kernel's per-call zero-filled vectors cost ~4%
// of a decoder step).
template <typename E>
E* scratch(std::unique_ptr<E[]>& buf, size_t& capacity, size_t n) {
  if (n > capacity) {
    buf.reset(new E[n]);
    capacity = n;
  }
  return buf.get();
}

struct FewRowScratch {
  std::unique_ptr<uint16_t[]> q, k;
  std::unique_ptr<uint32_t[]> p;
  std::unique_ptr<float[]> s;
  size_t q_cap = 0, k_cap = 0, p_cap = 0, s_cap = 0;
};

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// rows x cols of fp32 src (row stride ld) rounded to bf16 (to nearest even by VCVTNE2PS2BF16: as the contract, but
// for subnormals, which it flushes to zero, as VDPBF16PS then does with subnormal bf16 anyway) into rows of `width`
// (>= cols, a multiple of 32) elements, zero-padded.
XDNA_BF16_KERNEL void bf16_rows(const float* src, int64_t ld, int64_t rows, int64_t cols, int64_t width,
                                 uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; c += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(emu::lanes_below(c, cols), src + r * ld + c);
      const __m512 hi = _mm512_maskz_loadu_ps(emu::lanes_below(c + 16, cols), src + r * ld + c + 16);
      const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
      _mm512_storeu_si512(dst + r * width + c, reinterpret_cast<const __m512i&>(both));
    }
}

XDNA_BF16_KERNEL inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Sixteen keys' 16-lane partial sums to one vector of their sums (key j in lane j), one fixed tree for every key:
// lane i + lane i+8, then the 4-lane quarters, pairs, single lanes.
XDNA_BF16_KERNEL inline __m512 sum_lanes_x16(const __m512* a) {
  __m512 r8[8], r4[4], r2[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: key j, 8-15: key j+8
    r8[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xee));
  for (int j = 0; j < 4; ++j)  // quarters: keys j, j+8, j+4, j+12
    r4[j] = _mm512_add_ps(_mm512_shuffle_f32x4(r8[j], r8[j + 4], 0x88), _mm512_shuffle_f32x4(r8[j], r8[j + 4], 0xdd));
  for (int j = 0; j < 2; ++j)  // per quarter two keys, two lanes each: (j, j+2), (j+8, j+10), (j+4, j+6), (j+12, j+14)
    r2[j] = _mm512_add_ps(_mm512_shuffle_ps(r4[j], r4[j + 2], 0x44), _mm512_shuffle_ps(r4[j], r4[j + 2], 0xee));
  // per quarter: keys 0 2 1 3 | 8 10 9 11 | 4 6 5 7 | 12 14 13 15
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(r2[0], r2[1], 0x88), _mm512_shuffle_ps(r2[0], r2[1], 0xdd));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, r);
}

// Scores of one bf16 query row (D rounded up to 32, zero-padded) against n <= 16 keys (bf16 rows ldk apart): C
// chunks of 32 (0: D / 32 rounded up, read at run time), the last one read through `tail`.
template <bool kFull, int C>
XDNA_BF16_KERNEL inline void scores_x16(const uint16_t* q, const uint16_t* k, int64_t ldk, int64_t D, int n,
                                        float* out) {
  const int64_t chunks = C > 0 ? C : (D + 31) / 32;
  const __mmask32 tail = D % 32 ? static_cast<__mmask32>((uint32_t{1} << (D % 32)) - 1) : ~__mmask32{0};
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    acc[j] = _mm512_setzero_ps();
    if (!kFull && j >= n) continue;
    const uint16_t* kj = k + j * ldk;
#pragma GCC unroll 4
    for (int64_t c = 0; c + 1 < chunks; ++c)
      acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_loadu_si512(q + 32 * c)), as_bh(_mm512_loadu_si512(kj + 32 * c)));
    const int64_t c = chunks - 1;
    acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_loadu_si512(q + 32 * c)),
                              as_bh(_mm512_maskz_loadu_epi16(tail, kj + 32 * c)));
  }
  const __m512 sums = sum_lanes_x16(acc);
  if (kFull) _mm512_storeu_ps(out, sums);
  else _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), sums);
}

// Scores of M bf16 query rows (D32 apart) against all T keys (rows ldk apart), sixteen at a time: bf16 keys read as
// they lie, fp32 ones rounded block by block into `block` (16 x D32, in L1) for all M rows. Meanwhile the same keys'
// V rows (v_bytes each, v_row_bytes apart) are prefetched into L2, so that P V, which waited on memory for them, finds
// them there (a harness with the K/V evicted between calls measured ~10-15% less time; the shared VM is noisy).
// Prefetching the keys themselves measured no gain: the hardware prefetchers follow that stream.
template <int C, typename KT>
XDNA_BF16_KERNEL void scores_rows_bf16(const uint16_t* qb, int64_t M, int64_t D32, const KT* k, int64_t ldk,
                                       int64_t T, int64_t D, float* s, uint16_t* block, const char* v,
                                       int64_t v_row_bytes, int64_t v_bytes) {
  for (int64_t t = 0; t < T; t += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, T - t));
    for (int j = 0; j < n; ++j)  // the same keys' V rows on their way to L2 while the scores are computed
      for (int64_t b = 0; b < v_bytes; b += 64) _mm_prefetch(v + (t + j) * v_row_bytes + b, _MM_HINT_T1);
    const uint16_t* kb;
    int64_t ld;
    if constexpr (std::is_same_v<KT, uint16_t>) {
      kb = k + t * ldk;
      ld = ldk;
    } else {
      bf16_rows(k + t * ldk, ldk, n, D, D32, block);
      kb = block;
      ld = D32;
    }
    if (n == 16)
      for (int64_t m = 0; m < M; ++m) scores_x16<true, C>(qb + m * D32, kb, ld, D, 16, s + m * T + t);
    else
      for (int64_t m = 0; m < M; ++m) scores_x16<false, C>(qb + m * D32, kb, ld, D, n, s + m * T + t);
  }
}

// acc += the P V products of one pair of keys (V rows a and b as NB chunks of 32 bf16) for R rows.
template <int R, int NB>
XDNA_BF16_KERNEL __attribute__((always_inline)) inline void accumulate_pair(__m512 (&lo)[R][NB], __m512 (&hi)[R][NB],
                                                                            const __m512i* a, const __m512i* b,
                                                                            const uint32_t* pp, int64_t ldp) {
  __m512i even[NB], odd[NB];
  for (int c = 0; c < NB; ++c) {
    even[c] = _mm512_unpacklo_epi16(a[c], b[c]);
    odd[c] = _mm512_unpackhi_epi16(a[c], b[c]);
  }
  for (int r = 0; r < R; ++r) {
    const __m512bh w = as_bh(_mm512_set1_epi32(static_cast<int>(pp[r * ldp])));
    for (int c = 0; c < NB; ++c) {
      lo[r][c] = _mm512_dpbf16_ps(lo[r][c], w, as_bh(even[c]));
      hi[r][c] = _mm512_dpbf16_ps(hi[r][c], w, as_bh(odd[c]));
    }
  }
}

// O[r][n0 .. n0 + 32 NB) = (P V) / l for R rows from their P pairs (pp: rows ldp pairs apart, the odd key's partner
// zero) and V's bf16 rows from column n0: all 32 NB columns, or (kMasked) `cols` of them, the rest read as zero.
template <int R, int NB, bool kMasked, typename VT>
XDNA_BF16_KERNEL inline void weighted_values_x32(const uint32_t* pp, int64_t ldp, const float* l, const VT* v,
                                                 int64_t ldv, int64_t T, int64_t cols, float* o, int64_t ldo) {
  __m512 lo[R][NB], hi[R][NB];  // lanes: columns 0-3, 8-11, 16-19, 24-27 (lo) and 4-7, ... (hi) of each chunk
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NB; ++c) lo[r][c] = hi[r][c] = _mm512_setzero_ps();
  __mmask32 mask[NB];
  for (int c = 0; c < NB; ++c) {
    const int64_t left = cols - 32 * c;
    mask[c] = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << std::max<int64_t>(left, 0)) - 1);
  }
  const auto load = [&](const VT* row, int c) XDNA_BF16_KERNEL {
    if constexpr (std::is_same_v<VT, uint16_t>) {
      return kMasked ? _mm512_maskz_loadu_epi16(mask[c], row + 32 * c) : _mm512_loadu_si512(row + 32 * c);
    } else {  // fp32 rounded as in bf16_rows
      const __m512 lo16 = kMasked ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask[c]), row + 32 * c)
                                  : _mm512_loadu_ps(row + 32 * c);
      const __m512 hi16 = kMasked ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask[c] >> 16), row + 32 * c + 16)
                                  : _mm512_loadu_ps(row + 32 * c + 16);
      const __m512bh both = _mm512_cvtne2ps_pbh(hi16, lo16);
      return reinterpret_cast<const __m512i&>(both);
    }
  };
  int64_t t2 = 0;
  for (; 2 * t2 + 1 < T; ++t2) {
    const VT* v0 = v + 2 * t2 * ldv;
    __m512i a[NB], b[NB];
    for (int c = 0; c < NB; ++c) {
      a[c] = load(v0, c);
      b[c] = load(v0 + ldv, c);
    }
    accumulate_pair<R, NB>(lo, hi, a, b, pp + t2, ldp);
  }
  if (T % 2) {  // the last key with a zero partner
    __m512i a[NB], b[NB];
    for (int c = 0; c < NB; ++c) {
      a[c] = load(v + (T - 1) * ldv, c);
      b[c] = _mm512_setzero_si512();
    }
    accumulate_pair<R, NB>(lo, hi, a, b, pp + t2, ldp);
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int r = 0; r < R; ++r) {
    const __m512 lr = _mm512_set1_ps(l[r]);
    for (int c = 0; c < NB; ++c) {
      const __m512 o0 = _mm512_div_ps(_mm512_permutex2var_ps(lo[r][c], first, hi[r][c]), lr);
      const __m512 o1 = _mm512_div_ps(_mm512_permutex2var_ps(lo[r][c], second, hi[r][c]), lr);
      float* out = o + r * ldo + 32 * c;
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>(mask[c]), o0);
      _mm512_mask_storeu_ps(out + 16, static_cast<__mmask16>(mask[c] >> 16), o1);
    }
  }
}

template <int R, typename VT>
XDNA_BF16_KERNEL inline void weighted_values_rows_bf16(const uint32_t* pp, int64_t ldp, const float* l, const VT* v, int64_t ldv, int64_t T, int64_t Dv,
                                                       float* o, int64_t ldo) {
  int64_t n = 0;
  for (; n + 64 <= Dv; n += 64) weighted_values_x32<R, 2, false, VT>(pp, ldp, l, v + n, ldv, T, 64, o + n, ldo);
  for (; n < Dv; n += 32) weighted_values_x32<R, 1, true, VT>(pp, ldp, l, v + n, ldv, T, Dv - n, o + n, ldo);
}

// One head, few rows, on AVX512-BF16: the contract as attend_few_rows computes it, other sum orders (above).
template <typename KT, typename VT>
XDNA_BF16_KERNEL void attend_few_rows_bf16(const AttentionShape& shape, const AttentionHead& h, const KT* k,
                                           const VT* v) {
  const int64_t M = shape.M, T = shape.T, D = shape.D, Dv = shape.Dv, D32 = round_up(D, 32);
  const int64_t tp = round_up(T, 32), T2 = tp / 2;  // P's row: tp bf16, T2 pairs
  thread_local FewRowScratch sc;
  uint16_t* qb = scratch(sc.q, sc.q_cap, static_cast<size_t>(M * D32));
  float* s = scratch(sc.s, sc.s_cap, static_cast<size_t>(M * T + M));
  float* l = s + M * T;
  uint32_t* pp = scratch(sc.p, sc.p_cap, static_cast<size_t>(M * T2));
  bf16_rows(h.q, h.ldq, M, D, D32, qb);
  uint16_t* block = std::is_same_v<KT, float> ? scratch(sc.k, sc.k_cap, static_cast<size_t>(16 * D32)) : nullptr;
  const int64_t ldk = h.kt_stride_t;
  const char* vp = reinterpret_cast<const char*>(v);
  const int64_t vrow = h.v_stride_t * static_cast<int64_t>(sizeof(VT)), vbytes = Dv * static_cast<int64_t>(sizeof(VT));
  if (D == 0) std::fill(s, s + M * T, 0.f);
  else switch (D32 / 32) {  // the head dims of common models (64: whisper) unrolled
    case 1: scores_rows_bf16<1>(qb, M, D32, k, ldk, T, D, s, block, vp, vrow, vbytes); break;
    case 2: scores_rows_bf16<2>(qb, M, D32, k, ldk, T, D, s, block, vp, vrow, vbytes); break;
    case 4: scores_rows_bf16<4>(qb, M, D32, k, ldk, T, D, s, block, vp, vrow, vbytes); break;
    default: scores_rows_bf16<0>(qb, M, D32, k, ldk, T, D, s, block, vp, vrow, vbytes); break;
  }
  // P in bf16 (zero past T: the odd key's partner), read as pairs of keys.
  for (int64_t m = 0; m < M; ++m)
    l[m] = emu::softmax_row_bf16(s + m * T, T, tp, shape.scale, mask_row(h, m), shape.zero_nan_rows,
                                 reinterpret_cast<uint16_t*>(pp + m * T2));
  constexpr int64_t kRowBlock = 5;
  for (int64_t m = 0; m < M; m += kRowBlock) {
    const uint32_t* p_rows = pp + m * T2;
    float* o_rows = h.o + m * h.ldo;
    switch (std::min(kRowBlock, M - m)) {
      case 1: weighted_values_rows_bf16<1>(p_rows, T2, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 2: weighted_values_rows_bf16<2>(p_rows, T2, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 3: weighted_values_rows_bf16<3>(p_rows, T2, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      case 4: weighted_values_rows_bf16<4>(p_rows, T2, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
      default: weighted_values_rows_bf16<5>(p_rows, T2, l + m, v, h.v_stride_t, T, Dv, o_rows, h.ldo); break;
    }
  }
}

// ---- Few query rows on AVX2 + FMA (the avx2 kernel set): K and V read as they lie, no widening ----
// The same contract with 8-lane vectors, sized for 16 ymm registers (attend_few_rows' 5-row blocks spilled there):
// S as dot products over d, R rows x KK keys of accumulators (R * KK <= 8), a key's 16 bf16 read by one load and
// split into its even and odd elements (VPSLLD 16, VPAND: exact), Q rounded to bf16 once and stored in that order;
// P V over t with R rows x 2 NB accumulators of 8 columns (R * NB <= 4). fp32 K / V are rounded to bf16 as read and
// put in the same lane order, so fp32 and bf16 operands of the same values give the same bits. A key's sum over d
// is one fixed order (the chunks in turn, its 8 lanes by one tree, the tail of D after), a column's over t too,
// whatever R, KK or NB: a row alone gives the bits it gives among others. Every product is exact (bf16 x bf16), so
// the FMAs give the bits of separate products and sums (subnormal products aside, within the contract's TINY).
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// One K or V element as the contract reads it (load_bf16 above is built for avx512f: not callable here).
inline float kv_value(const float* p) { return round_to_bf16(*p); }
inline float kv_value(const uint16_t* p) { return bf16_to_f32(*p); }

struct EvenOdd {
  __m256 even, odd;  // elements 0, 2, .., 14 and 1, 3, .., 15 of 16
};

__attribute__((always_inline)) inline EvenOdd load_even_odd(const uint16_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))))};
}

// round_to_bf16 on 8 lanes (a NaN stays a quiet NaN, as f32_to_bf16 gives).
__attribute__((always_inline)) inline __m256 round_to_bf16_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x), high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), high);
  const __m256i quiet = _mm256_or_si256(_mm256_and_si256(u, high), _mm256_set1_epi32(0x00400000));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// 16 fp32 rounded to bf16, in the even / odd order of the bf16 load.
__attribute__((always_inline)) inline EvenOdd load_even_odd(const float* p) {
  const __m256 lo = round_to_bf16_x8(_mm256_loadu_ps(p)), hi = round_to_bf16_x8(_mm256_loadu_ps(p + 8));
  // shuffle: elements 0 2 8 10 | 4 6 12 14 (1 3 9 11 | 5 7 13 15); the qword permute puts them in order
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8)),
          _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8))};
}

// 16 V elements for P V: bf16 as even / odd; fp32 rounded, in their order (each column has its own sum, so the
// lane order does not change a bit; store_columns puts them back).
__attribute__((always_inline)) inline EvenOdd load_columns(const uint16_t* p) { return load_even_odd(p); }
__attribute__((always_inline)) inline EvenOdd load_columns(const float* p) {
  return {round_to_bf16_x8(_mm256_loadu_ps(p)), round_to_bf16_x8(_mm256_loadu_ps(p + 8))};
}
template <typename VT>
__attribute__((always_inline)) inline void store_columns(float* o, __m256 a, __m256 b) {
  if constexpr (std::is_same_v<VT, uint16_t>) {  // a: even columns, b: odd ones
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // 0-3 | 8-11, 4-7 | 12-15
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  } else {
    _mm256_storeu_ps(o, a);
    _mm256_storeu_ps(o + 8, b);
  }
}

// The sums of KK keys' 8-lane accumulators into out[0 .. KK): for every key the tree ((0+1) + (2+3)) + ((4+5) +
// (6+7)) (VHADDPS pairs, then the halves), whatever KK.
template <int KK>
__attribute__((always_inline)) inline void sum_keys(const __m256* a, float* out) {
  if constexpr (KK == 8) {
    const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31)));
  } else if constexpr (KK == 4) {
    const __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
  } else {
    static_assert(KK == 2 || KK == 1);
    const __m256 h = _mm256_hadd_ps(a[0], a[KK - 1]);
    const __m256 g = _mm256_hadd_ps(h, h);
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1));
    if constexpr (KK == 2) _mm_storel_pi(reinterpret_cast<__m64*>(out), s);
    else _mm_store_ss(out, s);
  }
}

// Scores of R rows (qb: bf16 Q rows D apart, each chunk of 16 as its even then its odd elements) against keys
// t0 .. t0 + KK (rows ldk apart) into s (rows T apart).
template <int R, int KK, typename KT>
__attribute__((always_inline)) inline void scores_keys_avx2(const float* qb, int64_t D, const KT* k, int64_t ldk,
                                                             int64_t t0, float* s, int64_t T) {
  const int64_t D16 = D / 16 * 16;
  __m256 acc[R * KK];  // row r, key j: acc[r KK + j]
#pragma GCC unroll 8
  for (int i = 0; i < R * KK; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D16; d += 16)
#pragma GCC unroll 8
    for (int j = 0; j < KK; ++j) {
      const EvenOdd kv = load_even_odd(k + (t0 + j) * ldk + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r * KK + j] = _mm256_fmadd_ps(_mm256_loadu_ps(qb + r * D + d), kv.even, acc[r * KK + j]);
        acc[r * KK + j] = _mm256_fmadd_ps(_mm256_loadu_ps(qb + r * D + d + 8), kv.odd, acc[r * KK + j]);
      }
    }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* out = s + r * T + t0;
    sum_keys<KK>(acc + r * KK, out);
    if (D16 < D)
      for (int j = 0; j < KK; ++j) {
        float tail = 0.f;
        for (int64_t d = D16; d < D; ++d) tail = std::fmaf(qb[r * D + d], kv_value(k + (t0 + j) * ldk + d), tail);
        out[j] += tail;
      }
  }
}

// The cache lines of key t's row (D elements at k + t ldk), fetched ahead of their use.
template <typename KT>
__attribute__((always_inline)) inline void prefetch_key(const KT* k, int64_t ldk, int64_t t, int64_t D) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(k + t * ldk), last = first + D * sizeof(KT) - 1;
  for (uintptr_t line = first & ~uintptr_t{63}; line <= last; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

// Key rows this many bytes apart or more are prefetched kPrefetchKeys keys ahead: the prompt run's cross-attention
// reads K through the frames-first [B, T, H, D] copy, one head's 64 bf16 values of each key 1 KB apart, 4 keys per
// 4 KB page, which the hardware prefetchers (they stay within a page) do not follow: ~2x the time of K as rows at
// 3 rows on Zen 3, ~1.4x with these prefetches (benchmarks/README.md, "few-row attention on AVX2"). K as rows (a
// decoder step's cross K/V, the self-attention cache: 128 bytes apart) is read as before. Prefetches change no
// value.
constexpr int64_t kPrefetchStrideBytes = 512, kPrefetchKeys = 32;

// Keys t0 .. t1 - 1 (a key's score does not depend on which others share its call: any range gives its bits).
template <int R, int KK, typename KT>
void scores_rows_avx2(const float* qb, int64_t D, const KT* k, int64_t ldk, int64_t T, float* s, int64_t t0,
                      int64_t t1) {
  int64_t t = t0;
  if (ldk * static_cast<int64_t>(sizeof(KT)) >= kPrefetchStrideBytes) {
    for (int64_t p = t0; p < std::min(t1, t0 + kPrefetchKeys); ++p) prefetch_key(k, ldk, p, D);
    for (; t + KK <= t1; t += KK) {
      for (int j = 0; j < KK; ++j)
        if (t + kPrefetchKeys + j < t1) prefetch_key(k, ldk, t + kPrefetchKeys + j, D);
      scores_keys_avx2<R, KK>(qb, D, k, ldk, t, s, T);
    }
  }
  for (; t + KK <= t1; t += KK) scores_keys_avx2<R, KK>(qb, D, k, ldk, t, s, T);
  for (; t < t1; ++t) scores_keys_avx2<R, 1>(qb, D, k, ldk, t, s, T);
}

// O[r][16 c ..] = (P V) / l for R rows of bf16 weights p (T apart), NB chunks of 16 columns of V (rows ldv apart),
// over keys t0 .. t1 - 1. With `sums` (row r, chunk c at sums + r * lds + 16 c, in the accumulators' lane order)
// the sums start from there unless t0 is 0 and go back there unless t1 is T: each column's sum then runs over t in
// turn across the calls, as in one call (stored and reloaded exactly: the same bits). o is written when t1 is T.
template <int R, int NB, typename VT>
void weighted_values_avx2(const float* p, int64_t T, const float* l, const VT* v, int64_t ldv, float* o,
                          int64_t ldo, int64_t t0 = 0, int64_t t1 = -1, float* sums = nullptr, int64_t lds = 0) {
  if (t1 < 0) t1 = T;
  __m256 acc[R * NB * 2];  // row r, chunk c: acc[2 (r NB + c)] (even or first 8), + 1 (odd or last 8)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NB; ++c) {
      const bool carried = sums && t0 > 0;
      acc[2 * (r * NB + c)] = carried ? _mm256_loadu_ps(sums + r * lds + 16 * c) : _mm256_setzero_ps();
      acc[2 * (r * NB + c) + 1] = carried ? _mm256_loadu_ps(sums + r * lds + 16 * c + 8) : _mm256_setzero_ps();
    }
  for (int64_t t = t0; t < t1; ++t) {
    EvenOdd vv[NB];
#pragma GCC unroll 4
    for (int c = 0; c < NB; ++c) vv[c] = load_columns(v + t * ldv + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * T + t);
#pragma GCC unroll 4
      for (int c = 0; c < NB; ++c) {
        acc[2 * (r * NB + c)] = _mm256_fmadd_ps(w, vv[c].even, acc[2 * (r * NB + c)]);
        acc[2 * (r * NB + c) + 1] = _mm256_fmadd_ps(w, vv[c].odd, acc[2 * (r * NB + c) + 1]);
      }
    }
  }
  if (t1 < T) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NB; ++c) {
        _mm256_storeu_ps(sums + r * lds + 16 * c, acc[2 * (r * NB + c)]);
        _mm256_storeu_ps(sums + r * lds + 16 * c + 8, acc[2 * (r * NB + c) + 1]);
      }
    return;
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 lr = _mm256_set1_ps(l[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NB; ++c)
      store_columns<VT>(o + r * ldo + 16 * c, _mm256_div_ps(acc[2 * (r * NB + c)], lr),
                        _mm256_div_ps(acc[2 * (r * NB + c) + 1], lr));
  }
}

// Keys t0 .. t1 - 1 of R rows (all keys: t0 = 0, t1 = T, sums unused); sums: R rows of Dv (lds apart) that carry
// the 16-column chunks' sums between the ranges, which must come in order. The columns past the last whole chunk
// are summed over all keys with the last range.
template <int R, typename VT>
void weighted_values_rows_avx2(const float* p, const float* l, const VT* v, int64_t ldv, int64_t T, int64_t Dv,
                               float* o, int64_t ldo, int64_t t0 = 0, int64_t t1 = -1, float* sums = nullptr,
                               int64_t lds = 0) {
  if (t1 < 0) t1 = T;
  constexpr int NB = R == 1 ? 4 : R == 2 ? 2 : 1;  // R * NB <= 4: 8 accumulators
  int64_t n = 0;
  for (; n + 16 * NB <= Dv; n += 16 * NB)
    weighted_values_avx2<R, NB>(p, T, l, v + n, ldv, o + n, ldo, t0, t1, sums ? sums + n : nullptr, lds);
  for (; n + 16 <= Dv; n += 16)
    weighted_values_avx2<R, 1>(p, T, l, v + n, ldv, o + n, ldo, t0, t1, sums ? sums + n : nullptr, lds);
  if (t1 < T) return;
  for (int r = 0; r < R; ++r)
    for (int64_t c = n; c < Dv; ++c) {
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) sum = std::fmaf(p[r * T + t], kv_value(v + t * ldv + c), sum);
      o[r * ldo + c] = sum / l[r];
    }
}

// One head, few rows, K and V as rows (as attend_few_rows), on AVX2 + FMA: s holds M * T scores, qb M * D.
template <typename KT, typename VT>
void attend_few_rows_avx2(const AttentionShape& shape, const AttentionHead& h, const KT* k, const VT* v, float* s,
                          float* qb, float* l) {
  const int64_t M = shape.M, T = shape.T, D = shape.D, Dv = shape.Dv, D16 = D / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* q = h.q + m * h.ldq;
    float* row = qb + m * D;
    for (int64_t d = 0; d < D16; d += 16)
      for (int64_t i = 0; i < 8; ++i) {
        row[d + i] = round_to_bf16(q[d + 2 * i]);
        row[d + 8 + i] = round_to_bf16(q[d + 2 * i + 1]);
      }
    for (int64_t d = D16; d < D; ++d) row[d] = round_to_bf16(q[d]);
  }
  constexpr int64_t kRowBlock = 4;  // R x KK accumulators: 1 x 8, 2 x 4, 3 x 2, 4 x 2
  // More than one row block (beam search: 5 rows) reads K and V once per block: then keys go in blocks of
  // kKeyBlock, every row block in turn over one (K / V rows in L1 after the first: read from L2 or memory once;
  // ~1.25x faster at 5 rows, 6 layers of K/V from memory, one thread). The P V sums are carried across key blocks
  // in `sums` (the same bits).
  constexpr int64_t kKeyBlock = 64;
  const int64_t key_block = M > kRowBlock ? kKeyBlock : T;
  const int64_t ldk = h.kt_stride_t;
  for (int64_t t0 = 0; t0 < T; t0 += key_block) {
    const int64_t t1 = std::min(T, t0 + key_block);
    for (int64_t m = 0; m < M; m += kRowBlock) {
      const float* q_rows = qb + m * D;
      float* s_rows = s + m * T;
      switch (std::min(kRowBlock, M - m)) {
        case 1: scores_rows_avx2<1, 8>(q_rows, D, k, ldk, T, s_rows, t0, t1); break;
        case 2: scores_rows_avx2<2, 4>(q_rows, D, k, ldk, T, s_rows, t0, t1); break;
        case 3: scores_rows_avx2<3, 2>(q_rows, D, k, ldk, T, s_rows, t0, t1); break;
        default: scores_rows_avx2<4, 2>(q_rows, D, k, ldk, T, s_rows, t0, t1); break;
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) l[m] = softmax_row(s + m * T, T, shape.scale, mask_row(h, m), shape.zero_nan_rows);
  thread_local std::unique_ptr<float[]> sums_buf;
  thread_local size_t sums_cap = 0;
  float* sums = key_block < T ? scratch(sums_buf, sums_cap, static_cast<size_t>(M * Dv)) : nullptr;
  for (int64_t t0 = 0; t0 < T; t0 += key_block) {
    const int64_t t1 = std::min(T, t0 + key_block);
    for (int64_t m = 0; m < M; m += kRowBlock) {
      const float* p_rows = s + m * T;
      float* o_rows = h.o + m * h.ldo;
      float* sum_rows = sums ? sums + m * Dv : nullptr;
      const int64_t ldv = h.v_stride_t, ldo = h.ldo;
      switch (std::min(kRowBlock, M - m)) {
        case 1: weighted_values_rows_avx2<1>(p_rows, l + m, v, ldv, T, Dv, o_rows, ldo, t0, t1, sum_rows, Dv); break;
        case 2: weighted_values_rows_avx2<2>(p_rows, l + m, v, ldv, T, Dv, o_rows, ldo, t0, t1, sum_rows, Dv); break;
        case 3: weighted_values_rows_avx2<3>(p_rows, l + m, v, ldv, T, Dv, o_rows, ldo, t0, t1, sum_rows, Dv); break;
        default: weighted_values_rows_avx2<4>(p_rows, l + m, v, ldv, T, Dv, o_rows, ldo, t0, t1, sum_rows, Dv); break;
      }
    }
  }
}

#pragma GCC pop_options

// Which per-head few-row kernel runs: it follows the active kernel set (XDNA_EMULATOR_ISA forces it, so that tests
// cover every one here). attend_few_rows needs 32 vector registers for its accumulators: built for avx2 (16) it
// spilled and ran ~5x slower than on avx512f (same bits); beside the avx2 set attend_few_rows_avx2 runs instead (8
// accumulators; K / V read as they lie, where the per-product path widened bf16 ones: benchmarks/README.md). The
// generic set keeps the per-product path. VDPBF16PS (attend_few_rows_bf16) beside the sets that use bf16
// instructions (amx, avx512bf16): ~2x faster than attend_few_rows at a decoder step's cross-attention.
enum class FewRowKernel { kNone, kAvx2, kAvx512, kAvx512Bf16 };

FewRowKernel few_row_kernel() {
  static const FewRowKernel kernel = [] {
    const std::string set = emu::active_kernels().name;
    if (set == "avx2")
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? FewRowKernel::kAvx2
                                                                             : FewRowKernel::kNone;
    if (!__builtin_cpu_supports("avx512f") || set == "generic") return FewRowKernel::kNone;
    if ((set == "amx" || set == "avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16"))
      return FewRowKernel::kAvx512Bf16;
    return FewRowKernel::kAvx512;
  }();
  return kernel;
}

// B[k][n] = b[k * stride_k + n * stride_n] as backend.h's UnpackedGemm, when one of the strides is 1.
bool as_unpacked(const float* b, int64_t stride_k, int64_t stride_n, UnpackedGemm* out) {
  if (stride_n == 1) *out = UnpackedGemm{{}, b, stride_k, false};
  else if (stride_k == 1) *out = UnpackedGemm{{}, b, stride_n, true};
  else return false;
  return true;
}

// ---- Many query rows (encoder self-attention), cache-blocked ----
// One task per block of query rows of one head: its scores against all T keys stay in L2 (64 x 1500 fp32 = 376 KB
// on AMX; 96 rows elsewhere, where each task converts K^T and V to fp32 again and 96 rows measured faster than 32),
// the softmax runs on them there, P is rounded to bf16, then P V and the division. K^T and V are prepared once per
// head by a first job: in the AMX tile pair form where the amx kernel set runs, else packed as the GEMM contract's
// B for the active set's blocked kernel.
constexpr int64_t kBlockRows = 96;  // without AMX

int64_t round_up32(int64_t x) { return (x + 31) / 32 * 32; }

// What a head's tasks share: K^T and V prepared by the first job.
struct PreparedHead {
  std::vector<uint32_t> kt_pairs, v_pairs;  // AMX
  PackedB kt, v;                            // other kernel sets
};

// Rows m0 .. m0 + rows - 1 of one head without AMX: S = Q K^T on the active kernel set's blocked GEMM kernel
// (packed K^T), the softmax, P V on it too (packed V), the division.
void attend_block_packed(const emu::IsaKernels& kern, const AttentionShape& sh, const AttentionHead& h,
                         const PreparedHead& prep, int64_t m0, int64_t rows) {
  const int64_t T = sh.T, D = sh.D, Dv = sh.Dv;
  thread_local std::vector<float> s;
  s.resize(rows * T);
  float* o = h.o + m0 * h.ldo;
  if (D > 0) kern.blocked(emu::Problem{h.q + m0 * h.ldq, h.ldq, s.data(), T, prep.kt.bits(), rows, D, T,
                                       prep.kt.shape.Kpad}, 0, rows, 0, T);
  else std::fill(s.begin(), s.end(), 0.f);
  float l[kBlockRows];
  for (int64_t r = 0; r < rows; ++r) l[r] = softmax_row(&s[r * T], T, sh.scale, mask_row(h, m0 + r), sh.zero_nan_rows);
  kern.blocked(emu::Problem{s.data(), T, o, h.ldo, prep.v.bits(), rows, T, Dv, prep.v.shape.Kpad}, 0, rows, 0, Dv);
  divide_rows(o, h.ldo, rows, Dv, l);
}

// ---- Many query rows on AVX2 + FMA (the avx2 kernel set), fused ----
// The blocked GEMM path above, on AVX2, converted K^T and V from packed bf16 to fp32 again in every task and wrote
// a block's 96 x T scores through its generic C store (96 x 1500 fp32: more than Zen 3's 512 KB L2). Here each head's
// K and V are rounded to bf16 once, by the first job, into fp32 panels of 16 keys / 16 columns (K: [T/16][D][16],
// V: [Dv/16][T][16], zero-padded), which every task of the head shares; a task takes kAvx2Rows query rows: their
// scores by a 6 x 16 register tile (6 rows' bf16 Q broadcast, 16 keys in two ymm, D exact products per lane), key
// panel outer so that it stays in L1 across the row panels, the softmax (softmax_row, as the other sets), then
// P V by the same 6 x 16 tile over all T keys and the division by l at the store. Products of bf16 values are
// exact, so the FMAs give the contract's fp32 sums (in another order than the blocked kernel's: the order is free).
// Each task's arithmetic depends on its rows only: the bits do not depend on the threads or on the other heads.
constexpr int64_t kAvx2Rows = 48;  // scores 48 x T fp32 (282 KB at T = 1500) stay in L2 through the softmax and P V
constexpr int kAvx2Mr = 6;
constexpr int64_t kAvx2Nr = 16;

struct Avx2Head {
  std::vector<float> k, v;  // the panels above
  int64_t tp = 0, dvp = 0;  // T and Dv rounded up to 16
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// C[R x 16] = sum_k a[r * lda + k] * b[k * 16 ..], k < K; then divided by div[r] (div: null for none) and stored
// to c (row stride ldc), `cols` of the 16 columns.
template <int R>
__attribute__((always_inline)) inline void avx2_tile(int64_t K, const float* a, int64_t lda, const float* b,
                                                     float* c, int64_t ldc, const float* div, int64_t cols) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kAvx2Nr), b1 = _mm256_loadu_ps(b + k * kAvx2Nr + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (div) {
      const __m256 l = _mm256_set1_ps(div[r]);
      acc[r][0] = _mm256_div_ps(acc[r][0], l);
      acc[r][1] = _mm256_div_ps(acc[r][1], l);
    }
    if (cols == kAvx2Nr) {
      _mm256_storeu_ps(c + r * ldc, acc[r][0]);
      _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    } else {
      alignas(32) float tmp[kAvx2Nr];
      _mm256_store_ps(tmp, acc[r][0]);
      _mm256_store_ps(tmp + 8, acc[r][1]);
      std::memcpy(c + r * ldc, tmp, static_cast<size_t>(cols) * sizeof(float));
    }
  }
}

// softmax_row on 8 lanes in two passes over the row (scale, mask, NaN test and max; then the weights and their
// sum) instead of its six: the same operations on every score (exp_nonpositive without FMA, this file is built
// with -ffp-contract=off) and the same 16 partial sums in the same order, so the same bits as softmax_row.
inline __m256 exp_nonpositive_x8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(emu::kLog2e));
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(emu::kExp2Poly[3]), f), _mm256_set1_ps(emu::kExp2Poly[2]));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(emu::kExp2Poly[1]));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(emu::kExp2Poly[0]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ), e);
}

inline __m256 round_finite_to_bf16_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

float softmax_row_avx2(float* s, int64_t T, float scale, const float* mask, bool zero_nan) {
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), unord = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), vscale);
    if (mask) v = _mm256_add_ps(v, _mm256_loadu_ps(mask + t));
    _mm256_storeu_ps(s + t, v);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  bool nan = _mm256_movemask_ps(unord) != 0;
  float mx = lanes[0];
  for (int j = 1; j < 8; ++j) mx = std::max(mx, lanes[j]);
  for (; t < T; ++t) {
    s[t] *= scale;
    if (mask) s[t] += mask[t];
    nan |= s[t] != s[t];
    mx = std::max(mx, s[t]);
  }
  // (-0 or +0 as the max: s - mx is the same either way but for a zero's sign, which exp ignores.)
  if (nan || !std::isfinite(mx)) {
    std::fill(s, s + T, zero_nan ? 0.f : std::numeric_limits<float>::quiet_NaN());
    return zero_nan ? 1.f : std::numeric_limits<float>::quiet_NaN();
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();  // softmax_row's sum_l[0..7], sum_l[8..15]
  t = 0;
  for (; t + 16 <= T; t += 16) {
    const __m256 p0 = round_finite_to_bf16_x8(exp_nonpositive_x8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx)));
    const __m256 p1 = round_finite_to_bf16_x8(exp_nonpositive_x8(_mm256_sub_ps(_mm256_loadu_ps(s + t + 8), vmx)));
    _mm256_storeu_ps(s + t, p0);
    _mm256_storeu_ps(s + t + 8, p1);
    sum0 = _mm256_add_ps(sum0, p0);
    sum1 = _mm256_add_ps(sum1, p1);
  }
  alignas(32) float sum_l[16];
  _mm256_store_ps(sum_l, sum0);
  _mm256_store_ps(sum_l + 8, sum1);
  for (; t < T; ++t) {
    s[t] = round_finite_to_bf16(exp_nonpositive(s[t] - mx));
    sum_l[0] += s[t];
  }
  float l = 0.f;
  for (int j = 0; j < 16; ++j) l += sum_l[j];
  return l;
}

// n floats rounded to bf16 as the contract reads K and V (round_to_bf16: to nearest even, NaN a quiet NaN).
void round_copy_avx2(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, round_to_bf16_x8(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = round_to_bf16(src[i]);
}

// One head's K (keys) or V panels (Avx2Head), zero-padded. Rows of K / V with unit stride are rounded as rows
// (K's 16-key block through an L1 buffer, then laid out d-major), other strides element by element.
void avx2_prepare(const AttentionShape& sh, const AttentionHead& h, bool keys, Avx2Head* out) {
  const int64_t T = sh.T, D = sh.D, Dv = sh.Dv;
  out->tp = (T + kAvx2Nr - 1) / kAvx2Nr * kAvx2Nr;
  out->dvp = (Dv + kAvx2Nr - 1) / kAvx2Nr * kAvx2Nr;
  if (keys) {
    out->k.assign(static_cast<size_t>(out->tp * D), 0.f);
    float* k = out->k.data();
    if (h.kt_stride_d == 1) {
      std::vector<float> rows(static_cast<size_t>(kAvx2Nr * D));
      for (int64_t t0 = 0; t0 < T; t0 += kAvx2Nr) {
        const int64_t n = std::min(kAvx2Nr, T - t0);
        for (int64_t i = 0; i < n; ++i) round_copy_avx2(h.kt + (t0 + i) * h.kt_stride_t, &rows[i * D], D);
        float* panel = k + t0 * D;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t i = 0; i < n; ++i) panel[d * kAvx2Nr + i] = rows[i * D + d];
      }
    } else {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d)
          k[(t / kAvx2Nr * D + d) * kAvx2Nr + t % kAvx2Nr] = round_to_bf16(h.kt[d * h.kt_stride_d + t * h.kt_stride_t]);
    }
  } else {
    out->v.assign(static_cast<size_t>(out->dvp * T), 0.f);
    float* v = out->v.data();
    if (h.v_stride_n == 1) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < Dv; n += kAvx2Nr)
          round_copy_avx2(h.v + t * h.v_stride_t + n, v + (n * T + t * kAvx2Nr), std::min(kAvx2Nr, Dv - n));
    } else {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < Dv; ++n)
          v[(n / kAvx2Nr * T + t) * kAvx2Nr + n % kAvx2Nr] = round_to_bf16(h.v[t * h.v_stride_t + n * h.v_stride_n]);
    }
  }
}

// The tile for `rows` (1 .. 6) rows.
__attribute__((noinline)) void avx2_tile_rows(int rows, int64_t K, const float* a, int64_t lda, const float* b,
                                               float* c, int64_t ldc, const float* div, int64_t cols) {
  switch (rows) {
    case 1: avx2_tile<1>(K, a, lda, b, c, ldc, div, cols); break;
    case 2: avx2_tile<2>(K, a, lda, b, c, ldc, div, cols); break;
    case 3: avx2_tile<3>(K, a, lda, b, c, ldc, div, cols); break;
    case 4: avx2_tile<4>(K, a, lda, b, c, ldc, div, cols); break;
    case 5: avx2_tile<5>(K, a, lda, b, c, ldc, div, cols); break;
    default: avx2_tile<6>(K, a, lda, b, c, ldc, div, cols); break;
  }
}
#pragma GCC pop_options

// Rows m0 .. m0 + rows - 1 (rows <= kAvx2Rows) of one head on AVX2 (above).
void attend_block_avx2(const AttentionShape& sh, const AttentionHead& h, const Avx2Head& prep, int64_t m0,
                       int64_t rows) {
  const int64_t T = sh.T, D = sh.D, Dv = sh.Dv, tp = prep.tp;
  thread_local std::vector<float> qs, ss;
  qs.resize(static_cast<size_t>(kAvx2Rows * std::max<int64_t>(D, 1)));
  ss.resize(static_cast<size_t>(kAvx2Rows * tp));
  float *q = qs.data(), *s = ss.data();
  for (int64_t r = 0; r < rows; ++r) round_copy_avx2(h.q + (m0 + r) * h.ldq, q + r * D, D);
  for (int64_t t = 0; t < tp; t += kAvx2Nr)  // a key panel (D x 16, L1) across all row panels
    for (int64_t r = 0; r < rows; r += kAvx2Mr)
      avx2_tile_rows(static_cast<int>(std::min<int64_t>(kAvx2Mr, rows - r)), D, q + r * D, D,
                     prep.k.data() + t * D, s + r * tp + t, tp, nullptr, kAvx2Nr);
  float l[kAvx2Rows];
  for (int64_t r = 0; r < rows; ++r)
    l[r] = softmax_row_avx2(s + r * tp, T, sh.scale, mask_row(h, m0 + r), sh.zero_nan_rows);
  float* o = h.o + m0 * h.ldo;
  for (int64_t n = 0; n < Dv; n += kAvx2Nr)
    for (int64_t r = 0; r < rows; r += kAvx2Mr)
      avx2_tile_rows(static_cast<int>(std::min<int64_t>(kAvx2Mr, rows - r)), T, s + r * tp, tp,
                     prep.v.data() + n * T, o + r * h.ldo + n, h.ldo, l + r, std::min(kAvx2Nr, Dv - n));
}

// The fused AVX2 path runs where the avx2 kernel set is the active one (the CPU has AVX2 and FMA then).
bool use_avx2_attention() {
  static const bool avx2 = std::string(emu::active_kernels().name) == "avx2" && __builtin_cpu_supports("avx2") &&
                           __builtin_cpu_supports("fma");
  return avx2;
}

// All heads, many rows, on AVX2: a job preparing every head's K and V panels, then one of all (head, block) tasks.
void attend_many_rows_avx2(const AttentionShape& sh, const AttentionHead* heads, size_t count, int threads) {
  std::vector<Avx2Head> prep(count);
  emulator_parallel_for(threads, 2 * static_cast<int64_t>(count), [&](int64_t task) {
    avx2_prepare(sh, heads[task / 2], task % 2 == 0, &prep[task / 2]);
  });
  const int64_t blocks = (sh.M + kAvx2Rows - 1) / kAvx2Rows;
  emulator_parallel_for(threads, static_cast<int64_t>(count) * blocks, [&](int64_t task) {
    const size_t i = static_cast<size_t>(task / blocks);
    const int64_t m0 = task % blocks * kAvx2Rows;
    attend_block_avx2(sh, heads[i], prep[i], m0, std::min(kAvx2Rows, sh.M - m0));
  });
}

// All heads, many rows: a job that prepares every head's K^T and V, then one of all (head, row block) tasks.
void attend_many_rows(const AttentionShape& sh, const AttentionHead* heads, size_t count, int threads) {
  const int64_t M = sh.M, T = sh.T, D = sh.D, Dv = sh.Dv;
  const emu::AttentionKernels* amx = emu::attention_amx_kernels();
  if (!amx && use_avx2_attention()) return attend_many_rows_avx2(sh, heads, count, threads);
  std::vector<PreparedHead> prep(count);
  emulator_parallel_for(threads, 2 * static_cast<int64_t>(count), [&](int64_t task) {
    const AttentionHead& h = heads[task / 2];
    PreparedHead& p = prep[task / 2];
    const bool keys = task % 2 == 0;
    if (amx) {
      std::vector<uint32_t>& out = keys ? p.kt_pairs : p.v_pairs;
      const int64_t kp = keys ? round_up32(D) : round_up32(T), np = keys ? round_up32(T) : round_up32(Dv);
      out.resize(np / 16 * kp / 2 * 16);
      if (keys) amx->pair_form(h.kt, h.kt_stride_d, h.kt_stride_t, D, T, kp, np, out.data());
      else amx->pair_form(h.v, h.v_stride_t, h.v_stride_n, T, Dv, kp, np, out.data());
    } else if (keys) {
      if (D > 0) p.kt = pack_b(h.kt, D, T, h.kt_stride_d, h.kt_stride_t);
    } else {
      p.v = pack_b(h.v, T, Dv, h.v_stride_t, h.v_stride_n);
    }
  });
  const int64_t block_rows = amx ? emu::kAttentionAmxRows : kBlockRows;
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const emu::IsaKernels& kern = emu::active_kernels();
  emulator_parallel_for(threads, static_cast<int64_t>(count) * blocks, [&](int64_t task) {
    const size_t i = static_cast<size_t>(task / blocks);
    const int64_t m0 = task % blocks * block_rows, rows = std::min(block_rows, M - m0);
    const AttentionHead& h = heads[i];
    if (amx)
      amx->block(emu::AttentionBlockProblem{h.q + m0 * h.ldq, h.ldq, prep[i].kt_pairs.data(), prep[i].v_pairs.data(),
                                            h.o + m0 * h.ldo, h.ldo, rows, T, D, Dv, sh.scale,
                                            h.mask ? h.mask + m0 * h.mask_stride_m : nullptr, h.mask_stride_m,
                                            sh.zero_nan_rows});
    else attend_block_packed(kern, sh, h, prep[i], m0, rows);
  });
}

}  // namespace

namespace {
XDNA_BF16_KERNEL void attention_exp_fma(const float* x, float* out, int64_t n, bool base2) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = emu::lanes_below(i, n);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    _mm512_mask_storeu_ps(out + i, m, base2 ? emu::exp2_row(v, m) : emu::exp_nonpositive(v, m));
  }
}
}  // namespace

bool emulator_attention_exp(const float* x, float* out, int64_t n, int form) {
  if (form == 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = exp_nonpositive(x[i]);
    return true;
  }
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512bf16"))
    return false;
  attention_exp_fma(x, out, n, form == 2);
  return true;
}

namespace {
// Calls run(k, v) with the head's K and V as the element types they are in (bf16 or fp32): the few-row kernels are
// templates over both.
template <typename Run>
void with_kv_types(const AttentionHead& h, Run&& run) {
  if (h.kt_bf16 && h.v_bf16) run(h.kt_bf16, h.v_bf16);
  else if (h.kt_bf16) run(h.kt_bf16, h.v);
  else if (h.v_bf16) run(h.kt, h.v_bf16);
  else run(h.kt, h.v);
}
}  // namespace

const char* emulator_attention_few_row_kernel() {
  switch (few_row_kernel()) {
    case FewRowKernel::kAvx512Bf16: return "avx512bf16";
    case FewRowKernel::kAvx512: return "avx512";
    case FewRowKernel::kAvx2: return "avx2";
    default: return "unpacked";
  }
}

void emulator_attention(const AttentionShape& s, const AttentionHead* heads, size_t count, int threads) {
  const int64_t M = s.M, T = s.T, D = s.D, Dv = s.Dv;
  if (count == 0 || M == 0 || Dv == 0) return;
  if (T == 0) {  // no keys: P is empty and P V is zero, as ORT's MatMul gives
    for (size_t i = 0; i < count; ++i)
      for (int64_t m = 0; m < M; ++m) std::fill(heads[i].o + m * heads[i].ldo, heads[i].o + m * heads[i].ldo + Dv, 0.f);
    return;
  }
  // Few query rows with K and V as rows (a decoder step's attention): one task per head does the whole head while
  // its K and V are in cache, all heads in one job.
  const FewRowKernel few = M <= kUnpackedMaxM ? few_row_kernel() : FewRowKernel::kNone;
  bool rows = few != FewRowKernel::kNone;
  for (size_t i = 0; i < count && rows; ++i) rows = heads[i].kt_stride_d == 1 && heads[i].v_stride_n == 1;
  if (rows && few == FewRowKernel::kAvx512Bf16) {
    emulator_parallel_for(threads, static_cast<int64_t>(count), [&](int64_t i) {
      const AttentionHead& h = heads[i];
      with_kv_types(h, [&](auto k, auto v) { attend_few_rows_bf16(s, h, k, v); });
    });
    return;
  }
  if (rows) {
    emulator_parallel_for(threads, static_cast<int64_t>(count), [&](int64_t i) {
      thread_local FewRowScratch sc;  // written before read: no zero-fill per call
      float* scores = scratch(sc.s, sc.s_cap, static_cast<size_t>(M * T + M * D + M));
      float *qb = scores + M * T, *l = qb + M * D;
      const AttentionHead& h = heads[i];
      if (few == FewRowKernel::kAvx2)
        with_kv_types(h, [&](auto k, auto v) { attend_few_rows_avx2(s, h, k, v, scores, qb, l); });
      else
        with_kv_types(h, [&](auto k, auto v) { attend_few_rows(s, h, k, v, scores, qb, l); });
    });
    return;
  }
  // The other paths read fp32 K and V: bf16 ones (a Cast fused into the attention) widened first, exactly.
  if (has_bf16_kv(heads, count)) {
    std::vector<std::vector<float>> storage;
    const std::vector<AttentionHead> widened = widen_bf16_kv(s, heads, count, &storage);
    emulator_attention(s, widened.data(), count, threads);
    return;
  }
  // Few query rows, other layouts: every head's K and V read as they lie, all heads in one job per product.
  std::vector<UnpackedGemm> qk(count), pv(count);
  bool unpacked = M <= kUnpackedMaxM;
  for (size_t i = 0; i < count && unpacked; ++i)
    unpacked = as_unpacked(heads[i].kt, heads[i].kt_stride_d, heads[i].kt_stride_t, &qk[i]) &&
               as_unpacked(heads[i].v, heads[i].v_stride_t, heads[i].v_stride_n, &pv[i]);
  if (unpacked) {
    std::vector<float> scores(count * M * T), l(count * M);
    for (size_t i = 0; i < count; ++i) qk[i].args = GemmArgs{heads[i].q, M, heads[i].ldq, &scores[i * M * T], T};
    emulator_gemm_unpacked(qk.data(), count, D, T, threads);
    softmax_rows(scores.data(), l.data(), s, heads, count, threads);
    for (size_t i = 0; i < count; ++i) pv[i].args = GemmArgs{&scores[i * M * T], M, T, heads[i].o, heads[i].ldo};
    emulator_gemm_unpacked(pv.data(), count, T, Dv, threads);
    for (size_t i = 0; i < count; ++i) divide_rows(heads[i].o, heads[i].ldo, M, Dv, &l[i * M]);
    return;
  }
  // Many rows (encoder self-attention), or K / V in no row layout: cache-blocked (attend_many_rows).
  attend_many_rows(s, heads, count, threads);
}

}  // namespace xdna::kernels
