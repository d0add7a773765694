// The host block cache (csrc/memory/block_cache.cpp): reuse by exact size, the footprint bound (never more
// mapped than the recent peak of live bytes), windows that return unused blocks, caching off, bad pointers, and
// concurrent use from several threads (run under TSan).
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "memory/block_cache.h"

using zerocore::memory::BlockCache;

namespace {
constexpr size_t MiB = size_t{1} << 20;
}

ZC_TEST(reuses_a_released_block_of_the_same_size) {
  BlockCache cache;
  void* a = cache.acquire(16 * MiB);
  std::memset(a, 0x5a, 16 * MiB);            // the whole block is writable
  CHECK(cache.release(a) == 16 * MiB);
  void* b = cache.acquire(16 * MiB - 100);   // same number of pages: same block
  CHECK(b == a);
  const auto s = cache.stats();
  CHECK(s.hits == 1 && s.misses == 1 && s.live_bytes == 16 * MiB && s.cached_bytes == 0);
  CHECK(cache.owns(b));
  cache.release(b);
  CHECK(!cache.owns(b));
}

ZC_TEST(block_size_is_whole_pages) {
  CHECK(BlockCache::block_size(1) == 4096);
  CHECK(BlockCache::block_size(4096) == 4096);
  CHECK(BlockCache::block_size(4097) == 8192);
  CHECK_THROWS(BlockCache::block_size(0), "cannot allocate a host block of 0 bytes");
  BlockCache cache;
  CHECK_THROWS(cache.acquire(0), "0 bytes");
  CHECK_THROWS(cache.acquire(SIZE_MAX), "bytes");
  void* kept = cache.acquire(MiB);
  cache.release(kept);
  CHECK_THROWS(cache.acquire(size_t{1} << 50), "cannot map a host block");   // 1 PiB: beyond the address space
  CHECK(cache.stats().cached_bytes == 0);   // the failed attempt gave back what was cached before retrying
}

ZC_TEST(never_maps_beyond_the_peak_of_live_bytes) {
  BlockCache cache;
  void* a = cache.acquire(16 * MiB);
  cache.release(a);                         // peak 16, cached 16
  void* b = cache.acquire(4 * MiB);         // 16 is over twice 4: no fit; 16 cached + 4 new > peak 16, so the
  auto s = cache.stats();                   // 16 MiB block is unmapped first
  CHECK(s.cached_bytes == 0 && s.live_bytes == 4 * MiB && s.unmaps == 1);
  void* c = cache.acquire(12 * MiB);        // live grows to the peak: nothing cached to give back, just map
  cache.release(b);
  cache.release(c);
  s = cache.stats();
  CHECK(s.cached_bytes == 16 * MiB && s.peak_live_bytes == 16 * MiB);
  void* d = cache.acquire(MiB);             // no fit (4 is over twice 1); 16 + 1 > 16: the largest (12) goes
  s = cache.stats();
  CHECK(s.cached_bytes == 4 * MiB && s.live_bytes == MiB && s.unmaps == 2);
  void* e = cache.acquire(6 * MiB);         // 1 + 4 + 6 <= 16: maps, keeps the cached 4 MiB block
  s = cache.stats();
  CHECK(s.cached_bytes == 4 * MiB && s.live_bytes == 7 * MiB && s.unmaps == 2);
  cache.release(d);
  cache.release(e);
}

ZC_TEST(a_request_takes_the_smallest_block_up_to_twice_its_size) {
  BlockCache cache;
  void* big = cache.acquire(16 * MiB);
  void* mid = cache.acquire(10 * MiB);
  cache.release(big);
  cache.release(mid);
  void* x = cache.acquire(9 * MiB);         // 10 and 16 both fit; the smaller is taken
  CHECK(x == mid);
  size_t got = 0;
  void* y = cache.acquire(8 * MiB, &got);   // 16 is exactly twice 8: taken, and its real size reported
  CHECK(y == big && got == 16 * MiB);
  CHECK(cache.release(y) == 16 * MiB);      // a block keeps its own size
  cache.release(x);
}

ZC_TEST(alternating_sizes_do_not_thrash) {
  // One block live at a time, sizes 8 and 16 MiB in turn: after the first 16 MiB block is mapped, every request
  // is served by it (8 fits in 16) instead of unmapping and mapping on every call.
  BlockCache cache;
  for (int i = 0; i < 10; ++i) {
    cache.release(cache.acquire(8 * MiB));
    cache.release(cache.acquire(16 * MiB));
  }
  const auto s = cache.stats();
  CHECK(s.misses == 2 && s.hits == 18 && s.unmaps == 1);
  CHECK(s.cached_bytes == 16 * MiB);
}

ZC_TEST(a_window_returns_blocks_nobody_asked_for) {
  BlockCache cache;
  void* a = cache.acquire(4 * MiB);
  void* b = cache.acquire(2 * MiB);
  cache.release(a);
  cache.release(b);
  cache.start_window();                     // both were used in the window that just ended: kept
  CHECK(cache.stats().cached_bytes == 6 * MiB);
  void* a2 = cache.acquire(4 * MiB);        // only the 4 MiB block is used again
  CHECK(a2 == a);
  cache.release(a2);
  cache.start_window();                     // the 2 MiB block sat unused for a whole window: unmapped
  auto s = cache.stats();
  CHECK(s.cached_bytes == 4 * MiB && s.unmaps == 1);
  cache.start_window();
  CHECK(cache.stats().cached_bytes == 0);
}

ZC_TEST(blocks_cached_beyond_what_a_window_uses_are_returned) {
  // Three blocks of one size were freed (say, by construction); afterwards only one is in use at a time. The
  // block freed last serves every request, so the other two sit unused and the next windows return them.
  BlockCache cache;
  void* a = cache.acquire(8 * MiB);
  void* b = cache.acquire(8 * MiB);
  void* c = cache.acquire(8 * MiB);
  cache.release(a);
  cache.release(b);
  cache.release(c);
  cache.start_window();                     // all three were freed in the window that just ended: kept
  for (int step = 0; step < 3; ++step) {
    void* p = cache.acquire(8 * MiB);
    CHECK(p == c);                          // the one freed last, every time
    cache.release(p);
    cache.start_window();
  }
  const auto s = cache.stats();
  CHECK(s.cached_bytes == 8 * MiB && s.unmaps == 2);
}

ZC_TEST(caching_off_unmaps_at_once_and_empty_unmaps_everything) {
  BlockCache cache;
  void* a = cache.acquire(MiB);
  void* b = cache.acquire(MiB);
  cache.release(a);
  CHECK(cache.stats().cached_bytes == MiB);
  cache.set_caching(false);                 // drops the cached block too
  CHECK(cache.stats().cached_bytes == 0);
  cache.release(b);
  auto s = cache.stats();
  CHECK(s.cached_bytes == 0 && s.live_bytes == 0 && s.unmaps == 2);
  cache.set_caching(true);
  void* c = cache.acquire(MiB);
  cache.release(c);
  cache.empty();
  CHECK(cache.stats().cached_bytes == 0);
}

ZC_TEST(a_foreign_pointer_is_refused_not_unmapped) {
  BlockCache cache;
  std::vector<char> not_ours(64);
  CHECK(cache.release(not_ours.data()) == 0);
  CHECK(cache.unmap_failures() == 1);
  CHECK(cache.release(nullptr) == 0);
  CHECK(cache.unmap_failures() == 1);
}

ZC_TEST(concurrent_threads_keep_the_books_straight) {
  BlockCache cache;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&cache, t] {
      std::mt19937 rng(1234 + t);
      std::vector<std::pair<uint8_t*, size_t>> held;
      for (int i = 0; i < 400; ++i) {
        if (held.size() < 3 && rng() % 2 == 0) {
          const size_t bytes = (1 + rng() % 4) * MiB;
          auto* p = static_cast<uint8_t*>(cache.acquire(bytes));
          p[0] = static_cast<uint8_t>(t);
          p[bytes - 1] = static_cast<uint8_t>(t);
          held.emplace_back(p, bytes);
        } else if (!held.empty()) {
          auto [p, bytes] = held.back();
          held.pop_back();
          if (p[0] != t || p[bytes - 1] != t) std::abort();   // another thread got the same block
          cache.release(p);
        }
        if (i % 100 == 0) cache.start_window();
      }
      for (auto [p, bytes] : held) cache.release(p);
    });
  }
  for (auto& th : threads) th.join();
  const auto s = cache.stats();
  CHECK(s.live_bytes == 0);                 // every block came back exactly once
  CHECK(s.hits > 0 && s.hits + s.misses > 500);
  CHECK(cache.unmap_failures() == 0);
  cache.empty();
  CHECK(cache.stats().cached_bytes == 0);
}

ZC_TEST_MAIN()
