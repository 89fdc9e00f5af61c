// AVX-512 kernels whose large-M path multiplies with VDPBF16PS (AVX512-BF16: Cooper Lake, Zen 4 and later);
// compiled with the matching -m flags and selected at run time only where the CPU has them.
#include <immintrin.h>

#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 16
#define EMU_MR 6
#define EMU_NV 4
#define EMU_KC 256
#define EMU_MC 192
#define EMU_DR 12
#define EMU_DIRECT_MAX_M 16
#define EMU_DNV 2
#define EMU_BF16_DOT 1
#include "emulator_kernels.inc"
const IsaKernels kKernels = make_kernels("avx512bf16");
}  // namespace
const IsaKernels& avx512bf16_kernels() { return kKernels; }
}  // namespace xdna::kernels::emu
