#include "ops/int8_chain.h"

#include <cstdlib>

#include "ep_plugin/dispatch.h"
#include "kernels/backend.h"

namespace xdna::ops {
namespace {

using Dims = std::vector<int64_t>;

// What a MatMul plan must be for either end of the chain: an int8 product of a constant 2-D weight, A read as it
// lies (int8_constant_product_miss), its output fp32.
std::string not_a_chain_end(const OpPlan& p) {
  if (std::string why = int8_constant_product_miss(p); !why.empty()) return why;
  if (p.output_bf16 || p.cache_past.present) return "writes a bfloat16 output or a cache";
  return "";
}

}  // namespace

bool int8_chain_enabled() {
  const char* v = std::getenv("XDNA_INT8_CHAIN");
  return !(v && std::string(v) == "off");
}

std::string int8_chain_miss(const OpPlan& first, const OpPlan& second) {
  if (second.a.name != first.output || !second.layernorm_output.empty()) return "does not read the output as its A";
  if (std::string why = not_a_chain_end(first); !why.empty()) return "the first product " + why;
  if (std::string why = not_a_chain_end(second); !why.empty()) return "the second product " + why;
  return "";
}

bool run_int8_chain(const OpPlan& first, ep::Dispatcher& first_dispatch, const OpPlan& second,
                    ep::Dispatcher& second_dispatch, TensorIo& io) {
  if (!first_dispatch.weight_batch_shape().empty() || !second_dispatch.weight_batch_shape().empty()) return false;
  // A, or its prologue's input X (the same rows): few rows (decoder steps) decline before anything is computed.
  const Tensor x = io.input(first.a.name);
  if (x.dims.size() < 2) return false;
  int64_t M = 1;
  for (size_t d = 0; d + 1 < x.dims.size(); ++d) M *= x.dims[d];
  if (M < kernels::kInt8ChainMinRows) return false;
  const Tensor a = first.layernorm_output.empty() ? x : layernorm_prologue(first, io);
  const auto &s1 = first_dispatch.weight_shape(0), &s2 = second_dispatch.weight_shape(0);
  if (!a.data || a.dims != x.dims || a.dims.back() != s1.K || s2.K != s1.N) return false;
  Dims mid_dims(a.dims.begin(), a.dims.end() - 1), out_dims = mid_dims;
  mid_dims.push_back(s1.N);
  out_dims.push_back(s2.N);
  // Each node's epilogue as run_matmul builds it (matmul_epilogue); one it cannot run (run_matmul says why) or a
  // residual that broadcasts (added after the products) declines.
  kernels::GemmEpilogue e[2];
  const OpPlan* plans[2] = {&first, &second};
  const int64_t n_of[2] = {s1.N, s2.N};
  const Dims* dims_of[2] = {&mid_dims, &out_dims};
  for (int i = 0; i < 2; ++i) {
    Tensor broadcast_residual;
    if (!matmul_epilogue(*plans[i], io, n_of[i], *dims_of[i], &e[i], &broadcast_residual).empty() ||
        broadcast_residual.data)
      return false;
  }
  if (s2.N == 0) return false;  // nothing to chain: run_matmul handles empty outputs
  float* y = io.output(second.output, out_dims);
  kernels::GemmArgs args1{a.data, M, s1.K, nullptr, 0, e[0]}, args2{nullptr, M, 0, y, s2.N, e[1]};
  if (!first_dispatch.gemm_int8_chain(args1, second_dispatch, args2)) return false;
  first_dispatch.note_work(1, M, s1.K, s1.N, false, false, false);
  second_dispatch.note_work(1, M, s2.K, s2.N, false, false, false);
  return true;
}

}  // namespace xdna::ops
