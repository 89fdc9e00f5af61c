// One block of the fused many-row attention (attention_contract.h) on AMX and AVX-512 (with AVX512-BF16), driven by
// emulator_attention.cc: up to 64 query rows of one head against all T keys. S = Q K^T by TDPBF16PS into L2-resident
// scratch, the softmax in two AVX-512 passes over each row (scaled max, then exp, P rounded to bf16, the row sum),
// P V by TDPBF16PS, the division last. K^T and V come in the tile pair form, prepared once per head.
//
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and adds in fp32 (round to nearest even), flushing bf16
// subnormal inputs and fp32 subnormal results to zero, as the GEMM contract allows (emulator_amx.cc). The exp is
// emulator_attention.cc's (Cephes expf, the same constants) evaluated with FMAs: checked over every float in
// [-87, 0], its relative error is at most 2^-23.5 (the contract allows 2^-21); its bits may differ from the other
// kernel sets' in the last place.
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "emulator_amx_tiles.h"
#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {

constexpr int64_t kRows = 64;  // four tiles of rows: each K^T tile loaded from L2 serves four

// C[32][np] = A[32][kp] . B: a bf16 rows kp apart, b the pair form in 16-column panels ([np / 16][kp / 2][16]
// lanes of (B[2i][n], B[2i + 1][n])), c fp32 rows ldc apart. kp and np are multiples of 32. Tiles as configured by
// TileScope: C 0-3, A 4-5, B 6-7.
void rows32_product(const uint16_t* a, int64_t kp, const uint32_t* b, int64_t np, float* c, int64_t ldc) {
  const int64_t panel = kp / 2 * 16, a_bytes = kp * 2;
  const uint16_t* a1 = a + 16 * kp;
  for (int64_t n = 0; n < np; n += 32) {
    const uint32_t* b0 = b + (n / 16) * panel;
    const uint32_t* b1 = b0 + panel;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < kp; k += 32) {
      _tile_loadd(4, a + k, a_bytes);
      _tile_loadd(6, b0 + k / 2 * 16, 64);
      _tile_loadd(7, b1 + k / 2 * 16, 64);
      _tile_loadd(5, a1 + k, a_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c + n, ldc * 4);
    _tile_stored(1, c + n + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc + n, ldc * 4);
    _tile_stored(3, c + 16 * ldc + n + 16, ldc * 4);
  }
}

// S[64][np] = Q[64][kp] . K^T: as rows32_product, but each B tile (loaded from L2) serves four row tiles (Q, in L1,
// reloaded): C tiles 0-3 are the four row tiles of one 16-column panel, A tiles 4-5, B tiles 6-7.
void rows64_product(const uint16_t* a, int64_t kp, const uint32_t* b, int64_t np, float* c, int64_t ldc) {
  const int64_t panel = kp / 2 * 16, a_bytes = kp * 2;
  for (int64_t n = 0; n < np; n += 16) {
    const uint32_t* bn = b + (n / 16) * panel;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < kp; k += 32) {
      _tile_loadd(6, bn + k / 2 * 16, 64);
      _tile_loadd(4, a + k, a_bytes);
      _tile_loadd(5, a + 16 * kp + k, a_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(4, a + 32 * kp + k, a_bytes);
      _tile_loadd(5, a + 48 * kp + k, a_bytes);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
    }
    _tile_stored(0, c + n, ldc * 4);
    _tile_stored(1, c + 16 * ldc + n, ldc * 4);
    _tile_stored(2, c + 32 * ldc + n, ldc * 4);
    _tile_stored(3, c + 48 * ldc + n, ldc * 4);
  }
}

// The contract's f32_to_bf16 on 16 lanes (round to nearest even, NaN kept a quiet NaN): the bf16 bits.
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// exp(x) for x <= 0 in the lanes of `lanes` (emulator_attention.cc's exp_nonpositive with FMAs), 0 below -87 and
// in the other lanes (whatever the reduction made of them there).
inline __m512 exp_nonpositive(__m512 x, __mmask16 lanes) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  const __mmask16 kept = _mm512_mask_cmp_ps_mask(lanes, x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(kept, p, n);
}

inline __mmask16 lanes_below(int64_t t, int64_t T) {
  const int64_t left = T - t;
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1u);
}

// One row of scores s[0..T) -> p[0..tp) = bf16(exp(scale s - max)), zero past T; returns the row sum. NaN or +Inf
// among the scaled scores (or only -Inf) gives NaN, as ORT's Softmax does (p is then zero: the output row is
// 0 / NaN).
float softmax_row(const float* s, int64_t T, int64_t tp, float scale, uint16_t* p) {
  const __m512 vscale = _mm512_set1_ps(scale);
  // Four max chains: one would wait a max's latency per 16 scores.
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax[4] = {minus_inf, minus_inf, minus_inf, minus_inf};
  __mmask16 nan = 0;
  for (int64_t t = 0; t < T; t += 64)
    for (int j = 0; j < 4; ++j) {
      const __mmask16 m = lanes_below(t + 16 * j, T);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + t + 16 * j), vscale);
      nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
      vmax[j] = _mm512_mask_max_ps(vmax[j], m, vmax[j], v);
    }
  const float mx =
      _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3])));
  if (nan || !std::isfinite(mx)) {
    for (int64_t t = 0; t < tp; t += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + t), _mm256_setzero_si256());
    return std::numeric_limits<float>::quiet_NaN();
  }
  const __m512 vmx = _mm512_set1_ps(mx);
  // P by VCVTNE2PS2BF16 (round to nearest even; the weights are 0 or normal, >= e^-87, so its flush of subnormal
  // inputs changes nothing), l by VDPBF16PS against ones: each weight added exactly once in fp32.
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  for (int64_t t = 0; t < tp; t += 64) {  // tp: a multiple of 32
    for (int64_t h = 0; h < 64 && t + h < tp; h += 32) {
      const __mmask16 m0 = lanes_below(t + h, T), m1 = lanes_below(t + h + 16, T);
      const __m512 v0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m0, s + t + h), vscale), vmx);
      const __m512 v1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m1, s + t + h + 16), vscale), vmx);
      const __m512bh w = _mm512_cvtne2ps_pbh(exp_nonpositive(v1, m1), exp_nonpositive(v0, m0));
      _mm512_storeu_si512(p + t + h, (__m512i)w);
      if (h == 0) sum0 = _mm512_dpbf16_ps(sum0, w, ones);
      else sum1 = _mm512_dpbf16_ps(sum1, w, ones);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

// B[k][n] = src[k * sk + n * sn] (k < K, n < N) rounded to bf16 into the pair form, zero up to kp x np.
void pair_form(const float* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t kp, int64_t np,
               uint32_t* out) {
  const int64_t panel = kp / 2 * 16;
  if (sn == 1) {  // rows of B contiguous (V as rows): 16 columns of rows 2i and 2i + 1 per store
    for (int64_t n = 0; n < np; n += 16) {
      const __mmask16 m = lanes_below(n, N);
      uint32_t* dst = out + (n / 16) * panel;
      for (int64_t i = 0; i < kp / 2; ++i) {
        const __mmask16 m0 = 2 * i < K ? m : 0, m1 = 2 * i + 1 < K ? m : 0;
        const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m0, src + 2 * i * sk + n)));
        const __m512i hi = _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m1, src + (2 * i + 1) * sk + n)));
        _mm512_storeu_si512(dst + i * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  } else if (sk == 1) {  // columns of B contiguous (K^T read from K as rows): 32 k of one column at a time
    for (int64_t n = 0; n < np; ++n) {
      uint32_t* dst = out + (n / 16) * panel + n % 16;
      for (int64_t k = 0; k < kp; k += 32) {
        const __mmask16 m0 = n < N ? lanes_below(k, K) : 0, m1 = n < N ? lanes_below(k + 16, K) : 0;
        const float* col = src + n * sn + k;  // read only under the masks
        alignas(64) uint32_t pairs[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), to_bf16(_mm512_maskz_loadu_ps(m0, col)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + 8), to_bf16(_mm512_maskz_loadu_ps(m1, col + 16)));
        for (int64_t j = 0; j < 16; ++j) dst[(k / 2 + j) * 16] = pairs[j];
      }
    }
  } else {  // neither stride 1: element by element
    for (int64_t n = 0; n < np; ++n)
      for (int64_t i = 0; i < kp / 2; ++i) {
        uint32_t pair = 0;
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t k = 2 * i + h;
          if (k < K && n < N) {
            const __m256i bits = to_bf16(_mm512_set1_ps(src[k * sk + n * sn]));
            pair |= static_cast<uint32_t>(static_cast<uint16_t>(_mm256_extract_epi16(bits, 0))) << (16 * h);
          }
        }
        out[(n / 16) * panel + i * 16 + n % 16] = pair;
      }
  }
}

void attend_block(const AttentionBlockProblem& b) {
  const int64_t T = b.T, D = b.D, Dv = b.Dv;
  const int64_t kp = (D + 31) / 32 * 32, tp = (T + 31) / 32 * 32, dvp = (Dv + 31) / 32 * 32;
  // Scratch: bf16 Q [64][kp], scores [64][tp] (376 KB for T = 1500), bf16 P [64][tp], P V [64][dvp]: in L2.
  uint16_t* qb = reinterpret_cast<uint16_t*>(scratch(0, static_cast<size_t>(kRows * kp / 2 + 16)));
  float* s = scratch(1, static_cast<size_t>(kRows * tp));
  uint16_t* p = reinterpret_cast<uint16_t*>(scratch(2, static_cast<size_t>(kRows * tp / 2)));
  float* o = scratch(3, static_cast<size_t>(kRows * dvp));
  for (int64_t r = 0; r < kRows; ++r) {
    uint16_t* dst = qb + r * kp;
    int64_t d = 0;
    if (r < b.rows)
      for (const float* src = b.q + r * b.ldq; d < D; d += 16) {
        const __mmask16 m = lanes_below(d, D);
        _mm256_mask_storeu_epi16(dst + d, m, to_bf16(_mm512_maskz_loadu_ps(m, src + d)));
      }
    for (d = r < b.rows ? D : 0; d < kp; ++d) dst[d] = 0;
  }
  float l[kRows];
  {
    TileScope tiles;
    rows64_product(qb, kp, b.kt_pairs, tp, s, tp);
    for (int64_t r = 0; r < b.rows; ++r) l[r] = softmax_row(s + r * tp, T, tp, b.scale, p + r * tp);
    for (int64_t i = b.rows * tp; i < (b.rows + 31) / 32 * 32 * tp; ++i) p[i] = 0;
    for (int64_t r = 0; r < b.rows; r += 32) rows32_product(p + r * tp, tp, b.v_pairs, dvp, o + r * dvp, dvp);
  }
  for (int64_t r = 0; r < b.rows; ++r) {
    const __m512 lv = _mm512_set1_ps(l[r]);
    for (int64_t n = 0; n < Dv; n += 16) {
      const __mmask16 m = lanes_below(n, Dv);
      _mm512_mask_storeu_ps(b.o + r * b.ldo + n, m, _mm512_div_ps(_mm512_loadu_ps(o + r * dvp + n), lv));
    }
  }
}

}  // namespace
const AttentionKernels& amx_attention_kernels_impl() {
  static const AttentionKernels kernels{&pair_form, &attend_block};
  return kernels;
}
}  // namespace xdna::kernels::emu
