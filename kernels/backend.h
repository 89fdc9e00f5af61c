// The backend interface: what the EP needs from a device that implements the GEMM contract.
// Knows nothing of ONNX Runtime: plain pointers, shapes and strides.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <map>

#include "attention_contract.h"
#include "gemm_contract.h"
#include "packing.h"

namespace xdna::kernels {

// Any failure of a backend step. The EP turns it into a logged CPU fallback for that node.
class BackendFault : public std::runtime_error {
 public:
  BackendFault(std::string step, const std::string& what)
      : std::runtime_error(step + ": " + what), step_(std::move(step)) {}
  const std::string& step() const { return step_; }  // "open", "load", "upload", "run", "timeout", "result"

 private:
  std::string step_;
};

// A weight as a backend holds it (e.g. a device buffer). Always keeps the host copy: it is the CPU fallback's input.
class DeviceWeight {
 public:
  explicit DeviceWeight(std::shared_ptr<const PackedB> host) : host_(std::move(host)) {}
  virtual ~DeviceWeight() = default;
  const PackedB& host() const { return *host_; }

 private:
  std::shared_ptr<const PackedB> host_;
};

// One GEMM call: C[M, N] (row stride ldc) = bf16(A)[M, K] (fp32, row stride lda) . B, or the same product in the
// precision B was packed in (int8: A quantised per row; bf16x3: A split into hi and lo parts).
struct GemmArgs {
  const float* a;
  int64_t M;
  int64_t lda;
  float* c;
  int64_t ldc;
  // Applied to C after the product (gemm_contract.h, "Epilogue"); empty: none. Added last so that existing
  // brace-initialised GemmArgs keep their meaning; held by value, so a deferred product carries its own.
  GemmEpilogue epilogue{};
};

// One product of a batch: C = A . B with B uploaded by the same backend.
struct BatchItem {
  GemmArgs args;
  const DeviceWeight* weight;
};

// A product whose B was never packed: fp32 B[k][n] = b[k * ldb + n], or b[n * ldb + k] when b_transposed, rounded
// to bf16 on the fly. Worth it when at most kUnpackedMaxM rows meet a B given at run time (B read M/4 times
// instead of packed once), e.g. decoder attention K/V.
inline constexpr int64_t kUnpackedMaxM = 16;
struct UnpackedGemm {
  GemmArgs args;   // A [M, K] and C [M, N]
  const float* b;
  int64_t ldb;
  bool b_transposed = false;
  // B in bfloat16 instead (b then null), same layout: read as it lies (already the bf16 values the rounding gives).
  const uint16_t* b_bf16 = nullptr;
};

// Two int8 products where the second reads the first's output as its A and nothing else reads it (an encoder FFN:
// fc1 + bias + GELU, then fc2 + bias + residual, both with constant weights uploaded by the same backend). first: A,
// M and the first epilogue (c unused: the intermediate is the backend's own); second: C and its epilogue (a unused).
// The same bits as gemm() of each in turn with the intermediate in memory between them.
// Fewer rows are never chained: such calls are bound by reading B, which the chain would read on one thread.
inline constexpr int64_t kInt8ChainMinRows = 17;
struct Int8Chain {
  GemmArgs first;
  const DeviceWeight* first_weight;
  GemmArgs second;
  const DeviceWeight* second_weight;
};

// Products of one A against several int8 weights of the same K (issue 13: the prompt run's twelve cross-attention
// K/V projections of one encoder output), A quantised once for all of them and their blocks run as one job. Each
// product writes C as fp32 (c, ldc), or rounded to bfloat16 as ORT's Cast rounds it (gemm_contract.h, "Output in
// bfloat16") into c_bf16 (row stride ldc_bf16) and/or, split into heads, into heads_bf16: C [B * T, H * D] written
// as [B, H, T, D] (T = rows_per_batch). The same bits as gemm() of each product with its own copy of A, then the
// rounding and head split of its fp32 C. Fewer than kInt8ChainMinRows rows are never shared (bound by reading B).
struct SharedAProduct {
  const DeviceWeight* weight = nullptr;
  GemmEpilogue epilogue{};
  float* c = nullptr;
  int64_t ldc = 0;
  uint16_t* c_bf16 = nullptr;
  int64_t ldc_bf16 = 0;
  uint16_t* heads_bf16 = nullptr;
  int64_t heads = 0, depth = 0, rows_per_batch = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;            // "emulator", "xrt"
  virtual std::string device_description() const = 0;
  // Whether this backend can run a GEMM of this shape (xrt: a kernel was built for it). M<=0 means "any M".
  virtual bool can_run(int64_t M, int64_t K, int64_t N, std::string* why_not) const = 0;
  // Whether this backend runs products in `precision` (gemm_contract.h, "Precision modes"), i.e. takes a weight
  // packed in it (PackedB::precision) in upload() and gemm(). Every backend runs bf16; a backend that declines a
  // mode says why, and the dispatcher runs that node's products on the CPU backend in the same precision.
  virtual bool supports(Precision precision, std::string* why_not) const {
    if (precision == Precision::kBf16) return true;
    if (why_not) *why_not = name() + " has no " + precision_name(precision) + " kernels";
    return false;
  }
  // can_run for a weight packed in `precision` (xrt: int8 products need an i8_f32 kernel of the shape, not a bf16
  // one). Added beside can_run (issue 13 item 3) so that existing callers and backends keep their meaning.
  virtual bool can_run_in(Precision precision, int64_t M, int64_t K, int64_t N, std::string* why_not) const {
    return supports(precision, why_not) && can_run(M, K, N, why_not);
  }
  // Makes a weight resident (xrt: copies it into a device buffer once). Throws BackendFault.
  virtual std::shared_ptr<DeviceWeight> upload(std::shared_ptr<const PackedB> b) = 0;
  // Runs one GEMM. Thread-safe. Throws BackendFault; on a throw C's contents are unspecified.
  virtual void gemm(const GemmArgs& args, const DeviceWeight& b) = 0;
  // Independent products (e.g. the heads of an attention MatMul) that a device may submit together (xrt: one
  // runlist). Default: gemm() each. Throws BackendFault; on a throw every C of the batch is unspecified.
  virtual void gemm_batch(const BatchItem* items, size_t count) {
    for (size_t i = 0; i < count; ++i) gemm(items[i].args, *items[i].weight);
  }
  // `count` independent products of one K x N shape with unpacked B. Only the CPU backend (the emulator) offers
  // this: it returns false when it does not, and never throws BackendFault.
  virtual bool gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N) {
    (void)calls, (void)count, (void)K, (void)N;
    return false;
  }
  // Whether an int8 (A8W8, gemm_contract.h) kernel exists for a padded K x N weight, and why not: the question the
  // EP's per-node precision asks before choosing int8 for a node on this backend.
  virtual bool has_int8_kernel(int64_t K, int64_t N, std::string* why_not) const {
    (void)K, (void)N;
    if (why_not) *why_not = name() + " has no int8 kernels";
    return false;
  }
  // Fused attention (attention_contract.h): whether this backend runs it for this shape, and why not.
  virtual bool can_run_attention(const AttentionShape& shape, std::string* why_not) const {
    (void)shape;
    if (why_not) *why_not = name() + " has no fused attention";
    return false;
  }
  // The same question with the heads' layout: a device kernel reads and writes them through strides fixed in its
  // program. Default: the shape alone decides.
  virtual bool can_run_attention_on(const AttentionShape& shape, const AttentionHead* heads, size_t count,
                                    std::string* why_not) const {
    (void)heads, (void)count;
    return can_run_attention(shape, why_not);
  }
  // Whether attention() reads heads with bf16 K^T / V (AttentionHead::kt_bf16, v_bf16); other backends are given
  // fp32 copies (widen_bf16_kv: the same bits).
  virtual bool reads_bf16_kv() const { return false; }
  // `count` heads of one shape. Throws BackendFault; on a throw every O is unspecified. Only called when
  // can_run_attention_on said yes.
  virtual void attention(const AttentionShape& shape, const AttentionHead* heads, size_t count) {
    (void)shape, (void)heads, (void)count;
    throw BackendFault("run", name() + " has no fused attention");
  }
  // Runs an Int8Chain in row panels, its intermediate kept in cache (issue 13). Only the CPU backend (the emulator)
  // offers this: false, nothing done, when a backend does not (the caller runs the two products one after the
  // other); never throws BackendFault.
  virtual bool gemm_int8_chain(const Int8Chain& chain) {
    (void)chain;
    return false;
  }
  // Whether gemm_int8_shared_a may take products (the caller asks before placing their outputs): only the CPU
  // backend (the emulator).
  virtual bool runs_int8_shared_a() const { return false; }
  // Runs `count` SharedAProducts of A [M, K] (row stride lda): false, nothing done, when a backend does not (the
  // caller runs each product on its own); never throws BackendFault.
  virtual bool gemm_int8_shared_a(const float* a, int64_t M, int64_t lda, const SharedAProduct* products,
                                  size_t count) {
    (void)a, (void)M, (void)lda, (void)products, (void)count;
    return false;
  }
};

struct BackendConfig {
  std::string kind = "auto";  // auto | emulator | xrt
  std::string kernel_dir;     // xrt: directory holding manifest.json + xclbins (empty: XDNA_KERNEL_DIR or default)
  std::string plugin_dir;     // where libxdna_xrt_backend.so lives (next to the EP library)
  int threads = 0;            // emulator: 0 = all cores
  // Testing aid: make the chosen backend fail at one step ("upload", "run", "result"; "" = never), to prove
  // that every fault ends in a logged CPU fallback with correct numbers.
  std::string fault_inject;
  // The XDNA_* environment variables that change what a backend does (kernel directory, device shim, fake faults,
  // timeouts, cost model), read once by with_environment(): backends read them from here, never from getenv, so
  // that two configurations differing only in the environment never share a backend.
  std::map<std::string, std::string> env;

  static const std::vector<std::string>& environment_knobs();
  BackendConfig& with_environment();                 // fills `env` from the process environment
  std::string env_value(const std::string& name) const;  // "" when unset
  std::string cache_key() const;                     // every field above
};

// Wraps `inner` so that it throws BackendFault(step) at the configured step (see BackendConfig::fault_inject);
// "result" corrupts nothing but reports a wrong result size, as a driver could.
std::unique_ptr<Backend> make_fault_injecting_backend(std::unique_ptr<Backend> inner, const std::string& step);

// Creates the backend named by cfg.kind. "auto" tries xrt and falls back to the emulator; `why` receives a
// human-readable account of every choice made (e.g. "xrt: no /dev/accel/accel0; using emulator").
// Throws std::runtime_error when an explicitly requested backend cannot be created.
std::unique_ptr<Backend> make_backend(const BackendConfig& cfg, std::string* why);

}  // namespace xdna::kernels
