// The torch-free bucket kernels (csrc/buckets/pack_kernels.cpp): every SIMD level this CPU has must agree bit for
// bit with the scalar conversions of half_convert.h, for every type pair, with and without scale and accumulate,
// at sizes around the vector widths, and when a job is split over threads mid-segment. Run under ASan+UBSan to
// catch out-of-bounds vector loads in the tails.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "buckets/pack_kernels.h"
#include "check.h"
#include "half_convert.h"

using zerocore::CopySegment;
using zerocore::FloatType;
using zerocore::SimdLevel;

namespace {

const FloatType kTypes[] = {FloatType::kFloat32, FloatType::kBFloat16, FloatType::kFloat16};

std::vector<SimdLevel> levels_here() {
  std::vector<SimdLevel> out{SimdLevel::kScalar};
  if (static_cast<int>(zerocore::cpu_simd_support()) >= static_cast<int>(SimdLevel::kAvx2))
    out.push_back(SimdLevel::kAvx2);
  if (zerocore::cpu_simd_support() == SimdLevel::kAvx512) out.push_back(SimdLevel::kAvx512);
  return out;
}

// A buffer of n elements of one type, held as bytes; exactly n elements long so ASan sees any overrun.
struct Buffer {
  FloatType type;
  std::vector<unsigned char> bytes;
  Buffer(FloatType t, std::size_t n) : type(t), bytes(n * zerocore::float_type_size(t)) {}
  std::size_t size() const { return bytes.size() / zerocore::float_type_size(type); }
  void* data() { return bytes.data(); }
  float get(std::size_t i) const {
    if (type == FloatType::kFloat32) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      return f;
    }
    std::uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    return type == FloatType::kBFloat16 ? zerocore::bf16_to_float(h) : zerocore::fp16_to_float(h);
  }
  void set(std::size_t i, float f) {
    if (type == FloatType::kFloat32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
      return;
    }
    const std::uint16_t h = type == FloatType::kBFloat16 ? zerocore::float_to_bf16(f) : zerocore::float_to_fp16(f);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  }
};

void fill_random(Buffer& b, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> exponent(-10, 10);
  const float specials[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 70000.0f, 1e-6f, 1e-40f, -0.0f,
                            1.0f + 1.0f / 256, 1.0f + 3.0f / 256};
  for (std::size_t i = 0; i < b.size(); ++i) {
    b.set(i, (i % 37 == 5) ? specials[(i / 37) % 9] : std::ldexp(normal(rng), exponent(rng)));
  }
}

bool same_bits(const Buffer& a, const Buffer& b) {
  if (a.bytes == b.bytes) return true;
  for (std::size_t i = 0; i < a.size(); ++i) {  // NaN payloads may differ; any NaN matches any NaN
    const float x = a.get(i), y = b.get(i);
    if (std::isnan(x) && std::isnan(y)) continue;
    if (std::memcmp(a.bytes.data() + i * zerocore::float_type_size(a.type),
                    b.bytes.data() + i * zerocore::float_type_size(b.type), zerocore::float_type_size(a.type)) != 0) {
      std::fprintf(stderr, "  element %zu: %.9g vs %.9g\n", i, x, y);
      return false;
    }
  }
  return true;
}

// The definition, element by element with the scalar conversions (product and sum rounded separately).
Buffer reference(const Buffer& src, const Buffer& dst, float scale, bool accumulate) {
  Buffer out = dst;
  for (std::size_t i = 0; i < src.size(); ++i) {
    volatile float product = src.get(i) * scale;  // volatile: never fused with the add below
    out.set(i, accumulate ? dst.get(i) + product : static_cast<float>(product));
  }
  return out;
}

}  // namespace

ZC_TEST(every_level_matches_scalar_reference) {
  std::mt19937 rng(1);
  for (SimdLevel level : levels_here()) {
    for (FloatType s : kTypes) {
      for (FloatType d : kTypes) {
        for (std::size_t n : {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1023}) {
          for (float scale : {1.0f, 0.3f}) {
            for (bool accumulate : {false, true}) {
              Buffer src(s, n), dst(d, n);
              fill_random(src, rng);
              fill_random(dst, rng);
              const Buffer expected = reference(src, dst, scale, accumulate);
              CopySegment seg{src.data(), s, dst.data(), d, static_cast<std::int64_t>(n)};
              zerocore::convert_range(seg, 0, static_cast<std::int64_t>(n), scale, accumulate, level);
              if (!same_bits(dst, expected)) {
                std::fprintf(stderr, "level %s %s->%s n=%zu scale=%g accumulate=%d\n", zerocore::simd_name(level),
                             zerocore::float_type_name(s), zerocore::float_type_name(d), n, scale, accumulate);
              }
              CHECK(same_bits(dst, expected));
            }
          }
        }
      }
    }
  }
}

ZC_TEST(partial_range_touches_only_its_elements) {
  std::mt19937 rng(2);
  Buffer src(FloatType::kFloat32, 50), dst(FloatType::kBFloat16, 50);
  fill_random(src, rng);
  fill_random(dst, rng);
  const Buffer before = dst;
  Buffer expected = reference(src, dst, 2.0f, false);
  for (std::size_t i = 0; i < 50; ++i) {
    if (i < 3 || i >= 41) expected.set(i, before.get(i));
  }
  CopySegment seg{src.data(), src.type, dst.data(), dst.type, 50};
  zerocore::convert_range(seg, 3, 41, 2.0f, false, zerocore::cpu_simd_support());
  CHECK(same_bits(dst, expected));
}

ZC_TEST(segments_split_over_threads_match_single_thread) {
  std::mt19937 rng(3);
  const std::size_t sizes[] = {5, 200001, 0, 3, 150000, 77};
  std::vector<Buffer> srcs, dsts_one, dsts_many;
  for (std::size_t n : sizes) {
    srcs.emplace_back(FloatType::kFloat16, n);
    fill_random(srcs.back(), rng);
    dsts_one.emplace_back(FloatType::kFloat32, n);
    fill_random(dsts_one.back(), rng);
  }
  dsts_many = dsts_one;
  auto segments = [&](std::vector<Buffer>& dsts) {
    std::vector<CopySegment> out;
    for (std::size_t k = 0; k < srcs.size(); ++k) {
      out.push_back({srcs[k].data(), srcs[k].type, dsts[k].data(), dsts[k].type,
                     static_cast<std::int64_t>(srcs[k].size())});
    }
    return out;
  };
  const SimdLevel level = zerocore::cpu_simd_support();
  zerocore::convert_segments(segments(dsts_one), 0.5f, true, 1, level);
  zerocore::convert_segments(segments(dsts_many), 0.5f, true, 4, level);  // more threads than cores is fine
  for (std::size_t k = 0; k < srcs.size(); ++k) {
    CHECK(same_bits(dsts_one[k], dsts_many[k]));
  }
  // And the single-thread result is the definition.
  std::vector<Buffer> dsts_ref;
  std::mt19937 replay(3);
  for (std::size_t k = 0; k < srcs.size(); ++k) {
    Buffer s(FloatType::kFloat16, sizes[k]), d(FloatType::kFloat32, sizes[k]);
    fill_random(s, replay);
    fill_random(d, replay);
    CHECK(same_bits(dsts_one[k], reference(s, d, 0.5f, true)));
  }
}

ZC_TEST(in_place_same_type_is_allowed) {
  std::mt19937 rng(4);
  Buffer buf(FloatType::kBFloat16, 40);
  fill_random(buf, rng);
  const Buffer expected = reference(buf, buf, 0.25f, false);
  CopySegment seg{buf.data(), buf.type, buf.data(), buf.type, 40};
  zerocore::convert_segments({seg}, 0.25f, false, 2, zerocore::cpu_simd_support());
  CHECK(same_bits(buf, expected));
  const Buffer unchanged = buf;
  zerocore::convert_segments({seg}, 1.0f, false, 2, zerocore::cpu_simd_support());  // memcpy onto itself: skipped
  CHECK(same_bits(buf, unchanged));
}

ZC_TEST(bad_segments_throw) {
  float x[4] = {1, 2, 3, 4};
  CopySegment negative{x, FloatType::kFloat32, x, FloatType::kFloat32, -1};
  CHECK_THROWS(zerocore::convert_segments({negative}, 1.0f, false, 1, SimdLevel::kScalar), "negative element count");
  CopySegment null_dst{x, FloatType::kFloat32, nullptr, FloatType::kBFloat16, 4};
  CHECK_THROWS(zerocore::convert_segments({null_dst}, 1.0f, false, 1, SimdLevel::kScalar), "null pointer");
  CopySegment bad_type{x, static_cast<FloatType>(7), x, FloatType::kFloat32, 4};
  CHECK_THROWS(zerocore::convert_segments({bad_type}, 1.0f, false, 1, SimdLevel::kScalar), "unknown float type");
  CopySegment empty_null{nullptr, FloatType::kFloat32, nullptr, FloatType::kFloat32, 0};
  zerocore::convert_segments({empty_null}, 1.0f, true, 2, SimdLevel::kScalar);  // empty: no pointer needed
}

ZC_TEST_MAIN()
