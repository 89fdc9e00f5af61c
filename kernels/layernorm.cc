#include "kernels/layernorm.h"

#include <cmath>

namespace xdna::kernels {
namespace {

// ORT's x86-64 CPU kernel (onnxruntime 1.32, float, measured against it by tests/test_layernorm_prologue.py), per
// row:
//   mean = float(sum_k double(x_k) / K), the double sum in 4 lanes (lane k % 4 over the whole blocks of 4, then
//          (l0 + l2) + (l1 + l3)) and the tail added in order;
//   var  = sum_k (x_k - mean)^2 / K in float, two-pass: fma(d, d, lane) in 8 lanes over the whole blocks of 8,
//          then (a0 + a2) + (a1 + a3) with a_j = l_j + l_(j+4); of the tail, a block of 4 squared and added in order,
//          the rest by fma in order;
//   y    = fma((x - mean) * (1 / sqrt(var + eps)), gamma, beta), or (x - mean) * inv * gamma without beta.
// The lanes are written out so that any vectorisation keeps exactly this order. fma: Fma is std::fma, inlined
// as one instruction where the CPU has FMA (the target clone below).
template <bool kHardwareFma>
inline float fused(float a, float b, float c) {
  return std::fma(a, b, c);
}

template <bool kHardwareFma>
inline void layernorm_row(const float* __restrict x, float* __restrict y, int64_t K, const float* __restrict gamma,
                          const float* __restrict beta, float epsilon) {
  double lanes_d[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int j = 0; j < 4; ++j) lanes_d[j] += static_cast<double>(x[k + j]);
  double sum = (lanes_d[0] + lanes_d[2]) + (lanes_d[1] + lanes_d[3]);
  for (; k < K; ++k) sum += static_cast<double>(x[k]);
  const float mean = static_cast<float>(sum / static_cast<double>(K));

  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  k = 0;
  for (; k + 8 <= K; k += 8)
    for (int j = 0; j < 8; ++j) {
      const float d = x[k + j] - mean;
      lanes[j] = fused<kHardwareFma>(d, d, lanes[j]);
    }
  float a[4];
  for (int j = 0; j < 4; ++j) a[j] = lanes[j] + lanes[j + 4];
  float sum_sq = (a[0] + a[2]) + (a[1] + a[3]);
  if (K - k >= 4) {
    float sq[4];
    for (int j = 0; j < 4; ++j) {
      const float d = x[k + j] - mean;
      sq[j] = d * d;
    }
    for (int j = 0; j < 4; ++j) sum_sq += sq[j];
    k += 4;
  }
  for (; k < K; ++k) {
    const float d = x[k] - mean;
    sum_sq = fused<kHardwareFma>(d, d, sum_sq);
  }
  const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(K) + epsilon);
  if (beta)
    for (k = 0; k < K; ++k) y[k] = fused<kHardwareFma>((x[k] - mean) * inv, gamma[k], beta[k]);
  else
    for (k = 0; k < K; ++k) y[k] = (x[k] - mean) * inv * gamma[k];
}

void rows_portable(const float* x, float* y, int64_t rows, int64_t K, const float* gamma, const float* beta,
                   float epsilon) {
  for (int64_t m = 0; m < rows; ++m) layernorm_row<false>(x + m * K, y + m * K, K, gamma, beta, epsilon);
}

__attribute__((target("avx2,fma"))) void rows_fma(const float* x, float* y, int64_t rows, int64_t K,
                                                  const float* gamma, const float* beta, float epsilon) {
  for (int64_t m = 0; m < rows; ++m) layernorm_row<true>(x + m * K, y + m * K, K, gamma, beta, epsilon);
}

}  // namespace

void layernorm_rows(const float* x, float* y, int64_t rows, int64_t K, const float* gamma, const float* beta,
                    float epsilon) {
  static const bool fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  (fma ? rows_fma : rows_portable)(x, y, rows, K, gamma, beta, epsilon);
}

}  // namespace xdna::kernels
