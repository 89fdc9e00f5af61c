// Provider options of XDNAExecutionProvider, parsed and validated once at session creation.
#pragma once

#include <string>

#include "ops/precision_policy.h"
#include "ort_api.h"

namespace xdna::ep {

inline constexpr const char* kEpName = "XDNAExecutionProvider";
inline constexpr const char* kEpVendor = "AMD";
inline constexpr uint32_t kAmdVendorId = 0x1022;
inline constexpr const char* kEpVersion = XDNA_VERSION;  // pyproject.toml's, set by CMakeLists.txt

struct EpOptions {
  std::string backend = "auto";   // auto | emulator | xrt
  double min_mflop = 0.0;         // nodes with fewer (statically known) MFLOP per run stay on the CPU EP
  OrtLoggingLevel log_level = ORT_LOGGING_LEVEL_WARNING;
  int threads = 0;                // emulator worker threads, 0 = all cores
  bool ort_threads_spin = true;   // session.intra_op.allow_spinning is not "0" (ORT's default)
  std::string kernel_dir;         // xrt: manifest directory (else $XDNA_KERNEL_DIR, else the cache)
  std::string partition_report;   // if set: write one JSON line per considered node (used by `xdna partition`)
  std::string fault_inject;       // testing: make the backend fail at upload|run|timeout|result
  // EPContext (ep_plugin/ep_context.h), ORT's session config entries (onnxruntime.ModelCompiler sets them too):
  bool context_enable = false;        // ep.context_enable=1: Compile returns one EPContext node per fused node
  bool context_embed = false;         // ep.context_embed_mode=1: payload inside the node, else in a side file
  std::string context_file_path;      // ep.context_file_path: the compiled model's path (side files go next to it)
  std::string context_node_prefix;    // ep.context_node_name_prefix
  // `precision` (bf16 | int8 | bf16x3) and `precision_policy` (per-node rules, ops/precision_policy.h) together
  ops::PrecisionPolicy precision;
};

// Reads `ep.xdnaexecutionprovider.<key>` entries (how ORT delivers provider options to plugin EPs).
// Unknown keys and bad values throw OrtError(ORT_INVALID_ARGUMENT) naming the key and what is accepted.
EpOptions parse_options(const OrtApi& api, const OrtSessionOptions* session_options);

// A session config entry's value ("" when absent).
std::string config_entry(const OrtApi& api, const OrtSessionOptions* so, const char* key);


}  // namespace xdna::ep
