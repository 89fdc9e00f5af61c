// The emulator: the GEMM contract (gemm_contract.h) executed on the CPU. It is the definition every other
// backend is tested against, and the CPU fallback of the EP.
#pragma once

#include <cstdlib>
#include <functional>
#include <new>
#include <memory>
#include <vector>

#include "../backend.h"

namespace xdna::kernels {

// C = bf16(A) . B for one call, multi-threaded over `threads` workers (0 = all cores).
void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads = 0);

// AMX kernel sets: a bf16 B re-laid once into the tiles' (k, k+1) pair form (as many bytes as the packed B), so
// that few-row calls (beam search) run on the tiles without re-laying B per call. emulator_wants_paired_b(M):
// whether a call of M rows would use it; emulator_pair_b: empty where the kernel set has no use for it.
bool emulator_wants_paired_b(int64_t M);
std::vector<uint32_t> emulator_pair_b(const PackedB& b);
// emulator_gemm with `pairs` (emulator_pair_b(b), or null: the packed B alone); the same contract, same bound.
void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads, const uint32_t* pairs);

// `count` independent products of one K x N shape with unpacked B (backend.h's UnpackedGemm), spread over the
// threads as one job: many small calls (the batch x heads of an attention MatMul) would otherwise each pay the
// pool's synchronisation.
void emulator_gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N, int threads = 0);

// Fused attention (attention_contract.h), `count` heads of one shape: few query rows with K and V as rows (decoder
// steps, avx512f or avx2 CPUs) one task per head doing QK^T, softmax and PV; other few-row layouts on the unpacked GEMM
// kernels; many rows (encoder) one task per block of query rows of a head, its scores kept in cache (AMX where the
// amx kernel set runs, else the active set's blocked GEMM kernel).
void emulator_attention(const AttentionShape& shape, const AttentionHead* heads, size_t count, int threads = 0);

// The fused attention softmax's exp on n floats x <= 0 (tests measure its error against float64): form 0, exp(x) as
// the kernel sets without AVX512-BF16 run it; 1, exp(x) in the AVX-512 FMA form of the amx and avx512bf16 sets;
// 2, 2^x there (the unmasked rows' base-2 exponent). False, nothing written, for forms 1 and 2 on a CPU without
// avx512f/bw/bf16.
bool emulator_attention_exp(const float* x, float* out, int64_t n, int form);

// Which per-head kernel emulator_attention runs for few query rows with K and V as rows, following the active
// kernel set (tests check that each set gets its own): "avx512bf16", "avx512", "avx2", or "unpacked" (the
// per-product path: the generic set).
const char* emulator_attention_few_row_kernel();

// fn(0..tasks-1) on the emulator's thread pool (the caller works too).
void emulator_parallel_for(int threads, int64_t tasks, const std::function<void(int64_t)>& fn);

// Slow, obviously-correct scalar version of the contract (double-checked spec for tests).
void reference_gemm(const GemmArgs& args, const PackedB& b);

// The emulator as a Backend: the primary backend without an NPU, and every node's CPU fallback backend.
std::unique_ptr<Backend> make_emulator_backend(int threads);

// Name of the kernel set emulator_gemm runs on this CPU: "amx", "avx512bf16", "avx512", "avx2" or "generic" (chosen
// once, at first use, from the CPU's features: amx where Linux grants the tile state, avx512bf16 only on non-Intel
// cores; XDNA_EMULATOR_ISA=<name> forces a supported one, for tests).
const char* emulator_kernel_name();

}  // namespace xdna::kernels

// ---- Precision modes (gemm_contract.h, "Precision modes"): not yet reachable from the EP ----
namespace xdna::kernels {

// Storage on 64-byte (cache line) boundaries. malloc gives 16: a 64-byte row of a panel then spans two lines, and
// the AMX tile loads of an int8 B (16 such rows each) ran at half speed (1500 x 512 x 512: 0.46 ms against 0.20 ms
// single-threaded without the epilogue, CPU figures).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / 2 / sizeof(T)) throw std::bad_alloc();
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

// int8 B: quantised once per output channel (symmetric). q holds panels of 16 columns, each [Kpad / 4][16][4]
// (B[k][n] at q[(n / 16) * Kpad * 16 + (k / 4) * 64 + (n % 16) * 4 + k % 4], zero padded to Kpad x Npad): one
// 64-byte row feeds a 4-deep int8 dot product (VPDPBUSD) for 16 columns, one cache line. colsum feeds the u8/s8
// offset trick of the VNNI kernel.
struct QuantizedB {
  int64_t K = 0, N = 0, Kpad = 0;
  std::vector<int8_t, CacheLineAllocator<int8_t>> q;
  std::vector<float> scale;     // sb_n (NaN when the column holds NaN or Inf)
  std::vector<int32_t> colsum;  // sum_k qb[k][n]
  int64_t Npad = 0;             // round_up(N, 16)
};
QuantizedB quantize_b_int8(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n);
// C = dequant(quant(A) . qB): per-row dynamic A scales, int32 sums, fp32 epilogue. Throws std::invalid_argument
// for K past the int32-exact limit.
void emulator_gemm_int8(const GemmArgs& args, const QuantizedB& b, int threads = 0);
// Two int8 products where the second reads the first's output as its A and nothing else reads it (an FFN: fc1 +
// bias + GELU, then fc2 + bias + residual; backend.h's Int8Chain): first.c and second.a are not used. Each thread
// takes row panels through the first product and its epilogue into a scratch of its own, quantises the panel's
// rows as the second product's A and runs the second for them, so the intermediate never goes to memory. The same
// bits as emulator_gemm_int8 twice (the same quantiser, the same int32 sums and fp32 epilogues). Returns false,
// nothing done, when it does not pay (few rows: the calls are bound by reading B) or the shapes do not chain.
bool emulator_gemm_int8_chain(const GemmArgs& first, const QuantizedB& b1, const GemmArgs& second,
                              const QuantizedB& b2, int threads = 0);
// backend.h's SharedAProduct: `count` int8 products of one A (each weight's host int8 B in `b[i]`, all of one K),
// A quantised once (the same quantiser) and every (product, row block, column block) one task of one job; a
// product with a bfloat16 output has its block computed into a per-thread scratch and rounded from there, so its
// fp32 C never goes to memory. The same bits as emulator_gemm_int8 of each product, then store_bf16_as_cast and
// the head split. Returns false, nothing done, when it does not pay (few rows) or the shapes do not match.
bool emulator_gemm_int8_shared_a(const float* a, int64_t M, int64_t lda, const SharedAProduct* products,
                                 const QuantizedB* const* b, size_t count, int threads = 0);
// "amx" (TDPBUSD), "vnni" (AVX512-VNNI VPDPBUSD), "avxvnni" (256-bit VPDPBUSD), "avx2" (exact: int16 VPMADDWD)
// or "generic": the int8 kernel in use, all giving the same bits. It follows the bf16 kernel set, so
// XDNA_EMULATOR_ISA selects it too (amx -> amx; avx512 / avx512bf16 -> vnni and avx2 -> avxvnni where the CPU has
// them); XDNA_EMULATOR_INT8_ISA=<name> forces a supported one on its own.
const char* emulator_int8_kernel_name();
inline constexpr int64_t kInt8MaxK = 133143;  // K * 127^2 < 2^31
// The contract's symmetric quantisation of one row of A (n values) into q, as emulator_gemm_int8 quantises A: the
// xrt backend quantises A with it so that the device's int32 sums and the emulator's are the same bits. Returns
// the scale (NaN when a value is not finite; q is then 0).
float quantize_row_int8(const float* x, int64_t n, int8_t* q);

// bf16x3 B: B = hi + lo (+ 2^-16 relative), both in the contract's packed bf16 layout.
struct SplitB {
  PackedB hi, lo;
};
SplitB pack_b_bf16x3(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n);
// C = A_hi.B_hi + (A_lo.B_hi + A_hi.B_lo): three bf16 contract GEMMs (the bf16 kernels), summed in fp32.
void emulator_gemm_bf16x3(const GemmArgs& args, const SplitB& b, int threads = 0);

}  // namespace xdna::kernels
