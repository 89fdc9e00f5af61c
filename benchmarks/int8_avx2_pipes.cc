// What bounds the avx2 int8 kernel's 6 x 8 loop (emulator_int8.inc, EMU_INT8_ISA 1) on this CPU: instruction
// mixes of the loop in registers / L1 (cycles per 12 VPMADDWD, i.e. per k-quad of the 6 x 8 block: 192
// multiply-adds), then the loop itself (the kernel's asm, 6 A rows x 2 sign-extended B vectors) with B in L1 and in
// int8_gemm's loop order (6-row blocks over column chunks of ~192 KB of B, two 8-column halves per 16-column panel),
// placed at the start of a 64-byte line (as the kernel now places it) and 44 bytes in (where main's build had it),
// and with B pre-widened to int16. Thread CPU time, min and median over rounds taking turns; cycles are derived from an
// assumed clock (no cycle counter in this VM; --ghz). CPU figures only (no NPU). Build and run:
//   g++ -O2 -mavx2 -mfma benchmarks/int8_avx2_pipes.cc -o /tmp/int8_pipes && /tmp/int8_pipes [--ghz 2.85]
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

static double now() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }

#define CLOB "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
             "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"
#define X12(m) m("0") m("1") m("2") m("3") m("4") m("5") m("6") m("7") m("8") m("9") m("10") m("11")
#define MADD(r) "vpmaddwd %%ymm12, %%ymm14, %%ymm" r "\n\t"
#define ADD(r) "vpaddd %%ymm12, %%ymm" r ", %%ymm" r "\n\t"
#define FMA(r) "vfmadd231ps %%ymm12, %%ymm14, %%ymm" r "\n\t"
// u8 x s8 -> saturating int16 pairs: 32 multiply-adds per instruction, twice VPMADDWD's 16. CTranslate2/oneDNN's
// int8 multiply on AVX2; the contract forbids it (it saturates): timed only to state the peers' ceiling.
#define MADDUBS(r) "vpmaddubsw %%ymm12, %%ymm14, %%ymm" r "\n\t"
#define PAIR(r) "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %%ymm" r ", %%ymm" r "\n\t"
#define ADD6 ADD("0") ADD("1") ADD("2") ADD("3") ADD("4") ADD("5")
#define BCAST6 "vpbroadcastq (%[m]), %%ymm13\n\t vpbroadcastq 8(%[m]), %%ymm13\n\t vpbroadcastq 16(%[m]), %%ymm13\n\t" \
               "vpbroadcastq 24(%[m]), %%ymm13\n\t vpbroadcastq 32(%[m]), %%ymm13\n\t vpbroadcastq 40(%[m]), %%ymm13\n\t"
#define MOVSX2 "vpmovsxbw (%[m]), %%ymm13\n\t vpmovsxbw 16(%[m]), %%ymm13\n\t"

struct Mix { const char* name; void (*run)(long, const char*); };
#define MIX(label, body)                                                                                       \
  Mix{label, [](long n, const char* m) {                                                                        \
        __asm__ volatile("vpxor %%xmm12, %%xmm12, %%xmm12\n\t vpxor %%xmm14, %%xmm14, %%xmm14\n\t 1:\n\t" body  \
                         body body body "dec %[n]\n\t jnz 1b\n\t"                                               \
                         : [n] "+r"(n) : [m] "r"(m) : CLOB);                                                    \
      }}

// The 6 x 8 loop as emulator_int8.inc writes it (B: int8 sign-extended with VPMOVSXBW; A: int16 quads
// broadcast); WIDE: B already int16 (two 32-byte loads, 2x the bytes of B); acc from/to out.
#define ROW(base, r0, r1)                                                                                     \
  "vpbroadcastq (" base ",%[off]), %%ymm14\n\t vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                       \
  "vpaddd %%ymm15, %%ymm" r0 ", %%ymm" r0 "\n\t vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"                       \
  "vpaddd %%ymm14, %%ymm" r1 ", %%ymm" r1 "\n\t"
#define ROWS ROW("%[r0]", "0", "1") ROW("%[r1]", "2", "3") ROW("%[r2]", "4", "5") ROW("%[r3]", "6", "7") \
             ROW("%[r4]", "8", "9") ROW("%[r5]", "10", "11")
#define ZERO(r) "vpxor %%xmm" r ", %%xmm" r ", %%xmm" r "\n\t"
#define STORE(r) "vmovdqa %%ymm" r ", 32*" r "(%[out])\n\t"
#define LOOP6X8(name, ALIGN, LOADB)                                                                            \
  void name(const void* b, const int16_t* const* r, int64_t quads, int32_t* out) {                            \
    int64_t off = 0;                                                                                          \
    __asm__ volatile(X12(ZERO) ALIGN "1:\n\t" LOADB ROWS "add $64, %[b]\n\t add $8, %[off]\n\t dec %[n]\n\t jnz 1b\n\t" \
                     X12(STORE)                                                                               \
                     : [b] "+r"(b), [off] "+r"(off), [n] "+r"(quads)                                          \
                     : [r0] "r"(r[0]), [r1] "r"(r[1]), [r2] "r"(r[2]), [r3] "r"(r[3]), [r4] "r"(r[4]),        \
                       [r5] "r"(r[5]), [out] "r"(out)                                                         \
                     : CLOB);                                                                                 \
  }
// Loop placement made explicit (the kernel now aligns its loop to 64 bytes; main's build had it 44 bytes in).
LOOP6X8(loop_int8_b_at44, ".p2align 6\n\t .skip 44, 0x90\n\t",
        "vpmovsxbw (%[b]), %%ymm12\n\t vpmovsxbw 16(%[b]), %%ymm13\n\t")
LOOP6X8(loop_int8_b, ".p2align 6\n\t", "vpmovsxbw (%[b]), %%ymm12\n\t vpmovsxbw 16(%[b]), %%ymm13\n\t")
LOOP6X8(loop_int16_b, ".p2align 6\n\t", "vmovdqu (%[b]), %%ymm12\n\t vmovdqu 32(%[b]), %%ymm13\n\t")

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
static double minimum(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

int main(int argc, char** argv) {
  double ghz = 2.85;
  for (int i = 1; i + 1 < argc; ++i)
    if (!strcmp(argv[i], "--ghz")) ghz = atof(argv[i + 1]);
  printf("cycles at an assumed %.2f GHz; min and median of thread CPU time over rounds taking turns\n\n", ghz);

  // 1. Instruction mixes, registers only (B's loads and A's broadcasts from one L1 line).
  alignas(64) static char mem[256] = {};
  const Mix mixes[] = {
      MIX("12 VPMADDWD", X12(MADD)),
      MIX("12 VFMADD231PS", X12(FMA)),
      MIX("12 VPMADDUBSW (not our contract)", X12(MADDUBS)),
      MIX("12 VPADDD", X12(ADD)),
      MIX("12 VPMADDWD + 6 VPADDD (independent)", X12(MADD) ADD6),
      MIX("12 VPMADDWD + 12 VPADDD (independent)", X12(MADD) X12(ADD)),
      MIX("12 (VPMADDWD -> VPADDD) pairs", X12(PAIR)),
      MIX("12 pairs + 2 VPMOVSXBW m128", X12(PAIR) MOVSX2),
      MIX("12 pairs + 6 VPBROADCASTQ m64", X12(PAIR) BCAST6),
      MIX("12 pairs + 2 VPMOVSXBW + 6 VPBROADCASTQ", X12(PAIR) MOVSX2 BCAST6),
      MIX("12 VPMADDWD + 12 VFMADD231PS", X12(MADD) X12(FMA)),
      MIX("12 pairs + 6 VFMADD231PS", X12(PAIR) FMA("0") FMA("1") FMA("2") FMA("3") FMA("4") FMA("5")),
      MIX("12 pairs + 12 VFMADD231PS", X12(PAIR) X12(FMA)),
  };
  const int nm = sizeof mixes / sizeof *mixes;
  const long iters = 400000;  // x4 bodies per iteration
  std::vector<std::vector<double>> tm(nm);
  for (int round = 0; round < 21; ++round)
    for (int i = 0; i < nm; ++i) {
      const double t0 = now();
      mixes[i].run(iters, mem);
      tm[i].push_back((now() - t0) / (iters * 4.0) * ghz * 1e9);
    }
  printf("%-46s %8s %8s  (cycles per body)\n", "instruction mix (one body)", "min", "median");
  for (int i = 0; i < nm; ++i) printf("%-46s %8.2f %8.2f\n", mixes[i].name, minimum(tm[i]), median(tm[i]));

  // 2. The 6 x 8 loop: B always the same 128 quads (L1), then int8_gemm's loop order over a real B.
  struct Shape { int64_t M, K, N; };
  const Shape shapes[] = {{64, 512, 2048}, {64, 2048, 512}, {1500, 512, 512}};
  printf("\n%-34s %-16s %8s %8s  (cycles per k-quad = 192 multiply-adds; MAC/cycle = 192 / cycles)\n", "6 x 8 loop",
         "M x K x N", "min", "median");
  for (const Shape& s : shapes) {
    const int64_t quads = s.K / 4, M6 = s.M / 6 * 6;
    std::vector<int16_t> a(static_cast<size_t>(s.M * s.K), 1);
    std::vector<int8_t> b8(static_cast<size_t>(s.N * s.K), 1);
    std::vector<int16_t> b16(static_cast<size_t>(s.N * s.K), 1);
    alignas(32) static int32_t out[96];
    const int64_t chunk = std::max<int64_t>(16, (int64_t{192} << 10) / s.K / 16 * 16);  // EMU_INT8_CHUNK_KB
    enum { kL1, kGemm, kGemmAt44, kGemmWide, kVariants };
    const char* names[kVariants] = {"B in L1 (same 128 quads)", "int8_gemm order (the kernel)",
                                    "same, loop 44 bytes into a line", "int16 B (pre-widened), same order"};
    std::vector<double> t[kVariants];
    for (int round = 0; round < 9; ++round)
      for (int v = 0; v < kVariants; ++v) {
        const double t0 = now();
        for (int64_t nc = 0; nc < s.N; nc += chunk)
          for (int64_t m = 0; m < M6; m += 6) {
            const int16_t* r[6];
            for (int i = 0; i < 6; ++i) r[i] = a.data() + (m + i) * s.K;
            for (int64_t n = nc; n < std::min(s.N, nc + chunk); n += 8) {
              const int64_t at = (n / 16) * s.K * 16 + (n % 16) * 4;  // the panel layout's byte offset
              if (v == kL1) loop_int8_b(b8.data() + (n % 16) * 4, r, std::min<int64_t>(quads, 128), out);
              else if (v == kGemm) loop_int8_b(b8.data() + at, r, quads, out);
              else if (v == kGemmAt44) loop_int8_b_at44(b8.data() + at, r, quads, out);
              else loop_int16_b(b16.data() + at, r, quads, out);  // 2 bytes per element: same element offset
            }
          }
        const double quads_run = double(M6 / 6) * (s.N / 8) * (v == kL1 ? std::min<int64_t>(quads, 128) : quads);
        t[v].push_back((now() - t0) / quads_run * ghz * 1e9);
      }
    char shape[32];
    snprintf(shape, sizeof shape, "%ldx%ldx%ld", static_cast<long>(s.M), static_cast<long>(s.K), static_cast<long>(s.N));
    for (int v = 0; v < kVariants; ++v) printf("%-34s %-16s %8.2f %8.2f\n", names[v], shape, minimum(t[v]), median(t[v]));
  }
  return 0;
}
