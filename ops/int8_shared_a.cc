#include "ops/int8_shared_a.h"

#include <cstdlib>

#include "ep_plugin/dispatch.h"
#include "kernels/backend.h"

namespace xdna::ops {

bool int8_shared_a_enabled() {
  const char* v = std::getenv("XDNA_INT8_SHARED_A");
  return !(v && std::string(v) == "off");
}

std::string int8_shared_a_miss(const OpPlan& p) {
  if (std::string why = int8_constant_product_miss(p); !why.empty()) return why;
  if (p.cache_past.present) return "appends to a cache";
  if (p.residual.present) return "adds a residual";
  return "";
}

bool same_shared_a(const OpPlan& first, const OpPlan& second) {
  return first.a.name == second.a.name && first.layernorm_output == second.layernorm_output;
}

bool run_int8_shared_a(const std::vector<const OpPlan*>& plans, const std::vector<ep::Dispatcher*>& dispatchers,
                       TensorIo& io, std::string* why) {
  using Dims = std::vector<int64_t>;
  if (plans.size() < 2 || plans.size() != dispatchers.size()) return *why = "fewer than two products", false;
  const OpPlan& first = *plans[0];
  // A, or its prologue's input X (the same rows): few rows (decoder steps) decline before anything is computed.
  const Tensor x = io.input(first.a.name);
  if (!x.data || x.dims.size() < 2) return *why = "A is not a float32 matrix", false;
  int64_t M = 1;
  for (size_t d = 0; d + 1 < x.dims.size(); ++d) M *= x.dims[d];
  if (M < kernels::kInt8ChainMinRows)
    return *why = "few rows (" + std::to_string(M) + "): each product is bound by reading its weight", false;
  const int64_t K = x.dims.back();
  // Each product's output shape and epilogue (as run_matmul has them: matmul_epilogue); the outputs themselves are
  // placed only once the set is sure to run.
  std::vector<kernels::SharedAProduct> products(plans.size());
  std::vector<Dims> out_dims(plans.size(), Dims(x.dims.begin(), x.dims.end() - 1));
  for (size_t i = 0; i < plans.size(); ++i) {
    const OpPlan& p = *plans[i];
    const ep::Dispatcher& d = *dispatchers[i];
    if (!d.weight_batch_shape().empty() || d.weight_shape(0).K != K)
      return *why = "node '" + p.node_name + "' has another inner dimension", false;  // run_matmul says so
    const int64_t N = d.weight_shape(0).N;
    out_dims[i].push_back(N);
    Tensor broadcast_residual;  // (int8_shared_a_miss: no residual)
    if (std::string w = matmul_epilogue(p, io, N, out_dims[i], &products[i].epilogue, &broadcast_residual);
        !w.empty() || broadcast_residual.data)
      return *why = "node '" + p.node_name + "': " + (w.empty() ? "a residual that broadcasts" : w), false;
    if (p.head_split_heads > 0)
      if (std::string w = head_split_miss(p, out_dims[i]); !w.empty())
        return *why = "node '" + p.node_name + "': " + w, false;
  }
  if (!ep::Dispatcher::int8_shared_a_ready(dispatchers, M)) return *why = "the backend runs them one by one", false;
  const Tensor a = first.layernorm_output.empty() ? x : layernorm_prologue(first, io);
  if (!a.data || a.dims != x.dims) return *why = "A prologue of another shape", false;
  for (size_t i = 0; i < plans.size(); ++i) {
    const OpPlan& p = *plans[i];
    const int64_t N = dispatchers[i]->weight_shape(0).N;
    kernels::SharedAProduct& pr = products[i];
    if (p.head_split_heads > 0) {
      const HeadSplitOutputs out = head_split_outputs(p, io, out_dims[i]);
      pr.heads_bf16 = out.split;
      pr.heads = p.head_split_heads, pr.depth = p.head_split_depth, pr.rows_per_batch = out_dims[i][1];
      if (out.frames) pr.c_bf16 = out.frames, pr.ldc_bf16 = N;
    } else if (p.output_bf16) {
      pr.c_bf16 = io.output_bf16(p.output, out_dims[i]), pr.ldc_bf16 = N;
    } else {
      pr.c = io.output(p.output, out_dims[i]), pr.ldc = N;
    }
  }
  if (!ep::Dispatcher::gemm_int8_shared_a(dispatchers, a.data, M, K, products))
    return *why = "the backend runs them one by one", false;
  for (size_t i = 0; i < plans.size(); ++i)
    dispatchers[i]->note_work(1, M, K, dispatchers[i]->weight_shape(0).N, false, false, false);
  return true;
}

}  // namespace xdna::ops
