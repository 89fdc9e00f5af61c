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

}  // extern "C"
