// What the EP claims, and the plan to run it. One registry drives both GetCapability and Compile: a node is
// claimed exactly when its op's `analyze` succeeds without weights, and Compile runs the same `analyze` with
// weights, so the EP can never claim a node it cannot run.
#pragma once

#include <onnxruntime_c_api.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/backend.h"

namespace xdna::graph {

// Where an operand comes from when the fused node runs.
struct Operand {
  std::string name;
  bool present = false;   // optional inputs (Gemm's C) may be absent
  bool constant = false;  // constant initializer: read once at Compile, not a runtime input
  int rank = -1;
  std::vector<int64_t> dims;  // -1 for symbolic dims
  // Read through a Transpose fused into the same partition: `name` is the Transpose's input and the operand is
  // that tensor with its dims permuted (operand dim d = input dim perm[d]). Empty: the tensor as it is.
  std::vector<int64_t> perm;
};

// Constant B, packed once per matrix of its batch dimensions (2-D B: one matrix, batch_shape empty).
struct PackedWeights {
  std::vector<int64_t> batch_shape;
  std::vector<std::shared_ptr<const kernels::PackedB>> mats;
};

// 1-D convolution run as a GEMM: Y[n]^T [T_out, Cout] = im2col(X[n]) [T_out, Cin*k] . W^T [Cin*k, Cout].
struct ConvParams {
  int64_t in_channels = 0, out_channels = 0, kernel = 0;
  int64_t stride = 1, dilation = 1, pad_begin = 0, pad_end = 0;
};

struct GemmPlan {
  enum class Op { kMatMul, kGemm, kConv };
  Op op = Op::kMatMul;
  std::string node_name;
  std::string op_type;
  std::string output;  // the node's output value
  Operand a, b, c;  // c: Gemm only
  // Gemm attributes (MatMul: the defaults)
  bool trans_a = false, trans_b = false;
  float alpha = 1.f, beta = 1.f;
  std::vector<float> c_value;  // constant C (Gemm) or bias (Conv), if any (shape in c.dims)
  ConvParams conv;             // Conv only
  PackedWeights weights;       // constant B only, filled when analyze() is asked for weights
  double mflop = 0;            // per run, symbolic dims counted as 1
  bool mflop_lower_bound = false;
};

struct Analysis {
  bool ok = false;
  std::string reason;  // why not (or a note when ok)
  GemmPlan plan;
  // Transpose nodes whose only consumer is this node: claimed with it, so the permuted copy is never made
  // (the kernels read the operand through strides). MatMul only.
  std::vector<const OrtNode*> fused_producers;
};

// Who produces and how often each value of one graph is used (node inputs, subgraph implicit inputs and graph
// outputs all count), so that an operand can be read through the Transpose that made it.
struct GraphIndex {
  std::unordered_map<std::string, const OrtNode*> producer;
  std::unordered_map<std::string, int> uses;
  static GraphIndex of(const OrtApi& api, const OrtGraph* graph);
};

// Returns ok=false with a reason when the node is left to the CPU EP. With load_weights, also reads and packs
// constant weights (only valid while the OrtGraph is alive: GetCapability/Compile). With an index of the node's
// graph, MatMul operands made by a Transpose used only there are read through it (Analysis::fused_producers).
Analysis analyze_node(const OrtApi& api, const OrtNode* node, bool load_weights, const GraphIndex* index = nullptr);

// True for op types the registry knows (whether or not a given node of that type is claimable).
bool is_gemm_family(const std::string& domain, const std::string& op_type);

}  // namespace xdna::graph
