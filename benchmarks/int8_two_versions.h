// Two versions of the avx2 int8 kernels (emulator_int8.inc, EMU_INT8_ISA 1) in one binary, for the A/B benchmarks
// (int8_kernels_ab.cc, int8_step_gemv.cc): xdna::kernels::emu::orig::k() from OLD_INC, neu::k() from NEW_INC
// (default: the working tree's emulator_int8.inc). The .inc's own macros are cleared between the two inclusions.
#pragma once
#include "emulator/emulator_isa.h"
#ifndef NEW_INC
#define NEW_INC "emulator_int8.inc"
#endif
namespace xdna::kernels::emu {
namespace orig {
namespace {
#define EMU_W 8
#define EMU_INT8_ISA 1
#include OLD_INC
}
Int8Kernels k() { return make_int8_kernels("orig"); }
}
#undef EMU_INT8_ISA
#undef EMU_INT8_NV
#undef EMU_INT8_MR
#undef EMU_INT8_FEW_ROWS
#undef EMU_INT8_CHUNK_KB
#undef EMU_EPILOGUE_INC
#undef EMU_ROUNDED
#undef EMU_EPILOGUE_ROUNDED
namespace neu {
namespace {
#define EMU_INT8_ISA 1
#include NEW_INC
}
Int8Kernels k() { return make_int8_kernels("new"); }
}
}
