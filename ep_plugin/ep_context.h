// EPContext: a fused node's compiled form (its plans and packed weights) as one versioned binary payload, written
// into an EPContext node (embed mode) or a side file next to the compiled model (external mode), and read back so
// that a session starts from the packed weights without reading or packing the fp32 ones. bf16 layouts (bf16, bf16x3's
// hi and lo) are used in place; int8's arrays are copied once into the emulator's QuantizedB at load.
//
// Payload (little-endian, as the x86-64 hosts that run the EP):
//   magic "XDNAEPC\0" | u32 format version | u64 total size | u64 data offset | u64 metadata checksum
//   | u64 data checksum | metadata | zero padding | data
//   metadata: strings ep version, contract, backend, precision policy | u32 node count | per node: its OpPlan field
//   by field (its precision among them), then its packed weights (batch shape; per matrix its precision, K, N,
//   Kpad, Npad and where each of its arrays lies in data: bf16 one, bf16x3 hi and lo, int8 q, scales, column sums)
//   data: every packed matrix, each at a kDataAlignment-aligned offset, so that it is used in place: straight from
//   the memory-mapped side file, or from one aligned copy of the attribute (ORT owns the attribute's bytes only
//   while Compile runs).
// Reading validates every length and offset before use and checks both checksums: a corrupt or truncated payload is
// a clear error, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/packing.h"
#include "ops/op.h"

namespace xdna::ep {

// 2: plans carry precision, v and attention_scale (kAttention); weights in int8 and bf16x3 as well as bf16.
// 3: plans carry the GEMM epilogue (bias, bias_value, epilogue_gelu, residual).
// 4: plans carry the fused attention's mask and NaN rule (attention_mask, attention_zero_nan).
// 5: operands carry the head split they are read through (Operand::split); attention plans the head merge.
// 6: plans carry output_bf16 (a MatMul that took its trailing Cast to bfloat16).
// 7: plans carry the cache append (cache_past, cache_heads, cache_depth).
// 8: plans carry the LayerNormalization A prologue (layernorm_output, _epsilon, _scale, _bias).
// 9: a Conv weight is packed tap-major (B[kk * Cin + ci][co], ops/op.h ConvParams).
// 10: Conv plans carry the Transpose and constant residual after them (conv_time_major, residual_value).
// 11: MatMul plans carry the head split after their bf16 output (head_split_heads, _depth, _frames_first).
inline constexpr uint32_t kContextFormatVersion = 11;
inline constexpr size_t kDataAlignment = 64;

// What a payload must match to be loaded: anything else is refused with the differing field named.
struct ContextIdentity {
  std::string ep_version;  // pyproject's version (kEpVersion)
  std::string contract;    // the GEMM contract and its tiling (contract_id())
  std::string backend;     // the session's primary backend: "emulator", "xrt"
  std::string precision;   // the session's precision policy (EpOptions::precision.describe(): mode and rules)
};

// The contract and tiling the packed weights follow: changes whenever gemm_contract.h's layout does.
std::string contract_id();

struct CompiledNode {
  ops::OpPlan plan;
  kernels::PackedWeights weights;
};

// Bytes of a payload that must outlive every kernel built from them.
struct PayloadBytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> owner;  // the mapping or the buffer
};

// The payload of one fused node.
std::string write_context(const ContextIdentity& id, const std::vector<CompiledNode>& nodes);

// Reads a payload: the nodes' weights point into `bytes` (kept alive through PackedB::keep_alive). Throws OrtError
// naming `where` and what is wrong or differs from `expected`.
std::vector<CompiledNode> read_context(const PayloadBytes& bytes, const ContextIdentity& expected,
                                       const std::string& where);

// The identity stored in a payload (for messages and the compatibility check), read without the nodes.
ContextIdentity read_identity(const PayloadBytes& bytes, const std::string& where);

// A side file mapped read-only (throws OrtError, its message starting with `where`, when it cannot be opened or
// mapped).
PayloadBytes map_file(const std::string& path, const std::string& where);
// An aligned buffer of `size` bytes for a payload (filled by the caller).
PayloadBytes allocate_payload(size_t size);

// Self-check of the plan serialiser: every OpPlan field set to a non-default value, written and read back, compared
// field by field. Returns "" or the first field that did not survive (tests call it through the Python module).
std::string plan_roundtrip_problem();

}  // namespace xdna::ep
