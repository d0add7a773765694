// torch's CPU allocator, with large blocks served by zerocore's BlockCache (block_cache.h says why).
//
// install() makes this the process's CPU allocator (c10::SetCPUAllocator); requests below min_block_bytes go
// to the allocator that was there before (the fallback), untouched, so small tensors cost nothing extra.
// uninstall() does not put the fallback back: code such as oneDNN's allocator frees raw allocations through
// whichever CPU allocator is current at that moment (raw_deallocate), so ours stays in place and passes every
// request to the fallback from then on, while still recognising its own blocks on the way back. Cached blocks
// are unmapped at once, blocks still in use when they are freed. The allocator and its cache are never
// destroyed: tensors may outlive the module's users until the very end of the process.
#include <torch/extension.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>

#include <atomic>
#include <cstring>
#include <mutex>

#include "block_cache.h"
#include "zc_check.h"

namespace py = pybind11;
using zerocore::memory::BlockCache;

namespace {

// High enough to replace torch's default (priority 0); an allocator installed by someone else with a higher
// priority wins, and install() then reports that it could not take over.
constexpr uint8_t kPriority = 100;

BlockCache& cache() {
  static BlockCache* instance = new BlockCache(/*huge_pages=*/true);
  return *instance;
}

class CachingHostAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < min_block_bytes_.load(std::memory_order_relaxed)) return fallback_->allocate(n);
    size_t block_bytes = 0;
    void* ptr = cache().acquire(n, &block_bytes);
    report(ptr, static_cast<int64_t>(block_bytes));
    return {ptr, ptr, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Both our blocks and the fallback's small ones have data == context, so raw_allocate works; raw_deallocate
  // must tell them apart, which release_any does.
  c10::DeleterFnPtr raw_deleter() const override { return fallback_raw_deleter_ ? &release_any : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Called once, before this allocator is first installed (fallback_ never changes afterwards, so readers on
  // other threads need no lock).
  void set_fallback(c10::Allocator* fallback) {
    fallback_ = fallback;
    fallback_raw_deleter_ = fallback->raw_deleter();
  }
  bool has_fallback() const { return fallback_ != nullptr; }
  // SIZE_MAX: pass everything to the fallback.
  void set_min_block_bytes(size_t bytes) { min_block_bytes_.store(bytes, std::memory_order_relaxed); }
  bool serving() const { return min_block_bytes_.load(std::memory_order_relaxed) != SIZE_MAX; }

 private:
  static void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    const auto s = cache().stats();
    c10::reportMemoryUsageToProfiler(ptr, delta, s.live_bytes, s.live_bytes + s.cached_bytes,
                                     c10::Device(c10::DeviceType::CPU));
  }
  static void release_block(void* ptr) {
    const size_t bytes = cache().release(ptr);
    report(ptr, -static_cast<int64_t>(bytes));
  }
  static void release_any(void* ptr);

  c10::Allocator* fallback_ = nullptr;
  c10::DeleterFnPtr fallback_raw_deleter_ = nullptr;
  std::atomic<size_t> min_block_bytes_{SIZE_MAX};
};

CachingHostAllocator& allocator() {
  static CachingHostAllocator* instance = new CachingHostAllocator();
  return *instance;
}

void CachingHostAllocator::release_any(void* ptr) {
  if (cache().owns(ptr)) {
    release_block(ptr);
  } else {
    allocator().fallback_raw_deleter_(ptr);
  }
}

std::mutex install_mutex;

bool install(size_t min_block_bytes) {
  ZC_CHECK(min_block_bytes >= 4096, "min_block_bytes=", min_block_bytes,
           " is too small: blocks are whole pages, use 1 MiB or more");
  std::lock_guard<std::mutex> lock(install_mutex);
  CachingHostAllocator& ours = allocator();
  if (!ours.has_fallback()) {
    ours.set_fallback(c10::GetCPUAllocator());
    // A child forked while another thread holds the cache's mutex would deadlock on its first large tensor.
    const int err = pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                                   [] { cache().unlock_after_fork(); });
    ZC_CHECK(err == 0, "pthread_atfork failed: ", std::strerror(err));
  }
  if (c10::GetCPUAllocator() != &ours) c10::SetCPUAllocator(&ours, kPriority);
  if (c10::GetCPUAllocator() != &ours) return false;   // an allocator with a higher priority keeps the place
  cache().set_caching(true);
  ours.set_min_block_bytes(min_block_bytes);
  return true;
}

void uninstall() {
  std::lock_guard<std::mutex> lock(install_mutex);
  allocator().set_min_block_bytes(SIZE_MAX);
  cache().set_caching(false);
}

bool installed() { return c10::GetCPUAllocator() == &allocator() && allocator().serving(); }

py::dict stats() {
  const auto s = cache().stats();
  py::dict d;
  d["live_bytes"] = s.live_bytes;
  d["cached_bytes"] = s.cached_bytes;
  d["peak_live_bytes"] = s.peak_live_bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["unmaps"] = s.unmaps;
  d["unmap_failures"] = cache().unmap_failures();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch's CPU allocator with large blocks cached by size (zerocore host block cache)";
  m.def("install", &install, py::arg("min_block_bytes"),
        "serve CPU allocations of min_block_bytes and more from the block cache; False if another allocator "
        "with a higher priority keeps the place");
  m.def("uninstall", &uninstall, "stop serving: pass every request to the previous CPU allocator, unmap cached blocks");
  m.def("installed", &installed);
  m.def("stats", &stats, "live / cached / peak bytes and hit, miss and unmap counts of the block cache");
  m.def("start_window", [] { cache().start_window(); },
        "end a window (one optimizer step): unmap cached blocks nobody asked for during it");
  m.def("empty_cache", [] { cache().empty(); }, "unmap every cached block");
  m.def("reset_peak", [] { cache().reset_peak(); });
}
