// Host memory owned by the EP (issue 15): what the EP's ORT allocator hands out, so that a backend can recognise
// a tensor ORT placed there and give it to the NPU without pinning it per call.
//
// Every block is whole pages (the amdxdna user-pointer rule), allocated by this registry and never returned to the
// system while a backend may hold a device buffer over it: freeing a block first tells every listener (each xrt
// backend drops its buffers over the block), then unmaps it. So a backend's cache of device buffers, keyed by block
// id, can never outlive the memory it covers: the stale-address problem of caching imports of ORT's own buffers
// does not arise. Blocks ORT frees go to a pool of the same sizes (ORT's memory pattern asks for the same sizes
// every run), so their pages stay pinned across runs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace xdna::kernels {

struct EpBlock {
  void* base = nullptr;
  size_t bytes = 0;  // whole pages
  uint64_t id = 0;   // unique for the process's lifetime (never reused)
};

struct EpBufferStats {
  uint64_t allocs = 0;          // Alloc calls served
  uint64_t frees = 0;           // Free calls
  uint64_t fresh_blocks = 0;    // blocks mapped from the system (the rest came from the pool)
  uint64_t released_blocks = 0;  // blocks given back to the system (listeners told first)
  uint64_t live_bytes = 0;      // in use by ORT
  uint64_t pooled_bytes = 0;    // freed by ORT, kept for reuse
};

// Allocates `bytes` (rounded up to pages), page-aligned. nullptr when the system has no memory.
void* ep_buffer_alloc(size_t bytes) noexcept;
// Frees a pointer from ep_buffer_alloc (nullptr: nothing). Unknown pointers are ignored (and counted nowhere).
void ep_buffer_free(void* p) noexcept;
// The live block holding all of [p, p + bytes), if any. A pooled (freed) block is never found.
bool ep_buffer_find(const void* p, size_t bytes, EpBlock* out) noexcept;
// Gives every pooled block back to the system (listeners are told first).
void ep_buffer_trim() noexcept;
EpBufferStats ep_buffer_stats() noexcept;

// Called with a block's id before the block is unmapped. Must not call back into this registry.
using EpBlockReleased = std::function<void(uint64_t block_id)>;
int ep_buffer_add_listener(EpBlockReleased fn);
void ep_buffer_remove_listener(int handle) noexcept;

}  // namespace xdna::kernels
