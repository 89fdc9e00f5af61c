// int8 kernels on AVX512-VNNI (VPDPBUSD: Cascade Lake, Ice Lake, Zen 4 and later); compiled with the matching -m
// flags and selected at run time only where the CPU has them (emulator.cc).
#include <immintrin.h>

#include "emulator_isa.h"

namespace xdna::kernels::emu {
namespace {
#define EMU_W 16
#define EMU_INT8_ISA 2
#include "emulator_int8.inc"
const Int8Kernels kInt8Kernels = make_int8_kernels("vnni");
}  // namespace
const Int8Kernels& vnni_int8_kernels() { return kInt8Kernels; }
}  // namespace xdna::kernels::emu
