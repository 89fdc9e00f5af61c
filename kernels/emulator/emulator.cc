// Placeholder straightforward emulator; replaced by the blocked/vectorised version.
#include "emulator.h"

#include <vector>

namespace xdna::kernels {

void reference_gemm(const GemmArgs& args, const PackedB& b) {
  const auto& s = b.shape;
  for (int64_t m = 0; m < args.M; ++m)
    for (int64_t n = 0; n < s.N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < s.K; ++k)
        acc += round_to_bf16(args.a[m * args.lda + k]) * bf16_to_f32(b.data[packed_b_offset(s.Kpad, k, n)]);
      args.c[m * args.ldc + n] = acc;
    }
}

void emulator_gemm(const GemmArgs& args, const PackedB& b, int) { reference_gemm(args, b); }

namespace {
class EmulatorBackend final : public Backend {
 public:
  explicit EmulatorBackend(int threads) : threads_(threads) {}
  std::string name() const override { return "emulator"; }
  std::string device_description() const override { return "CPU emulator of the NPU GEMM contract"; }
  bool can_run(int64_t, int64_t, int64_t, std::string*) const override { return true; }
  std::shared_ptr<DeviceWeight> upload(std::shared_ptr<const PackedB> b) override {
    return std::make_shared<DeviceWeight>(std::move(b));
  }
  void gemm(const GemmArgs& args, const DeviceWeight& b) override { emulator_gemm(args, b.host(), threads_); }

 private:
  int threads_;
};
}  // namespace

std::unique_ptr<Backend> make_emulator_backend(int threads) { return std::make_unique<EmulatorBackend>(threads); }

}  // namespace xdna::kernels
