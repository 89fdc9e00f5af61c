// Finds out whether the NPU path can work here, cheapest checks first, and builds the xrt backend if it can.
//
// Loading order matters: libxdna_xrt_backend.so is linked against no XRT library (Debian 12's XRT is too old
// to link against and sid's needs a newer glibc), so its xrt:: symbols resolve only if libxrt_coreutil.so.2 was
// loaded RTLD_GLOBAL first. A libxrt that lacks the XRT >= 2.18 API (hw_context, register_xclbin) makes that
// dlopen fail with "undefined symbol", which is reported as "libxrt too old".
#include "xrt_loader.h"

#include <dirent.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "fake_device.h"
#include "manifest.h"
#include "npu_backend.h"
#include "npu_device.h"

namespace xdna::kernels {
namespace {

constexpr const char* kBackendLibrary = "libxdna_xrt_backend.so";
constexpr const char* kAmdVendor = "0x1022";
constexpr const char* kPhoenixDevice = "0x1502";  // npu1: Phoenix and Hawk Point (Ryzen 7040/8040)

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// Test hook (XDNA_XRT_PROBE_ROOT): a directory standing in for / when looking at /dev and /sys.
std::string probe_root(const BackendConfig& cfg) { return cfg.env_value("XDNA_XRT_PROBE_ROOT"); }

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string link_basename(const std::string& path) {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  std::string target(buf);
  const size_t slash = target.rfind('/');
  return slash == std::string::npos ? target : target.substr(slash + 1);
}

std::vector<std::string> accel_nodes(const BackendConfig& cfg) {
  std::vector<std::string> nodes;
  const std::string dir = probe_root(cfg) + "/dev/accel";
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d))
      if (std::string(e->d_name).rfind("accel", 0) == 0) nodes.push_back(e->d_name);
    ::closedir(d);
  }
  std::sort(nodes.begin(), nodes.end());
  return nodes;
}

struct DeviceCheck {
  bool node_ok = false, driver_ok = false;
  std::string node_detail, driver_detail;
};

// /dev/accel/accelN must exist, and its sysfs device must be an AMD Phoenix NPU bound to amdxdna.
DeviceCheck check_device(const BackendConfig& cfg) {
  DeviceCheck c;
  const auto nodes = accel_nodes(cfg);
  if (nodes.empty()) {
    c.node_detail = "no /dev/accel/accel* (no NPU, or the amdxdna driver is not loaded: needs Linux >= 6.14 or the "
                    "out-of-tree xdna-driver, and NPU firmware amdnpu/1502_00/npu.sbin)";
    c.driver_detail = "not checked (no device node)";
    return c;
  }
  c.node_ok = true;
  std::ostringstream found;
  for (const auto& n : nodes) found << " /dev/accel/" << n;
  c.node_detail = "found" + found.str();

  std::vector<std::string> seen;
  for (const auto& n : nodes) {
    const std::string dev = probe_root(cfg) + "/sys/class/accel/" + n + "/device";
    const std::string vendor = read_line(dev + "/vendor"), device = read_line(dev + "/device");
    const std::string driver = link_basename(dev + "/driver");
    seen.push_back(n + ": vendor " + (vendor.empty() ? "?" : vendor) + " device " + (device.empty() ? "?" : device) +
                   " driver " + (driver.empty() ? "none" : driver));
    if (vendor == kAmdVendor && driver == "amdxdna" && device == kPhoenixDevice) {
      c.driver_ok = true;
      c.driver_detail = seen.back() + " (AMD Phoenix NPU)";
      return c;
    }
  }
  std::string all;
  for (const auto& s : seen) all += (all.empty() ? "" : "; ") + s;
  c.driver_detail = "no accel device is an AMD (0x1022) Phoenix NPU (0x1502) bound to the amdxdna driver: " + all;
  return c;
}

struct LibraryState {
  bool libxrt_ok = false, backend_ok = false;
  std::string libxrt_detail, backend_detail;
  xdna_xrt_open_device_fn open_device = nullptr;
};

std::string loaded_path(void* handle) {
  link_map* map = nullptr;
  if (::dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || !map || !map->l_name) return "?";
  char real[PATH_MAX];
  return ::realpath(map->l_name, real) ? std::string(real) : std::string(map->l_name);
}

std::string directory_of_this_module() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&try_make_xrt_backend), &info) == 0 || !info.dli_fname) return "";
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

void* open_libxrt(std::string* detail) {
  std::vector<std::string> candidates = {"libxrt_coreutil.so.2"};  // LD_LIBRARY_PATH, ld.so.cache
  if (const std::string x = env("XILINX_XRT"); !x.empty()) candidates.push_back(x + "/lib/libxrt_coreutil.so.2");
  candidates.push_back("/opt/xilinx/xrt/lib/libxrt_coreutil.so.2");  // AMD's XRT packages
  std::string errors;
  for (const auto& c : candidates) {
    if (void* h = ::dlopen(c.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    errors += std::string(errors.empty() ? "" : "; ") + ::dlerror();
  }
  *detail = "libxrt_coreutil.so.2 not found or not loadable (install XRT >= 2.18 with the amdxdna plugin: "
            "xrt_plugin-amdxdna / Debian's libxrt2 + libxrt-npu2): " + errors;
  return nullptr;
}

// Loads libxrt and our backend library once per process. Handles are never closed: XRT's static state must
// outlive every object made from it.
const LibraryState& load_libraries(const std::string& plugin_dir) {
  static std::mutex mu;
  static std::map<std::string, LibraryState> by_dir;
  std::lock_guard<std::mutex> lock(mu);
  auto it = by_dir.find(plugin_dir);
  if (it != by_dir.end()) return it->second;
  LibraryState& s = by_dir[plugin_dir];

  void* xrt = open_libxrt(&s.libxrt_detail);
  if (!xrt) {
    s.backend_detail = "not loaded (needs libxrt)";
    return s;
  }
  s.libxrt_ok = true;
  s.libxrt_detail = "loaded " + loaded_path(xrt);

  std::vector<std::string> dirs;
  if (!plugin_dir.empty()) dirs.push_back(plugin_dir);
  if (const std::string here = directory_of_this_module(); !here.empty() && here != plugin_dir) dirs.push_back(here);
  std::string errors;
  for (const auto& d : dirs) {
    const std::string path = d + "/" + kBackendLibrary;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      errors += (errors.empty() ? "" : "; ") + path + ": not present";
      continue;
    }
    void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const std::string err = ::dlerror();
      if (err.find("undefined symbol") != std::string::npos) {
        // The XRT we loaded lacks the NPU API: it is older than 2.18 (or not a matching build).
        s.libxrt_ok = false;
        s.libxrt_detail = loaded_path(xrt) + " is too old: it lacks the XRT >= 2.18 API the NPU needs (" + err + ")";
        s.backend_detail = "present at " + path + " but cannot bind to this libxrt";
        return s;
      }
      errors += (errors.empty() ? "" : "; ") + err;
      continue;
    }
    auto abi = reinterpret_cast<xdna_xrt_shim_abi_version_fn>(::dlsym(h, "xdna_xrt_shim_abi_version"));
    auto open = reinterpret_cast<xdna_xrt_open_device_fn>(::dlsym(h, "xdna_xrt_open_device"));
    if (!abi || !open || abi() != npu::kShimAbiVersion) {
      errors += (errors.empty() ? "" : "; ") + path + ": not a matching build of " + kBackendLibrary;
      continue;
    }
    s.backend_ok = true;
    s.backend_detail = "loaded " + path;
    s.open_device = open;
    return s;
  }
  s.backend_detail = std::string(kBackendLibrary) + " not usable (" +
                     (errors.empty() ? "no directory to look in" : errors) +
                     "); the package was built without the XRT headers?";
  return s;
}

bool read_manifest(const BackendConfig& cfg, npu::Manifest* m, std::string* why) {
  return npu::load_manifest(npu::resolve_kernel_dir(cfg.kernel_dir, cfg.env_value("XDNA_KERNEL_DIR")), m, why);
}

std::unique_ptr<Backend> make_fake(const BackendConfig& cfg, std::string* why) {
  npu::Manifest manifest;
  std::string reason;
  if (!read_manifest(cfg, &manifest, &reason)) {
    *why = reason;
    return nullptr;
  }
  npu::FakeOptions options;
  options.fail_at = cfg.env_value("XDNA_XRT_FAKE_FAULT");
  std::unique_ptr<npu::NpuDevice> device;
  try {
    device = npu::make_fake_device(options);
  } catch (const std::exception& e) {
    *why = std::string("xrt::device(0) failed: ") + e.what();
    return nullptr;
  }
  return npu::make_npu_backend(std::move(device), std::move(manifest), npu::NpuBackendOptions::from_config(cfg));
}

std::unique_ptr<Backend> make_real(const BackendConfig& cfg, std::string* why) {
  const DeviceCheck dev = check_device(cfg);
  if (!dev.node_ok) {
    *why = dev.node_detail;
    return nullptr;
  }
  if (!dev.driver_ok) {
    *why = dev.driver_detail;
    return nullptr;
  }
  npu::Manifest manifest;
  if (!read_manifest(cfg, &manifest, why)) return nullptr;
  const LibraryState& libs = load_libraries(cfg.plugin_dir);
  if (!libs.libxrt_ok) {
    *why = libs.libxrt_detail;
    return nullptr;
  }
  if (!libs.backend_ok) {
    *why = libs.backend_detail;
    return nullptr;
  }
  char err[1024] = {0};
  std::unique_ptr<npu::NpuDevice> device(libs.open_device(err, sizeof err));
  if (!device) {
    *why = std::string("xrt::device(0) failed: ") + err +
           " (is the user in the 'render' group? is memlock unlimited? does `xrt-smi examine` list the NPU?)";
    return nullptr;
  }
  return npu::make_npu_backend(std::move(device), std::move(manifest), npu::NpuBackendOptions::from_config(cfg));
}

}  // namespace

std::unique_ptr<Backend> try_make_xrt_backend(const BackendConfig& cfg, std::string* why) {
  std::string reason;
  std::unique_ptr<Backend> backend;
  try {
    const std::string shim = cfg.env_value("XDNA_XRT_SHIM");
    if (shim == "fake") backend = make_fake(cfg, &reason);
    else if (shim.empty() || shim == "xrt") backend = make_real(cfg, &reason);
    else reason = "XDNA_XRT_SHIM='" + shim + "' (expected xrt or fake)";
  } catch (const std::exception& e) {
    reason = std::string("unexpected error: ") + e.what();
    backend.reset();
  } catch (...) {
    reason = "unexpected error";
    backend.reset();
  }
  if (why) *why = backend ? "" : reason;
  return backend;
}

bool XrtProbe::ready() const {
  for (const auto& p : pieces)
    if (!p.ok) return false;
  return !pieces.empty();
}

std::string XrtProbe::summary() const {
  std::string out;
  for (const auto& p : pieces) out += (p.ok ? "  ok       " : "  MISSING  ") + p.name + ": " + p.detail + "\n";
  return out;
}

XrtProbe probe_xrt(const BackendConfig& cfg) {
  XrtProbe probe;
  try {
    const DeviceCheck dev = check_device(cfg);
    probe.pieces.push_back({"device node", dev.node_ok, dev.node_detail});
    probe.pieces.push_back({"driver", dev.driver_ok, dev.driver_detail});
    const LibraryState& libs = load_libraries(cfg.plugin_dir);
    probe.pieces.push_back({"libxrt", libs.libxrt_ok, libs.libxrt_detail});
    probe.pieces.push_back({"backend library", libs.backend_ok, libs.backend_detail});
    npu::Manifest manifest;
    std::string why;
    const std::string dir = npu::resolve_kernel_dir(cfg.kernel_dir, cfg.env_value("XDNA_KERNEL_DIR"));
    if (npu::load_manifest(dir, &manifest, &why)) {
      std::ostringstream os;
      os << manifest.kernels.size() << " kernel(s) in " << dir;
      for (const auto& s : manifest.skipped) os << "; skipped " << s;
      probe.pieces.push_back({"kernels", true, os.str()});
    } else {
      probe.pieces.push_back({"kernels", false, why});
    }
  } catch (const std::exception& e) {
    probe.pieces.push_back({"probe", false, e.what()});
  }
  return probe;
}

}  // namespace xdna::kernels
