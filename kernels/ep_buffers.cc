#include "ep_buffers.h"

#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <vector>

namespace xdna::kernels {
namespace {

// Freed blocks kept for reuse, at most this many bytes (beyond it the largest pooled blocks go back first).
constexpr uint64_t kPoolLimitBytes = uint64_t{1} << 30;

struct Block {
  size_t bytes;
  uint64_t id;
  bool live;
};

struct Registry {
  std::mutex mu;
  std::map<uintptr_t, Block> blocks;           // by base address: live and pooled
  std::multimap<size_t, uintptr_t> pool;       // pooled blocks by size
  std::map<int, EpBlockReleased> listeners;
  int next_listener = 1;
  uint64_t next_id = 1;
  EpBufferStats stats;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: ORT may free tensors during static destruction
  return *r;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// Unmaps pooled block `base` (its listeners told first). Caller holds r.mu.
void release_locked(Registry& r, std::map<uintptr_t, Block>::iterator it) {
  for (auto& [handle, fn] : r.listeners) {
    try {
      fn(it->second.id);
    } catch (...) {
    }
  }
  munmap(reinterpret_cast<void*>(it->first), it->second.bytes);
  r.stats.pooled_bytes -= it->second.bytes;
  ++r.stats.released_blocks;
  r.blocks.erase(it);
}

}  // namespace

void* ep_buffer_alloc(size_t bytes) noexcept {
  const size_t page = page_size();
  if (bytes == 0) bytes = 1;
  if (bytes > SIZE_MAX - page) return nullptr;
  const size_t whole = (bytes + page - 1) / page * page;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  try {
    ++r.stats.allocs;
    auto pooled = r.pool.lower_bound(whole);
    // Reuse a pooled block of this size, or one at most twice as large (ORT's sizes repeat run after run).
    if (pooled != r.pool.end() && pooled->first <= 2 * whole) {
      const uintptr_t base = pooled->second;
      r.pool.erase(pooled);
      Block& b = r.blocks.at(base);
      b.live = true;
      r.stats.pooled_bytes -= b.bytes;
      r.stats.live_bytes += b.bytes;
      return reinterpret_cast<void*>(base);
    }
    void* p = mmap(nullptr, whole, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    r.blocks.emplace(reinterpret_cast<uintptr_t>(p), Block{whole, r.next_id++, true});
    ++r.stats.fresh_blocks;
    r.stats.live_bytes += whole;
    return p;
  } catch (...) {  // out of memory in the maps
    return nullptr;
  }
}

void ep_buffer_free(void* p) noexcept {
  if (!p) return;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.blocks.find(reinterpret_cast<uintptr_t>(p));
  if (it == r.blocks.end() || !it->second.live) return;
  ++r.stats.frees;
  it->second.live = false;
  r.stats.live_bytes -= it->second.bytes;
  r.stats.pooled_bytes += it->second.bytes;
  try {
    r.pool.emplace(it->second.bytes, it->first);
  } catch (...) {
    release_locked(r, it);
    return;
  }
  while (r.stats.pooled_bytes > kPoolLimitBytes && !r.pool.empty()) {
    auto largest = std::prev(r.pool.end());
    auto block = r.blocks.find(largest->second);
    r.pool.erase(largest);
    release_locked(r, block);
  }
}

bool ep_buffer_find(const void* p, size_t bytes, EpBlock* out) noexcept {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.blocks.upper_bound(addr);
  if (it == r.blocks.begin()) return false;
  --it;
  const Block& b = it->second;
  if (!b.live || addr - it->first > b.bytes || bytes > b.bytes - (addr - it->first)) return false;
  if (out) *out = EpBlock{reinterpret_cast<void*>(it->first), b.bytes, b.id};
  return true;
}

void ep_buffer_trim() noexcept {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (auto& [size, base] : r.pool) release_locked(r, r.blocks.find(base));
  r.pool.clear();
}

EpBufferStats ep_buffer_stats() noexcept {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.stats;
}

int ep_buffer_add_listener(EpBlockReleased fn) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const int handle = r.next_listener++;
  r.listeners.emplace(handle, std::move(fn));
  return handle;
}

void ep_buffer_remove_listener(int handle) noexcept {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.listeners.erase(handle);
}

}  // namespace xdna::kernels
