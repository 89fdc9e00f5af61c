// Host stand-in for the few AIE API pieces gemm_bf16.cc, gemm_int8.cc and attention_bf16.cc use, so its blocked indexing can be unit-tested with
// g++ (tests/test_xrt_aie_design.py). Scalar and slow; bfloat16 is stored as its 16 bits. Not the AIE API.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct bfloat16 {
  uint16_t bits;
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct accfloat {};
struct acc32 {};
using int8 = int8_t;
using int32 = int32_t;
inline void event0() {}
inline void event1() {}

namespace aie {
// The AIE's fp32 -> bf16 conversion mode (UG1603 "Rounding and Saturation Modes"): floor (toward minus infinity)
// unless the kernel sets another. Only the two modes the kernels care about are modelled.
enum class rounding_mode { floor, conv_even };
inline rounding_mode& current_rounding() {
  static rounding_mode m = rounding_mode::floor;
  return m;
}
inline void set_rounding(rounding_mode m) { current_rounding() = m; }
inline bfloat16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  if (current_rounding() == rounding_mode::conv_even) u += 0x7fffu + ((u >> 16) & 1u);
  else if ((u & 0x80000000u) && (u & 0xffffu) && (u & 0x7fffffffu) < 0x7f800000u) u += 0x10000u;  // toward -inf
  return bfloat16{static_cast<uint16_t>(u >> 16)};
}
template <typename T, unsigned L>
struct vector {
  std::array<T, L> v;
  T get(unsigned i) const { return v[i]; }
  void set(T x, unsigned i) { v[i] = x; }
};
template <unsigned L, typename T>
vector<T, L> load_v(const T* p) {
  vector<T, L> r;
  for (unsigned i = 0; i < L; ++i) r.v[i] = p[i];
  return r;
}
template <typename T, unsigned L>
void store_v(T* p, const vector<T, L>& x) {
  for (unsigned i = 0; i < L; ++i) p[i] = x.v[i];
}
template <typename T, unsigned L, typename... Rest>
vector<T, L * (1 + sizeof...(Rest))> concat(const vector<T, L>& first, const Rest&... rest) {
  vector<T, L * (1 + sizeof...(Rest))> r;
  unsigned i = 0;
  for (const vector<T, L>* part : {&first, &rest...})
    for (unsigned j = 0; j < L; ++j) r.v[i++] = part->v[j];
  return r;
}
template <typename T, unsigned L>
vector<T, L> zeros() {
  vector<T, L> r{};
  return r;
}
template <typename TAcc, unsigned L>
struct accum {
  std::array<float, L> v;
  void from_vector(const vector<float, L>& x) { v = x.v; }
  template <typename Out>
  vector<Out, L> to_vector() const {
    vector<Out, L> r;
    for (unsigned i = 0; i < L; ++i) {
      if constexpr (std::is_same_v<Out, float>) r.v[i] = v[i];
      else r.v[i] = to_bf16(v[i]);
    }
    return r;
  }
};
// Elementwise float operations (the epilogue): AIE-ML multiplies float vectors into an accumulator.
template <typename T, unsigned L>
vector<T, L> broadcast(T x) {
  vector<T, L> r;
  r.v.fill(x);
  return r;
}
template <typename T, unsigned L, typename F>
vector<T, L> lanes(const vector<T, L>& a, const vector<T, L>& b, F f) {
  vector<T, L> r;
  for (unsigned i = 0; i < L; ++i) r.v[i] = f(a.v[i], b.v[i]);
  return r;
}
template <typename T, unsigned L>
vector<T, L> add(const vector<T, L>& a, const vector<T, L>& b) { return lanes(a, b, [](T x, T y) { return x + y; }); }
template <typename T, unsigned L>
vector<T, L> min(const vector<T, L>& a, const vector<T, L>& b) { return lanes(a, b, [](T x, T y) { return y < x ? y : x; }); }
template <typename T, unsigned L>
vector<T, L> max(const vector<T, L>& a, const vector<T, L>& b) { return lanes(a, b, [](T x, T y) { return x < y ? y : x; }); }
template <typename T, unsigned L>
vector<T, L> div(const vector<T, L>& a, const vector<T, L>& b) { return lanes(a, b, [](T x, T y) { return x / y; }); }
template <typename T, unsigned L>
accum<accfloat, L> mul(const vector<T, L>& a, const vector<T, L>& b) {
  accum<accfloat, L> r;
  r.from_vector(lanes(a, b, [](T x, T y) { return x * y; }));
  return r;
}
template <typename TAcc>
struct acc_element;
template <>
struct acc_element<accfloat> {
  using type = float;
};
template <>
struct acc_element<acc32> {
  using type = int32_t;  // AIE-ML's int8 accumulators are wider; int32 is exact for the contract's K
};
template <unsigned R, unsigned S, unsigned T, typename TA, typename TB, typename TAcc>
struct mmul {
  using acc_t = typename acc_element<TAcc>::type;
  static constexpr unsigned size_A = R * S, size_B = S * T, size_C = R * T;
  std::array<acc_t, size_C> acc;
  template <typename V>
  explicit mmul(const V& c) {
    for (unsigned i = 0; i < size_C; ++i) acc[i] = c.v[i];
  }
  void mac(const vector<TA, size_A>& a, const vector<TB, size_B>& b) {
    for (unsigned r = 0; r < R; ++r)
      for (unsigned t = 0; t < T; ++t)
        for (unsigned s = 0; s < S; ++s) acc[r * T + t] += acc_t(a.v[r * S + s]) * acc_t(b.v[s * T + t]);
  }
  template <typename Out>
  vector<Out, size_C> to_vector() const {
    vector<Out, size_C> r;
    for (unsigned i = 0; i < size_C; ++i) r.v[i] = acc[i];
    return r;
  }
};
}  // namespace aie
