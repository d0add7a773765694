#include "aligned_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>

#include "zc_check.h"

namespace zerocore::io {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

size_t page_size() {
  static const size_t size = [] {
    const long value = sysconf(_SC_PAGESIZE);
    return value > 0 ? static_cast<size_t>(value) : size_t{4096};
  }();
  return size;
}

void* alloc_aligned(size_t nbytes, size_t alignment) {
  ZC_CHECK(alignment >= sizeof(void*) && (alignment & (alignment - 1)) == 0,
           "alignment must be a power of two >= ", sizeof(void*), ", got ", alignment);
  const size_t page = page_size();
  const size_t rounded = static_cast<size_t>(round_up(nbytes == 0 ? 1 : nbytes, page));
  // Large buffers start on a 2 MiB boundary and ask for transparent huge pages: physically contiguous memory
  // lets a 1 MiB O_DIRECT block go to the device as one segment instead of 256 (virtio disks take 254 at most,
  // so with 4 KiB pages every block would be split), and first-touch faults drop 512-fold.
  const bool huge = rounded >= kHugePage;
  if (huge && alignment < kHugePage) alignment = kHugePage;
  void* ptr = nullptr;
  const int err = posix_memalign(&ptr, alignment > page ? alignment : page, rounded);
  ZC_CHECK(err == 0, "cannot allocate ", nbytes, " bytes of aligned host memory: posix_memalign returned ", err,
           err == ENOMEM ? " (out of memory: free host memory or use smaller buffers)" : "");
#ifdef MADV_HUGEPAGE
  if (huge) (void)madvise(ptr, rounded, MADV_HUGEPAGE);  // only a hint: kernels without THP say EINVAL
#endif
  return ptr;
}

void free_aligned(void* ptr) noexcept { std::free(ptr); }

}  // namespace zerocore::io
