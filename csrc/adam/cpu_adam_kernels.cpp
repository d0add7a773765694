// Fused Adam / AdamW CPU kernels: one tile loop, compiled for AVX-512, AVX2 and plain scalar code, picked at
// run time (cpu_features.h), spread over OpenMP threads in cache-sized tiles.
//
// [Note: one loop, compiled per ISA]
// The tile loop below (the part between `#else` and the final `#endif`) is written once, in terms of a small
// `Ops` struct of load / store / arithmetic helpers, and this file includes itself three times to compile it
// for each instruction set: plainly (scalar), and inside `#pragma GCC target` regions for AVX2 and AVX-512.
// Every function and template defined in such a region gets that target, so the intrinsics inline and the
// binary still runs on any x86-64 (no -march flag; a path runs only where cpu_simd_support() allows it).
// Highway's foreach_target uses the same re-inclusion trick.
//
// [Note: bit-exact paths]
// The scalar path calls adam_update() from adam_math.h; the SIMD paths perform the same IEEE operations in the
// same order (explicit fma, exact div and sqrt), convert bf16 with the same round-to-nearest-even as
// half_convert.h and fp16 with F16C (also round-to-nearest-even), and run the last partial vector of a tensor
// on a zero-padded copy instead of a separate scalar tail. So all paths agree bit for bit (tests/cpp checks).
#if !defined(ZC_ADAM_ISA)

#include "cpu_adam_kernels.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "half_convert.h"
#include "zc_check.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZC_ADAM_X86_SIMD 1
#include <immintrin.h>

#include "simd_bf16.h"
#else
#define ZC_ADAM_X86_SIMD 0  // other compilers / CPUs: scalar only (see effective_simd)
#endif

namespace zerocore {
namespace adam {
namespace detail {

// Distinct types for the two 16-bit formats so the load/store helpers can overload on them.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};
struct NoOut {};  // "no params_out": the tile loop compiles the cast-and-store away

struct StepScalars {
  AdamConstants k;
  float grad_scale;
};

// Work on elements [begin, end) of one tensor.
using UpdateFn = void (*)(const AdamTensor& t, int64_t begin, int64_t end, const StepScalars& s);
using ScanFn = bool (*)(const void* grad, int64_t begin, int64_t end);  // true when all finite

}  // namespace detail
}  // namespace adam
}  // namespace zerocore

// ---- the per-ISA passes (see [Note: one loop, compiled per ISA]) ----
#define ZC_ADAM_ISA 0
#define ZC_ADAM_ISA_NS scalar_isa
#include "cpu_adam_kernels.cpp"  // this file, again
#undef ZC_ADAM_ISA
#undef ZC_ADAM_ISA_NS

#if ZC_ADAM_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ZC_ADAM_ISA 1
#define ZC_ADAM_ISA_NS avx2_isa
#include "cpu_adam_kernels.cpp"  // this file, again
#undef ZC_ADAM_ISA
#undef ZC_ADAM_ISA_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (`__m512i __Y = __Y;`), which its own
// -Wmaybe-uninitialized then reports once per use; the value is never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define ZC_ADAM_ISA 2
#define ZC_ADAM_ISA_NS avx512_isa
#include "cpu_adam_kernels.cpp"  // this file, again
#undef ZC_ADAM_ISA
#undef ZC_ADAM_ISA_NS
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// ---- driver: validation, tiling, threading, dispatch ----
namespace zerocore {
namespace adam {
namespace {

using detail::ScanFn;
using detail::StepScalars;
using detail::UpdateFn;

// 16K elements: 64 KiB per fp32 stream, so the five streams of a tile fit in L2 and each thread walks long
// runs of memory (tiles are handed out in contiguous blocks) that the hardware prefetchers follow.
constexpr int64_t kTileElems = int64_t{1} << 14;
// Below this many elements, a parallel region costs more than it saves.
constexpr int64_t kMinElemsPerThread = int64_t{1} << 15;

struct Tile {
  const AdamTensor* tensor;
  int64_t begin;
  int64_t end;
  int32_t batch;
};

void validate(const std::vector<AdamBatch>& batches) {
  for (size_t b = 0; b < batches.size(); ++b) {
    const AdamBatch& batch = batches[b];
    ZC_CHECK(batch.state_type == ElemType::kFloat32 || batch.state_type == ElemType::kBFloat16,
             "adam: optimizer state (exp_avg, exp_avg_sq) must be float32 or bfloat16, got ",
             elem_type_name(batch.state_type));
    ZC_CHECK(!batch.has_param_out || batch.param_out_type != ElemType::kFloat32,
             "adam: params_out must be bfloat16 or float16 (the fp32 params are already updated in place)");
    for (size_t i = 0; i < batch.tensors.size(); ++i) {
      const AdamTensor& t = batch.tensors[i];
      ZC_CHECK(t.numel >= 0, "adam: tensor ", i, " of batch ", b, " has negative numel ", t.numel);
      if (t.numel == 0) continue;
      ZC_CHECK(t.param && t.exp_avg && t.exp_avg_sq && t.grad, "adam: tensor ", i, " of batch ", b,
               " has a null param / exp_avg / exp_avg_sq / grad pointer");
      ZC_CHECK(!batch.has_param_out || t.param_out, "adam: tensor ", i, " of batch ", b,
               " has a null param_out pointer but the batch writes params_out");
    }
  }
}

std::vector<Tile> make_tiles(const std::vector<AdamBatch>& batches, int64_t* total_elems) {
  std::vector<Tile> tiles;
  *total_elems = 0;
  for (size_t b = 0; b < batches.size(); ++b) {
    for (const AdamTensor& t : batches[b].tensors) {
      *total_elems += t.numel;
      for (int64_t begin = 0; begin < t.numel; begin += kTileElems)
        tiles.push_back({&t, begin, std::min(begin + kTileElems, t.numel), static_cast<int32_t>(b)});
    }
  }
  return tiles;
}

int threads_for(int64_t total_elems, size_t num_tiles, int requested) {
  int64_t threads = std::max(1, requested);
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, total_elems / kMinElemsPerThread));
  threads = std::min<int64_t>(threads, static_cast<int64_t>(std::max<size_t>(1, num_tiles)));
  return static_cast<int>(threads);
}

ScanFn select_scan(SimdLevel level, ElemType grad_type) {
#if ZC_ADAM_X86_SIMD
  if (level == SimdLevel::kAvx512) return avx512_isa::select_scan(grad_type);
  if (level == SimdLevel::kAvx2) return avx2_isa::select_scan(grad_type);
#endif
  return scalar_isa::select_scan(grad_type);
}

UpdateFn select_update(SimdLevel level, const AdamBatch& batch, bool adamw) {
#if ZC_ADAM_X86_SIMD
  if (level == SimdLevel::kAvx512) return avx512_isa::select_update(batch, adamw);
  if (level == SimdLevel::kAvx2) return avx2_isa::select_update(batch, adamw);
#endif
  return scalar_isa::select_update(batch, adamw);
}

}  // namespace

const char* elem_type_name(ElemType type) {
  switch (type) {
    case ElemType::kFloat32: return "float32";
    case ElemType::kBFloat16: return "bfloat16";
    case ElemType::kFloat16: return "float16";
  }
  return "unknown";
}

SimdLevel effective_simd(SimdLevel requested) {
#if ZC_ADAM_X86_SIMD
  // Never run a path the CPU lacks, whatever the caller asked for.
  return static_cast<int>(requested) <= static_cast<int>(cpu_simd_support()) ? requested : cpu_simd_support();
#else
  (void)requested;
  return SimdLevel::kScalar;
#endif
}

bool grads_all_finite(const std::vector<AdamBatch>& batches, const AdamKernelOptions& opts) {
  validate(batches);
  int64_t total = 0;
  const std::vector<Tile> tiles = make_tiles(batches, &total);
  const SimdLevel level = effective_simd(opts.simd);
  std::vector<ScanFn> scan(batches.size());
  for (size_t b = 0; b < batches.size(); ++b) scan[b] = select_scan(level, batches[b].grad_type);

  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  const int threads = threads_for(total, tiles.size(), opts.num_threads);
  (void)threads;
  int bad = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (threads > 1)
#endif
  for (int64_t i = 0; i < num_tiles; ++i) {
    const Tile& t = tiles[i];
    if (!scan[t.batch](t.tensor->grad, t.begin, t.end)) bad |= 1;
  }
  return bad == 0;
}

void adam_update(const std::vector<AdamBatch>& batches, const AdamConstants& constants, float grad_scale,
                 const AdamKernelOptions& opts) {
  validate(batches);
  int64_t total = 0;
  const std::vector<Tile> tiles = make_tiles(batches, &total);
  const SimdLevel level = effective_simd(opts.simd);
  std::vector<UpdateFn> update(batches.size());
  for (size_t b = 0; b < batches.size(); ++b) update[b] = select_update(level, batches[b], constants.adamw);
  const StepScalars scalars{constants, grad_scale};

  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  const int threads = threads_for(total, tiles.size(), opts.num_threads);
  (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (int64_t i = 0; i < num_tiles; ++i) {
    const Tile& t = tiles[i];
    update[t.batch](*t.tensor, t.begin, t.end, scalars);
  }
}

bool fused_adam_step(const std::vector<AdamBatch>& batches, const AdamConstants& constants, float grad_scale,
                     const AdamKernelOptions& opts) {
  if (opts.check_finite && !grads_all_finite(batches, opts)) return false;
  adam_update(batches, constants, grad_scale, opts);
  return true;
}

}  // namespace adam
}  // namespace zerocore

#else  // ZC_ADAM_ISA is defined: one per-ISA pass, see [Note: one loop, compiled per ISA]

namespace zerocore {
namespace adam {
namespace ZC_ADAM_ISA_NS {

using detail::bf16_t;
using detail::fp16_t;
using detail::NoOut;
using detail::ScanFn;
using detail::StepScalars;
using detail::UpdateFn;

#if ZC_ADAM_ISA == 0
// One element at a time; the update itself is adam_update() from adam_math.h, the reference for the others.
struct Ops {
  using V = float;
  static constexpr int kWidth = 1;
  static constexpr bool kScalar = true;
  static V set1(float x) { return x; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return zc_fma(a, b, c); }
  static V div(V a, V b) { return zc_div(a, b); }
  static V sqrt(V a) { return zc_sqrt(a); }
  static V load(const float* p) { return *p; }
  static V load(const bf16_t* p) { return bf16_to_float(p->bits); }
  static V load(const fp16_t* p) { return fp16_to_float(p->bits); }
  static void store(float* p, V x) { *p = x; }
  static void store(bf16_t* p, V x) { p->bits = float_to_bf16(x); }
  static void store(fp16_t* p, V x) { p->bits = float_to_fp16(x); }
  template <class T>
  static void stream(T* p, V x) { store(p, x); }
  static void fence() {}
};

#elif ZC_ADAM_ISA == 1
struct Ops {
  using V = __m256;
  static constexpr int kWidth = 8;
  static constexpr bool kScalar = false;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16_t* p) {
    return simd::avx2_bf16_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V load(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // Round to nearest even, as float_to_bf16 does.
  static __m128i to_bf16(V x) { return simd::avx2_float_to_bf16(x); }
  static __m128i to_fp16(V x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static void store(bf16_t* p, V x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(x)); }
  static void store(fp16_t* p, V x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_fp16(x)); }
  // Non-temporal stores (aligned addresses only): see [Note: streaming stores].
  static void stream(float* p, V x) { _mm256_stream_ps(p, x); }
  static void stream(bf16_t* p, V x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(x)); }
  static void stream(fp16_t* p, V x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_fp16(x)); }
  static void fence() { _mm_sfence(); }
};

#elif ZC_ADAM_ISA == 2
struct Ops {
  using V = __m512;
  static constexpr int kWidth = 16;
  static constexpr bool kScalar = false;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16_t* p) {
    return simd::avx512_bf16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Round to nearest even, as float_to_bf16 does.
  static __m256i to_bf16(V x) { return simd::avx512_float_to_bf16(x); }
  static __m256i to_fp16(V x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static void store(bf16_t* p, V x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }
  static void store(fp16_t* p, V x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16(x)); }
  static void stream(float* p, V x) { _mm512_stream_ps(p, x); }
  static void stream(bf16_t* p, V x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }
  static void stream(fp16_t* p, V x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_fp16(x)); }
  static void fence() { _mm_sfence(); }
};
#endif

constexpr int kWidth = Ops::kWidth;
// [Note: streaming stores]
// params_out is written and never read here, so it goes out with non-temporal stores: no read-for-ownership of
// its cache lines (2 of the ~30 bytes per element of the mixed step) and no eviction of the other streams.
// Streaming the in-place streams (param, m, v) as well made the 50M-element step 45% slower on this machine
// (their lines are already in cache from the loads), so kStreamState stays false. Streaming needs
// vector-aligned addresses; tiles that are not aligned (or tiny) use ordinary stores.
constexpr bool kStreamState = false;
constexpr int64_t kMinStreamElems = 1024;

// One vector of elements (one element on the scalar path): the update of adam_math.h, lane by lane.
// Plain or non-temporal store of one vector.
template <bool kStream, class T, class V>
inline void put(T* p, V x) {
  if constexpr (kStream) {
    Ops::stream(p, x);
  } else {
    Ops::store(p, x);
  }
}

// The step's constants, broadcast once per tile into locals: read through the StepScalars reference inside
// the loop, they would be reloaded every iteration (the compiler cannot prove the stores do not alias them).
struct Constants {
  using V = typename Ops::V;
  StepScalars scalars;  // the scalar path hands these to adam_update()
  V grad_scale, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay, neg_step_size,
      inv_sqrt_bias_correction2, eps;
  explicit Constants(const StepScalars& s)
      : scalars(s), grad_scale(Ops::set1(s.grad_scale)), beta1(Ops::set1(s.k.beta1)), beta2(Ops::set1(s.k.beta2)),
        one_minus_beta1(Ops::set1(s.k.one_minus_beta1)), one_minus_beta2(Ops::set1(s.k.one_minus_beta2)),
        weight_decay(Ops::set1(s.k.weight_decay)), decay(Ops::set1(s.k.decay)),
        neg_step_size(Ops::set1(s.k.neg_step_size)), inv_sqrt_bias_correction2(Ops::set1(s.k.inv_sqrt_bias_correction2)),
        eps(Ops::set1(s.k.eps)) {}
};

// One vector of elements (one element on the scalar path): the update of adam_math.h, lane by lane.
template <class G, class S, class O, bool kAdamW, bool kStream>
inline void step_block(float* p, S* m, S* v, const G* g, O* out, const Constants& c) {
  if constexpr (Ops::kScalar) {
    float param = *p;
    float exp_avg = Ops::load(m);
    float exp_avg_sq = Ops::load(v);
    adam_update(param, exp_avg, exp_avg_sq, unscale_grad(Ops::load(g), c.scalars.grad_scale), c.scalars.k);
    *p = param;
    Ops::store(m, exp_avg);
    Ops::store(v, exp_avg_sq);
    if constexpr (!std::is_same_v<O, NoOut>) Ops::store(out, param);
  } else {
    using V = typename Ops::V;
    V grad = Ops::mul(Ops::load(g), c.grad_scale);
    V param = Ops::load(p);
    if constexpr (kAdamW) {
      param = Ops::mul(param, c.decay);
    } else {
      grad = Ops::fma(c.weight_decay, param, grad);
    }
    const V exp_avg = Ops::fma(c.beta1, Ops::load(m), Ops::mul(c.one_minus_beta1, grad));
    const V exp_avg_sq = Ops::fma(c.beta2, Ops::load(v), Ops::mul(c.one_minus_beta2, Ops::mul(grad, grad)));
    const V denom = Ops::fma(Ops::sqrt(exp_avg_sq), c.inv_sqrt_bias_correction2, c.eps);
    param = Ops::fma(c.neg_step_size, Ops::div(exp_avg, denom), param);
    put<kStream && kStreamState>(p, param);
    put<kStream && kStreamState>(m, exp_avg);
    put<kStream && kStreamState>(v, exp_avg_sq);
    if constexpr (!std::is_same_v<O, NoOut>) put<kStream>(out, param);
  }
}

template <class T>
bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kWidth) == 0;
}

// The tile loop: whole vectors, then the last partial vector on a zero-padded copy (see [Note: bit-exact
// paths]). G, S, O: grad, state and params_out element types (O = NoOut: no params_out).
template <class G, class S, class O, bool kAdamW>
void update_tile(const AdamTensor& t, int64_t begin, int64_t end, const StepScalars& s) {
  const Constants c(s);
  float* p = t.param;
  S* m = static_cast<S*>(t.exp_avg);
  S* v = static_cast<S*>(t.exp_avg_sq);
  const G* g = static_cast<const G*>(t.grad);
  O* out = nullptr;  // stays null for NoOut, and is never offset then (null + i is UB)
  if constexpr (!std::is_same_v<O, NoOut>) out = static_cast<O*>(t.param_out);
  auto out_at = [out](int64_t i) -> O* {
    if constexpr (std::is_same_v<O, NoOut>) return nullptr;
    else return out + i;
  };

  const int64_t whole_end = begin + (end - begin) / kWidth * kWidth;
  // Stream only when there is a stream to stream: the fence after it is not free.
  bool stream = !Ops::kScalar && (kStreamState || !std::is_same_v<O, NoOut>) && end - begin >= kMinStreamElems;
  if constexpr (!std::is_same_v<O, NoOut>) stream = stream && vector_aligned(out + begin);
  if constexpr (kStreamState)
    stream = stream && vector_aligned(p + begin) && vector_aligned(m + begin) && vector_aligned(v + begin);
  if (stream) {
    for (int64_t i = begin; i < whole_end; i += kWidth)
      step_block<G, S, O, kAdamW, true>(p + i, m + i, v + i, g + i, out_at(i), c);
    Ops::fence();  // order the write-combining stores before this thread's later writes (the tail, the flag)
  } else {
    for (int64_t i = begin; i < whole_end; i += kWidth)
      step_block<G, S, O, kAdamW, false>(p + i, m + i, v + i, g + i, out_at(i), c);
  }
  if (whole_end < end) {
    const int64_t i = whole_end;
    const size_t rest = static_cast<size_t>(end - i);
    float p_pad[kWidth] = {};
    S m_pad[kWidth] = {};
    S v_pad[kWidth] = {};
    G g_pad[kWidth] = {};
    O out_pad[kWidth] = {};
    std::memcpy(p_pad, p + i, rest * sizeof(float));
    std::memcpy(m_pad, m + i, rest * sizeof(S));
    std::memcpy(v_pad, v + i, rest * sizeof(S));
    std::memcpy(g_pad, g + i, rest * sizeof(G));
    step_block<G, S, O, kAdamW, false>(p_pad, m_pad, v_pad, g_pad, out_pad, c);
    std::memcpy(p + i, p_pad, rest * sizeof(float));
    std::memcpy(m + i, m_pad, rest * sizeof(S));
    std::memcpy(v + i, v_pad, rest * sizeof(S));
    if constexpr (!std::is_same_v<O, NoOut>) std::memcpy(out + i, out_pad, rest * sizeof(O));
  }
}

// True when grad[begin, end) holds no inf and no nan: a running max of the bit patterns without the sign, compared
// once with the smallest non-finite pattern. Integer-only and branch-free, so the compiler vectorizes it for
// the pass's instruction set (vpmaxuw / vpmaxud), and bf16 / fp16 are scanned without widening.
template <class G>
bool scan_tile(const void* grad, int64_t begin, int64_t end) {
  using Bits = std::conditional_t<sizeof(G) == 4, uint32_t, uint16_t>;
  constexpr Bits kAbsMask = sizeof(G) == 4 ? Bits(0x7fffffffu) : Bits(0x7fffu);
  constexpr Bits kFirstNonFinite = std::is_same_v<G, float> ? Bits(0x7f800000u)     // fp32 exponent all ones
                                   : std::is_same_v<G, bf16_t> ? Bits(0x7f80u)      // bf16 exponent all ones
                                                               : Bits(0x7c00u);     // fp16 exponent all ones
  const unsigned char* bytes = static_cast<const unsigned char*>(grad) + begin * sizeof(G);
  const int64_t n = end - begin;
  Bits worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, bytes + i * sizeof(G), sizeof b);  // memcpy: no aliasing UB, compiles to a plain load
    worst = std::max<Bits>(worst, b & kAbsMask);
  }
  return worst < kFirstNonFinite;
}

// Run-time element types -> the matching instantiation.
template <class G, class S, class O>
UpdateFn pick_mode(bool adamw) {
  return adamw ? &update_tile<G, S, O, true> : &update_tile<G, S, O, false>;
}

template <class G, class S>
UpdateFn pick_out(const AdamBatch& b, bool adamw) {
  if (!b.has_param_out) return pick_mode<G, S, NoOut>(adamw);
  return b.param_out_type == ElemType::kFloat16 ? pick_mode<G, S, fp16_t>(adamw) : pick_mode<G, S, bf16_t>(adamw);
}

template <class G>
UpdateFn pick_state(const AdamBatch& b, bool adamw) {
  return b.state_type == ElemType::kBFloat16 ? pick_out<G, bf16_t>(b, adamw) : pick_out<G, float>(b, adamw);
}

UpdateFn select_update(const AdamBatch& b, bool adamw) {
  switch (b.grad_type) {
    case ElemType::kBFloat16: return pick_state<bf16_t>(b, adamw);
    case ElemType::kFloat16: return pick_state<fp16_t>(b, adamw);
    default: return pick_state<float>(b, adamw);
  }
}

ScanFn select_scan(ElemType grad_type) {
  switch (grad_type) {
    case ElemType::kBFloat16: return &scan_tile<bf16_t>;
    case ElemType::kFloat16: return &scan_tile<fp16_t>;
    default: return &scan_tile<float>;
  }
}

}  // namespace ZC_ADAM_ISA_NS
}  // namespace adam
}  // namespace zerocore

#endif  // ZC_ADAM_ISA
