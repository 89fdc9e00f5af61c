// The OrtEp: GetCapability (claim: each node's op module, ops/) and Compile (the same claim, the constants packed
// (kernels/packing.h), one NodeKernel per node in a FusedKernel per fused node).
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

  void get_capability(const OrtGraph* graph, OrtEpGraphSupportInfo* info);
  void compile(const OrtGraph* graph, const OrtNode* fused_node, OrtNodeComputeInfo** info);
  void report(const std::string& line);

  ApiPtrs api_;
  EpOptions options_;
  Backends backends_;
  Log log_;
};

}  // namespace xdna::ep
