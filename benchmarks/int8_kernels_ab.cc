// The avx2 int8 kernels (emulator_int8.inc, EMU_INT8_ISA 1) of two versions in one process, taking turns call by
// call: quantise + gemm of one M x K x N on one thread, the driver's task split (emulator.cc: split_columns up to
// 16 rows, else split_blocks(M, N, 192) for 2 threads) run in turn on this thread; medians of thread CPU time
// (less sensitive to other jobs on a shared machine than wall time) and the gemm's minimum; the two take turns in
// alternating order; asserts the two give the same bits.
// CPU figures only (no NPU). Build, from the repository root, with the old version of the .inc in /tmp/old.inc:
//   git show 038e511:kernels/emulator/emulator_int8.inc > /tmp/old.inc
//   g++ -O3 -mavx2 -mfma -std=c++17 -Ikernels -Ikernels/emulator -DOLD_INC='"/tmp/old.inc"' \
//       benchmarks/int8_kernels_ab.cc -o /tmp/int8_ab
//   /tmp/int8_ab M K N [reps] [epilogue: 0 none, 1 bias, 2 bias + GELU, 3 bias + residual]
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include "int8_two_versions.h"
using namespace xdna::kernels;
using namespace xdna::kernels::emu;
#include <time.h>
static double now() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
int main(int argc, char** argv) {
  int64_t M = atol(argv[1]), K = atol(argv[2]), N = atol(argv[3]);
  int reps = argc > 4 ? atoi(argv[4]) : 5;
  int epi = argc > 5 ? atoi(argv[5]) : 0;
  int64_t Kpad = (K + 63) / 64 * 64, Npad = (N + 15) / 16 * 16;
  std::vector<float> a(M * K), bias(N), res(M * N);
  srand(1);
  for (auto& x : a) x = (rand() / (float)RAND_MAX - 0.5f) * 3;
  for (auto& x : bias) x = rand() / (float)RAND_MAX;
  for (auto& x : res) x = rand() / (float)RAND_MAX;
  int8_t* qb = (int8_t*)aligned_alloc(64, Npad * Kpad);
  memset(qb, 0, Npad * Kpad);
  std::vector<float> sb(N); std::vector<int32_t> colsum(N);
  for (int64_t n = 0; n < N; ++n) {
    sb[n] = 0.01f + n * 1e-5f; int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) { int v = rand() % 255 - 127; qb[(n / 16) * Kpad * 16 + (k / 4) * 64 + (n % 16) * 4 + k % 4] = v; s += v; }
    colsum[n] = s;
  }
  GemmEpilogue e{}; e.bias = bias.data(); e.gelu = epi == 2; e.residual = epi == 3 ? res.data() : nullptr; e.ldr = N;
  Int8Kernels ks[2] = {orig::k(), neu::k()};
  std::vector<float> c[2];
  double best[2] = {1e9, 1e9}; std::vector<double> t[2], tq[2], tg[2];
  for (int r = 0; r < reps; ++r)
    for (int ii = 0; ii < 2; ++ii) {
      const int i = r % 2 ? 1 - ii : ii;  // the order alternates: the second runner of a turn finds B warm in cache
      c[i].assign(M * N, 0.f);
      static void* qa = aligned_alloc(64, M * Kpad * 2 + 64); std::vector<float> sa(M);
      Int8Problem p{a.data(), K, qa, sa.data(), qb, sb.data(), colsum.data(), c[i].data(), N, M, K, N, Kpad, epi ? &e : nullptr};
      double t0 = now();
      ks[i].quantize_rows(p, 0, M);
      double t1 = now();
      if (M <= 16) {  // split_columns, 2 threads: 64-col strips, 16 tasks
        int64_t strips = (N + 63) / 64, tasks = std::min<int64_t>(strips, K * N >= 2 * (512 << 10) ? 16 : 1), spt = (strips + tasks - 1) / tasks;
        for (int64_t t = 0; t < tasks; ++t) { int64_t n0 = t * spt * 64, n1 = std::min(N, n0 + spt * 64); if (n0 < n1) ks[i].gemm(p, 0, M, n0, n1); }
      } else {  // split_blocks(M, N, 192, 2)
        int64_t n_tiles = (N + 63) / 64, m_blocks = (M + 191) / 192, rpb = (M + m_blocks - 1) / m_blocks;
        int64_t n_blocks = std::min(n_tiles, (16 + m_blocks - 1) / m_blocks), tpb = (n_tiles + n_blocks - 1) / n_blocks;
        for (int64_t t = 0; t < m_blocks * n_blocks; ++t) {
          int64_t mb = t / n_blocks, nb = t % n_blocks, m0 = mb * rpb, m1 = std::min(M, m0 + rpb), n0 = nb * tpb * 64, n1 = std::min(N, n0 + tpb * 64);
          if (m0 < m1 && n0 < n1) ks[i].gemm(p, m0, m1, n0, n1);
        }
      }
      double t2 = now();
      t[i].push_back(t2 - t0); tq[i].push_back(t1 - t0); tg[i].push_back(t2 - t1);
    }
  for (int i = 0; i < 2; ++i) { std::sort(t[i].begin(), t[i].end()); std::sort(tq[i].begin(), tq[i].end()); std::sort(tg[i].begin(), tg[i].end()); }
  double m0 = t[0][t[0].size() / 2], m1 = t[1][t[1].size() / 2];
  bool same = memcmp(c[0].data(), c[1].data(), M * N * 4) == 0;
  printf("%5ld x %5ld x %6ld epi%d: orig %8.3f ms (%5.1f GMAC/s)  new %8.3f ms (%5.1f GMAC/s)  x%.2f  %s\n", M, K, N, epi,
         m0 * 1e3, M * K * N / m0 / 1e9, m1 * 1e3, M * K * N / m1 / 1e9, m0 / m1, same ? "same bits" : "DIFFERENT");
  double g0 = tg[0][tg[0].size() / 2], g1 = tg[1][tg[1].size() / 2];
  printf("      quantise: orig %.3f ms new %.3f ms | gemm only: orig %.4f ms (%.1f GMAC/s) new %.4f ms (%.1f GMAC/s) x%.2f\n", tq[0][tq[0].size() / 2] * 1e3, tq[1][tq[1].size() / 2] * 1e3,
         g0 * 1e3, M * K * N / g0 / 1e9, g1 * 1e3, M * K * N / g1 / 1e9, g0 / g1);
  printf("      gemm min: orig %.4f ms (%.1f GMAC/s) new %.4f ms (%.1f GMAC/s) x%.2f\n", tg[0][0] * 1e3,
         M * K * N / tg[0][0] / 1e9, tg[1][0] * 1e3, M * K * N / tg[1][0] / 1e9, tg[0][0] / tg[1][0]);
  return !same;
}
