// The NPU GEMM protocol on top of a device shim (npu_device.h): manifest lookup, padding, buffer pools,
// dispatch, timeouts, and the mapping of every device error to a BackendFault with its step.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "../backend.h"
#include "manifest.h"
#include "npu_device.h"

namespace xdna::kernels::npu {

struct NpuBackendOptions {
  int max_contexts = 6;                            // Phoenix: 6 hardware contexts per device, all processes
  std::chrono::milliseconds timeout{10000};        // per run; a timeout disables the backend (device is suspect)
  bool cost_model = true;                          // leave GEMMs the NPU cannot win (M=1 GEMVs) to the CPU path
  static NpuBackendOptions from_config(const BackendConfig& cfg);  // XDNA_XRT_MAX_CONTEXTS, _TIMEOUT_MS, _COST_MODEL=0
};

// Takes ownership of an opened device. Kernels are loaded (one hardware context per distinct xclbin) on the
// first upload() of a weight of their shape.
std::unique_ptr<Backend> make_npu_backend(std::unique_ptr<NpuDevice> device, Manifest manifest,
                                          NpuBackendOptions options);

// How the rows of one call are cut into runs of the available kernel heights (each a multiple of kBlockM).
// Greedy from the largest height that fits; the last run may be padded up to the smallest height.
// Exposed for tests. Returns the heights in dispatch order.
std::vector<int64_t> plan_row_chunks(int64_t M, std::vector<int64_t> heights);

}  // namespace xdna::kernels::npu
