#include "ep_allocator.h"

#include <cstdlib>
#include <cstring>

#include "kernels/ep_buffers.h"

namespace xdna::ep {

EpMemoryMode ep_memory_mode(std::string* why) {
  const char* v = std::getenv("XDNA_EP_ALLOCATOR");
  const std::string s = v ? v : "";
  if (s == "host") return EpMemoryMode::kHostAccessible;
  if (s == "device") return EpMemoryMode::kDevice;
  if (why && !s.empty() && s != "off") *why = "XDNA_EP_ALLOCATOR=" + s + " is not off, host or device: off";
  return EpMemoryMode::kOff;
}

const char* ep_memory_mode_name(EpMemoryMode mode) {
  switch (mode) {
    case EpMemoryMode::kHostAccessible: return "host";
    case EpMemoryMode::kDevice: return "device";
    default: return "off";
  }
}

struct EpMemory::Allocator : OrtAllocator {
  explicit Allocator(const OrtMemoryInfo* info) : OrtAllocator{}, info(info) {
    version = ORT_API_VERSION;
    Alloc = [](OrtAllocator*, size_t size) noexcept { return kernels::ep_buffer_alloc(size); };
    Free = [](OrtAllocator*, void* p) noexcept { kernels::ep_buffer_free(p); };
    Info = [](const OrtAllocator* self) noexcept { return static_cast<const Allocator*>(self)->info; };
    Reserve = Alloc;
  }
  const OrtMemoryInfo* info;
};

// Copies between CPU memory and ours: both are host memory, so a memcpy (the NPU sees ours after the backend's
// cache maintenance, which every run does).
struct EpMemory::Transfer : OrtDataTransferImpl {
  Transfer(const OrtApi& ort, const OrtEpApi& ep, const OrtMemoryDevice* ours)
      : OrtDataTransferImpl{}, ort(ort), ep(ep), ours(ours) {
    ort_version_supported = ORT_API_VERSION;
    Release = [](OrtDataTransferImpl*) noexcept {};  // owned by EpMemory
    CanCopy = [](const OrtDataTransferImpl* self, const OrtMemoryDevice* src, const OrtMemoryDevice* dst) noexcept {
      const auto& t = *static_cast<const Transfer*>(self);
      auto host_side = [&](const OrtMemoryDevice* d) {
        return t.ep.MemoryDevice_AreEqual(d, t.ours) || t.ep.MemoryDevice_GetDeviceType(d) == OrtMemoryInfoDeviceType_CPU;
      };
      return (t.ep.MemoryDevice_AreEqual(src, t.ours) || t.ep.MemoryDevice_AreEqual(dst, t.ours)) && host_side(src) &&
             host_side(dst);
    };
    CopyTensors = [](OrtDataTransferImpl* self, const OrtValue** src, OrtValue** dst, OrtSyncStream**,
                     size_t n) noexcept {
      auto& t = *static_cast<Transfer*>(self);
      return guard(t.ort, [&] {
        for (size_t i = 0; i < n; ++i) {
          size_t src_bytes = 0, dst_bytes = 0;
          check(t.ort, t.ort.GetTensorSizeInBytes(src[i], &src_bytes));
          check(t.ort, t.ort.GetTensorSizeInBytes(dst[i], &dst_bytes));
          if (src_bytes != dst_bytes) throw OrtError(ORT_INVALID_ARGUMENT, "copy between tensors of different sizes");
          const void* from = nullptr;
          void* to = nullptr;
          check(t.ort, t.ort.GetTensorData(src[i], &from));
          check(t.ort, t.ort.GetTensorMutableData(dst[i], &to));
          if (src_bytes) std::memcpy(to, from, src_bytes);
          ++t.copies;
          t.bytes += src_bytes;
        }
      });
    };
  }
  const OrtApi& ort;
  const OrtEpApi& ep;
  const OrtMemoryDevice* ours;
  uint64_t copies = 0, bytes = 0;
};

EpMemory::EpMemory(const OrtApi& ort, const OrtEpApi& ep, EpMemoryMode mode) : ort_(ort), ep_(ep), mode_(mode) {
  if (mode_ == EpMemoryMode::kOff) return;
  const bool device = mode_ == EpMemoryMode::kDevice;
  // An NPU-type device of AMD: ORT keys memory by (type, memory type, vendor, id).
  check(ort_, ort_.CreateMemoryInfo_V2(device ? "XDNA NPU" : "XDNA NPU host", OrtMemoryInfoDeviceType_NPU, 0x1022, 0,
                                       device ? OrtDeviceMemoryType_DEFAULT : OrtDeviceMemoryType_HOST_ACCESSIBLE,
                                       /*alignment*/ 4096, OrtDeviceAllocator, &info_));
  allocator_ = new Allocator(info_);
  if (device) transfer_ = new Transfer(ort_, ep_, ep_.MemoryInfo_GetMemoryDevice(info_));
}

EpMemory::~EpMemory() {
  delete transfer_;
  delete allocator_;
  if (info_) ort_.ReleaseMemoryInfo(info_);
}

void EpMemory::register_with(OrtEpDevice* device) const {
  if (info_) check(ort_, ep_.EpDevice_AddAllocatorInfo(device, info_));
}

OrtAllocator* EpMemory::allocator_for(const OrtMemoryInfo* info) {
  if (!info_ || !info) return nullptr;
  int same = 0;
  OrtStatus* st = ort_.CompareMemoryInfo(info, info_, &same);
  if (st) ort_.ReleaseStatus(st);
  return info == info_ || (!st && same == 0) ? allocator_ : nullptr;
}

OrtDataTransferImpl* EpMemory::data_transfer() { return transfer_; }

}  // namespace xdna::ep
