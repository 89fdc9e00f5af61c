// One module per claimed op: its claim rule (with the reason a node is left to the CPU EP), the plan it builds,
// and its run step. ops/op_table.cc lists the modules; adding an op = one file here + one row there.
//
// GetCapability and Compile call the same claim rule, so a node is claimed exactly when Compile can build its
// plan. The claim rule reads shapes and attributes only, never weight data: Compile packs the constant weight the
// plan describes (kernels/packing.h). (One exception: the scalar constants that make a decomposed GELU a GELU,
// ops/matmul.cc.) The plan is plain data (names, shapes, attributes), so that it can be
// stored and read back without the graph.
#pragma once

#include <onnxruntime_c_api.h>

#include <functional>
#include <string>
#include <vector>

#include "kernels/gemm_contract.h"
#include "ops/node_reader.h"
#include "ops/precision_policy.h"

namespace xdna::ep {
class Dispatcher;
class DeferredProducts;
}

namespace xdna::ops {

// Where an operand comes from when the fused node runs.
struct Operand {
  std::string name;
  bool present = false;   // optional inputs (Gemm's C) may be absent
  bool constant = false;  // constant initializer: read once at Compile, not a run-time input
  int rank = -1;
  std::vector<int64_t> dims;  // -1 for symbolic dims
  // Read through a Transpose fused into the same partition (ops/transpose_fusion.h): `name` is the Transpose's
  // input and the operand is that tensor with its dims permuted (operand dim d = input dim perm[d]).
  std::vector<int64_t> perm;
  // Read through a Reshape that splits the last dim of `name` (attention's head split, ops/transpose_fusion.h): that
  // dim read as these dims, row-major (their product = its size, checked at run time), before `perm`. Empty: none.
  std::vector<int64_t> split;
};

// 1-D convolution run as a GEMM: Y[n]^T [T_out, Cout] = im2col(X[n]) [T_out, k*Cin] . B [k*Cin, Cout], the inner
// index tap-major (kk * Cin + ci), so that with dilation 1 the im2col row of output t is k consecutive rows of X[n]
// transposed to [T, Cin]: the GEMM reads them where they lie (rows overlapping, lda = stride * Cin).
struct ConvParams {
  int64_t in_channels = 0, out_channels = 0, kernel = 0;
  int64_t stride = 1, dilation = 1, pad_begin = 0, pad_end = 0;
};

// Conv's weight W [Cout, Cin, k] as the transposed B the plan packs: [Cout, k * Cin], B[kk*Cin + ci][co] = W[co][ci][kk].
std::vector<float> conv_weight_tap_major(const std::vector<float>& w, const ConvParams& conv);

// Every product of a node runs in the plan's precision (kernels/gemm_contract.h, "Precision modes"), set at claim
// time from the session's policy (ops/precision_policy.h).
struct OpPlan {
  enum class Op { kMatMul, kGemm, kConv, kAttention };
  Op op = Op::kMatMul;
  std::string node_name;
  std::string output;  // the node's output value
  Operand a, b, c;     // c: Gemm's C or Conv's bias
  // The constant B as packing sees it (input 1 of the node): its shape and whether it is stored transposed
  // ([..., N, K]). Conv's W [Cout, Cin, k] is the transposed B [Cout, Cin*k]. Empty shape: B is not constant.
  std::vector<int64_t> weight_shape;
  bool weight_transposed = false;
  // Gemm attributes (MatMul and Conv: the defaults)
  bool trans_a = false, trans_b = false;
  float alpha = 1.f, beta = 1.f;
  std::vector<float> c_value;  // constant C (Gemm) or bias (Conv), read at Compile (shape in c.dims)
  ConvParams conv;             // Conv only
  double mflop = 0;            // per run, symbolic dims counted as 1
  bool mflop_lower_bound = false;
  // Fused attention only (ops/attention.cc): a = Q, b = K^T, v = V, the node's output O; the product of every
  // constant scale of the pattern (on Q, on K^T, on the scores), applied to the fp32 scores.
  Operand v;
  float attention_scale = 1.f;
  kernels::Precision precision = kernels::Precision::kBf16;  // constant B packed in it, every product run in it
  // The GEMM epilogue (kernels/gemm_contract.h, "Epilogue"; MatMul with a constant 2-D B only): the bias Add,
  // Gelu / BiasGelu and residual Add after the product, fused into it (Claim::fused_consumers); `output` is then
  // the last of those nodes' output. bias_value: read at Compile from `bias` (a constant [N] or [1, ..., N]).
  Operand bias;
  std::vector<float> bias_value;
  bool epilogue_gelu = false;
  Operand residual;  // a run-time tensor of the output's shape (present: added last)
  // Fused attention only: the additive mask added to the scaled scores before the Softmax (present: a run-time
  // float tensor that broadcasts to the scores [batch..., M, T] without enlarging them), and the NaN rule (a
  // Where(IsNaN(P), 0, P) fused after the Softmax: NaN rows of weights are zero; kernels/attention_contract.h).
  Operand attention_mask;
  bool attention_zero_nan = false;
  // Fused attention only: the head merge after it (Transpose(0, 2, 1, 3) of O [B, H, M, Dv] and a Reshape to
  // [B, M, H*Dv], Claim::fused_consumers) written directly: each head's rows H*Dv apart in `output`.
  bool attention_merge_heads = false;
  // MatMul only: the output is bfloat16, a trailing Cast to bfloat16 taken into the node (Claim::fused_consumers;
  // `output` is the Cast's output), each fp32 value rounded as the Cast does (kernels/gemm_contract.h, "Output in
  // bfloat16").
  bool output_bf16 = false;
  // MatMul only: the decoder's self-attention cache append after it (ops/matmul.cc, claim_cache_append; issues 7
  // and 13), taken into the node: the (epilogue'd) product [B, S, H*D] split into heads, each value rounded to
  // bfloat16 as ORT's Cast rounds it, and concatenated after the past cache [B, H, T, D] (bfloat16, bits copied);
  // `output` is the Concat's output, present [B, H, T+S, D] in bfloat16. Present: the chain is taken.
  Operand cache_past;
  int64_t cache_heads = 0, cache_depth = 0;
  // MatMul with a constant 2-D B only: the A prologue (kernels/gemm_contract.h, "A prologue"). A LayerNormalization
  // over the last axis makes A (Claim::fused_producers): `a` is then that node's input X and `layernorm_output` its
  // output, which the fused node computes once per call for all of its readers (empty: no prologue).
  // layernorm_scale / layernorm_bias: gamma and beta [K] (beta empty: none), read at Compile.
  std::string layernorm_output;
  float layernorm_epsilon = 1e-5f;
  std::vector<float> layernorm_scale, layernorm_bias;
  // Conv only (ops/conv.cc): the Transpose(0, 2, 1) after it (after its GELU, if taken) taken into the node, whose
  // output is then [N, T_out, Cout]: the GEMM's own rows, with no transpose either way. With it, an Add of a
  // constant [T_out, Cout] (or [1, T_out, Cout]) after that Transpose (Whisper's positional embedding): `residual`
  // (constant) added by the epilogue, its values residual_value read at Compile.
  bool conv_time_major = false;
  std::vector<float> residual_value;
  // MatMul with a bf16 output only (output_bf16): the head split after it (ops/matmul.cc, claim_head_split_output;
  // issue 13: the prompt run's cross K/V), Reshape [B, T, H, D] -> Transpose(0, 2, 1, 3), taken into the node:
  // `output` is then the Transpose's output [B, H, T, D] in bfloat16, each value rounded as ORT's Cast rounds it.
  // head_split_frames_first: the Reshape's output [B, T, H, D] when something else reads it too (the keys: their
  // attention reads K there), written as well; empty: not made. Heads 0: no head split.
  int64_t head_split_heads = 0, head_split_depth = 0;
  std::string head_split_frames_first;
};

struct Claim {
  bool ok = false;
  std::string reason;  // why the node is left to the CPU EP (or a note when claimed)
  OpPlan plan;
  // Transpose nodes whose only consumer is this node: claimed with it, so the permuted copy is never made.
  std::vector<const OrtNode*> fused_producers;
  // The nodes after it that its epilogue runs (bias Add, Gelu / BiasGelu, residual Add), in graph order.
  std::vector<const OrtNode*> fused_consumers;
  const OrtValueInfo* bias_input = nullptr;  // the constant bias the plan's epilogue reads (Compile: its value)
  std::string precision_note;  // why plan.precision is what it is (apply_precision_policy), for the report
  // Set by apply_precision_policy on a fused attention claim whose node the policy puts in bf16x3 (the fused
  // contract is bf16): claim_nodes then claims the node as a plain product instead, so the policy is honoured.
  bool unfuse = false;
  // The A prologue's LayerNormalization (ops/matmul.cc), its constant gamma and beta (Compile reads them), and A as
  // the MatMul reads it without the prologue: give_up_layernorm_prologue restores it when not every reader of the
  // LayerNormalization's output is claimed with it (that output is then needed, so the node stays).
  const OrtNode* layernorm = nullptr;
  const OrtValueInfo* layernorm_scale_input = nullptr;
  const OrtValueInfo* layernorm_bias_input = nullptr;
  Operand a_without_prologue;
  const OrtValueInfo* residual_input = nullptr;  // a constant residual the plan's epilogue adds (Compile: its value)
};

// The GELU of the GEMM epilogue (kernels/gemm_contract.h, "Epilogue"; the erf form: ONNX or com.microsoft Gelu, or
// the decomposed form PyTorch exports) that alone reads `value`, its float output of `dims`: its nodes in graph
// order (the last one writes the GELU), or empty. MatMul and Conv take it (ops/matmul.cc, ops/conv.cc).
std::vector<const OrtNode*> match_gelu(const OrtApi& api, const GraphIndex& index, const std::string& value,
                                       const std::vector<int64_t>& dims);

// Undoes a claim's A prologue (above): A is read from the LayerNormalization's output again, the node left out.
void give_up_layernorm_prologue(Claim* claim, const std::string& why);

inline Claim reject(std::string why) {
  Claim c;
  c.reason = std::move(why);
  return c;
}

// A tensor of one Compute call.
struct Tensor {
  const float* data = nullptr;  // float32 tensors
  std::vector<int64_t> dims;
  const uint16_t* bf16 = nullptr;  // bfloat16 tensors (data then null): only where a claim read through a Cast
};

// Where a node's run-time operands come from and where its output goes (the fused node's inputs and outputs, or
// tensors made by earlier nodes of the group). Lives for one Compute call.
class TensorIo {
 public:
  virtual ~TensorIo() = default;
  virtual Tensor input(const std::string& name) = 0;
  virtual float* output(const std::string& name, const std::vector<int64_t>& dims) = 0;
  // A bfloat16 output (OpPlan::output_bf16).
  virtual uint16_t* output_bf16(const std::string& name, const std::vector<int64_t>& dims) = 0;
  // Where a node may leave device products for its fused node to submit together with the next ones (a runlist,
  // issue 15 step 4); nullptr: run them now. Only for products whose A and C are io tensors and that nothing
  // touches before the fused node flushes.
  virtual ep::DeferredProducts* deferred() { return nullptr; }
  // Whether `name` was already made in this call (an A prologue's output, computed by its first reader).
  virtual bool made(const std::string& name) { (void)name; return false; }
};

// A as a MatMul with an A prologue (OpPlan::layernorm_output) reads it: the LayerNormalization's output, computed by
// the first reader of this call (kernels::layernorm_rows) into a tensor of the group that the others then read.
Tensor layernorm_prologue(const OpPlan& plan, TensorIo& io);

// The GEMM epilogue (kernels/gemm_contract.h, "Epilogue") a MatMul plan asks of its product, whose output is
// `out_dims` with N columns: its bias and GELU, and its residual where that has the output's shape (read from row 0,
// N apart). A residual of another shape (symbolic dims that broadcast at run time) is left out of *epilogue and
// given in *broadcast_residual (data null: none), for the caller to add after the products or to decline. Returns
// why the plan's epilogue cannot run at all ("" when it can): a bias of another size, a residual not float32.
// run_matmul and the int8 multi-product paths (ops/int8_chain.h, ops/int8_shared_a.h) build their epilogues here.
std::string matmul_epilogue(const OpPlan& plan, TensorIo& io, int64_t N, const std::vector<int64_t>& out_dims,
                            kernels::GemmEpilogue* epilogue, Tensor* broadcast_residual);

// Why a MatMul plan cannot be a product of the int8 multi-product paths (ops/int8_chain.h, ops/int8_shared_a.h;
// "" when it can): int8, a constant 2-D weight, A read as it lies. Each path adds its own conditions.
std::string int8_constant_product_miss(const OpPlan& plan);

// The head split of a MatMul's product (OpPlan::head_split_heads): why a product of `y_dims` does not split into
// the plan's heads ("" when it does: [B, T, H * D]).
std::string head_split_miss(const OpPlan& plan, const std::vector<int64_t>& y_dims);
// Its bfloat16 outputs for a product of `y_dims` (head_split_miss says ""): [B, H, T, D], and [B, T, H, D] where the
// plan makes it (frames null: not made).
struct HeadSplitOutputs {
  uint16_t* split = nullptr;
  uint16_t* frames = nullptr;
};
HeadSplitOutputs head_split_outputs(const OpPlan& plan, TensorIo& io, const std::vector<int64_t>& y_dims);

// One row of the op table.
struct OpModule {
  const char* domain;
  const char* op_type;
  int min_since_version;
  OpPlan::Op op;
  // Reads the node's shapes and attributes (never weight data) and decides. `index` (the node's graph) lets
  // MatMul read operands through their Transpose.
  Claim (*claim)(const OrtApi& api, const OrtNode* node, const GraphIndex& index);
  // Runs one node: shapes and broadcasting at run time, each product sent to `dispatch`.
  void (*run)(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch);
};

// What MatMul, Gemm and Conv share: float32 A, B and output of known rank, A not a constant. Fills plan->a and
// plan->b; returns why the node stays on the CPU EP, or "".
std::string read_float_operands(const OrtApi& api, const NodeIo& io, OpPlan* plan);

// The module of an op type, or nullptr when the EP does not know it.
const OpModule* find_op(const std::string& domain, const std::string& op_type);
const OpModule& module_of(OpPlan::Op op);

// The claim rule of the node's op, with what every op shares (opset, exactly one output). When several modules
// share the op type, the first that claims the node takes it.
// `fused`: false skips the modules that fuse several nodes into one plan (attention).
Claim claim_node(const OrtApi& api, const OrtNode* node, const GraphIndex& index, bool fused = true);

// The claims of a graph's nodes that find_op knows (`nodes` in topological order; the result in the same order).
// A node that another claim takes as a fused producer (the QK^T MatMul of a fused attention) is not claimed on its
// own: `covered_by` names the claiming node and `claim` is empty. `adjust` (may be empty) may veto a claim before
// it covers anything (GetCapability's min_mflop).
struct NodeClaim {
  const OrtNode* node = nullptr;
  Claim claim;
  std::string covered_by;  // for messages: the covering node's name, or its output's when it has none
  bool covered = false;    // the flag to test (node names may be empty)
};
std::vector<NodeClaim> claim_nodes(const OrtApi& api, const std::vector<const OrtNode*>& nodes,
                                   const GraphIndex& index, const std::function<void(Claim*)>& adjust = {});
// Sets a claimed node's plan.precision: the policy's choice, unless the contract cannot take it there (int8 with a
// run-time B or past its K limit: bf16); claim->precision_note says why it is what it is.
// A fused attention plan runs its own contract (kernels/attention_contract.h: bf16 products, fp32 softmax): bf16.
void apply_precision_policy(const PrecisionPolicy& policy, Claim* claim);

}  // namespace xdna::ops
