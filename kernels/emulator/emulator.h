// The emulator: the GEMM contract (gemm_contract.h) executed on the CPU. It is the definition every other
// backend is tested against, and the CPU fallback of the EP.
#pragma once

#include <memory>

#include "../backend.h"

namespace xdna::kernels {

// C = bf16(A) . B for one call, multi-threaded over `threads` workers (0 = all cores).
// Free function so the EP's CPU fallback can use it without any backend object.
void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads = 0);

// The same contract for a run-time B that was never packed: fp32 row-major B[k][n] = b[k * ldb + n], rounded to
// bf16 on the fly. Cheaper than pack_b + emulator_gemm when M is at most kUnpackedMaxM (B read M/4 times instead
// of packed once); used by the EP's CPU path for run-time operands such as decoder attention K/V.
inline constexpr int64_t kUnpackedMaxM = 16;
struct UnpackedGemm {
  GemmArgs args;   // A [M, K] and C [M, N]
  const float* b;  // B[k][n] = b[k * ldb + n], or b[n * ldb + k] when b_transposed
  int64_t ldb;
  bool b_transposed = false;
};
// `count` independent products of one K x N shape (e.g. the batch x heads of an attention MatMul), spread over
// the threads as one job: many small calls would otherwise each pay the pool's synchronisation.
void emulator_gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N, int threads = 0);

// Slow, obviously-correct scalar version of the contract (double-checked spec for tests).
void reference_gemm(const GemmArgs& args, const PackedB& b);

std::unique_ptr<Backend> make_emulator_backend(int threads);

// Name of the kernel set emulator_gemm runs on this CPU: "avx512bf16", "avx512", "avx2" or "generic" (chosen once, at first
// use, from the CPU's features; XDNA_EMULATOR_ISA=<name> forces a supported one, for tests).
const char* emulator_kernel_name();

}  // namespace xdna::kernels
