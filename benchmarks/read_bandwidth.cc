// Read bandwidth by working-set size (L2, L3, memory), one thread and two (each streaming its own buffer, at least
// 512 MB per thread), timed by thread CPU time and by wall time (on a shared machine the two threads may not run at
// the same time: then the wall figure, summed over the threads, stays near one thread's). CPU figures only.
//   g++ -O2 -mavx2 -pthread benchmarks/read_bandwidth.cc -o /tmp/read_bandwidth && /tmp/read_bandwidth
#include <immintrin.h>
#include <time.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
static double cpu() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
static double wall() { timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
__attribute__((noinline)) static int read_buf(const char* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 128) {
    a0 = _mm256_add_epi32(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi32(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi32(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi32(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  return _mm256_extract_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)), 0);
}
int main() {
  for (size_t kb : {256, 1024, 4096, 16384, 65536, 262144}) {
    for (int threads : {1, 2}) {
      size_t bytes = kb << 10;
      size_t total_target = std::max<size_t>(bytes * 4, 512u << 20);  // at least 512 MB read per thread
      int passes = total_target / bytes;
      std::vector<double> cpus(threads), walls(threads);
      std::atomic<int> ready{0};
      std::vector<std::thread> th;
      for (int t = 0; t < threads; ++t)
        th.emplace_back([&, t] {
          char* b = (char*)aligned_alloc(64, bytes);
          memset(b, 1, bytes);
          read_buf(b, bytes);
          ready++; while (ready < threads) {}
          volatile int s = 0;
          double c0 = cpu(), w0 = wall();
          for (int i = 0; i < passes; ++i) s += read_buf(b, bytes);
          cpus[t] = cpu() - c0; walls[t] = wall() - w0;
          free(b);
        });
      for (auto& x : th) x.join();
      double per = double(bytes) * passes;
      double gb_cpu = 0, gb_wall = 0;
      for (int t = 0; t < threads; ++t) gb_cpu += per / cpus[t] / 1e9, gb_wall += per / walls[t] / 1e9;
      printf("%7zu KB per thread, %d thread(s): %6.1f GB/s (thread CPU time, summed), %6.1f GB/s (wall, summed)\n", kb, threads, gb_cpu, gb_wall);
    }
  }
}
