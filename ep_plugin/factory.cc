#include "factory.h"

#include <dlfcn.h>

#include <vector>

#include "ep.h"
#include "kernels/emulator/emulator.h"

namespace xdna::ep {
namespace {

// Directory of this shared library: the XRT backend library is installed next to it.
std::string plugin_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&plugin_dir), &info) == 0 || info.dli_fname == nullptr) return "";
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

XdnaEpFactory::XdnaEpFactory(const OrtApi& ort, const OrtEpApi& ep_api, const OrtLogger* default_logger)
    : OrtEpFactory{}, ort_(ort), ep_api_(ep_api), default_logger_(default_logger),
      memory_(ort, ep_api, ep_memory_mode()) {
  ort_version_supported = ORT_API_VERSION;
  GetName = GetNameImpl;
  GetVendor = GetVendorImpl;
  GetVendorId = GetVendorIdImpl;
  GetVersion = GetVersionImpl;
  GetSupportedDevices = GetSupportedDevicesImpl;
  CreateEp = CreateEpImpl;
  ReleaseEp = ReleaseEpImpl;
  ValidateCompiledModelCompatibilityInfo = ValidateCompiledModelCompatibilityInfoImpl;
  CreateAllocator = CreateAllocatorImpl;
  ReleaseAllocator = ReleaseAllocatorImpl;
  CreateDataTransfer = CreateDataTransferImpl;
  IsStreamAware = IsStreamAwareImpl;
  CreateSyncStreamForDevice = CreateSyncStreamForDeviceImpl;
}

const char* ORT_API_CALL XdnaEpFactory::GetNameImpl(const OrtEpFactory*) noexcept { return kEpName; }
const char* ORT_API_CALL XdnaEpFactory::GetVendorImpl(const OrtEpFactory*) noexcept { return kEpVendor; }
uint32_t ORT_API_CALL XdnaEpFactory::GetVendorIdImpl(const OrtEpFactory*) noexcept { return kAmdVendorId; }
const char* ORT_API_CALL XdnaEpFactory::GetVersionImpl(const OrtEpFactory*) noexcept { return kEpVersion; }

XdnaEp::Backends XdnaEpFactory::backends_for(const EpOptions& o, std::string* why) {
  kernels::BackendConfig cfg;
  cfg.with_environment();
  cfg.kind = o.backend;
  cfg.kernel_dir = o.kernel_dir;
  cfg.plugin_dir = plugin_dir();
  cfg.threads = o.threads;
  cfg.fault_inject = o.fault_inject;
  const std::string key = cfg.cache_key();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = backends_.find(key);
  if (it == backends_.end()) {
    std::string reason;
    XdnaEp::Backends b;
    b.primary = std::shared_ptr<kernels::Backend>(kernels::make_backend(cfg, &reason));
    b.cpu = std::shared_ptr<kernels::Backend>(kernels::make_emulator_backend(cfg.threads));
    it = backends_.emplace(key, std::move(b)).first;
    backend_why_[key] = reason;
  }
  if (why) *why = backend_why_[key];
  return it->second;
}

OrtStatus* ORT_API_CALL XdnaEpFactory::GetSupportedDevicesImpl(OrtEpFactory* self,
                                                               const OrtHardwareDevice* const* devices,
                                                               size_t num_devices, OrtEpDevice** ep_devices,
                                                               size_t max_ep_devices, size_t* num_ep_devices) noexcept {
  auto* f = static_cast<XdnaEpFactory*>(self);
  *num_ep_devices = 0;
  return guard(f->ort_, [&] {
    // Prefer an AMD NPU (ORT >= 1.31 enumerates /sys/class/accel); otherwise offer the EP on the CPU device so
    // the emulator works everywhere.
    const OrtHardwareDevice* chosen = nullptr;
    for (size_t i = 0; i < num_devices && !chosen; ++i)
      if (f->ort_.HardwareDevice_Type(devices[i]) == OrtHardwareDeviceType_NPU &&
          f->ort_.HardwareDevice_VendorId(devices[i]) == kAmdVendorId)
        chosen = devices[i];
    for (size_t i = 0; i < num_devices && !chosen; ++i)
      if (f->ort_.HardwareDevice_Type(devices[i]) == OrtHardwareDeviceType_CPU) chosen = devices[i];
    if (!chosen || max_ep_devices == 0) return;

    std::string why;
    auto backend = f->backends_for(EpOptions{}, &why).primary;
    OrtKeyValuePairs* meta = nullptr;
    f->ort_.CreateKeyValuePairs(&meta);
    f->ort_.AddKeyValuePair(meta, "backend", backend->name().c_str());
    f->ort_.AddKeyValuePair(meta, "backend_device", backend->device_description().c_str());
    f->ort_.AddKeyValuePair(meta, "backend_reason", why.c_str());
    OrtEpDevice* ep_device = nullptr;
    OrtStatus* st = f->ep_api_.CreateEpDevice(f, chosen, meta, nullptr, &ep_device);
    f->ort_.ReleaseKeyValuePairs(meta);
    check(f->ort_, st);
    f->memory_.register_with(ep_device);
    ep_devices[0] = ep_device;
    *num_ep_devices = 1;
  });
}

OrtStatus* ORT_API_CALL XdnaEpFactory::CreateEpImpl(OrtEpFactory* self, const OrtHardwareDevice* const*,
                                                    const OrtKeyValuePairs* const*, size_t,
                                                    const OrtSessionOptions* session_options, const OrtLogger* logger,
                                                    OrtEp** ep) noexcept {
  auto* f = static_cast<XdnaEpFactory*>(self);
  *ep = nullptr;
  return guard(f->ort_, [&] {
    EpOptions options = parse_options(f->ort_, session_options);  // session_options are only valid here
    std::string why;
    auto backends = f->backends_for(options, &why);
    if (options.ort_threads_spin && backends.primary->name() != "xrt")
      Log(f->ort_, logger ? logger : f->default_logger_, options.log_level)(
          ORT_LOGGING_LEVEL_INFO,
          "ORT intra-op spinning is on: its idle threads hold cores that the CPU-path GEMMs could use; "
          "session.intra_op.allow_spinning=0 (onnxruntime_ep_xdna.session_options() sets it) is faster");
    *ep = new XdnaEp(ApiPtrs{f->ort_, f->ep_api_}, std::move(options), std::move(backends),
                     logger ? logger : f->default_logger_);
  });
}

void ORT_API_CALL XdnaEpFactory::ReleaseEpImpl(OrtEpFactory*, OrtEp* ep) noexcept { delete static_cast<XdnaEp*>(ep); }

OrtStatus* ORT_API_CALL XdnaEpFactory::ValidateCompiledModelCompatibilityInfoImpl(
    OrtEpFactory* self, const OrtHardwareDevice* const*, size_t, const char* info,
    OrtCompiledModelCompatibility* compatibility) noexcept {
  auto* f = static_cast<XdnaEpFactory*>(self);
  *compatibility = OrtCompiledModelCompatibility_EP_NOT_APPLICABLE;
  return guard(f->ort_, [&] {
    if (!info || !*info) return;
    // Compiled for this build and the default backend: load it; anything else would be refused at load (the
    // precision policy, a session option, is checked there).
    const ContextIdentity id{kEpVersion, contract_id(), f->backends_for(EpOptions{}, nullptr).primary->name(), ""};
    *compatibility = compatible(info, id) ? OrtCompiledModelCompatibility_EP_SUPPORTED_OPTIMAL
                                          : OrtCompiledModelCompatibility_EP_UNSUPPORTED;
  });
}

// XDNA_EP_ALLOCATOR=off (the default): no allocator, ORT's CPU memory everywhere, which the xrt backend imports per
// call. host/device: the EP's own memory (ep_allocator.h), which the backend uses without pinning per call.
OrtStatus* ORT_API_CALL XdnaEpFactory::CreateAllocatorImpl(OrtEpFactory* self, const OrtMemoryInfo* info,
                                                           const OrtKeyValuePairs*, OrtAllocator** allocator) noexcept {
  auto* f = static_cast<XdnaEpFactory*>(self);
  *allocator = f->memory_.allocator_for(info);
  if (!*allocator && f->memory_.mode() != EpMemoryMode::kOff)
    return f->ort_.CreateStatus(ORT_INVALID_ARGUMENT, "XDNAExecutionProvider: CreateAllocator for a memory info "
                                                      "this factory did not register");
  return nullptr;
}
void ORT_API_CALL XdnaEpFactory::ReleaseAllocatorImpl(OrtEpFactory*, OrtAllocator*) noexcept {}  // owned by memory_
OrtStatus* ORT_API_CALL XdnaEpFactory::CreateDataTransferImpl(OrtEpFactory* self, OrtDataTransferImpl** dt) noexcept {
  *dt = static_cast<XdnaEpFactory*>(self)->memory_.data_transfer();
  return nullptr;
}
bool ORT_API_CALL XdnaEpFactory::IsStreamAwareImpl(const OrtEpFactory*) noexcept { return false; }
OrtStatus* ORT_API_CALL XdnaEpFactory::CreateSyncStreamForDeviceImpl(OrtEpFactory*, const OrtMemoryDevice*,
                                                                     const OrtKeyValuePairs*,
                                                                     OrtSyncStreamImpl** stream) noexcept {
  *stream = nullptr;
  return nullptr;
}

}  // namespace xdna::ep
