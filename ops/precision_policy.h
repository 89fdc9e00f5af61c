// Which precision each claimed node computes in (gemm_contract.h, "Precision modes"): the session's `precision`
// option, refined per node by `precision_policy` rules. Decided at claim time, stored in the plan (OpPlan).
//
// Rules: "MODE:SELECTOR[,SELECTOR...]" separated by ';', tried in order, the first whose selectors all match a
// node gives its precision; a node no rule matches gets the `precision` option's mode.
//   MODE      bf16 | int8 | bf16x3
//   SELECTOR  op=GLOB       the node's op type (MatMul, Gemm, Conv)
//             name=GLOB     the node's name (shell glob: * ? [...])
//             weight=constant | weight=runtime   whether B is a constant initializer
//             *             every node
// e.g. "bf16:name=*proj_out*;int8:weight=constant". int8 applies to constant weights only (the contract keeps a
// run-time B in bf16), so a node with a run-time B that a rule puts in int8 computes in bf16, and says so.
#pragma once

#include <string>
#include <vector>

#include "kernels/gemm_contract.h"

namespace xdna::ops {

struct PrecisionRule {
  kernels::Precision precision = kernels::Precision::kBf16;
  std::string op_glob = "*", name_glob = "*";
  int weight = -1;   // -1 any, 0 run-time B, 1 constant B
  std::string text;  // the rule as written, for the report
};

struct PrecisionPolicy {
  kernels::Precision fallback = kernels::Precision::kBf16;
  std::vector<PrecisionRule> rules;

  // Parses `rules` (see above). Throws std::invalid_argument naming the bad rule and what is accepted.
  static PrecisionPolicy parse(kernels::Precision fallback, const std::string& rules);
  // The requested mode for a node and the rule that chose it ("" when the fallback did).
  kernels::Precision choose(const std::string& op_type, const std::string& name, bool constant_b,
                            std::string* rule) const;
  std::string describe() const;  // for the log
};

}  // namespace xdna::ops
