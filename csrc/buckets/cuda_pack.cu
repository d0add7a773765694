// CUDA kernels of zerocore::pack / zerocore::unpack (the schemas and CPU kernels live in pack_op.cpp): one launch
// converts many (source, destination) ranges, each cast between fp32 / bf16 / fp16 and scaled, optionally added
// to the destination.
//
// [Note: segment batches]
// Every range is cut into chunks of kChunk elements and every chunk is one thread block. The kernel's argument
// block lists the ranges and the index of each range's first chunk; a block finds its range by binary search in
// that list (uniform across the block, read from the constant bank). With CUDA >= 12.1 an argument block may hold
// 32 KB (Volta and newer), so about a thousand tensors go in one launch; older toolkits get the classic 4 KB. More
// ranges than fit make several launches, all on the current stream.
//
// [Note: rounding]
// The product and sum are __fmul_rn / __fadd_rn, which are never contracted into an FMA, so results equal torch's
// `(dst.float() + src.float() * scale).to(dst.dtype)` bit for bit (the library is compiled without
// --use_fast_math, so fp32 subnormals are kept as torch keeps them). bf16 and fp16 round to nearest even.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cuda_elementwise.cuh"
#include "pack_checks.h"

namespace zerocore {
namespace {

using cuda_elementwise::ChunkRange;
using cuda_elementwise::kArgumentLimit;
using cuda_elementwise::kBF16;
using cuda_elementwise::kF16;
using cuda_elementwise::kF32;
using cuda_elementwise::kLargeKernelParams;
using cuda_elementwise::kMaxChunksPerLaunch;
using cuda_elementwise::load_one;
using cuda_elementwise::store_one;

constexpr int kMaxSegments = kLargeKernelParams ? 1000 : 120;
constexpr int kThreads = 256;
constexpr std::int64_t kChunk = 32768;  // elements per thread block
constexpr int kVec = 8;                 // elements per thread per step on the vector path (16-32 bytes)
constexpr int kUnroll = 8;              // elements per thread per step on the unaligned path

struct SegmentBatch {
  const void* src[kMaxSegments];
  void* dst[kMaxSegments];
  std::int64_t numel[kMaxSegments];
  std::int32_t first_chunk[kMaxSegments + 1];  // first_chunk[count] = chunks in this launch
  std::uint8_t src_type[kMaxSegments];
  std::uint8_t dst_type[kMaxSegments];
  std::uint8_t vectorized[kMaxSegments];  // both pointers 16-byte aligned: whole 8-element steps
  std::int32_t count;
  float scale;
  bool accumulate;
};
static_assert(sizeof(SegmentBatch) <= kArgumentLimit, "kernel argument block too large");

// ------------------------------------------------------------------------------------------ element conversions
// Eight elements starting at element i (16-byte aligned): two 16-byte loads for fp32, one for 16-bit types.
template <int T>
__device__ __forceinline__ void load_vec(const void* base, std::int64_t i, float (&x)[kVec]) {
  if constexpr (T == kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = p[0], b = p[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const std::uint16_t*>(base) + i);
    const std::uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 f;
      if constexpr (T == kBF16) {
        f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[j]));
      } else {
        f = __half22float2(*reinterpret_cast<const __half2*>(&words[j]));
      }
      x[2 * j] = f.x;
      x[2 * j + 1] = f.y;
    }
  }
}

template <int T>
__device__ __forceinline__ void store_vec(void* base, std::int64_t i, const float (&x)[kVec]) {
  if constexpr (T == kF32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
    p[0] = make_float4(x[0], x[1], x[2], x[3]);
    p[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    std::uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (T == kBF16) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
        words[j] = *reinterpret_cast<const std::uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(x[2 * j], x[2 * j + 1]);
        words[j] = *reinterpret_cast<const std::uint32_t*>(&h);
      }
    }
    *reinterpret_cast<uint4*>(static_cast<std::uint16_t*>(base) + i) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// --------------------------------------------------------------------------------------------------------- kernel
// Elements [begin, end) of one range, by the whole block. See [Note: rounding].
template <int S, int D>
__device__ void convert_chunk(const void* src, void* dst, std::int64_t begin, std::int64_t end, bool vectorized,
                              float scale, bool accumulate) {
  if (vectorized) {
    const std::int64_t steps = (end - begin) / kVec;
    for (std::int64_t s = threadIdx.x; s < steps; s += blockDim.x) {
      const std::int64_t i = begin + s * kVec;
      float x[kVec];
      load_vec<S>(src, i, x);
      if (accumulate) {
        float d[kVec];
        load_vec<D>(dst, i, d);
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = __fadd_rn(d[j], __fmul_rn(x[j], scale));
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = __fmul_rn(x[j], scale);
      }
      store_vec<D>(dst, i, x);
    }
    begin += steps * kVec;
  }
  // Unaligned ranges (a bucket slot at an odd offset) and tails: one element per lane, so each warp access is
  // coalesced, kUnroll independent loads in flight per thread to keep enough bytes moving.
  const std::int64_t stride = blockDim.x;
  std::int64_t i = begin + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < end; i += kUnroll * stride) {
    float x[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) x[j] = load_one<S>(src, i + j * stride);
    if (accumulate) {
      float d[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) d[j] = load_one<D>(dst, i + j * stride);
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) x[j] = __fadd_rn(d[j], __fmul_rn(x[j], scale));
    } else {
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) x[j] = __fmul_rn(x[j], scale);
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) store_one<D>(dst, i + j * stride, x[j]);
  }
  for (; i < end; i += stride) {
    float x = __fmul_rn(load_one<S>(src, i), scale);
    if (accumulate) x = __fadd_rn(load_one<D>(dst, i), x);
    store_one<D>(dst, i, x);
  }
}

__global__ void __launch_bounds__(kThreads) convert_segments_kernel(const ZC_GRID_CONSTANT SegmentBatch batch) {
  const ChunkRange r = cuda_elementwise::find_chunk<kChunk>(batch);  // see [Note: segment batches]
  const int seg = r.entry;
  const std::int64_t begin = r.begin, end = r.end;
  const void* src = batch.src[seg];
  void* dst = batch.dst[seg];
  const bool vec = batch.vectorized[seg] != 0;
  const float scale = batch.scale;
  const bool acc = batch.accumulate;
  switch (batch.src_type[seg] * 3 + batch.dst_type[seg]) {
    case kF32 * 3 + kF32: convert_chunk<kF32, kF32>(src, dst, begin, end, vec, scale, acc); break;
    case kF32 * 3 + kBF16: convert_chunk<kF32, kBF16>(src, dst, begin, end, vec, scale, acc); break;
    case kF32 * 3 + kF16: convert_chunk<kF32, kF16>(src, dst, begin, end, vec, scale, acc); break;
    case kBF16 * 3 + kF32: convert_chunk<kBF16, kF32>(src, dst, begin, end, vec, scale, acc); break;
    case kBF16 * 3 + kBF16: convert_chunk<kBF16, kBF16>(src, dst, begin, end, vec, scale, acc); break;
    case kBF16 * 3 + kF16: convert_chunk<kBF16, kF16>(src, dst, begin, end, vec, scale, acc); break;
    case kF16 * 3 + kF32: convert_chunk<kF16, kF32>(src, dst, begin, end, vec, scale, acc); break;
    case kF16 * 3 + kBF16: convert_chunk<kF16, kBF16>(src, dst, begin, end, vec, scale, acc); break;
    default: convert_chunk<kF16, kF16>(src, dst, begin, end, vec, scale, acc); break;
  }
}

// ----------------------------------------------------------------------------------------------------------- host
std::uint8_t type_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: break;
  }
  TORCH_CHECK(false, "zerocore bucket ops: unsupported dtype ", t);  // the checks reject it first
}

struct Segment {
  const void* src;
  at::ScalarType src_type;
  void* dst;
  at::ScalarType dst_type;
  std::int64_t numel;
};

// Launches as few kernels as the argument block allows; see [Note: segment batches].
void launch_segments(const std::vector<Segment>& segments, float scale, bool accumulate) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SegmentBatch batch;
  batch.count = 0;
  batch.scale = scale;
  batch.accumulate = accumulate;
  std::int64_t chunks = 0;
  auto flush = [&]() {
    if (batch.count == 0) return;
    batch.first_chunk[batch.count] = static_cast<std::int32_t>(chunks);
    convert_segments_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch.count = 0;
    chunks = 0;
  };
  for (const Segment& s : segments) {
    const std::int64_t need = (s.numel + kChunk - 1) / kChunk;
    TORCH_CHECK(need <= kMaxChunksPerLaunch, "zerocore bucket ops: a tensor of ", s.numel,
                " elements is larger than one CUDA launch covers; split it");
    if (batch.count == kMaxSegments || chunks + need > kMaxChunksPerLaunch) flush();
    const int k = batch.count++;
    batch.src[k] = s.src;
    batch.dst[k] = s.dst;
    batch.numel[k] = s.numel;
    batch.first_chunk[k] = static_cast<std::int32_t>(chunks);
    batch.src_type[k] = type_code(s.src_type);
    batch.dst_type[k] = type_code(s.dst_type);
    batch.vectorized[k] = cuda_elementwise::aligned(s.src, 16) && cuda_elementwise::aligned(s.dst, 16);
    chunks += need;
  }
  flush();
}

// A range that is its own destination with nothing to change needs no work.
bool is_noop(const Segment& s, double scale, bool accumulate) {
  return s.numel == 0 || (s.src == s.dst && s.src_type == s.dst_type && scale == 1.0 && !accumulate);
}

void pack_cuda(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets, double scale, bool accumulate) {
  pack_checks::check_pack(srcs, dst, offsets);
  TORCH_CHECK(dst.is_cuda(), "zerocore::pack (CUDA kernel) got dst on ", dst.device());
  const c10::cuda::CUDAGuard guard(dst.device());
  std::vector<Segment> segments;
  segments.reserve(srcs.size());
  char* base = static_cast<char*>(dst.data_ptr());
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    const Segment s{srcs[i].data_ptr(), srcs[i].scalar_type(), base + offsets[i] * dst.element_size(),
                    dst.scalar_type(), srcs[i].numel()};
    if (!is_noop(s, scale, accumulate)) segments.push_back(s);
  }
  launch_segments(segments, static_cast<float>(scale), accumulate);
}

void unpack_cuda(const at::Tensor& src, at::TensorList dsts, at::IntArrayRef offsets, double scale) {
  pack_checks::check_unpack(src, dsts, offsets);
  TORCH_CHECK(src.is_cuda(), "zerocore::unpack (CUDA kernel) got src on ", src.device());
  const c10::cuda::CUDAGuard guard(src.device());
  std::vector<Segment> segments;
  segments.reserve(dsts.size());
  const char* base = static_cast<const char*>(src.data_ptr());
  for (std::size_t i = 0; i < dsts.size(); ++i) {
    const Segment s{base + offsets[i] * src.element_size(), src.scalar_type(), dsts[i].data_ptr(),
                    dsts[i].scalar_type(), dsts[i].numel()};
    if (!is_noop(s, scale, false)) segments.push_back(s);
  }
  launch_segments(segments, static_cast<float>(scale), /*accumulate=*/false);
}

}  // namespace
}  // namespace zerocore

TORCH_LIBRARY_IMPL(zerocore, CUDA, m) {
  m.impl("pack", &zerocore::pack_cuda);
  m.impl("unpack", &zerocore::unpack_cuda);
}
