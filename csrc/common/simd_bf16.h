// Vector bf16 <-> fp32 for the SIMD kernels (cpu_adam_kernels.cpp, pack_kernels.cpp). fp32 -> bf16 rounds to
// nearest even like float_to_bf16 in half_convert.h, so every SIMD path matches the scalar one bit for bit.
// Each function carries the smallest target it needs and is always inlined, so it compiles into any caller whose
// target includes that one (both kernels' AVX2 and AVX-512 targets do) and into no other.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

namespace zerocore {
namespace simd {

// bf16 is the high half of an fp32: widen each u16 to u32 and shift it up (exact).
__attribute__((target("avx2"), always_inline)) inline __m256 avx2_bf16_to_float(__m128i halves) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

__attribute__((target("avx512f"), always_inline)) inline __m512 avx512_bf16_to_float(__m256i halves) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// Add 0x7fff plus the lowest kept bit, keep the high half; NaN lanes take the quiet-NaN pattern instead.
__attribute__((target("avx2"), always_inline)) inline __m128i avx2_float_to_bf16(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(high, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i halves = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
  // Narrow 8 x u32 (all <= 0xffff, so packus does not saturate) to 8 x u16: packus works per 128-bit lane.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xd8));
}

// Same rounding on 16 lanes.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m256i avx512_float_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __m512i quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, quiet_nan));
}

}  // namespace simd
}  // namespace zerocore
#endif
