// The plugin library's only exports (see exports.map).
#include "factory.h"

namespace {
#define XDNA_STR2(x) #x
#define XDNA_STR(x) XDNA_STR2(x)
constexpr const char* kTooOldRuntime =
    "XDNAExecutionProvider: this ONNX Runtime does not offer ORT API version " XDNA_STR(ORT_API_VERSION)
    " (ONNX Runtime >= 1.23 needed)";
}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* CreateEpFactories(const char* /*registered_name*/,
                                                                    const OrtApiBase* ort_api_base,
                                                                    const OrtLogger* default_logger,
                                                                    OrtEpFactory** factories, size_t max_factories,
                                                                    size_t* num_factories) {
  if (num_factories) *num_factories = 0;  // set first: every early return below must leave "no factory"
  const OrtApi* api = ort_api_base ? ort_api_base->GetApi(ORT_API_VERSION) : nullptr;
  if (api == nullptr) {
    // A runtime older than our headers: say so through the oldest API table (CreateStatus is in every version).
    const OrtApi* oldest = ort_api_base ? ort_api_base->GetApi(1) : nullptr;
    if (oldest == nullptr) return nullptr;  // no table at all: nothing can carry an error
    return oldest->CreateStatus(ORT_NOT_IMPLEMENTED, kTooOldRuntime);
  }
  if (!factories || !num_factories)
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "XDNAExecutionProvider: null output arguments");
  if (max_factories < 1)
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "XDNAExecutionProvider: no room for its factory");
  return xdna::ep::guard(*api, [&] {
    factories[0] = new xdna::ep::XdnaEpFactory(*api, *api->GetEpApi(), default_logger);
    *num_factories = 1;
  });
}

__attribute__((visibility("default"))) OrtStatus* ReleaseEpFactory(OrtEpFactory* factory) {
  delete static_cast<xdna::ep::XdnaEpFactory*>(factory);
  return nullptr;
}

}  // extern "C"
