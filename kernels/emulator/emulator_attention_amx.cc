// One block of the fused many-row attention (attention_contract.h) on AMX and AVX-512 (with AVX512-BF16), driven by
// emulator_attention.cc: up to 64 query rows of one head against all T keys. S = Q K^T by TDPBF16PS into L2-resident
// scratch, the softmax in two AVX-512 passes over each row (scaled max, then exp, P rounded to bf16, the row sum),
// P V by TDPBF16PS, the division last. K^T and V come in the tile pair form, prepared once per head.
//
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and adds in fp32 (round to nearest even), flushing bf16
// subnormal inputs and fp32 subnormal results to zero, as the GEMM contract allows (emulator_amx.cc). The softmax
// is emulator_attention_avx512.h's (shared with the few-row kernel on AVX512-BF16).
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "emulator_amx_tiles.h"
#include "emulator_attention_avx512.h"
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

// Q, K and V come as rows of the projections' output ([T, H, D]: rows 2 KB apart for whisper-base), which the
// hardware prefetcher, following streams within a 4 KB page, does not fetch ahead: perf put nearly all of
// pair_form's time and a twentieth of attend_block's on those loads. The row kPrefetchRows on is requested while
// this one converts (a hint: no result changes).
constexpr int64_t kPrefetchRows = 8;
inline void prefetch_row(const float* row, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
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
        if (n == 0 && 2 * i + kPrefetchRows + 1 < K) {  // the first panel's pass brings the rows in
          prefetch_row(src + (2 * i + kPrefetchRows) * sk, N);
          prefetch_row(src + (2 * i + kPrefetchRows + 1) * sk, N);
        }
        const __mmask16 m0 = 2 * i < K ? m : 0, m1 = 2 * i + 1 < K ? m : 0;
        const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m0, src + 2 * i * sk + n)));
        const __m512i hi = _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m1, src + (2 * i + 1) * sk + n)));
        _mm512_storeu_si512(dst + i * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  } else if (sk == 1) {  // columns of B contiguous (K^T read from K as rows): 32 k of one column at a time
    for (int64_t n = 0; n < np; ++n) {
      if (n + kPrefetchRows < N) prefetch_row(src + (n + kPrefetchRows) * sn, K);
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
    if (r + kPrefetchRows < b.rows) prefetch_row(b.q + (r + kPrefetchRows) * b.ldq, D);
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
    for (int64_t r = 0; r < b.rows; ++r)
      l[r] = softmax_row_bf16(s + r * tp, T, tp, b.scale, b.mask ? b.mask + r * b.mask_stride_m : nullptr,
                              b.zero_nan_rows, p + r * tp);
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
