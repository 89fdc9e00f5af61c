#include "ep.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include "graph_passes/fusion_groups.h"
#include "json.h"
#include "kernels/packing.h"
#include "node_kernel.h"
#include "ops/op.h"

namespace xdna::ep {
namespace {

// OrtNodeComputeInfo for one fused node (a group of claimed nodes). Its callbacks are plain function pointers (not noexcept in the header).
struct ComputeInfo : OrtNodeComputeInfo {
  ComputeInfo(const OrtApi& api, std::unique_ptr<FusedKernel> k) : api(api), kernel(std::move(k)) {
    ort_version_supported = ORT_API_VERSION;
    CreateState = CreateStateImpl;
    Compute = ComputeImpl;
    ReleaseState = ReleaseStateImpl;
  }
  static OrtStatus* ORT_API_CALL CreateStateImpl(OrtNodeComputeInfo* self, OrtNodeComputeContext*, void** state) {
    *state = static_cast<ComputeInfo*>(self)->kernel.get();
    return nullptr;
  }
  static OrtStatus* ORT_API_CALL ComputeImpl(OrtNodeComputeInfo* self, void* state, OrtKernelContext* ctx) {
    auto* info = static_cast<ComputeInfo*>(self);
    return guard(info->api, [&] { static_cast<FusedKernel*>(state)->compute(info->api, ctx); });
  }
  static void ORT_API_CALL ReleaseStateImpl(OrtNodeComputeInfo*, void*) {}

  const OrtApi& api;
  std::unique_ptr<FusedKernel> kernel;
};

// Appends one JSON line to the partition report; several sessions and kernels may share the file.
void append_report(const std::string& path, const std::string& line) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  std::ofstream(path, std::ios::app) << line << "\n";
}

int64_t element_count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// Pack: the constants a claimed node's plan names, read from the graph and packed (kernels/packing.h). Only
// Compile calls this: the claim rule never reads weight data.
kernels::PackedWeights load_constants(const OrtApi& ort, const OrtNode* node, ops::OpPlan* plan) {
  const ops::NodeIo io = ops::node_io(ort, node);
  kernels::PackedWeights weights;
  if (!plan->weight_shape.empty()) {
    std::vector<int64_t> shape;
    const std::vector<float> data = ops::read_constant(ort, io.inputs.at(1), &shape);
    if (element_count(shape) != element_count(plan->weight_shape))
      throw OrtError(ORT_EP_FAIL, "Compile: node '" + plan->node_name + "': weight differs from the claimed one");
    weights = kernels::pack_weights(data.data(), plan->weight_shape, plan->weight_transposed, plan->precision);
  }
  if (plan->c.present && plan->c.constant) {
    std::vector<int64_t> shape;
    plan->c_value = ops::read_constant(ort, io.inputs.at(2), &shape);
    plan->c.dims = shape;
    plan->c.rank = static_cast<int>(shape.size());
    if (plan->op == ops::OpPlan::Op::kConv && static_cast<int64_t>(plan->c_value.size()) != plan->conv.out_channels)
      throw OrtError(ORT_EP_FAIL, "Compile: node '" + plan->node_name + "': bias differs from the claimed one");
  }
  return weights;
}

}  // namespace

XdnaEp::XdnaEp(ApiPtrs api, EpOptions options, Backends backends, const OrtLogger* logger)
    : api_(api), options_(std::move(options)), backends_(std::move(backends)),
      log_(api.ort, logger, options_.log_level) {
  std::memset(static_cast<OrtEp*>(this), 0, sizeof(OrtEp));  // optional members stay nullptr
  ort_version_supported = ORT_API_VERSION;
  GetName = GetNameImpl;
  GetCapability = GetCapabilityImpl;
  Compile = CompileImpl;
  ReleaseNodeComputeInfos = ReleaseNodeComputeInfosImpl;
  log_(ORT_LOGGING_LEVEL_INFO, "backend: " + backends_.primary->name() + " (" + backends_.primary->device_description() +
                                   "), CPU fallback: " + backends_.cpu->name() + "; " +
                                   options_.precision.describe());
}

XdnaEp::~XdnaEp() = default;

const char* ORT_API_CALL XdnaEp::GetNameImpl(const OrtEp*) noexcept { return kEpName; }

OrtStatus* ORT_API_CALL XdnaEp::GetCapabilityImpl(OrtEp* self, const OrtGraph* graph,
                                                  OrtEpGraphSupportInfo* info) noexcept {
  auto* ep = static_cast<XdnaEp*>(self);
  return guard(ep->api_.ort, [&] { ep->get_capability(graph, info); });
}

OrtStatus* ORT_API_CALL XdnaEp::CompileImpl(OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes,
                                            size_t count, OrtNodeComputeInfo** infos,
                                            OrtNode** ep_context_nodes) noexcept {
  auto* ep = static_cast<XdnaEp*>(self);
  for (size_t i = 0; i < count; ++i) infos[i] = nullptr;
  OrtStatus* st = guard(ep->api_.ort, [&] {
    for (size_t i = 0; i < count; ++i) {
      if (ep_context_nodes) ep_context_nodes[i] = nullptr;
      ep->compile(graphs[i], fused_nodes[i], &infos[i]);
    }
  });
  if (st) {  // ORT does not release infos of a failed Compile
    ReleaseNodeComputeInfosImpl(self, infos, count);
    for (size_t i = 0; i < count; ++i) infos[i] = nullptr;
  }
  return st;
}

void ORT_API_CALL XdnaEp::ReleaseNodeComputeInfosImpl(OrtEp*, OrtNodeComputeInfo** infos, size_t count) noexcept {
  for (size_t i = 0; i < count; ++i) delete static_cast<ComputeInfo*>(infos[i]);
}

void XdnaEp::report(const std::string& line) {
  if (!options_.partition_report.empty()) append_report(options_.partition_report, line);
}

void XdnaEp::get_capability(const OrtGraph* graph, OrtEpGraphSupportInfo* info) {
  const OrtApi& ort = api_.ort;
  size_t n = 0;
  check(ort, ort.Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(ort, ort.Graph_GetNodes(graph, nodes.data(), n));
  const char* graph_name = "";
  check(ort, ort.Graph_GetName(graph, &graph_name));

  OrtNodeFusionOptions fusion{};
  fusion.ort_version_supported = ORT_API_VERSION;
  fusion.drop_constant_initializers = true;  // ORT frees the fp32 weights; we keep only the packed bf16 copy

  const ops::GraphIndex index = ops::GraphIndex::of(ort, graph);
  size_t considered = 0;
  std::vector<graph::ClaimedUnit> claimed;
  for (const OrtNode* node : nodes) {
    const char* op_type = nullptr;
    const char* domain = nullptr;
    check(ort, ort.Node_GetOperatorType(node, &op_type));
    check(ort, ort.Node_GetDomain(node, &domain));
    if (!ops::find_op(domain, op_type)) continue;
    ++considered;
    ops::Claim a = ops::claim_node(ort, node, index);
    if (a.ok) ops::apply_precision_policy(options_.precision, op_type, &a);
    if (a.ok && a.plan.mflop < options_.min_mflop) {
      a.ok = false;
      a.reason = "below min_mflop (" + std::to_string(a.plan.mflop) + " MFLOP)";
    }
    if (a.ok) claimed.push_back({node, a.fused_producers});
    log_(a.ok ? ORT_LOGGING_LEVEL_VERBOSE : ORT_LOGGING_LEVEL_INFO,
         std::string(a.ok ? "claimed" : "left on CPU") + ": " + op_type + " '" + a.plan.node_name + "' (" +
             a.reason + (a.ok ? std::string(", ") + kernels::precision_name(a.plan.precision) + ": " +
                                        a.precision_note : std::string()) + ")");
    report("{\"graph\": " + json_string(graph_name ? graph_name : "") + ", \"node\": " +
           json_string(a.plan.node_name) + ", \"op_type\": " + json_string(op_type) + ", \"claimed\": " +
           (a.ok ? "true" : "false") + ", \"reason\": " + json_string(a.reason) + ", \"mflop\": " +
           json_number(a.plan.mflop) + ", \"mflop_lower_bound\": " + (a.plan.mflop_lower_bound ? "true" : "false") +
           (a.ok ? ", \"precision\": " + json_string(kernels::precision_name(a.plan.precision)) +
                       ", \"precision_note\": " + json_string(a.precision_note)
                 : std::string()) +
           "}");
  }
  const auto groups = graph::fusion_groups(ort, nodes, claimed, index);
  for (const auto& group : groups)
    check(ort, api_.ep.EpGraphSupportInfo_AddNodesToFuse(info, group.data(), group.size(), &fusion));
  log_(ORT_LOGGING_LEVEL_INFO, "GetCapability on graph '" + std::string(graph_name ? graph_name : "") + "': claimed " +
                                   std::to_string(claimed.size()) + " of " + std::to_string(considered) +
                                   " MatMul/Gemm/Conv nodes, in " + std::to_string(groups.size()) + " fused node(s)");
}

void XdnaEp::compile(const OrtGraph* graph, const OrtNode* fused_node, OrtNodeComputeInfo** info) {
  const OrtApi& ort = api_.ort;
  if (options_.context_enable)
    throw OrtError(ORT_NOT_IMPLEMENTED,
                   std::string(kEpName) + " " + kEpVersion +
                       ": EPContext generation (ep.context_enable=1, onnxruntime.ModelCompiler) is not supported "
                       "yet (issue 12); create the session from the original model without ep.context_enable");
  size_t n = 0;
  check(ort, ort.Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> group(n);  // topological order
  if (n) check(ort, ort.Graph_GetNodes(graph, group.data(), n));
  const ops::GraphIndex index = ops::GraphIndex::of(ort, graph);
  std::function<void(const std::string&)> report_fn;
  if (!options_.partition_report.empty())
    report_fn = [path = options_.partition_report](const std::string& line) { append_report(path, line); };
  // The group's MatMul/Gemm/Conv nodes, each with the Transposes it reads through (the group's other nodes).
  std::vector<std::unique_ptr<NodeKernel>> kernels;
  size_t covered = 0;
  for (const OrtNode* g : group) {
    const char* op_type = nullptr;
    const char* domain = nullptr;
    check(ort, ort.Node_GetOperatorType(g, &op_type));
    check(ort, ort.Node_GetDomain(g, &domain));
    if (!ops::find_op(domain, op_type)) continue;
    ops::Claim a = ops::claim_node(ort, g, index);  // the claim rule GetCapability used
    if (!a.ok) throw OrtError(ORT_EP_FAIL, "Compile: node '" + a.plan.node_name + "' no longer claimable: " + a.reason);
    ops::apply_precision_policy(options_.precision, op_type, &a);
    covered += 1 + a.fused_producers.size();
    kernels::PackedWeights weights = load_constants(ort, g, &a.plan);
    kernels.push_back(std::make_unique<NodeKernel>(std::move(a.plan), std::move(weights), backends_.primary,
                                                   backends_.cpu, log_, report_fn));
  }
  if (kernels.empty() || covered != n)
    throw OrtError(ORT_EP_FAIL, "Compile: fused group of " + std::to_string(n) + " nodes, of which " +
                                    std::to_string(covered) + " are claimed MatMul/Gemm/Conv nodes or their Transposes");

  auto value_names = [&](bool inputs) {
    size_t count = 0;
    check(ort, inputs ? ort.Node_GetNumInputs(fused_node, &count) : ort.Node_GetNumOutputs(fused_node, &count));
    std::vector<const OrtValueInfo*> values(count);
    if (count) check(ort, inputs ? ort.Node_GetInputs(fused_node, values.data(), count)
                                 : ort.Node_GetOutputs(fused_node, values.data(), count));
    std::vector<std::string> names;
    for (const OrtValueInfo* vi : values) {
      const char* name = nullptr;
      if (vi) check(ort, ort.GetValueInfoName(vi, &name));
      names.emplace_back(name ? name : "");
    }
    return names;
  };
  auto kernel = std::make_unique<FusedKernel>(std::move(kernels), value_names(true), value_names(false));
  *info = new ComputeInfo(ort, std::move(kernel));
}

}  // namespace xdna::ep
