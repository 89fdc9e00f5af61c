// The real device shim over XRT >= 2.18 (the NPU API: register_xclbin + hw_context). Compiled into
// libxdna_xrt_backend.so, which links no XRT library: its xrt:: symbols come from the libxrt_coreutil.so.2 that
// xrt_loader.cc loads RTLD_GLOBAL before dlopen'ing this library.
//
// Protocol of mlir-aie GEMM designs: device(0) -> xclbin -> register_xclbin -> hw_context -> kernel "MLIR_AIE";
// instruction BO cacheable in group_id(1); A/B/C host_only in group_id(3/4/5); run = kernel(3, instr, n_words,
// A, B, C). Exceptions propagate as std::exception (see npu_device.h).
#include <cstdio>
#include <cstring>

#include <xrt/xrt_bo.h>
#include <xrt/xrt_device.h>
#include <xrt/xrt_hw_context.h>
#include <xrt/xrt_kernel.h>
#include <xrt/experimental/xrt_kernel.h>  // xrt::runlist
#include <xrt/experimental/xrt_xclbin.h>
#include <unistd.h>

#include <atomic>
#include <vector>

#include "npu_device.h"

namespace xdna::kernels::npu {
namespace {

class XrtBuffer final : public DeviceBuffer {
 public:
  explicit XrtBuffer(xrt::bo bo) : bo(std::move(bo)), host_(this->bo.map()) {}
  void* map() override { return host_; }
  size_t size() const override { return bo.size(); }
  void to_device(size_t bytes, size_t offset) override { bo.sync(XCL_BO_SYNC_BO_TO_DEVICE, bytes, offset); }
  void from_device(size_t bytes, size_t offset) override { bo.sync(XCL_BO_SYNC_BO_FROM_DEVICE, bytes, offset); }

  xrt::bo bo;

 private:
  void* host_;
};

const char* state_name(ert_cmd_state s) {
  switch (s) {
    case ERT_CMD_STATE_NEW: return "ERT_CMD_STATE_NEW";
    case ERT_CMD_STATE_QUEUED: return "ERT_CMD_STATE_QUEUED";
    case ERT_CMD_STATE_RUNNING: return "ERT_CMD_STATE_RUNNING";
    case ERT_CMD_STATE_COMPLETED: return "ERT_CMD_STATE_COMPLETED";
    case ERT_CMD_STATE_ERROR: return "ERT_CMD_STATE_ERROR";
    case ERT_CMD_STATE_ABORT: return "ERT_CMD_STATE_ABORT";
    case ERT_CMD_STATE_SUBMITTED: return "ERT_CMD_STATE_SUBMITTED";
    case ERT_CMD_STATE_TIMEOUT: return "ERT_CMD_STATE_TIMEOUT";
    case ERT_CMD_STATE_NORESPONSE: return "ERT_CMD_STATE_NORESPONSE";
    default: return "unknown command state";
  }
}

class XrtRun final : public PendingRun {
 public:
  explicit XrtRun(xrt::run run) : run_(std::move(run)) {}
  RunState wait(std::chrono::milliseconds timeout, std::string* detail) override {
    const ert_cmd_state s = run_.wait(timeout);
    if (s == ERT_CMD_STATE_COMPLETED) return RunState::completed;
    if (detail) *detail = state_name(s);
    if (s == ERT_CMD_STATE_TIMEOUT || s == ERT_CMD_STATE_NEW || s == ERT_CMD_STATE_QUEUED ||
        s == ERT_CMD_STATE_RUNNING || s == ERT_CMD_STATE_SUBMITTED) {
      try {
        run_.abort();  // XRT leaves aborting a timed-out run to the caller
      } catch (const std::exception& e) {
        if (detail) *detail += std::string("; abort failed: ") + e.what();
      }
      return RunState::timeout;
    }
    return RunState::failed;
  }

 private:
  xrt::run run_;
};

// ORT's memory as a user-pointer BO. amdxdna pins whole pages, so the BO covers the enclosing pages and the kernel
// gets a sub-buffer at the tensor's offset; the shim DMA only touches [ptr, ptr + bytes). Never mapped: the
// memory is the caller's (xdna-driver does not mmap user-pointer BOs).
class XrtImported final : public DeviceBuffer {
 public:
  XrtImported(xrt::bo whole, xrt::bo sub, void* ptr, size_t bytes)
      : whole_(std::move(whole)), bo(std::move(sub)), ptr_(ptr), bytes_(bytes) {}
  void* map() override { return ptr_; }
  size_t size() const override { return bytes_; }
  void to_device(size_t bytes, size_t offset) override { bo.sync(XCL_BO_SYNC_BO_TO_DEVICE, bytes, offset); }
  void from_device(size_t bytes, size_t offset) override { bo.sync(XCL_BO_SYNC_BO_FROM_DEVICE, bytes, offset); }

 private:
  xrt::bo whole_;  // declared first: outlives the sub-buffer

 public:
  xrt::bo bo;

 private:
  void* ptr_;
  size_t bytes_;
};

xrt::bo& bo_of(DeviceBuffer& b) {
  if (auto* imported = dynamic_cast<XrtImported*>(&b)) return imported->bo;
  return dynamic_cast<XrtBuffer&>(b).bo;
}

// A runlist (one ERT_CMD_CHAIN submission). The run objects must live until the list completes.
class XrtChain final : public PendingRun {
 public:
  XrtChain(xrt::runlist list, std::vector<xrt::run> runs) : list_(std::move(list)), runs_(std::move(runs)) {}
  RunState wait(std::chrono::milliseconds timeout, std::string* detail) override {
    try {
      if (list_.wait(timeout) == std::cv_status::timeout) {
        if (detail) *detail = "runlist did not complete";
        return RunState::timeout;
      }
    } catch (const xrt::runlist::command_error& e) {
      const ert_cmd_state s = e.get_command_state();
      if (detail) *detail = std::string(state_name(s)) + ": " + e.what();
      return s == ERT_CMD_STATE_TIMEOUT ? RunState::timeout : RunState::failed;
    }
    return RunState::completed;
  }

 private:
  xrt::runlist list_;
  std::vector<xrt::run> runs_;
};

// Runs started one by one, waited for together (no runlist support: firmware < 5.8 or an older XRT plugin).
class XrtRuns final : public PendingRun {
 public:
  explicit XrtRuns(std::vector<std::unique_ptr<PendingRun>> runs) : runs_(std::move(runs)) {}
  RunState wait(std::chrono::milliseconds timeout, std::string* detail) override {
    RunState worst = RunState::completed;
    for (auto& r : runs_) {
      std::string d;
      const RunState s = r->wait(timeout, &d);
      if (s != RunState::completed && worst == RunState::completed) {
        worst = s;
        if (detail) *detail = d;
      }
    }
    return worst;
  }

 private:
  std::vector<std::unique_ptr<PendingRun>> runs_;
};

class XrtKernel final : public LoadedKernel {
 public:
  XrtKernel(xrt::device device, xrt::hw_context context, xrt::kernel kernel)
      : device_(std::move(device)), context_(std::move(context)), kernel_(std::move(kernel)) {}

  std::unique_ptr<DeviceBuffer> alloc(BufferKind kind, size_t bytes) override {
    switch (kind) {
      case BufferKind::instructions:
        return std::make_unique<XrtBuffer>(xrt::bo(device_, bytes, XCL_BO_FLAGS_CACHEABLE, kernel_.group_id(1)));
      case BufferKind::a:
        return std::make_unique<XrtBuffer>(xrt::bo(device_, bytes, XRT_BO_FLAGS_HOST_ONLY, kernel_.group_id(3)));
      case BufferKind::b:
        return std::make_unique<XrtBuffer>(xrt::bo(device_, bytes, XRT_BO_FLAGS_HOST_ONLY, kernel_.group_id(4)));
      case BufferKind::c:
        return std::make_unique<XrtBuffer>(xrt::bo(device_, bytes, XRT_BO_FLAGS_HOST_ONLY, kernel_.group_id(5)));
      case BufferKind::d:
        return std::make_unique<XrtBuffer>(xrt::bo(device_, bytes, XRT_BO_FLAGS_HOST_ONLY, kernel_.group_id(6)));
    }
    throw std::invalid_argument("unknown buffer kind");
  }

  std::unique_ptr<DeviceBuffer> import(BufferKind kind, void* ptr, size_t bytes) override {
    if (!import_ok_ || kind == BufferKind::instructions || !ptr || bytes == 0 ||
        reinterpret_cast<uintptr_t>(ptr) % 4)  // the shim DMA addresses 32-bit words
      return nullptr;
    const long page_size = sysconf(_SC_PAGESIZE);
    const uintptr_t page = page_size > 0 ? static_cast<uintptr_t>(page_size) : 4096;
    const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    const uintptr_t begin = p & ~(page - 1), end = (p + bytes + page - 1) & ~(page - 1);
    try {
      xrt::bo whole(device_, reinterpret_cast<void*>(begin), end - begin, xrt::bo::flags::host_only, group_of(kind));
      xrt::bo sub(whole, bytes, p - begin);
      return std::make_unique<XrtImported>(std::move(whole), std::move(sub), ptr, bytes);
    } catch (const std::exception&) {
      import_ok_ = false;  // driver/XRT without user-pointer BOs: stage from now on
      return nullptr;
    }
  }

  std::unique_ptr<DeviceBuffer> sub_buffer(DeviceBuffer& parent, size_t offset, size_t bytes) override {
    if (offset > parent.size() || bytes > parent.size() - offset || bytes == 0)
      throw std::invalid_argument("sub-buffer outside its parent");
    xrt::bo& whole = bo_of(parent);
    xrt::bo sub(whole, bytes, offset);
    return std::make_unique<XrtImported>(whole, std::move(sub), static_cast<unsigned char*>(parent.map()) + offset,
                                         bytes);
  }

  std::unique_ptr<PendingRun> start_chain(const std::vector<RunArgs>& runs) override {
    if (runs.size() > 1 && chain_ok_) {
      try {
        xrt::runlist list(context_);
        std::vector<xrt::run> objects;
        for (const RunArgs& r : runs) {
          xrt::run run(kernel_);
          set_args(run, r);
          list.add(run);
          objects.push_back(std::move(run));
        }
        list.execute();  // one ERT_CMD_CHAIN: when it cannot be submitted, none of it runs
        return std::make_unique<XrtChain>(std::move(list), std::move(objects));
      } catch (const std::exception&) {
        chain_ok_ = false;  // no runlist support here (XRT plugin, firmware < 5.8): plain runs from now on
      }
    }
    std::vector<std::unique_ptr<PendingRun>> started;
    for (const RunArgs& r : runs) started.push_back(start(*r.instr, r.n_instr_words, *r.a, *r.b, *r.c));
    return std::make_unique<XrtRuns>(std::move(started));
  }

  std::unique_ptr<PendingRun> start(DeviceBuffer& instr, uint32_t n_instr_words, DeviceBuffer& a, DeviceBuffer& b,
                                    DeviceBuffer& c) override {
    constexpr unsigned int kOpcodeTransaction = 3;  // mlir-aie: "run the instruction stream in arg 1"
    // Exactly the five BOs/values the design declares: passing more makes XRT crash.
    return std::make_unique<XrtRun>(kernel_(kOpcodeTransaction, bo_of(instr), n_instr_words, bo_of(a), bo_of(b),
                                            bo_of(c)));
  }

  std::unique_ptr<PendingRun> start4(DeviceBuffer& instr, uint32_t n_instr_words, DeviceBuffer& a, DeviceBuffer& b,
                                     DeviceBuffer& c, DeviceBuffer& d) override {
    constexpr unsigned int kOpcodeTransaction = 3;
    return std::make_unique<XrtRun>(kernel_(kOpcodeTransaction, bo_of(instr), n_instr_words, bo_of(a), bo_of(b),
                                            bo_of(c), bo_of(d)));
  }

 private:
  xrt::memory_group group_of(BufferKind kind) {
    return kernel_.group_id(kind == BufferKind::a ? 3 : kind == BufferKind::b ? 4 : kind == BufferKind::c ? 5 : 6);
  }
  void set_args(xrt::run& run, const RunArgs& r) {
    run.set_arg(0, 3u);  // opcode: run the instruction stream in arg 1
    run.set_arg(1, bo_of(*r.instr));
    run.set_arg(2, r.n_instr_words);
    run.set_arg(3, bo_of(*r.a));
    run.set_arg(4, bo_of(*r.b));
    run.set_arg(5, bo_of(*r.c));
  }

  xrt::device device_;
  xrt::hw_context context_;  // must outlive the kernel and its runs
  xrt::kernel kernel_;
  std::atomic<bool> import_ok_{true}, chain_ok_{true};
};

class XrtDevice final : public NpuDevice {
 public:
  XrtDevice() : device_(0u) {}

  std::string description() const override {
    std::string name;
    try {
      name = device_.get_info<xrt::info::device::name>();
    } catch (const std::exception&) {
      name = "device 0";
    }
    return "XRT " + name;
  }

  std::unique_ptr<LoadedKernel> load(const std::string& xclbin_path, const std::string& kernel_name) override {
    xrt::xclbin xclbin(xclbin_path);
    // The xclbin may name its kernel with a suffix; take the first whose name starts with kernel_name.
    std::string name;
    for (const auto& k : xclbin.get_kernels())
      if (k.get_name().rfind(kernel_name, 0) == 0) {
        name = k.get_name();
        break;
      }
    if (name.empty()) throw std::runtime_error(xclbin_path + " has no kernel named " + kernel_name + "*");
    device_.register_xclbin(xclbin);
    xrt::hw_context context(device_, xclbin.get_uuid());
    xrt::kernel kernel(context, name);
    return std::make_unique<XrtKernel>(device_, std::move(context), std::move(kernel));
  }

 private:
  xrt::device device_;
};

}  // namespace
}  // namespace xdna::kernels::npu

extern "C" {

__attribute__((visibility("default"))) int xdna_xrt_shim_abi_version() {
  return xdna::kernels::npu::kShimAbiVersion;
}

__attribute__((visibility("default"))) xdna::kernels::npu::NpuDevice* xdna_xrt_open_device(char* err,
                                                                                          size_t err_size) {
  try {
    return new xdna::kernels::npu::XrtDevice();
  } catch (const std::exception& e) {
    if (err && err_size) std::snprintf(err, err_size, "%s", e.what());
  } catch (...) {
    if (err && err_size) std::snprintf(err, err_size, "unknown error");
  }
  return nullptr;
}

}  // extern "C"
