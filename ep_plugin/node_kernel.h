// Running claimed nodes: one NodeKernel per node (its plan, run by its op's module through its Dispatcher), and
// one FusedKernel per fused node that runs its NodeKernels in order with the tensors between them.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels/packing.h"
#include "ops/op.h"
#include "ort_api.h"

namespace xdna::ep {

class NodeKernel {
 public:
  // `constant_b`: the plan's constant weight, packed at Compile (empty when B is given at run time).
  NodeKernel(ops::OpPlan plan, kernels::PackedWeights constant_b, std::shared_ptr<kernels::Backend> primary,
             std::shared_ptr<kernels::Backend> cpu_fallback, Log log, std::function<void(const std::string&)> report);

  void compute(ops::TensorIo& io) { module_.run(plan_, io, dispatch_); }
  // This node and `next` (which reads this node's output, and nothing else does) as one int8 chain
  // (ops/int8_chain.h); false: nothing run but, if any, this node's A prologue.
  bool compute_chained(NodeKernel& next, ops::TensorIo& io);
  Dispatcher& dispatcher() { return dispatch_; }
  const std::string& output_name() const { return plan_.output; }
  const ops::OpPlan& plan() const { return plan_; }
  std::vector<std::string> runtime_operands() const;  // names compute() reads through io.input()
  void log(OrtLoggingLevel level, const std::string& message) const { log_(level, message); }

 private:
  ops::OpPlan plan_;
  const ops::OpModule& module_;
  Log log_;
  Dispatcher dispatch_;
};

// One fused node: its claimed nodes in topological order. Tensors passed between them live for one Compute call and
// are freed after their last reader.
class FusedKernel {
 public:
  // `inputs`/`outputs`: the fused node's value names, in the order Compute receives and returns them.
  FusedKernel(std::vector<std::unique_ptr<NodeKernel>> nodes, std::vector<std::string> inputs,
              std::vector<std::string> outputs);
  void compute(const OrtApi& api, OrtKernelContext* ctx);

 private:
  std::vector<std::unique_ptr<NodeKernel>> nodes_;
  std::vector<std::string> inputs_, outputs_;
  std::vector<std::vector<std::string>> release_after_;  // per node: intermediates it is the last reader of
  std::vector<bool> chained_with_next_;  // per node: runs with the next node as one int8 chain (ops/int8_chain.h)
  // Per node: how many nodes from it on run on one quantised A (ops/int8_shared_a.h); 0 for none.
  std::vector<size_t> shared_a_count_;
  std::atomic<bool> shared_a_declined_logged_{false};
};

}  // namespace xdna::ep
