// Dispatch and fallback: where each product of a node runs. A node has a precision (its plan's: bf16, int8 or
// bf16x3), a primary backend (the one its session chose: xrt or the emulator) and a CPU fallback backend (the
// emulator: the same contract, in every precision, on the CPU). A product runs on the CPU for one of three
// reasons, each counted and logged once per node on its own:
//   * not for the device: the primary backend does not take this shape (xrt: no kernel built for it, or its cost
//     model says the CPU is faster, e.g. M=1 GEMVs) or declines the node's precision (xrt: no int8 kernel);
//   * unpacked on purpose: a run-time B with few rows against it (decoder attention) is computed straight from B
//     as it lies, since packing it or a device dispatch would cost more than the product;
//   * a fault: the primary backend failed (upload, run, timeout, wrong result); this node uses the CPU from then on.
#pragma once

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "ort_api.h"

namespace xdna::ep {

// A B given at run time: B[k][n] = b[k * stride_k + n * stride_n], or b_bf16[...] (b then null) for a bfloat16 B
// read through a fused Cast (ops/transpose_fusion.h): the values the contract's rounding of an fp32 B gives.
struct RuntimeB {
  const float* b;
  int64_t stride_k, stride_n;
  const uint16_t* b_bf16 = nullptr;
};

class Dispatcher;

// Device products collected across the nodes of one fused node (issue 15 step 4): consecutive products whose weights
// share a hardware context go to the device as one runlist (Backend::gemm_batch). One per Compute call, on its
// thread; the fused node flushes before anything reads or frees a collected product's operands.
class DeferredProducts {
 public:
  bool empty() const { return items_.empty(); }
  size_t size() const { return items_.size(); }
  // Runs every collected product (a device fault: those products again on the CPU, logged by their nodes).
  void flush();

 private:
  friend class Dispatcher;
  struct Item {
    Dispatcher* node;
    kernels::GemmArgs args;
    size_t weight;
  };
  std::vector<Item> items_;
};

class Dispatcher {
 public:
  enum class CpuReason { kNotForDevice, kUnpacked, kFault };

  // `constant_b`: the node's constant B, packed at Compile in `precision` (may be empty). `report` (may be empty)
  // receives one JSON line of run-time statistics when the dispatcher is destroyed.
  Dispatcher(std::string node_name, kernels::Precision precision, kernels::PackedWeights constant_b,
             std::shared_ptr<kernels::Backend> primary, std::shared_ptr<kernels::Backend> cpu, Log log,
             std::function<void(const std::string&)> report);
  ~Dispatcher();

  // The constant B: batch dims and each matrix's K and N.
  const std::vector<int64_t>& weight_batch_shape() const { return batch_shape_; }
  const kernels::PaddedShape& weight_shape(size_t i) const { return weights_.at(i).host->shape; }

  // C = A . constant B matrix `weight`.
  void gemm(const kernels::GemmArgs& args, size_t weight);
  // The same, left in `later` (when not null and the product is for the device) for its fused node to submit with
  // the next ones; the caller guarantees A and C stay untouched until later.flush().
  void gemm_later(const kernels::GemmArgs& args, size_t weight, DeferredProducts* later);
  // Independent products against constant B matrices (the heads of an attention MatMul): one submission to the
  // device when it takes them all.
  void gemm_batch(const std::vector<std::pair<kernels::GemmArgs, size_t>>& items);
  // Independent products of one K x N shape whose B is given at run time: few rows unpacked on the CPU, the
  // others packed per call and sent like constant ones.
  void gemm_runtime(const std::vector<std::pair<kernels::GemmArgs, RuntimeB>>& items, int64_t K, int64_t N);
  // Fused attention, `count` heads of one shape (kernels/attention_contract.h): on the primary backend when it
  // has a fused attention for the shape, else on the CPU (not for the device, or after a fault), logged once.
  void attention(const kernels::AttentionShape& shape, const std::vector<kernels::AttentionHead>& heads);
  // This node's product (`first`: A, M, epilogue) chained with node `next`'s (`second`: C, epilogue) through
  // Backend::gemm_int8_chain: both int8 with one constant weight each, on the primary backend when it takes both and
  // chains them. False: nothing run (the caller runs each node as usual, which says why a product is where it is).
  bool gemm_int8_chain(const kernels::GemmArgs& first, Dispatcher& next, const kernels::GemmArgs& second);
  // One SharedAProduct (kernels/backend.h: c, c_bf16 or heads_bf16 and the epilogue; the weight is filled in) per
  // node of `nodes`, each int8 with one constant weight of the same K, all of A [M, K] (row stride lda): A
  // quantised once, through Backend::gemm_int8_shared_a, on the primary backend when every node's weight is there
  // and it takes them all. False: nothing run (the caller runs each node as usual, which says why a product is
  // where it is).
  static bool gemm_int8_shared_a(const std::vector<Dispatcher*>& nodes, const float* a, int64_t M, int64_t lda,
                                 std::vector<kernels::SharedAProduct>& products);
  // Whether gemm_int8_shared_a would take these nodes' products of M rows (asked before their outputs are placed).
  static bool int8_shared_a_ready(const std::vector<Dispatcher*>& nodes, int64_t M);
  // The products one run computes, for the partition report (`xdna partition --npu-model` models them).
  void note_work(int64_t batches, int64_t M, int64_t K, int64_t N, bool runtime_b, bool a_gather, bool conv);
  // A fused attention's work: heads x softmax([Tq, d] . [d, Tk]) . [Tk, d], reported as "attention".
  void note_attention(int64_t heads, int64_t Tq, int64_t Tk, int64_t d);

 private:
  struct Weight {
    std::shared_ptr<const kernels::PackedB> host;
    std::shared_ptr<kernels::DeviceWeight> device;  // null: the primary backend does not hold it
    std::shared_ptr<kernels::DeviceWeight> cpu;     // the fallback's copy (no upload: the host data itself)
  };
  Weight make_weight(std::shared_ptr<const kernels::PackedB> packed);
  // Whether this node's product of M rows can be one of the int8 multi-product calls on `primary` (gemm_int8_chain,
  // gemm_int8_shared_a): one constant int8 weight, held by `primary` as this node's primary backend, which has not
  // faulted and runs the shape in int8.
  bool int8_product_on(const kernels::Backend* primary, int64_t M) const;
  void run(const kernels::GemmArgs& args, const Weight& w);
  void run_batch(const std::vector<std::pair<kernels::GemmArgs, const Weight*>>& items);
  void on_cpu(CpuReason reason, uint64_t calls, uint64_t flop, const std::string& detail);
  friend class DeferredProducts;
  void fault(const kernels::BackendFault& f);
  // Counts whether A and C of a product lie in the EP's own memory (kernels/ep_buffers.h), for the report.
  void note_buffers(const kernels::GemmArgs& args, int64_t K, int64_t N);

  std::string node_;
  kernels::Precision precision_;
  std::shared_ptr<kernels::Backend> primary_, cpu_;
  Log log_;
  std::function<void(const std::string&)> report_;
  std::vector<int64_t> batch_shape_;
  std::vector<Weight> weights_;  // constant B, one per batch matrix
  std::atomic<bool> primary_ok_{true};
  std::atomic<uint64_t> device_calls_{0}, device_flop_{0};  // executed, so symbolic dims are real here
  std::array<std::atomic<uint64_t>, 3> cpu_calls_{}, cpu_flop_{};
  std::array<std::once_flag, 3> logged_;
  std::atomic<uint64_t> products_{0}, a_in_ep_{0}, c_in_ep_{0};  // last run's products; A / C in EP memory
  std::atomic<uint64_t> chained_{0};  // device products that rode in an earlier product's runlist (same weight shape)
  std::atomic<uint64_t> int8_chain_calls_{0};  // products run as one end of an int8 chain (gemm_int8_chain)
  std::atomic<uint64_t> int8_shared_a_calls_{0};  // products run with others on one quantised A (gemm_int8_shared_a)
  std::atomic<uint64_t> a_shared_{0};  // ... and read the same A as an earlier product of that list (one import)
  std::mutex work_mu_;
  std::string work_;  // JSON array [batches, M, K, N, runtime_b, a_gather, conv] of the last run
  std::string attention_work_;  // JSON array [heads, Tq, Tk, d] of the last run (fused attention only)
};

}  // namespace xdna::ep
