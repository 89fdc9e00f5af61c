// Internal interface between the emulator's driver (emulator.cc: dispatch, threads, work split) and its
// per-ISA kernel translation units (emulator_<isa>.cc, each compiled with its own -m flags).
// Only plain data and function pointers cross this boundary: no inline function here may be emitted into an
// ISA-specific object, or the linker could hand AVX-512 code to an AVX2-only machine.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../gemm_contract.h"  // for GemmEpilogue (plain data); kernel TUs call none of its inline functions

namespace xdna::kernels::emu {

// One GEMM call in the contract's terms; B is the packed bf16 buffer (gemm_contract.h).
struct Problem {
  const float* a;
  int64_t lda;
  float* c;
  int64_t ldc;
  const uint16_t* b;
  int64_t M, K, N, Kpad;
  // The epilogue (gemm_contract.h), null: none. `blocked`, `direct` and `paired` apply it to each panel of C as
  // they finish it, while it is in L1 (emulator_epilogue.inc: the bits of apply_epilogue, vectorised per ISA).
  const GemmEpilogue* epilogue = nullptr;
};

// Small M against a run-time B left in its fp32 layout: B[k][n] = b[k * ldb + n], or b[n * ldb + k] when
// b_transposed (K^T read from K as it lies). For a few rows, rounding B on the fly costs less than packing it
// (decoder attention: a fresh K/V every step).
struct UnpackedProblem {
  const float* a;
  int64_t lda;
  float* c;
  int64_t ldc;
  const float* b;
  int64_t ldb;
  int64_t M, K, N;
  bool b_transposed;
  const uint16_t* b_bf16 = nullptr;  // B in bfloat16 instead (b then null), same layout and ldb
};

struct IsaKernels {
  const char* name;
  // Rows of C per blocked task (a multiple of the micro-kernel height).
  int64_t block_m;
  // Largest M the direct (GEMV-like) kernel handles in one pass over B.
  int64_t direct_max_m;
  // C[m0:m1, n0:n1] = bf16(A) . B over all of K. n0 is a multiple of kTileN; n1 <= N. K >= 1.
  // `blocked` converts B to fp32 once per k-chunk and reuses it over up to block_m rows (large M);
  // `direct` streams the packed bf16 B straight into the FMAs (m1 - m0 <= direct_max_m; GEMV).
  void (*blocked)(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*direct)(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // C[m0:m1, n0:n1] = bf16(A) . bf16(B) with B unpacked (UnpackedProblem); any M, meant for small ones.
  void (*unpacked)(const UnpackedProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // What runs where, when a set mixes instruction sets (the backend's description shows it); null: just `name`.
  const char* detail = nullptr;
  // AMX only (null elsewhere): B re-laid once per weight into the tiles' (k, k+1) pair form (`pair_b`: packed
  // bf16 B of Kpad x Npad -> Kpad * Npad / 2 lanes), and the kernel reading it (`paired`: as `direct`, n0 a
  // multiple of kTileN), used for paired_min_m <= M <= paired_max_m rows.
  void (*pair_b)(const uint16_t* packed, int64_t Kpad, int64_t Npad, uint32_t* out) = nullptr;
  void (*paired)(const Problem& p, const uint32_t* pairs, int64_t m0, int64_t m1, int64_t n0, int64_t n1) = nullptr;
  int64_t paired_min_m = 0, paired_max_m = 0;
};

// One int8 GEMM call (gemm_contract.h, int8): quantise A, then C = dequant(qa . qb).
struct Int8Problem {
  const float* a_f32;  // A as given
  int64_t lda_f32;
  void* qa;            // [M][Kpad] quantised A in the kernel set's own element type (Int8Kernels::a_bytes)
  float* sa;           // [M] row scales
  const int8_t* qb;    // QuantizedB::q (16-column panels, emulator.h)
  const float* sb;     // [N] column scales
  const int32_t* colsum;
  float* c;
  int64_t ldc;
  int64_t M, K, N, Kpad;
  const GemmEpilogue* epilogue = nullptr;  // as Problem::epilogue: `gemm` applies it to each block it stores
};

struct Int8Kernels {
  const char* name;
  int a_bytes;  // bytes per element of Int8Problem::qa
  // Rows m0..m1-1 of A -> qa and sa.
  void (*quantize_rows)(const Int8Problem& p, int64_t m0, int64_t m1);
  // C[m0:m1, n0:n1] from qa, sa and B; n0 a multiple of 16.
  void (*gemm)(const Int8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  const char* detail = nullptr;  // as IsaKernels::detail
};

// Thread-local scratch owned by the driver: slot 0..3 for kernels, 4..5 for the driver itself, at least `floats` floats, 64-byte aligned.
// Valid until the same thread asks for the same slot again. Throws std::bad_alloc.
float* scratch(int slot, size_t floats);

// The kernel set emulator_gemm runs (chosen once, emulator.cc); the fused attention runs its products on it too.
const IsaKernels& active_kernels();

// One block of the fused many-row attention on AMX (emulator_attention_amx.cc): up to kAttentionAmxRows query rows
// of one head against all T keys, K^T and V in the tile pair form (16-column panels of (B[2i][n], B[2i + 1][n])
// lanes, zero padded to multiples of 32: K^T [round32(T) / 16][round32(D) / 2][16], V [round32(Dv) / 16]
// [round32(T) / 2][16]).
inline constexpr int64_t kAttentionAmxRows = 64;
struct AttentionBlockProblem {
  const float* q;  // the block's first query row
  int64_t ldq;
  const uint32_t* kt_pairs;
  const uint32_t* v_pairs;
  float* o;  // the block's first output row
  int64_t ldo;
  int64_t rows, T, D, Dv;  // rows <= kAttentionAmxRows, T >= 1
  float scale;
  const float* mask = nullptr;  // the block's first mask row (AttentionHead::mask), or null
  int64_t mask_stride_m = 0;
  bool zero_nan_rows = false;   // AttentionShape::zero_nan_rows
};
struct AttentionKernels {
  // B[k][n] = src[k * sk + n * sn] (k < K, n < N) rounded to bf16 (the contract's RNE) into the pair form, zero
  // padded to kp x np (multiples of 32).
  void (*pair_form)(const float* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t kp, int64_t np,
                    uint32_t* out);
  void (*block)(const AttentionBlockProblem& problem);
};
// The AMX attention kernels when the active kernel set is amx (the tile state granted) and the CPU has AVX512-BF16
// (the softmax's conversions), else null.
const AttentionKernels* attention_amx_kernels();

const IsaKernels& generic_kernels();
const Int8Kernels& generic_int8_kernels();
#if defined(XDNA_EMULATOR_X86)
const Int8Kernels& avx2_int8_kernels();
const Int8Kernels& vnni_int8_kernels();
const Int8Kernels& avxvnni_int8_kernels();
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
const IsaKernels& avx512bf16_kernels();
// AMX tiles (emulator_amx.cc): only after the tile state was granted to the process (emulator.cc).
const IsaKernels& amx_kernels();
const Int8Kernels& amx_int8_kernels();
const AttentionKernels& amx_attention_kernels_impl();
#endif

}  // namespace xdna::kernels::emu
