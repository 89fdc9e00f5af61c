// Gemm: Y = alpha * A' . B' + beta * C, with transA/transB, C absent, constant or at run time (unidirectional
// broadcast to [M, N]). ORT turns MatMul+Add with a 2-D constant weight into Reshape -> Gemm -> Reshape.
#include <algorithm>

#include "ep_plugin/dispatch.h"
#include "kernels/packing.h"
#include "ops/op.h"

namespace xdna::ops {
namespace {

Claim claim_gemm(const OrtApi& api, const OrtNode* node, const GraphIndex&) {
  Claim r;
  OpPlan& p = r.plan;
  p.op = OpPlan::Op::kGemm;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() < 2 || !io.inputs[0] || !io.inputs[1]) return reject("Gemm without A and B");
  if (auto why = read_float_operands(api, io, &p); !why.empty()) return reject(why);
  if (p.a.rank != 2 || p.b.rank != 2) return reject("Gemm operands are not 2-D");
  // A Gemm attribute of the wrong type makes the model invalid: an error, not a node left to the CPU.
  int64_t trans_a = 0, trans_b = 0;
  for (auto [name, out] : {std::pair{"transA", &trans_a}, {"transB", &trans_b}})
    if (!int_attr(api, node, name, out)) throw std::runtime_error(std::string("unreadable Gemm attribute ") + name);
  for (auto [name, out] : {std::pair{"alpha", &p.alpha}, {"beta", &p.beta}})
    if (!float_attr(api, node, name, out)) throw std::runtime_error(std::string("unreadable Gemm attribute ") + name);
  p.trans_a = trans_a != 0;
  p.trans_b = trans_b != 0;
  if (io.inputs.size() >= 3 && io.inputs[2]) {
    ONNXTensorElementDataType tc;
    p.c = describe(api, io.inputs[2], &tc);
    if (tc != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return reject(std::string("C is ") + dtype_name(tc));
    if (p.c.rank > 2) return reject("C has rank > 2");
  }
  bool sym = false;
  const auto& a = p.a.dims;
  const auto& b = p.b.dims;
  const double M = product_lower_bound(a, p.trans_a ? 1 : 0, p.trans_a ? 2 : 1, &sym);
  const double K = product_lower_bound(a, p.trans_a ? 0 : 1, p.trans_a ? 1 : 2, &sym);
  const double N = product_lower_bound(b, p.trans_b ? 0 : 1, p.trans_b ? 1 : 2, &sym);
  p.mflop = 2.0 * M * K * N / 1e6;
  p.mflop_lower_bound = sym;
  if (p.b.constant) {
    p.weight_shape = p.b.dims;
    p.weight_transposed = p.trans_b;
    if (auto why = kernels::packing_size_problem(p.weight_shape, p.trans_b); !why.empty()) return reject(why);
  }
  r.ok = true;
  r.reason = p.b.constant ? "constant weight" : "both operands at run time";
  return r;
}

void run_gemm(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch) {
  const Tensor a = io.input(plan.a.name);
  const int64_t M = plan.trans_a ? a.dims[1] : a.dims[0];
  const int64_t K = plan.trans_a ? a.dims[0] : a.dims[1];
  Tensor b;
  int64_t N;
  if (plan.b.constant) {
    const auto& s = dispatch.weight_shape(0);
    if (s.K != K)
      throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Gemm inner dimensions differ");
    N = s.N;
  } else {
    b = io.input(plan.b.name);
    const int64_t Kb = plan.trans_b ? b.dims[1] : b.dims[0];
    N = plan.trans_b ? b.dims[0] : b.dims[1];
    if (Kb != K) throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Gemm inner dims differ");
  }
  float* y = io.output(plan.output, {M, N});
  if (M == 0 || N == 0) return;

  std::vector<float> a_t;  // transA: the kernel wants row-major [M, K]
  const float* a_rows = a.data;
  if (plan.trans_a) {
    a_t.resize(static_cast<size_t>(M * K));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) a_t[m * K + k] = a.data[k * M + m];
    a_rows = a_t.data();
  }
  const kernels::GemmArgs args{a_rows, M, K, y, N};
  dispatch.note_work(1, M, K, N, !plan.b.constant, plan.trans_a, false);
  if (K == 0) std::fill(y, y + M * N, 0.f);
  else if (plan.b.constant) dispatch.gemm(args, 0);
  else if (!plan.trans_b) dispatch.gemm_runtime({{args, ep::RuntimeB{b.data, N, 1}}}, K, N);
  else dispatch.gemm_runtime({{args, ep::RuntimeB{b.data, 1, K}}}, K, N);
  if (plan.alpha != 1.f)
    for (int64_t i = 0; i < M * N; ++i) y[i] *= plan.alpha;

  // beta * C, C unidirectionally broadcast to [M, N].
  if (!plan.c.present || plan.beta == 0.f) return;
  const float* c;
  std::vector<int64_t> c_dims;
  if (plan.c.constant) {
    c = plan.c_value.data();
    c_dims = plan.c.dims;
  } else {
    Tensor ct = io.input(plan.c.name);
    c = ct.data;
    c_dims = ct.dims;
  }
  const int64_t cm = c_dims.size() == 2 ? c_dims[0] : 1;
  const int64_t cn = c_dims.empty() ? 1 : c_dims.back();
  if ((cm != 1 && cm != M) || (cn != 1 && cn != N))
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Gemm C does not broadcast to [M, N]");
  for (int64_t m = 0; m < M; ++m) {
    const float* crow = c + (cm == 1 ? 0 : m * cn);
    float* yrow = y + m * N;
    if (cn == 1)
      for (int64_t n = 0; n < N; ++n) yrow[n] += plan.beta * crow[0];
    else
      for (int64_t n = 0; n < N; ++n) yrow[n] += plan.beta * crow[n];
  }
}

}  // namespace

extern const OpModule kGemmModule{"", "Gemm", 1, OpPlan::Op::kGemm, claim_gemm, run_gemm};

}  // namespace xdna::ops
