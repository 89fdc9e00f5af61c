// Predicted time of one GEMM on the Phoenix NPU (xrt backend) versus the CPU, to keep GEMMs that cannot win
// (above all M=1 decoder GEMVs: ~40-160 us of dispatch for ~2 us of CPU work) off the NPU.
//
// NOT measured on silicon by this project. Defaults come from published figures (docs/npu.md, research notes):
//   dispatch ~40 us per pipelined run on Linux (xdna-driver PR #599: 24k no-op cmds/s), ~160 us unpipelined
//   (XRT PR #7878); bf16 GEMM on the 4x4 array ~50% of the 4.1 TFLOPS peak (mlir-aie #2735) -> 2000 GFLOPS;
//   NPU-reachable DDR bandwidth is unpublished for Phoenix (20 GB/s assumed). cpu_gflops is the machine's fp32
//   GEMM rate: pass a measured value when there is one.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../gemm_contract.h"

namespace xdna::kernels {

struct NpuCostParams {
  double first_dispatch_us = 160.0;  // first run of a call: nothing to overlap with
  double dispatch_us = 40.0;         // each further run of the same call (pipelined)
  double npu_gflops = 2000.0;        // bf16 x bf16 -> fp32 on 16 cores, sustained
  double npu_dma_gbps = 20.0;        // DDR <-> array
  double host_gbps = 10.0;           // host staging: fp32 A -> bf16, C copy-out (one core, memory bound)
  int64_t m_rows = kBlockM;          // rows per run (smallest kernel height in the manifest)
  double cpu_gflops = 100.0;         // CPU fp32 GEMM rate for the fallback
};

struct GemmCost {
  double npu_us, cpu_us;
  int64_t runs;
  bool npu_wins() const { return npu_us < cpu_us; }
};

inline GemmCost predict_gemm_cost(int64_t M, int64_t K, int64_t N, const NpuCostParams& p = {}) {
  const PaddedShape s = padded_shape(M, K, N);
  const int64_t m_rows = std::max<int64_t>(p.m_rows, kBlockM);
  const int64_t runs = std::max<int64_t>(1, round_up(s.Mpad, m_rows) / m_rows);
  const double Mpad = static_cast<double>(runs * m_rows), Kpad = static_cast<double>(s.Kpad),
               Npad = static_cast<double>(s.Npad);
  const double compute_us = 2.0 * Mpad * Kpad * Npad / (p.npu_gflops * 1e3);
  // Every 256-row block pass streams all of B again; A once; C once.
  const double dma_bytes = Mpad * Kpad * 2 + (Mpad / kBlockM) * Kpad * Npad * 2 + Mpad * Npad * 4;
  const double dma_us = dma_bytes / (p.npu_dma_gbps * 1e3);
  const double host_bytes = static_cast<double>(M) * static_cast<double>(K) * 4 + Mpad * Kpad * 2 +
                            Mpad * Npad * 4 + static_cast<double>(M) * static_cast<double>(N) * 4;
  const double host_us = host_bytes / (p.host_gbps * 1e3);
  const double npu_us =
      p.first_dispatch_us + p.dispatch_us * static_cast<double>(runs - 1) + std::max(compute_us, dma_us) + host_us;
  const double cpu_us = 2.0 * static_cast<double>(M) * static_cast<double>(K) * static_cast<double>(N) /
                        (p.cpu_gflops * 1e3);
  return {npu_us, cpu_us, runs};
}

}  // namespace xdna::kernels
