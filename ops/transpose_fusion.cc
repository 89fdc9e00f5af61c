#include "ops/transpose_fusion.h"

#include <algorithm>

#include "ep_plugin/ort_api.h"

namespace xdna::ops {

void read_through_transpose(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim) {
  if (op->constant || op->rank < 2) return;
  const auto it = index.producer.find(op->name);
  const auto uses = index.uses.find(op->name);
  if (it == index.producer.end() || uses == index.uses.end() || uses->second != 1) return;
  const OrtNode* producer = it->second;
  if (!is_op(api, producer, "", "Transpose")) return;
  NodeIo io = node_io(api, producer);
  if (io.inputs.size() != 1 || !io.inputs[0]) return;
  ONNXTensorElementDataType t;
  Operand source = describe(api, io.inputs[0], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || source.rank != op->rank || source.constant) return;
  std::vector<int64_t> perm(static_cast<size_t>(op->rank));
  for (int d = 0; d < op->rank; ++d) perm[d] = op->rank - 1 - d;  // ONNX default: reverse
  if (!ints_attr(api, producer, "perm", &perm) || perm.size() != static_cast<size_t>(op->rank)) return;
  std::vector<bool> seen(perm.size(), false);
  for (int64_t p : perm) {
    if (p < 0 || p >= op->rank || seen[static_cast<size_t>(p)]) return;
    seen[static_cast<size_t>(p)] = true;
  }
  op->name = source.name;
  op->perm = std::move(perm);
  claim->fused_producers.push_back(producer);
}

void read_through_bf16_cast(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim) {
  if (op->constant) return;
  const auto it = index.producer.find(op->name);
  const auto uses = index.uses.find(op->name);
  if (it == index.producer.end() || uses == index.uses.end() || uses->second != 1) return;
  const OrtNode* cast = it->second;
  int64_t to = 0;
  if (!is_op(api, cast, "", "Cast") || !int_attr(api, cast, "to", &to) || to != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    return;
  const NodeIo io = node_io(api, cast);
  if (io.inputs.size() != 1 || !io.inputs[0]) return;
  ONNXTensorElementDataType t;
  Operand source = describe(api, io.inputs[0], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 || source.constant || source.rank != op->rank) return;
  op->name = source.name;  // a Cast keeps the shape: dims (and a Transpose's perm read before) stay
  claim->fused_producers.push_back(cast);
}

bool head_split_of(const OrtApi& api, const OrtNode* reshape, const Operand& x, int64_t* heads, int64_t* depth) {
  if (!is_op(api, reshape, "", "Reshape") || x.rank < 1) return false;
  const NodeIo io = node_io(api, reshape);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return false;
  std::vector<int64_t> shape;
  const size_t rank = static_cast<size_t>(x.rank) + 1;
  if (!constant_ints(api, io.inputs[1], rank, &shape) || shape.size() != rank) return false;
  int64_t allowzero = 0;
  if (!int_attr(api, reshape, "allowzero", &allowzero)) return false;
  const int64_t h = shape[rank - 2], d = shape.back();
  if (h <= 0 || d <= 0) return false;
  const int64_t last = x.dims.back();
  if (last >= 0 && last != h * d) return false;
  int inferred = 0;
  for (int i = 0; i + 1 < x.rank; ++i) {  // x's leading dims, kept
    const int64_t s = shape[static_cast<size_t>(i)];
    if (s == 0 && allowzero == 0) continue;
    if (s == -1 && ++inferred == 1) continue;
    if (s <= 0 || s != x.dims[static_cast<size_t>(i)]) return false;  // a symbolic x dim cannot be matched
  }
  *heads = h;
  *depth = d;
  return true;
}

bool read_through_head_split(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim) {
  if (op->constant || op->rank < 2 || !op->split.empty()) return false;
  const auto it = index.producer.find(op->name);
  const auto uses = index.uses.find(op->name);
  if (it == index.producer.end() || uses == index.uses.end() || uses->second != 1) return false;
  const OrtNode* reshape = it->second;
  if (!is_op(api, reshape, "", "Reshape")) return false;
  const NodeIo io = node_io(api, reshape);
  if (io.inputs.size() != 2 || !io.inputs[0]) return false;
  ONNXTensorElementDataType t;
  const Operand x = describe(api, io.inputs[0], &t);
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.constant || x.rank < 1 || x.rank + 1 != op->rank) return false;
  int64_t heads = 0, depth = 0;
  if (!head_split_of(api, reshape, x, &heads, &depth)) return false;
  op->name = x.name;
  op->split = {heads, depth};
  claim->fused_producers.push_back(reshape);
  return true;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& dims) {
  std::vector<int64_t> strides(dims.size());
  int64_t s = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    strides[i] = s;
    s *= dims[i];
  }
  return strides;
}

View view_of(const Tensor& t, const std::vector<int64_t>& perm) {
  View v{t.data, t.dims, contiguous_strides(t.dims), t.bf16};
  if (perm.empty()) return v;
  if (perm.size() != t.dims.size())
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "Transpose perm does not match its input");
  View p{t.data, std::vector<int64_t>(perm.size()), std::vector<int64_t>(perm.size()), t.bf16};
  for (size_t d = 0; d < perm.size(); ++d) {
    p.dims[d] = v.dims[static_cast<size_t>(perm[d])];
    p.strides[d] = v.strides[static_cast<size_t>(perm[d])];
  }
  return p;
}

View view_of(const Tensor& t, const Operand& op) {
  if (op.split.empty()) return view_of(t, op.perm);
  int64_t split = 1;
  for (int64_t d : op.split) split *= d;
  if (t.dims.empty() || t.dims.back() != split) {
    const std::string last = t.dims.empty() ? std::string("absent") : std::to_string(t.dims.back());
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "input '" + op.name + "' of a fused Reshape: its last dim is " + last +
                                                 ", the Reshape splits " + std::to_string(split));
  }
  Tensor s = t;  // a contiguous tensor with its last dim split is the same bytes
  s.dims.pop_back();
  s.dims.insert(s.dims.end(), op.split.begin(), op.split.end());
  return view_of(s, op.perm);
}

using Dims = std::vector<int64_t>;

Dims broadcast_batch(const Dims& a, const Dims& b) {
  Dims out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t da = i < out.size() - a.size() ? 1 : a[i - (out.size() - a.size())];
    const int64_t db = i < out.size() - b.size() ? 1 : b[i - (out.size() - b.size())];
    if (da != db && da != 1 && db != 1)
      throw ep::OrtError(ORT_INVALID_ARGUMENT, "MatMul batch dimensions do not broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

int64_t broadcast_index(const Dims& out, const Dims& dims, int64_t pos) {
  int64_t idx = 0, stride = 1;
  for (size_t i = out.size(); i-- > 0;) {
    const int64_t coord = pos % out[i];
    pos /= out[i];
    const size_t offset = out.size() - dims.size();
    if (i >= offset) {
      const int64_t d = dims[i - offset];
      if (d != 1) idx += coord * stride;
      stride *= d;
    }
  }
  return idx;
}

int64_t batch_offset(const Dims& out, const Dims& dims, const Dims& strides, int64_t pos) {
  int64_t offset = 0;
  const size_t shift = out.size() - dims.size();
  for (size_t i = out.size(); i-- > 0;) {
    const int64_t coord = pos % out[i];
    pos /= out[i];
    if (i >= shift && dims[i - shift] != 1) offset += coord * strides[i - shift];
  }
  return offset;
}

}  // namespace xdna::ops
