// The AMX tile configuration every AMX kernel of the emulator uses (emulator_amx.cc, emulator_attention_amx.cc).
// Include only from translation units built with the AMX -m flags: the anonymous namespace gives each its own
// copy, so no AMX code can be merged into an object built for another ISA.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace xdna::kernels::emu {
namespace {

// Every tile is 16 rows of 64 bytes: C tiles 0-3 (2 x 2 blocks of 16 x 16), A tiles 4-5, B tiles 6-7.
// Row and column tails go through zero-padded scratch, so one configuration serves every shape.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Tiles are configured at the start of every kernel call and released at its end: the configuration is
// per thread and other code on the same thread (ORT's MLAS, oneDNN) may use AMX between our calls; a released
// tile state also keeps context switches from saving 8 KB of tile data.
struct TileScope {
  TileScope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  explicit TileScope(const TileConfig& config) { _tile_loadconfig(&config); }  // e.g. tiles of fewer rows
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

}  // namespace
}  // namespace xdna::kernels::emu
