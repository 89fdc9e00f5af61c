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

#include "mmul_blocks.h"

namespace {

constexpr unsigned kM = 64, kK = 64, kN = 64;
constexpr unsigned kR = 4, kS = 8, kT = 8;  // aie::mmul shape for int8 on AIE-ML: 256 MACs per instruction
using Mmul = aie::mmul<kR, kS, kT, int8, int8, acc32>;

}  // namespace

extern "C" {

void zero_i32(int32* __restrict acc) {
  constexpr unsigned kLanes = 16;
  for (unsigned i = 0; i < kM * kN; i += kLanes) aie::store_v(acc + i, aie::zeros<int32, kLanes>());
}

// acc += qA . qB on the blocked layouts above.
void matmul_i8_i32(const int8* __restrict a, const int8* __restrict b, int32* __restrict acc) {
  event0();
  xdna_aie::mac_blocks_2x2<Mmul, kM / kR, kK / kS, kN / kT>(a, b, acc, xdna_aie::load_block<Mmul::size_A, int8>,
                                                            xdna_aie::load_block<Mmul::size_B, int8>);
  event1();
}

// The epilogue: c = float(acc) * (sa[m] * sb[n]) in fp32 for the tile's 64 rows (sa) and 64 columns (sb), on the
// blocked layout. int32 -> fp32 is exact below 2^24 and rounds to nearest even above, as the host's conversion.
// acc may be c itself (the design converts in place): each int32 is read before its fp32 is written.
void dequant_i32_f32(const int32* acc, const float* __restrict sa, const float* __restrict sb, float* c) {
  constexpr unsigned kBlocksN = kN / kT;
  for (unsigned z = 0; z < kM / kR; ++z)
    for (unsigned j = 0; j < kBlocksN; ++j)
      for (unsigned r = 0; r < kR; ++r)
        for (unsigned t = 0; t < kT; ++t) {
          const unsigned i = (z * kBlocksN + j) * Mmul::size_C + r * kT + t;
          int32 v;
          __builtin_memcpy(&v, acc + i, sizeof v);
          c[i] = static_cast<float>(v) * (sa[z * kR + r] * sb[j * kT + t]);
        }
}

// The entry points of the i8_f32 design (gemm_int8_design.py). Its L1 objects are a 64x64 int8 tile (blocked as
// above) followed by 64 fp32 scales (A: of the slab's rows; B: of the n-tile's columns), and the C tile doubles as
// the int32 accumulator until the epilogue converts it in place (acc and C have the same size; L1 stays at 33 KiB).
constexpr unsigned kTileBytes = kM * kK;

void zero_acc_i8(float* c) { zero_i32(reinterpret_cast<int32*>(c)); }

void matmul_obj_i8(const int8* __restrict a_obj, const int8* __restrict b_obj, float* __restrict c) {
  matmul_i8_i32(a_obj, b_obj, reinterpret_cast<int32*>(c));
}

// The last K step and the epilogue, in place.
void matmul_obj_i8_dequant(const int8* __restrict a_obj, const int8* __restrict b_obj, float* c) {
  int32* acc = reinterpret_cast<int32*>(c);
  matmul_i8_i32(a_obj, b_obj, acc);
  dequant_i32_f32(acc, reinterpret_cast<const float*>(a_obj + kTileBytes),
                  reinterpret_cast<const float*>(b_obj + kTileBytes), c);
}

}  // extern "C"
