// Reading ONNX nodes through the ORT C API, for the claim rules: operands (type, shape, constness), attributes,
// constant data (Compile only), and which node produces and how often each value of a graph is used.
#pragma once

#include <onnxruntime_c_api.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace xdna::ops {

struct Operand;

struct NodeIo {
  std::vector<const OrtValueInfo*> inputs, outputs;
};
NodeIo node_io(const OrtApi& api, const OrtNode* node);

// Name, element type, shape and constness of one value (nullptr = absent optional input: present=false).
Operand describe(const OrtApi& api, const OrtValueInfo* vi, ONNXTensorElementDataType* type);
std::string value_name(const OrtApi& api, const OrtValueInfo* vi);
const char* dtype_name(ONNXTensorElementDataType t);

// The constant's data as fp32 (copied), with its shape. Only valid while the OrtGraph is alive (Compile).
std::vector<float> read_constant(const OrtApi& api, const OrtValueInfo* vi, std::vector<int64_t>* shape);

// A finite float32 constant of one element and rank <= max_rank: its value. The one kind of constant data a claim
// rule reads (an attention's scale, a decomposed GELU's constants): one float is free to read.
bool constant_scalar(const OrtApi& api, const OrtValueInfo* vi, int max_rank, float* value);

// A 1-D int64 constant of at most max_count elements (a Reshape's shape): its values. Small enough to read at claim
// time, like constant_scalar.
bool constant_ints(const OrtApi& api, const OrtValueInfo* vi, size_t max_count, std::vector<int64_t>* values);

// Whether `node` is `type` in `domain` ("" = ONNX).
bool is_op(const OrtApi& api, const OrtNode* node, const char* domain, const char* type);

// Product of dims[begin, end), symbolic dims (-1) counted as 1 and flagged in *symbolic.
double product_lower_bound(const std::vector<int64_t>& dims, size_t begin, size_t end, bool* symbolic);

// Node attributes. Each reader returns false when the attribute is present but cannot be read as that type, and
// leaves `*out` (the default) untouched when it is absent.
bool has_attr(const OrtApi& api, const OrtNode* node, const char* name);
bool int_attr(const OrtApi& api, const OrtNode* node, const char* name, int64_t* out);
bool float_attr(const OrtApi& api, const OrtNode* node, const char* name, float* out);
bool ints_attr(const OrtApi& api, const OrtNode* node, const char* name, std::vector<int64_t>* out);
bool string_attr(const OrtApi& api, const OrtNode* node, const char* name, std::string* out);

// Who produces and how often each value of one graph is used (node inputs, subgraph implicit inputs and graph
// outputs all count), so that an operand can be read through the Transpose that made it.
struct GraphIndex {
  std::unordered_map<std::string, const OrtNode*> producer;
  std::unordered_map<std::string, int> uses;
  // The nodes that read each value (as a node input): a product's epilogue extends over its one consumer.
  std::unordered_map<std::string, std::vector<const OrtNode*>> consumers;
  static GraphIndex of(const OrtApi& api, const OrtGraph* graph);
};

// The node that alone reads `value` (and nothing else does: no second reader, not a graph output), or null.
const OrtNode* only_reader(const GraphIndex& index, const std::string& value);

}  // namespace xdna::ops
