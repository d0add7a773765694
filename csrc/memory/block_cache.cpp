#include "block_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "zc_check.h"

namespace zerocore::memory {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;

size_t page_bytes() {
  static const size_t size = [] {
    const long value = sysconf(_SC_PAGESIZE);
    return value > 0 ? static_cast<size_t>(value) : size_t{4096};
  }();
  return size;
}
}  // namespace

BlockCache::BlockCache(bool huge_pages) : huge_pages_(huge_pages) {}

BlockCache::~BlockCache() {
  empty();
  // Live blocks belong to tensors that may outlive us; they stay mapped (the process owner of this object
  // keeps it alive for the whole process, see host_allocator_bindings.cpp).
}

size_t BlockCache::block_size(size_t nbytes) {
  const size_t page = page_bytes();
  ZC_CHECK(nbytes > 0 && nbytes <= SIZE_MAX - page, "cannot allocate a host block of ", nbytes, " bytes");
  return (nbytes + page - 1) / page * page;
}

void BlockCache::evict_for(size_t bytes, std::vector<std::pair<void*, size_t>>& to_unmap) {
  // Map a new block only within the recent peak of live bytes; unmap cached blocks (largest first) to get there.
  const size_t allowed = std::max({stats_.live_bytes + bytes, window_peak_, previous_window_peak_});
  while (!cached_.empty() && stats_.live_bytes + stats_.cached_bytes + bytes > allowed) {
    auto largest = std::prev(cached_.end());
    to_unmap.emplace_back(largest->second.ptr, largest->first);
    stats_.cached_bytes -= largest->first;
    cached_.erase(largest);
  }
}

void BlockCache::note_live(void* ptr, size_t bytes) {
  live_.emplace(ptr, bytes);   // first: if it throws, the books are unchanged
  stats_.live_bytes += bytes;
  stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, stats_.live_bytes);
  window_peak_ = std::max(window_peak_, stats_.live_bytes);
}

void* BlockCache::acquire(size_t nbytes, size_t* block_bytes) {
  const size_t bytes = block_size(nbytes);
  if (block_bytes != nullptr) *block_bytes = bytes;
  std::vector<std::pair<void*, size_t>> to_unmap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cached_.lower_bound(bytes);               // the smallest cached block that fits ...
    if (it != cached_.end() && it->first / 2 <= bytes) {  // ... unless it is more than twice the request
      // Of the blocks of that size, the one freed last: the others then go unused and start_window() returns
      // them. (Taking the oldest would rotate through all of them, keeping every block ever cached in use.)
      it = std::prev(cached_.upper_bound(it->first));
      void* ptr = it->second.ptr;
      const size_t block = it->first;
      note_live(ptr, block);
      cached_.erase(it);
      stats_.cached_bytes -= block;
      ++stats_.hits;
      if (block_bytes != nullptr) *block_bytes = block;
      return ptr;
    }
    evict_for(bytes, to_unmap);
  }
  unmap_all(to_unmap);
  void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {  // out of memory or mappings: give back what is cached and try once more
    empty();
    ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  ZC_CHECK_ERRNO(ptr != MAP_FAILED, "cannot map a host block of ", bytes, " bytes (mmap)",
                 errno == ENOMEM ? "; out of host memory: reduce the batch or model size, or free host memory" : "");
#ifdef MADV_HUGEPAGE
  // Only a hint: kernels without transparent huge pages answer EINVAL, which changes nothing.
  if (huge_pages_ && bytes >= kHugePage) (void)madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    note_live(ptr, bytes);
    ++stats_.misses;
  } catch (...) {
    unmap_one(ptr, bytes);
    throw;
  }
  return ptr;
}

size_t BlockCache::release(void* ptr) noexcept {
  if (ptr == nullptr) return 0;
  size_t bytes = 0;
  bool keep = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    if (it == live_.end()) {
      // Not ours: a bug in the caller. Unmapping an unknown pointer would corrupt memory, so leave it.
      std::fprintf(stderr, "zerocore: host block cache asked to release %p, which it never handed out\n", ptr);
      ++unmap_failures_;
      return 0;
    }
    bytes = it->second;
    live_.erase(it);
    stats_.live_bytes -= bytes;
    if (caching_) {
      try {
        cached_.emplace(bytes, Cached{ptr, window_});
        stats_.cached_bytes += bytes;
        keep = true;
      } catch (...) {
        keep = false;  // no room for the bookkeeping: unmap instead
      }
    }
  }
  if (!keep) unmap_one(ptr, bytes);
  return bytes;
}

void BlockCache::unmap_one(void* ptr, size_t bytes) noexcept {
  const bool ok = munmap(ptr, bytes) == 0;
  const int err = errno;
  if (!ok) std::fprintf(stderr, "zerocore: munmap(%p, %zu) of a host block failed: %s\n", ptr, bytes, std::strerror(err));
  std::lock_guard<std::mutex> lock(mutex_);
  if (ok) ++stats_.unmaps; else ++unmap_failures_;
}

void BlockCache::unmap_all(const std::vector<std::pair<void*, size_t>>& blocks) noexcept {
  for (const auto& [ptr, bytes] : blocks) unmap_one(ptr, bytes);
}

void BlockCache::lock_for_fork() { mutex_.lock(); }
void BlockCache::unlock_after_fork() { mutex_.unlock(); }

void BlockCache::set_caching(bool on) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    caching_ = on;
  }
  if (!on) empty();
}

void BlockCache::start_window() {
  std::vector<std::pair<void*, size_t>> to_unmap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.begin(); it != cached_.end();) {
      if (it->second.last_used_window < window_) {
        to_unmap.emplace_back(it->second.ptr, it->first);
        stats_.cached_bytes -= it->first;
        it = cached_.erase(it);
      } else {
        ++it;
      }
    }
    ++window_;
    previous_window_peak_ = window_peak_;
    window_peak_ = stats_.live_bytes;
  }
  unmap_all(to_unmap);
}

void BlockCache::empty() {
  std::vector<std::pair<void*, size_t>> to_unmap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [bytes, block] : cached_) to_unmap.emplace_back(block.ptr, bytes);
    cached_.clear();
    stats_.cached_bytes = 0;
  }
  unmap_all(to_unmap);
}

void BlockCache::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_live_bytes = stats_.live_bytes;
}

bool BlockCache::owns(const void* ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return live_.count(const_cast<void*>(ptr)) != 0;
}

BlockCacheStats BlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

uint64_t BlockCache::unmap_failures() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return unmap_failures_;
}

}  // namespace zerocore::memory
