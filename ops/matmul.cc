// MatMul: constant or run-time B, any rank, ONNX (numpy) broadcasting of batch dims, 1-D operands, and operands
// read through a fused Transpose (ops/transpose_fusion.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "ep_plugin/dispatch.h"
#include "kernels/emulator/emulator.h"
#include "kernels/ep_buffers.h"
#include "kernels/layernorm.h"
#include "kernels/packing.h"
#include "ops/op.h"
#include "ops/transpose_fusion.h"

namespace xdna::ops {
namespace {

using Dims = std::vector<int64_t>;

// A float32 constant that is a per-column bias of an [..., N] output: shape [N] or [1, ..., 1, N].
bool is_column_bias(const Operand& o, ONNXTensorElementDataType t, int64_t N, int out_rank) {
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !o.constant || o.rank < 1 || o.rank > out_rank) return false;
  for (int d = 0; d + 1 < o.rank; ++d)
    if (o.dims[d] != 1) return false;
  return o.dims.back() == N;
}

// Two shapes known to be equal where both are known (symbolic dims, -1, are checked at run time).
bool same_shape(const Dims& a, const Dims& b) {
  if (a.size() != b.size()) return false;
  for (size_t d = 0; d < a.size(); ++d)
    if (a[d] >= 0 && b[d] >= 0 && a[d] != b[d]) return false;
  return true;
}

// A float32 constant scalar (any rank, one element) within 1e-6 relative of `want`: a decomposed GELU is a GELU
// only with its constants.
bool is_scalar(const OrtApi& api, const OrtValueInfo* vi, double want) {
  float v = 0.f;
  return constant_scalar(api, vi, std::numeric_limits<int>::max(), &v) && std::abs(v - want) <= 1e-6 * std::abs(want);
}

// GELU as exported from PyTorch (erf form), before ORT fuses it (after the EP has claimed its nodes):
//   x -> Div(x, sqrt 2) | Mul(x, 1/sqrt 2) -> Erf -> Add(., 1) -> Mul(x, .) -> Mul(., 0.5)
// `x` read by the first node and the first Mul alone. Returns the nodes in graph order (empty: not this pattern).
std::vector<const OrtNode*> match_erf_gelu(const OrtApi& api, const GraphIndex& index, const std::string& x) {
  const auto uses = index.uses.find(x);
  const auto readers = index.consumers.find(x);
  if (uses == index.uses.end() || uses->second != 2 || readers == index.consumers.end() || readers->second.size() != 2)
    return {};
  auto other_than = [&](const NodeIo& io, const std::string& v) -> const OrtValueInfo* {
    if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return nullptr;
    if (value_name(api, io.inputs[0]) == v) return io.inputs[1];
    if (value_name(api, io.inputs[1]) == v) return io.inputs[0];
    return nullptr;
  };
  auto output = [&](const OrtNode* n, NodeIo* io) {
    *io = node_io(api, n);
    return io->outputs.size() == 1 && io->outputs[0] ? value_name(api, io->outputs[0]) : std::string();
  };
  for (int first = 0; first < 2; ++first) {
    const OrtNode* scale = readers->second[first];
    const OrtNode* times_x = readers->second[1 - first];
    NodeIo sio, eio, aio, mio, hio;
    const std::string scaled = output(scale, &sio);
    if (scaled.empty()) continue;
    const bool div = is_op(api, scale, "", "Div") && sio.inputs.size() == 2 && sio.inputs[0] && sio.inputs[1] &&
                     value_name(api, sio.inputs[0]) == x && is_scalar(api, sio.inputs[1], 1.4142135623730951);
    const OrtValueInfo* s = is_op(api, scale, "", "Mul") ? other_than(sio, x) : nullptr;
    if (!div && !(s && is_scalar(api, s, 0.7071067811865476))) continue;
    const OrtNode* erf = only_reader(index, scaled);
    if (!erf || !is_op(api, erf, "", "Erf")) continue;
    const std::string erf_out = output(erf, &eio);
    const OrtNode* plus_one = erf_out.empty() ? nullptr : only_reader(index, erf_out);
    if (!plus_one || !is_op(api, plus_one, "", "Add")) continue;
    const std::string sum = output(plus_one, &aio);
    const OrtValueInfo* one = other_than(aio, erf_out);
    if (!one || !is_scalar(api, one, 1.0) || sum.empty() || only_reader(index, sum) != times_x) continue;
    if (!is_op(api, times_x, "", "Mul")) continue;
    const std::string product = output(times_x, &mio);
    const OrtValueInfo* x_again = other_than(mio, sum);
    if (!x_again || value_name(api, x_again) != x || product.empty()) continue;
    const OrtNode* half = only_reader(index, product);
    if (!half || !is_op(api, half, "", "Mul")) continue;
    if (output(half, &hio).empty()) continue;
    const OrtValueInfo* h = other_than(hio, product);
    if (!h || !is_scalar(api, h, 0.5)) continue;
    return {scale, erf, plus_one, times_x, half};
  }
  return {};
}

}  // namespace

std::vector<const OrtNode*> match_gelu(const OrtApi& api, const GraphIndex& index, const std::string& value,
                                       const std::vector<int64_t>& dims) {
  std::vector<const OrtNode*> nodes;
  const OrtNode* next = only_reader(index, value);  // null: read twice (a decomposed GELU) or more
  if (!next) {
    nodes = match_erf_gelu(api, index, value);
  } else if (is_op(api, next, "com.microsoft", "Gelu") || is_op(api, next, "", "Gelu")) {
    const NodeIo nio = node_io(api, next);
    std::string approximate = "none";
    if (is_op(api, next, "", "Gelu") && !string_attr(api, next, "approximate", &approximate)) approximate = "?";
    if (nio.inputs.size() == 1 && approximate == "none") nodes = {next};
  }
  if (nodes.empty()) return {};
  const NodeIo out = node_io(api, nodes.back());
  if (out.outputs.size() != 1 || !out.outputs[0]) return {};
  ONNXTensorElementDataType t;
  const Operand o = describe(api, out.outputs[0], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !same_shape(o.dims, dims)) return {};
  return nodes;
}

namespace {

// Extends a MatMul claim over the elementwise nodes after it that the GEMM epilogue runs (kernels/gemm_contract.h,
// "Epilogue"): [Add(constant bias [N])] [Gelu | BiasGelu(constant bias)] [Add(run-time residual of its shape)], in
// that order, each step's input read by that step alone. Returns why the chain stops where it does ("" when the
// product has no such consumer), for the claim's reason. Reads shapes only; the bias value is read at Compile.
std::string claim_epilogue(const OrtApi& api, const GraphIndex& index, const NodeIo& io, Claim* r) {
  OpPlan& p = r->plan;
  if (p.a.rank < 2 || p.b.rank != 2 || !p.b.constant) return "";  // products with an [.., M, N] output only
  const int64_t N = p.b.dims[1];
  if (N < 0) return "";
  ONNXTensorElementDataType t;
  const Operand out = describe(api, io.outputs[0], &t);
  std::string value = out.name;
  auto other_input = [&](const NodeIo& nio, std::string* why) -> const OrtValueInfo* {
    if (nio.inputs.size() != 2 || !nio.inputs[0] || !nio.inputs[1] || nio.outputs.size() != 1 || !nio.outputs[0]) {
      *why = "an Add without two inputs and one output";
      return nullptr;
    }
    const bool first = value_name(api, nio.inputs[0]) == value;
    const bool second = value_name(api, nio.inputs[1]) == value;
    if (first == second) {
      *why = "an Add of the product with itself";
      return nullptr;
    }
    return nio.inputs[first ? 1 : 0];
  };
  auto float_output_like_product = [&](const NodeIo& nio) {
    ONNXTensorElementDataType ty;
    const Operand o = describe(api, nio.outputs[0], &ty);
    return ty == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && same_shape(o.dims, out.dims);
  };
  auto take = [&](const OrtNode* node, const NodeIo& nio) {
    r->fused_consumers.push_back(node);
    value = value_name(api, nio.outputs[0]);
    p.output = value;
  };
  std::string why;
  const OrtNode* next = only_reader(index, value);  // null: read twice (a decomposed GELU) or more
  // 1. + bias[n]
  if (next && is_op(api, next, "", "Add")) {
    const NodeIo nio = node_io(api, next);
    const OrtValueInfo* other = other_input(nio, &why);
    ONNXTensorElementDataType tb = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    Operand bias = other ? describe(api, other, &tb) : Operand{};
    if (other && is_column_bias(bias, tb, N, out.rank) && float_output_like_product(nio)) {
      p.bias = bias;
      r->bias_input = other;
      take(next, nio);
      next = only_reader(index, value);
    } else if (other && bias.constant) {
      return "; the Add after it stays on the CPU EP (not a float32 per-column bias of " + std::to_string(N) + ")";
    }
  }
  // 2. GELU (erf form): Gelu, its decomposed form, or BiasGelu when no bias was taken yet
  if (const auto gelu = match_gelu(api, index, value, out.dims); !gelu.empty()) {
    p.epilogue_gelu = true;
    r->fused_consumers.insert(r->fused_consumers.end(), gelu.begin(), gelu.end() - 1);
    take(gelu.back(), node_io(api, gelu.back()));
    next = only_reader(index, value);
  } else if (next && (is_op(api, next, "com.microsoft", "Gelu") || is_op(api, next, "", "Gelu"))) {
    return r->fused_consumers.empty() ? "; the Gelu after it stays on the CPU EP (not the erf form of its shape)" : "";
  } else if (next && is_op(api, next, "com.microsoft", "BiasGelu")) {
    const NodeIo nio = node_io(api, next);
    ONNXTensorElementDataType tb = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    const bool x_first = nio.inputs.size() == 2 && nio.inputs[0] && nio.inputs[1] &&
                         value_name(api, nio.inputs[0]) == value;
    const Operand bias = x_first ? describe(api, nio.inputs[1], &tb) : Operand{};
    if (!x_first || r->bias_input || nio.outputs.size() != 1 || !nio.outputs[0] || !is_column_bias(bias, tb, N, out.rank) ||
        !float_output_like_product(nio))
      return "; the BiasGelu after it stays on the CPU EP (its bias is not a float32 per-column constant of " +
             std::to_string(N) + ", or a bias was already added)";
    p.bias = bias;
    r->bias_input = nio.inputs[1];
    p.epilogue_gelu = true;
    take(next, nio);
    next = only_reader(index, value);
  }
  // 3. + residual[m][n]
  if (next && is_op(api, next, "", "Add")) {
    const NodeIo nio = node_io(api, next);
    const OrtValueInfo* other = other_input(nio, &why);
    if (!other) return "; the Add after it stays on the CPU EP (" + why + ")";
    ONNXTensorElementDataType tr;
    const Operand res = describe(api, other, &tr);
    if (tr != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return "; the Add after it stays on the CPU EP (residual is not float32)";
    if (res.constant) return "; the Add after it stays on the CPU EP (a constant that is not a per-column bias)";
    if (!same_shape(res.dims, out.dims) || !float_output_like_product(nio))
      return "; the Add after it stays on the CPU EP (its other operand broadcasts: not a residual of the output's shape)";
    // A residual read by this Add alone may be another product's epilogue output that would claim this Add too.
    const auto producer = index.producer.find(res.name);
    const auto uses = index.uses.find(res.name);
    if (producer != index.producer.end() && uses != index.uses.end() && uses->second == 1)
      return "; the Add after it stays on the CPU EP (its other operand is read only there: it may be another "
             "product's to fuse)";
    p.residual = res;
    take(next, nio);
  }
  return "";
}

// Takes the Cast to bfloat16 that alone reads the product's (epilogue'd) output `value`: the node then writes its
// output in bf16, rounded as the Cast rounds (kernels/gemm_contract.h, "Output in bfloat16"). Returns whether it did.
bool claim_bf16_output(const OrtApi& api, const GraphIndex& index, const std::string& value, Claim* r) {
  const OrtNode* cast = only_reader(index, value);
  int64_t to = 0;
  if (!cast || !is_op(api, cast, "", "Cast") || !int_attr(api, cast, "to", &to) ||
      to != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
    return false;
  const NodeIo cio = node_io(api, cast);
  if (cio.inputs.size() != 1 || cio.outputs.size() != 1 || !cio.outputs[0]) return false;
  r->fused_consumers.push_back(cast);
  r->plan.output = value_name(api, cio.outputs[0]);
  r->plan.output_bf16 = true;
  return true;
}

// Takes the decoder's self-attention cache append after the product's (epilogue'd) output `value` [B, S, H*D]
// (whisper/decoder_graph.py pass 7, as ORT's optimiser leaves it):
//   Reshape [B, S, H, D] -> Transpose(0, 2, 1, 3) and Cast(bfloat16), in either order -> Concat(past, ., axis 2)
// each intermediate read by the next node alone, past a run-time bfloat16 [B, H, T, D]. The node then writes the
// Concat's output, present [B, H, T+S, D]: past copied, the new rows rounded as the Cast rounds (OpPlan::cache_past).
// Returns whether it took the chain; *why says why a chain that ends in such a Concat stays on the CPU EP.
bool claim_cache_append(const OrtApi& api, const GraphIndex& index, const std::string& value, Claim* r,
                        std::string* why) {
  auto output_of = [&](const OrtNode* n) {
    const NodeIo nio = node_io(api, n);
    return nio.outputs.size() == 1 && nio.outputs[0] ? value_name(api, nio.outputs[0]) : std::string();
  };
  auto first_reader = [&](const std::string& v) -> const OrtNode* {
    const auto readers = index.consumers.find(v);
    return v.empty() || readers == index.consumers.end() || readers->second.empty() ? nullptr : readers->second[0];
  };
  // The nodes from the Reshape to a Concat, each the first reader of the one before (checked to be the only one
  // below): not a cache append (nothing to say) unless it reaches a Concat through a Cast to bfloat16.
  const OrtNode* reshape = first_reader(value);
  if (!reshape || !is_op(api, reshape, "", "Reshape")) return false;
  std::vector<const OrtNode*> chain{reshape};
  const OrtNode* concat = nullptr;
  const OrtNode* transpose = nullptr;
  const OrtNode* cast = nullptr;
  while (chain.size() < 4) {
    const OrtNode* next = first_reader(output_of(chain.back()));
    if (!next) return false;
    if (is_op(api, next, "", "Concat")) {
      concat = next;
      break;
    }
    if (is_op(api, next, "", "Transpose") && !transpose) transpose = next;
    else if (is_op(api, next, "", "Cast") && !cast) cast = next;
    else return false;
    chain.push_back(next);
  }
  int64_t to = 0;
  if (!concat || !cast || !int_attr(api, cast, "to", &to) || to != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) return false;
  const std::string stays =
      "; the cache append after it (Reshape, Transpose, Cast to bf16, Concat) stays on the CPU EP (";
  const NodeIo rio = node_io(api, reshape);
  ONNXTensorElementDataType tx;
  const Operand x = rio.inputs.empty() || !rio.inputs[0] ? Operand{} : describe(api, rio.inputs[0], &tx);
  int64_t heads = 0, depth = 0;
  if (x.name != value || tx != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.rank != 3 ||
      !head_split_of(api, reshape, x, &heads, &depth)) {
    *why = stays + "its Reshape does not split [B, S, H*D] into [B, S, H, D])";
    return false;
  }
  std::vector<int64_t> perm;
  if (!transpose || !ints_attr(api, transpose, "perm", &perm) || perm != std::vector<int64_t>{0, 2, 1, 3}) {
    *why = stays + "not one Transpose(0, 2, 1, 3))";
    return false;
  }
  for (size_t i = 0; i <= chain.size(); ++i) {  // the product, then each node of the chain: read by the next alone
    const OrtNode* next = i < chain.size() ? chain[i] : concat;
    if (only_reader(index, i == 0 ? value : output_of(chain[i - 1])) != next) {
      *why = stays + "an intermediate of it is read elsewhere)";
      return false;
    }
  }
  const NodeIo cio = node_io(api, concat);
  int64_t axis = 0;
  if (cio.inputs.size() != 2 || !cio.inputs[0] || !cio.inputs[1] ||
      value_name(api, cio.inputs[1]) != output_of(chain.back()) || cio.outputs.size() != 1 || !cio.outputs[0] ||
      !int_attr(api, concat, "axis", &axis) || (axis != 2 && axis != -2)) {
    *why = stays + "not Concat(past, new) on axis 2)";
    return false;
  }
  ONNXTensorElementDataType tp;
  const Operand past = describe(api, cio.inputs[0], &tp);
  auto differs = [](int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; };
  if (tp != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 || past.constant || past.rank != 4 ||
      differs(past.dims[0], x.dims[0]) || differs(past.dims[1], heads) || differs(past.dims[3], depth)) {
    *why = stays + "the past is not a run-time bfloat16 [B, " + std::to_string(heads) + ", T, " +
           std::to_string(depth) + "])";
    return false;
  }
  r->fused_consumers.insert(r->fused_consumers.end(), chain.begin(), chain.end());
  r->fused_consumers.push_back(concat);
  OpPlan& p = r->plan;
  p.output = value_name(api, cio.outputs[0]);
  p.cache_past = past;
  p.cache_heads = heads;
  p.cache_depth = depth;
  return true;
}

// Takes the head split after the product's bf16 output `value` [B, T, H*D] (the Cast claim_bf16_output took): the
// prompt run's cross K/V as whisper/decoder_graph.py passes 5 and 8 leave them,
//   Reshape [B, T, H, D] -> Transpose(0, 2, 1, 3) -> present.N.encoder.* [B, H, T, D] (bfloat16)
// `value` read by the Reshape alone, the Reshape's output by that Transpose (and, the keys, by their attention: then
// written as well, OpPlan::head_split_frames_first). The node then writes the Transpose's output itself, each value
// rounded as the Cast rounds it, so no CPU Transpose moves 1500 x 512 per layer and per K/V each window. Returns
// whether it took the chain; *why says why a Reshape -> Transpose after the bf16 output stays on the CPU EP.
bool claim_head_split_output(const OrtApi& api, const GraphIndex& index, const std::string& value, Claim* r,
                             std::string* why) {
  const OrtNode* reshape = only_reader(index, value);
  if (!reshape || !is_op(api, reshape, "", "Reshape")) return false;
  const NodeIo rio = node_io(api, reshape);
  if (rio.outputs.size() != 1 || !rio.outputs[0]) return false;
  const std::string frames_first = value_name(api, rio.outputs[0]);
  const auto readers = index.consumers.find(frames_first);
  const OrtNode* transpose = nullptr;  // the head split's: the first reader that is a Transpose(0, 2, 1, 3)
  bool other_transpose = false;
  if (readers != index.consumers.end())
    for (const OrtNode* n : readers->second) {
      if (!is_op(api, n, "", "Transpose")) continue;
      std::vector<int64_t> perm;
      if (!transpose && ints_attr(api, n, "perm", &perm) && perm == std::vector<int64_t>{0, 2, 1, 3}) transpose = n;
      else other_transpose = true;
    }
  if (!transpose && !other_transpose) return false;
  const std::string stays = "; the head split after it (Reshape, Transpose) stays on the CPU EP (";
  ONNXTensorElementDataType tx;
  const Operand x = rio.inputs.empty() || !rio.inputs[0] ? Operand{} : describe(api, rio.inputs[0], &tx);
  int64_t heads = 0, depth = 0;
  if (x.name != value || tx != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 || x.rank != 3 ||
      !head_split_of(api, reshape, x, &heads, &depth)) {
    *why = stays + "its Reshape does not split [B, T, H*D] into [B, T, H, D])";
    return false;
  }
  if (!transpose) {
    *why = stays + "not Transpose(0, 2, 1, 3))";
    return false;
  }
  const NodeIo tio = node_io(api, transpose);
  if (tio.inputs.size() != 1 || tio.outputs.size() != 1 || !tio.outputs[0]) {
    *why = stays + "a Transpose of other inputs or outputs)";
    return false;
  }
  // Read by the Transpose alone, or by it and others (a graph output counts): then the node writes it too.
  const auto uses = index.uses.find(frames_first);
  const bool read_elsewhere = uses == index.uses.end() || uses->second != 1;
  r->fused_consumers.push_back(reshape);
  r->fused_consumers.push_back(transpose);
  OpPlan& p = r->plan;
  p.output = value_name(api, tio.outputs[0]);
  p.head_split_heads = heads;
  p.head_split_depth = depth;
  p.head_split_frames_first = read_elsewhere ? frames_first : std::string();
  return true;
}

// A float32 constant of shape [K] (K known): LayerNormalization's gamma or beta over the last axis.
bool is_row_constant(const Operand& o, ONNXTensorElementDataType t, int64_t K) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && o.constant && o.rank == 1 && o.dims[0] == K && K > 0;
}

// Whether `reader` reads `value` as the A of a MatMul with a constant 2-D float32 B (a projection).
bool is_projection_of(const OrtApi& api, const OrtNode* reader, const std::string& value) {
  if (!is_op(api, reader, "", "MatMul")) return false;
  const NodeIo io = node_io(api, reader);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1] || value_name(api, io.inputs[0]) != value ||
      value_name(api, io.inputs[1]) == value)
    return false;
  ONNXTensorElementDataType t;
  const Operand b = describe(api, io.inputs[1], &t);
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && b.constant && b.rank == 2;
}

// Takes the LayerNormalization that makes A as the A prologue (kernels/gemm_contract.h, "A prologue") when every
// reader of its output is a projection (each claims it the same way; claim_nodes undoes the prologue of all of
// them when one is not claimed). Returns why it does not ("" when A has no LayerNormalization producer or it did).
std::string claim_layernorm_prologue(const OrtApi& api, const GraphIndex& index, Claim* r) {
  OpPlan& p = r->plan;
  const auto producer = index.producer.find(p.a.name);
  if (producer == index.producer.end() || !is_op(api, producer->second, "", "LayerNormalization")) return "";
  const OrtNode* ln = producer->second;
  const std::string stays = "; its LayerNormalization stays on the CPU EP (";
  if (!p.b.constant || p.b.rank != 2 || p.a.perm.size() || p.a.rank < 1) return stays + "not a projection's A)";
  const NodeIo io = node_io(api, ln);
  if (io.inputs.size() < 2 || !io.inputs[0] || !io.inputs[1] || io.outputs.empty() || !io.outputs[0])
    return stays + "without X and scale)";
  for (size_t i = 1; i < io.outputs.size(); ++i)  // Mean, InvStdDev: only when nothing reads them
    if (io.outputs[i]) {
      const auto uses = index.uses.find(value_name(api, io.outputs[i]));
      if (uses != index.uses.end() && uses->second > 0) return stays + "its Mean or InvStdDev is read)";
    }
  int64_t axis = -1, stash = 1;
  float epsilon = 1e-5f;
  if (!int_attr(api, ln, "axis", &axis) || !int_attr(api, ln, "stash_type", &stash) ||
      !float_attr(api, ln, "epsilon", &epsilon))
    return stays + "unreadable attributes)";
  ONNXTensorElementDataType tx, ts, tb = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const Operand x = describe(api, io.inputs[0], &tx);
  const Operand scale = describe(api, io.inputs[1], &ts);
  const OrtValueInfo* bias_input = io.inputs.size() > 2 ? io.inputs[2] : nullptr;
  const Operand bias = bias_input ? describe(api, bias_input, &tb) : Operand{};
  if (x.rank != p.a.rank) return stays + "rank unknown)";
  if (axis != -1 && axis != x.rank - 1) return stays + "axis " + std::to_string(axis) + " is not the last)";
  if (stash != 1) return stays + "stash_type is not float32)";
  if (!(epsilon >= 0.f) || !std::isfinite(epsilon)) return stays + "epsilon not a finite non-negative value)";
  if (tx != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return stays + "X is " + dtype_name(tx) + ")";
  const int64_t K = x.dims.back();
  if (!is_row_constant(scale, ts, K) || (bias_input && !is_row_constant(bias, tb, K)))
    return stays + "scale or bias is not a float32 constant [K] of a known K)";
  const std::string out = value_name(api, io.outputs[0]);
  const auto readers = index.consumers.find(out);
  const auto uses = index.uses.find(out);
  if (readers == index.consumers.end() || uses == index.uses.end() ||
      static_cast<size_t>(uses->second) != readers->second.size())
    return stays + "its output is a graph output)";
  for (const OrtNode* reader : readers->second)
    if (!is_projection_of(api, reader, out)) return stays + "its output is read by other nodes than projections)";
  r->a_without_prologue = p.a;
  r->layernorm = ln;
  r->layernorm_scale_input = io.inputs[1];
  r->layernorm_bias_input = bias_input;
  r->fused_producers.push_back(ln);
  p.layernorm_output = out;
  p.layernorm_epsilon = epsilon;
  p.a = x;
  return "";
}

// The prologue's part of the claim's reason. A LayerNormalization read by several projections must leave them in one
// fused node with it (graph_passes/fusion_groups.cc groups a unit by its last node's depth): a residual or a past
// cache that another node makes could put this one deeper, so such a claim gives the prologue up (and claim_nodes
// then all of them). Graph inputs (the decoder's past K/V) cannot.
void finish_layernorm_prologue(const OrtApi& api, const GraphIndex& index, const std::string& stop, Claim* r) {
  if (!r->layernorm) {
    r->reason += stop;
    return;
  }
  const NodeIo io = node_io(api, r->layernorm);
  const auto readers = index.consumers.find(value_name(api, io.outputs[0]));
  const auto made_by_a_node = [&](const Operand& o) { return o.present && index.producer.count(o.name) > 0; };
  if ((made_by_a_node(r->plan.residual) || made_by_a_node(r->plan.cache_past)) && readers != index.consumers.end() &&
      readers->second.size() > 1)
    return give_up_layernorm_prologue(r, "its LayerNormalization, read by several projections, stays on the CPU EP "
                                         "(this one also reads a residual or past cache another node makes)");
  r->reason += ", with its LayerNormalization as the A prologue";
}

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
  const std::string prologue_stop = claim_layernorm_prologue(api, index, &r);
  if (!r.layernorm) read_through_transpose(api, index, &p.a, &r);
  Claim b_producers;  // found backwards from B: added in graph order (a Cast before its Transpose)
  read_through_transpose(api, index, &p.b, &b_producers);
  const std::string before_cast = p.b.name;
  read_through_bf16_cast(api, index, &p.b, &b_producers);
  const bool b_bf16 = p.b.name != before_cast;
  r.fused_producers.insert(r.fused_producers.end(), b_producers.fused_producers.rbegin(),
                           b_producers.fused_producers.rend());
  r.ok = true;
  r.reason = p.b.constant ? "constant weight" : "both operands at run time";
  if (r.fused_producers.size() > (b_bf16 ? 1u : 0u)) r.reason += ", with the Transpose of its input(s)";
  if (b_bf16) r.reason += ", B read as bf16 through its Cast";
  if (io.outputs.size() == 1 && io.outputs[0]) {
    const std::string stop = claim_epilogue(api, index, io, &r);
    if (!r.fused_consumers.empty())
      r.reason += std::string(", epilogue:") + (p.bias.present ? " +bias" : "") + (p.epilogue_gelu ? " gelu" : "") +
                  (p.residual.present ? " +residual" : "");
    r.reason += stop;
    const std::string product = p.output.empty() ? value_name(api, io.outputs[0]) : p.output;
    std::string append_stays;
    std::string split_stays;
    if (claim_bf16_output(api, index, product, &r)) {
      r.reason += ", output written as bf16 (its Cast)";
      if (claim_head_split_output(api, index, r.plan.output, &r, &split_stays))
        r.reason += std::string(", split into heads [B, H, T, D] (Reshape, Transpose)") +
                    (r.plan.head_split_frames_first.empty() ? "" : ", its [B, T, H, D] written too");
      r.reason += split_stays;
    } else if (claim_cache_append(api, index, product, &r, &append_stays))
      r.reason += ", written into the bf16 cache after its past (head split, Cast, Concat)";
    r.reason += append_stays;
  }
  finish_layernorm_prologue(api, index, prologue_stop, &r);
  return r;
}

int64_t count(const Dims& d) {
  int64_t n = 1;
  for (int64_t v : d) n *= v;
  return n;
}

// The cache append (OpPlan::cache_past): present [B, H, T+S, D] = past [B, H, T, D], its bits copied, then the
// fp32 product y [B, S, H*D] split into heads, each value rounded as ORT's Cast to bfloat16 rounds it. y may be
// null when it has no element.
void append_to_cache(const OpPlan& plan, TensorIo& io, const float* y, const Dims& y_dims) {
  const Tensor past = io.input(plan.cache_past.name);
  const int64_t H = plan.cache_heads, D = plan.cache_depth;
  if (y_dims.size() != 3 || y_dims[2] != H * D)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': its product does not split into " +
                                                 std::to_string(H) + " heads of " + std::to_string(D));
  const int64_t B = y_dims[0], S = y_dims[1];
  // (ORT may give an empty tensor no data pointer at all)
  const bool bf16 = past.bf16 || (!past.data && count(past.dims) == 0);
  if (!bf16 || past.dims.size() != 4 || past.dims[0] != B || past.dims[1] != H || past.dims[3] != D) {
    std::string dims;
    for (int64_t d : past.dims) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': past cache '" + plan.cache_past.name +
                                                 "' [" + dims + "] is not a bfloat16 [" + std::to_string(B) + ", " +
                                                 std::to_string(H) + ", T, " + std::to_string(D) + "]");
  }
  const int64_t T = past.dims[2];
  uint16_t* present = io.output_bf16(plan.output, {B, H, T + S, D});
  auto one_head = [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    uint16_t* dst = present + bh * (T + S) * D;
    if (T > 0) std::memcpy(dst, past.bf16 + bh * T * D, static_cast<size_t>(T * D) * sizeof(uint16_t));
    for (int64_t s = 0; s < S; ++s) kernels::store_bf16_as_cast(y + ((b * S + s) * H + h) * D, dst + (T + s) * D, D);
  };
  // A large past (beams x a long prompt: MBs per layer) is copied on the host's thread pool (ORT's Concat, which
  // this replaces, used its own threads: one core copied it measurably slower); a small one on this thread.
  const bool large = B * H * (T + S) * D * static_cast<int64_t>(sizeof(uint16_t)) >= (int64_t{1} << 18);
  kernels::emulator_parallel_for(large ? 0 : 1, B * H, one_head);
}

// The head split (OpPlan::head_split_heads): the fp32 product y [B, T, H*D] written as [B, H, T, D] in bfloat16,
// each value rounded as ORT's Cast rounds it, and as [B, T, H, D] too where the plan says so. y may be null when it
// has no element.
void write_head_split(const OpPlan& plan, TensorIo& io, const float* y, const Dims& y_dims) {
  if (std::string why = head_split_miss(plan, y_dims); !why.empty())
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': " + why);
  const int64_t H = plan.head_split_heads, D = plan.head_split_depth, B = y_dims[0], T = y_dims[1];
  const HeadSplitOutputs out = head_split_outputs(plan, io, y_dims);
  uint16_t* split = out.split;
  uint16_t* frames = out.frames;
  const int64_t rows = B * T, width = H * D;
  if (rows * width == 0) return;
  // One pass over y, row by row (contiguous reads): each row rounded once, into the frames-first output or a
  // buffer, then its H pieces of D copied to their heads. Chunks of rows on the thread pool when the tensor is large.
  constexpr int64_t kRowsPerTask = 64;
  auto some_rows = [&](int64_t task) {
    std::vector<uint16_t> buffer(frames ? 0 : static_cast<size_t>(width));
    const int64_t end = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t bt = task * kRowsPerTask; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      uint16_t* row = frames ? frames + bt * width : buffer.data();
      kernels::store_bf16_as_cast(y + bt * width, row, width);
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(split + ((b * H + h) * T + t) * D, row + h * D, static_cast<size_t>(D) * sizeof(uint16_t));
    }
  };
  const bool large = rows * width * static_cast<int64_t>(sizeof(uint16_t)) >= (int64_t{1} << 18);
  kernels::emulator_parallel_for(large ? 0 : 1, (rows + kRowsPerTask - 1) / kRowsPerTask, some_rows);
}

}  // namespace

std::string head_split_miss(const OpPlan& plan, const Dims& y_dims) {
  const int64_t H = plan.head_split_heads, D = plan.head_split_depth;
  if (y_dims.size() != 3 || y_dims[2] != H * D)
    return "its product does not split into " + std::to_string(H) + " heads of " + std::to_string(D);
  return "";
}

HeadSplitOutputs head_split_outputs(const OpPlan& plan, TensorIo& io, const Dims& y_dims) {
  const int64_t B = y_dims[0], T = y_dims[1], H = plan.head_split_heads, D = plan.head_split_depth;
  HeadSplitOutputs out;
  out.split = io.output_bf16(plan.output, {B, H, T, D});
  if (!plan.head_split_frames_first.empty()) out.frames = io.output_bf16(plan.head_split_frames_first, {B, T, H, D});
  return out;
}

std::string matmul_epilogue(const OpPlan& plan, TensorIo& io, int64_t N, const Dims& out_dims,
                            kernels::GemmEpilogue* epilogue, Tensor* broadcast_residual) {
  *epilogue = {};
  *broadcast_residual = {};
  if (!plan.bias_value.empty()) {
    if (static_cast<int64_t>(plan.bias_value.size()) != N)
      return "bias of " + std::to_string(plan.bias_value.size()) + " values for N=" + std::to_string(N);
    epilogue->bias = plan.bias_value.data();
  }
  epilogue->gelu = plan.epilogue_gelu;
  if (plan.residual.present) {
    Tensor residual = io.input(plan.residual.name);
    if (!residual.data) return "residual is not float32";
    if (residual.dims != out_dims) *broadcast_residual = std::move(residual);
    else epilogue->residual = residual.data, epilogue->ldr = N;
  }
  return "";
}

std::string int8_constant_product_miss(const OpPlan& p) {
  if (p.op != OpPlan::Op::kMatMul) return "not a MatMul";
  if (p.precision != kernels::Precision::kInt8) return std::string("runs in ") + kernels::precision_name(p.precision);
  if (!p.b.constant || p.weight_shape.size() != 2 || p.b.rank != 2) return "its weight is not a constant 2-D B";
  if (!p.a.perm.empty() || !p.a.split.empty()) return "reads A through a Transpose or Reshape";
  return "";
}

Tensor layernorm_prologue(const OpPlan& plan, TensorIo& io) {
  if (io.made(plan.layernorm_output)) return io.input(plan.layernorm_output);
  const Tensor x = io.input(plan.a.name);
  const std::string where = "node '" + plan.node_name + "': LayerNormalization prologue: ";
  if (!x.data) throw ep::OrtError(ORT_INVALID_ARGUMENT, where + "X is not float32");
  if (x.dims.empty()) throw ep::OrtError(ORT_INVALID_ARGUMENT, where + "X is a scalar");
  const int64_t K = x.dims.back();
  if (K != static_cast<int64_t>(plan.layernorm_scale.size()) ||
      (!plan.layernorm_bias.empty() && plan.layernorm_bias.size() != plan.layernorm_scale.size()))
    throw ep::OrtError(ORT_INVALID_ARGUMENT, where + "X's last dim " + std::to_string(K) + " differs from scale's " +
                                                 std::to_string(plan.layernorm_scale.size()));
  float* y = io.output(plan.layernorm_output, x.dims);
  const int64_t rows = K ? count(x.dims) / K : 0;
  kernels::layernorm_rows(x.data, y, rows, K, plan.layernorm_scale.data(),
                          plan.layernorm_bias.empty() ? nullptr : plan.layernorm_bias.data(), plan.layernorm_epsilon);
  return Tensor{y, x.dims};
}

namespace {

void run_matmul(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch) {
  const View a = view_of(plan.layernorm_output.empty() ? io.input(plan.a.name) : layernorm_prologue(plan, io),
                         plan.a.perm);
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
  const View b2 = b_vec ? View{b.data, {b.dims[0], 1}, {1, 1}, b.bf16} : b;
  const size_t ra = a2.dims.size(), rb = b2.dims.size();
  const int64_t M = a2.dims[ra - 2], K = a2.dims[ra - 1], N = b2.dims[rb - 1];
  if (b2.dims[rb - 2] != K)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': MatMul inner dimensions differ");
  const Dims batch_a(a2.dims.begin(), a2.dims.end() - 2), batch_b(b2.dims.begin(), b2.dims.end() - 2);
  const Dims batch = broadcast_batch(batch_a, batch_b);
  Dims out_dims = batch;
  if (!a_vec) out_dims.push_back(M);
  if (!b_vec) out_dims.push_back(N);
  // A bf16 output (its Cast taken): the products write fp32 C to a buffer of the EP's, rounded into the output at
  // the end (kernels/gemm_contract.h, "Output in bfloat16"). Not collected for a runlist: the pass needs C now.
  // The cache append (OpPlan::cache_past) likewise rounds C into present, after the past.
  // The head split (OpPlan::head_split_heads) likewise rounds C into its layout.
  const bool cache = plan.cache_past.present;
  const bool head_split = plan.head_split_heads > 0;
  uint16_t* y16 = plan.output_bf16 && !head_split ? io.output_bf16(plan.output, out_dims) : nullptr;
  float* y = y16 || cache || head_split ? nullptr : io.output(plan.output, out_dims);
  const int64_t batches = count(batch);
  if (batches == 0 || M == 0 || N == 0) {
    if (cache) append_to_cache(plan, io, nullptr, out_dims);
    if (head_split) write_head_split(plan, io, nullptr, out_dims);
    return;
  }
  struct FreeEp {
    void operator()(float* p) const noexcept { kernels::ep_buffer_free(p); }
  };
  std::unique_ptr<float, FreeEp> fp32_c;
  const int64_t total = count(out_dims);
  if (y16 || cache || head_split) {
    fp32_c.reset(static_cast<float*>(kernels::ep_buffer_alloc(static_cast<size_t>(total) * sizeof(float))));
    if (!fp32_c)
      throw ep::OrtError(ORT_EP_FAIL, "node '" + plan.node_name + "': out of memory for its fp32 product");
    y = fp32_c.get();
  }
  auto finish_output = [&] {  // the host pass of a bf16 output, a cache append or a head split
    if (y16) kernels::store_bf16_as_cast(y, y16, total);
    if (cache) append_to_cache(plan, io, y, out_dims);
    if (head_split) write_head_split(plan, io, y, out_dims);
  };
  // Non-empty operands of the types the claim took (A float32; B float32, or bfloat16 through a fused Cast)
  if (K > 0 && (!a.data || (!plan.b.constant && !b.data && !b.bf16)))
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': MatMul operand of an unexpected type");

  // The epilogue (kernels/gemm_contract.h): bias and GELU per product; the residual too when it has the output's
  // shape, else (symbolic dims that broadcast at run time) added here after every product has run.
  kernels::GemmEpilogue epilogue;
  Tensor residual;  // the residual that broadcasts (data null: none)
  if (std::string why = matmul_epilogue(plan, io, N, out_dims, &epilogue, &residual); !why.empty())
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': " + why);
  const bool residual_broadcasts = residual.data != nullptr;
  auto with_epilogue = [&](kernels::GemmArgs args, int64_t row0) {
    args.epilogue = epilogue.from_row(row0);
    return args;
  };
  auto add_broadcast_residual = [&] {
    if (!residual_broadcasts) return;
    const size_t rank = out_dims.size();
    if (residual.dims.size() != rank)
      throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': residual rank differs from the output's");
    Dims rstride = contiguous_strides(residual.dims);
    for (size_t d = 0; d < rank; ++d) {
      if (residual.dims[d] == out_dims[d]) continue;
      if (residual.dims[d] != 1)
        throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': residual does not broadcast to the output");
      rstride[d] = 0;
    }
    Dims idx(rank, 0);
    for (int64_t i = 0; i < total; ++i) {
      int64_t off = 0;
      for (size_t d = 0; d < rank; ++d) off += idx[d] * rstride[d];
      y[i] += residual.data[off];
      for (size_t d = rank; d-- > 0;)
        if (++idx[d] < out_dims[d]) break;
        else idx[d] = 0;
    }
  };

  // A 2-D (or batch-broadcast) B shared by every batch of a contiguous A: one tall GEMM.
  const bool plain = plan.a.perm.empty() && plan.b.perm.empty();
  const bool tall = plain && count(batch_b) == 1 && count(batch_a) == batches;
  dispatch.note_work(tall ? 1 : batches, tall ? batches * M : M, K, N, !plan.b.constant, a2.strides[ra - 1] != 1,
                     false);
  if (tall) {
    const kernels::GemmArgs args = with_epilogue({a.data, batches * M, K, y, N}, 0);
    // A and C are io tensors nothing touches until the fused node flushes: may ride in a runlist with later nodes
    // (not when the residual is added here afterwards).
    if (plan.b.constant) dispatch.gemm_later(args, 0, residual_broadcasts || y16 || cache || head_split ? nullptr : io.deferred());
    else dispatch.gemm_runtime({{args, ep::RuntimeB{b.data, N, 1, b.bf16}}}, K, N);
    add_broadcast_residual();
    finish_output();
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
    const kernels::GemmArgs args = with_epilogue({ap, M, lda, y + i * M * N, N}, i * M);
    if (plan.b.constant) {
      constant.emplace_back(args, static_cast<size_t>(broadcast_index(batch, batch_b, i)));
    } else {
      const int64_t at = batch_offset(batch, batch_b, b_batch_strides, i);  // b2.data or b2.bf16: one is set
      runtime.emplace_back(args, ep::RuntimeB{b2.data ? b2.data + at : nullptr, b_k_stride, b_n_stride,
                                              b2.bf16 ? b2.bf16 + at : nullptr});
    }
  }
  if (plan.b.constant) dispatch.gemm_batch(constant);
  else dispatch.gemm_runtime(runtime, K, N);
  add_broadcast_residual();
  finish_output();
}

}  // namespace

void give_up_layernorm_prologue(Claim* claim, const std::string& why) {
  if (!claim->layernorm) return;
  auto& producers = claim->fused_producers;
  producers.erase(std::remove(producers.begin(), producers.end(), claim->layernorm), producers.end());
  claim->plan.a = claim->a_without_prologue;
  claim->plan.layernorm_output.clear();
  claim->layernorm = nullptr;
  claim->layernorm_scale_input = claim->layernorm_bias_input = nullptr;
  claim->reason += "; " + why;
}

extern const OpModule kMatMulModule{"", "MatMul", 1, OpPlan::Op::kMatMul, claim_matmul, run_matmul};

}  // namespace xdna::ops
