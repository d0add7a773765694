// Multi-tensor copy with cast and scale, the CPU core of zerocore's bucket ops (torch-free, so it builds in the
// standalone CMake core and runs under sanitizers). pack and unpack are both "many (src, dst) ranges": pack reads
// many tensors into slices of one flat bucket, unpack reads slices of one flat tensor into many tensors.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_features.h"

namespace zerocore {

enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline std::size_t float_type_size(FloatType t) { return t == FloatType::kFloat32 ? 4 : 2; }
inline const char* float_type_name(FloatType t) {
  switch (t) {
    case FloatType::kFloat32: return "float32";
    case FloatType::kBFloat16: return "bfloat16";
    default: return "float16";
  }
}

// One contiguous range: dst[j] = cast(src[j] * scale), or with accumulate dst[j] = cast(float(dst[j]) + src[j] *
// scale), for j in [0, numel). The product and sum are taken in fp32 (mul, then add: no FMA, so results are
// bit-identical to torch's `(dst.float() + src.float() * scale).to(dst.dtype)`); bf16 and fp16 round to nearest
// even. src and dst must not overlap unless they are the same address with the same type (in place).
struct CopySegment {
  const void* src = nullptr;
  FloatType src_type = FloatType::kFloat32;
  void* dst = nullptr;
  FloatType dst_type = FloatType::kFloat32;
  std::int64_t numel = 0;
};

// Converts every segment, splitting the total element count evenly over `num_threads` OpenMP threads (each thread
// gets one contiguous run of elements, which may span segments). Small jobs run on the calling thread. The
// segments' destinations must not overlap each other.
void convert_segments(const std::vector<CopySegment>& segments, float scale, bool accumulate, int num_threads,
                      SimdLevel level);

// Elements [begin, end) of one segment on the calling thread with the given SIMD level (exposed for tests).
void convert_range(const CopySegment& segment, std::int64_t begin, std::int64_t end, float scale, bool accumulate,
                   SimdLevel level);

}  // namespace zerocore
