// The fused attention contract (issue 15): O = softmax(scale * Q K^T) V for one head, the definition every backend
// implements (the emulator on the CPU; on the NPU the fused kernel of kernels/aie/attention_design.py, whose host
// check `simulate` computes exactly these numerics).
//
//   S[m][t] = scale * sum_d bf16(Q[m][d]) * bf16(K^T[d][t])        products exact, sums in fp32, scale in fp32
//   mx[m]   = max_t S[m][t]
//   P[m][t] = bf16(exp(S[m][t] - mx[m]))                            exp in fp32, rounded to nearest even
//   l[m]    = sum_t P[m][t]                                         fp32
//   O[m][n] = (sum_t P[m][t] * bf16(V[t][n])) / l[m]                 sums in fp32, one fp32 division
//
// The division comes last, as in flash attention's online softmax (the NPU design keeps a running max and
// rescales the partial sums by exp(m_old - m_new) per key tile: the same weights up to the bound below). The order
// of every sum is not part of the contract. A row whose scores hold NaN or +Inf gives NaN, as ORT's Softmax does.
//
// Bound (tests/numerics.py attention_bound, derived there): with delta_t the contract's GEMM bound on one score
// (bf16 Q, K, the fp32 sum, the scale), each weight P/l is within a factor
//   eta = e^(2 max_t delta_t) (1 + rho) / (1 - rho) (1 + T 2^-23) - 1,  rho = 2^-9 + 2^-21 (P's rounding, exp's error)
// of the exact softmax weight w*, and V's rounding plus the fp32 PV sum add (2^-8 + (T + 1) 2^-23):
//   |O - O*| <= (eta + (1 + eta)(2^-8 + (T + 1) 2^-23)) sum_t w*_t |V[t][n]|
#pragma once

#include <cstdint>

namespace xdna::kernels {

// One head of a fused attention. Q [M, D] row-major with row stride ldq; K^T [D, T] given through strides
// (K^T[d][t] = kt[d * kt_stride_d + t * kt_stride_t]: K itself when kt_stride_d == 1); V [T, Dv] through strides
// (V[t][n] = v[t * v_stride_t + n * v_stride_n]); O [M, Dv] row-major with row stride ldo.
struct AttentionHead {
  const float* q;
  int64_t ldq;
  const float* kt;
  int64_t kt_stride_d, kt_stride_t;
  const float* v;
  int64_t v_stride_t, v_stride_n;
  float* o;
  int64_t ldo;
};

// What every head of one call shares.
struct AttentionShape {
  int64_t M = 0, T = 0, D = 0, Dv = 0;  // query rows, keys, head dim of Q/K, head dim of V
  float scale = 1.f;
};

}  // namespace xdna::kernels
