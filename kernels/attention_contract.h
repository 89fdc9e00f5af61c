// The fused attention contract (issue 15): O = softmax(scale * Q K^T + mask) V for one head, the definition every
// backend implements (the emulator on the CPU; on the NPU the fused kernel of kernels/aie/attention_design.py, whose
// host check `simulate` computes exactly these numerics, without mask or NaN rule: the NPU backend declines those).
//
//   S[m][t] = scale * sum_d bf16(Q[m][d]) * bf16(K^T[d][t])        products exact, sums in fp32, scale in fp32
//             (+ mask[m][t], fp32, when the head has a mask)        the additive mask: 0 / -Inf, or any float
//   mx[m]   = max_t S[m][t]
//   P[m][t] = bf16(exp(S[m][t] - mx[m]))                            exp in fp32 (relative error <= 2^-13.5),
//                                                                   rounded to nearest even
//             (without a mask, also 2^(fl(s c - fl(c max s)))      s the fp32 sum, c = fl(scale log2 e): one FMA
//              for exp(S - mx): the exponent in base 2)            for the scaling and the max's subtraction
//   l[m]    = sum_t P[m][t]                                         fp32
//   O[m][n] = (sum_t P[m][t] * bf16(V[t][n])) / l[m]                 sums in fp32, one fp32 division
//
// The division comes last, as in flash attention's online softmax (the NPU design keeps a running max and
// rescales the partial sums by exp(m_old - m_new) per key tile: the same weights up to the bound below). The order
// of every sum is not part of the contract. A row whose scores hold NaN or +Inf, or only -Inf (a fully masked row),
// gives NaN, as ORT's Softmax does (its whole row is then NaN: checked for NaN / +Inf anywhere and all -Inf).
// The NaN rule (AttentionShape::zero_nan_rows; a graph's Where(IsNaN(P), 0, P) after the Softmax): such a row's
// weights are 0 instead, so O[m][n] = sum_t 0 * bf16(V[t][n]): 0, or NaN where V's column holds Inf or NaN, as ORT's
// MatMul of a zero row gives. (No other row holds a NaN weight, so the rule changes no other row.)
//
// Bound (tests/numerics.py attention_bound, derived there): with delta_t the contract's GEMM bound on one score
// (bf16 Q, K, the fp32 sum, the scale, the max's subtraction), each weight P/l is within a factor
//   eta = e^(2 max_t delta_t) (1 + rho) / (1 - rho) (1 + T 2^-23) - 1,  rho = 2^-8 + 2^-13
// of the exact softmax weight w*, and V's rounding plus the fp32 PV sum add (2^-8 + (T + 1) 2^-23):
//   |O - O*| <= (eta + (1 + eta)(2^-8 + (T + 1) 2^-23)) sum_t w*_t |V[t][n]|
// rho: P's rounding to 8 significant bits after the exp's 2^-13.5, (1 + 2^-8)(1 + 2^-13.5) - 1 < rho. P keeps 8
// bits, so an exp good to 2^-13.5 (the emulator's degree-3 polynomial, emulator_attention.cc) costs the bound ~3 %;
// the NPU kernel's exp (kernels/aie/attention_bf16.cc, Cephes, 2^-21) and attention_design.simulate's (exact) are
// within it too.
#pragma once

#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "gemm_contract.h"

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
  // K^T and/or V given in bf16 instead (kt / v then null), same strides: already rounded as the contract reads
  // them (a graph's Cast to bfloat16, e.g. the decoder's cross-attention K/V stored once per window at half the
  // bytes). A backend that reads only fp32 gets the heads through widen_bf16_kv.
  const uint16_t* kt_bf16 = nullptr;
  const uint16_t* v_bf16 = nullptr;
  // The additive mask (null: none), [M, T] fp32: mask[m][t] = mask[m * mask_stride_m + t] (stride 0: one row for
  // all M, e.g. a mask broadcast over the query rows).
  const float* mask = nullptr;
  int64_t mask_stride_m = 0;
};

// What every head of one call shares.
struct AttentionShape {
  int64_t M = 0, T = 0, D = 0, Dv = 0;  // query rows, keys, head dim of Q/K, head dim of V
  float scale = 1.f;
  bool zero_nan_rows = false;  // the NaN rule (above): a NaN softmax row gives zero weights
};

inline bool has_mask(const AttentionHead* heads, size_t count) {
  for (size_t i = 0; i < count; ++i)
    if (heads[i].mask) return true;
  return false;
}

inline bool has_bf16_kv(const AttentionHead* heads, size_t count) {
  for (size_t i = 0; i < count; ++i)
    if (heads[i].kt_bf16 || heads[i].v_bf16) return true;
  return false;
}

// The heads with bf16 K^T / V replaced by fp32 copies in `storage`, in the orientation given (K^T stays K^T where t
// was the unit stride, else K as rows [T][D]; V likewise), one copy per distinct source (e.g. a batch-1 K/V broadcast
// over beams). Exact: widening is exact and the contract's rounding of a bf16 value is that value; and as the layout
// is kept, a backend runs the same kernel on the copies as on the fp32 graph's tensors: the same bits.
inline std::vector<AttentionHead> widen_bf16_kv(const AttentionShape& s, const AttentionHead* heads, size_t count,
                                                std::vector<std::vector<float>>* storage) {
  struct Copy {
    const float* data = nullptr;
    int64_t row_stride = 0, col_stride = 0;
  };
  std::vector<AttentionHead> out(heads, heads + count);
  std::map<std::tuple<const uint16_t*, int64_t, int64_t>, Copy> made;  // (source, strides) -> copy
  // src[r * row_stride + c * col_stride], rows x cols: copied as rows, or as columns when only r has unit stride.
  const auto widen = [&](const uint16_t* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
    Copy& copy = made[{src, row_stride, col_stride}];
    if (!copy.data) {
      const bool by_columns = row_stride == 1 && col_stride != 1;
      copy.row_stride = by_columns ? 1 : cols;
      copy.col_stride = by_columns ? rows : 1;
      storage->emplace_back(static_cast<size_t>(rows * cols));
      float* dst = storage->back().data();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          dst[r * copy.row_stride + c * copy.col_stride] = bf16_to_f32(src[r * row_stride + c * col_stride]);
      copy.data = dst;
    }
    return copy;
  };
  for (AttentionHead& h : out) {
    if (h.kt_bf16) {  // K[t][d] = K^T[d][t]
      const Copy k = widen(h.kt_bf16, s.T, s.D, h.kt_stride_t, h.kt_stride_d);
      h.kt = k.data;
      h.kt_stride_t = k.row_stride;
      h.kt_stride_d = k.col_stride;
      h.kt_bf16 = nullptr;
    }
    if (h.v_bf16) {
      const Copy v = widen(h.v_bf16, s.T, s.Dv, h.v_stride_t, h.v_stride_n);
      h.v = v.data;
      h.v_stride_t = v.row_stride;
      h.v_stride_n = v.col_stride;
      h.v_bf16 = nullptr;
    }
  }
  return out;
}

}  // namespace xdna::kernels
