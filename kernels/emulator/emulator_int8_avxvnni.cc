// int8 kernels on AVX-VNNI (the 256-bit VEX VPDPBUSD: Alder Lake and later Intel cores without AVX-512);
// compiled with the matching -m flags and selected at run time only where the CPU has them (emulator.cc).
#include <immintrin.h>

#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 8
#define EMU_INT8_ISA 3
#include "emulator_int8.inc"
const Int8Kernels kInt8Kernels = make_int8_kernels("avxvnni");
}  // namespace
const Int8Kernels& avxvnni_int8_kernels() { return kInt8Kernels; }
}  // namespace xdna::kernels::emu
