// AIE-ML (AIE2) core kernels of the bf16 GEMM design (gemm_design.py), compiled with Peano (llvm-aie):
//   clang++ --target=aie2-none-unknown-elf -O2 -std=c++20 -I<mlir-aie>/include -c gemm_bf16.cc -o gemm_bf16.o
//
// One 64x64x64 step of C += A . B per call, bf16 inputs, fp32 accumulation and fp32 output: no fp32 -> bf16
// conversion happens on the AIE, so its default round-toward-minus-infinity mode never touches a result (the
// host did the only rounding, fp32 -> bf16 RNE of the inputs, per kernels/gemm_contract.h).
//
// Layouts (made by the memtile DMAs, see gemm_design.py a_l1_dims/b_l1_dims):
//   A: 64x64 as 16x8 blocks of 4x8 (r x s), each block row-major, blocks row-major
//   B: 64x64 as 8x16 blocks of 8x4 (s x t), each block row-major, blocks row-major
//   C: 64x64 as 16x16 blocks of 4x4 (r x t), each block row-major, blocks row-major (un-blocked in the memtile)
#include <aie_api/aie.hpp>

#include "mmul_blocks.h"

namespace {

constexpr unsigned kM = 64, kK = 64, kN = 64;
constexpr unsigned kR = 4, kS = 8, kT = 4;  // aie::mmul shape for bf16 on AIE-ML: 128 MACs per instruction
using Mmul = aie::mmul<kR, kS, kT, bfloat16, bfloat16, accfloat>;

static_assert(kK % (2 * kS) == 0, "the f32 kernels take K in halves");

// An fp32 block rounded to bf16 by the core, in the rounding mode the caller set (round to nearest even).
template <unsigned kSize>
aie::vector<bfloat16, kSize> rounded_block(const float* p) {
  aie::accum<accfloat, kSize> t;
  t.from_vector(aie::load_v<kSize>(p));
  return t.template to_vector<bfloat16>();
}

// The contract's GELU (gemm_contract.h, "Epilogue": gelu_erf, the same rational and constants) on 16 lanes.
using V16 = aie::vector<float, 16>;
V16 fmul(const V16& a, const V16& b) { return aie::mul(a, b).template to_vector<float>(); }
V16 splat(float x) { return aie::broadcast<float, 16>(x); }
V16 gelu16(const V16& x) {
  const V16 z = aie::max(aie::min(fmul(x, splat(0.70710678118654752f)), splat(4.f)), splat(-4.f));
  const V16 t = fmul(z, z);
  V16 p = splat(1.92201082e-08f);
  for (float k : {-1.99060612e-06f, 1.55561997e-04f, 4.29371723e-03f, 5.24352492e-02f, 2.13957530e-01f,
                  1.12837868e+00f})
    p = aie::add(fmul(p, t), splat(k));
  V16 q = splat(1.09823e-03f);
  for (float k : {1.555229e-02f, 1.2080502e-01f, 5.2294257e-01f, 1.f}) q = aie::add(fmul(q, t), splat(k));
  const V16 erf = aie::div(fmul(z, p), q);
  return fmul(fmul(splat(0.5f), x), aie::add(splat(1.f), erf));
}

}  // namespace

extern "C" {

void zero_f32(float* __restrict c) {
  constexpr unsigned kLanes = 16;
  for (unsigned i = 0; i < kM * kN; i += kLanes) aie::store_v(c + i, aie::zeros<float, kLanes>());
}

// C += A . B on the blocked layouts above (bf16 A and B as they are in L1).
void matmul_bf16_f32(const bfloat16* __restrict a, const bfloat16* __restrict b, float* __restrict c) {
  event0();
  using xdna_aie::load_block;
  xdna_aie::mac_blocks_2x2<Mmul, kM / kR, kK / kS, kN / kT>(a, b, c, load_block<Mmul::size_A, bfloat16>,
                                                            load_block<Mmul::size_B, bfloat16>);
  event1();
}

// Issue 15, kernels of dtype f32_f32: A arrives as fp32 straight from ORT's buffer (no host pass) in 64x32 halves
// of a K-tile (8 KiB each, so L1 keeps 2 x 8 KiB A + 2 x 8 KiB B + 16 KiB C + a 4 KiB bf16 block set), blocked 4x8
// like the bf16 A. The core rounds it to bf16 itself, with round-to-nearest-even set explicitly: the AIE-ML's
// default conversion rounds toward minus infinity, which the contract (gemm_contract.h) does not allow.
// b points at the matching 32 rows of the 64x64 B tile (its first or second half: blocks are K-major).
void matmul_f32a_bf16_f32(const float* __restrict a, const bfloat16* __restrict b, float* __restrict c) {
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  xdna_aie::mac_blocks_2x2<Mmul, kM / kR, kK / 2 / kS, kN / kT>(a, b, c, rounded_block<Mmul::size_A>,
                                                                xdna_aie::load_block<Mmul::size_B, bfloat16>);
  event1();
}

// Issue 15 item 2 (designed, not wired into the backend): B read in place from a run-time fp32 tensor (a head's
// keys, transposed into these blocks by the memtile), so it is rounded here too, with the same mode as A.
// b is a 32x64 fp32 half of a B tile, blocked 8x4 (K-major blocks) like the bf16 B.
void matmul_f32a_f32b_f32(const float* __restrict a, const float* __restrict b, float* __restrict c) {
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  xdna_aie::mac_blocks_2x2<Mmul, kM / kR, kK / 2 / kS, kN / kT>(a, b, c, rounded_block<Mmul::size_A>,
                                                                rounded_block<Mmul::size_B>);
  event1();
}

// The GEMM epilogue (gemm_contract.h, "Epilogue", issues 7 and 13) on one finished 64x64 C tile in L1, before the
// memtile drains it, instead of a round trip through DDR and a CPU pass: C = act(C + bias[n]) + residual, fp32.
// bias: the tile's 64 column values; residual: a 64x64 tile in C's blocked layout (the memtile brings it in as it
// brings A). flags: bit 0 bias, bit 1 GELU, bit 2 residual. A 4x4 block of C is one 16-lane vector whose lane i is
// (row i / 4, column i % 4), so the bias repeats every 4 lanes.
// Not built here (no Peano on this machine) and not yet in gemm_design.py's program: tests/test_xrt_aie_design.py
// checks it on the host stand-in against the emulator's apply_epilogue arithmetic.
void epilogue_f32(float* __restrict c, const float* __restrict bias, const float* __restrict residual, int32_t flags) {
  constexpr unsigned kBlocks = kN / kT;  // 4x4 blocks per block row
  for (unsigned bn = 0; bn < kBlocks; ++bn) {
    V16 b = splat(0.f);
    if (flags & 1)
      for (unsigned i = 0; i < 16; ++i) b.set(bias[bn * kT + i % kT], i);
    for (unsigned bm = 0; bm < kM / kR; ++bm) {
      float* p = c + (bm * kBlocks + bn) * 16;
      V16 v = aie::load_v<16>(p);
      if (flags & 1) v = aie::add(v, b);
      if (flags & 2) v = gelu16(v);
      if (flags & 4) v = aie::add(v, aie::load_v<16>(residual + (bm * kBlocks + bn) * 16));
      aie::store_v(p, v);
    }
  }
}

}  // extern "C"
