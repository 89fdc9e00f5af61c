#include "op_registry.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>

namespace xdna::graph {
namespace {

void check(const OrtApi& api, OrtStatus* st) {
  if (!st) return;
  std::string msg = api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  throw std::runtime_error(msg);
}

// Reads name, element type and shape of one node input (nullptr = absent optional input).
Operand describe(const OrtApi& api, const OrtValueInfo* vi, ONNXTensorElementDataType* type) {
  Operand op;
  *type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (vi == nullptr) return op;
  op.present = true;
  const char* name = nullptr;
  check(api, api.GetValueInfoName(vi, &name));
  op.name = name ? name : "";
  const OrtTypeInfo* ti = nullptr;
  check(api, api.GetValueInfoTypeInfo(vi, &ti));
  ONNXType onnx_type = ONNX_TYPE_UNKNOWN;
  if (ti) check(api, api.GetOnnxTypeFromTypeInfo(ti, &onnx_type));
  if (onnx_type == ONNX_TYPE_TENSOR) {
    const OrtTensorTypeAndShapeInfo* tsi = nullptr;
    check(api, api.CastTypeInfoToTensorInfo(ti, &tsi));
    if (tsi) {
      check(api, api.GetTensorElementType(tsi, type));
      size_t rank = 0;
      check(api, api.GetDimensionsCount(tsi, &rank));
      op.dims.resize(rank);
      check(api, api.GetDimensions(tsi, op.dims.data(), rank));
      op.rank = static_cast<int>(rank);
    }
  }
  bool is_const = false;
  check(api, api.ValueInfo_IsConstantInitializer(vi, &is_const));
  if (!is_const) {
    // If-branch subgraphs (optimum's merged decoder) use weights from the outer scope. ValueInfo_GetInitializerValue
    // also finds an initializer that is a graph input of the enclosing graph (ORT flags it an optional graph
    // input): only a default the caller may override, never a constant.
    bool outer = false, overridable = false;
    check(api, api.ValueInfo_IsFromOuterScope(vi, &outer));
    if (outer) check(api, api.ValueInfo_IsOptionalGraphInput(vi, &overridable));
    if (outer && !overridable) {
      const OrtValue* v = nullptr;
      check(api, api.ValueInfo_GetInitializerValue(vi, &v));
      is_const = v != nullptr;
    }
  }
  op.constant = is_const;
  return op;
}

// The constant's data as fp32 (copied), with its shape.
std::vector<float> read_constant(const OrtApi& api, const OrtValueInfo* vi, std::vector<int64_t>* shape) {
  const OrtValue* v = nullptr;
  check(api, api.ValueInfo_GetInitializerValue(vi, &v));
  if (!v) throw std::runtime_error("initializer value not available");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api.GetTensorTypeAndShape(v, &info));
  size_t rank = 0, count = 0;
  OrtStatus* st = api.GetDimensionsCount(info, &rank);
  if (!st) {
    shape->resize(rank);
    st = api.GetDimensions(info, shape->data(), rank);
  }
  if (!st) st = api.GetTensorShapeElementCount(info, &count);
  api.ReleaseTensorTypeAndShapeInfo(info);
  check(api, st);
  const void* data = nullptr;
  check(api, api.GetTensorData(v, &data));
  const float* f = static_cast<const float*>(data);
  return std::vector<float>(f, f + count);
}

double product_lower_bound(const std::vector<int64_t>& dims, size_t begin, size_t end, bool* symbolic) {
  double p = 1;
  for (size_t i = begin; i < end && i < dims.size(); ++i) {
    if (dims[i] < 0) *symbolic = true;
    else p *= static_cast<double>(dims[i]);
  }
  return p;
}

Analysis reject(std::string why) {
  Analysis a;
  a.reason = std::move(why);
  return a;
}

const char* dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED: return "unknown";
    default: return "non-float32";
  }
}

struct NodeIo {
  std::vector<const OrtValueInfo*> inputs, outputs;
};

NodeIo node_io(const OrtApi& api, const OrtNode* node) {
  NodeIo io;
  size_t n = 0;
  check(api, api.Node_GetNumInputs(node, &n));
  io.inputs.resize(n);
  if (n) check(api, api.Node_GetInputs(node, io.inputs.data(), n));
  check(api, api.Node_GetNumOutputs(node, &n));
  io.outputs.resize(n);
  if (n) check(api, api.Node_GetOutputs(node, io.outputs.data(), n));
  return io;
}

// Common checks: float32 operands with known rank, float32 output.
std::string check_float_operands(const OrtApi& api, const NodeIo& io, GemmPlan* plan) {
  ONNXTensorElementDataType ta, tb, ty;
  plan->a = describe(api, io.inputs[0], &ta);
  plan->b = describe(api, io.inputs[1], &tb);
  describe(api, io.outputs.empty() ? nullptr : io.outputs[0], &ty);
  for (auto [t, what] : {std::pair{ta, "A"}, {tb, "B"}, {ty, "output"}})
    if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return std::string(what) + " is " + dtype_name(t) + " (only float32 is offloaded)";
  if (plan->a.rank <= 0 || plan->b.rank <= 0) return "operand rank unknown";
  if (plan->a.constant) return "A is a constant (ORT folds or the CPU EP runs constant-only products)";
  return "";
}

// Packing pads every matrix of a constant B to kTileK x kBlockN bf16: many small matrices (a [20000, 1, 1] weight of
// 80 KB packed to 630 MB) would cost far more than the weight. Returns why such a B stays on the CPU EP, or "".
std::string packed_size_problem(const std::vector<int64_t>& shape, bool trans_b) {
  std::vector<int64_t> s = shape;
  if (s.size() == 1) s = {s[0], 1};
  if (s.size() < 2) return "constant B of rank 0";
  double batches = 1;
  for (size_t i = 0; i + 2 < s.size(); ++i) batches *= static_cast<double>(s[i]);
  const int64_t rows = s[s.size() - 2], cols = s[s.size() - 1];
  const int64_t K = trans_b ? cols : rows, N = trans_b ? rows : cols;
  if (K < 0 || N < 0) return "constant B of unknown shape";
  const kernels::PaddedShape p = kernels::padded_shape(0, K, N);
  const double packed = batches * static_cast<double>(p.Kpad) * static_cast<double>(p.Npad) * 2;
  const double weight = batches * static_cast<double>(K) * static_cast<double>(N) * 4;
  // At most 4x the fp32 weight, plus the padding of one matrix: a 2-D weight always packs (its padding is at most
  // one 64 x 256 block beyond its own size), while each matrix of a batch must pack within ~4x its own size.
  const double one_matrix = static_cast<double>(p.Kpad) * static_cast<double>(p.Npad) * 2;
  if (packed > 4 * weight + one_matrix) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "packing pads its %.0f matrices to %.3g MB, %.0fx the weight's %.3g MB", batches,
                  packed / 1e6, weight > 0 ? packed / weight : 0.0, weight / 1e6);
    return buf;
  }
  return "";
}

// Packs every matrix of a constant B of shape [..., K, N] (or [K] for 1-D B -> K x 1).
void pack_constant_b(const OrtApi& api, const OrtValueInfo* vi, bool trans_b, GemmPlan* plan) {
  std::vector<int64_t> shape;
  const std::vector<float> data = read_constant(api, vi, &shape);
  if (shape.size() == 1) shape = {shape[0], 1};
  const int64_t rows = shape[shape.size() - 2], cols = shape[shape.size() - 1];
  const int64_t K = trans_b ? cols : rows, N = trans_b ? rows : cols;
  plan->weights.batch_shape.assign(shape.begin(), shape.end() - 2);
  int64_t batches = 1;
  for (int64_t d : plan->weights.batch_shape) batches *= d;
  for (int64_t i = 0; i < batches; ++i) {
    const float* m = data.data() + i * rows * cols;
    plan->weights.mats.push_back(std::make_shared<const kernels::PackedB>(
        trans_b ? kernels::pack_b(m, K, N, 1, K) : kernels::pack_b(m, K, N, N, 1)));
  }
}

std::string value_name(const OrtApi& api, const OrtValueInfo* vi) {
  const char* name = nullptr;
  if (vi) check(api, api.GetValueInfoName(vi, &name));
  return name ? name : "";
}

// Node attributes. Each reader returns false when the attribute is present but cannot be read as that type, and
// leaves `*out` (the default) untouched when it is absent.
const OrtOpAttr* find_attr(const OrtApi& api, const OrtNode* node, const char* name) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = api.Node_GetAttributeByName(node, name, &attr);
  if (st) api.ReleaseStatus(st);
  return st ? nullptr : attr;
}

bool read_attr(const OrtApi& api, const OrtOpAttr* attr, OrtOpAttrType type, void* data, size_t bytes, size_t* out) {
  OrtStatus* st = api.ReadOpAttr(attr, type, data, bytes, out);
  if (st) api.ReleaseStatus(st);
  return st == nullptr;
}

template <class T>
bool scalar_attr(const OrtApi& api, const OrtNode* node, const char* name, OrtOpAttrType type, T* out) {
  const OrtOpAttr* attr = find_attr(api, node, name);
  size_t n = 0;
  return !attr || read_attr(api, attr, type, out, sizeof *out, &n);
}

bool ints_attr(const OrtApi& api, const OrtNode* node, const char* name, std::vector<int64_t>* out) {
  const OrtOpAttr* attr = find_attr(api, node, name);
  if (!attr) return true;
  size_t bytes = 0;
  read_attr(api, attr, ORT_OP_ATTR_INTS, nullptr, 0, &bytes);  // asks for the size (in bytes)
  out->assign(bytes / sizeof(int64_t), 0);
  return out->empty() || read_attr(api, attr, ORT_OP_ATTR_INTS, out->data(), bytes, &bytes);
}

bool string_attr(const OrtApi& api, const OrtNode* node, const char* name, std::string* out) {
  const OrtOpAttr* attr = find_attr(api, node, name);
  if (!attr) return true;
  char buf[64] = {};
  size_t n = 0;
  if (!read_attr(api, attr, ORT_OP_ATTR_STRING, buf, sizeof buf - 1, &n)) return false;
  out->assign(buf, std::min(n, sizeof buf - 1));
  return true;
}

// If operand `op` (of rank >= 2, computed at run time) is the output of a float Transpose whose only use is this
// MatMul, redirect it to the Transpose's input and record the permutation and the node.
void read_through_transpose(const OrtApi& api, const GraphIndex* index, Operand* op, Analysis* r) {
  if (!index || op->constant || op->rank < 2) return;
  const auto it = index->producer.find(op->name);
  const auto uses = index->uses.find(op->name);
  if (it == index->producer.end() || uses == index->uses.end() || uses->second != 1) return;
  const OrtNode* producer = it->second;
  const char* type = nullptr;
  const char* domain = nullptr;
  check(api, api.Node_GetOperatorType(producer, &type));
  check(api, api.Node_GetDomain(producer, &domain));
  if (std::strcmp(type, "Transpose") != 0 || std::strcmp(domain, "") != 0) return;
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
  r->fused_producers.push_back(producer);
}

Analysis analyze_matmul(const OrtApi& api, const OrtNode* node, bool load_weights, const GraphIndex* index) {
  Analysis r;
  GemmPlan& p = r.plan;
  p.op = GemmPlan::Op::kMatMul;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() != 2 || !io.inputs[0] || !io.inputs[1]) return reject("MatMul without two inputs");
  if (auto why = check_float_operands(api, io, &p); !why.empty()) return reject(why);
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
  if (p.b.constant)
    if (auto why = packed_size_problem(p.b.dims, false); !why.empty()) return reject(why);
  if (p.b.constant && load_weights) pack_constant_b(api, io.inputs[1], false, &p);
  read_through_transpose(api, index, &p.a, &r);
  read_through_transpose(api, index, &p.b, &r);
  r.ok = true;
  r.reason = p.b.constant ? "constant weight" : "both operands at run time";
  if (!r.fused_producers.empty()) r.reason += ", with the Transpose of its input(s)";
  return r;
}

Analysis analyze_gemm(const OrtApi& api, const OrtNode* node, bool load_weights, const GraphIndex*) {
  Analysis r;
  GemmPlan& p = r.plan;
  p.op = GemmPlan::Op::kGemm;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() < 2 || !io.inputs[0] || !io.inputs[1]) return reject("Gemm without A and B");
  if (auto why = check_float_operands(api, io, &p); !why.empty()) return reject(why);
  if (p.a.rank != 2 || p.b.rank != 2) return reject("Gemm operands are not 2-D");
  // A Gemm attribute of the wrong type makes the model invalid: an error, not a node left to the CPU.
  auto int_attr = [&](const char* name, int64_t dflt) {
    if (!scalar_attr(api, node, name, ORT_OP_ATTR_INT, &dflt)) throw std::runtime_error(std::string("unreadable Gemm attribute ") + name);
    return dflt;
  };
  auto float_attr = [&](const char* name, float dflt) {
    if (!scalar_attr(api, node, name, ORT_OP_ATTR_FLOAT, &dflt)) throw std::runtime_error(std::string("unreadable Gemm attribute ") + name);
    return dflt;
  };
  p.trans_a = int_attr("transA", 0) != 0;
  p.trans_b = int_attr("transB", 0) != 0;
  p.alpha = float_attr("alpha", 1.f);
  p.beta = float_attr("beta", 1.f);
  if (io.inputs.size() >= 3 && io.inputs[2]) {
    ONNXTensorElementDataType tc;
    p.c = describe(api, io.inputs[2], &tc);
    if (tc != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return reject(std::string("C is ") + dtype_name(tc));
    if (p.c.rank > 2) return reject("C has rank > 2");
    if (p.c.constant && load_weights) {
      std::vector<int64_t> shape;
      p.c_value = read_constant(api, io.inputs[2], &shape);
      p.c.dims = shape;
      p.c.rank = static_cast<int>(shape.size());
    }
  }
  bool sym = false;
  const auto& a = p.a.dims;
  const auto& b = p.b.dims;
  const double M = product_lower_bound(a, p.trans_a ? 1 : 0, p.trans_a ? 2 : 1, &sym);
  const double K = product_lower_bound(a, p.trans_a ? 0 : 1, p.trans_a ? 1 : 2, &sym);
  const double N = product_lower_bound(b, p.trans_b ? 0 : 1, p.trans_b ? 1 : 2, &sym);
  p.mflop = 2.0 * M * K * N / 1e6;
  p.mflop_lower_bound = sym;
  if (p.b.constant)
    if (auto why = packed_size_problem(p.b.dims, p.trans_b); !why.empty()) return reject(why);
  if (p.b.constant && load_weights) pack_constant_b(api, io.inputs[1], p.trans_b, &p);
  r.ok = true;
  r.reason = p.b.constant ? "constant weight" : "both operands at run time";
  return r;
}

// Conv over one spatial dimension (Whisper's encoder front end), group 1, constant weights: a GEMM with the
// weights as the packed B. Anything else stays on the CPU EP.
Analysis analyze_conv(const OrtApi& api, const OrtNode* node, bool load_weights, const GraphIndex*) {
  Analysis r;
  GemmPlan& p = r.plan;
  p.op = GemmPlan::Op::kConv;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() < 2 || !io.inputs[0] || !io.inputs[1]) return reject("Conv without X and W");
  if (auto why = check_float_operands(api, io, &p); !why.empty()) return reject(why);
  if (p.a.rank != 3 || p.b.rank != 3) return reject("not a 1-D convolution (X and W of rank 3)");
  if (!p.b.constant) return reject("weights computed at run time");
  std::string auto_pad = "NOTSET";
  if (!string_attr(api, node, "auto_pad", &auto_pad)) return reject("unreadable auto_pad");
  if (auto_pad != "NOTSET" && auto_pad != "VALID") return reject("auto_pad " + auto_pad);
  int64_t group = 1;
  std::vector<int64_t> strides{1}, dilations{1}, pads{0, 0}, kernel_shape;
  if (!scalar_attr(api, node, "group", ORT_OP_ATTR_INT, &group)) return reject("unreadable group");
  if (group != 1) return reject("grouped convolution (group " + std::to_string(group) + ")");
  // What ORT's CPU EP refuses (at session creation or run time) is left to it, so the user gets its error.
  if (auto_pad != "NOTSET" && find_attr(api, node, "pads"))
    return reject("auto_pad " + auto_pad + " together with pads (the CPU EP refuses this)");
  if (!ints_attr(api, node, "strides", &strides) || !ints_attr(api, node, "dilations", &dilations) ||
      !ints_attr(api, node, "pads", &pads) || !ints_attr(api, node, "kernel_shape", &kernel_shape))
    return reject("unreadable attributes");
  if (strides.size() != 1 || dilations.size() != 1 || pads.size() != 2 || kernel_shape.size() > 1)
    return reject("attributes do not describe a 1-D convolution");
  const auto& w = p.b.dims;  // [Cout, Cin, k]
  if (w[0] <= 0 || w[1] <= 0 || w[2] <= 0) return reject("weight shape unknown");
  if (!kernel_shape.empty() && kernel_shape[0] != w[2])
    return reject("kernel_shape differs from W's (the CPU EP refuses this)");
  if (p.a.dims[1] >= 0 && p.a.dims[1] != w[1]) return reject("X channels differ from W");
  constexpr int64_t kMaxAttr = int64_t{1} << 31;
  if (strides[0] < 1 || dilations[0] < 1 || pads[0] < 0 || pads[1] < 0 || strides[0] > kMaxAttr ||
      dilations[0] > kMaxAttr || pads[0] > kMaxAttr || pads[1] > kMaxAttr)
    return reject("bad strides/dilations/pads");
  int64_t span = 0;  // dilation * (k - 1) + 1
  if (__builtin_mul_overflow(dilations[0], w[2] - 1, &span) || span > (int64_t{1} << 62))
    return reject("dilated kernel too long");
  ++span;
  if (p.a.dims[2] >= 0 && p.a.dims[2] + pads[0] + pads[1] < span)
    return reject("output length below 1 (the CPU EP refuses this input)");
  if (auto why = packed_size_problem({w[1] * w[2], w[0]}, false); !why.empty()) return reject(why);
  ConvParams& c = p.conv;
  c.out_channels = w[0];
  c.in_channels = w[1];
  c.kernel = w[2];
  c.stride = strides[0];
  c.dilation = dilations[0];
  c.pad_begin = pads[0];
  c.pad_end = pads[1];
  if (io.inputs.size() >= 3 && io.inputs[2]) {
    ONNXTensorElementDataType tc;
    p.c = describe(api, io.inputs[2], &tc);
    if (tc != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !p.c.constant) return reject("bias is not a float constant");
    if (load_weights) {
      std::vector<int64_t> shape;
      p.c_value = read_constant(api, io.inputs[2], &shape);
      if (static_cast<int64_t>(p.c_value.size()) != c.out_channels) return reject("bias size differs from Cout");
    }
  }
  bool sym = false;
  const double t_in = product_lower_bound(p.a.dims, 2, 3, &sym);
  const double t_out = std::max(1.0, std::floor((t_in + c.pad_begin + c.pad_end - c.dilation * (c.kernel - 1) - 1) /
                                                c.stride) + 1);
  const double batch = product_lower_bound(p.a.dims, 0, 1, &sym);
  p.mflop = 2.0 * batch * t_out * static_cast<double>(c.in_channels * c.kernel * c.out_channels) / 1e6;
  p.mflop_lower_bound = sym;
  if (load_weights) {
    // W [Cout, Cin, k] is W^T of the GEMM: B[ci*k + kk][co] = W[co][ci][kk].
    std::vector<int64_t> shape;
    const std::vector<float> data = read_constant(api, io.inputs[1], &shape);
    const int64_t K = c.in_channels * c.kernel;
    p.weights.mats.push_back(std::make_shared<const kernels::PackedB>(kernels::pack_b(data.data(), K, c.out_channels, 1, K)));
  }
  r.ok = true;
  r.reason = "1-D convolution as a GEMM (constant weight)";
  return r;
}

struct OpEntry {
  const char* domain;
  const char* op_type;
  int min_since_version;
  Analysis (*analyze)(const OrtApi&, const OrtNode*, bool, const GraphIndex*);
};

// The registry. Adding an op = one analyze function here + its execution in ep_plugin/compute.cc.
constexpr OpEntry kOps[] = {
    {"", "MatMul", 1, analyze_matmul},
    {"", "Gemm", 1, analyze_gemm},
    {"", "Conv", 1, analyze_conv},
};

}  // namespace

bool is_gemm_family(const std::string& domain, const std::string& op_type) {
  for (const auto& e : kOps)
    if (domain == e.domain && op_type == e.op_type) return true;
  return false;
}

GraphIndex GraphIndex::of(const OrtApi& api, const OrtGraph* graph) {
  GraphIndex index;
  size_t n = 0;
  check(api, api.Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(api, api.Graph_GetNodes(graph, nodes.data(), n));
  for (const OrtNode* node : nodes) {
    NodeIo io = node_io(api, node);
    for (const OrtValueInfo* vi : io.outputs)
      if (vi) index.producer[value_name(api, vi)] = node;
    for (const OrtValueInfo* vi : io.inputs)
      if (vi) ++index.uses[value_name(api, vi)];
    size_t implicit = 0;
    check(api, api.Node_GetNumImplicitInputs(node, &implicit));
    std::vector<const OrtValueInfo*> implicit_inputs(implicit);
    if (implicit) check(api, api.Node_GetImplicitInputs(node, implicit_inputs.data(), implicit));
    for (const OrtValueInfo* vi : implicit_inputs)
      if (vi) ++index.uses[value_name(api, vi)];
  }
  size_t outputs = 0;
  check(api, api.Graph_GetNumOutputs(graph, &outputs));
  std::vector<const OrtValueInfo*> graph_outputs(outputs);
  if (outputs) check(api, api.Graph_GetOutputs(graph, graph_outputs.data(), outputs));
  for (const OrtValueInfo* vi : graph_outputs)
    if (vi) ++index.uses[value_name(api, vi)];
  return index;
}

Analysis analyze_node(const OrtApi& api, const OrtNode* node, bool load_weights, const GraphIndex* index) {
  const char* op_type = nullptr;
  const char* domain = nullptr;
  const char* name = nullptr;
  int since = 0;
  check(api, api.Node_GetOperatorType(node, &op_type));
  check(api, api.Node_GetDomain(node, &domain));
  check(api, api.Node_GetName(node, &name));
  check(api, api.Node_GetSinceVersion(node, &since));
  for (const auto& e : kOps) {
    if (std::strcmp(domain, e.domain) != 0 || std::strcmp(op_type, e.op_type) != 0) continue;
    if (since < e.min_since_version) return reject("opset too old");
    Analysis r = e.analyze(api, node, load_weights, index);
    r.plan.node_name = name ? name : "";
    r.plan.op_type = op_type;
    const NodeIo io = node_io(api, node);
    if (r.ok && (io.outputs.size() != 1 || !io.outputs[0])) {
      r.ok = false;
      r.reason = std::string(op_type) + " without exactly one output";
    }
    if (r.ok) r.plan.output = value_name(api, io.outputs[0]);
    return r;
  }
  return reject(std::string("op ") + op_type + " is not a GEMM");
}

}  // namespace xdna::graph
