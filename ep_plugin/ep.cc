#include "ep.h"

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

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
    weights = kernels::pack_weights(
        plan->op == ops::OpPlan::Op::kConv ? ops::conv_weight_tap_major(data, plan->conv).data() : data.data(),
        plan->weight_shape, plan->weight_transposed, plan->precision);
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

constexpr const char* kContextOp = "EPContext";
constexpr const char* kContextDomain = "com.microsoft";

// The names of a fused node's inputs or outputs, in ORT's order (its compute and its EPContext node follow it).
std::vector<std::string> fused_value_names(const OrtApi& ort, const OrtNode* fused_node, bool inputs) {
  size_t count = 0;
  check(ort, inputs ? ort.Node_GetNumInputs(fused_node, &count) : ort.Node_GetNumOutputs(fused_node, &count));
  std::vector<const OrtValueInfo*> values(count);
  if (count) check(ort, inputs ? ort.Node_GetInputs(fused_node, values.data(), count)
                               : ort.Node_GetOutputs(fused_node, values.data(), count));
  std::vector<std::string> names;
  for (const OrtValueInfo* vi : values) names.push_back(ops::value_name(ort, vi));
  return names;
}

bool is_context_node(const OrtApi& ort, const OrtNode* node) {
  const char* op_type = nullptr;
  const char* domain = nullptr;
  check(ort, ort.Node_GetOperatorType(node, &op_type));
  check(ort, ort.Node_GetDomain(node, &domain));
  return op_type && domain && std::strcmp(op_type, kContextOp) == 0 && std::strcmp(domain, kContextDomain) == 0;
}

// An EPContext node whose `source` is this EP (others belong to other EPs and are left alone).
bool is_our_context_node(const OrtApi& ort, const OrtNode* node) {
  std::string source;
  return is_context_node(ort, node) && ops::string_attr(ort, node, "source", &source) && source == kEpName;
}

std::string dir_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

std::string file_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string stem_of(const std::string& file) {
  const auto dot = file.rfind('.');
  return dot == std::string::npos || dot == 0 ? file : file.substr(0, dot);
}

// A fused node's name as part of a file name, without ORT's "<EP name>_" prefixes.
std::string file_safe(std::string name) {
  const std::string prefix = std::string(kEpName) + "_";
  for (size_t at; (at = name.find(prefix)) != std::string::npos;) name.erase(at, prefix.size());
  std::string out;
  for (char c : name) out += std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ? c : '_';
  return out;
}

// The side file `relative` names, which must lie inside the compiled model's directory `dir` (no absolute path,
// no "..", no symbolic link leading out).
std::string side_file_path(const std::string& dir, const std::string& relative, const std::string& where) {
  auto refuse = [&](const std::string& why) {
    throw OrtError(ORT_INVALID_GRAPH, where + ": EPContext side file '" + relative + "' refused: " + why);
  };
  if (relative.empty()) refuse("empty path");
  if (relative[0] == '/') refuse("an absolute path; it must be relative to the model's directory");
  std::stringstream parts(relative);
  for (std::string part; std::getline(parts, part, '/');)
    if (part == "..") refuse("it leaves the model's directory");
  const std::string path = dir + "/" + relative;
  char real_dir[PATH_MAX], real_path[PATH_MAX];
  if (!::realpath(dir.c_str(), real_dir))
    throw OrtError(ORT_NO_SUCHFILE, where + ": the model's directory '" + dir + "' cannot be resolved: " +
                                        std::strerror(errno));
  if (!::realpath(path.c_str(), real_path))
    throw OrtError(ORT_NO_SUCHFILE, where + ": EPContext side file '" + path + "' is missing (" +
                                        std::strerror(errno) + "); it must lie next to the compiled model");
  const std::string base = std::string(real_dir) + "/";
  if (std::strncmp(real_path, base.c_str(), base.size()) != 0)
    refuse("it resolves to '" + std::string(real_path) + "', outside the model's directory");
  return path;
}

// Writes `bytes` to `path` through a temporary name and a rename, so that a reader never sees half a file.
void write_file_atomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw OrtError(ORT_EP_FAIL, "cannot write the EPContext side file '" + tmp + "'");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw OrtError(ORT_EP_FAIL, "cannot rename '" + tmp + "' to '" + path + "': " + why);
  }
}

// A string attribute's bytes, which may hold any byte (the embedded payload), read into one aligned buffer that
// the kernels then use in place.
PayloadBytes read_bytes_attr(const OrtApi& ort, const OrtNode* node, const char* name, const std::string& where) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = ort.Node_GetAttributeByName(node, name, &attr);
  if (st) ort.ReleaseStatus(st);
  if (st || !attr) throw OrtError(ORT_INVALID_GRAPH, where + ": EPContext node without attribute '" + name + "'");
  // ORT >= 1.31 reports and copies the string's own bytes (older runtimes added a NUL: one spare byte is offered).
  size_t size = 0;
  st = ort.ReadOpAttr(attr, ORT_OP_ATTR_STRING, nullptr, 0, &size);  // asks for the size
  if (st) ort.ReleaseStatus(st);
  PayloadBytes b = allocate_payload(size + 1);
  size_t got = 0;
  check(ort, ort.ReadOpAttr(attr, ORT_OP_ATTR_STRING, const_cast<uint8_t*>(b.data), size + 1, &got));
  if (got > size + 1)
    throw OrtError(ORT_INVALID_GRAPH, where + ": attribute '" + name + "' changed size while read");
  b.size = got;
  return b;
}

}  // namespace

// Without the precision policy: the factory's check (ValidateCompiledModelCompatibilityInfo) does not see the
// session's options; Compile refuses a payload of another policy, naming both.
std::string compatibility_info(const ContextIdentity& id) {
  return std::string(kEpName) + ";ep_version=" + id.ep_version + ";contract=" + id.contract + ";backend=" +
         id.backend;
}

bool compatible(const std::string& info, const ContextIdentity& id) { return info == compatibility_info(id); }

XdnaEp::XdnaEp(ApiPtrs api, EpOptions options, Backends backends, const OrtLogger* logger)
    : api_(api), options_(std::move(options)), backends_(std::move(backends)),
      log_(api.ort, logger, options_.log_level) {
  std::memset(static_cast<OrtEp*>(this), 0, sizeof(OrtEp));  // optional members stay nullptr
  ort_version_supported = ORT_API_VERSION;
  GetName = GetNameImpl;
  GetCapability = GetCapabilityImpl;
  Compile = CompileImpl;
  ReleaseNodeComputeInfos = ReleaseNodeComputeInfosImpl;
  GetCompiledModelCompatibilityInfo = GetCompiledModelCompatibilityInfoImpl;
  compatibility_info_ = compatibility_info(identity());
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
      ep->compile(graphs[i], fused_nodes[i], &infos[i], ep_context_nodes ? &ep_context_nodes[i] : nullptr);
    }
  });
  if (st) {  // ORT does not release infos or EPContext nodes of a failed Compile
    ReleaseNodeComputeInfosImpl(self, infos, count);
    for (size_t i = 0; i < count; ++i) {
      infos[i] = nullptr;
      if (ep_context_nodes && ep_context_nodes[i]) {
        ep->api_.ort.ReleaseNode(ep_context_nodes[i]);
        ep_context_nodes[i] = nullptr;
      }
    }
  }
  return st;
}

const char* ORT_API_CALL XdnaEp::GetCompiledModelCompatibilityInfoImpl(OrtEp* self, const OrtGraph*) noexcept {
  return static_cast<XdnaEp*>(self)->compatibility_info_.c_str();
}

ContextIdentity XdnaEp::identity() const {
  std::string policy = options_.precision.describe();  // "precision MODE[, rules: ...]"
  if (policy.rfind("precision ", 0) == 0) policy.erase(0, 10);
  return ContextIdentity{kEpVersion, contract_id(), backends_.primary->name(), policy};
}

std::string XdnaEp::model_path(const OrtGraph* graph) const {
  const ORTCHAR_T* path = nullptr;
  OrtStatus* st = api_.ort.Graph_GetModelPath(graph, &path);
  if (st) api_.ort.ReleaseStatus(st);
  return !st && path && *path ? std::string(path) : model_path_;
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

  if (std::string path = model_path(graph); !path.empty()) model_path_ = path;

  // A compiled model: each of our EPContext nodes is one fused node (Compile reads its payload).
  size_t contexts = 0;
  for (const OrtNode* node : nodes) {
    if (!is_our_context_node(ort, node)) continue;
    check(ort, api_.ep.EpGraphSupportInfo_AddNodesToFuse(info, &node, 1, &fusion));
    ++contexts;
  }
  if (contexts)
    log_(ORT_LOGGING_LEVEL_INFO, "GetCapability on graph '" + std::string(graph_name ? graph_name : "") +
                                     "': claimed " + std::to_string(contexts) + " EPContext node(s) of " + kEpName);

  const ops::GraphIndex index = ops::GraphIndex::of(ort, graph);
  const int pass = ++capability_pass_;
  std::unordered_map<const OrtNode*, size_t> position;  // in the graph's node order: identifies unnamed nodes
  for (size_t i = 0; i < nodes.size(); ++i) position.emplace(nodes[i], i);
  size_t considered = 0;
  std::vector<graph::ClaimedUnit> claimed;
  const auto adjust = [&](ops::Claim* a) {
    if (a->ok) ops::apply_precision_policy(options_.precision, a);
    if (a->ok && a->plan.mflop < options_.min_mflop) {
      a->ok = false;
      a->reason = "below min_mflop (" + std::to_string(a->plan.mflop) + " MFLOP)";
      a->fused_producers.clear();
      a->fused_consumers.clear();
    }
  };
  for (const ops::NodeClaim& c : ops::claim_nodes(ort, nodes, index, adjust)) {
    const char* op_type = nullptr;
    check(ort, ort.Node_GetOperatorType(c.node, &op_type));
    ++considered;
    const ops::Claim& a = c.claim;
    const bool ok = a.ok || c.covered;
    const std::string reason = !c.covered ? a.reason : "in the fused attention of '" + c.covered_by + "'";
    if (a.ok) claimed.push_back({c.node, a.fused_producers, a.fused_consumers});
    log_(ok ? ORT_LOGGING_LEVEL_VERBOSE : ORT_LOGGING_LEVEL_INFO,
         std::string(ok ? "claimed" : "left on CPU") + ": " + op_type + " '" + a.plan.node_name + "' (" + reason +
             (a.ok ? std::string(", ") + kernels::precision_name(a.plan.precision) + ": " + a.precision_note
                   : std::string()) + ")");
    report("{\"graph\": " + json_string(graph_name ? graph_name : "") + ", \"pass\": " + std::to_string(pass) +
           ", \"index\": " + std::to_string(position[c.node]) + ", \"node\": " +
           json_string(a.plan.node_name) + ", \"op_type\": " + json_string(op_type) + ", \"claimed\": " +
           (ok ? "true" : "false") + ", \"reason\": " + json_string(reason) + ", \"mflop\": " +
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

void XdnaEp::compile(const OrtGraph* graph, const OrtNode* fused_node, OrtNodeComputeInfo** info,
                     OrtNode** context_node) {
  const OrtApi& ort = api_.ort;
  size_t n = 0;
  check(ort, ort.Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> group(n);  // topological order
  if (n) check(ort, ort.Graph_GetNodes(graph, group.data(), n));
  const bool from_context = n == 1 && is_our_context_node(ort, group[0]);
  std::vector<CompiledNode> compiled = from_context ? load_context(graph, group[0]) : compile_from_graph(graph, group);
  if (options_.context_enable && context_node) *context_node = make_context_node(graph, fused_node, compiled);

  std::function<void(const std::string&)> report_fn;
  if (!options_.partition_report.empty())
    report_fn = [path = options_.partition_report](const std::string& line) { append_report(path, line); };
  std::vector<std::unique_ptr<NodeKernel>> kernels;
  for (auto& c : compiled)
    kernels.push_back(std::make_unique<NodeKernel>(std::move(c.plan), std::move(c.weights), backends_.primary,
                                                   backends_.cpu, log_, report_fn));

  auto kernel = std::make_unique<FusedKernel>(std::move(kernels), fused_value_names(ort, fused_node, true),
                                              fused_value_names(ort, fused_node, false));
  *info = new ComputeInfo(ort, std::move(kernel));
}

// The A prologue's gamma and beta (ops/matmul.cc): constants [K] of the K the claim saw.
static void read_layernorm_constants(const OrtApi& ort, ops::Claim& a) {
  std::vector<int64_t> shape;
  a.plan.layernorm_scale = ops::read_constant(ort, a.layernorm_scale_input, &shape);
  const int64_t K = a.plan.a.dims.empty() ? -1 : a.plan.a.dims.back();
  bool ok = shape.size() == 1 && shape[0] == K && static_cast<int64_t>(a.plan.layernorm_scale.size()) == K;
  if (a.layernorm_bias_input) {
    a.plan.layernorm_bias = ops::read_constant(ort, a.layernorm_bias_input, &shape);
    ok = ok && shape.size() == 1 && static_cast<int64_t>(a.plan.layernorm_bias.size()) == K;
  }
  if (!ok)
    throw OrtError(ORT_EP_FAIL, "Compile: node '" + a.plan.node_name +
                                    "': LayerNormalization scale or bias differs from the claimed one");
}

std::vector<CompiledNode> XdnaEp::compile_from_graph(const OrtGraph* graph, const std::vector<const OrtNode*>& group) {
  const OrtApi& ort = api_.ort;
  const ops::GraphIndex index = ops::GraphIndex::of(ort, graph);
  // The group's claimed nodes, each with the nodes it fuses (Transposes, an attention's chain: the group's other nodes).
  std::vector<CompiledNode> compiled;
  std::unordered_set<const OrtNode*> covered;  // a LayerNormalization prologue may be fused by several claims
  const auto with_precision = [&](ops::Claim* a) {
    if (a->ok) ops::apply_precision_policy(options_.precision, a);
  };
  for (ops::NodeClaim& c : ops::claim_nodes(ort, group, index, with_precision)) {  // the rules GetCapability used
    if (c.covered) continue;  // counted with the node that covers it
    ops::Claim& a = c.claim;
    if (!a.ok) throw OrtError(ORT_EP_FAIL, "Compile: node '" + a.plan.node_name + "' no longer claimable: " + a.reason);
    covered.insert(c.node);
    covered.insert(a.fused_producers.begin(), a.fused_producers.end());
    covered.insert(a.fused_consumers.begin(), a.fused_consumers.end());
    kernels::PackedWeights weights = load_constants(ort, c.node, &a.plan);
    if (a.bias_input) {  // the epilogue's bias (ops/matmul.cc): one value per output column
      std::vector<int64_t> shape;
      a.plan.bias_value = ops::read_constant(ort, a.bias_input, &shape);
      if (shape.empty() || shape.back() != static_cast<int64_t>(a.plan.bias_value.size()) ||
          a.plan.weight_shape.size() != 2 || shape.back() != a.plan.weight_shape.back())
        throw OrtError(ORT_EP_FAIL, "Compile: node '" + a.plan.node_name + "': epilogue bias differs from the claimed one");
    }
    if (a.layernorm) read_layernorm_constants(ort, a);
    if (a.residual_input) {  // a constant residual (ops/conv.cc): the shape the claim read
      std::vector<int64_t> shape;
      a.plan.residual_value = ops::read_constant(ort, a.residual_input, &shape);
      if (shape != a.plan.residual.dims)
        throw OrtError(ORT_EP_FAIL, "Compile: node '" + a.plan.node_name + "': constant residual differs from the claimed one");
    }
    compiled.push_back({std::move(a.plan), std::move(weights)});
  }
  if (compiled.empty() || covered.size() != group.size())
    throw OrtError(ORT_EP_FAIL, "Compile: fused group of " + std::to_string(group.size()) + " nodes, of which " +
                                    std::to_string(covered.size()) + " are claimed MatMul/Gemm/Conv nodes or the nodes they fuse");
  return compiled;
}

std::vector<CompiledNode> XdnaEp::load_context(const OrtGraph* graph, const OrtNode* node) {
  const OrtApi& ort = api_.ort;
  const char* name = nullptr;
  check(ort, ort.Node_GetName(node, &name));
  const std::string where = std::string(kEpName) + ": EPContext node '" + (name ? name : "") + "'";
  int64_t embed = 1;
  if (!ops::int_attr(ort, node, "embed_mode", &embed) || (embed != 0 && embed != 1))
    throw OrtError(ORT_INVALID_GRAPH, where + ": embed_mode must be 0 or 1");
  PayloadBytes bytes;
  std::string source = "its embedded payload";
  if (embed == 1) {
    bytes = read_bytes_attr(ort, node, "ep_cache_context", where);
  } else {
    std::string relative;
    {
      PayloadBytes b = read_bytes_attr(ort, node, "ep_cache_context", where);
      relative.assign(reinterpret_cast<const char*>(b.data), b.size);
      while (!relative.empty() && relative.back() == '\0') relative.pop_back();
    }
    std::string model = model_path(graph);
    if (model.empty()) model = options_.context_file_path;
    if (model.empty())
      throw OrtError(ORT_INVALID_ARGUMENT,
                     where + ": its payload is in the side file '" + relative +
                         "', next to the compiled model, but the session was created from model bytes: set the "
                         "session config entry ep.context_file_path to the compiled model's path");
    const std::string path = side_file_path(dir_of(model), relative, where);
    bytes = map_file(path, where);
    source = "side file '" + path + "' (memory-mapped)";
  }
  auto nodes = read_context(bytes, identity(), where);
  log_(ORT_LOGGING_LEVEL_INFO, where + ": " + std::to_string(nodes.size()) + " node(s) loaded from " + source +
                                   ", " + std::to_string(bytes.size) + " bytes");
  return nodes;
}

OrtNode* XdnaEp::make_context_node(const OrtGraph* graph, const OrtNode* fused_node,
                                   const std::vector<CompiledNode>& nodes) {
  const OrtApi& ort = api_.ort;
  const OrtModelEditorApi* editor = ort.GetModelEditorApi();
  if (!editor) throw OrtError(ORT_NOT_IMPLEMENTED, std::string(kEpName) + ": this ONNX Runtime has no model editor API");
  const char* fused_name = nullptr;
  check(ort, ort.Node_GetName(fused_node, &fused_name));
  const std::string partition = fused_name ? fused_name : "";
  const std::string payload = write_context(identity(), nodes);

  std::string cache_context;  // the payload, or the side file's path relative to the compiled model
  if (options_.context_embed) {
    if (payload.size() > static_cast<size_t>(INT_MAX))
      throw OrtError(ORT_INVALID_ARGUMENT, std::string(kEpName) + ": EPContext payload of " +
                                               std::to_string(payload.size()) +
                                               " bytes is too large to embed; use ep.context_embed_mode=0");
    cache_context = payload;
  } else {
    std::string model = options_.context_file_path;
    if (model.empty()) {  // ORT's default: <model>_ctx.onnx next to the model
      const std::string source = model_path(graph);
      if (source.empty())
        throw OrtError(ORT_INVALID_ARGUMENT, std::string(kEpName) +
                                                 ": EPContext side files need ep.context_file_path (the session was "
                                                 "created from model bytes), or use ep.context_embed_mode=1");
      model = dir_of(source) + "/" + stem_of(file_of(source)) + "_ctx.onnx";
    }
    cache_context = stem_of(file_of(model)) + "_" + file_safe(partition) + ".xdnactx";
    write_file_atomically(dir_of(model) + "/" + cache_context, payload);
  }

  const std::vector<std::string> inputs = fused_value_names(ort, fused_node, true),
                                 outputs = fused_value_names(ort, fused_node, false);
  std::vector<const char*> input_ptrs, output_ptrs;
  for (const auto& v : inputs) input_ptrs.push_back(v.c_str());
  for (const auto& v : outputs) output_ptrs.push_back(v.c_str());

  const int64_t main_context = 1, embed_mode = options_.context_embed ? 1 : 0;
  std::vector<OrtOpAttr*> attrs;
  auto add = [&](const char* key, const void* data, int len, OrtOpAttrType type) {
    OrtOpAttr* a = nullptr;
    check(ort, ort.CreateOpAttr(key, data, len, type, &a));
    attrs.push_back(a);
  };
  OrtNode* node = nullptr;
  OrtStatus* st = nullptr;
  try {
    add("main_context", &main_context, 1, ORT_OP_ATTR_INT);
    add("embed_mode", &embed_mode, 1, ORT_OP_ATTR_INT);
    add("ep_cache_context", cache_context.data(), static_cast<int>(cache_context.size()), ORT_OP_ATTR_STRING);
    add("source", kEpName, static_cast<int>(std::strlen(kEpName)), ORT_OP_ATTR_STRING);
    add("ep_sdk_version", kEpVersion, static_cast<int>(std::strlen(kEpVersion)), ORT_OP_ATTR_STRING);
    add("partition_name", partition.data(), static_cast<int>(partition.size()), ORT_OP_ATTR_STRING);
    const std::string node_name = options_.context_node_prefix + partition;
    st = editor->CreateNode(kContextOp, kContextDomain, node_name.c_str(), input_ptrs.data(), input_ptrs.size(),
                            output_ptrs.data(), output_ptrs.size(), attrs.data(), attrs.size(), &node);
  } catch (...) {
    for (OrtOpAttr* a : attrs) ort.ReleaseOpAttr(a);
    throw;
  }
  for (OrtOpAttr* a : attrs) ort.ReleaseOpAttr(a);  // CreateNode copied them
  check(ort, st);
  log_(ORT_LOGGING_LEVEL_INFO, "EPContext node for '" + partition + "': " + std::to_string(nodes.size()) +
                                   " node(s), payload of " + std::to_string(payload.size()) + " bytes " +
                                   (options_.context_embed ? "embedded" : "in '" + cache_context + "'"));
  return node;
}

}  // namespace xdna::ep
