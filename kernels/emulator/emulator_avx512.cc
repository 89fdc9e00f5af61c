// AVX-512 (F/BW/VL/DQ) + FMA kernels in fp32 (compiled with the matching -m flags; selected at run time).
#include <immintrin.h>

#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#include "emulator_avx512_blocking.h"
#include "emulator_kernels.inc"
const IsaKernels kKernels = make_kernels("avx512");
}  // namespace
const IsaKernels& avx512_kernels() { return kKernels; }
}  // namespace xdna::kernels::emu
