// The OrtEp: GetCapability (claim: each node's op module, ops/) and Compile (the same claim, the constants packed
// (kernels/packing.h), one NodeKernel per node in a FusedKernel per fused node).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ep_context.h"
#include "kernels/backend.h"
#include "options.h"
#include "ort_api.h"

namespace xdna::ep {

class XdnaEp : public OrtEp {
 public:
  // The backends every node of this EP's sessions uses: the session's choice and the CPU fallback (the emulator).
  struct Backends {
    std::shared_ptr<kernels::Backend> primary, cpu;
  };
  XdnaEp(ApiPtrs api, EpOptions options, Backends backends, const OrtLogger* logger);
  ~XdnaEp();

 private:
  static const char* ORT_API_CALL GetNameImpl(const OrtEp* self) noexcept;
  static OrtStatus* ORT_API_CALL GetCapabilityImpl(OrtEp* self, const OrtGraph* graph,
                                                   OrtEpGraphSupportInfo* info) noexcept;
  static OrtStatus* ORT_API_CALL CompileImpl(OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes,
                                             size_t count, OrtNodeComputeInfo** infos,
                                             OrtNode** ep_context_nodes) noexcept;
  static void ORT_API_CALL ReleaseNodeComputeInfosImpl(OrtEp* self, OrtNodeComputeInfo** infos,
                                                       size_t count) noexcept;
  static const char* ORT_API_CALL GetCompiledModelCompatibilityInfoImpl(OrtEp* self, const OrtGraph* graph) noexcept;

  void get_capability(const OrtGraph* graph, OrtEpGraphSupportInfo* info);
  void compile(const OrtGraph* graph, const OrtNode* fused_node, OrtNodeComputeInfo** info, OrtNode** context_node);
  // The group's claimed nodes, their plans built and constants packed from the graph.
  std::vector<CompiledNode> compile_from_graph(const OrtGraph* graph, const std::vector<const OrtNode*>& group);
  // The plans and packed weights of one of our EPContext nodes (embedded payload or side file).
  std::vector<CompiledNode> load_context(const OrtGraph* graph, const OrtNode* node);
  // The EPContext node standing for `fused_node`, its payload embedded or written to a side file.
  OrtNode* make_context_node(const OrtGraph* graph, const OrtNode* fused_node, const std::vector<CompiledNode>& nodes);
  ContextIdentity identity() const;
  std::string model_path(const OrtGraph* graph) const;
  void report(const std::string& line);

  ApiPtrs api_;
  EpOptions options_;
  Backends backends_;
  Log log_;
  std::string compatibility_info_;  // GetCompiledModelCompatibilityInfo's answer (ORT copies it)
  std::string model_path_;          // of the graph GetCapability saw (Compile's graphs may not know it)
  int capability_pass_ = 0;         // GetCapability calls so far: the partition report keeps each graph's last pass
};

// The compatibility string of compiled models (OrtEp::GetCompiledModelCompatibilityInfo), and whether `info` is
// one this build can load with `backend` (OrtEpFactory::ValidateCompiledModelCompatibilityInfo).
std::string compatibility_info(const ContextIdentity& id);
bool compatible(const std::string& info, const ContextIdentity& id);

}  // namespace xdna::ep
