// Loads the XRT backend (libxdna_xrt_backend.so) with dlopen, so the EP never depends on XRT itself.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "../backend.h"

namespace xdna::kernels {

// Returns nullptr and explains in *why when the NPU path is unavailable (no /dev/accel, no amdxdna driver,
// libxrt missing or too old, device does not open, no kernels built). Never throws.
// XDNA_XRT_SHIM=fake selects the test device of kernels/xrt/fake_device.h (XDNA_XRT_FAKE_FAULT=<step> makes it
// fail at one step); the manifest is still read from the kernel directory.
std::unique_ptr<Backend> try_make_xrt_backend(const BackendConfig& cfg, std::string* why);

// Every piece the NPU path needs, each checked independently, for `xdna info`. Loads libxrt_coreutil.so.2 and
// libxdna_xrt_backend.so when present (never opens the device).
struct XrtProbe {
  struct Piece {
    std::string name;    // "device node", "driver", "libxrt", "backend library", "kernels"
    bool ok = false;
    std::string detail;  // what was found, or exactly what is missing
  };
  std::vector<Piece> pieces;
  bool ready() const;            // all pieces ok: try_make_xrt_backend would try to open the device
  std::string summary() const;   // one line per piece
};
XrtProbe probe_xrt(const BackendConfig& cfg);

}  // namespace xdna::kernels
