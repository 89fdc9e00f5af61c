// The device layout of the i8_f32 kernels (kernels/aie/gemm_int8_design.py), shared by the xrt backend (which
// writes A and B in it) and the fake device (which reads them). A and B are sequences of objects, one per 64x64
// tile: the int8 tile blocked for aie::mmul<4, 8, 8> (A: 4x8 blocks, B: 8x8 blocks; each block row-major, blocks
// row-major), then 64 fp32 scales (A: the slab's rows, repeated in every K-tile object of the slab; B: the
// n-tile's columns). A: object (slab, kt) at (slab * K/64 + kt) * kObjBytes; B: object (n-tile, kt) at
// (nt * K/64 + kt) * kObjBytes. C is fp32 row-major as for bf16.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xdna::kernels::npu::i8 {

inline constexpr int64_t kTile = 64;
inline constexpr int64_t kTileBytes = kTile * kTile;
inline constexpr int64_t kObjBytes = kTileBytes + kTile * 4;

inline size_t a_bytes(int64_t rows, int64_t Kpad) { return static_cast<size_t>(rows / kTile * (Kpad / kTile) * kObjBytes); }
inline size_t b_bytes(int64_t Kpad, int64_t Npad) { return static_cast<size_t>(Npad / kTile * (Kpad / kTile) * kObjBytes); }

// Object of A element (m, k): its byte offset; the element's byte inside the object is a_in_tile(m, k).
inline size_t a_obj(int64_t m, int64_t k, int64_t Kpad) {
  return static_cast<size_t>((m / kTile * (Kpad / kTile) + k / kTile) * kObjBytes);
}
inline size_t a_in_tile(int64_t m, int64_t k) {
  const int64_t r = m % kTile, c = k % kTile;
  return static_cast<size_t>(((r / 4) * (kTile / 8) + c / 8) * 32 + (r % 4) * 8 + c % 8);
}
inline size_t b_obj(int64_t k, int64_t n, int64_t Kpad) {
  return static_cast<size_t>((n / kTile * (Kpad / kTile) + k / kTile) * kObjBytes);
}
inline size_t b_in_tile(int64_t k, int64_t n) {
  const int64_t r = k % kTile, c = n % kTile;
  return static_cast<size_t>(((r / 8) * (kTile / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8);
}
// Byte of the scale of A row m / B column n inside an object.
inline size_t scale_in_obj(int64_t i) { return static_cast<size_t>(kTileBytes + (i % kTile) * 4); }

}  // namespace xdna::kernels::npu::i8
