// The device shim: the few XRT operations the GEMM protocol (npu_backend.cc) needs, and nothing XRT-specific.
// Two implementations: the real one over XRT (xrt_device.cc, in libxdna_xrt_backend.so) and a fake that
// "executes" kernels with the emulator and can fail at any step (fake_device.cc, for tests).
//
// Error convention: every method may throw any std::exception (XRT throws std::runtime_error, std::system_error,
// xrt::run::command_error ...). npu_backend.cc knows which protocol step it was in and turns the exception into
// a BackendFault with that step. Only std::exception crosses the dlopen boundary (its type_info lives in
// libstdc++, so catching it works across shared objects; our own exception types would not be safe there).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace xdna::kernels::npu {

// Version of this interface; libxdna_xrt_backend.so reports the one it was built with and the loader refuses a
// mismatch (a stale library next to a newer EP).
inline constexpr int kShimAbiVersion = 4;  // 2: import(), start_chain() (issue 15); 3: sub_buffer(); 4: start4()

// The kernel arguments of an mlir-aie GEMM design: kernel(opcode 3, instr BO, n_instr_words, A, B, C); the fused
// attention design has a fourth operand: kernel(3, instr, n, Q, K, V, O).
// Each kind maps to a buffer flag and an argument's memory group: instructions -> cacheable, group_id(1);
// a/b/c/d -> host_only, group_id(3/4/5/6).
enum class BufferKind { instructions, a, b, c, d };

class DeviceBuffer {
 public:
  virtual ~DeviceBuffer() = default;
  virtual void* map() = 0;            // host view of the buffer, valid for the buffer's lifetime
  virtual size_t size() const = 0;    // bytes
  virtual void to_device(size_t bytes, size_t offset) = 0;    // make host writes visible to the NPU
  virtual void from_device(size_t bytes, size_t offset) = 0;  // make NPU writes visible to the host
};

enum class RunState { completed, timeout, failed };

class PendingRun {
 public:
  virtual ~PendingRun() = default;
  // Waits up to `timeout` for the command. On `timeout` the shim has already tried to abort it. `detail`
  // receives the command state for anything but `completed`.
  virtual RunState wait(std::chrono::milliseconds timeout, std::string* detail) = 0;
};

// One run of a chain: the arguments of start().
struct RunArgs {
  DeviceBuffer* instr;
  uint32_t n_instr_words;
  DeviceBuffer *a, *b, *c;
};

// One xclbin registered on the device with its own hardware context, and its kernel.
class LoadedKernel {
 public:
  virtual ~LoadedKernel() = default;
  virtual std::unique_ptr<DeviceBuffer> alloc(BufferKind kind, size_t bytes) = 0;
  // Starts kernel(3, instr, n_instr_words, a, b, c). The buffers must stay alive until the run is waited for.
  virtual std::unique_ptr<PendingRun> start(DeviceBuffer& instr, uint32_t n_instr_words, DeviceBuffer& a,
                                            DeviceBuffer& b, DeviceBuffer& c) = 0;
  // Host memory [ptr, ptr + bytes) as a buffer of `kind`, without a copy (XRT: a user-pointer BO over the enclosing
  // pages, the amdxdna rule, and a sub-buffer at ptr's offset). map() is ptr itself; to_device/from_device are
  // the cache maintenance the NPU needs. Returns nullptr when the memory cannot be imported (the caller stages).
  // The memory must stay valid until the runs using the buffer are waited for and the buffer is destroyed.
  virtual std::unique_ptr<DeviceBuffer> import(BufferKind kind, void* ptr, size_t bytes) = 0;
  // [offset, offset + bytes) of `parent` (an imported or allocated buffer of this kernel's device) as a buffer of
  // its own, without pinning anything again (XRT: a sub-BO). The parent must outlive it. Used for tensors in the
  // EP's own memory (kernels/ep_buffers.h): the block is imported once, each run gets a view of its tensor.
  virtual std::unique_ptr<DeviceBuffer> sub_buffer(DeviceBuffer& parent, size_t offset, size_t bytes) = 0;
  // Starts the runs as one submission (XRT runlist, one ERT_CMD_CHAIN); waiting for it waits for all of them.
  virtual std::unique_ptr<PendingRun> start_chain(const std::vector<RunArgs>& runs) = 0;
  // Starts kernel(3, instr, n_instr_words, a, b, c, d): a design with four operands (fused attention: Q, K, V, O
  // as buffers of kinds a, b, c, d).
  virtual std::unique_ptr<PendingRun> start4(DeviceBuffer& instr, uint32_t n_instr_words, DeviceBuffer& a,
                                             DeviceBuffer& b, DeviceBuffer& c, DeviceBuffer& d) = 0;
};

class NpuDevice {
 public:
  virtual ~NpuDevice() = default;
  virtual std::string description() const = 0;
  // Reads the xclbin, registers it, creates a hardware context and the kernel named `kernel_name`.
  // Every call creates one more hardware context (Phoenix allows 6 per device, shared by all processes).
  virtual std::unique_ptr<LoadedKernel> load(const std::string& xclbin_path, const std::string& kernel_name) = 0;
};

}  // namespace xdna::kernels::npu

// The C entry points of libxdna_xrt_backend.so (resolved with dlsym by xrt_loader.cc).
extern "C" {
using xdna_xrt_shim_abi_version_fn = int (*)();
// Opens xrt::device(0). Returns nullptr and writes a NUL-terminated reason into err on failure; never throws.
using xdna_xrt_open_device_fn = xdna::kernels::npu::NpuDevice* (*)(char* err, size_t err_size);
}
