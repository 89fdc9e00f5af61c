// What the EP claims, and the plan to run it. One registry drives both GetCapability and Compile: a node is
// claimed exactly when its op's `analyze` succeeds without weights, and Compile runs the same `analyze` with
// weights, so the EP can never claim a node it cannot run.
#pragma once

#include <onnxruntime_c_api.h>

#include <memory>
#include <string>
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
};

// Constant B, packed once per matrix of its batch dimensions (2-D B: one matrix, batch_shape empty).
struct PackedWeights {
  std::vector<int64_t> batch_shape;
  std::vector<std::shared_ptr<const kernels::PackedB>> mats;
};

struct GemmPlan {
  enum class Op { kMatMul, kGemm };
  Op op = Op::kMatMul;
  std::string node_name;
  std::string op_type;
  Operand a, b, c;  // c: Gemm only
  // Gemm attributes (MatMul: the defaults)
  bool trans_a = false, trans_b = false;
  float alpha = 1.f, beta = 1.f;
  std::vector<float> c_value;  // constant C, if any (shape in c.dims)
  PackedWeights weights;       // constant B only, filled when analyze() is asked for weights
  double mflop = 0;            // per run, symbolic dims counted as 1
  bool mflop_lower_bound = false;
};

struct Analysis {
  bool ok = false;
  std::string reason;  // why not (or a note when ok)
  GemmPlan plan;
};

// Returns ok=false with a reason when the node is left to the CPU EP. With load_weights, also reads and packs
// constant weights (only valid while the OrtGraph is alive: GetCapability/Compile).
Analysis analyze_node(const OrtApi& api, const OrtNode* node, bool load_weights);

// True for op types the registry knows (whether or not a given node of that type is claimable).
bool is_gemm_family(const std::string& domain, const std::string& op_type);

}  // namespace xdna::graph
