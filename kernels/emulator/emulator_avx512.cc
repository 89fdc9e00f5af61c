// AVX-512 (F/BW/VL/DQ) + FMA kernels in fp32 (compiled with the matching -m flags; selected at run time).
#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 16
#define EMU_MR 6
#define EMU_NV 4
#define EMU_KC 128
#define EMU_MC 192
#define EMU_DR 12
#define EMU_DIRECT_MAX_M 16
#define EMU_DNV 2
#include "emulator_kernels.inc"
const IsaKernels kKernels = make_kernels("avx512");
}  // namespace
const IsaKernels& avx512_kernels() { return kKernels; }
}  // namespace xdna::kernels::emu
