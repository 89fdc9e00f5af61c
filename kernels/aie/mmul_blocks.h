// The inner loop shared by the AIE-ML GEMM core kernels (gemm_bf16.cc, gemm_int8.cc): C += A . B for one
// kM x kK x kN step on the blocked layouts the memtile DMAs make (A: r x s blocks, B: s x t blocks, C: r x t
// blocks; each block row-major, blocks row-major). It works on a 2x2 group of C blocks at a time, so each loaded A
// block and each loaded B block is used twice (4 accumulators in registers: the AIE-ML has 8+ accumulator
// registers). The kernels differ only in what A and B hold in L1 and how a block becomes an mmul operand, which
// `load_a` / `load_b` say (e.g. a plain load, or an fp32 block rounded to bf16 by the core).
#pragma once

#include <aie_api/aie.hpp>

namespace xdna_aie {

// An mmul operand block as it is in L1.
template <unsigned kSize, typename T>
aie::vector<T, kSize> load_block(const T* p) {
  return aie::load_v<kSize>(p);
}

// C (of CT: float for bf16 products, int32 for int8) += A . B for kBlocksM x kBlocksN blocks of C over kBlocksK
// blocks of K. A block of K advances A by Mmul::size_A elements, B by a row of B blocks.
template <typename Mmul, unsigned kBlocksM, unsigned kBlocksK, unsigned kBlocksN, typename CT, typename TA,
          typename TB, typename LoadA, typename LoadB>
inline void mac_blocks_2x2(const TA* __restrict a, const TB* __restrict b, CT* __restrict c, LoadA load_a,
                           LoadB load_b) {
  static_assert(kBlocksM % 2 == 0 && kBlocksN % 2 == 0, "2x2 expansion needs even block counts");
  for (unsigned z = 0; z < kBlocksM; z += 2) {
    for (unsigned j = 0; j < kBlocksN; j += 2) {
      CT* __restrict c00 = c + (z * kBlocksN + j) * Mmul::size_C;
      CT* __restrict c01 = c00 + Mmul::size_C;
      CT* __restrict c10 = c00 + kBlocksN * Mmul::size_C;
      CT* __restrict c11 = c10 + Mmul::size_C;
      Mmul acc00(aie::load_v<Mmul::size_C>(c00));
      Mmul acc01(aie::load_v<Mmul::size_C>(c01));
      Mmul acc10(aie::load_v<Mmul::size_C>(c10));
      Mmul acc11(aie::load_v<Mmul::size_C>(c11));
      const TA* __restrict pa0 = a + z * kBlocksK * Mmul::size_A;
      const TA* __restrict pa1 = pa0 + kBlocksK * Mmul::size_A;
      const TB* __restrict pb0 = b + j * Mmul::size_B;
      const TB* __restrict pb1 = pb0 + Mmul::size_B;
      for (unsigned i = 0; i < kBlocksK; ++i) {
        const auto a0 = load_a(pa0);
        const auto a1 = load_a(pa1);
        const auto b0 = load_b(pb0);
        const auto b1 = load_b(pb1);
        pa0 += Mmul::size_A;
        pa1 += Mmul::size_A;
        pb0 += kBlocksN * Mmul::size_B;
        pb1 += kBlocksN * Mmul::size_B;
        acc00.mac(a0, b0);
        acc01.mac(a0, b1);
        acc10.mac(a1, b0);
        acc11.mac(a1, b1);
      }
      aie::store_v(c00, acc00.template to_vector<CT>());
      aie::store_v(c01, acc01.template to_vector<CT>());
      aie::store_v(c10, acc10.template to_vector<CT>());
      aie::store_v(c11, acc11.template to_vector<CT>());
    }
  }
}

}  // namespace xdna_aie
