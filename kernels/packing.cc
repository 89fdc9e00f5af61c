#include "backend.h"

namespace xdna::kernels {

PackedB pack_b(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n) {
  PackedB out;
  out.shape = padded_shape(0, K, N);
  out.data.assign(static_cast<size_t>(out.shape.Kpad * out.shape.Npad), 0);  // pads are exact zeros
  const int64_t Kpad = out.shape.Kpad;
  // Walk the source in its own memory order (a transposed B, stride_k == 1, is read column by column).
  if (stride_k < stride_n) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        out.data[packed_b_offset(Kpad, k, n)] = f32_to_bf16(src[k * stride_k + n * stride_n]);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n)
        out.data[packed_b_offset(Kpad, k, n)] = f32_to_bf16(src[k * stride_k + n * stride_n]);
  }
  return out;
}

}  // namespace xdna::kernels
