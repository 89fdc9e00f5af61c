// Placeholder until the XRT backend lands.
#include "xrt_loader.h"

namespace xdna::kernels {

std::unique_ptr<Backend> try_make_xrt_backend(const BackendConfig&, std::string* why) {
  if (why) *why = "xrt backend not built";
  return nullptr;
}

}  // namespace xdna::kernels
