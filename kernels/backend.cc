#include "backend.h"

#include "emulator/emulator.h"
#include "xrt/xrt_loader.h"

namespace xdna::kernels {

namespace {
std::unique_ptr<Backend> make_plain_backend(const BackendConfig& cfg, std::string* why) {
  std::string reason;
  if (cfg.kind == "emulator") {
    if (why) *why = "emulator requested";
    return make_emulator_backend(cfg.threads);
  }
  if (cfg.kind == "xrt" || cfg.kind == "auto") {
    if (auto xrt = try_make_xrt_backend(cfg, &reason)) {
      if (why) *why = "xrt: " + xrt->device_description();
      return xrt;
    }
    if (cfg.kind == "xrt") throw std::runtime_error("backend=xrt requested but unavailable: " + reason);
    if (why) *why = "xrt unavailable (" + reason + "); using the emulator";
    return make_emulator_backend(cfg.threads);
  }
  throw std::runtime_error("unknown backend '" + cfg.kind + "' (expected auto, emulator or xrt)");
}
}  // namespace

std::unique_ptr<Backend> make_backend(const BackendConfig& cfg, std::string* why) {
  auto backend = make_plain_backend(cfg, why);
  if (!cfg.fault_inject.empty()) backend = make_fault_injecting_backend(std::move(backend), cfg.fault_inject);
  return backend;
}

}  // namespace xdna::kernels
