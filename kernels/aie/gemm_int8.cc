// AIE-ML (AIE2) core kernels of the int8 (A8W8) GEMM (issue 13 item 3), beside gemm_bf16.cc, compiled with Peano:
//   clang++ --target=aie2-none-unknown-elf -O2 -std=c++20 -I<mlir-aie>/include -c gemm_int8.cc -o gemm_int8.o
// NOT BUILT OR RUN HERE (no toolchain, no NPU): checked on the host against kernels/aie/host_mock, where it must give
// the emulator's int8 results bit for bit (tests/test_xrt_aie_design.py).
//
// The contract's int8 section (kernels/gemm_contract.h): qa (per row of A) and qb (per column of B, quantised once
// at Compile) are int8 in [-127, 127]; sum_k qa qb is exact in int32 (K <= 133143), so any summation order gives
// the same bits; the epilogue is C = float(acc) * (sa_m * sb_n) in fp32, in that order, as emulator_gemm_int8.
// A's per-row scale needs the whole row's max before any value is quantised, so in this design the host quantises
// A (one pass: read fp32, write int8 + one scale per row; the dataflow model charges it); B arrives quantised.
//
// Per call, one 64x64x64 step of acc += qA . qB with aie::mmul<4, 8, 8> (int8 x int8 -> acc32: 256 MACs per
// instruction, twice the bf16 rate), then, after the last K step, the dequantising epilogue on the same tile.
// Layouts (memtile DMA re-layouts as for bf16, with the int8 shapes):
//   A: 64x64 int8 as 16x8 blocks of 4x8 (r x s), each block row-major, blocks row-major          (4 KiB)
//   B: 64x64 int8 as 8x8 blocks of 8x8 (s x t), each block row-major, blocks row-major            (4 KiB)
//   acc / C: 64x64 as 16x8 blocks of 4x8 (r x t), int32 accumulators / fp32 results, blocks row-major (16 KiB)
// L1: 2 x 4 KiB A + 2 x 4 KiB B + 16 KiB acc + 16 KiB C + 512 B of scales = 48.5 KiB.
#include <aie_api/aie.hpp>

namespace {

constexpr unsigned kM = 64, kK = 64, kN = 64;
constexpr unsigned kR = 4, kS = 8, kT = 8;  // aie::mmul shape for int8 on AIE-ML: 256 MACs per instruction
using Mmul = aie::mmul<kR, kS, kT, int8, int8, acc32>;

static_assert(kM % (2 * kR) == 0 && kN % (2 * kT) == 0 && kK % kS == 0, "2x2 expansion needs even block counts");

}  // namespace

extern "C" {

void zero_i32(int32* __restrict acc) {
  constexpr unsigned kLanes = 16;
  for (unsigned i = 0; i < kM * kN; i += kLanes) aie::store_v(acc + i, aie::zeros<int32, kLanes>());
}

// acc += qA . qB on the blocked layouts above, 2x2 C blocks at a time (each loaded block used twice).
void matmul_i8_i32(const int8* __restrict a, const int8* __restrict b, int32* __restrict acc) {
  constexpr unsigned kBlocksK = kK / kS, kBlocksN = kN / kT;
  event0();
  for (unsigned z = 0; z < kM / kR; z += 2) {
    for (unsigned j = 0; j < kBlocksN; j += 2) {
      int32* __restrict c00 = acc + (z * kBlocksN + j) * Mmul::size_C;
      int32* __restrict c01 = c00 + Mmul::size_C;
      int32* __restrict c10 = c00 + kBlocksN * Mmul::size_C;
      int32* __restrict c11 = c10 + Mmul::size_C;
      Mmul acc00(aie::load_v<Mmul::size_C>(c00));
      Mmul acc01(aie::load_v<Mmul::size_C>(c01));
      Mmul acc10(aie::load_v<Mmul::size_C>(c10));
      Mmul acc11(aie::load_v<Mmul::size_C>(c11));
      const int8* __restrict pa0 = a + z * kBlocksK * Mmul::size_A;
      const int8* __restrict pa1 = pa0 + kBlocksK * Mmul::size_A;
      const int8* __restrict pb0 = b + j * Mmul::size_B;
      const int8* __restrict pb1 = pb0 + Mmul::size_B;
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
      aie::store_v(c00, acc00.template to_vector<int32>());
      aie::store_v(c01, acc01.template to_vector<int32>());
      aie::store_v(c10, acc10.template to_vector<int32>());
      aie::store_v(c11, acc11.template to_vector<int32>());
    }
  }
  event1();
}

// The epilogue: c = float(acc) * (sa[m] * sb[n]) in fp32 for the tile's 64 rows (sa) and 64 columns (sb), on the
// blocked layout. int32 -> fp32 is exact below 2^24 and rounds to nearest even above, as the host's conversion.
void dequant_i32_f32(const int32* __restrict acc, const float* __restrict sa, const float* __restrict sb,
                     float* __restrict c) {
  constexpr unsigned kBlocksN = kN / kT;
  for (unsigned z = 0; z < kM / kR; ++z)
    for (unsigned j = 0; j < kBlocksN; ++j)
      for (unsigned r = 0; r < kR; ++r)
        for (unsigned t = 0; t < kT; ++t) {
          const unsigned i = (z * kBlocksN + j) * Mmul::size_C + r * kT + t;
          c[i] = static_cast<float>(acc[i]) * (sa[z * kR + r] * sb[j * kT + t]);
        }
}

}  // extern "C"
