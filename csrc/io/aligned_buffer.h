// Page-aligned host memory: what O_DIRECT transfers and bounce blocks need, allocated at the exact size asked
// (rounded up to whole pages only, never to a power of two).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace zerocore::io {

size_t page_size();

// Allocates nbytes (at least one byte) aligned to `alignment` (a power of two, at least sizeof(void*)), rounded up
// to a multiple of the page size. Throws std::runtime_error naming the size when memory is short.
void* alloc_aligned(size_t nbytes, size_t alignment);
void free_aligned(void* ptr) noexcept;

inline uint64_t round_up(uint64_t value, uint64_t multiple) { return (value + multiple - 1) / multiple * multiple; }
inline uint64_t round_down(uint64_t value, uint64_t multiple) { return value / multiple * multiple; }
inline bool is_aligned(const void* ptr, uint64_t alignment) {
  return reinterpret_cast<uintptr_t>(ptr) % alignment == 0;
}

// An owned aligned block (bounce buffers of the backends).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(size_t nbytes, size_t alignment) : ptr_(alloc_aligned(nbytes, alignment)), size_(nbytes) {}
  char* data() const { return static_cast<char*>(ptr_.get()); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(void* p) const noexcept { free_aligned(p); }
  };
  std::unique_ptr<void, Free> ptr_;
  size_t size_ = 0;
};

}  // namespace zerocore::io
