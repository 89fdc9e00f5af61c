#include "backend.h"

#include <cstdlib>

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

const std::vector<std::string>& BackendConfig::environment_knobs() {
  static const std::vector<std::string> names = {
      "XDNA_KERNEL_DIR",     "XDNA_XRT_SHIM",        "XDNA_XRT_FAKE_FAULT",  "XDNA_XRT_PROBE_ROOT",
      "XDNA_XRT_MAX_CONTEXTS", "XDNA_XRT_TIMEOUT_MS", "XDNA_XRT_COST_MODEL"};
  return names;
}

BackendConfig& BackendConfig::with_environment() {
  env.clear();
  for (const std::string& name : environment_knobs())
    if (const char* v = std::getenv(name.c_str()); v != nullptr) env[name] = v;
  return *this;
}

std::string BackendConfig::env_value(const std::string& name) const {
  const auto it = env.find(name);
  return it == env.end() ? "" : it->second;
}

std::string BackendConfig::cache_key() const {
  // Length-prefixed fields: no value can forge another field's boundary.
  std::string key;
  auto add = [&key](const std::string& s) { key += std::to_string(s.size()) + ":" + s + "|"; };
  add(kind);
  add(kernel_dir);
  add(plugin_dir);
  add(std::to_string(threads));
  add(fault_inject);
  for (const auto& [name, value] : env) {
    add(name);
    add(value);
  }
  return key;
}

std::unique_ptr<Backend> make_backend(const BackendConfig& cfg, std::string* why) {
  auto backend = make_plain_backend(cfg, why);
  if (!cfg.fault_inject.empty()) backend = make_fault_injecting_backend(std::move(backend), cfg.fault_inject);
  return backend;
}

}  // namespace xdna::kernels
