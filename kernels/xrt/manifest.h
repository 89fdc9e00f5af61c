// The kernel manifest: which AIE GEMM kernels were built (by kernels/aie/build_kernels.py) and where they are.
//
// <kernel_dir>/manifest.json:
//   { "format": "onnxruntime-ep-xdna-kernels", "contract_version": 1,
//     "tile": {"m": 64, "k": 64, "n": 64}, "array": {"rows": 4, "cols": 4}, "device": "npu1",
//     "kernels": [ {"K": 512, "N": 2048, "m_rows": 256, "dtype": "bf16_f32",
//                   "xclbin": "gemm_k512.xclbin", "insts": "gemm_k512_n2048_m256.insts.bin",
//                   "kernel": "MLIR_AIE"}, ... ] }
// K and N are the padded sizes the kernel computes (Kpad, Npad of gemm_contract.h); m_rows is how many rows of
// A (a multiple of kBlockM) one run consumes. Kernels with the same xclbin share one hardware context.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace xdna::kernels::npu {

inline constexpr int kContractVersion = 1;
inline constexpr const char* kManifestFormat = "onnxruntime-ep-xdna-kernels";

struct KernelEntry {
  int64_t K = 0, N = 0, m_rows = 0;  // padded K, padded N, rows of A per run
  std::string xclbin;                // absolute path
  std::string insts;                 // absolute path
  std::string kernel_name = "MLIR_AIE";
  // dtype "f32_f32" (issue 15): A is read as fp32 straight from ORT's buffer and converted to bf16 in the core
  // (round to nearest even); m_rows may be any height (the build makes >= 256: its last 256-row block overlaps the
  // one before, so no transfer leaves A or C; see gemm_design.py plan_f32).
  bool a_f32 = false;
  // dtype "i8_f32" (issue 13, kernels/aie/gemm_int8_design.py): int8 A and B in the layout of int8_layout.h.
  bool int8 = false;
};

// dtype "attn_f32" (issue 15, kernels/aie/attention_design.py): fused self-attention over T rows and H heads of 64;
// Q, K, V rows strided by ld, head h's output row t at h * o_head + t * ldo; the scale is a constant of the xclbin.
//   {"dtype": "attn_f32", "T": 1500, "H": 8, "ld": 512, "ldo": 64, "o_head": 96000, "scale": 0.125, "xclbin": ...}
struct AttentionEntry {
  int64_t T = 0, H = 0, ld = 0, ldo = 0, o_head = 0;
  float scale = 0.f;
  std::string xclbin, insts, kernel_name = "MLIR_AIE";
};

struct Manifest {
  std::string dir;
  std::vector<AttentionEntry> attention_kernels;
  std::vector<KernelEntry> kernels;
  // dtype "i8_f32" (issue 13, kernels/aie/gemm_int8_design.py): int8 A8W8 kernels, run for int8 weights.
  std::vector<KernelEntry> int8_kernels;
  std::vector<std::string> skipped;  // entries ignored, with the reason (wrong dtype, bad padding, missing file)
};

// Limits on what a kernel directory may hold. A manifest is data from disk: a hostile or broken one must get a
// clear refusal, never a hang (FIFO), an allocation of its choosing, or sizes that overflow.
inline constexpr int64_t kMaxKernelK = int64_t{1} << 20;      // padded K and N of one kernel
inline constexpr int64_t kMaxKernelN = int64_t{1} << 20;
inline constexpr int64_t kMaxKernelRows = int64_t{1} << 16;   // m_rows: rows of A per run
inline constexpr int64_t kMaxManifestBytes = int64_t{1} << 20;
inline constexpr int64_t kMaxInstsBytes = int64_t{64} << 20;
inline constexpr int64_t kMaxXclbinBytes = int64_t{512} << 20;

// Reads <dir>/manifest.json. Returns false with *why on a missing/unreadable/incompatible manifest.
// Entries whose files are not regular files inside `dir` (no absolute paths, no "..", no symlink leading out),
// are larger than the caps above, or whose K, N, m_rows are out of range are skipped with the reason.
bool load_manifest(const std::string& dir, Manifest* out, std::string* why);

// Reads a regular file of at most max_bytes (opened without blocking: a FIFO or device is refused, not waited on).
// Returns false with *why otherwise.
bool read_regular_file(const std::string& path, int64_t max_bytes, std::string* data, std::string* why);

// cfg.kernel_dir, else $XDNA_KERNEL_DIR, else ~/.cache/onnxruntime-ep-xdna/kernels.
std::string resolve_kernel_dir(const std::string& configured, const std::string& from_env);

}  // namespace xdna::kernels::npu
