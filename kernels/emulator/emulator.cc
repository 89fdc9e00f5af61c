// The emulator: the GEMM contract on the CPU. reference_gemm is the spec in a dozen lines; emulator_gemm is the
// same contract blocked, vectorised (kernels in emulator_<isa>.cc, chosen once at run time) and multi-threaded.
#include "emulator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <memory>
#include <new>
#include <pthread.h>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "emulator_isa.h"

#if defined(XDNA_EMULATOR_X86)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#endif

namespace xdna::kernels {

static_assert(kTileK == 64 && kTileN == 64, "emulator kernels assume 64x64 B tiles");

void reference_gemm(const GemmArgs& args, const PackedB& b) {
  const auto& s = b.shape;
  for (int64_t m = 0; m < args.M; ++m)
    for (int64_t n = 0; n < s.N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < s.K; ++k)
        acc += round_to_bf16(args.a[m * args.lda + k]) * bf16_to_f32(b.bits()[packed_b_offset(s.Kpad, k, n)]);
      args.c[m * args.ldc + n] = acc;
    }
  if (!args.epilogue.empty()) apply_epilogue(args.epilogue, args.c, args.ldc, 0, args.M, 0, s.N);
}

namespace emu {

float* scratch(int slot, size_t floats) {
  struct Buffer {
    float* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[6];
  Buffer& buf = buffers[slot];
  if (buf.size < floats) {
    const size_t bytes = (std::max(floats, buf.size * 2) * sizeof(float) + 63) / 64 * 64;
    void* fresh = std::aligned_alloc(64, bytes);
    if (!fresh) throw std::bad_alloc();
    std::free(buf.data);
    buf.data = static_cast<float*>(fresh);
    buf.size = bytes / sizeof(float);
  }
  return buf.data;
}

namespace {

struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512bf16 = false, avx512vnni = false;
  bool avx_vnni = false;  // the 256-bit VEX VPDPBUSD (with AVX2)
  bool amx = false;  // AMX-TILE, -BF16 and -INT8 with the AVX-512 sets the amx kernels also run (VNNI included)
  bool intel = false;
};

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures f;
#if defined(XDNA_EMULATOR_X86)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    f.avx512bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
    f.avx512vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID.(7, 0).EDX: bit 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8.
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
      f.amx = f.avx512vnni && (edx >> 22 & 1) && (edx >> 24 & 1) && (edx >> 25 & 1);
    // CPUID.(7, 1).EAX bit 4: AVX-VNNI.
    if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) f.avx_vnni = f.avx2 && (eax >> 4 & 1);
    f.intel = __builtin_cpu_is("intel");
#endif
    return f;
  }();
  return f;
}

// Linux gives a process the 8 KB AMX tile-data state only when asked (arch_prctl, Linux >= 5.16); the grant is
// per process and a fork()ed child inherits it. Asked once; a refusal (older kernel, seccomp, a hypervisor that
// does not expose the state) is logged once and the AVX-512 kernels run instead.
bool amx_granted() {
#if defined(XDNA_EMULATOR_X86) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    if (!cpu_features().amx) return false;
    const char* why = "XDNA_EMULATOR_DENY_AMX is set";  // tests: the refusal path on a CPU that has AMX
    if (const char* deny = std::getenv("XDNA_EMULATOR_DENY_AMX"); !deny || !*deny) {
      constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
      if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0) return true;
      why = std::strerror(errno);
    }
    std::fprintf(stderr, "xdna emulator: the CPU has AMX but Linux did not grant the tile state (arch_prctl: %s); "
                 "using the AVX-512 kernels\n", why);
    return false;
  }();
  return granted;
#else
  return false;
#endif
}

// AMX where the CPU has it and Linux granted it. Without AMX: VDPBF16PS (avx512bf16) only on non-Intel cores:
// on Intel cores (Cooper Lake, and Sapphire Rapids measured) it runs slower than the fp32 FMA kernels
// (benchmarks/README.md, "AMX kernels"), while on AMD Zen 4 it is 1.3-1.9x faster than them.
const IsaKernels& best_supported_kernels() {
#if defined(XDNA_EMULATOR_X86)
  const CpuFeatures& f = cpu_features();
  if (f.amx && amx_granted()) return amx_kernels();
  if (f.avx512bf16 && !f.intel) return avx512bf16_kernels();
  if (f.avx512) return avx512_kernels();
  if (f.avx2) return avx2_kernels();
#endif
  return generic_kernels();
}

// XDNA_EMULATOR_ISA=generic|avx2|avx512|avx512bf16|amx forces a kernel set (tests use it to cover every path on
// one machine); an ISA the CPU lacks (or AMX that Linux did not grant) is refused with a message, never executed.
const IsaKernels& select_kernels() {
  const IsaKernels& best = best_supported_kernels();
  const char* forced = std::getenv("XDNA_EMULATOR_ISA");
  if (!forced || !*forced) return best;
  std::vector<const IsaKernels*> usable{&generic_kernels()};
#if defined(XDNA_EMULATOR_X86)
  const CpuFeatures& f = cpu_features();
  if (f.avx2) usable.push_back(&avx2_kernels());
  if (f.avx512) usable.push_back(&avx512_kernels());
  if (f.avx512bf16) usable.push_back(&avx512bf16_kernels());
  if (f.amx && amx_granted()) usable.push_back(&amx_kernels());
#endif
  for (const IsaKernels* k : usable)
    if (std::string(forced) == k->name) {
      std::fprintf(stderr, "xdna emulator: kernels '%s' (forced by XDNA_EMULATOR_ISA)\n", k->name);
      return *k;
    }
  std::fprintf(stderr, "xdna emulator: XDNA_EMULATOR_ISA=%s is not available on this CPU; using '%s'\n", forced,
               best.name);
  return best;
}

const IsaKernels& kernels() {
  static const IsaKernels& chosen = select_kernels();
  return chosen;
}

// Busy-wait step: sched_yield, not pause. The scheduler may put the caller and a helper on one core (seen on the
// 2-vCPU VM this was tuned on, even when idle); spinning there would hold the core the other needs, while a
// yield on an otherwise idle core returns at once.
void relax() { std::this_thread::yield(); }

// A small persistent pool. One job at a time (callers queue on job_mutex_); the calling thread works too.
// Idle workers spin for kSpin before they sleep: the decoder issues GEMVs a few microseconds apart, and a
// condition-variable wake-up would cost more than such a GEMV.
// The caller waits for the job's tasks, never for helpers to show up: a helper that other programs' spinning
// threads keep off a core (ORT's or torch's OpenMP pool between nodes) finds the tasks gone when it runs, instead
// of stalling every GEMM until the scheduler gets to it.
//
// The pool is never destroyed: its destructor would join workers that a fork()ed child does not have (the child's
// exit() hung in pthread_cond_destroy). A fork()ed child starts with a fresh pool instead of its copy of the
// parent's, whose mutexes may have been held by threads that do not exist in the child; the copy is leaked.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static std::once_flag once;
    std::call_once(once, [] {
      current_.store(new ThreadPool, std::memory_order_release);
      pthread_atfork(nullptr, nullptr, [] { current_.store(new ThreadPool, std::memory_order_release); });
    });
    return *current_.load(std::memory_order_acquire);
  }

  // Runs fn(0..tasks-1) on up to `threads` threads (the caller included) and returns when all are done.
  // Rethrows the first exception a task threw.
  void run(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    const int helpers = static_cast<int>(std::min<int64_t>(threads, tasks)) - 1;
    auto job = std::make_shared<Job>(fn, tasks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < helpers)
        workers_.emplace_back([this, index = static_cast<int>(workers_.size())] { worker_loop(index); });
      job_ = job;
      helpers_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) work_cv_.notify_all();
    job->work_off();
    while (job->done.load(std::memory_order_acquire) != tasks) relax();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_.reset();  // late helpers still holding it find no task left; `fn` is never called after this
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  static constexpr std::chrono::microseconds kSpin{200};

  struct Job {
    Job(const std::function<void(int64_t)>& f, int64_t n) : fn(f), tasks(n) {}
    const std::function<void(int64_t)>& fn;  // valid while done < tasks (the caller is still waiting)
    const int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex error_mutex;
    std::exception_ptr error;

    void work_off() {
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
        try {
          fn(t);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
        }
        done.fetch_add(1, std::memory_order_acq_rel);  // release: this task's writes; acquire: error
      }
    }
  };

  // Waits for a generation other than `seen`: spins for kSpin, then sleeps on the condition variable.
  uint64_t wait_for_job(uint64_t seen) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      const uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen) return g;
      relax();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_acq_rel);
    work_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
    return generation_.load(std::memory_order_acquire);
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      seen = wait_for_job(seen);
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        // Re-read: a job this worker sat out may have ended and the next begun since wait_for_job returned.
        seen = generation_.load(std::memory_order_relaxed);
        if (index < helpers_) job = job_;
      }
      if (job) job->work_off();
    }
  }

  static inline std::atomic<ThreadPool*> current_{nullptr};

  ThreadPool() = default;
  ~ThreadPool() = delete;

  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;  // the running job (null between jobs)
  int helpers_ = 0;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> generation_{0};
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splitting a call costs a few microseconds of synchronisation, so a thread must get at least this much work:
// multiply-adds for the blocked path, bytes of B for the (memory-bound) direct path.
constexpr int64_t kMinMacsPerThread = int64_t{1} << 18;
constexpr int64_t kMinBBytesPerThread = int64_t{64} << 10;
// Few-row calls on packed weights (split_columns) stream B from cache at tens of GB/s: 64 KB is a couple of
// microseconds, less than handing a task to another thread costs when that thread's core is busy (measured on
// the shared 2-core VM: 5 x 512 x 512 and 5 x 2048 x 512 ran faster on one thread than on two; the tile kernels
// take 5 x 512 x 512 in bf16 in ~9 us on one). A helper gets at least 512 KB: the decoder's 512 x 512 weights run
// on the calling thread, 512 x 2048 (int8 and bf16) and the logits on two.
constexpr int64_t kMinStreamBytesPerThread = int64_t{512} << 10;
// Tasks are pulled dynamically; several per thread keep all threads busy when a core is shared with other work.
constexpr int64_t kTasksPerThread = 8;

int resolve_threads(int threads) {
  static const int all_cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return threads <= 0 ? all_cores : threads;
}

// For calls bound by reading B (`b_bytes` of it): threads split the columns [0, N) into 64-wide strips so that
// each streams its share of B once; run_cols(n0, n1) computes columns n0..n1-1 for every row.
template <class RunCols>
void split_columns(int64_t N, int64_t b_bytes, int threads, RunCols&& run_cols) {
  threads = static_cast<int>(std::clamp<int64_t>(b_bytes / kMinStreamBytesPerThread, 1, threads));
  const int64_t strips = ceil_div(N, kTileN);
  const int64_t tasks = std::min<int64_t>(strips, threads == 1 ? 1 : kTasksPerThread * threads);
  const int64_t strips_per_task = ceil_div(strips, tasks);
  auto task = [&](int64_t t) {
    const int64_t n0 = t * strips_per_task * kTileN, n1 = std::min(N, n0 + strips_per_task * kTileN);
    if (n0 < n1) run_cols(n0, n1);
  };
  if (tasks == 1) task(0);
  else ThreadPool::instance().run(threads, tasks, task);
}


// The task geometry of a compute-bound call: (row block, column block) pairs, enough of them to balance `threads`;
// row blocks are at most `block_m` rows, column blocks whole 64-wide tiles. Task t is row block t / n_blocks,
// column block t % n_blocks. split_blocks runs one product's tasks; emulator_gemm_int8_shared_a runs several
// products' tasks as one job, each product split as split_blocks splits it alone.
struct BlockSplit {
  int64_t M = 0, N = 0;
  int64_t m_blocks = 0, rows_per_block = 0;  // row blocks: m_blocks of rows_per_block rows (the last may be short)
  int64_t n_blocks = 0, cols_per_block = 0;  // column blocks: n_blocks of cols_per_block columns (whole tiles)

  BlockSplit() = default;
  BlockSplit(int64_t M_, int64_t N_, int64_t block_m, int threads) : M(M_), N(N_) {
    const int64_t n_tiles = ceil_div(N, kTileN);
    m_blocks = ceil_div(M, block_m);
    rows_per_block = ceil_div(M, m_blocks);
    n_blocks = std::min(n_tiles, threads == 1 ? 1 : ceil_div(kTasksPerThread * threads, m_blocks));
    cols_per_block = ceil_div(n_tiles, n_blocks) * kTileN;
  }
  int64_t tasks() const { return m_blocks * n_blocks; }
  // Task t's block [m0, m1) x [n0, n1); false when it is empty.
  bool block(int64_t t, int64_t* m0, int64_t* m1, int64_t* n0, int64_t* n1) const {
    const int64_t mb = t / n_blocks, nb = t % n_blocks;
    *m0 = mb * rows_per_block, *m1 = std::min(M, *m0 + rows_per_block);
    *n0 = nb * cols_per_block, *n1 = std::min(N, *n0 + cols_per_block);
    return *m0 < *m1 && *n0 < *n1;
  }
};

// For compute-bound calls: the tasks of BlockSplit(M, N, block_m, threads); run_block(m0, m1, n0, n1) computes one.
template <class RunBlock>
void split_blocks(int64_t M, int64_t N, int64_t block_m, int threads, RunBlock&& run_block) {
  const BlockSplit split(M, N, block_m, threads);
  auto task = [&](int64_t t) {
    int64_t m0, m1, n0, n1;
    if (split.block(t, &m0, &m1, &n0, &n1)) run_block(m0, m1, n0, n1);
  };
  if (threads == 1) {
    for (int64_t t = 0; t < split.tasks(); ++t) task(t);
  } else {
    ThreadPool::instance().run(threads, split.tasks(), task);
  }
}

}  // namespace
}  // namespace emu

using emu::kMinBBytesPerThread;
using emu::kMinMacsPerThread;
using emu::kTasksPerThread;

void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads) { emulator_gemm(args, b, threads, nullptr); }

bool emulator_wants_paired_b(int64_t M) {
  const emu::IsaKernels& kern = emu::kernels();
  return kern.paired && M >= kern.paired_min_m && M <= kern.paired_max_m;
}

std::vector<uint32_t> emulator_pair_b(const PackedB& b) {
  const emu::IsaKernels& kern = emu::kernels();
  if (!kern.pair_b || b.precision != Precision::kBf16 || b.shape.Npad % kTileN != 0) return {};
  std::vector<uint32_t> pairs(static_cast<size_t>(b.shape.Kpad * b.shape.Npad / 2));
  kern.pair_b(b.bits(), b.shape.Kpad, b.shape.Npad, pairs.data());
  return pairs;
}

void emulator_gemm(const GemmArgs& args, const PackedB& b, int threads, const uint32_t* pairs) {
  const PaddedShape& s = b.shape;
  const int64_t M = args.M, K = s.K, N = s.N;
  if (M <= 0 || N <= 0) return;
  // The epilogue (gemm_contract.h): the kernels run it on each panel of C as they store it, while it is in L1.
  const GemmEpilogue* ep = args.epilogue.empty() ? nullptr : &args.epilogue;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(args.c + m * args.ldc, args.c + m * args.ldc + N, 0.f);
    if (ep) apply_epilogue(*ep, args.c, args.ldc, 0, M, 0, N);
    return;
  }
  const emu::IsaKernels& kern = emu::kernels();
  const emu::Problem p{args.a, args.lda, args.c, args.ldc, b.bits(), M, K, N, s.Kpad, ep};

  threads = emu::resolve_threads(threads);

  // Few rows against a B paired beforehand: as the direct path, on the tiles.
  if (pairs && kern.paired && M >= kern.paired_min_m && M <= kern.paired_max_m) {
    emu::split_columns(N, K * N * 2, threads, [&](int64_t n0, int64_t n1) { kern.paired(p, pairs, 0, M, n0, n1); });
    return;
  }

  // Small M (GEMV): memory bound on B, so threads split the n-tiles and each streams its share of B once.
  if (M <= kern.direct_max_m) {
    emu::split_columns(N, K * N * 2, threads, [&](int64_t n0, int64_t n1) { kern.direct(p, 0, M, n0, n1); });
    return;
  }

  // Large M: (row block, column block) tasks.
  threads = static_cast<int>(std::clamp<int64_t>(M * K * N / kMinMacsPerThread, 1, threads));
  emu::split_blocks(M, N, kern.block_m, threads,
                    [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kern.blocked(p, m0, m1, n0, n1); });
}

void emulator_gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N, int threads) {
  if (count == 0 || N <= 0) return;
  if (K == 0) {
    for (size_t i = 0; i < count; ++i)
      for (int64_t m = 0; m < calls[i].args.M; ++m)
        std::fill(calls[i].args.c + m * calls[i].args.ldc, calls[i].args.c + m * calls[i].args.ldc + N, 0.f);
    for (size_t i = 0; i < count; ++i)
      if (!calls[i].args.epilogue.empty())
        apply_epilogue(calls[i].args.epilogue, calls[i].args.c, calls[i].args.ldc, 0, calls[i].args.M, 0, N);
    return;
  }
  const emu::IsaKernels& kern = emu::kernels();
  // Memory bound on B: every task streams at least kMinBBytesPerThread of one call's B, in 64-column strips.
  const int64_t strip_bytes = K * kTileN * 4;
  const int64_t strips = emu::ceil_div(N, kTileN);
  const int64_t strips_per_task = std::min(strips, std::max<int64_t>(1, kMinBBytesPerThread / strip_bytes));
  const int64_t tasks_per_call = emu::ceil_div(strips, strips_per_task);
  const int64_t tasks = tasks_per_call * static_cast<int64_t>(count);
  const int64_t total_bytes = K * N * 4 * static_cast<int64_t>(count);
  threads = static_cast<int>(std::clamp<int64_t>(total_bytes / kMinBBytesPerThread, 1, emu::resolve_threads(threads)));
  auto task = [&](int64_t t) {
    const UnpackedGemm& call = calls[t / tasks_per_call];
    const int64_t n0 = (t % tasks_per_call) * strips_per_task * kTileN, n1 = std::min(N, n0 + strips_per_task * kTileN);
    if (call.args.M <= 0 || n0 >= n1) return;
    const emu::UnpackedProblem p{call.args.a, call.args.lda, call.args.c, call.args.ldc, call.b, call.ldb,
                                 call.args.M, K, N, call.b_transposed, call.b_bf16};
    kern.unpacked(p, 0, call.args.M, n0, n1);
    if (!call.args.epilogue.empty()) apply_epilogue(call.args.epilogue, call.args.c, call.args.ldc, 0, call.args.M, n0, n1);
  };
  if (threads == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    emu::ThreadPool::instance().run(threads, tasks, task);
  }
}

namespace emu {
const IsaKernels& active_kernels() { return kernels(); }

const AttentionKernels* attention_amx_kernels() {
#if defined(XDNA_EMULATOR_X86)
  if (&kernels() == &amx_kernels() && cpu_features().avx512bf16) return &amx_attention_kernels_impl();
#endif
  return nullptr;
}
}  // namespace emu

const char* emulator_kernel_name() { return emu::kernels().name; }

void emulator_parallel_for(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
  threads = static_cast<int>(std::min<int64_t>(emu::resolve_threads(threads), tasks));
  if (threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
  } else {
    emu::ThreadPool::instance().run(threads, tasks, fn);
  }
}

namespace {
const emu::Int8Kernels& int8_kernels();  // below, with the precision modes

// A bf16 weight and, made at its first call that can use it (few rows on AMX), its tile-paired copy: weights
// only ever run with one row (or many) never pay the extra memory.
class EmulatorWeight final : public DeviceWeight {
 public:
  using DeviceWeight::DeviceWeight;
  const uint32_t* pairs() const {
    std::call_once(once_, [&] {
      try {
        pairs_ = emulator_pair_b(host());
      } catch (const std::bad_alloc&) {  // the packed B alone still serves every call
        std::fprintf(stderr, "xdna emulator: no memory for a tile-paired copy of a %lldx%lld weight; few-row calls "
                     "on it use the FMA kernels\n", static_cast<long long>(host().shape.K),
                     static_cast<long long>(host().shape.N));
      }
    });
    return pairs_.empty() ? nullptr : pairs_.data();
  }

 private:
  mutable std::once_flag once_;
  mutable std::vector<uint32_t> pairs_;
};

class EmulatorBackend final : public Backend {
 public:
  explicit EmulatorBackend(int threads) : threads_(threads) {}
  std::string name() const override { return "emulator"; }
  std::string device_description() const override {
    const emu::IsaKernels& bf16 = emu::kernels();
    const emu::Int8Kernels& int8 = int8_kernels();
    auto named = [](const char* name, const char* detail) {
      return detail ? std::string(name) + " (" + detail + ")" : std::string(name);
    };
    return "CPU emulator of the NPU GEMM contract (" + named(bf16.name, bf16.detail) + " kernels, int8 " +
           named(int8.name, int8.detail) + ")";
  }
  bool can_run(int64_t, int64_t, int64_t, std::string*) const override { return true; }
  std::shared_ptr<DeviceWeight> upload(std::shared_ptr<const PackedB> b) override {
    if (b->precision == Precision::kBf16) return std::make_shared<EmulatorWeight>(std::move(b));
    return std::make_shared<DeviceWeight>(std::move(b));
  }
  bool supports(Precision, std::string*) const override { return true; }
  void gemm(const GemmArgs& args, const DeviceWeight& b) override {
    const PackedB& host = b.host();
    switch (host.precision) {
      case Precision::kInt8:
        emulator_gemm_int8(args, *host.int8, threads_);
        break;
      case Precision::kBf16x3:
        emulator_gemm_bf16x3(args, *host.bf16x3, threads_);
        break;
      default: {
        const auto* weight = dynamic_cast<const EmulatorWeight*>(&b);
        emulator_gemm(args, host, threads_, weight && emulator_wants_paired_b(args.M) ? weight->pairs() : nullptr);
      }
    }
  }
  bool gemm_unpacked(const UnpackedGemm* calls, size_t count, int64_t K, int64_t N) override {
    emulator_gemm_unpacked(calls, count, K, N, threads_);
    return true;
  }
  bool has_int8_kernel(int64_t, int64_t, std::string*) const override { return true; }  // emulator_gemm_int8
  bool gemm_int8_chain(const Int8Chain& chain) override {
    const PackedB &b1 = chain.first_weight->host(), &b2 = chain.second_weight->host();
    if (b1.precision != Precision::kInt8 || b2.precision != Precision::kInt8) return false;
    return emulator_gemm_int8_chain(chain.first, *b1.int8, chain.second, *b2.int8, threads_);
  }
  bool runs_int8_shared_a() const override { return true; }
  bool gemm_int8_shared_a(const float* a, int64_t M, int64_t lda, const SharedAProduct* products,
                          size_t count) override {
    std::vector<const QuantizedB*> b(count);
    for (size_t i = 0; i < count; ++i) {
      const PackedB& host = products[i].weight->host();
      if (host.precision != Precision::kInt8 || !host.int8) return false;
      b[i] = host.int8.get();
    }
    return emulator_gemm_int8_shared_a(a, M, lda, products, b.data(), count, threads_);
  }
  bool can_run_attention(const AttentionShape&, std::string*) const override { return true; }
  bool reads_bf16_kv() const override { return true; }
  void attention(const AttentionShape& shape, const AttentionHead* heads, size_t count) override {
    emulator_attention(shape, heads, count, threads_);
  }

 private:
  int threads_;
};
}  // namespace

std::unique_ptr<Backend> make_emulator_backend(int threads) { return std::make_unique<EmulatorBackend>(threads); }

}  // namespace xdna::kernels

// ---- Precision modes (gemm_contract.h). Kept beside the bf16 driver to share its thread pool. ----
namespace xdna::kernels {
namespace {

// Symmetric int8 quantisation of n values (stride apart), the contract's rule (the same arithmetic as the
// kernels' quantize_row in emulator_int8.inc): returns the scale; NaN when a value is not finite.
float quantize_run(const float* x, int64_t n, int64_t stride, int8_t* q, int64_t q_stride) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    finite &= std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {
    for (int64_t i = 0; i < n; ++i) q[i * q_stride] = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = amax / 127.f;
  const float inv = scale > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i * stride] * inv);  // round to nearest even (default rounding mode)
    // NaN only from 0 * inf, when 127 / amax overflows: that value is 0.
    q[i * q_stride] = static_cast<int8_t>(std::isnan(r) ? 0.f : std::clamp(r, -127.f, 127.f));
  }
  return scale;
}

// Up to this many rows an int8 call splits only the columns (it is bound by reading B); rows per blocked task.
constexpr int64_t kInt8FewRows = 16;
constexpr int64_t kInt8BlockM = 192;

// The int8 kernel set follows the bf16 one (so XDNA_EMULATOR_ISA selects it too): AMX beside amx, VNNI beside
// the AVX-512 sets where the CPU has AVX512-VNNI, AVX-VNNI beside avx2 where the CPU has it, else the exact AVX2
// kernel (or portable C). XDNA_EMULATOR_INT8_ISA=generic|avx2|avxvnni|vnni|amx forces one on its own (tests);
// a set the CPU lacks is refused with a message.
const emu::Int8Kernels& select_int8_kernels() {
  const emu::Int8Kernels* best = &emu::generic_int8_kernels();
  std::vector<const emu::Int8Kernels*> usable{best};
#if defined(XDNA_EMULATOR_X86)
  const emu::CpuFeatures& f = emu::cpu_features();
  const emu::IsaKernels& bf16 = emu::kernels();
  if (&bf16 == &emu::amx_kernels()) best = &emu::amx_int8_kernels();
  else if (&bf16 == &emu::avx512_kernels() || &bf16 == &emu::avx512bf16_kernels())
    best = f.avx512vnni ? &emu::vnni_int8_kernels() : &emu::avx2_int8_kernels();
  else if (&bf16 == &emu::avx2_kernels()) best = f.avx_vnni ? &emu::avxvnni_int8_kernels() : &emu::avx2_int8_kernels();
  if (f.avx2) usable.push_back(&emu::avx2_int8_kernels());
  if (f.avx_vnni) usable.push_back(&emu::avxvnni_int8_kernels());
  if (f.avx512vnni) usable.push_back(&emu::vnni_int8_kernels());
  if (f.amx && emu::amx_granted()) usable.push_back(&emu::amx_int8_kernels());
#endif
  const char* forced = std::getenv("XDNA_EMULATOR_INT8_ISA");
  if (!forced || !*forced) return *best;
  for (const emu::Int8Kernels* k : usable)
    if (std::string(forced) == k->name) {
      std::fprintf(stderr, "xdna emulator: int8 kernels '%s' (forced by XDNA_EMULATOR_INT8_ISA)\n", k->name);
      return *k;
    }
  std::fprintf(stderr, "xdna emulator: XDNA_EMULATOR_INT8_ISA=%s is not available on this CPU; using '%s'\n", forced,
               best->name);
  return *best;
}

const emu::Int8Kernels& int8_kernels() {
  static const emu::Int8Kernels& chosen = select_int8_kernels();
  return chosen;
}

}  // namespace

float quantize_row_int8(const float* x, int64_t n, int8_t* q) { return quantize_run(x, n, 1, q, 1); }

const char* emulator_int8_kernel_name() { return int8_kernels().name; }

QuantizedB quantize_b_int8(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n) {
  QuantizedB b;
  b.K = K, b.N = N, b.Kpad = round_up(std::max<int64_t>(K, 1), kTileK), b.Npad = round_up(std::max<int64_t>(N, 1), 16);
  b.q.assign(static_cast<size_t>(b.Npad * b.Kpad), 0);
  b.scale.resize(N);
  b.colsum.resize(N);
  std::vector<int8_t> col(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    // Column n in its panel: q[(n / 16) * Kpad * 16 + (k / 4) * 64 + (n % 16) * 4 + k % 4]; k % 4 is contiguous,
    // so the column is runs of 4 bytes, 64 apart.
    int8_t* panel = b.q.data() + (n / 16) * b.Kpad * 16 + (n % 16) * 4;
    b.scale[n] = quantize_run(src + n * stride_n, K, stride_k, col.data(), 1);
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      panel[(k / 4) * 64 + k % 4] = col[k];
      s += col[k];
    }
    b.colsum[n] = s;
  }
  return b;
}

namespace {
// Quantises the M rows of p's A into its qa / sa: rows over the threads when there is enough of it.
void quantize_a(const emu::Int8Kernels& kern, const emu::Int8Problem& p, int threads) {
  const int64_t M = p.M;
  const int q_threads = static_cast<int>(std::clamp<int64_t>(M * p.K / (int64_t{1} << 16), 1, threads));
  if (q_threads == 1) {
    kern.quantize_rows(p, 0, M);
  } else {
    const int64_t tasks = std::min<int64_t>(M, emu::kTasksPerThread * q_threads), rows = emu::ceil_div(M, tasks);
    emu::ThreadPool::instance().run(q_threads, tasks, [&](int64_t t) {
      kern.quantize_rows(p, t * rows, std::min(M, (t + 1) * rows));
    });
  }
}
}  // namespace

void emulator_gemm_int8(const GemmArgs& args, const QuantizedB& b, int threads) {
  const int64_t M = args.M, K = b.K, N = b.N;
  if (K > kInt8MaxK) throw std::invalid_argument("int8 GEMM: K past the int32-exact limit");
  if (M <= 0 || N <= 0) return;
  const emu::Int8Kernels& kern = int8_kernels();
  threads = emu::resolve_threads(threads);
  // Per-thread scratch (slots 4 and 5: the kernels never use them), reused call after call.
  const size_t qa_bytes = static_cast<size_t>(M * b.Kpad * kern.a_bytes);
  // The epilogue (gemm_contract.h): the kernels run it on each block right after they dequantise it.
  emu::Int8Problem p{args.a, args.lda, emu::scratch(4, qa_bytes / sizeof(float) + 1), emu::scratch(5, M),
                     b.q.data(), b.scale.data(), b.colsum.data(), args.c, args.ldc, M, K, N, b.Kpad,
                     args.epilogue.empty() ? nullptr : &args.epilogue};

  quantize_a(kern, p, threads);

  auto block = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kern.gemm(p, m0, m1, n0, n1); };
  // Few rows: bound by reading B, so threads split the columns and each streams its share of B once.
  if (M <= kInt8FewRows) {
    emu::split_columns(N, b.Kpad * N, threads, [&](int64_t n0, int64_t n1) { block(0, M, n0, n1); });
    return;
  }
  // Many rows: (row block, column block) tasks, as emulator_gemm does.
  threads = static_cast<int>(std::clamp<int64_t>(M * K * N / (2 * kMinMacsPerThread), 1, threads));
  emu::split_blocks(M, N, kInt8BlockM, threads, block);
}

// Rows per panel of the int8 chain: the panel's intermediate (rows x N1 fp32: 512 KB for Whisper base's 2048) and
// quantised A stay in the core's L2 beside the B panels streaming through; more rows re-read B fewer times.
constexpr int64_t kInt8ChainPanelRows = 64;

bool emulator_gemm_int8_chain(const GemmArgs& first, const QuantizedB& b1, const GemmArgs& second,
                              const QuantizedB& b2, int threads) {
  const int64_t M = first.M, K1 = b1.K, N1 = b1.N, N2 = b2.N;
  static_assert(kInt8ChainMinRows > kInt8FewRows, "few-row calls split the columns instead");
  if (M < kInt8ChainMinRows || second.M != M || b2.K != N1 || N1 <= 0 || N2 <= 0 || K1 > kInt8MaxK || N1 > kInt8MaxK)
    return false;
  const emu::Int8Kernels& kern = int8_kernels();
  threads = emu::resolve_threads(threads);
  threads = static_cast<int>(std::clamp<int64_t>(M * (K1 * N1 + N1 * N2) / (2 * kMinMacsPerThread), 1, threads));
  // Panels of whole 32-row AMX tile pairs, at most kInt8ChainPanelRows, small enough to give every thread work.
  const int64_t panel = std::min(kInt8ChainPanelRows, round_up(emu::ceil_div(M, threads), 32));
  const int64_t panels = emu::ceil_div(M, panel);
  // The intermediate's row stride: a multiple of 4 KB (N1 = 2048) maps a tile's 16 rows to one L1 set.
  const int64_t ldh = round_up(N1, 16) + 16;
  auto bytes_in_floats = [](int64_t bytes) { return static_cast<size_t>(round_up(bytes, 64) / 4); };
  const size_t qa1_floats = bytes_in_floats(panel * b1.Kpad * kern.a_bytes);
  const size_t h_floats = static_cast<size_t>(panel * ldh);
  const size_t qa2_floats = bytes_in_floats(panel * b2.Kpad * kern.a_bytes);
  auto run_panel = [&](int64_t t) {
    const int64_t m0 = t * panel, rows = std::min(panel, M - m0);
    float* qa1 = emu::scratch(4, qa1_floats + h_floats + qa2_floats);  // per thread: [qa1 | h | qa2]
    float* h = qa1 + qa1_floats;
    float* qa2 = h + h_floats;
    float* sa = emu::scratch(5, static_cast<size_t>(2 * panel));
    // Each epilogue as the unchained call applies it, its residual rows offset to the panel's.
    const GemmEpilogue e1 = first.epilogue.from_row(m0), e2 = second.epilogue.from_row(m0);
    const emu::Int8Problem p1{first.a + m0 * first.lda, first.lda, qa1, sa, b1.q.data(), b1.scale.data(),
                              b1.colsum.data(), h, ldh, rows, K1, N1, b1.Kpad, e1.empty() ? nullptr : &e1};
    kern.quantize_rows(p1, 0, rows);
    kern.gemm(p1, 0, rows, 0, N1);
    const emu::Int8Problem p2{h, ldh, qa2, sa + panel, b2.q.data(), b2.scale.data(), b2.colsum.data(),
                              second.c + m0 * second.ldc, second.ldc, rows, N1, N2, b2.Kpad,
                              e2.empty() ? nullptr : &e2};
    kern.quantize_rows(p2, 0, rows);
    kern.gemm(p2, 0, rows, 0, N2);
  };
  if (threads == 1 || panels == 1) {
    for (int64_t t = 0; t < panels; ++t) run_panel(t);
  } else {
    emu::ThreadPool::instance().run(threads, panels, run_panel);
  }
  return true;
}

// Rows per sub-block of a shared-A product with a bfloat16 output: its fp32 block (x up to N columns) stays in the
// core's L2 beside the quantised A rows and B panels until it is rounded; a multiple of the 6-row AVX2 kernel and of
// the 32-row AMX tile pairs.
constexpr int64_t kInt8SharedSubRows = 96;

bool emulator_gemm_int8_shared_a(const float* a, int64_t M, int64_t lda, const SharedAProduct* products,
                                 const QuantizedB* const* b, size_t count, int threads) {
  static_assert(kInt8ChainMinRows > kInt8FewRows, "few-row calls split the columns instead");
  if (M < kInt8ChainMinRows || count == 0) return false;
  const int64_t K = b[0]->K, Kpad = b[0]->Kpad;
  if (K > kInt8MaxK || K <= 0) return false;
  int64_t macs = 0;
  for (size_t i = 0; i < count; ++i) {
    const SharedAProduct& pr = products[i];
    const int64_t N = b[i]->N;
    if (b[i]->K != K || b[i]->Kpad != Kpad || N <= 0) return false;
    if (!pr.c && !pr.c_bf16 && !pr.heads_bf16) return false;
    if (pr.heads_bf16 && (pr.heads <= 0 || pr.depth <= 0 || pr.heads * pr.depth != N || pr.rows_per_batch <= 0 ||
                          M % pr.rows_per_batch != 0))
      return false;
    macs += M * K * N;
  }
  const emu::Int8Kernels& kern = int8_kernels();
  threads = emu::resolve_threads(threads);
  // A quantised once, in the calling thread's slot 5 ([sa | qa]): the tasks below use slot 4 for their blocks.
  const size_t sa_floats = static_cast<size_t>(round_up(M, 16));
  float* sa = emu::scratch(5, sa_floats + static_cast<size_t>(round_up(M * Kpad * kern.a_bytes, 64) / 4));
  void* qa = sa + sa_floats;
  const emu::Int8Problem pa{a, lda, qa, sa, nullptr, nullptr, nullptr, nullptr, 0, M, K, 0, Kpad, nullptr};
  quantize_a(kern, pa, threads);
  // Tasks: (product, row block, column block), each product's blocks as emulator_gemm_int8 splits it (BlockSplit).
  threads = static_cast<int>(std::clamp<int64_t>(macs / (2 * kMinMacsPerThread), 1, threads));
  std::vector<emu::BlockSplit> split(count);
  std::vector<int64_t> first_task(count + 1, 0);
  for (size_t i = 0; i < count; ++i) {
    split[i] = emu::BlockSplit(M, b[i]->N, kInt8BlockM, threads);
    first_task[i + 1] = first_task[i] + split[i].tasks();
  }
  auto task = [&](int64_t t) {
    const size_t i = static_cast<size_t>(std::upper_bound(first_task.begin(), first_task.end(), t) -
                                         first_task.begin()) - 1;
    const SharedAProduct& pr = products[i];
    const QuantizedB& qb = *b[i];
    int64_t m0, m1, n0, n1;
    if (!split[i].block(t - first_task[i], &m0, &m1, &n0, &n1)) return;
    // The problem seen from row r0: quantised A, scales, residual and C start at that row.
    auto block = [&](int64_t r0, int64_t r1, float* c, int64_t ldc) {
      const GemmEpilogue e = pr.epilogue.from_row(r0);
      const emu::Int8Problem p{a + r0 * lda, lda, static_cast<char*>(qa) + r0 * Kpad * kern.a_bytes, sa + r0,
                               qb.q.data(), qb.scale.data(), qb.colsum.data(), c, ldc, r1 - r0, K, qb.N, Kpad,
                               e.empty() ? nullptr : &e};
      kern.gemm(p, 0, r1 - r0, n0, n1);
    };
    if (pr.c) return block(m0, m1, pr.c + m0 * pr.ldc, pr.ldc);
    // A bfloat16 output: sub-blocks of rows computed into this thread's scratch and rounded into their layouts
    // while they are in cache: each row's columns rounded once (into the plain output, or a row of the scratch),
    // then the head split's pieces copied from there.
    const int64_t ldc = round_up(qb.N, 16);
    float* c = emu::scratch(4, static_cast<size_t>(kInt8SharedSubRows * ldc + ldc / 2));
    uint16_t* rounded = reinterpret_cast<uint16_t*>(c + kInt8SharedSubRows * ldc);
    for (int64_t r0 = m0; r0 < m1; r0 += kInt8SharedSubRows) {
      const int64_t r1 = std::min(m1, r0 + kInt8SharedSubRows);
      block(r0, r1, c, ldc);
      for (int64_t m = r0; m < r1; ++m) {
        uint16_t* row = pr.c_bf16 ? pr.c_bf16 + m * pr.ldc_bf16 : rounded;
        store_bf16_as_cast(c + (m - r0) * ldc + n0, row + n0, n1 - n0);
        if (!pr.heads_bf16) continue;
        const int64_t T = pr.rows_per_batch, D = pr.depth, bt = m / T, tt = m % T;
        for (int64_t n = n0; n < n1;) {
          const int64_t h = n / D, d = n % D, len = std::min(n1, (h + 1) * D) - n;
          std::memcpy(pr.heads_bf16 + ((bt * pr.heads + h) * T + tt) * D + d, row + n,
                      static_cast<size_t>(len) * sizeof(uint16_t));
          n += len;
        }
      }
    }
  };
  const int64_t tasks = first_task[count];
  if (threads == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    emu::ThreadPool::instance().run(threads, tasks, task);
  }
  return true;
}

SplitB pack_b_bf16x3(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n) {
  std::vector<float> hi(static_cast<size_t>(K * N)), lo(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) {
      const float x = src[k * stride_k + n * stride_n], h = round_to_bf16(x);
      hi[k * N + n] = h;
      lo[k * N + n] = std::isfinite(h) ? round_to_bf16(x - h) : 0.f;  // x - h is exact in fp32
    }
  return {pack_b(hi.data(), K, N, N, 1), pack_b(lo.data(), K, N, N, 1)};
}

void emulator_gemm_bf16x3(const GemmArgs& args, const SplitB& b, int threads) {
  const int64_t M = args.M, K = b.hi.shape.K, N = b.hi.shape.N;
  if (M <= 0 || N <= 0) return;
  threads = emu::resolve_threads(threads);
  // Thread-local scratch (slots 4 and 5, which the bf16 kernels never use): no allocation per call.
  float* a_hi = emu::scratch(4, static_cast<size_t>(2 * M * K));
  float* a_lo = a_hi + M * K;
  float* small = emu::scratch(5, static_cast<size_t>(2 * M * N));  // A_lo.B_hi, then A_hi.B_lo
  // Row-parallel passes over A and C (the split and the final sum): over the threads when there is enough work.
  auto for_rows = [&](int64_t per_row, const std::function<void(int64_t, int64_t)>& fn) {
    const int t = static_cast<int>(std::clamp<int64_t>(M * per_row / (int64_t{1} << 16), 1, threads));
    if (t == 1) return fn(0, M);
    const int64_t tasks = std::min<int64_t>(M, emu::kTasksPerThread * t), rows = emu::ceil_div(M, tasks);
    emu::ThreadPool::instance().run(t, tasks, [&](int64_t i) { fn(i * rows, std::min(M, (i + 1) * rows)); });
  };
  for_rows(K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const float x = args.a[m * args.lda + k], h = round_to_bf16(x);
        a_hi[m * K + k] = h;
        a_lo[m * K + k] = std::isfinite(h) ? round_to_bf16(x - h) : 0.f;  // x - h is exact in fp32
      }
  });
  emulator_gemm({a_hi, M, K, args.c, args.ldc}, b.hi, threads);
  emulator_gemm({a_lo, M, K, small, N}, b.hi, threads);
  emulator_gemm({a_hi, M, K, small + M * N, N}, b.lo, threads);
  for_rows(N, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float& c = args.c[m * args.ldc + n];
        // A non-finite hi product is the answer (Inf or NaN); the small terms could only turn an Inf into a NaN
        // (Inf * a zero lo part).
        if (std::isfinite(c)) c += small[m * N + n] + small[M * N + m * N + n];
      }
    if (!args.epilogue.empty()) apply_epilogue(args.epilogue, args.c, args.ldc, m0, m1, 0, N);  // rows still in cache
  });
}

}  // namespace xdna::kernels
