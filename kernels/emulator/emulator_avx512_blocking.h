// The blocking of emulator_kernels.inc for 16-lane AVX-512 fp32 code, shared by the avx512 set and the amx set
// (whose direct, unpacked and fallback bf16 paths are that same AVX-512 code). Include right before
// emulator_kernels.inc; the macros are its parameters (documented there).
#pragma once
#define EMU_W 16
#define EMU_MR 6
#define EMU_NV 4
#define EMU_KC 128
#define EMU_MC 192
#define EMU_DR 12
#define EMU_DIRECT_MAX_M 16
#define EMU_DNV 2
