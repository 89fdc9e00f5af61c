// Packing: fp32 B -> the contract's bf16 tiled layout (gemm_contract.h), or the form of another precision mode
// (int8: quantised per output channel with its scales; bf16x3: hi and lo bf16 parts). The one place a B is
// packed: Compile packs every constant weight once in its node's precision (ep_plugin/ep.cc), a node packs a
// run-time B that has many rows against it (ep_plugin/dispatch.cc). The claim path only asks
// packing_size_problem() and precision_problem(), which read no data.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gemm_contract.h"

namespace xdna::kernels {

struct QuantizedB;  // emulator/emulator.h: int8 B, quantised per output channel
struct SplitB;      // emulator/emulator.h: bf16x3 B, hi and lo parts in the packed bf16 layout

// B in host memory, in the form its precision's kernels read. `shape` is the logical K x N (padded as the bf16
// layout pads it) whatever the precision. The bf16 layout is owned (`data`, packed here) or held elsewhere
// (`external`: Kpad * Npad values inside a memory-mapped EPContext payload, ep_plugin/ep_context.h, kept alive by
// `keep_alive`), so that a compiled model's weights are used where they lie instead of being copied.
struct PackedB {
  PaddedShape shape{};  // M fields unused
  std::vector<uint16_t> data;  // bf16: the packed bf16 B (other precisions, or `external`: empty)
  Precision precision = Precision::kBf16;
  std::shared_ptr<const QuantizedB> int8;  // int8 only
  std::shared_ptr<const SplitB> bf16x3;    // bf16x3 only
  const uint16_t* external = nullptr;
  std::shared_ptr<const void> keep_alive;
  const uint16_t* bits() const { return external ? external : data.data(); }
  size_t size() const { return external ? static_cast<size_t>(shape.Kpad * shape.Npad) : data.size(); }
};

// Packs B[k][n] = src[k * stride_k + n * stride_n] (strides in elements, so transB is stride_k=1, stride_n=K).
PackedB pack_b(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n);

// Packs B (strides as pack_b) in `precision`.
PackedB pack_b_in(Precision precision, const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n);

// Why `precision` cannot take a product with this inner dimension ("" when it can): int8 sums are exact in int32
// only up to kInt8MaxK.
std::string precision_problem(Precision precision, int64_t K);

// A constant B packed once per matrix of its batch dimensions (2-D B: one matrix, batch_shape empty).
struct PackedWeights {
  std::vector<int64_t> batch_shape;
  std::vector<std::shared_ptr<const PackedB>> mats;
};

// Packs every matrix of a constant B of `shape` [..., K, N] ([..., N, K] with trans_b; 1-D [K] is K x 1).
// `data` holds the product of `shape` floats, row-major.
PackedWeights pack_weights(const float* data, std::vector<int64_t> shape, bool trans_b,
                           Precision precision = Precision::kBf16);

// Why a constant B of `shape` should not be packed ("" when it may): padding every matrix to kTileK x kBlockN can
// cost far more than the weight (a [20000, 1, 1] weight of 80 KB packs to 630 MB), or the shape is unknown.
std::string packing_size_problem(std::vector<int64_t> shape, bool trans_b);

}  // namespace xdna::kernels
