// Pieces every multi-tensor CUDA kernel of zerocore needs the same way (cuda_adam.cu, cuda_pack.cu): the element
// type codes and their scalar load / store, the kernel argument-block limits, and the search that maps a thread
// block to its tensor. Vector loads stay with each kernel, because each picks its own vector width.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// The argument block is read-only, so the kernels take it by __grid_constant__ reference where the toolkit knows
// the attribute (CUDA 11.7+) instead of copying it to local memory.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 11070
#define ZC_GRID_CONSTANT __grid_constant__
#else
#define ZC_GRID_CONSTANT
#endif

namespace zerocore {
namespace cuda_elementwise {

// Element type of a buffer, as stored in the kernels' argument blocks.
enum TypeCode : std::uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr bool kLargeKernelParams = true;      // CUDA 12.1+: large kernel parameters (Volta and newer)
constexpr std::size_t kArgumentLimit = 32764;
#else
constexpr bool kLargeKernelParams = false;
constexpr std::size_t kArgumentLimit = 4096;
#endif
constexpr std::int64_t kMaxChunksPerLaunch = (1ll << 31) - 1;  // gridDim.x limit

template <int T>
__device__ __forceinline__ float load_one(const void* base, std::int64_t i) {
  if constexpr (T == kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == kBF16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  } else {
    return __half2float(static_cast<const __half*>(base)[i]);
  }
}

template <int T>
__device__ __forceinline__ void store_one(void* base, std::int64_t i, float x) {
  if constexpr (T == kF32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (T == kBF16) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
  } else {
    static_cast<__half*>(base)[i] = __float2half_rn(x);
  }
}

// One thread block's entry of the argument block and its element range [begin, end).
struct ChunkRange {
  int entry;
  std::int64_t begin, end;
};

// Every entry is cut into chunks of Chunk elements, one thread block per chunk; the batch lists each entry's
// first chunk (first_chunk[count] = chunks in the launch) and its numel. Binary search for this block's entry:
// the result is uniform across the block.
template <std::int64_t Chunk, class Batch>
__device__ __forceinline__ ChunkRange find_chunk(const Batch& b) {
  const std::int32_t block = static_cast<std::int32_t>(blockIdx.x);
  int lo = 0, hi = b.count;  // first_chunk[lo] <= block < first_chunk[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (b.first_chunk[mid] <= block) lo = mid; else hi = mid;
  }
  const std::int64_t begin = static_cast<std::int64_t>(block - b.first_chunk[lo]) * Chunk;
  return {lo, begin, min(b.numel[lo], begin + Chunk)};
}

inline bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

}  // namespace cuda_elementwise
}  // namespace zerocore
