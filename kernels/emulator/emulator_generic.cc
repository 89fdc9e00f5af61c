// Portable kernels: whatever the baseline target flags give (SSE2 on x86-64, NEON on arm64).
#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 4
#define EMU_MR 4
#define EMU_NV 2
#define EMU_KC 256
#define EMU_MC 128
#define EMU_DR 2
#define EMU_DIRECT_MAX_M 2
#define EMU_DNV 2
#include "emulator_kernels.inc"
const IsaKernels kKernels = make_kernels("generic");
#define EMU_INT8_ISA 0
#include "emulator_int8.inc"
const Int8Kernels kInt8Kernels = make_int8_kernels("generic");
}  // namespace
const IsaKernels& generic_kernels() { return kKernels; }
const Int8Kernels& generic_int8_kernels() { return kInt8Kernels; }
}  // namespace xdna::kernels::emu
