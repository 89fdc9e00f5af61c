// MatMul: constant or run-time B, any rank, ONNX (numpy) broadcasting of batch dims, 1-D operands, and operands
// read through a fused Transpose (ops/transpose_fusion.h).
#include <algorithm>

#include "ep_plugin/dispatch.h"
#include "kernels/packing.h"
#include "ops/op.h"
#include "ops/transpose_fusion.h"

namespace xdna::ops {
namespace {

using Dims = std::vector<int64_t>;

Claim claim_matmul(const OrtApi& api, const OrtNode* node, const GraphIndex& index) {
  Claim r;
  OpPlan& p = r.plan;
  p.op = OpPlan::Op::kMatMul;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return reject("MatMul without two inputs");
  if (auto why = read_float_operands(api, io, &p); !why.empty()) return reject(why);
  const auto& a = p.a.dims;
  const auto& b = p.b.dims;
  const int64_t Ka = a.back(), Kb = p.b.rank == 1 ? b[0] : b[b.size() - 2];
  if (Ka >= 0 && Kb >= 0 && Ka != Kb) return reject("inner dimensions differ");
  bool sym = false;
  const double M = p.a.rank == 1 ? 1 : product_lower_bound(a, a.size() - 2, a.size() - 1, &sym);
  const double K = product_lower_bound(a, a.size() - 1, a.size(), &sym);
  const double N = p.b.rank == 1 ? 1 : product_lower_bound(b, b.size() - 1, b.size(), &sym);
  const double batch_a = product_lower_bound(a, 0, a.size() >= 2 ? a.size() - 2 : 0, &sym);
  const double batch_b = product_lower_bound(b, 0, b.size() >= 2 ? b.size() - 2 : 0, &sym);
  p.mflop = 2.0 * M * K * N * std::max(batch_a, batch_b) / 1e6;
  p.mflop_lower_bound = sym;
  if (p.b.constant) {
    p.weight_shape = p.b.dims;
    if (auto why = kernels::packing_size_problem(p.weight_shape, false); !why.empty()) return reject(why);
  }
  read_through_transpose(api, index, &p.a, &r);
  read_through_transpose(api, index, &p.b, &r);
  r.ok = true;
  r.reason = p.b.constant ? "constant weight" : "both operands at run time";
  if (!r.fused_producers.empty()) r.reason += ", with the Transpose of its input(s)";
  return r;
}

int64_t count(const Dims& d) {
  int64_t n = 1;
  for (int64_t v : d) n *= v;
  return n;
}

void run_matmul(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch) {
  const View a = view_of(io.input(plan.a.name), plan.a.perm);
  View b;
  if (plan.b.constant) {
    b.dims = dispatch.weight_batch_shape();
    const auto& s = dispatch.weight_shape(0);
    b.dims.push_back(s.K);
    b.dims.push_back(s.N);
    if (plan.b.rank == 1) b.dims = {s.K};
    b.strides = contiguous_strides(b.dims);
  } else {
    b = view_of(io.input(plan.b.name), plan.b.perm);
  }
  const bool a_vec = a.dims.size() == 1, b_vec = b.dims.size() == 1;
  const View a2 = a_vec ? View{a.data, {1, a.dims[0]}, {a.dims[0], 1}} : a;
  const View b2 = b_vec ? View{b.data, {b.dims[0], 1}, {1, 1}} : b;
  const size_t ra = a2.dims.size(), rb = b2.dims.size();
  const int64_t M = a2.dims[ra - 2], K = a2.dims[ra - 1], N = b2.dims[rb - 1];
  if (b2.dims[rb - 2] != K)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': MatMul inner dimensions differ");
  const Dims batch_a(a2.dims.begin(), a2.dims.end() - 2), batch_b(b2.dims.begin(), b2.dims.end() - 2);
  const Dims batch = broadcast_batch(batch_a, batch_b);
  Dims out_dims = batch;
  if (!a_vec) out_dims.push_back(M);
  if (!b_vec) out_dims.push_back(N);
  float* y = io.output(plan.output, out_dims);
  const int64_t batches = count(batch);
  if (batches == 0 || M == 0 || N == 0) return;

  // A 2-D (or batch-broadcast) B shared by every batch of a contiguous A: one tall GEMM.
  const bool plain = plan.a.perm.empty() && plan.b.perm.empty();
  const bool tall = plain && count(batch_b) == 1 && count(batch_a) == batches;
  dispatch.note_work(tall ? 1 : batches, tall ? batches * M : M, K, N, !plan.b.constant, a2.strides[ra - 1] != 1,
                     false);
  if (tall) {
    const kernels::GemmArgs args{a.data, batches * M, K, y, N};
    // A and C are io tensors nothing touches until the fused node flushes: may ride in a runlist with later nodes.
    if (plan.b.constant) dispatch.gemm_later(args, 0, io.deferred());
    else dispatch.gemm_runtime({{args, ep::RuntimeB{b.data, N, 1}}}, K, N);
    return;
  }
  const Dims a_batch_strides(a2.strides.begin(), a2.strides.end() - 2);
  const Dims b_batch_strides(b2.strides.begin(), b2.strides.end() - 2);
  const int64_t a_m_stride = a2.strides[ra - 2], a_k_stride = a2.strides[ra - 1];
  const int64_t b_k_stride = b2.strides[rb - 2], b_n_stride = b2.strides[rb - 1];
  // The kernels read A rows with unit stride; a fused Transpose that moves A's last dim gets A gathered.
  int64_t gathered = 0;
  if (a_k_stride != 1 &&
      (__builtin_mul_overflow(batches, M, &gathered) || __builtin_mul_overflow(gathered, K, &gathered)))
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': MatMul operand too large");
  std::vector<float> a_gathered(a_k_stride == 1 ? 0 : static_cast<size_t>(gathered));
  std::vector<std::pair<kernels::GemmArgs, size_t>> constant;       // constant B: matrix index
  std::vector<std::pair<kernels::GemmArgs, ep::RuntimeB>> runtime;  // run-time B
  for (int64_t i = 0; i < batches; ++i) {
    const float* ap = a.data + batch_offset(batch, batch_a, a_batch_strides, i);
    int64_t lda = a_m_stride;
    if (a_k_stride != 1) {
      float* dst = a_gathered.data() + i * M * K;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) dst[m * K + k] = ap[m * a_m_stride + k * a_k_stride];
      ap = dst;
      lda = K;
    }
    const kernels::GemmArgs args{ap, M, lda, y + i * M * N, N};
    if (plan.b.constant)
      constant.emplace_back(args, static_cast<size_t>(broadcast_index(batch, batch_b, i)));
    else
      runtime.emplace_back(args, ep::RuntimeB{b.data + batch_offset(batch, batch_b, b_batch_strides, i), b_k_stride,
                                              b_n_stride});
  }
  if (plan.b.constant) dispatch.gemm_batch(constant);
  else dispatch.gemm_runtime(runtime, K, N);
}

}  // namespace

extern const OpModule kMatMulModule{"", "MatMul", 1, OpPlan::Op::kMatMul, claim_matmul, run_matmul};

}  // namespace xdna::ops
