// Packing: fp32 B -> the contract's bf16 tiled layout (gemm_contract.h). The one place a B is packed: Compile
// packs every constant weight once (ep_plugin/ep.cc), a node packs a run-time B that has many rows against it
// (ep_plugin/node_kernel.cc). The claim path only asks packing_size_problem(), which reads no data.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gemm_contract.h"

namespace xdna::kernels {

// B in the contract's packed bf16 layout, in host memory: owned (`data`, packed here) or held elsewhere (`external`:
// Kpad * Npad values inside a memory-mapped EPContext payload, ep_plugin/ep_context.h, kept alive by `keep_alive`),
// so that a compiled model's weights are used where they lie instead of being copied.
struct PackedB {
  PaddedShape shape{};  // M fields unused
  std::vector<uint16_t> data;
  const uint16_t* external = nullptr;
  std::shared_ptr<const void> keep_alive;
  const uint16_t* bits() const { return external ? external : data.data(); }
  size_t size() const { return external ? static_cast<size_t>(shape.Kpad * shape.Npad) : data.size(); }
};

// Packs B[k][n] = src[k * stride_k + n * stride_n] (strides in elements, so transB is stride_k=1, stride_n=K).
PackedB pack_b(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n);

// A constant B packed once per matrix of its batch dimensions (2-D B: one matrix, batch_shape empty).
struct PackedWeights {
  std::vector<int64_t> batch_shape;
  std::vector<std::shared_ptr<const PackedB>> mats;
};

// Packs every matrix of a constant B of `shape` [..., K, N] ([..., N, K] with trans_b; 1-D [K] is K x 1).
// `data` holds the product of `shape` floats, row-major.
PackedWeights pack_weights(const float* data, std::vector<int64_t> shape, bool trans_b);

// Why a constant B of `shape` should not be packed ("" when it may): padding every matrix to kTileK x kBlockN can
// cost far more than the weight (a [20000, 1, 1] weight of 80 KB packs to 630 MB), or the shape is unknown.
std::string packing_size_problem(std::vector<int64_t> shape, bool trans_b);

}  // namespace xdna::kernels
