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

namespace {

constexpr unsigned kM = 64, kK = 64, kN = 64;
constexpr unsigned kR = 4, kS = 8, kT = 4;  // aie::mmul shape for bf16 on AIE-ML: 128 MACs per instruction
using Mmul = aie::mmul<kR, kS, kT, bfloat16, bfloat16, accfloat>;

static_assert(kM % (2 * kR) == 0 && kN % (2 * kT) == 0 && kK % kS == 0, "2x2 expansion needs even block counts");

}  // namespace

extern "C" {

void zero_f32(float* __restrict c) {
  constexpr unsigned kLanes = 16;
  for (unsigned i = 0; i < kM * kN; i += kLanes) aie::store_v(c + i, aie::zeros<float, kLanes>());
}

// C += A . B on the blocked layouts above. Works on a 2x2 group of C blocks at a time so each loaded A block is
// used twice and each B block twice (4 accumulators in registers, as the AIE-ML has 8+ accumulator registers).
void matmul_bf16_f32(const bfloat16* __restrict a, const bfloat16* __restrict b, float* __restrict c) {
  constexpr unsigned kBlocksK = kK / kS, kBlocksN = kN / kT;
  event0();
  for (unsigned z = 0; z < kM / kR; z += 2) {
    for (unsigned j = 0; j < kBlocksN; j += 2) {
        float* __restrict c00 = c + (z * kBlocksN + j) * Mmul::size_C;
        float* __restrict c01 = c00 + Mmul::size_C;
        float* __restrict c10 = c00 + kBlocksN * Mmul::size_C;
        float* __restrict c11 = c10 + Mmul::size_C;
        Mmul acc00(aie::load_v<Mmul::size_C>(c00));
        Mmul acc01(aie::load_v<Mmul::size_C>(c01));
        Mmul acc10(aie::load_v<Mmul::size_C>(c10));
        Mmul acc11(aie::load_v<Mmul::size_C>(c11));

        const bfloat16* __restrict pa0 = a + z * kBlocksK * Mmul::size_A;
        const bfloat16* __restrict pa1 = pa0 + kBlocksK * Mmul::size_A;
        const bfloat16* __restrict pb0 = b + j * Mmul::size_B;
        const bfloat16* __restrict pb1 = pb0 + Mmul::size_B;
        for (unsigned i = 0; i < kBlocksK; ++i) {
            const auto a0 = aie::load_v<Mmul::size_A>(pa0);
            const auto a1 = aie::load_v<Mmul::size_A>(pa1);
            const auto b0 = aie::load_v<Mmul::size_B>(pb0);
            const auto b1 = aie::load_v<Mmul::size_B>(pb1);
            pa0 += Mmul::size_A;
            pa1 += Mmul::size_A;
            pb0 += kBlocksN * Mmul::size_B;
            pb1 += kBlocksN * Mmul::size_B;
            acc00.mac(a0, b0);
            acc01.mac(a0, b1);
            acc10.mac(a1, b0);
            acc11.mac(a1, b1);
          }

        aie::store_v(c00, acc00.template to_vector<float>());
        aie::store_v(c01, acc01.template to_vector<float>());
        aie::store_v(c10, acc10.template to_vector<float>());
        aie::store_v(c11, acc11.template to_vector<float>());
      }
  }
  event1();
}

// Issue 15, kernels of dtype f32_f32: A arrives as fp32 straight from ORT's buffer (no host pass) in 64x32 halves
// of a K-tile (8 KiB each, so L1 keeps 2 x 8 KiB A + 2 x 8 KiB B + 16 KiB C + a 4 KiB bf16 block set), blocked 4x8
// like the bf16 A. The core rounds it to bf16 itself, with round-to-nearest-even set explicitly: the AIE-ML's
// default conversion rounds toward minus infinity, which the contract (gemm_contract.h) does not allow.
// b points at the matching 32 rows of the 64x64 B tile (its first or second half: blocks are K-major).
void matmul_f32a_bf16_f32(const float* __restrict a, const bfloat16* __restrict b, float* __restrict c) {
  constexpr unsigned kHalfK = kK / 2, kBlocksK = kHalfK / kS, kBlocksN = kN / kT;
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  for (unsigned z = 0; z < kM / kR; z += 2) {
    for (unsigned j = 0; j < kBlocksN; j += 2) {
      float* __restrict c00 = c + (z * kBlocksN + j) * Mmul::size_C;
      float* __restrict c01 = c00 + Mmul::size_C;
      float* __restrict c10 = c00 + kBlocksN * Mmul::size_C;
      float* __restrict c11 = c10 + Mmul::size_C;
      Mmul acc00(aie::load_v<Mmul::size_C>(c00));
      Mmul acc01(aie::load_v<Mmul::size_C>(c01));
      Mmul acc10(aie::load_v<Mmul::size_C>(c10));
      Mmul acc11(aie::load_v<Mmul::size_C>(c11));
      const float* __restrict pa0 = a + z * kBlocksK * Mmul::size_A;
      const float* __restrict pa1 = pa0 + kBlocksK * Mmul::size_A;
      const bfloat16* __restrict pb0 = b + j * Mmul::size_B;
      const bfloat16* __restrict pb1 = pb0 + Mmul::size_B;
      for (unsigned i = 0; i < kBlocksK; ++i) {
        aie::accum<accfloat, Mmul::size_A> t0, t1;
        t0.from_vector(aie::load_v<Mmul::size_A>(pa0));
        t1.from_vector(aie::load_v<Mmul::size_A>(pa1));
        const auto a0 = t0.template to_vector<bfloat16>();  // rounded per the mode set above
        const auto a1 = t1.template to_vector<bfloat16>();
        const auto b0 = aie::load_v<Mmul::size_B>(pb0);
        const auto b1 = aie::load_v<Mmul::size_B>(pb1);
        pa0 += Mmul::size_A;
        pa1 += Mmul::size_A;
        pb0 += kBlocksN * Mmul::size_B;
        pb1 += kBlocksN * Mmul::size_B;
        acc00.mac(a0, b0);
        acc01.mac(a0, b1);
        acc10.mac(a1, b0);
        acc11.mac(a1, b1);
      }
      aie::store_v(c00, acc00.template to_vector<float>());
      aie::store_v(c01, acc01.template to_vector<float>());
      aie::store_v(c10, acc10.template to_vector<float>());
      aie::store_v(c11, acc11.template to_vector<float>());
    }
  }
  event1();
}

// Issue 15 item 2 (designed, not wired into the backend): B read in place from a run-time fp32 tensor (a head's
// keys, transposed into these blocks by the memtile), so it is rounded here too, with the same mode as A.
// b is a 32x64 fp32 half of a B tile, blocked 8x4 (K-major blocks) like the bf16 B.
void matmul_f32a_f32b_f32(const float* __restrict a, const float* __restrict b, float* __restrict c) {
  constexpr unsigned kHalfK = kK / 2, kBlocksK = kHalfK / kS, kBlocksN = kN / kT;
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  for (unsigned z = 0; z < kM / kR; z += 2) {
    for (unsigned j = 0; j < kBlocksN; j += 2) {
      float* __restrict c00 = c + (z * kBlocksN + j) * Mmul::size_C;
      float* __restrict c01 = c00 + Mmul::size_C;
      float* __restrict c10 = c00 + kBlocksN * Mmul::size_C;
      float* __restrict c11 = c10 + Mmul::size_C;
      Mmul acc00(aie::load_v<Mmul::size_C>(c00));
      Mmul acc01(aie::load_v<Mmul::size_C>(c01));
      Mmul acc10(aie::load_v<Mmul::size_C>(c10));
      Mmul acc11(aie::load_v<Mmul::size_C>(c11));
      const float* __restrict pa0 = a + z * kBlocksK * Mmul::size_A;
      const float* __restrict pa1 = pa0 + kBlocksK * Mmul::size_A;
      const float* __restrict pb0 = b + j * Mmul::size_B;
      const float* __restrict pb1 = pb0 + Mmul::size_B;
      for (unsigned i = 0; i < kBlocksK; ++i) {
        aie::accum<accfloat, Mmul::size_A> ta0, ta1;
        aie::accum<accfloat, Mmul::size_B> tb0, tb1;
        ta0.from_vector(aie::load_v<Mmul::size_A>(pa0));
        ta1.from_vector(aie::load_v<Mmul::size_A>(pa1));
        tb0.from_vector(aie::load_v<Mmul::size_B>(pb0));
        tb1.from_vector(aie::load_v<Mmul::size_B>(pb1));
        const auto a0 = ta0.template to_vector<bfloat16>();
        const auto a1 = ta1.template to_vector<bfloat16>();
        const auto b0 = tb0.template to_vector<bfloat16>();
        const auto b1 = tb1.template to_vector<bfloat16>();
        pa0 += Mmul::size_A;
        pa1 += Mmul::size_A;
        pb0 += kBlocksN * Mmul::size_B;
        pb1 += kBlocksN * Mmul::size_B;
        acc00.mac(a0, b0);
        acc01.mac(a0, b1);
        acc10.mac(a1, b0);
        acc11.mac(a1, b1);
      }
      aie::store_v(c00, acc00.template to_vector<float>());
      aie::store_v(c01, acc01.template to_vector<float>());
      aie::store_v(c10, acc10.template to_vector<float>());
      aie::store_v(c11, acc11.template to_vector<float>());
    }
  }
  event1();
}

}  // extern "C"
