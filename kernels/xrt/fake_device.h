// A fake NPU for tests: implements the device shim with separate "host" and "device" copies of every buffer
// (so a missing sync gives wrong numbers, as on the real NPU), executes a run with the emulator, and can fail
// at any protocol step. Its instruction streams are not AIE code: see fake_insts().
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "npu_device.h"

namespace xdna::kernels::npu {

// What the fake saw; shared with the test so it can check pooling and context sharing.
struct FakeStats {
  std::atomic<int> contexts{0};        // load() calls that succeeded
  std::atomic<int> buffers[5] = {};    // allocations by BufferKind
  std::atomic<int> runs{0};            // runs started
  std::atomic<int> submissions{0};     // start() calls plus start_chain() calls: what the driver would see
  std::atomic<int> imports{0};         // host buffers imported in place (user-pointer BOs)
  std::atomic<int> sub_buffers{0};     // views of an imported block (tensors in the EP's own memory)
};

struct FakeOptions {
  // Step to fail at: "open" (device creation), "load", "upload" (B buffer), "run" (start throws),
  // "run_state" (wait reports a failed command), "timeout", "result" (run completes without writing C),
  // "import" (the device refuses user-pointer buffers: the backend must stage); "" = never.
  std::string fail_at;
  std::shared_ptr<FakeStats> stats = std::make_shared<FakeStats>();
};

// Throws std::runtime_error for fail_at == "open", as xrt::device(0) does without a device.
std::unique_ptr<NpuDevice> make_fake_device(const FakeOptions& options);

// The "instruction stream" the fake executes: a header naming the GEMM one run computes. a_f32: the kernel reads
// A as fp32 and converts it to bf16 in the core with round-to-nearest-even (manifest dtype f32_f32).
std::vector<uint32_t> fake_insts(int64_t m_rows, int64_t Kpad, int64_t Npad, bool a_f32 = false);
// The same for an i8_f32 kernel: A and B int8 with their scales in the layout of int8_layout.h.
std::vector<uint32_t> fake_insts_i8(int64_t m_rows, int64_t Kpad, int64_t Npad);
// The same for an attn_f32 kernel (kernels/aie/attention_design.py): self-attention over T rows, H heads of 64,
// Q/K/V rows strided by ld, head h's output row t at h * o_head + t * ldo, scores scaled by `scale`.
std::vector<uint32_t> fake_insts_attention(int64_t T, int64_t H, int64_t ld, int64_t ldo, int64_t o_head, float scale);

}  // namespace xdna::kernels::npu
