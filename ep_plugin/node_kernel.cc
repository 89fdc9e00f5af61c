#include "node_kernel.h"

#include <algorithm>
#include <climits>
#include <memory>
#include <unordered_map>

#include "kernels/ep_buffers.h"
#include "ops/int8_chain.h"
#include "ops/int8_shared_a.h"

namespace xdna::ep {
namespace {

using Dims = std::vector<int64_t>;

// A tensor ORT holds: an input of the fused node.
ops::Tensor ort_input(const OrtApi& api, OrtKernelContext* ctx, size_t index) {
  const OrtValue* v = nullptr;
  check(api, api.KernelContext_GetInput(ctx, index, &v));
  if (!v) throw OrtError(ORT_EP_FAIL, "missing runtime input " + std::to_string(index));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api.GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  ops::Tensor t;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtStatus* st = api.GetTensorElementType(info, &type);
  if (!st) st = api.GetDimensionsCount(info, &rank);
  if (!st) {
    t.dims.resize(rank);
    st = api.GetDimensions(info, t.dims.data(), rank);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  check(api, st);
  const void* p = nullptr;
  check(api, api.GetTensorData(v, &p));
  // The claims take float32 operands, and bfloat16 only where a Cast to float is fused (ops/attention.cc).
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) t.bf16 = static_cast<const uint16_t*>(p);
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) t.data = static_cast<const float*>(p);
  else throw OrtError(ORT_EP_FAIL, "runtime input " + std::to_string(index) + " is neither float32 nor bfloat16");
  return t;
}

// ORT's buffer for an output of the fused node (its element type is the graph's: float32, or bfloat16 where a
// MatMul took its trailing Cast).
void* ort_output(const OrtApi& api, OrtKernelContext* ctx, size_t index, const Dims& dims) {
  OrtValue* v = nullptr;
  check(api, api.KernelContext_GetOutput(ctx, index, dims.data(), dims.size(), &v));
  void* p = nullptr;
  check(api, api.GetTensorMutableData(v, &p));
  return p;
}

}  // namespace

NodeKernel::NodeKernel(ops::OpPlan plan, kernels::PackedWeights constant_b,
                       std::shared_ptr<kernels::Backend> primary, std::shared_ptr<kernels::Backend> cpu_fallback,
                       Log log, std::function<void(const std::string&)> report)
    : plan_(std::move(plan)),
      module_(ops::module_of(plan_.op)),
      log_(log),
      dispatch_(plan_.node_name, plan_.precision, std::move(constant_b), std::move(primary), std::move(cpu_fallback), log,
                std::move(report)) {}

bool NodeKernel::compute_chained(NodeKernel& next, ops::TensorIo& io) {
  return ops::run_int8_chain(plan_, dispatch_, next.plan_, next.dispatch_, io);
}

std::vector<std::string> NodeKernel::runtime_operands() const {
  std::vector<std::string> names{plan_.a.name};
  if (!plan_.b.constant) names.push_back(plan_.b.name);
  if (plan_.c.present && !plan_.c.constant) names.push_back(plan_.c.name);
  if (plan_.v.present && !plan_.v.constant) names.push_back(plan_.v.name);
  // Read at run time too: an intermediate of the group must live until these readers have run (a residual made by
  // an earlier product's epilogue whose other reader, a LayerNormalization prologue, is in the group as well).
  if (plan_.residual.present && !plan_.residual.constant) names.push_back(plan_.residual.name);
  if (plan_.attention_mask.present) names.push_back(plan_.attention_mask.name);
  if (plan_.cache_past.present) names.push_back(plan_.cache_past.name);
  return names;
}

FusedKernel::FusedKernel(std::vector<std::unique_ptr<NodeKernel>> nodes, std::vector<std::string> inputs,
                         std::vector<std::string> outputs)
    : nodes_(std::move(nodes)), inputs_(std::move(inputs)), outputs_(std::move(outputs)) {
  std::unordered_map<std::string, size_t> last_reader;
  for (size_t i = 0; i < nodes_.size(); ++i)
    for (const std::string& name : nodes_[i]->runtime_operands()) last_reader[name] = i;
  release_after_.resize(nodes_.size());
  for (const auto& node : nodes_) {
    const std::string& out = node->output_name();
    const auto it = last_reader.find(out);
    const bool fused_output = std::find(outputs_.begin(), outputs_.end(), out) != outputs_.end();
    if (it != last_reader.end() && !fused_output) release_after_[it->second].push_back(out);
  }
  // The int8 chains: node i's output read by node i + 1 alone, as its A, and not an output of the fused node.
  std::unordered_map<std::string, size_t> readers;
  for (const auto& node : nodes_)
    for (const std::string& name : node->runtime_operands()) ++readers[name];
  chained_with_next_.assign(nodes_.size(), false);
  const bool enabled = ops::int8_chain_enabled();
  for (size_t i = 0; i + 1 < nodes_.size(); ++i) {
    const ops::OpPlan &first = nodes_[i]->plan(), &second = nodes_[i + 1]->plan();
    const std::string& out = first.output;
    if (second.a.name != out || first.op != ops::OpPlan::Op::kMatMul || second.op != ops::OpPlan::Op::kMatMul ||
        first.precision != kernels::Precision::kInt8)
      continue;  // not a pair of int8 products where one reads the other's output
    std::string why = ops::int8_chain_miss(first, second);
    if (why.empty() && (readers[out] != 1 || std::find(outputs_.begin(), outputs_.end(), out) != outputs_.end()))
      why = "its output '" + out + "' has other readers";
    if (why.empty() && !enabled) why = "XDNA_INT8_CHAIN=off";
    if (why.empty()) chained_with_next_[i] = true;
    else  // a near miss: said once, when the fused node is made
      nodes_[i]->log(ORT_LOGGING_LEVEL_INFO, "node '" + first.node_name + "' and node '" + second.node_name +
                                                 "': not run as one int8 chain (" + why + ")");
  }
  // The int8 sets of one A (ops/int8_shared_a.h): consecutive nodes, none of them an end of a chain, that read the
  // same A, each as a set allows.
  shared_a_count_.assign(nodes_.size(), 0);
  const bool shared_enabled = ops::int8_shared_a_enabled();
  auto in_chain = [&](size_t i) { return chained_with_next_[i] || (i > 0 && chained_with_next_[i - 1]); };
  auto can_share = [&](size_t i) { return !in_chain(i) && ops::int8_shared_a_miss(nodes_[i]->plan()).empty(); };
  for (size_t i = 0; i < nodes_.size();) {
    size_t j = i + 1;
    if (can_share(i))
      while (j < nodes_.size() && can_share(j) && ops::same_shared_a(nodes_[i]->plan(), nodes_[j]->plan())) ++j;
    if (j - i >= 2) {
      std::string names;
      for (size_t k = i; k < j; ++k) names += (names.empty() ? "'" : ", '") + nodes_[k]->plan().node_name + "'";
      if (shared_enabled) shared_a_count_[i] = j - i;
      nodes_[i]->log(ORT_LOGGING_LEVEL_INFO, "nodes " + names + " (int8, A '" + nodes_[i]->plan().a.name + "'): " +
                                                 (shared_enabled ? "run on one quantised A"
                                                                 : "not run on one quantised A (XDNA_INT8_SHARED_A=off)"));
    }
    i = j;
  }
}

void FusedKernel::compute(const OrtApi& api, OrtKernelContext* ctx) {
  // Tensors of this call: fused-node inputs as ORT gives them, fused-node outputs in ORT's buffers, and the
  // intermediates only the group reads in the EP's own memory (kernels/ep_buffers.h: the NPU reads and writes them
  // without per-call pinning; freed blocks are pooled for the next call).
  class Io final : public ops::TensorIo {
   public:
    Io(const OrtApi& api, OrtKernelContext* ctx, const FusedKernel& k) : api_(api), ctx_(ctx), k_(k) {}
    ops::Tensor input(const std::string& name) override {
      if (const auto it = made_.find(name); it != made_.end()) return it->second;
      for (size_t i = 0; i < k_.inputs_.size(); ++i)
        if (k_.inputs_[i] == name) return made_[name] = ort_input(api_, ctx_, i);
      throw OrtError(ORT_EP_FAIL, "fused node: value '" + name + "' is neither an input nor made by the group");
    }
    float* output(const std::string& name, const Dims& dims) override {
      float* data = static_cast<float*>(place(name, dims, sizeof(float)));
      made_[name] = ops::Tensor{data, dims};
      return data;
    }
    uint16_t* output_bf16(const std::string& name, const Dims& dims) override {
      uint16_t* data = static_cast<uint16_t*>(place(name, dims, sizeof(uint16_t)));
      made_[name] = ops::Tensor{nullptr, dims, data};
      return data;
    }
    ep::DeferredProducts* deferred() override { return &later_; }
    bool made(const std::string& name) override { return made_.count(name) != 0; }
    DeferredProducts later_;
    void release(const std::string& name) {
      made_.erase(name);
      owned_.erase(name);
    }

   private:
    // Where output `name` goes: ORT's buffer for a fused-node output, else an intermediate in the EP's memory.
    void* place(const std::string& name, const Dims& dims, size_t element_size) {
      const auto out = std::find(k_.outputs_.begin(), k_.outputs_.end(), name);
      if (out != k_.outputs_.end()) return ort_output(api_, ctx_, static_cast<size_t>(out - k_.outputs_.begin()), dims);
      const size_t bytes = static_cast<size_t>(checked_count(dims)) * element_size;
      owned_.erase(name);
      void* data = kernels::ep_buffer_alloc(bytes);
      if (!data) throw OrtError(ORT_EP_FAIL, "out of memory for an intermediate tensor of " + std::to_string(bytes) + " bytes");
      owned_.emplace(name, EpMemoryPtr(static_cast<float*>(data)));
      return data;
    }
    static int64_t checked_count(const Dims& dims) {
      int64_t n = 1;
      for (int64_t d : dims)
        if (d < 0 || __builtin_mul_overflow(n, d, &n) || n > (INT64_MAX >> 3))
          throw OrtError(ORT_EP_FAIL, "intermediate tensor too large");
      return n;
    }
    const OrtApi& api_;
    OrtKernelContext* ctx_;
    const FusedKernel& k_;
    std::unordered_map<std::string, ops::Tensor> made_;
    struct FreeEp {
      void operator()(float* p) const noexcept { kernels::ep_buffer_free(p); }
    };
    using EpMemoryPtr = std::unique_ptr<float, FreeEp>;
    std::unordered_map<std::string, EpMemoryPtr> owned_;
  } io(api, ctx, *this);
  // Device products of consecutive nodes are collected and submitted together (a runlist per hardware context:
  // q/k/v projections of a layer), flushed before a node reads a collected product's output, before an intermediate
  // a collected product may use is freed, and at the end.
  std::vector<std::string> pending;  // outputs of nodes with collected products
  auto before_node = [&](size_t i) {
    if (!io.later_.empty())
      for (const std::string& name : nodes_[i]->runtime_operands())
        if (std::find(pending.begin(), pending.end(), name) != pending.end()) {
          io.later_.flush();
          pending.clear();
          break;
        }
  };
  auto after_node = [&](size_t i) {
    if (!io.later_.empty() && !release_after_[i].empty()) {
      io.later_.flush();
      pending.clear();
    }
    for (const std::string& name : release_after_[i]) io.release(name);
  };
  for (size_t i = 0; i < nodes_.size(); ++i) {
    before_node(i);
    if (shared_a_count_[i] >= 2) {
      const size_t n = shared_a_count_[i];
      std::vector<const ops::OpPlan*> plans;
      std::vector<Dispatcher*> dispatchers;
      for (size_t k = i; k < i + n; ++k) {
        if (k > i) before_node(k);
        plans.push_back(&nodes_[k]->plan());
        dispatchers.push_back(&nodes_[k]->dispatcher());
      }
      std::string why;
      if (ops::run_int8_shared_a(plans, dispatchers, io, &why)) {  // runs nothing on the device's runlists
        for (size_t k = i; k < i + n; ++k) after_node(k);
        i += n - 1;
        continue;
      }
      if (!shared_a_declined_logged_.exchange(true))  // said once per fused node: each node then runs on its own
        nodes_[i]->log(ORT_LOGGING_LEVEL_INFO, "node '" + plans[0]->node_name + "' and the " +
                                                   std::to_string(n - 1) + " after it: not run on one quantised A (" +
                                                   why + "); each on its own");
    }
    if (chained_with_next_[i]) {
      before_node(i + 1);
      if (nodes_[i]->compute_chained(*nodes_[i + 1], io)) {  // runs nothing on the device's runlists
        after_node(i);
        after_node(++i);
        continue;
      }
    }
    const size_t before = io.later_.size();
    nodes_[i]->compute(io);
    if (io.later_.size() != before) pending.push_back(nodes_[i]->output_name());
    after_node(i);
  }
  io.later_.flush();
}

}  // namespace xdna::ep
