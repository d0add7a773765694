// CPU core of the bucket ops: per (source type, destination type, scale?, accumulate?) one loop per SIMD level,
// picked at run time, with the whole job split over OpenMP threads in equal contiguous element runs.
//
// [Note: no FMA]
// The accumulate path computes dst + src * scale as a multiply and then an add, each rounded, because that is what
// torch's composed reference does; a fused multiply-add would differ in the last bit. GCC implements the SIMD
// multiply and add intrinsics as plain vector arithmetic and may contract them into an FMA in functions whose
// target has FMA (AVX-512 does), so `opaque` hides the product from the optimiser. It emits no instruction.
#include "pack_kernels.h"

// GCC 12 reports the deliberately undefined pass-through operand inside its own AVX-512 intrinsics
// (_mm512_undefined_epi32) as maybe-uninitialized; the location is the header, so the pragma precedes it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "half_convert.h"
#include "simd_bf16.h"
#include "zc_check.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define ZC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define ZC_TARGET_AVX2 __attribute__((target("avx2,f16c")))

namespace zerocore {
namespace {

using LoopFn = void (*)(const void* src, void* dst, std::int64_t begin, std::int64_t end, float scale);

// ----------------------------------------------------------------------------------------------- scalar reference
template <FloatType T>
inline float scalar_load(const void* base, std::int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == FloatType::kBFloat16) {
    return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  } else {
    return fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  }
}

template <FloatType T>
inline void scalar_store(void* base, std::int64_t i, float x) {
  if constexpr (T == FloatType::kFloat32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (T == FloatType::kBFloat16) {
    static_cast<std::uint16_t*>(base)[i] = float_to_bf16(x);
  } else {
    static_cast<std::uint16_t*>(base)[i] = float_to_fp16(x);
  }
}

inline void opaque(float& x) { __asm__("" : "+x"(x)); }  // see [Note: no FMA]

// noinline: the SIMD loops call this for their tails; inlined there it would be compiled for an FMA target.
template <FloatType S, FloatType D, bool kScale, bool kAccumulate>
__attribute__((noinline)) void scalar_loop(const void* src, void* dst, std::int64_t begin, std::int64_t end,
                                           float scale) {
  for (std::int64_t i = begin; i < end; ++i) {
    float x = scalar_load<S>(src, i);
    if constexpr (kScale) {
      x *= scale;
      opaque(x);
    }
    if constexpr (kAccumulate) x = scalar_load<D>(dst, i) + x;
    scalar_store<D>(dst, i, x);
  }
}

// ------------------------------------------------------------------------------------------------------- AVX-512
template <FloatType T>
ZC_TARGET_AVX512 inline __m512 avx512_load(const void* base, std::int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (T == FloatType::kBFloat16) {
      return simd::avx512_bf16_to_float(h);
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <FloatType T>
ZC_TARGET_AVX512 inline void avx512_store(void* base, std::int64_t i, __m512 x) {
  if constexpr (T == FloatType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(base) + i, x);
  } else {
    __m256i h;
    if constexpr (T == FloatType::kBFloat16) {
      h = simd::avx512_float_to_bf16(x);  // round to nearest even, as float_to_bf16
    } else {
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<std::uint16_t*>(base) + i), h);
  }
}

template <FloatType S, FloatType D, bool kScale, bool kAccumulate>
ZC_TARGET_AVX512 void avx512_loop(const void* src, void* dst, std::int64_t begin, std::int64_t end, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  std::int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 x = avx512_load<S>(src, i);
    if constexpr (kScale) {
      x = _mm512_mul_ps(x, s);
      __asm__("" : "+v"(x));  // see [Note: no FMA]
    }
    if constexpr (kAccumulate) x = _mm512_add_ps(avx512_load<D>(dst, i), x);
    avx512_store<D>(dst, i, x);
  }
  scalar_loop<S, D, kScale, kAccumulate>(src, dst, i, end, scale);
}

// ---------------------------------------------------------------------------------------------------------- AVX2
template <FloatType T>
ZC_TARGET_AVX2 inline __m256 avx2_load(const void* base, std::int64_t i) {
  if constexpr (T == FloatType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (T == FloatType::kBFloat16) {
      return simd::avx2_bf16_to_float(h);
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

template <FloatType T>
ZC_TARGET_AVX2 inline void avx2_store(void* base, std::int64_t i, __m256 x) {
  if constexpr (T == FloatType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, x);
  } else {
    __m128i h;
    if constexpr (T == FloatType::kBFloat16) {
      h = simd::avx2_float_to_bf16(x);
    } else {
      h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(base) + i), h);
  }
}

// The AVX2 target deliberately leaves out "fma" (see [Note: no FMA]); the loop gains nothing from it.
template <FloatType S, FloatType D, bool kScale, bool kAccumulate>
ZC_TARGET_AVX2 void avx2_loop(const void* src, void* dst, std::int64_t begin, std::int64_t end, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  std::int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 x = avx2_load<S>(src, i);
    if constexpr (kScale) {
      x = _mm256_mul_ps(x, s);
      __asm__("" : "+x"(x));
    }
    if constexpr (kAccumulate) x = _mm256_add_ps(avx2_load<D>(dst, i), x);
    avx2_store<D>(dst, i, x);
  }
  scalar_loop<S, D, kScale, kAccumulate>(src, dst, i, end, scale);
}

// ---------------------------------------------------------------------------------------------- same-type copy
// Bit copies in vector registers: on the AMD EPYC this was tuned on, plain vector loads and stores measured at least
// as fast as glibc's memcpy (which may pick `rep movsb`) for the mid-sized ranges a bucket is made of.
ZC_TARGET_AVX512 void avx512_copy(const void* src, void* dst, std::size_t bytes) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  std::size_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    const __m512i a = _mm512_loadu_si512(s + i), b = _mm512_loadu_si512(s + i + 64);
    _mm512_storeu_si512(d + i, a);
    _mm512_storeu_si512(d + i + 64, b);
  }
  std::memcpy(d + i, s + i, bytes - i);
}

ZC_TARGET_AVX2 void avx2_copy(const void* src, void* dst, std::size_t bytes) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  std::size_t i = 0;
  for (; i + 64 <= bytes; i += 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
  }
  std::memcpy(d + i, s + i, bytes - i);
}

void copy_bytes(const void* src, void* dst, std::size_t bytes, SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: avx512_copy(src, dst, bytes); break;
    case SimdLevel::kAvx2: avx2_copy(src, dst, bytes); break;
    default: std::memcpy(dst, src, bytes); break;
  }
}

// ------------------------------------------------------------------------------------------------------ dispatch
template <FloatType S, FloatType D, bool kScale, bool kAccumulate>
LoopFn pick_level(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return &avx512_loop<S, D, kScale, kAccumulate>;
    case SimdLevel::kAvx2: return &avx2_loop<S, D, kScale, kAccumulate>;
    default: return &scalar_loop<S, D, kScale, kAccumulate>;
  }
}

template <FloatType S, FloatType D>
LoopFn pick_flags(bool scale, bool accumulate, SimdLevel level) {
  if (scale) return accumulate ? pick_level<S, D, true, true>(level) : pick_level<S, D, true, false>(level);
  return accumulate ? pick_level<S, D, false, true>(level) : pick_level<S, D, false, false>(level);
}

template <FloatType S>
LoopFn pick_dst(FloatType dst, bool scale, bool accumulate, SimdLevel level) {
  switch (dst) {
    case FloatType::kFloat32: return pick_flags<S, FloatType::kFloat32>(scale, accumulate, level);
    case FloatType::kBFloat16: return pick_flags<S, FloatType::kBFloat16>(scale, accumulate, level);
    default: return pick_flags<S, FloatType::kFloat16>(scale, accumulate, level);
  }
}

LoopFn pick_loop(FloatType src, FloatType dst, bool scale, bool accumulate, SimdLevel level) {
  switch (src) {
    case FloatType::kFloat32: return pick_dst<FloatType::kFloat32>(dst, scale, accumulate, level);
    case FloatType::kBFloat16: return pick_dst<FloatType::kBFloat16>(dst, scale, accumulate, level);
    default: return pick_dst<FloatType::kFloat16>(dst, scale, accumulate, level);
  }
}

bool valid_type(FloatType t) {
  return t == FloatType::kFloat32 || t == FloatType::kBFloat16 || t == FloatType::kFloat16;
}

void check_segment(const CopySegment& s, std::size_t index) {
  ZC_CHECK(valid_type(s.src_type) && valid_type(s.dst_type), "segment ", index, ": unknown float type code ",
           static_cast<int>(s.src_type), " -> ", static_cast<int>(s.dst_type));
  ZC_CHECK(s.numel >= 0, "segment ", index, ": negative element count ", s.numel);
  ZC_CHECK(s.numel == 0 || (s.src != nullptr && s.dst != nullptr), "segment ", index, ": null pointer for ",
           s.numel, " elements");
}

// Elements this small are copied on the calling thread: waking OpenMP threads costs more than the copy.
constexpr std::int64_t kMinElementsPerThread = 1 << 16;
// Thread boundaries fall on multiples of this many elements so threads do not share cache lines mid-segment.
constexpr std::int64_t kSplitAlignment = 64;

}  // namespace

void convert_range(const CopySegment& segment, std::int64_t begin, std::int64_t end, float scale, bool accumulate,
                   SimdLevel level) {
  if (end <= begin) return;
  const bool scaled = scale != 1.0f;
  if (!scaled && !accumulate && segment.src_type == segment.dst_type) {
    if (segment.src == segment.dst) return;  // in place, nothing to do
    const std::size_t size = float_type_size(segment.src_type);
    copy_bytes(static_cast<const char*>(segment.src) + begin * size, static_cast<char*>(segment.dst) + begin * size,
               (end - begin) * size, level);
    return;
  }
  pick_loop(segment.src_type, segment.dst_type, scaled, accumulate, level)(segment.src, segment.dst, begin, end,
                                                                          scale);
}

void convert_segments(const std::vector<CopySegment>& segments, float scale, bool accumulate, int num_threads,
                      SimdLevel level) {
  std::vector<std::int64_t> starts(segments.size() + 1, 0);  // starts[k]: global index of segment k's first element
  for (std::size_t k = 0; k < segments.size(); ++k) {
    check_segment(segments[k], k);
    starts[k + 1] = starts[k] + segments[k].numel;
  }
  const std::int64_t total = starts.back();
  if (total == 0) return;

  // One contiguous run [begin, end) of the global element range, across as many segments as it touches.
  auto convert_run = [&](std::int64_t begin, std::int64_t end) {
    std::size_t k = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; k < segments.size() && starts[k] < end; ++k) {
      const std::int64_t from = std::max(begin, starts[k]) - starts[k];
      const std::int64_t to = std::min(end, starts[k + 1]) - starts[k];
      convert_range(segments[k], from, to, scale, accumulate, level);
    }
  };

#ifdef _OPENMP
  const std::int64_t by_size = std::max<std::int64_t>(1, total / kMinElementsPerThread);
  const int threads = static_cast<int>(std::min<std::int64_t>(std::max(num_threads, 1), by_size));
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const std::int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
      auto boundary = [&](std::int64_t t) {
        return t == team ? total : std::min(total, (total * t / team) / kSplitAlignment * kSplitAlignment);
      };
      convert_run(boundary(me), boundary(me + 1));
    }
    return;
  }
#else
  (void)num_threads;  // built without OpenMP (the TSan build): one thread
#endif
  convert_run(0, total);
}

}  // namespace zerocore
