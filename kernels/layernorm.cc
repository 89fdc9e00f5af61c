#include "kernels/layernorm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/emulator/emulator.h"
#include "kernels/emulator/emulator_isa.h"

namespace xdna::kernels {
namespace {

// The variance's sum after the whole blocks of 8 (from k): a block of 4 squared, then added in order; the rest by
// fma in order.
inline float add_tail_squares(const float* x, int64_t k, int64_t K, float mean, float sum_sq) {
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
    sum_sq = std::fma(d, d, sum_sq);
  }
  return sum_sq;
}

inline float inverse_deviation(float sum_sq, int64_t K, float epsilon) {
  return 1.f / std::sqrt(sum_sq / static_cast<float>(K) + epsilon);
}

// y[k..K) of a row with its mean and inverse deviation.
inline void normalise(const float* __restrict x, float* __restrict y, int64_t k, int64_t K, float mean, float inv,
                      const float* __restrict gamma, const float* __restrict beta) {
  if (beta)
    for (; k < K; ++k) y[k] = std::fma((x[k] - mean) * inv, gamma[k], beta[k]);
  else
    for (; k < K; ++k) y[k] = (x[k] - mean) * inv * gamma[k];
}

// ORT's x86-64 CPU kernel (onnxruntime 1.32, float, measured against it by tests/test_layernorm_prologue.py), per
// row:
//   mean = float(sum_k double(x_k) / K), the double sum in 4 lanes (lane k % 4 over the whole blocks of 4, then
//          (l0 + l2) + (l1 + l3)) and the tail added in order;
//   var  = sum_k (x_k - mean)^2 / K in float, two-pass: fma(d, d, lane) in 8 lanes over the whole blocks of 8,
//          then (a0 + a2) + (a1 + a3) with a_j = l_j + l_(j+4); of the tail, a block of 4 squared and added in order,
//          the rest by fma in order;
//   y    = fma((x - mean) * (1 / sqrt(var + eps)), gamma, beta), or (x - mean) * inv * gamma without beta.
// Written out lane by lane here (any CPU; std::fma in libm), and with AVX2 + FMA vectors in rows_fma.
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
      lanes[j] = std::fma(d, d, lanes[j]);
    }
  float a[4];
  for (int j = 0; j < 4; ++j) a[j] = lanes[j] + lanes[j + 4];
  const float sum_sq = add_tail_squares(x, k, K, mean, (a[0] + a[2]) + (a[1] + a[3]));
  normalise(x, y, 0, K, mean, inverse_deviation(sum_sq, K, epsilon), gamma, beta);
}

void rows_portable(const float* x, float* y, int64_t rows, int64_t K, const float* gamma, const float* beta,
                   float epsilon) {
  for (int64_t m = 0; m < rows; ++m) layernorm_row(x + m * K, y + m * K, K, gamma, beta, epsilon);
}

// The same row with AVX2 + FMA vectors: the lanes above, in registers.
__attribute__((target("avx2,fma"))) void rows_fma(const float* x, float* y, int64_t rows, int64_t K,
                                                  const float* gamma, const float* beta, float epsilon) {
  for (int64_t m = 0; m < rows; ++m, x += K, y += K) {
    int64_t k = 0;
    __m256d lanes_d = _mm256_setzero_pd();
    for (; k + 4 <= K; k += 4) lanes_d = _mm256_add_pd(lanes_d, _mm256_cvtps_pd(_mm_loadu_ps(x + k)));
    const __m128d pairs = _mm_add_pd(_mm256_castpd256_pd128(lanes_d), _mm256_extractf128_pd(lanes_d, 1));
    double sum = _mm_cvtsd_f64(pairs) + _mm_cvtsd_f64(_mm_unpackhi_pd(pairs, pairs));
    for (; k < K; ++k) sum += static_cast<double>(x[k]);
    const float mean = static_cast<float>(sum / static_cast<double>(K));

    const __m256 mean8 = _mm256_set1_ps(mean);
    __m256 lanes = _mm256_setzero_ps();
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + k), mean8);
      lanes = _mm256_fmadd_ps(d, d, lanes);
    }
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    const float sum_sq = add_tail_squares(x, k, K, mean, _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b))));
    const float inv = inverse_deviation(sum_sq, K, epsilon);
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), mean8), inv8);
      _mm256_storeu_ps(y + k, beta ? _mm256_fmadd_ps(t, _mm256_loadu_ps(gamma + k), _mm256_loadu_ps(beta + k))
                                   : _mm256_mul_ps(t, _mm256_loadu_ps(gamma + k)));
    }
    normalise(x, y, k, K, mean, inv, gamma, beta);
  }
}

}  // namespace

void layernorm_rows(const float* x, float* y, int64_t rows, int64_t K, const float* gamma, const float* beta,
                    float epsilon) {
  // The emulator's forced generic kernel set (XDNA_EMULATOR_ISA=generic, the tests' CPU without AVX2) takes the
  // portable row too, so that it is tested to give the same bits.
  static const bool fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::strcmp(emu::active_kernels().name, "generic") != 0;
  const auto run = fma ? rows_fma : rows_portable;
  // Many rows (an encoder window's 1500): blocks of rows on the emulator's pool, as ORT spreads its rows.
  constexpr int64_t kBlockRows = 64;
  if (rows * K < (int64_t{1} << 16)) return run(x, y, rows, K, gamma, beta, epsilon);
  emulator_parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, [&](int64_t block) {
    const int64_t m0 = block * kBlockRows, n = std::min(kBlockRows, rows - m0);
    run(x + m0 * K, y + m0 * K, n, K, gamma, beta, epsilon);
  });
}

}  // namespace xdna::kernels
