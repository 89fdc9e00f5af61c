// Loads the XRT backend (libxdna_xrt_backend.so) with dlopen, so the EP never depends on XRT itself.
#pragma once

#include <memory>
#include <string>

#include "../backend.h"

namespace xdna::kernels {

// Returns nullptr and explains in *why when the NPU path is unavailable (no /dev/accel, no amdxdna driver,
// libxrt missing or too old, device does not open, no kernels built). Never throws.
std::unique_ptr<Backend> try_make_xrt_backend(const BackendConfig& cfg, std::string* why);

}  // namespace xdna::kernels
