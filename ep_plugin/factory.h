// The OrtEpFactory: devices, options, and the backends shared by every session of the process.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "ep.h"
#include "ep_allocator.h"
#include "kernels/backend.h"
#include "options.h"
#include "ort_api.h"

namespace xdna::ep {

class XdnaEpFactory : public OrtEpFactory {
 public:
  XdnaEpFactory(const OrtApi& ort, const OrtEpApi& ep_api, const OrtLogger* default_logger);

 private:
  static const char* ORT_API_CALL GetNameImpl(const OrtEpFactory*) noexcept;
  static const char* ORT_API_CALL GetVendorImpl(const OrtEpFactory*) noexcept;
  static uint32_t ORT_API_CALL GetVendorIdImpl(const OrtEpFactory*) noexcept;
  static const char* ORT_API_CALL GetVersionImpl(const OrtEpFactory*) noexcept;
  static OrtStatus* ORT_API_CALL GetSupportedDevicesImpl(OrtEpFactory* self, const OrtHardwareDevice* const* devices,
                                                         size_t num_devices, OrtEpDevice** ep_devices,
                                                         size_t max_ep_devices, size_t* num_ep_devices) noexcept;
  static OrtStatus* ORT_API_CALL CreateEpImpl(OrtEpFactory* self, const OrtHardwareDevice* const* devices,
                                              const OrtKeyValuePairs* const* ep_metadata, size_t num_devices,
                                              const OrtSessionOptions* session_options, const OrtLogger* logger,
                                              OrtEp** ep) noexcept;
  static void ORT_API_CALL ReleaseEpImpl(OrtEpFactory*, OrtEp* ep) noexcept;
  static OrtStatus* ORT_API_CALL ValidateCompiledModelCompatibilityInfoImpl(
      OrtEpFactory* self, const OrtHardwareDevice* const* devices, size_t num_devices, const char* info,
      OrtCompiledModelCompatibility* compatibility) noexcept;
  static OrtStatus* ORT_API_CALL CreateAllocatorImpl(OrtEpFactory*, const OrtMemoryInfo*, const OrtKeyValuePairs*,
                                                     OrtAllocator** allocator) noexcept;
  static void ORT_API_CALL ReleaseAllocatorImpl(OrtEpFactory*, OrtAllocator*) noexcept;
  static OrtStatus* ORT_API_CALL CreateDataTransferImpl(OrtEpFactory*, OrtDataTransferImpl** dt) noexcept;
  static bool ORT_API_CALL IsStreamAwareImpl(const OrtEpFactory*) noexcept;
  static OrtStatus* ORT_API_CALL CreateSyncStreamForDeviceImpl(OrtEpFactory*, const OrtMemoryDevice*,
                                                               const OrtKeyValuePairs*,
                                                               OrtSyncStreamImpl** stream) noexcept;

  // One backend per configuration, shared by all sessions (Phoenix has at most 6 hardware contexts).
  // Keyed by BackendConfig::cache_key(): options and XDNA_* environment.
  XdnaEp::Backends backends_for(const EpOptions& o, std::string* why);

  const OrtApi& ort_;
  const OrtEpApi& ep_api_;
  const OrtLogger* default_logger_;
  std::mutex mutex_;
  std::map<std::string, XdnaEp::Backends> backends_;
  std::map<std::string, std::string> backend_why_;
  EpMemory memory_;  // the EP's allocator (XDNA_EP_ALLOCATOR), registered with the EP device
};

}  // namespace xdna::ep
