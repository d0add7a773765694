// A cache of large anonymous host mappings, reused by size, for the host tensor allocator.
//
// Why: CPU training allocates the same large blocks every step (autograd's weight gradients, e.g. 16 MiB per
// Linear(1024, 4096)). From glibc's heap they fragment it: the next layer's small temporaries land in a freed
// gradient's hole, the heap grows by a gradient per layer and the holes stay resident (~90 MiB per rank for
// the bench MLP, bench/results/zero.md). From fresh mmaps (glibc's mmap threshold) every block is page-faulted
// in again each step (+10-40 % step time). This cache keeps freed blocks mapped and hands them back for the
// next request that fits: no faults in steady state, and large blocks never share a heap with small ones.
// A request takes the smallest cached block of at least its size and at most twice it (so alternating sizes
// do not thrash; the unused tail of a block is memory that was in use anyway), and of those the one freed last.
//
// Footprint bound: the cache never maps a new block while the blocks it already holds (in use + cached) would
// then exceed the most that was ever in use at once during the current or the previous window; it unmaps
// cached blocks of other sizes first. So its resident size stays at the peak of live large blocks, not the sum
// of every size ever freed. start_window() (the engine calls it once per optimizer step) also unmaps blocks
// nobody asked for during the window that just ended, so a one-off large temporary is returned within a step.
//
// Thread-safe (one mutex; gloo threads and autograd threads allocate concurrently). No torch dependency, so
// it builds into the standalone core and its tests run under ASan/UBSan and TSan.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace zerocore::memory {

struct BlockCacheStats {
  size_t live_bytes = 0;        // handed out and not yet released
  size_t cached_bytes = 0;      // released, still mapped, waiting for reuse
  size_t peak_live_bytes = 0;   // most live at once since the last reset_peak()
  uint64_t hits = 0;            // requests served from the cache
  uint64_t misses = 0;          // requests that mapped a new block
  uint64_t unmaps = 0;          // blocks returned to the OS
};

class BlockCache {
 public:
  // huge_pages: ask for transparent huge pages on blocks of 2 MiB and more (fewer first-touch faults).
  explicit BlockCache(bool huge_pages = true);
  ~BlockCache();
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // A page-aligned block of at least `nbytes` (> 0); its real size goes to *block_bytes when given. If a new
  // mapping fails, the cached blocks are unmapped and it is tried once more; then std::runtime_error names
  // the size.
  void* acquire(size_t nbytes, size_t* block_bytes = nullptr);
  // Gives back a block from acquire() and returns its size (0 for a pointer it never handed out). Never
  // throws (called from tensor deleters): a failed munmap is counted in unmap_failures() and reported to stderr.
  size_t release(void* ptr) noexcept;
  // With caching off every release unmaps at once (the allocator is being uninstalled).
  void set_caching(bool on);
  // Ends a window (see the header comment): unmaps cached blocks not reused during it.
  void start_window();
  // Unmaps every cached block.
  void empty();
  void reset_peak();
  // Whether ptr is a live block of this cache.
  bool owns(const void* ptr) const;
  BlockCacheStats stats() const;
  uint64_t unmap_failures() const;
  // The size acquire() maps for a request of nbytes (whole pages).
  static size_t block_size(size_t nbytes);
  // Around fork(): the child must not inherit the mutex locked by another thread (pthread_atfork handlers).
  void lock_for_fork();
  void unlock_after_fork();

 private:
  struct Cached {
    void* ptr;
    uint64_t last_used_window;
  };
  void evict_for(size_t bytes, std::vector<std::pair<void*, size_t>>& to_unmap);
  void note_live(void* ptr, size_t bytes);      // with mutex_ held
  void unmap_one(void* ptr, size_t bytes) noexcept;
  void unmap_all(const std::vector<std::pair<void*, size_t>>& blocks) noexcept;

  mutable std::mutex mutex_;
  const bool huge_pages_;
  bool caching_ = true;
  std::unordered_map<void*, size_t> live_;            // ptr -> block bytes
  std::multimap<size_t, Cached> cached_;              // block bytes -> cached block
  BlockCacheStats stats_;
  size_t window_peak_ = 0;                            // most live at once in the current window
  size_t previous_window_peak_ = 0;
  uint64_t window_ = 0;
  uint64_t unmap_failures_ = 0;
};

}  // namespace zerocore::memory
