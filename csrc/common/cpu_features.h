// Which SIMD level the CPU kernels use, decided once at run time (no -march=native: one binary for every
// x86-64). ZEROCORE_SIMD=avx512|avx2|scalar forces a level (for tests); forcing a level the CPU lacks throws.
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

#include "zc_check.h"

namespace zerocore {

enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

inline SimdLevel cpu_simd_support() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return SimdLevel::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return SimdLevel::kAvx2;
#endif
  return SimdLevel::kScalar;
}

// Reads ZEROCORE_SIMD on every call (cheap) so tests can switch paths inside one process.
inline SimdLevel selected_simd() {
  const SimdLevel supported = cpu_simd_support();
  const char* forced = std::getenv("ZEROCORE_SIMD");
  if (forced == nullptr || forced[0] == '\0') return supported;
  SimdLevel want;
  if (std::strcmp(forced, "avx512") == 0) want = SimdLevel::kAvx512;
  else if (std::strcmp(forced, "avx2") == 0) want = SimdLevel::kAvx2;
  else if (std::strcmp(forced, "scalar") == 0) want = SimdLevel::kScalar;
  else fail(__FILE__, __LINE__, "ZEROCORE_SIMD=", forced, " is not one of avx512, avx2, scalar");
  ZC_CHECK(static_cast<int>(want) <= static_cast<int>(supported), "ZEROCORE_SIMD=", forced,
           " but this CPU supports only ", simd_name(supported));
  return want;
}

}  // namespace zerocore
