// Running one claimed node: shapes and broadcasting at run time, the backend call, and the CPU fallback.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "graph_passes/op_registry.h"
#include "kernels/backend.h"
#include "kernels/emulator/emulator.h"
#include "ort_api.h"

namespace xdna::ep {

class NodeKernel {
 public:
  // `runtime_inputs`: the fused node's input names, in the order Compute receives them.
  // `report` (may be empty) receives one JSON line of run-time statistics when the kernel is destroyed.
  NodeKernel(graph::GemmPlan plan, std::vector<std::string> runtime_inputs,
             std::shared_ptr<kernels::Backend> backend, int threads, Log log,
             std::function<void(const std::string&)> report);
  ~NodeKernel();

  void compute(const OrtApi& api, OrtKernelContext* ctx);
  const std::string& name() const { return plan_.node_name; }

 private:
  struct Weight {
    std::shared_ptr<const kernels::PackedB> host;
    std::shared_ptr<kernels::DeviceWeight> device;  // null: this weight runs on the CPU path
  };

  int runtime_index(const std::string& name) const;
  void compute_matmul(const OrtApi& api, OrtKernelContext* ctx);
  void compute_gemm(const OrtApi& api, OrtKernelContext* ctx);
  void compute_conv(const OrtApi& api, OrtKernelContext* ctx);
  // One GEMM through the backend, or on the CPU (emulator arithmetic) with a logged reason.
  void run(const kernels::GemmArgs& args, const Weight& w);
  // B given at run time, B[k][n] = b[k * stride_k + n * stride_n]: few rows unpacked on the CPU path (when one
  // stride is 1), else packed and run().
  void run_runtime_b(const kernels::GemmArgs& args, const float* b, int64_t K, int64_t N, int64_t stride_k,
                     int64_t stride_n);
  void run_unpacked(const kernels::UnpackedGemm* calls, size_t count, int64_t K, int64_t N);
  // Independent products of one node (batched MatMul: heads) through the backend together (one submission on
  // the NPU), or each on the CPU path.
  void run_batch(const std::vector<std::pair<kernels::GemmArgs, Weight>>& items);
  Weight make_weight(std::shared_ptr<const kernels::PackedB> packed, bool upload);
  void fall_back(const std::string& why);
  void note_cpu_path(int64_t K, int64_t N, const std::string& why);  // logged once per node
  // The products one run computes, for the partition report (`xdna partition --npu-model` models them).
  void note_work(int64_t batches, int64_t M, int64_t K, int64_t N, bool runtime_b, bool a_gather, bool conv);

  graph::GemmPlan plan_;
  std::vector<std::string> runtime_inputs_;
  std::shared_ptr<kernels::Backend> backend_;
  int threads_;
  Log log_;
  std::vector<Weight> weights_;  // constant B, one per batch matrix
  std::atomic<bool> device_ok_{true};
  std::function<void(const std::string&)> report_;
  std::atomic<uint64_t> device_calls_{0}, cpu_calls_{0};
  std::atomic<uint64_t> device_flop_{0}, cpu_flop_{0};  // executed, so symbolic dims are real here
  std::once_flag cpu_path_logged_;
  std::mutex work_mu_;
  std::string work_;  // JSON array [batches, M, K, N, runtime_b, a_gather, conv] of the last run
};

}  // namespace xdna::ep
