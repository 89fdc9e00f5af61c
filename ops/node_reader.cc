#include "ops/node_reader.h"

#include "ep_plugin/ort_api.h"
#include "ops/op.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>

namespace xdna::ops {

using ep::check;


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

std::string value_name(const OrtApi& api, const OrtValueInfo* vi) {
  const char* name = nullptr;
  if (vi) check(api, api.GetValueInfoName(vi, &name));
  return name ? name : "";
}

namespace {

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

}  // namespace

bool has_attr(const OrtApi& api, const OrtNode* node, const char* name) { return find_attr(api, node, name) != nullptr; }
bool int_attr(const OrtApi& api, const OrtNode* node, const char* name, int64_t* out) {
  return scalar_attr(api, node, name, ORT_OP_ATTR_INT, out);
}
bool float_attr(const OrtApi& api, const OrtNode* node, const char* name, float* out) {
  return scalar_attr(api, node, name, ORT_OP_ATTR_FLOAT, out);
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

bool constant_scalar(const OrtApi& api, const OrtValueInfo* vi, int max_rank, float* value) {
  ONNXTensorElementDataType t;
  const Operand c = describe(api, vi, &t);
  if (!c.constant || t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.rank < 0 || c.rank > max_rank) return false;
  for (int64_t d : c.dims)
    if (d != 1) return false;
  std::vector<int64_t> shape;
  const std::vector<float> v = read_constant(api, vi, &shape);
  if (v.size() != 1 || !std::isfinite(v[0])) return false;
  *value = v[0];
  return true;
}

bool constant_ints(const OrtApi& api, const OrtValueInfo* vi, size_t max_count, std::vector<int64_t>* values) {
  ONNXTensorElementDataType t;
  const Operand c = describe(api, vi, &t);
  if (!c.constant || t != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || c.rank != 1 || c.dims[0] < 0 ||
      static_cast<size_t>(c.dims[0]) > max_count)
    return false;
  const OrtValue* v = nullptr;
  check(api, api.ValueInfo_GetInitializerValue(vi, &v));
  if (!v) return false;
  const void* data = nullptr;
  check(api, api.GetTensorData(v, &data));
  const int64_t* p = static_cast<const int64_t*>(data);
  values->assign(p, p + c.dims[0]);
  return true;
}

bool is_op(const OrtApi& api, const OrtNode* node, const char* domain, const char* type) {
  const char* t = nullptr;
  const char* d = nullptr;
  check(api, api.Node_GetOperatorType(node, &t));
  check(api, api.Node_GetDomain(node, &d));
  return std::strcmp(t, type) == 0 && std::strcmp(d, domain) == 0;
}

const OrtNode* only_reader(const GraphIndex& index, const std::string& value) {
  const auto uses = index.uses.find(value);
  const auto readers = index.consumers.find(value);
  if (uses == index.uses.end() || uses->second != 1 || readers == index.consumers.end() || readers->second.size() != 1)
    return nullptr;
  return readers->second[0];
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
      if (vi) {
        const std::string name = value_name(api, vi);
        ++index.uses[name];
        auto& readers = index.consumers[name];
        if (readers.empty() || readers.back() != node) readers.push_back(node);
      }
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

}  // namespace xdna::ops
