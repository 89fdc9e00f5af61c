// The Phoenix NPU dataflow model (issue 15): predicted time of one claimed node on the NPU, split into dispatch,
// host work, DMA and compute, against the CPU; used by `xdna partition --npu-model` and by the xrt backend's
// NPU-or-CPU decision. A MODEL, NOT A MEASUREMENT: nobody has run these kernels on silicon. Every parameter is
// listed in npu_model_assumptions() with its source (docs/npu.md repeats the list).
//
// Two dataflows are modelled:
//   * v1, the design before issue 15 (kept for the before/after table): host converts A to bf16 into a staging
//     buffer and copies C out, 256-row runs (one command each), B re-streamed per 256-row block, run-time B
//     (attention) packed on the host and dispatched head by head.
//   * v2, the redesign: A and C are ORT's own buffers imported as user-pointer BOs (read/written in place, fp32
//     A converted to bf16 in the core with round-to-nearest-even), one command per call sized for the real M,
//     B (or the A slab) resident in the memtiles when it fits, run-time B read through the shim DMA's strides
//     (no packing), all heads of a batched product in one command, and attention fused (QK^T, softmax, PV on
//     the array: the scores never reach DDR).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../gemm_contract.h"

namespace xdna::kernels {

struct NpuModelParams {
  // AIE array (npu1: 4 usable columns x 4 AIE-ML cores)
  double aie_ghz = 1.0;             // clock the xclbins are built for
  double cores = 16;
  double bf16_macs = 128;           // per core per cycle, aie::mmul<4,8,4> bf16
  double int8_macs = 256;           // per core per cycle, aie::mmul<4,8,8> int8 (kernels/aie/gemm_int8.cc)
  double gemm_efficiency = 0.5;     // sustained share of peak, whole-array bf16 GEMM
  double softmax_cycles_per_elem = 0.5;  // per core: exp (LUT), max, sum, scale, bf16 pack of one score
  double memtile_kib = 512;         // per column
  double memtile_budget_kib = 256;  // what a resident operand may take (the rest: A/C streaming buffers)
  // Dispatch
  double submit_us = 160;           // one submission, submit to completion seen by the host (no work)
  double chain_us = 42;             // each further command of the same submission / pipeline
  // Memory
  double ddr_gbps = 20;             // NPU <-> DDR, all shim DMA channels together
  double host_gbps = 10;            // one host core converting / copying operands
  double sync_gbps = 40;            // cache maintenance (clflush) of a BO range before/after a run
  double pin_gbps = 40;             // pinning the pages of an imported (user-pointer) buffer
  double import_us = 10;            // fixed cost of one import (BO + sub-BO ioctls)
  // CPU (the alternative): 8 Zen 4 cores of a Phoenix laptop running the same bf16 contract
  double cpu_gflops = 400;
  double cpu_gbps = 40;             // DRAM bandwidth a GEMV sees
  double cpu_call_us = 5;           // fixed cost of one CPU-path GEMM call
  double cpu_int8_gflops = 800;     // the same CPU on the int8 contract (VNNI: twice the bf16 rate)
  int64_t max_rows = 4096;          // v2: the tallest kernel built (rows of A per command)
  int64_t v1_rows = kBlockM;        // v1: rows per run
};

struct ModelAssumption {
  std::string name, value, source;
};

std::vector<ModelAssumption> npu_model_assumptions(const NpuModelParams& p = {});

// What one node does per run, as the EP executes it (from the partition report).
struct NodeWork {
  int64_t batches = 1;  // independent products (attention heads); 1 for a plain GEMM
  int64_t M = 0, K = 0, N = 0;
  bool runtime_b = false;  // B is an activation (attention), not a packed constant weight
  bool a_gather = false;   // A has no unit stride along K (fused Transpose moving K, Gemm transA): host gather
  bool conv = false;       // 1-D Conv: host im2col builds A, host transposes C into [Cout, T]
  // int8 (A8W8, gemm_contract.h; constant B only): B int8 (half the bytes), 256 MACs per core per cycle, A quantised
  // per row by the host (a row's scale needs its max first), the dequantising epilogue in the core.
  bool int8 = false;
  // A / C in the EP's own memory (kernels/ep_buffers.h: ORT placed them there, or an intermediate of a fused group):
  // imported once per block, so no per-call pinning; the cache maintenance stays. As the EP's run reports them.
  bool a_ep_memory = false, c_ep_memory = false;
  // The node's commands ride in an earlier node's runlist (consecutive products of one fused node on one hardware
  // context, issue 15 step 4): no submission of its own, chain_us per command.
  bool chained = false;
  // ... and its A is the same tensor as an earlier product of that runlist (q/k/v read one input): the backend
  // imports and syncs it once per list, so this node pays no pinning, sync or import for A.
  bool a_shared = false;
};

struct NodeCost {
  double dispatch_us = 0, host_us = 0, dma_us = 0, compute_us = 0;
  double npu_us = 0;  // dispatch + host + max(dma, compute)
  double cpu_us = 0;
  int64_t commands = 0;
  bool npu = false;       // where it would run: NPU iff predicted faster (and the design can take the shape)
  std::string dataflow;   // one line: how it runs, and why any host copy remains
};

NodeCost model_node_v2(const NodeWork& w, const NpuModelParams& p = {});
NodeCost model_node_v1(const NodeWork& w, const NpuModelParams& p = {});
// Fused attention: `heads` x softmax(Q K^T) V with Q [Tq, d], K, V [Tk, d] per head, one command. Replaces the
// two MatMul nodes around a Softmax.
NodeCost model_attention_v2(int64_t heads, int64_t Tq, int64_t Tk, int64_t d, const NpuModelParams& p = {},
                            bool io_ep_memory = false);
// CPU time of the same product (bf16 contract on the CPU); also the node's cost when it stays on the CPU.
double model_cpu_us(const NodeWork& w, const NpuModelParams& p = {});

}  // namespace xdna::kernels
