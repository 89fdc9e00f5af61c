#include "backend.h"

namespace xdna::kernels {
namespace {

class FaultInjectingBackend final : public Backend {
 public:
  FaultInjectingBackend(std::unique_ptr<Backend> inner, std::string step)
      : inner_(std::move(inner)), step_(std::move(step)) {}
  std::string name() const override { return inner_->name(); }
  std::string device_description() const override {
    return inner_->device_description() + " [fault injected at '" + step_ + "']";
  }
  bool can_run(int64_t M, int64_t K, int64_t N, std::string* why) const override {
    return inner_->can_run(M, K, N, why);
  }
  bool supports(Precision precision, std::string* why) const override { return inner_->supports(precision, why); }
  std::shared_ptr<DeviceWeight> upload(std::shared_ptr<const PackedB> b) override {
    if (step_ == "upload") throw BackendFault("upload", "injected fault");
    return inner_->upload(std::move(b));
  }
  void gemm(const GemmArgs& args, const DeviceWeight& b) override {
    if (step_ == "run") throw BackendFault("run", "injected fault");
    if (step_ == "timeout") throw BackendFault("timeout", "injected fault: command did not complete");
    inner_->gemm(args, b);
    if (step_ == "result") throw BackendFault("result", "injected fault: result buffer has the wrong size");
  }
  bool has_int8_kernel(int64_t K, int64_t N, std::string* why) const override {
    return inner_->has_int8_kernel(K, N, why);
  }
  bool can_run_attention(const AttentionShape& shape, std::string* why) const override {
    return inner_->can_run_attention(shape, why);
  }
  void attention(const AttentionShape& shape, const AttentionHead* heads, size_t count) override {
    if (step_ == "run") throw BackendFault("run", "injected fault");
    if (step_ == "timeout") throw BackendFault("timeout", "injected fault: command did not complete");
    inner_->attention(shape, heads, count);
    if (step_ == "result") throw BackendFault("result", "injected fault: result buffer has the wrong size");
  }

 private:
  std::unique_ptr<Backend> inner_;
  std::string step_;
};

}  // namespace

std::unique_ptr<Backend> make_fault_injecting_backend(std::unique_ptr<Backend> inner, const std::string& step) {
  if (step != "upload" && step != "run" && step != "timeout" && step != "result")
    throw std::runtime_error("unknown fault_inject step '" + step + "' (upload, run, timeout, result)");
  return std::make_unique<FaultInjectingBackend>(std::move(inner), step);
}

}  // namespace xdna::kernels
