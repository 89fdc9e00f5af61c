// The EP's allocator (issue 15): host memory the NPU reaches without per-call pinning (kernels/ep_buffers.h), offered
// to ORT through OrtEpFactory::CreateAllocator, and the data transfer ORT needs between it and CPU memory.
//
// Which memory ORT puts there depends on how the memory is registered (XDNA_EP_ALLOCATOR, read once per process):
//   off     nothing registered (ORT's CPU allocator everywhere; the backend imports ORT's buffers per call);
//   host    OrtDeviceMemoryType_HOST_ACCESSIBLE of an NPU device (CPU-readable staging memory);
//   device  OrtDeviceMemoryType_DEFAULT of an NPU device: the fused nodes' inputs and outputs are placed on the
//           "device" and ORT copies across every edge to a CPU node (docs/npu.md, "NPU buffers owned by the EP",
//           says what ORT 1.32 does with each).
#pragma once

#include <string>

#include "ort_api.h"

namespace xdna::ep {

enum class EpMemoryMode { kOff, kHostAccessible, kDevice };

// XDNA_EP_ALLOCATOR (off | host | device); unknown values are off, with *why saying so.
EpMemoryMode ep_memory_mode(std::string* why = nullptr);
const char* ep_memory_mode_name(EpMemoryMode mode);

// One per factory: the memory info registered with the EP device, the allocator ORT asks for, and the copies.
class EpMemory {
 public:
  EpMemory(const OrtApi& ort, const OrtEpApi& ep, EpMemoryMode mode);
  ~EpMemory();
  EpMemoryMode mode() const { return mode_; }
  // Registers the memory info with `device` (nothing for kOff).
  void register_with(OrtEpDevice* device) const;
  // nullptr when `info` is not ours.
  OrtAllocator* allocator_for(const OrtMemoryInfo* info);
  // nullptr for kOff / kHostAccessible (no device memory: ORT copies with its CPU transfer).
  OrtDataTransferImpl* data_transfer();

 private:
  const OrtApi& ort_;
  const OrtEpApi& ep_;
  EpMemoryMode mode_;
  OrtMemoryInfo* info_ = nullptr;
  struct Allocator;
  struct Transfer;
  Allocator* allocator_ = nullptr;
  Transfer* transfer_ = nullptr;
};

}  // namespace xdna::ep
