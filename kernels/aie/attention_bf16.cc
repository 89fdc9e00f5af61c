// AIE-ML (AIE2) core kernel of the fused attention design (attention_design.py), compiled with Peano (llvm-aie):
//   clang++ --target=aie2-none-unknown-elf -O2 -std=c++20 -I<mlir-aie>/include -c attention_bf16.cc
// Numerics: kernels/attention_contract.h. A work item is 32 query rows of one head against all the head's keys,
// streamed 32 at a time (flash attention's online softmax): the scores and weights of a key tile live only in this
// core's L1, never in a memtile or DDR.
//
// Per work item: attention_q_tile(q, o); per key tile attention_scores(k, skip) then attention_values(v, o);
// attention_finish(o). q, k and v are row-major fp32 [32 x 64] objects exactly as the shim DMA reads them from
// ORT's tensors (a head's 64 columns, rows strided); the core rounds them to bf16 (round-to-nearest-even, set
// explicitly: the AIE-ML default rounds toward minus infinity) while blocking them for aie::mmul<4,8,4>. o is the
// fp32 output object, used as the accumulator and left blocked 4x4 (the memtile's MM2S un-blocks it). `skip` keys
// at the start of a tile are ignored: the last tile of a T that is not a multiple of 32 is moved back to end at T,
// so every transfer is a whole tile inside the tensor, and its first keys were already counted.
//
// Scores are computed transposed, S^T = K . Q^T, so that K's rows block straight into mmul A operands (8 contiguous
// floats per block row); Q^T is blocked once per work item. The state between calls (bf16 Q^T, the scores, P,
// the running max m, sum l and the rescale factors) lives in this core's static data: 14.3 KiB, plus the objects
// (Q 8, K 2 x 8, V 8, O 8 KiB): 54.3 KiB of the 64 KiB data memory (attention_design.l1_bytes).
//
// The softmax is written as plain fp32 loops; exp is evaluated in fp32 by Cephes expf (relative error below 2^-21,
// within the contract's 2^-13.5, attention_contract.h; AIE-ML's bf16 exp LUT rounds its input to bf16 and would
// miss it). How fast Peano makes these loops on AIE-ML (fp32 multiplies are emulated with bf16 MACs, UG1603) is NOT known here: the
// dataflow model assumes 0.5 core cycles per score.
#include <aie_api/aie.hpp>

#include <cstdint>
#include <cstring>

namespace {

constexpr unsigned kRows = 32, kKeys = 32, kD = 64;
constexpr unsigned kR = 4, kS = 8, kT = 4;  // aie::mmul bf16 shape on AIE-ML
using Mmul = aie::mmul<kR, kS, kT, bfloat16, bfloat16, accfloat>;

// S^T [keys x rows] = K [keys x d] . Q^T [d x rows]; O [rows x d] += P [rows x keys] . V [keys x d].
constexpr unsigned kKBlocksD = kD / kS;      // A = K: 8 x 8 blocks of 4x8 (key x d)
constexpr unsigned kQtBlocksN = kRows / kT;  // B = Q^T: 8 x 8 blocks of 8x4 (d x row)
constexpr unsigned kPBlocksK = kKeys / kS;   // A = P: 8 x 4 blocks of 4x8 (row x key)
constexpr unsigned kVBlocksN = kD / kT;      // B = V: 4 x 16 blocks of 8x4 (key x d)

alignas(32) bfloat16 g_qt[kD * kRows];   // Q^T, blocked
alignas(32) bfloat16 g_kv[kKeys * kD];   // the key tile's K, then its V, blocked (one at a time)
alignas(32) float g_st[kKeys * kRows];   // S^T, 8 x 8 blocks of 4x4 (key x row)
alignas(32) bfloat16 g_p[kRows * kKeys]; // P, blocked
float g_m[kRows], g_l[kRows], g_c[kRows];

// exp(x) for x <= 0 (and NaN) in fp32: Cody-Waite reduction and a degree-6 polynomial (Cephes expf; the emulator
// runs a degree-3 one, the contract allows either). Below -87 it returns 0 (the true value is < 2^-125, lost against
// the row's 1).
inline float exp_nonpositive(float x) {
  if (x != x) return x;
  if (x < -87.f) return 0.f;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline unsigned st_index(unsigned key, unsigned row) {
  return ((key / kR) * kQtBlocksN + row / kT) * Mmul::size_C + (key % kR) * kT + row % kT;
}
inline unsigned p_index(unsigned row, unsigned key) {
  return ((row / kR) * kPBlocksK + key / kS) * Mmul::size_A + (row % kR) * kS + key % kS;
}
inline unsigned o_index(unsigned row, unsigned col) {
  return ((row / kR) * kVBlocksN + col / kT) * Mmul::size_C + (row % kR) * kT + col % kT;
}

// 16 fp32 values rounded to bf16 by the vector unit, in the rounding mode set by the caller.
inline aie::vector<bfloat16, 16> round16(const aie::vector<float, 16>& x) {
  aie::accum<accfloat, 16> acc;
  acc.from_vector(x);
  return acc.template to_vector<bfloat16>();
}

}  // namespace

extern "C" {

// Starts a work item: Q^T rounded and blocked, O = 0, m = -inf, l = 0.
void attention_q_tile(const float* __restrict q, float* __restrict o) {
  aie::set_rounding(aie::rounding_mode::conv_even);
  for (unsigned bd = 0; bd < kD / kS; ++bd)
    for (unsigned br = 0; br < kQtBlocksN; ++br)
      for (unsigned half = 0; half < 2; ++half) {  // a block of Q^T: 8 d x 4 rows, two vectors of 16
        aie::vector<float, 16> x;
        for (unsigned e = 0; e < 16; ++e) {
          const unsigned s = half * 4 + e / kT, t = e % kT;
          x.set(q[(br * kT + t) * kD + bd * kS + s], e);
        }
        aie::store_v(g_qt + (bd * kQtBlocksN + br) * Mmul::size_B + half * 16, round16(x));
      }
  for (unsigned i = 0; i < kRows * kD; i += 16) aie::store_v(o + i, aie::zeros<float, 16>());
  for (unsigned r = 0; r < kRows; ++r) {
    g_m[r] = -__builtin_inff();
    g_l[r] = 0.f;
  }
}

// One key tile's scores: S^T = K . Q^T (scaled), the new running max, the rescale factors c = exp(m_old - m_new)
// and P = bf16(exp(S - m_new)) (keys before `skip` weigh nothing), l = c l + rowsum(P). A row whose scores hold
// NaN or +Inf gets m = NaN, which makes its c, P, l and output NaN.
void attention_scores(const float* __restrict k, float scale, int32_t skip) {
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  for (unsigned bk = 0; bk < kKeys / kR; ++bk)
    for (unsigned bd = 0; bd < kKBlocksD; ++bd)
      for (unsigned half = 0; half < 2; ++half) {  // K blocked 4x8: rows 2 half, 2 half + 1 of a block
        const float* row = k + (bk * kR + 2 * half) * kD + bd * kS;
        const auto x = aie::concat(aie::load_v<8>(row), aie::load_v<8>(row + kD));
        aie::store_v(g_kv + (bk * kKBlocksD + bd) * Mmul::size_A + half * 16, round16(x));
      }
  for (unsigned z = 0; z < kKeys / kR; ++z)
    for (unsigned j = 0; j < kQtBlocksN; ++j) {
      Mmul acc(aie::zeros<float, Mmul::size_C>());
      for (unsigned i = 0; i < kKBlocksD; ++i)
        acc.mac(aie::load_v<Mmul::size_A>(g_kv + (z * kKBlocksD + i) * Mmul::size_A),
                aie::load_v<Mmul::size_B>(g_qt + (i * kQtBlocksN + j) * Mmul::size_B));
      aie::store_v(g_st + (z * kQtBlocksN + j) * Mmul::size_C, acc.template to_vector<float>());
    }
  const unsigned first = static_cast<unsigned>(skip);
  for (unsigned r = 0; r < kRows; ++r) {
    const float m_old = g_m[r];
    float mx = m_old;
    bool bad = m_old != m_old;
    for (unsigned t = first; t < kKeys; ++t) {
      const float x = g_st[st_index(t, r)] * scale;
      g_st[st_index(t, r)] = x;
      bad = bad || x != x || x == __builtin_inff();
      mx = x > mx ? x : mx;
    }
    if (bad) mx = __builtin_nanf("");
    g_c[r] = mx == m_old ? 1.f : exp_nonpositive(m_old - mx);  // m_old = -inf: c = 0
    float sum = 0.f;
    for (unsigned t0 = 0; t0 < kKeys; t0 += 16) {
      aie::vector<float, 16> e = aie::zeros<float, 16>();
      for (unsigned t = t0 < first ? first : t0; t < t0 + 16; ++t)
        e.set(exp_nonpositive(g_st[st_index(t, r)] - mx), t - t0);
      const aie::vector<bfloat16, 16> w = round16(e);  // P, round-to-nearest-even
      for (unsigned t = t0; t < t0 + 16; ++t) {
        g_p[p_index(r, t)] = w.get(t - t0);
        sum += static_cast<float>(w.get(t - t0));
      }
    }
    g_l[r] = g_c[r] * g_l[r] + sum;
    g_m[r] = mx;
  }
  event1();
}

// The key tile's values: O = c O + P . V, V rounded and blocked 8x4 first.
void attention_values(const float* __restrict v, float* __restrict o) {
  aie::set_rounding(aie::rounding_mode::conv_even);
  event0();
  for (unsigned bk = 0; bk < kKeys / kS; ++bk)
    for (unsigned bd = 0; bd < kVBlocksN; ++bd)
      for (unsigned half = 0; half < 2; ++half) {  // 4 rows of 4 floats per vector
        const float* row = v + (bk * kS + 4 * half) * kD + bd * kT;
        const auto x = aie::concat(aie::load_v<4>(row), aie::load_v<4>(row + kD), aie::load_v<4>(row + 2 * kD),
                                   aie::load_v<4>(row + 3 * kD));
        aie::store_v(g_kv + (bk * kVBlocksN + bd) * Mmul::size_B + half * 16, round16(x));
      }
  for (unsigned z = 0; z < kRows / kR; ++z) {
    const bool rescale = g_c[z * kR] != 1.f || g_c[z * kR + 1] != 1.f || g_c[z * kR + 2] != 1.f ||
                         g_c[z * kR + 3] != 1.f;
    for (unsigned j = 0; j < kVBlocksN; ++j) {
      float* __restrict ob = o + (z * kVBlocksN + j) * Mmul::size_C;
      auto prev = aie::load_v<Mmul::size_C>(ob);
      if (rescale)
        for (unsigned e = 0; e < Mmul::size_C; ++e) prev.set(prev.get(e) * g_c[z * kR + e / kT], e);
      Mmul acc(prev);
      for (unsigned i = 0; i < kPBlocksK; ++i)
        acc.mac(aie::load_v<Mmul::size_A>(g_p + (z * kPBlocksK + i) * Mmul::size_A),
                aie::load_v<Mmul::size_B>(g_kv + (i * kVBlocksN + j) * Mmul::size_B));
      aie::store_v(ob, acc.template to_vector<float>());
    }
  }
  event1();
}

// O = O / l, one fp32 division per element (the contract divides last). A row that saw no finite max (NaN, or
// only -Inf scores) is NaN, as ORT's Softmax gives. O stays blocked 4x4.
void attention_finish(float* __restrict o) {
  for (unsigned r = 0; r < kRows; ++r) {
    const bool finite = g_m[r] == g_m[r] && g_m[r] != -__builtin_inff();
    for (unsigned n = 0; n < kD; ++n) {
      float& x = o[o_index(r, n)];
      x = finite ? x / g_l[r] : __builtin_nanf("");
    }
  }
}

}  // extern "C"
