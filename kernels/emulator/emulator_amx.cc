// AMX kernels (Sapphire Rapids and later Intel cores): TDPBF16PS for the bf16 contract, TDPBUSD for int8.
// Compiled with the AMX and AVX-512 -m flags; selected at run time only where the CPU has AMX and Linux granted
// this process the tile state (emulator.cc asks once). What AMX does not pay for stays on the AVX-512 code of
// the shared .inc files, compiled here too: the direct (GEMV) and unpacked bf16 kernels (fp32 FMA; few rows on a
// weight paired once, emulator_pair_b, run on the tiles instead) and the VNNI int8 kernel below kInt8MinRows rows.
//
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and adds in fp32 with round-to-nearest-even, flushing bf16
// subnormal inputs and fp32 subnormal results to zero (the contract allows it, as for VDPBF16PS). A is rounded
// with the contract's own f32_to_bf16 (round_vec). TDPBUSD sums u8 x s8 products in int32, wrapping like
// VPDPBUSD, so the int8 results are the VNNI kernel's bits: same quantised A (offset to u8), same colsum
// correction, same epilogue.
#include <immintrin.h>

#include "emulator_amx_tiles.h"
#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#include "emulator_avx512_blocking.h"
#include "emulator_kernels.inc"
#define EMU_INT8_ISA 2
#include "emulator_int8.inc"

constexpr int64_t kPanelRows = 32;  // rows of A per pass (two tiles)
constexpr int64_t kPanelCols = 32;  // columns of C per pass (two tiles)

// ---- bf16 ----

// A 16 x 16 fp32 tile stored to tmp -> C, rows x cols of it.
inline void copy_c_tile(const float* tmp, float* c, int64_t ldc, int rows, int cols) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) c[i * ldc + j] = tmp[i * 16 + j];
}
// A 16 x 16 fp32 tile stored to tmp -> C (row m, column n of the product), rows x cols of it, with the GEMM
// epilogue applied in registers on the way.
inline void epilogue_c_tile(const GemmEpilogue& e, const float* tmp, float* c, int64_t ldc, int64_t m, int64_t n,
                            int rows, int cols) {
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  for (int i = 0; i < rows; ++i) {
    epilogue_vf v;
    __builtin_memcpy(&v, tmp + i * 16, sizeof v);
    v = cols == 16 ? epilogue_apply(e, v, m + i, n, sizeof v) : epilogue_apply(e, v, m + i, n, cols * sizeof(float));
    _mm512_mask_storeu_ps(c + i * ldc, mask, (__m512)v);
  }
}
// The _tile_* intrinsics paste their tile number into the instruction text, so it must be a literal: a macro.
// Tile T -> C (at row m, column n), straight into C when the whole tile is wanted and there is no epilogue, else
// through tmp.
#define EMU_STORE_C_TILE(T, c, ldc, rows, cols, tmp, e, m, n)  \
  do {                                                           \
    if (e) {                                                     \
      _tile_stored(T, tmp, 64);                                  \
      epilogue_c_tile(*(e), tmp, c, ldc, m, n, rows, cols);      \
    } else if ((rows) == 16 && (cols) == 16) {                   \
      _tile_stored(T, c, (ldc) * 4);                             \
    } else {                                                     \
      _tile_stored(T, tmp, 64);                                  \
      copy_c_tile(tmp, c, ldc, rows, cols);                      \
    }                                                            \
  } while (0)

// Few-row calls read each B tile once, from memory or the last-level cache: a tile load waits for it unless the
// lines were asked for in advance (the hardware prefetchers do not follow tile loads far enough). This many
// bytes ahead along each B stream, 16 lines (one B tile) per step.
constexpr int64_t kPrefetchAhead = 4096;
inline void prefetch_tile(const void* p) {
  const char* c = static_cast<const char*>(p) + kPrefetchAhead;
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) _mm_prefetch(c + 64 * l, _MM_HINT_T0);  // past the buffer's end: harmless hints
}

// C[32 x 32] (clipped to rows x cols) = A[32][kp] . B over kp bf16 k values (a multiple of 32). a: bf16 rows,
// lda_bytes apart; b0, b1: the pair form [kp / 2][16] of the two 16-column halves. Prefetch: B streamed once.
// e: the epilogue (null: none), c being row m, column n of the product.
template <bool TwoRows, bool TwoCols, bool Prefetch = false>
void bf16_block(const uint16_t* a, int64_t lda_bytes, const uint32_t* b0, const uint32_t* b1, int64_t kp, float* c,
                int64_t ldc, int rows, int cols, float* tmp, const GemmEpilogue* e, int64_t m, int64_t n) {
  _tile_zero(0);
  if (TwoCols) _tile_zero(1);
  if (TwoRows) _tile_zero(2);
  if (TwoRows && TwoCols) _tile_zero(3);
  const int64_t lda = lda_bytes / 2;
  for (int64_t k = 0; k < kp; k += 32) {
    if (Prefetch) {
      prefetch_tile(b0 + k / 2 * 16);
      if (TwoCols) prefetch_tile(b1 + k / 2 * 16);
    }
    _tile_loadd(4, a + k, lda_bytes);
    _tile_loadd(6, b0 + k / 2 * 16, 64);
    if (TwoCols) _tile_loadd(7, b1 + k / 2 * 16, 64);
    if (TwoRows) _tile_loadd(5, a + 16 * lda + k, lda_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if (TwoCols) _tile_dpbf16ps(1, 4, 7);
    if (TwoRows) _tile_dpbf16ps(2, 5, 6);
    if (TwoRows && TwoCols) _tile_dpbf16ps(3, 5, 7);
  }
  const int r0 = rows < 16 ? rows : 16, c0 = cols < 16 ? cols : 16;
  EMU_STORE_C_TILE(0, c, ldc, r0, c0, tmp, e, m, n);
  if (TwoCols) EMU_STORE_C_TILE(1, c + 16, ldc, r0, cols - 16, tmp, e, m, n + 16);
  if (TwoRows) EMU_STORE_C_TILE(2, c + 16 * ldc, ldc, rows - 16, c0, tmp, e, m + 16, n);
  if (TwoRows && TwoCols) EMU_STORE_C_TILE(3, c + 16 * ldc + 16, ldc, rows - 16, cols - 16, tmp, e, m + 16, n + 16);
}

// One 64-wide n-tile of the packed B (bf16 rows of 64, zero past K up to Kpad) -> the AMX pair form, per
// 16-column quarter q: out[q][kp / 2][16] 32-bit lanes of (B[2i][col], B[2i + 1][col]). kp <= Kpad, even.
void pair_b_tile(const uint16_t* tile, int64_t kp, uint32_t* out) {
  // Lane 2c of a result takes column c of row 2i, lane 2c + 1 column c of row 2i + 1 (index 32 + c).
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t quarter = kp / 2 * 16;
  for (int64_t i = 0; i < kp / 2; ++i) {
    const uint16_t* r0 = tile + 2 * i * 64;
    const uint16_t* r1 = r0 + 64;
    for (int h = 0; h < 2; ++h) {  // columns 32h .. 32h + 31
      const __m512i x = _mm512_loadu_si512(r0 + 32 * h), y = _mm512_loadu_si512(r1 + 32 * h);
      _mm512_storeu_si512(out + (2 * h) * quarter + i * 16, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(out + (2 * h + 1) * quarter + i * 16, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// Rows m0..m1-1 of A, rounded to bf16 (the contract's RNE), into [round_up(rows, 16)][kp] zero padded (a
// panel of 17..32 rows reads two tiles, of up to 16 rows one).
void round_a_rows(const Problem& p, int64_t m0, int64_t m1, int64_t kp, uint16_t* out) {
  const int64_t rows = m1 - m0, padded_rows = (rows + 15) / 16 * 16;
  for (int64_t i = 0; i < padded_rows; ++i) {
    uint16_t* dst = out + i * kp;
    int64_t k = 0;
    if (i < rows) {
      const float* src = p.a + (m0 + i) * p.lda;
      for (; k + 16 <= p.K; k += 16) {
        vu u;
        const vf r = round_vec(load_f(src + k));
        __builtin_memcpy(&u, &r, sizeof u);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32((__m512i)u, 16)));
      }
      for (; k < p.K; ++k) {
        const float r = round_bf16(src[k]);
        uint32_t u;
        __builtin_memcpy(&u, &r, sizeof u);
        dst[k] = static_cast<uint16_t>(u >> 16);
      }
    }
    for (; k < kp; ++k) dst[k] = 0;
  }
}

// One 64-wide n-tile at column n (columns n .. min(n1, n + 64) - 1) of C[m0 .. m0 + rows] from rounded A (a,
// [padded rows][kp]) and the tile's pair form b (quarters `quarter` lanes apart), over all 32-row panels.
template <bool Prefetch>
void sweep_tile(const Problem& p, const uint16_t* a, int64_t rows, int64_t kp, const uint32_t* b, int64_t quarter,
                int64_t m0, int64_t n, int64_t n1, float* tmp) {
  for (int64_t nc = n; nc < n1 && nc < n + kTile; nc += kPanelCols) {
    const int cols = static_cast<int>(min64(kPanelCols, n1 - nc));
    const uint32_t* b0 = b + (nc - n) / 16 * quarter;
    for (int64_t i = 0; i < rows; i += kPanelRows) {
      const int r = static_cast<int>(min64(kPanelRows, rows - i));
      const uint16_t* ai = a + i * kp;
      float* c = p.c + (m0 + i) * p.ldc + nc;
      const uint32_t* b1 = cols > 16 ? b0 + quarter : b0;
      const int64_t m = m0 + i;
      if (r > 16 && cols > 16) bf16_block<true, true, Prefetch>(ai, kp * 2, b0, b1, kp, c, p.ldc, r, cols, tmp, p.epilogue, m, nc);
      else if (r > 16) bf16_block<true, false, Prefetch>(ai, kp * 2, b0, b1, kp, c, p.ldc, r, cols, tmp, p.epilogue, m, nc);
      else if (cols > 16) bf16_block<false, true, Prefetch>(ai, kp * 2, b0, b1, kp, c, p.ldc, r, cols, tmp, p.epilogue, m, nc);
      else bf16_block<false, false, Prefetch>(ai, kp * 2, b0, b1, kp, c, p.ldc, r, cols, tmp, p.epilogue, m, nc);
    }
  }
}

// C[m0:m1, n0:n1] for any number of rows: A rounded once per call, each 64-wide n-tile of B paired once and
// swept over all 32-row panels. K runs whole in the tiles (no partial sums through memory).
void amx_bf16_gemm(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t kp = (p.K + 31) / 32 * 32;  // <= Kpad: packed B is zero there
  const int64_t rows = m1 - m0, padded_rows = (rows + 15) / 16 * 16;
  uint16_t* a = reinterpret_cast<uint16_t*>(scratch(0, static_cast<size_t>(padded_rows * kp / 2)));
  uint32_t* b = reinterpret_cast<uint32_t*>(scratch(1, static_cast<size_t>(kp / 2 * kTile)));
  float* tmp = scratch(2, 256);
  round_a_rows(p, m0, m1, kp, a);
  TileScope tiles;
  for (int64_t n = n0; n < n1; n += kTile) {
    pair_b_tile(p.b + (n / kTile) * p.Kpad * kTile, kp, b);
    sweep_tile<false>(p, a, rows, kp, b, kp / 2 * 16, m0, n, n1, tmp);  // b: in L1, just paired
  }
}

// The whole packed B -> pair form, tile after tile: tile t at out + t * Kpad * 32 (as many bytes as packed).
void pair_b_all(const uint16_t* packed, int64_t Kpad, int64_t Npad, uint32_t* out) {
  for (int64_t t = 0; t < Npad / kTile; ++t) pair_b_tile(packed + t * Kpad * kTile, Kpad, out + t * Kpad * kTile / 2);
}

// amx_bf16_gemm on a B paired once beforehand (pair_b_all): few rows pay no per-call re-lay of B, so TDPBF16PS
// (16 rows per instruction, even when fewer are wanted) beats the fp32 FMA direct kernel from paired_min_m rows.
void amx_bf16_paired(const Problem& p, const uint32_t* pairs, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t kp = (p.K + 31) / 32 * 32;  // <= Kpad: the pairs are zero past K
  const int64_t rows = m1 - m0, padded_rows = (rows + 15) / 16 * 16;
  uint16_t* a = reinterpret_cast<uint16_t*>(scratch(0, static_cast<size_t>(padded_rows * kp / 2)));
  float* tmp = scratch(2, 256);
  round_a_rows(p, m0, m1, kp, a);
  TileScope tiles;
  for (int64_t n = n0; n < n1; n += kTile)
    sweep_tile<true>(p, a, rows, kp, pairs + (n / kTile) * p.Kpad * kTile / 2, p.Kpad / 2 * 16, m0, n, n1, tmp);
}

// ---- int8 ----

// From 2 rows TDPBUSD on a tile of just those rows matches or beats the VNNI kernel (whose VPDPBUSD count grows
// with the rows), measured single-threaded on 2..5 x {512x512, 512x2048, 2048x512, 512x51865}: e.g. 5x512x2048
// 13 us against 31-37 us, 2 rows 6-11 us against 6-15 us; at 1 row they tie and the GEMV stays on VNNI
// (benchmarks/README.md, "Few rows").
constexpr int64_t kInt8MinRows = 2;

// A 16 x 16 int32 tile stored to tmp -> C rows x cols: (acc - 128 * colsum) * (sa * sb), the VNNI kernel's
// dequantising step, then the GEMM epilogue (if any) in registers.
inline void store_int8_tile(const Int8Problem& p, int64_t m, int64_t n, int rows, int cols, const int32_t* tmp) {
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  const __m512i offset = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, p.colsum + n), 7);
  const __m512 sb = _mm512_maskz_loadu_ps(mask, p.sb + n);
  for (int i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(p.sa[m + i]), sb);
    const __m512i acc = _mm512_load_si512(tmp + i * 16);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, offset)), scale);
    if (p.epilogue) {
      v = (__m512)(cols == 16 ? epilogue_apply(*p.epilogue, (epilogue_vf)v, m + i, n, sizeof(epilogue_vf))
                              : epilogue_apply(*p.epilogue, (epilogue_vf)v, m + i, n, cols * sizeof(float)));
    }
    _mm512_mask_storeu_ps(p.c + (m + i) * p.ldc + n, mask, v);
  }
}

// One block's C tiles stored as int32 sums (tile t at sums + 256 t), waiting for their dequantising step.
struct PendingBlock {
  int64_t m = 0, n = 0;
  int rows = 0, cols = 0;  // rows == 0: none
  int32_t* sums = nullptr;
};

// The dequantising step (and the epilogue) of a pending block -> C.
inline void finish_int8_block(const Int8Problem& p, const PendingBlock& b) {
  if (b.rows == 0) return;
  const int r0 = b.rows < 16 ? b.rows : 16, c0 = b.cols < 16 ? b.cols : 16;
  store_int8_tile(p, b.m, b.n, r0, c0, b.sums);
  if (b.cols > 16) store_int8_tile(p, b.m, b.n + 16, r0, b.cols - 16, b.sums + 256);
  if (b.rows > 16) store_int8_tile(p, b.m + 16, b.n, b.rows - 16, c0, b.sums + 512);
  if (b.rows > 16 && b.cols > 16) store_int8_tile(p, b.m + 16, b.n + 16, b.rows - 16, b.cols - 16, b.sums + 768);
}

// C[m .. m+rows, n .. n+cols] (rows, cols <= 32) over all of Kpad: a is quantised A (u8, lda bytes apart);
// b0, b1 the two 16-column panels of QuantizedB::q, already in the tile's [Kpad / 4][16][4] form. Prefetch: as
// bf16_block's. Software pipelined: this block's sums go to `buffers` (two of [4][256] int32, alternating), then
// the previous block's dequantising step and epilogue (`pending`, AVX-512) run while the tile unit is still busy
// with this block; this block becomes the new `pending`, and the caller finishes the last one.
template <bool TwoRows, bool TwoCols, bool Prefetch = false>
void int8_tile_block(const Int8Problem& p, const uint8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1,
                     int64_t m, int64_t n, int rows, int cols, int32_t* buffers, PendingBlock& pending) {
  _tile_zero(0);
  if (TwoCols) _tile_zero(1);
  if (TwoRows) _tile_zero(2);
  if (TwoRows && TwoCols) _tile_zero(3);
  for (int64_t k = 0; k < p.Kpad; k += 64) {
    if (Prefetch) {
      prefetch_tile(b0 + k * 16);
      if (TwoCols) prefetch_tile(b1 + k * 16);
    }
    _tile_loadd(4, a + k, lda);
    _tile_loadd(6, b0 + k * 16, 64);
    if (TwoCols) _tile_loadd(7, b1 + k * 16, 64);
    if (TwoRows) _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_dpbusd(0, 4, 6);
    if (TwoCols) _tile_dpbusd(1, 4, 7);
    if (TwoRows) _tile_dpbusd(2, 5, 6);
    if (TwoRows && TwoCols) _tile_dpbusd(3, 5, 7);
  }
  int32_t* sums = pending.sums == buffers ? buffers + 1024 : buffers;
  _tile_stored(0, sums, 64);
  if (TwoCols) _tile_stored(1, sums + 256, 64);
  if (TwoRows) _tile_stored(2, sums + 512, 64);
  if (TwoRows && TwoCols) _tile_stored(3, sums + 768, 64);
  finish_int8_block(p, pending);
  pending = {m, n, rows, cols, sums};
}

// Up to 16 rows (beam search): A and C tiles configured with just those rows, so A is loaded from the quantised
// rows as they lie (no zero-padded copy) and no tile row is computed for nothing; B streams once, two panels at
// a time, straight from QuantizedB::q.
void amx_int8_few_rows(const Int8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int rows = static_cast<int>(m1 - m0);
  TileConfig config;
  config.rows[0] = config.rows[1] = config.rows[4] = static_cast<uint8_t>(rows);  // C tiles 0-1, A tile 4
  int32_t* buffers = reinterpret_cast<int32_t*>(scratch(1, 2 * 1024));
  PendingBlock pending;
  const uint8_t* a = reinterpret_cast<const uint8_t*>(p.qa) + m0 * p.Kpad;
  TileScope tiles(config);
  for (int64_t n = n0; n < n1; n += kPanelCols) {
    const int cols = static_cast<int>(imin(kPanelCols, n1 - n));
    const int8_t* b0 = p.qb + (n / 16) * p.Kpad * 16;
    if (cols > 16) int8_tile_block<false, true, true>(p, a, p.Kpad, b0, b0 + p.Kpad * 16, m0, n, rows, cols, buffers, pending);
    else int8_tile_block<false, false, true>(p, a, p.Kpad, b0, b0, m0, n, rows, cols, buffers, pending);
  }
  finish_int8_block(p, pending);
}

// C[m0:m1, n0:n1], n0 a multiple of 16. Each 32-row panel of A (in L1 for K <= 512) sweeps every pair of B panels
// of the call (B stays in L2), so C is written row panel by row panel. The other order (a B pair in L1 swept down
// the rows) writes C in 32-column strips of far-apart rows: measured single-threaded on 1500 x 512 x 2048 (a 1.5
// MB C block per call, more than L2 holds beside B) 6.0 ms against 2.3 ms (benchmarks/README.md, "int8, many
// rows"). A row tail shorter than a tile is copied to scratch so that tile loads stay inside the buffer.
void amx_int8_gemm(const Int8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 < kInt8MinRows) return int8_gemm(p, m0, m1, n0, n1);
  if (m1 - m0 <= 16) return amx_int8_few_rows(p, m0, m1, n0, n1);
  const uint8_t* qa = reinterpret_cast<const uint8_t*>(p.qa);
  const int64_t rows = m1 - m0, full = rows / kPanelRows * kPanelRows, tail = rows - full;
  uint8_t* tail_a = nullptr;
  if (tail > 0) {
    tail_a = reinterpret_cast<uint8_t*>(scratch(0, static_cast<size_t>(kPanelRows * p.Kpad / 4)));
    __builtin_memcpy(tail_a, qa + (m0 + full) * p.Kpad, static_cast<size_t>(tail * p.Kpad));
    __builtin_memset(tail_a + tail * p.Kpad, 128, static_cast<size_t>((kPanelRows - tail) * p.Kpad));  // u8 zero
  }
  int32_t* buffers = reinterpret_cast<int32_t*>(scratch(1, 2 * 1024));
  PendingBlock pending;
  TileScope tiles;
  for (int64_t i = 0; i < rows; i += kPanelRows) {
    const int r = static_cast<int>(imin(kPanelRows, rows - i));
    const uint8_t* a = i < full ? qa + (m0 + i) * p.Kpad : tail_a;
    for (int64_t n = n0; n < n1; n += kPanelCols) {
      const int cols = static_cast<int>(imin(kPanelCols, n1 - n));
      const int8_t* b0 = p.qb + (n / 16) * p.Kpad * 16;
      const int8_t* b1 = b0 + p.Kpad * 16;
      if (r > 16 && cols > 16) int8_tile_block<true, true>(p, a, p.Kpad, b0, b1, m0 + i, n, r, cols, buffers, pending);
      else if (r > 16) int8_tile_block<true, false>(p, a, p.Kpad, b0, b0, m0 + i, n, r, cols, buffers, pending);
      else if (cols > 16) int8_tile_block<false, true>(p, a, p.Kpad, b0, b1, m0 + i, n, r, cols, buffers, pending);
      else int8_tile_block<false, false>(p, a, p.Kpad, b0, b0, m0 + i, n, r, cols, buffers, pending);
    }
  }
  finish_int8_block(p, pending);
}

// Rows from which a weight paired once beats the fp32 FMA direct kernel, measured on 1..16 x {512x512, 512x2048,
// 2048x512, 512x51865}, 1 and 2 threads: 5x512x512 12 us against 27 us single-threaded, 2 rows 7 against 11;
// at 1 row the direct kernel (a GEMV, bound by reading B either way) stays (benchmarks/README.md, "Few rows").
constexpr int64_t kPairedMinRows = 2;

IsaKernels make_amx_kernels() {
  IsaKernels k = make_kernels("amx");
  k.blocked = &amx_bf16_gemm;
  k.block_m = 192;  // a multiple of kPanelRows
  k.direct_max_m = 6;  // measured: the fp32 FMA direct kernel wins up to 6 rows, AMX from 7 (benchmarks/README.md)
  k.detail = "TDPBF16PS from 7 rows and from 2 on weights paired at first use, AVX-512 FMA otherwise";
  k.pair_b = &pair_b_all;
  k.paired = &amx_bf16_paired;
  k.paired_min_m = kPairedMinRows;
  k.paired_max_m = 16;  // beams; more rows take the blocked path (its per-task re-lay is shared by many rows)
  return k;
}
const IsaKernels kKernels = make_amx_kernels();
static_assert(kInt8MinRows == 2, "update the detail string");
const Int8Kernels kInt8Kernels{"amx", 1, &int8_quantize_rows, &amx_int8_gemm, "TDPBUSD from 2 rows, VNNI for 1"};
}  // namespace
const IsaKernels& amx_kernels() { return kKernels; }
const Int8Kernels& amx_int8_kernels() { return kInt8Kernels; }
}  // namespace xdna::kernels::emu
