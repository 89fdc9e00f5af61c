// AVX2 + FMA kernels (compiled with -mavx2 -mfma; selected at run time only where the CPU has both).
#include <immintrin.h>

#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 8
#define EMU_MR 6
#define EMU_NV 2
#define EMU_KC 256
#define EMU_MC 192
#define EMU_DR 2
#define EMU_DIRECT_MAX_M 4
#define EMU_DNV 2
#include "emulator_kernels.inc"
const IsaKernels kKernels = make_kernels("avx2");
#define EMU_INT8_ISA 1
#include "emulator_int8.inc"
const Int8Kernels kInt8Kernels = make_int8_kernels("avx2");
}  // namespace
const IsaKernels& avx2_kernels() { return kKernels; }
const Int8Kernels& avx2_int8_kernels() { return kInt8Kernels; }
}  // namespace xdna::kernels::emu
