// The OrtEp: GetCapability (claim through the registry) and Compile (plan + packed weights -> NodeKernel).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "options.h"
#include "ort_api.h"

namespace xdna::ep {

class XdnaEp : public OrtEp {
 public:
  XdnaEp(ApiPtrs api, EpOptions options, std::shared_ptr<kernels::Backend> backend, const OrtLogger* logger);
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

  void get_capability(const OrtGraph* graph, OrtEpGraphSupportInfo* info);
  void compile(const OrtGraph* graph, const OrtNode* fused_node, OrtNodeComputeInfo** info);
  void report(const std::string& line);

  ApiPtrs api_;
  EpOptions options_;
  std::shared_ptr<kernels::Backend> backend_;
  Log log_;
};

}  // namespace xdna::ep
