// The op table: every op the EP claims, one module each (ops/<op>.cc). Adding an op = its file + one row here.
#include <algorithm>
#include <cstring>
#include <functional>
#include <unordered_map>

#include "ep_plugin/ort_api.h"
#include "kernels/packing.h"
#include "ops/op.h"

namespace xdna::ops {

extern const OpModule kAttentionModule, kMatMulModule, kGemmModule, kConvModule;

namespace {

// Several modules may share an op type: the first whose rule claims the node takes it (a MatMul that ends an
// attention pattern is fused attention, any other MatMul a plain product).
const OpModule* const kOps[] = {&kAttentionModule, &kMatMulModule, &kGemmModule, &kConvModule};

// A LayerNormalization taken as an A prologue (ops/matmul.cc) leaves the graph only if every reader of its output
// took it: otherwise (a reader below min_mflop, or one that gave it up) its output is needed and every claim reads
// it again as A.
void keep_layernorm_prologues_whole(const GraphIndex& index, std::vector<NodeClaim>* claims) {
  std::unordered_map<const OrtNode*, std::vector<Claim*>> takers;
  for (NodeClaim& c : *claims)
    if (c.claim.ok && c.claim.layernorm) takers[c.claim.layernorm].push_back(&c.claim);
  for (auto& [ln, claimed] : takers) {
    const auto readers = index.consumers.find(claimed.front()->plan.layernorm_output);
    const size_t wanted = readers == index.consumers.end() ? 0 : readers->second.size();
    if (claimed.size() == wanted) continue;
    for (Claim* c : claimed)
      give_up_layernorm_prologue(c, "its LayerNormalization stays on the CPU EP (" + std::to_string(wanted - claimed.size()) +
                                        " of its " + std::to_string(wanted) + " readers not claimed with it)");
  }
}

}  // namespace

const OpModule* find_op(const std::string& domain, const std::string& op_type) {
  for (const OpModule* m : kOps)
    if (domain == m->domain && op_type == m->op_type) return m;
  return nullptr;
}

const OpModule& module_of(OpPlan::Op op) {
  for (const OpModule* m : kOps)
    if (m->op == op) return *m;
  throw std::logic_error("op without a module");
}

std::string read_float_operands(const OrtApi& api, const NodeIo& io, OpPlan* plan) {
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

Claim claim_node(const OrtApi& api, const OrtNode* node, const GraphIndex& index, bool fused) {
  const char* op_type = nullptr;
  const char* domain = nullptr;
  const char* name = nullptr;
  int since = 0;
  ep::check(api, api.Node_GetOperatorType(node, &op_type));
  ep::check(api, api.Node_GetDomain(node, &domain));
  ep::check(api, api.Node_GetName(node, &name));
  ep::check(api, api.Node_GetSinceVersion(node, &since));
  if (!find_op(domain, op_type)) return reject(std::string("op ") + op_type + " is not a GEMM");
  Claim r = reject("opset too old");
  for (const OpModule* m : kOps) {
    if (domain != std::string(m->domain) || op_type != std::string(m->op_type) || since < m->min_since_version)
      continue;
    if (!fused && m->op == OpPlan::Op::kAttention) continue;
    r = m->claim(api, node, index);
    if (r.ok) break;
  }
  r.plan.node_name = name ? name : "";
  const NodeIo io = node_io(api, node);
  if (r.ok && (io.outputs.size() != 1 || !io.outputs[0])) {
    r.ok = false;
    r.reason = std::string(op_type) + " without exactly one output";
  }
  if (r.ok && r.plan.output.empty()) r.plan.output = value_name(api, io.outputs[0]);  // (an epilogue set its own)
  if (!r.ok) {
    r.fused_producers.clear();
    r.fused_consumers.clear();
  }
  return r;
}

std::vector<NodeClaim> claim_nodes(const OrtApi& api, const std::vector<const OrtNode*>& nodes,
                                   const GraphIndex& index, const std::function<void(Claim*)>& adjust) {
  std::vector<NodeClaim> claims;
  std::unordered_map<const OrtNode*, std::string> covered_by;
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {  // consumers first: they decide what they cover
    const char* op_type = nullptr;
    const char* domain = nullptr;
    ep::check(api, api.Node_GetOperatorType(*it, &op_type));
    ep::check(api, api.Node_GetDomain(*it, &domain));
    if (!find_op(domain, op_type)) continue;
    NodeClaim c{*it, {}, "", false};
    if (const auto cov = covered_by.find(*it); cov != covered_by.end()) {
      const char* name = nullptr;
      ep::check(api, api.Node_GetName(*it, &name));
      c.claim.plan.node_name = name ? name : "";
      c.covered_by = cov->second;
      c.covered = true;
    } else {
      c.claim = claim_node(api, *it, index);
      if (adjust) adjust(&c.claim);
      if (c.claim.unfuse) {  // the policy wants a precision the fused contract does not have: a plain product
        c.claim = claim_node(api, *it, index, /*fused=*/false);
        if (adjust) adjust(&c.claim);
      }
      if (c.claim.ok)
        for (const OrtNode* p : c.claim.fused_producers)
          covered_by[p] = c.claim.plan.node_name.empty() ? "(unnamed, output " + c.claim.plan.output + ")"
                                                         : c.claim.plan.node_name;
    }
    claims.push_back(std::move(c));
  }
  std::reverse(claims.begin(), claims.end());
  keep_layernorm_prologues_whole(index, &claims);
  return claims;
}

void apply_precision_policy(const PrecisionPolicy& policy, Claim* claim) {
  OpPlan& plan = claim->plan;
  std::string rule;
  const kernels::Precision wanted = policy.choose(module_of(plan.op).op_type, plan.node_name, plan.b.constant, &rule);
  if (plan.op == OpPlan::Op::kAttention) {
    plan.precision = kernels::Precision::kBf16;
    claim->precision_note = "fused attention: its own contract (bf16 products, fp32 softmax)";
    if (wanted == kernels::Precision::kBf16x3) claim->unfuse = true;  // separate bf16x3 products instead
    return;
  }
  plan.precision = wanted;
  claim->precision_note = rule.empty() ? "the precision option" : "rule '" + rule + "'";
  if (wanted != kernels::Precision::kInt8) return;
  if (!plan.b.constant) {
    plan.precision = kernels::Precision::kBf16;
    claim->precision_note += " asks int8; B is given at run time, which the int8 contract keeps in bf16";
    return;
  }
  const auto& w = plan.weight_shape;
  const int64_t K = w.size() == 1 ? w[0] : plan.weight_transposed ? w.back() : w[w.size() - 2];
  if (auto why = kernels::precision_problem(wanted, K); !why.empty()) {
    plan.precision = kernels::Precision::kBf16;
    claim->precision_note += " asks int8; " + why + ", so bf16";
  }
}

}  // namespace xdna::ops
