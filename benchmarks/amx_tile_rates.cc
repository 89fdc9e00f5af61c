// What the AMX tile unit of this CPU delivers on the loop shapes the emulator's AMX kernels use
// (kernels/emulator/emulator_amx.cc, emulator_attention_amx.cc), operands in L1 or L2:
//   * TDPBUSD / TDPBF16PS on four resident C tiles (the ceiling),
//   * the int8 GEMM's 32 x 32 blocks (2 x 2 tiles, K = 512: 8 steps, A and B reloaded from L1, tiles zeroed and
//     stored per block), as int8_tile_block runs them minus the dequantising step,
//   * the attention scores' 64 x 16 panels (4 x 1 tiles, K = 64: two steps per panel, tiles stored into a 64 x 1504
//     fp32 S in L2), as rows64_product runs them;
// and, for the memory side of the same kernels, the rate of writing (plain and streaming stores) and reading 12 MB
// of fp32, the size of fc1's C (1500 x 2048) in the whisper-base encoder.
// Standalone (no project code, not part of the build), for benchmarks/README.md ("Where the encoder window's time
// goes on AMX"):
//   g++ -O2 -mavx512f -mamx-tile -mamx-int8 -mamx-bf16 benchmarks/amx_tile_rates.cc -o /tmp/amx_tile_rates && /tmp/amx_tile_rates
// Prints, over 21 rounds in which the items take turns, the best and the median ns per tile instruction and GMAC/s
// on one thread. CPU figures, no NPU.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

alignas(64) uint8_t a_buf[64 * 512];
alignas(64) uint8_t b_buf[2 * 512 * 16];
alignas(64) int32_t c_buf[4 * 256];
alignas(64) float scores[64 * 1504];
constexpr size_t kBigFloats = size_t{3} << 20;  // 12 MB
alignas(64) float big_out[kBigFloats];
alignas(64) float big_in[kBigFloats];
float sink;

constexpr int kPanels = 94;  // 1504 / 16: the key positions of a 30 s window, rounded up to 32

struct Item {
  const char* what;
  double instructions, macs_each;
  void (*run)();
  std::vector<double> seconds;
};

void resident_int8(int n) {
  for (int i = 0; i < n; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c_buf, 64);
}

void resident_bf16(int n) {
  for (int i = 0; i < n; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c_buf, 64);
}

void int8_blocks(int blocks) {
  for (int b = 0; b < blocks; ++b) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k = 0; k < 512; k += 64) {
      _tile_loadd(4, a_buf + k, 512);
      _tile_loadd(6, b_buf + k * 16, 64);
      _tile_loadd(7, b_buf + 512 * 16 + k * 16, 64);
      _tile_loadd(5, a_buf + 16 * 512 + k, 512);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c_buf, 64);
    _tile_stored(1, c_buf + 256, 64);
    _tile_stored(2, c_buf + 512, 64);
    _tile_stored(3, c_buf + 768, 64);
  }
}

void score_panels(int reps) {
  for (int r = 0; r < reps; ++r)
    for (int n = 0; n < kPanels * 16; n += 16) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k = 0; k < 64; k += 32) {  // bf16 Q rows of 128 bytes; the K^T pair panel, 2 KB per 16 keys
        _tile_loadd(6, b_buf + (n % 256) * 64 + k * 32, 64);
        _tile_loadd(4, a_buf + k * 2, 128);
        _tile_loadd(5, a_buf + 16 * 128 + k * 2, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(4, a_buf + 32 * 128 + k * 2, 128);
        _tile_loadd(5, a_buf + 48 * 128 + k * 2, 128);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 5, 6);
      }
      _tile_stored(0, scores + n, 1504 * 4);
      _tile_stored(1, scores + 16 * 1504 + n, 1504 * 4);
      _tile_stored(2, scores + 32 * 1504 + n, 1504 * 4);
      _tile_stored(3, scores + 48 * 1504 + n, 1504 * 4);
    }
}

void plain_stores() {
  const __m512 v = _mm512_set1_ps(1.f);
  for (size_t i = 0; i < kBigFloats; i += 16) _mm512_store_ps(big_out + i, v);
}

void streaming_stores() {
  const __m512 v = _mm512_set1_ps(2.f);
  for (size_t i = 0; i < kBigFloats; i += 16) _mm512_stream_ps(big_out + i, v);
  _mm_sfence();
}

void reads() {
  __m512 s = _mm512_setzero_ps();
  for (size_t i = 0; i < kBigFloats; i += 16) s = _mm512_add_ps(s, _mm512_load_ps(big_in + i));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  sink += lanes[0];
}

}  // namespace

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::fprintf(stderr, "Linux did not grant the AMX tile state\n");
    return 1;
  }
  static const TileConfig config;
  _tile_loadconfig(&config);
  constexpr int kN = 200000, kBlocks = 50000, kReps = 400, kRounds = 21;
  Item items[] = {
      {"TDPBUSD, 4 resident C tiles", 4.0 * kN, 16 * 16 * 64, [] { resident_int8(kN); }, {}},
      {"TDPBF16PS, 4 resident C tiles", 4.0 * kN, 16 * 16 * 32, [] { resident_bf16(kN); }, {}},
      {"int8 GEMM 32x32 blocks, K=512, operands in L1", 32.0 * kBlocks, 16 * 16 * 64, [] { int8_blocks(kBlocks); }, {}},
      {"attention scores 64x16 panels, K=64, S in L2", 8.0 * kPanels * kReps, 16 * 16 * 32, [] { score_panels(kReps); }, {}},
  };
  resident_int8(kN);  // warm-up (and the AMX frequency licence)
  for (int round = 0; round < kRounds; ++round)  // the items take turns, so that load from other work hits all alike
    for (Item& item : items) {
      const auto t0 = std::chrono::steady_clock::now();
      item.run();
      item.seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::printf("%-50s %21s %21s\n", "one thread, tiles only (CPU figures, no NPU)", "ns/instr min median", "GMAC/s best median");
  for (Item& item : items) {
    std::sort(item.seconds.begin(), item.seconds.end());
    const double best = item.seconds.front(), median = item.seconds[item.seconds.size() / 2];
    std::printf("%-50s %10.2f %10.2f %10.0f %10.0f\n", item.what, best / item.instructions * 1e9,
                median / item.instructions * 1e9, item.instructions * item.macs_each / best / 1e9,
                item.instructions * item.macs_each / median / 1e9);
  }
  _tile_release();

  struct Pass {
    const char* what;
    void (*run)();
    std::vector<double> seconds;
  } passes[] = {{"12 MB of fp32, plain stores", plain_stores, {}},
                {"12 MB of fp32, streaming stores", streaming_stores, {}},
                {"12 MB of fp32, reads", reads, {}}};
  for (size_t i = 0; i < kBigFloats; ++i) big_in[i] = static_cast<float>(i & 1023);  // real pages, not the zero page
  for (Pass& pass : passes) pass.run();  // first touch of the output's pages
  for (int round = 0; round < kRounds; ++round)
    for (Pass& pass : passes) {
      const auto t0 = std::chrono::steady_clock::now();
      pass.run();
      pass.seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::printf("%-50s %21s\n", "one thread, memory", "GB/s best median");
  for (Pass& pass : passes) {
    std::sort(pass.seconds.begin(), pass.seconds.end());
    const double bytes = kBigFloats * sizeof(float);
    std::printf("%-50s %10.1f %10.1f\n", pass.what, bytes / pass.seconds.front() / 1e9,
                bytes / pass.seconds[pass.seconds.size() / 2] / 1e9);
  }
  return 0;
}
