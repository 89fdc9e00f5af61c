// The emulator: the GEMM contract (gemm_contract.h) executed on the CPU. It is the definition every other
// backend is tested against, and the CPU fallback of the EP.
#pragma once

#include <memory>

#include "../backend.h"

namespace xdna::kernels {

// C = bf16(A) . B for one call, multi-threaded over `threads` workers (0 = all cores).
void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads = 0);

// `count` independent products of one K x N shape with unpacked B (backend.h's UnpackedGemm), spread over the
// threads as one job: many small calls (the batch x heads of an attention MatMul) would otherwise each pay the
// pool's synchronisation.
void emulator_gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N, int threads = 0);

// Slow, obviously-correct scalar version of the contract (double-checked spec for tests).
void reference_gemm(const GemmArgs& args, const PackedB& b);

// The emulator as a Backend: the primary backend without an NPU, and every node's CPU fallback backend.
std::unique_ptr<Backend> make_emulator_backend(int threads);

// Name of the kernel set emulator_gemm runs on this CPU: "avx512bf16", "avx512", "avx2" or "generic" (chosen once, at first
// use, from the CPU's features; XDNA_EMULATOR_ISA=<name> forces a supported one, for tests).
const char* emulator_kernel_name();

}  // namespace xdna::kernels
