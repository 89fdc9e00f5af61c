// A decoder step's int8 GEMVs on the avx2 int8 kernels (emulator_int8.inc, EMU_INT8_ISA 1): whisper-base's 6 layers
// x (6 x 512x512, 512x2048, 2048x512) + logits 512x51865, distinct weights (48.6 MB: more than this VM's share of
// L3, so B comes from memory as in a step), M rows, two versions of the .inc taking turns sequence by sequence
// (OLD_INC = "orig", NEW_INC = "new"; bits compared first). Modes: 0 one thread (thread CPU time), 1 the driver's
// split (emulator.cc split_columns: a helper from 512 KB of B, 16 tasks; TASKS=n overrides), 2 every call in two
// halves, 3 the driver's split from 512 KB (orig) or 128 KB (new) with the new kernel. READ=1: "orig" is a plain
// read of the same B bytes (how close the GEMV gets to the memory stream). HOT=1: the 512x512 calls share one
// weight (in L2: the kernel's own speed). A minimal pool: one helper spinning on a generation counter.
// CPU figures only (no NPU). Build from the repository root:
//   git show 16469bd:kernels/emulator/emulator_int8.inc > /tmp/orig.inc
//   g++ -O3 -mavx2 -mfma -std=c++17 -pthread -Ikernels -Ikernels/emulator -DOLD_INC='"/tmp/orig.inc"' \
//       -DNEW_INC='"emulator_int8.inc"' benchmarks/int8_step_gemv.cc -o /tmp/int8_step_gemv
//   /tmp/int8_step_gemv M [reps] [first mode] [last mode]
#include <immintrin.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include <functional>
#include "int8_two_versions.h"
using namespace xdna::kernels;
using namespace xdna::kernels::emu;
// "read" pseudo-kernel: streams the same B bytes a gemm call of columns n0..n1 reads (whole panels), sums them.
static void read_quantize(const Int8Problem&, int64_t, int64_t) {}
static volatile int g_sink;
static void read_gemm(const Int8Problem& p, int64_t, int64_t, int64_t n0, int64_t n1) {
  const char* b = (const char*)p.qb + (n0 / 16) * p.Kpad * 16;
  const size_t bytes = size_t((n1 - n0 + 15) / 16) * p.Kpad * 16;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0;
  for (size_t i = 0; i < bytes; i += 64) {
    a0 = _mm256_add_epi32(a0, _mm256_loadu_si256((const __m256i*)(b + i)));
    a1 = _mm256_add_epi32(a1, _mm256_loadu_si256((const __m256i*)(b + i + 32)));
  }
  g_sink = _mm256_extract_epi32(_mm256_add_epi32(a0, a1), 0);
}
#include <time.h>
static int g_cpu_clock = 0;  // 1: thread CPU time (the one-thread mode: robust to preemption on a shared machine)
static double now() { timespec ts; clock_gettime(g_cpu_clock ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }

// minimal pool: one helper spinning (pause) on a generation counter; dynamic tasks.
struct Pool {
  std::atomic<uint64_t> gen{0};
  std::atomic<int64_t> next{0}, done{0};
  int64_t tasks = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  std::thread th;
  std::atomic<bool> stop{false};
  Pool() { th = std::thread([this] { uint64_t seen = 0; while (!stop) { uint64_t g = gen.load(std::memory_order_acquire); if (g == seen) { _mm_pause(); continue; } seen = g; work(); } }); }
  ~Pool() { stop = true; th.join(); }
  void work() { for (int64_t t; (t = next.fetch_add(1)) < tasks;) { (*fn)(t); done.fetch_add(1); } }
  void run(int64_t n, const std::function<void(int64_t)>& f) {
    fn = &f; tasks = n; done = 0; next = 0; gen.fetch_add(1, std::memory_order_release);
    work(); while (done.load(std::memory_order_acquire) != n) _mm_pause();
  }
};

struct W { int64_t K, N, Kpad; int8_t* q; std::vector<float> sb; std::vector<int32_t> colsum; };
W make(int64_t K, int64_t N) {
  W w{K, N, (K + 63) / 64 * 64};
  int64_t Npad = (N + 15) / 16 * 16;
  w.q = (int8_t*)aligned_alloc(64, Npad * w.Kpad);
  for (int64_t i = 0; i < Npad * w.Kpad; ++i) w.q[i] = (int8_t)(rand() % 255 - 127);
  w.sb.assign(N, 0.01f); w.colsum.assign(N, 0);
  return w;
}
int main(int argc, char** argv) {
  int M = argc > 1 ? atoi(argv[1]) : 1;
  int reps = argc > 2 ? atoi(argv[2]) : 30;
  std::vector<W> ws; std::vector<int> cls;
  for (int l = 0; l < 6; ++l) {
    static bool hot = getenv("HOT") != nullptr;  // HOT=1: the 36 512x512 calls share one weight (in L2: the kernel's own speed)
    for (int i = 0; i < 6; ++i) { if (hot && !ws.empty() && cls[0] == 0) { ws.push_back(ws[0]); } else ws.push_back(make(512, 512)); cls.push_back(0); }
    ws.push_back(make(512, 2048)); cls.push_back(1);
    ws.push_back(make(2048, 512)); cls.push_back(2);
  }
  ws.push_back(make(512, 51865)); cls.push_back(3);
  const char* names[4] = {"512x512 (x36)", "512x2048 (x6)", "2048x512 (x6)", "logits 512x51865"};
  double bytes[4] = {};
  for (size_t i = 0; i < ws.size(); ++i) bytes[cls[i]] += double(ws[i].Kpad) * ((ws[i].N + 15) / 16 * 16);
  std::vector<float> a(M * 2048), c(M * 51865), sa(M);
  for (auto& x : a) x = (rand() / (float)RAND_MAX - 0.5f);
  void* qa = aligned_alloc(64, M * 2048 * 2 + 64);
  Pool pool;
  Int8Kernels ks[2] = {orig::k(), neu::k()};
  if (getenv("READ")) ks[0] = Int8Kernels{"read", 2, &read_quantize, &read_gemm};  // READ=1: orig = plain read of B
  {  // bits: both versions on every weight, all rows
    int bad = 0;
    std::vector<float> c2(c.size());
    for (auto& w : ws) {
      for (int v = 0; v < 2; ++v) {
        Int8Problem p{a.data(), w.K, qa, sa.data(), w.q, w.sb.data(), w.colsum.data(), v ? c2.data() : c.data(), w.N, M, w.K, w.N, w.Kpad, nullptr};
        ks[v].quantize_rows(p, 0, M);
        ks[v].gemm(p, 0, M, 0, w.N);
      }
      bad += memcmp(c.data(), c2.data(), M * w.N * 4) != 0;
    }
    printf("bits: %s\n", getenv("READ") ? "(orig = plain read of B)" : bad ? "DIFFERENT" : "same");
  }
  // modes: 0 one thread; 1 the driver's split (512 KB per helper, 16 tasks); 2 every call in 2 halves (2 tasks)
  const char* mnames[4] = {"1 thread", "driver split", "2 halves", "driver split from 512 KB (orig) / 128 KB (new), new kernel both"};
  int mode_first = argc > 3 ? atoi(argv[3]) : 0, mode_last = argc > 4 ? atoi(argv[4]) : 2;
  for (int mode = mode_first; mode <= mode_last; ++mode) {
    g_cpu_clock = mode == 0;
    std::vector<double> t[2][4];
    for (int r = 0; r < reps; ++r)
      for (int v = 0; v < 2; ++v) {
        double acc[4] = {};
        for (size_t i = 0; i < ws.size(); ++i) {
          W& w = ws[i];
          Int8Problem p{a.data(), w.K, qa, sa.data(), w.q, w.sb.data(), w.colsum.data(), c.data(), w.N, M, w.K, w.N, w.Kpad, nullptr};
          double t0 = now();
          const Int8Kernels& kk = mode == 3 ? ks[1] : ks[v];
          kk.quantize_rows(p, 0, M);
          int64_t strips = (w.N + 63) / 64;
          static int64_t ntasks = getenv("TASKS") ? atol(getenv("TASKS")) : 16;
          // mode 3: the driver's split with a helper from 512 KB of B (orig) or from 128 KB (new), same kernel
          const int64_t min_b = mode == 3 && v == 1 ? (128 << 10) : (512 << 10);
          int64_t tasks = mode == 0 ? 1 : mode == 2 ? 2 : (w.Kpad * w.N >= 2 * min_b ? ntasks : 1);
          tasks = std::min(tasks, strips);
          int64_t spt = (strips + tasks - 1) / tasks;
          std::function<void(int64_t)> f = [&](int64_t tt) { int64_t n0 = tt * spt * 64, n1 = std::min(w.N, n0 + spt * 64); if (n0 < n1) kk.gemm(p, 0, M, n0, n1); };
          if (tasks == 1) f(0); else pool.run(tasks, f);
          acc[cls[i]] += now() - t0;
        }
        for (int k = 0; k < 4; ++k) t[v][k].push_back(acc[k]);
      }
    printf("M=%d, %s (%s, median of %d):\n", M, mnames[mode], mode == 0 ? "thread CPU time" : "wall", reps);
    double tot[2] = {};
    for (int k = 0; k < 4; ++k) {
      double med[2];
      for (int v = 0; v < 2; ++v) { std::sort(t[v][k].begin(), t[v][k].end()); med[v] = t[v][k][reps / 2]; tot[v] += med[v]; }
      printf("  %-18s %5.1f MB: orig %7.3f ms %5.1f GB/s | new %7.3f ms %5.1f GB/s  x%.2f\n", names[k], bytes[k] / 1e6, med[0] * 1e3, bytes[k] / med[0] / 1e9, med[1] * 1e3, bytes[k] / med[1] / 1e9, med[0] / med[1]);
    }
    double b = bytes[0] + bytes[1] + bytes[2] + bytes[3];
    printf("  all (sum of medians) %5.1f MB: orig %7.3f ms %5.1f GB/s | new %7.3f ms %5.1f GB/s\n", b / 1e6, tot[0] * 1e3, b / tot[0] / 1e9, tot[1] * 1e3, b / tot[1] / 1e9);
  }
}
