// The NPU GEMM contract: the one definition every backend implements (emulator on the CPU, xrt on the NPU).
//
//   C[M,N] = bf16(A)[M,K] · bf16(B)[K,N]        accumulated in fp32, returned as fp32
//
// Numerics
//   * A and B are converted fp32 -> bf16 on the HOST with round-to-nearest-even (NaN stays a quiet NaN,
//     +-Inf stay Inf, finite values that round past the bf16 maximum become Inf). The AIE's own fp32->bf16
//     conversion defaults to round-toward-minus-infinity, which is why the host does it.
//   * Every product of two bf16 values is exact in fp32; the sum over K is carried in fp32. The order of
//     summation is not part of the contract (the AIE sums 4x8x4 MACs per cycle, then tile by tile).
//   * Subnormal bf16 inputs may be flushed to zero by a backend (AIE-ML and AVX512-BF16 both may).
//   * Gemm's alpha and beta*C are applied by the host in fp32 after the kernel; not by the kernel.
//   * The GEMM epilogue (GemmEpilogue below) is part of the contract: applied in fp32 to each finished block of C.
//   The error bound (stated here once; tests/numerics.py implements it, README quotes it):
//     |C - C_exact| <= (2^-7 + 2^-16 + K * 2^-23) * (|A|.|B|) elementwise
//   bf16 keeps 8 significant bits: each rounded operand is within 2^-8 relative, a product of two within
//   (1 + 2^-8)^2 - 1 = 2^-7 + 2^-16; K * 2^-23 covers the fp32 sum, with a factor 2 of margin.
//
// Precision modes beyond bf16 (issue 13): a node's precision is chosen at claim time (ops/precision_policy.h, the
// `precision` and `precision_policy` provider options), packing makes its constant B in that precision
// (packing.h) and a backend runs it or declines it (Backend::supports): the emulator runs all three
// (emulator.h: emulator_gemm_int8, emulator_gemm_bf16x3), the xrt backend bf16, and int8 where i8_f32 kernels
// were built (kernels/aie/gemm_int8_design.py; A quantised on the host with the emulator's quantize_row_int8).
//   int8 (A8W8):
//     * B (a constant weight) is quantised once at Compile, symmetric per output channel n:
//         sb_n = max_k |B[k][n]| / 127,  qb = rne(B / sb_n) in [-127, 127]  (sb_n = 0: the column is all zero).
//     * A is quantised at run time per row m, symmetric and dynamic: sa_m = max_k |A[m][k]| / 127, qa likewise.
//     * sum_k qa*qb in int32: exact for K <= 133143 (K * 127^2 < 2^31), so every backend agrees bit for bit.
//     * Epilogue in fp32: C = float(acc) * (sa_m * sb_n). A row of A or a column of B holding NaN or Inf gives
//       NaN in that row / column of C (int8 has no such values; silently dropping them would hide them).
//     * Run-time B operands (attention) stay in bf16: quantising them per call costs a pass over B for one use.
//     * Where A is quantised (issue 15 step 2, decided by the dataflow model, docs/npu.md "int8 without the host
//       pass"): on the host, per row, as above. Both in-core routes were weighed and rejected: per-row-per-64-column
//       scales (a contract change) and a two-pass array program (row max, then quantise; this contract unchanged).
//       Either makes the array read A as fp32 in ORT's memory (4 bytes per element pinned, synced and moved instead
//       of 1), and bit-exact quantisation in the core needs fp32 multiplies at AIE-ML's "safe" float accuracy
//       (UG1603: fp32 is emulated with bf16 MACs, 0 ULP takes 9 per multiply), which a tile redone per column block
//       makes as costly as the int8 GEMM itself. By the model neither saves more than ~2 ms of the ~22 ms host pass,
//       and the int8 target is bound by compute anyway. So this contract stays, and the emulator stays its reference.
//     Bound: a = sa (qa + da) with |da| <= 1/2 (+ at most 127 * 3 * 2^-24 from scaling by 127/amax in fp32: 0.0005
//       of slack), likewise b, so
//       |C - C_exact| <= 0.5005 (sb_n sum_k |A[m][k]| + sa_m sum_k |B[k][n]|) + 0.2505 K sa_m sb_n
//                        + 2^-21 (|A|.|B|)     (the last term: the epilogue's three fp32 roundings, doubled)
//   bf16x3 (near fp32): x_hi = bf16(x), x_lo = bf16(x - x_hi) (x - x_hi is exact in fp32) for A and B, and
//       C = A_hi.B_hi + (A_lo.B_hi + A_hi.B_lo)  as three contract GEMMs summed in fp32. x = x_hi + x_lo + e,
//       |e| <= 2^-16 |x|; the dropped A_lo.B_lo and the e terms add at most (3 * 2^-16 + 2^-23)|a||b| per product.
//     Bound: |C - C_exact| <= (2^-14 + (K + 2) * 2^-23) * (|A|.|B|)    (fp32 sums over K and the two final
//       additions, doubled as above; 2^-14 > 3.01 * 2^-16). Subnormal x_lo may be flushed (tests' absolute TINY).
//
// Epilogue (issues 7, 13): the elementwise nodes after a MatMul (bias Add, Gelu / BiasGelu, residual Add), run on
// each block of C while the backend still holds it (the AIE vector unit on the output tile in local memory; the
// emulator right after a row block is written) instead of a round trip through memory and a CPU pass:
//     C[m][n] = act(C[m][n] + bias[n]) + residual[m][n]        in fp32, each step optional, in this order,
// after the product's own arithmetic (int8: after the dequantise). act = GELU(x) = x/2 (1 + erf(x/sqrt 2)) (the
// erf form of ONNX Gelu and ORT's BiasGelu), erf evaluated by gelu_erf below: a rational x P(x^2)/Q(x^2) on
// [-4, 4] (fitted for this project; clamped outside, where |1 - erf| < 1.6e-8), branch-free so it vectorises.
//   Bound vs float64: |erf_approx - erf| <= 4.4e-7 for every float (measured on a 2M-point grid of [-6, 6]), so
//     |GELU_approx(x) - GELU(x)| <= 2^-21 |x|      (0.5 * 4.4e-7 plus the fp32 roundings of x/2 (1 + e); tests
//   measure <= 3.1e-7 |x|). Composed with the product's bound E: |d GELU/dx| <= 1.13, so the output is within
//     1.13 (E + 2^-24 |s|) + 2^-21 |s| + 2^-24 |y|   where s = C + bias and y the output (tests/numerics.py).
//
// Output in bfloat16 (issue 7): a MatMul whose (epilogue'd) fp32 result is read by a Cast to bfloat16 alone takes
// the Cast (ops/matmul.cc) and writes C in bf16: each finished fp32 value rounded as ORT's Cast does it
// (store_bf16_as_cast below): round to nearest even, +-Inf stay Inf, finite values past the bf16 maximum become
// Inf, and NaN becomes the quiet NaN of its sign (0x7FC0 / 0xFFC0: ORT's Cast drops the payload). The fp32 value
// is the one the fp32 output would hold, so the bf16 output is bit for bit MatMul + Cast. Every backend's fp32
// product then gets this host pass (the xrt backend's too: the NPU returns fp32 C).
//
// A prologue (issues 7, 13): a LayerNormalization over A's last axis (K) whose output only constant-weight products
// read (ops/matmul.cc) is taken into them: A = LN(X) with gamma, beta [K] constants and epsilon,
//     y = (x - mean) / sqrt(var + eps) * gamma + beta    per row, in fp32 (the mean's sum in fp64),
// computed as ORT's CPU LayerNormalization computes it, bit for bit (kernels/layernorm.h: the order of its sums,
// its two-pass variance, its FMAs), so that the product is the one it would make of ORT's LN output wherever the LN
// runs. A row holding Inf or NaN gives a NaN row, as in ORT. The product then rounds y as it rounds any fp32 A
// (bf16, int8 per row, bf16x3). Every backend gets y from the host today (the fused node computes it once per call
// for all the products that read it): the emulator and the xrt backend run their usual A path on it.
//   Bound (u = 2^-24, per row; E|x|, E[x^2] row means, s = sqrt(var + eps) exact), for any order of the sums and
//   a mean summed in fp32 or better: the sums give
//     |mean' - mean| <= dm = (K + 1) u E|x|,   |var' - var| <= dv = (3K + 7) u (E[x^2] + eps),
//     |s' - s| <= ds = dv / s + u s,
//   and, with s_ = max(s - ds, sqrt(eps)) <= s' (var' >= 0: a sum of squares) and d = |x - mean|,
//     |y' - y| <= |gamma| ((dm + 2u d) / s_ + d min(ds / (s s_), 1 / s_)) + 2u (|y| + |beta|)
//   (tests/numerics.py doubles it for the second-order terms). The product's bound is then taken at |y| plus that
//   error, and that error times |B| added.
//
// Tiling for the Phoenix (npu1) array: 4 usable columns x 4 AIE-ML cores.
//   * Each core computes one kTileM x kTileN tile of C, looping over K in kTileK steps.
//     L1 budget (64 KiB/core): A 64x64 bf16 (8 KiB) x2 + B 64x64 bf16 (8 KiB) x2 + C 64x64 fp32 (16 KiB) = 48 KiB.
//   * The 4 core rows split M, the 4 columns split N: one array pass covers kBlockM x kBlockN of C.
//
// Layouts (host memory, shared DDR on Phoenix)
//   * A: row-major bf16 [Mpad, Kpad]. The mem-tile DMA cuts it into the core's 4x8 (r x s) sub-blocks.
//   * B: packed once at Compile into tiles of kTileK x kTileN, each tile row-major (K rows of kTileN
//     contiguous values), tiles ordered n-tile major then k-tile: tile (kt, nt) starts at
//     ((nt * Kpad/kTileK) + kt) * kTileK * kTileN. A core column streams its n-tiles contiguously.
//   * C: row-major fp32 [Mpad, Npad].
//   * Padding: Kpad = round_up(K, kTileK), Npad = round_up(N, kBlockN), Mpad = round_up(M, kBlockM).
//     Pads are zero in A and B, so they add exact zeros to the sums; padded rows/columns of C are discarded.
//     (Backends may skip work on pads; that never changes a kept value.)
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace xdna::kernels {

inline constexpr int64_t kTileM = 64;
inline constexpr int64_t kTileK = 64;
inline constexpr int64_t kTileN = 64;
inline constexpr int64_t kArrayRows = 4;  // AIE-ML core rows per column on npu1
inline constexpr int64_t kArrayCols = 4;  // columns an application may use on npu1
inline constexpr int64_t kBlockM = kTileM * kArrayRows;
inline constexpr int64_t kBlockN = kTileN * kArrayCols;

// The arithmetic of one product (the section "Precision modes" above). Plain data: a plan stores it.
enum class Precision : int { kBf16 = 0, kInt8 = 1, kBf16x3 = 2 };

inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kInt8: return "int8";
    case Precision::kBf16x3: return "bf16x3";
    default: return "bf16";
  }
}

// "bf16", "int8" or "bf16x3" -> the mode; false for anything else.
inline bool parse_precision(const char* name, Precision* out) {
  for (Precision p : {Precision::kBf16, Precision::kInt8, Precision::kBf16x3})
    if (std::strcmp(name, precision_name(p)) == 0) {
      *out = p;
      return true;
    }
  return false;
}

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct PaddedShape {
  int64_t M, K, N;           // logical
  int64_t Mpad, Kpad, Npad;  // what the array computes
};

constexpr PaddedShape padded_shape(int64_t M, int64_t K, int64_t N) {
  return {M, K, N, round_up(M, kBlockM), round_up(K, kTileK), round_up(N, kBlockN)};
}

// Offset (in elements) of B[k][n] inside the packed B buffer.
constexpr int64_t packed_b_offset(int64_t Kpad, int64_t k, int64_t n) {
  const int64_t kt = k / kTileK, nt = n / kTileN;
  return ((nt * (Kpad / kTileK) + kt) * kTileK + (k % kTileK)) * kTileN + (n % kTileN);
}

// fp32 -> bf16, round to nearest even; NaN stays (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> bf16 as ORT's Cast writes it ("Output in bfloat16" above): f32_to_bf16, but a NaN becomes the quiet
// NaN of its sign. Branch-free, so that store_bf16_as_cast vectorises.
inline uint16_t f32_to_bf16_as_cast(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline void store_bf16_as_cast(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16_as_cast(src[i]);
}

// The value a backend sees for an fp32 input.
inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// One product's epilogue ("Epilogue" above). Plain data: GemmArgs carries it by value.
struct GemmEpilogue {
  const float* bias = nullptr;      // [N]; null: no bias
  bool gelu = false;
  const float* residual = nullptr;  // residual[m * ldr + n]; null: none. Never aliases C.
  int64_t ldr = 0;
  bool empty() const { return !bias && !gelu && !residual; }
  // The same epilogue for a block of C that starts at row m of the product: its residual rows from m on.
  GemmEpilogue from_row(int64_t m) const {
    GemmEpilogue e = *this;
    if (e.residual) e.residual += m * e.ldr;
    return e;
  }
};

// gelu_erf's rational x P(t) / Q(t), t = x^2: the coefficients from the highest power down, evaluated by Horner's
// rule (p = p * t + c) on every CPU path, scalar here and vectorised in emulator_epilogue.inc, so both give the
// same bits.
inline constexpr float kGeluErfP[] = {1.92201082e-08f, -1.99060612e-06f, 1.55561997e-04f, 4.29371723e-03f,
                                      5.24352492e-02f, 2.13957530e-01f,  1.12837868e+00f};
inline constexpr float kGeluErfQ[] = {1.09823e-03f, 1.555229e-02f, 1.2080502e-01f, 5.2294257e-01f, 1.f};

// erf(x), |error| <= 4.4e-7 (see "Epilogue" above). NaN stays NaN (the clamp keeps it).
inline float gelu_erf(float x) {
  x = x < -4.f ? -4.f : x;
  x = x > 4.f ? 4.f : x;
  const float t = x * x;
  float p = kGeluErfP[0], q = kGeluErfQ[0];
  for (size_t i = 1; i < sizeof kGeluErfP / sizeof *kGeluErfP; ++i) p = p * t + kGeluErfP[i];
  for (size_t i = 1; i < sizeof kGeluErfQ / sizeof *kGeluErfQ; ++i) q = q * t + kGeluErfQ[i];
  return x * p / q;
}

inline float gelu(float x) { return 0.5f * x * (1.f + gelu_erf(x * 0.70710678118654752f)); }

// Applies `e` to C's rows [m0, m1) and columns [n0, n1) (row stride ldc): the one implementation the CPU paths
// share; a device applies the same arithmetic in its kernel (kernels/aie/gemm_bf16.cc, gemm_epilogue).
inline void apply_epilogue(const GemmEpilogue& e, float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* __restrict row = c + m * ldc;
    const float* __restrict res = e.residual ? e.residual + m * e.ldr : nullptr;
    if (e.bias)
      for (int64_t n = n0; n < n1; ++n) row[n] += e.bias[n];
    if (e.gelu)
      for (int64_t n = n0; n < n1; ++n) row[n] = gelu(row[n]);
    if (res)
      for (int64_t n = n0; n < n1; ++n) row[n] += res[n];
  }
}

}  // namespace xdna::kernels
