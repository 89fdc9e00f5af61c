// AVX-512 pieces both fused attention kernels on AVX512-BF16 share (emulator_attention_amx.cc's many-row blocks,
// emulator_attention.cc's few-row heads): the contract's bf16 rounding on 16 lanes and the softmax of one row of
// scores into bf16 weights. Compiled for avx512f/bw/bf16 and FMA wherever included (the pragma below); callers check
// the CPU first.
//
// Numerics: the exp is emulator_attention.cc's exp_nonpositive (2^n times a degree-3 polynomial of 2^f, the same
// constants) evaluated with FMAs: checked over every float in [-87, 0], its relative error is at most 2^-13.6 (the
// contract allows 2^-13.5); its bits may differ from the other kernel sets' in the last place.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace xdna::kernels::emu {
// The softmax's exp (exp_nonpositive here and in emulator_attention.cc): exp(x) = 2^n p(f), t = x kLog2e, n = rint(t),
// f = t - n; p(f) = sum_i kExp2Poly[i] f^i, the relative minimax fit of 2^f on [-1/2, 1/2] (error 2^-13.7 at float64).
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kExp2Poly[4] = {0.9999280571937561f, 0.6932609677314758f, 0.24261093139648438f,
                                       0.05517149344086647f};
}  // namespace xdna::kernels::emu

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace xdna::kernels::emu {
namespace {

// The contract's f32_to_bf16 on 16 lanes (round to nearest even, NaN kept a quiet NaN): the bf16 bits.
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// 2^t for t <= 0 in the lanes of `kept` (0 in the others): 2^n exactly (VSCALEFPS) times the degree-3 polynomial
// of 2^f, n = rint(t), f = t - n (exact). `kept` holds only lanes with t >= -125.5 (so n >= -126 and p 2^n normal).
inline __m512 exp2_nonpositive(__m512 t, __mmask16 kept) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExp2Poly[3]), f, _mm512_set1_ps(kExp2Poly[2]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[1]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[0]));
  return _mm512_maskz_scalef_ps(kept, p, n);
}

// exp(x) for x <= 0 in the lanes of `lanes` (emulator_attention.cc's exp_nonpositive with FMAs), 0 below -87 and
// in the other lanes.
inline __m512 exp_nonpositive(__m512 x, __mmask16 lanes) {
  return exp2_nonpositive(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                          _mm512_mask_cmp_ps_mask(lanes, x, _mm512_set1_ps(-87.f), _CMP_GE_OQ));
}

// 2^t on the lanes of `lanes` with t >= -125.5, 0 elsewhere (below: < 2^-125, lost against the row's 1).
inline __m512 exp2_row(__m512 t, __mmask16 lanes) {
  return exp2_nonpositive(t, _mm512_mask_cmp_ps_mask(lanes, t, _mm512_set1_ps(-125.5f), _CMP_GE_OQ));
}

inline __mmask16 lanes_below(int64_t t, int64_t T) {
  const int64_t left = T - t;
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1u);
}

// One row of scores s[0..T) -> p[0..tp) = bf16(exp(scale s + mask - max)) (mask: null or T floats), zero past T;
// returns the row sum. NaN or +Inf among the masked scores (or only -Inf) gives NaN, as ORT's Softmax does (p is
// then zero: the output row is 0 / NaN); under the NaN rule (zero_nan) 1: the row's weights are zero.
// Two passes (the max, then the weights), each over whole vectors without lane masks, then a masked tail: with the
// degree-3 exp, each vector's lanes_below and branches took about a third of the weights pass (perf). Without a
// mask and with a positive finite scale the max pass reads the raw scores: fl(scale max s) = max fl(scale s)
// (rounding is monotone), NaN there iff NaN in s.
inline float softmax_row_bf16(const float* s, int64_t T, int64_t tp, float scale, const float* mask, bool zero_nan,
                              uint16_t* p) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const bool raw_max = !mask && scale > 0.f && scale <= std::numeric_limits<float>::max();
  const __m512 max_scale = raw_max ? _mm512_set1_ps(1.f) : vscale;
  // The scores t .. t + 15 in the lanes of m (0 elsewhere), times `by`, plus the mask.
  const auto scores = [&](int64_t t, __mmask16 m, __m512 by) {
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + t), by);
    if (mask) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, mask + t));
    return v;
  };
  // Four max chains: one would wait a max's latency per 16 scores.
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax[4] = {minus_inf, minus_inf, minus_inf, minus_inf};
  __mmask16 nan = 0;
  int64_t t = 0;
  for (; t + 64 <= T; t += 64)
    for (int j = 0; j < 4; ++j) {
      const __m512 v = raw_max ? _mm512_loadu_ps(s + t + 16 * j) : scores(t + 16 * j, 0xffff, vscale);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vmax[j] = _mm512_max_ps(vmax[j], v);
    }
  for (; t < T; t += 16) {
    const __mmask16 m = lanes_below(t, T);
    const __m512 v = scores(t, m, max_scale);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    vmax[0] = _mm512_mask_max_ps(vmax[0], m, vmax[0], v);
  }
  const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3])));
  const float mx = raw_max ? top * scale : top;
  if (nan || !std::isfinite(mx)) {
    for (int64_t i = 0; i < tp; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), _mm256_setzero_si256());
    return zero_nan ? 1.f : std::numeric_limits<float>::quiet_NaN();
  }
  // Without a mask the exponent is taken in base 2 by one FMA, t = fl(s c - ctop), c = fl(scale log2 e), ctop =
  // fl(c max s): ctop is common to the row (it cancels in P / l), c's rounding and the FMA's move t by at most 2.3 2^-24 |x| (x the
  // natural exponent scale (s - max s)), inside the contract's allowance for the scaling and the max subtraction
  // (tests/numerics.py attention_bound), and the exp is the polynomial's alone. Masked rows: the scaled score, the
  // mask, the max subtracted, then exp_nonpositive, as the contract states them.
  const float c = scale * kLog2e, ctop = c * top;
  const bool base2 = raw_max && std::isfinite(c) && std::isfinite(ctop);
  const __m512 vmx = _mm512_set1_ps(mx), vc = _mm512_set1_ps(c), minus_ctop = _mm512_set1_ps(-ctop);
  // P by VCVTNE2PS2BF16 (round to nearest even; the weights are 0 or normal, >= 2^-126, so its flush of subnormal
  // inputs changes nothing), l by VDPBF16PS against ones: each weight added exactly once in fp32, 32 weights at a
  // time into sum0 and sum1 in turns.
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  const auto weights_pass = [&](auto exps) {
    const auto weights = [&](int64_t i, __mmask16 m0, __mmask16 m1, __m512& sum) {
      const __m512bh w = _mm512_cvtne2ps_pbh(exps(i + 16, m1), exps(i, m0));
      _mm512_storeu_si512(p + i, (__m512i)w);
      sum = _mm512_dpbf16_ps(sum, w, ones);
    };
    int64_t i = 0;
    for (; i + 64 <= T; i += 64) {
      weights(i, 0xffff, 0xffff, sum0);
      weights(i + 32, 0xffff, 0xffff, sum1);
    }
    for (; i < tp; i += 32)  // tp: a multiple of 32
      weights(i, lanes_below(i, T), lanes_below(i + 16, T), i / 32 % 2 ? sum1 : sum0);
  };
  if (base2)
    weights_pass([&](int64_t i, __mmask16 lanes) {
      return exp2_row(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, s + i), vc, minus_ctop), lanes);
    });
  else
    weights_pass([&](int64_t i, __mmask16 lanes) {
      return exp_nonpositive(_mm512_sub_ps(scores(i, lanes, vscale), vmx), lanes);
    });
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

}  // namespace
}  // namespace xdna::kernels::emu

#pragma GCC pop_options
