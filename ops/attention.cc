// Attention as one node: MatMul(Q, K^T) -> [Mul/Div by a constant scalar] -> [Add(., mask)] -> Softmax(last axis)
// -> [Where(IsNaN(P), 0, P)] -> MatMul(., V), claimed at the second MatMul (the anchor) with the rest of the chain as
// its fused producers, and run as the fused attention contract (kernels/attention_contract.h): on the NPU the
// scores never leave the array, on the CPU they never reach ORT. Also taken: constant scalar Muls on Q and K^T (how
// torch's scaled_dot_product_attention exports, e.g. optimum's Whisper: the scale split as sqrt on both),
// Transposes that Q, K^T and V are read through, the Reshapes behind them that split heads (with a constant scale
// before the split) and Casts from bf16 of K^T and V; after it, the Transpose and Reshape that merge the heads
// again ([B, H, M, Dv] -> [B, M, H*Dv]), written directly. The mask Add and the NaN rule's Where are how the
// decoder's masked self-attention exports (whisper/decoder_graph.py): the mask is a run-time float input of the
// node. Every intermediate of the chain must have no reader but the chain: a Softmax that another node also reads
// (exported attention weights) leaves the pattern to the plain MatMul rule.
#include <cmath>

#include "ep_plugin/dispatch.h"
#include "ep_plugin/ort_api.h"
#include "ops/op.h"
#include "ops/transpose_fusion.h"

namespace xdna::ops {
namespace {

using Dims = std::vector<int64_t>;

// The node that produces `name` when it is an ONNX-domain `op_type` and nothing else reads `name`.
const OrtNode* sole_producer(const OrtApi& api, const GraphIndex& index, const std::string& name, const char* op_type) {
  const auto p = index.producer.find(name);
  const auto u = index.uses.find(name);
  if (p == index.producer.end() || u == index.uses.end() || u->second != 1) return nullptr;
  return is_op(api, p->second, "", op_type) ? p->second : nullptr;
}

// If `op` is made by a Mul (or, with `allow_div`, a Div) of a run-time float tensor of the same rank by a constant
// scalar, and nothing else reads it: multiplies *scale by the scalar (1/scalar for Div), redirects `op` to the
// tensor and adds the node to the claim.
void read_through_scale(const OrtApi& api, const GraphIndex& index, Operand* op, float* scale, Claim* claim,
                        bool allow_div) {
  const OrtNode* node = sole_producer(api, index, op->name, "Mul");
  const bool div = !node && allow_div;
  if (div) node = sole_producer(api, index, op->name, "Div");
  if (!node) return;
  const NodeIo io = node_io(api, node);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return;
  float s = 0.f;
  int tensor_input = 0;
  if (constant_scalar(api, io.inputs[1], op->rank, &s)) tensor_input = 0;
  else if (!div && constant_scalar(api, io.inputs[0], op->rank, &s)) tensor_input = 1;
  else return;
  if (div && s == 0.f) return;
  ONNXTensorElementDataType t;
  Operand source = describe(api, io.inputs[tensor_input], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || source.constant || source.rank != op->rank) return;
  *scale *= div ? 1.f / s : s;
  op->name = source.name;
  op->dims = source.dims;
  claim->fused_producers.push_back(node);
}

// If `probs` is Where(IsNaN(P), 0, P) with P read by that IsNaN and Where only and each of them read once: P's
// name, and the IsNaN and Where (graph order) appended to `nodes`. Else "".
std::string read_through_nan_rule(const OrtApi& api, const GraphIndex& index, const Operand& probs,
                                  std::vector<const OrtNode*>* nodes) {
  const OrtNode* where = sole_producer(api, index, probs.name, "Where");
  if (!where) return "";
  const NodeIo wio = node_io(api, where);
  if (wio.inputs.size() != 3 || !wio.inputs[0] || !wio.inputs[1] || !wio.inputs[2]) return "";
  const std::string p = value_name(api, wio.inputs[2]);
  const OrtNode* isnan = sole_producer(api, index, value_name(api, wio.inputs[0]), "IsNaN");
  if (!isnan) return "";
  const NodeIo nio = node_io(api, isnan);
  if (nio.inputs.size() != 1 || !nio.inputs[0] || value_name(api, nio.inputs[0]) != p) return "";
  float zero = 1.f;  // +0 only: a -0 weight would give -0 products where ORT's zero row gives +0
  if (!constant_scalar(api, wio.inputs[1], probs.rank, &zero) || zero != 0.f || std::signbit(zero)) return "";
  const auto u = index.uses.find(p);
  if (u == index.uses.end() || u->second != 2) return "";  // P read by the IsNaN and the Where only
  nodes->push_back(isnan);
  nodes->push_back(where);
  return p;
}

// The head split of a Q, K^T or V read through its Transpose: the Reshape that splits x's last dim into heads, and
// a constant scale on x before it (how optimum's Whisper scales Q: a scalar commutes with the split), into *scale.
void read_through_head_split_and_scale(const OrtApi& api, const GraphIndex& index, Operand* op, float* scale,
                                       Claim* claim) {
  if (!read_through_head_split(api, index, op, claim)) return;
  Operand x;  // the Reshape's input as read_through_scale sees it
  x.name = op->name;
  x.rank = op->rank - static_cast<int>(op->split.size()) + 1;
  read_through_scale(api, index, &x, scale, claim, false);
  op->name = x.name;
}

// If the attention output O [B, H, M, Dv] (`out`, its dims known from the graph) is read only by a Transpose
// (0, 2, 1, 3) read only by a Reshape to [B, M, H*Dv] (how heads are merged before out_proj): that Reshape's output
// name, the two nodes appended to claim->fused_consumers. The Reshape's shape: a constant of 3 entries keeping B and
// M (0 with allowzero unset, the dim itself, or -1) and H*Dv (itself, or the one -1). Else "".
std::string read_out_head_merge(const OrtApi& api, const GraphIndex& index, const Operand& out, Claim* claim) {
  if (out.rank != 4) return "";
  const auto readers = index.consumers.find(out.name);
  const auto uses = index.uses.find(out.name);
  if (readers == index.consumers.end() || uses == index.uses.end() || uses->second != 1) return "";
  const OrtNode* transpose = readers->second.front();
  std::vector<int64_t> perm;
  if (!is_op(api, transpose, "", "Transpose") || !ints_attr(api, transpose, "perm", &perm) ||
      perm != std::vector<int64_t>{0, 2, 1, 3})
    return "";
  const NodeIo tio = node_io(api, transpose);
  if (tio.outputs.size() != 1 || !tio.outputs[0]) return "";
  const std::string merged_in = value_name(api, tio.outputs[0]);
  const auto r2 = index.consumers.find(merged_in);
  const auto u2 = index.uses.find(merged_in);
  if (r2 == index.consumers.end() || u2 == index.uses.end() || u2->second != 1) return "";
  const OrtNode* reshape = r2->second.front();
  if (!is_op(api, reshape, "", "Reshape")) return "";
  const NodeIo rio = node_io(api, reshape);
  if (rio.inputs.size() != 2 || !rio.inputs[1] || value_name(api, rio.inputs[0]) != merged_in ||
      rio.outputs.size() != 1 || !rio.outputs[0])
    return "";
  std::vector<int64_t> shape;
  int64_t allowzero = 0;
  if (!constant_ints(api, rio.inputs[1], 3, &shape) || shape.size() != 3 ||
      !int_attr(api, reshape, "allowzero", &allowzero))
    return "";
  const int64_t B = out.dims[0], H = out.dims[1], M = out.dims[2], Dv = out.dims[3];
  int inferred = 0;
  const auto keeps = [&](int64_t s, int64_t dim) {
    if (s == 0 && allowzero == 0) return true;
    if (s == -1) return ++inferred == 1;
    return s > 0 && s == dim;  // a symbolic dim cannot be matched
  };
  const bool merges = shape[2] == -1 ? ++inferred == 1 : H > 0 && Dv > 0 && shape[2] == H * Dv;
  if (!merges || !keeps(shape[0], B) || !keeps(shape[1], M)) return "";
  claim->fused_consumers.push_back(transpose);
  claim->fused_consumers.push_back(reshape);
  return value_name(api, rio.outputs[0]);
}

// The QK^T MatMul behind `scores` (through a constant scale, which goes into *scale and `claim`), or null.
const OrtNode* qk_product(const OrtApi& api, const GraphIndex& index, Operand* scores, float* scale, Claim* claim) {
  read_through_scale(api, index, scores, scale, claim, true);
  return sole_producer(api, index, scores->name, "MatMul");
}

Claim claim_attention(const OrtApi& api, const OrtNode* pv, const GraphIndex& index) {
  Claim r;
  OpPlan& p = r.plan;
  p.op = OpPlan::Op::kAttention;
  const NodeIo io = node_io(api, pv);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return reject("MatMul without two inputs");
  if (auto why = read_float_operands(api, io, &p); !why.empty()) return reject(why);
  p.v = p.b;
  Operand probs = p.a;
  if (p.v.constant) return reject("V is a constant");
  std::vector<const OrtNode*> nan_rule;
  if (const std::string p_name = read_through_nan_rule(api, index, probs, &nan_rule); !p_name.empty()) {
    probs.name = p_name;
    p.attention_zero_nan = true;
  }
  // Under the NaN rule P has two readers (the IsNaN and the Where, checked there), else this MatMul alone.
  const OrtNode* softmax = nullptr;
  if (!p.attention_zero_nan) softmax = sole_producer(api, index, probs.name, "Softmax");
  else if (const auto it = index.producer.find(probs.name); it != index.producer.end()) softmax = it->second;
  if (!softmax || !is_op(api, softmax, "", "Softmax"))
    return reject("input A is not a Softmax (or Where(IsNaN(P), 0, P) of one) read by this MatMul only");
  const NodeIo sio = node_io(api, softmax);
  if (sio.inputs.size() != 1 || !sio.inputs[0]) return reject("Softmax without one input");
  int since = 0;
  ep::check(api, api.Node_GetSinceVersion(softmax, &since));
  int64_t axis = since >= 13 ? -1 : 1;
  if (!int_attr(api, softmax, "axis", &axis)) return reject("Softmax axis unreadable");
  // Before opset 13 Softmax flattens from `axis` on: the same as the last axis exactly when axis is the last one.
  if (probs.rank < 2 || (axis < 0 ? axis + probs.rank : axis) != probs.rank - 1)
    return reject("Softmax is not over the last axis");

  ONNXTensorElementDataType t;
  Operand scores = describe(api, sio.inputs[0], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scores.rank != probs.rank) return reject("scores not float32");
  Claim scale_claim;
  float scale = 1.f;
  const OrtNode* qk = qk_product(api, index, &scores, &scale, &scale_claim);
  const OrtNode* mask_add = qk ? nullptr : sole_producer(api, index, scores.name, "Add");
  if (mask_add) {  // Add(scores, mask) or Add(mask, scores): the side with the QK^T product is the scores
    const NodeIo aio = node_io(api, mask_add);
    if (aio.inputs.size() != 2 || !aio.inputs[0] || !aio.inputs[1]) return reject("mask Add without two inputs");
    ONNXTensorElementDataType mask_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    for (int side = 0; side < 2 && !qk; ++side) {
      scores = describe(api, aio.inputs[side], &t);
      if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scores.rank != probs.rank) continue;
      scale_claim = Claim();
      scale = 1.f;
      qk = qk_product(api, index, &scores, &scale, &scale_claim);
      if (!qk) continue;
      p.attention_mask = describe(api, aio.inputs[1 - side], &mask_type);
      p.attention_mask.present = true;
    }
    if (!qk) return reject("Softmax input is an Add of no QK^T MatMul read by the Add only");
    const Operand& mask = p.attention_mask;
    if (mask_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return reject("the attention mask is not float32");
    if (mask.constant) return reject("the attention mask is a constant initializer (only run-time masks are read)");
    if (mask.rank < 0 || mask.rank > scores.rank) return reject("the attention mask's rank exceeds the scores'");
    for (int d = 0; d < mask.rank; ++d) {  // right-aligned against QK^T's dims; symbolic ones checked at run time
      const int64_t md = mask.dims[d], sd = scores.dims[scores.rank - mask.rank + d];
      if (md != 1 && md >= 0 && sd >= 0 && md != sd) return reject("the attention mask does not broadcast to the scores");
    }
  }
  if (!qk) return reject("Softmax input is not a MatMul (or Add of a MatMul and a mask) read by the Softmax only");
  const NodeIo qio = node_io(api, qk);
  if (qio.inputs.size() != 2 || !qio.inputs[0] || !qio.inputs[1]) return reject("QK MatMul without two inputs");
  OpPlan qplan;
  if (auto why = read_float_operands(api, qio, &qplan); !why.empty()) return reject("QK MatMul: " + why);
  if (qplan.b.constant) return reject("K is a constant");
  p.a = qplan.a;
  p.b = qplan.b;
  for (Operand* op : {&p.a, &p.b}) {  // each operand's producers, found backwards, added in graph order
    Claim found;
    read_through_scale(api, index, op, &scale, &found, false);
    read_through_transpose(api, index, op, &found);
    read_through_head_split_and_scale(api, index, op, &scale, &found);
    if (op == &p.b) read_through_bf16_cast(api, index, op, &found);
    r.fused_producers.insert(r.fused_producers.end(), found.fused_producers.rbegin(), found.fused_producers.rend());
  }
  r.fused_producers.push_back(qk);
  r.fused_producers.insert(r.fused_producers.end(), scale_claim.fused_producers.begin(),
                           scale_claim.fused_producers.end());
  if (mask_add) r.fused_producers.push_back(mask_add);
  r.fused_producers.push_back(softmax);
  r.fused_producers.insert(r.fused_producers.end(), nan_rule.begin(), nan_rule.end());
  Claim v_found;
  read_through_transpose(api, index, &p.v, &v_found);
  read_through_head_split(api, index, &p.v, &v_found);  // (no scale: one on V is not the scores')
  read_through_bf16_cast(api, index, &p.v, &v_found);
  r.fused_producers.insert(r.fused_producers.end(), v_found.fused_producers.rbegin(), v_found.fused_producers.rend());
  p.attention_scale = scale;

  const int rank = p.a.rank;
  if (rank < 2 || p.b.rank != rank || p.v.rank != rank || probs.rank != rank)
    return reject("Q, K^T, V and the scores differ in rank");
  const Dims &q = p.a.dims, &kt = p.b.dims, &v = p.v.dims;
  auto differ = [](int64_t x, int64_t y) { return x >= 0 && y >= 0 && x != y; };
  if (differ(q[rank - 1], kt[rank - 2]) || differ(kt[rank - 1], v[rank - 2]))
    return reject("attention inner dimensions differ");
  bool sym = false;
  const double M = product_lower_bound(q, rank - 2, rank - 1, &sym), D = product_lower_bound(q, rank - 1, rank, &sym);
  const double T = product_lower_bound(kt, rank - 1, rank, &sym), Dv = product_lower_bound(v, rank - 1, rank, &sym);
  const double batch = std::max(product_lower_bound(q, 0, rank - 2, &sym), product_lower_bound(v, 0, rank - 2, &sym));
  p.mflop = 2.0 * batch * M * T * (D + Dv) / 1e6;
  const Operand out = describe(api, io.outputs.empty() ? nullptr : io.outputs[0], &t);
  if (const std::string merged = read_out_head_merge(api, index, out, &r); !merged.empty()) {
    p.output = merged;
    p.attention_merge_heads = true;
  }
  p.mflop_lower_bound = sym;
  r.ok = true;
  r.reason = std::string("fused attention (QK^T, ") + (mask_add ? "mask, " : "") + "softmax, " +
             (p.attention_zero_nan ? "NaN rule, " : "") + "PV in one node)";
  return r;
}

void run_attention(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch) {
  const View q = view_of(io.input(plan.a.name), plan.a);
  const View kt = view_of(io.input(plan.b.name), plan.b);
  const View v = view_of(io.input(plan.v.name), plan.v);
  const size_t r = q.dims.size();
  const auto fail = [&](const std::string& what) {
    return ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': attention " + what);
  };
  if (!q.data) throw fail("Q is not float32");
  if (r < 2 || kt.dims.size() != r || v.dims.size() != r) throw fail("operands differ in rank");
  const int64_t M = q.dims[r - 2], D = q.dims[r - 1], T = kt.dims[r - 1], Dv = v.dims[r - 1];
  if (kt.dims[r - 2] != D || v.dims[r - 2] != T) throw fail("inner dimensions differ");
  const Dims batch_q(q.dims.begin(), q.dims.end() - 2), batch_k(kt.dims.begin(), kt.dims.end() - 2),
      batch_v(v.dims.begin(), v.dims.end() - 2);
  const Dims batch = broadcast_batch(broadcast_batch(batch_q, batch_k), batch_v);
  Dims out_dims = batch;
  out_dims.push_back(M);
  out_dims.push_back(Dv);
  // Merged heads: O [B, H, M, Dv] written as [B, M, H*Dv], head (b, h)'s rows at b*M*H*Dv + h*Dv, H*Dv apart.
  int64_t per_batch_heads = 1;
  if (plan.attention_merge_heads) {
    if (batch.size() != 2) throw fail("head merge of an output that is not [B, H, M, Dv]");
    per_batch_heads = batch[1];
    out_dims = {batch[0], M, batch[1] * Dv};
  }
  float* y = io.output(plan.output, out_dims);
  int64_t heads = 1;
  for (int64_t d : batch) heads *= d;
  if (heads == 0 || M == 0 || Dv == 0) return;

  // The mask as [mask_batch..., Mm, T] (Mm: 1 or M), broadcast to the scores [batch..., M, T] without enlarging
  // them (the claim checked the dims it knew); one broadcast over the keys is expanded to T first, as the kernels
  // read mask rows with unit stride.
  Dims mask_batch, mask_bs;
  const float* mask = nullptr;
  int64_t mask_stride_m = 0;
  std::vector<float> mask_expanded;
  if (plan.attention_mask.present) {
    const Tensor mt = io.input(plan.attention_mask.name);
    if (!mt.data) throw fail("mask is not float32");
    Dims md = mt.dims;
    if (md.size() > r) throw fail("mask has a higher rank than the scores");
    while (md.size() < 2) md.insert(md.begin(), 1);
    const int64_t Mm = md[md.size() - 2], Tm = md.back();
    mask_batch.assign(md.begin(), md.end() - 2);
    bool fits = (Mm == 1 || Mm == M) && (Tm == 1 || Tm == T);
    for (size_t d = 0; d < mask_batch.size(); ++d)
      fits = fits && (mask_batch[d] == 1 || mask_batch[d] == batch[batch.size() - mask_batch.size() + d]);
    if (!fits) throw fail("mask does not broadcast to the scores without enlarging them");
    mask = mt.data;
    if (Tm != T) {  // [..., Mm, 1] -> [..., Mm, T]
      int64_t rows = 1;
      for (size_t d = 0; d + 1 < md.size(); ++d) rows *= md[d];
      mask_expanded.resize(static_cast<size_t>(rows * T));
      for (int64_t i = 0; i < rows; ++i) std::fill_n(mask_expanded.begin() + i * T, T, mt.data[i]);
      md.back() = T;
      mask = mask_expanded.data();
    }
    const Dims strides = contiguous_strides(md);
    mask_bs.assign(strides.begin(), strides.end() - 2);
    mask_stride_m = Mm == 1 ? 0 : T;
  }
  const kernels::AttentionShape shape{M, T, D, Dv, plan.attention_scale, plan.attention_zero_nan};

  // The kernels read Q rows with unit stride; a Transpose that moves Q's last dim gets Q gathered.
  const bool gather = q.strides[r - 1] != 1;
  int64_t gathered = 0;
  if (gather && (__builtin_mul_overflow(heads, M, &gathered) || __builtin_mul_overflow(gathered, D, &gathered)))
    throw fail("operand too large");
  std::vector<float> q_gathered(gather ? static_cast<size_t>(gathered) : 0);
  const Dims q_bs(q.strides.begin(), q.strides.end() - 2), k_bs(kt.strides.begin(), kt.strides.end() - 2),
      v_bs(v.strides.begin(), v.strides.end() - 2);
  dispatch.note_attention(heads, M, T, D);
  // Flat head i's K and V (fp32, or bf16 through a fused Cast) with the given Q rows and output rows.
  const auto head_at = [&](int64_t i, const float* qp, int64_t ldq, float* out, int64_t ldo) {
    const int64_t k_at = batch_offset(batch, batch_k, k_bs, i), v_at = batch_offset(batch, batch_v, v_bs, i);
    kernels::AttentionHead h{qp, ldq, kt.data ? kt.data + k_at : nullptr, kt.strides[r - 2], kt.strides[r - 1],
                             v.data ? v.data + v_at : nullptr, v.strides[r - 2], v.strides[r - 1], out, ldo};
    if (kt.bf16) h.kt_bf16 = kt.bf16 + k_at;
    if (v.bf16) h.v_bf16 = v.bf16 + v_at;
    if (mask) {
      h.mask = mask + batch_offset(batch, mask_batch, mask_bs, i);
      h.mask_stride_m = mask_stride_m;
    }
    return h;
  };
  // One query row per batch row against K and V broadcast over the outer batch dim (beams over a window's
  // batch-1 cross-attention K/V): the B rows of a head become one head of B query rows, so that each K and V is
  // read once per head instead of once per beam. Each row's arithmetic is the same either way (rows are
  // independent in the contract and in every kernel), so the bits are too. (With M = 1, merged heads [B, 1, H*Dv]
  // are the same bytes as [B, H, 1, Dv].)
  const size_t kb = batch.size() - batch_k.size(), vb = batch.size() - batch_v.size();  // right-aligned offsets
  const bool k_broadcast = kb > 0 || batch_k[0] == 1, v_broadcast = vb > 0 || batch_v[0] == 1;
  if (M == 1 && !gather && !batch.empty() && batch[0] > 1 && batch_q.size() == batch.size() && k_broadcast &&
      v_broadcast) {
    const int64_t rows = batch[0], inner = heads / rows;
    std::vector<kernels::AttentionHead> grouped;
    grouped.reserve(static_cast<size_t>(inner));
    // Row b's mask row: the outer batch dim's mask stride apart (0 where the mask is broadcast over it).
    const int64_t mask_outer = mask_batch.size() == batch.size() && mask_batch[0] != 1 ? mask_bs[0] : 0;
    for (int64_t i = 0; i < inner; ++i) {  // flat batch position i: outer index 0
      grouped.push_back(head_at(i, q.data + batch_offset(batch, batch_q, q_bs, i), q_bs[0], y + i * Dv, inner * Dv));
      grouped.back().mask_stride_m = mask_outer;
    }
    kernels::AttentionShape grouped_shape = shape;
    grouped_shape.M = rows;
    dispatch.attention(grouped_shape, grouped);
    return;
  }
  std::vector<kernels::AttentionHead> items;
  items.reserve(static_cast<size_t>(heads));
  for (int64_t i = 0; i < heads; ++i) {
    const float* qp = q.data + batch_offset(batch, batch_q, q_bs, i);
    int64_t ldq = q.strides[r - 2];
    if (gather) {
      float* dst = q_gathered.data() + i * M * D;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t d = 0; d < D; ++d) dst[m * D + d] = qp[m * q.strides[r - 2] + d * q.strides[r - 1]];
      qp = dst;
      ldq = D;
    }
    if (plan.attention_merge_heads) {
      const int64_t b = i / per_batch_heads, h = i % per_batch_heads;
      items.push_back(head_at(i, qp, ldq, y + (b * M * per_batch_heads + h) * Dv, per_batch_heads * Dv));
    } else {
      items.push_back(head_at(i, qp, ldq, y + i * M * Dv, Dv));
    }
  }
  dispatch.attention(shape, items);
}

}  // namespace

extern const OpModule kAttentionModule{"", "MatMul", 1, OpPlan::Op::kAttention, claim_attention, run_attention};

}  // namespace xdna::ops
