// CPU Adam kernels (csrc/adam/cpu_adam_kernels.cpp) without torch: every SIMD path against the scalar path
// (bit for bit, for every element-type combination and sizes around the vector widths and the tile size), the
// scalar path against adam_math.h, the finite scan, and input errors. Runs under ASan+UBSan and TSan.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "adam/cpu_adam_kernels.h"
#include "check.h"
#include "half_convert.h"

using zerocore::SimdLevel;
using namespace zerocore::adam;

namespace {

constexpr int64_t kTile = int64_t{1} << 14;  // the kernel's tile size: sizes around it cross tile borders
const int64_t kSizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100, kTile - 1, kTile + 3, 3 * kTile + 21};

struct Lcg {  // deterministic random numbers, no <random> distribution differences between libstdc++ versions
  uint64_t state;
  explicit Lcg(uint64_t seed) : state(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  float normalish() {  // sum of uniforms: roughly normal, mean 0, sd ~1
    float sum = 0.0f;
    for (int i = 0; i < 4; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      sum += static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f - 0.5f;
    }
    return sum * 1.7f;
  }
};

size_t elem_size(ElemType t) { return t == ElemType::kFloat32 ? 4 : 2; }

template <class ByteVector>
void store_as(ElemType t, ByteVector& buf, size_t i, float x) {
  if (t == ElemType::kFloat32) {
    std::memcpy(buf.data() + 4 * i, &x, 4);
    return;
  }
  const uint16_t h = t == ElemType::kBFloat16 ? zerocore::float_to_bf16(x) : zerocore::float_to_fp16(x);
  std::memcpy(buf.data() + 2 * i, &h, 2);
}

// 64-byte aligned storage (like torch's CPU allocator), so the SIMD paths' streaming stores get exercised.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using Bytes = std::vector<uint8_t, Aligned64<uint8_t>>;

// One tensor's buffers, filled with random data of the requested types. `shift` starts every buffer one
// element past the aligned allocation, so the kernels also see misaligned tensors (ordinary stores).
struct Buffers {
  std::vector<float, Aligned64<float>> param;
  Bytes exp_avg, exp_avg_sq, grad, param_out;
  int64_t shift;
  Buffers(int64_t n, ElemType grad_t, ElemType state_t, ElemType out_t, uint64_t seed, bool misaligned = false)
      : param(n + 1), exp_avg((n + 1) * elem_size(state_t)), exp_avg_sq((n + 1) * elem_size(state_t)),
        grad((n + 1) * elem_size(grad_t)), param_out((n + 1) * elem_size(out_t), 0xAB), shift(misaligned ? 1 : 0) {
    Lcg rng(seed);
    for (int64_t i = 0; i < n + 1; ++i) {
      param[i] = rng.normalish();
      store_as(state_t, exp_avg, i, 0.01f * rng.normalish());
      store_as(state_t, exp_avg_sq, i, 1e-4f * std::fabs(rng.normalish()));
      store_as(grad_t, grad, i, rng.normalish() * 64.0f);
    }
  }
  AdamTensor tensor(int64_t n, bool with_out) {
    AdamTensor t;
    t.param = param.data() + shift;
    t.exp_avg = exp_avg.data() + shift * (exp_avg.size() / param.size());
    t.exp_avg_sq = exp_avg_sq.data() + shift * (exp_avg_sq.size() / param.size());
    t.grad = grad.data() + shift * (grad.size() / param.size());
    t.param_out = with_out ? param_out.data() + shift * (param_out.size() / param.size()) : nullptr;
    t.numel = n;
    return t;
  }
  bool operator==(const Buffers& o) const {
    // Bitwise for the floats too (NaN == NaN, -0 != +0).
    return param.size() == o.param.size() && std::memcmp(param.data(), o.param.data(), param.size() * 4) == 0 &&
           exp_avg == o.exp_avg && exp_avg_sq == o.exp_avg_sq && grad == o.grad && param_out == o.param_out;
  }
};

AdamConstants constants(bool adamw) { return make_adam_constants(1e-2, 0.9, 0.999, 1e-8, 0.05, 7, adamw); }

bool cpu_has(SimdLevel level) {
  return static_cast<int>(level) <= static_cast<int>(zerocore::cpu_simd_support());
}

// Runs one step over all sizes of the combination as one call (one batch) with the given path and threads.
std::vector<Buffers> run(SimdLevel level, int threads, ElemType g, ElemType s, bool with_out, ElemType o,
                         bool adamw, bool misaligned) {
  std::vector<Buffers> buffers;
  for (int64_t n : kSizes) buffers.emplace_back(n, g, s, o, static_cast<uint64_t>(n) + 17, misaligned);
  AdamBatch batch;
  batch.grad_type = g;
  batch.state_type = s;
  batch.has_param_out = with_out;
  batch.param_out_type = o;
  for (size_t i = 0; i < buffers.size(); ++i) batch.tensors.push_back(buffers[i].tensor(kSizes[i], with_out));
  AdamKernelOptions opts;
  opts.simd = level;
  opts.num_threads = threads;
  CHECK(fused_adam_step({batch}, constants(adamw), 0.25f, opts));
  return buffers;
}

const ElemType kGradTypes[] = {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16};
const ElemType kStateTypes[] = {ElemType::kFloat32, ElemType::kBFloat16};

}  // namespace

ZC_TEST(simd_paths_match_scalar_bit_for_bit) {
  int compared = 0;
  for (ElemType g : kGradTypes)
    for (ElemType s : kStateTypes)
      for (int out = 0; out < 3; ++out)
        for (bool adamw : {true, false}) {
          const bool with_out = out != 0;
          const ElemType o = out == 2 ? ElemType::kFloat16 : ElemType::kBFloat16;
          const std::vector<Buffers> reference = run(SimdLevel::kScalar, 1, g, s, with_out, o, adamw, false);
          const std::vector<Buffers> reference_shifted = run(SimdLevel::kScalar, 1, g, s, with_out, o, adamw, true);
          for (SimdLevel level : {SimdLevel::kAvx2, SimdLevel::kAvx512}) {
            if (!cpu_has(level)) continue;
            for (int threads : {1, 2}) {
              const bool misaligned = threads == 2;  // aligned (streaming stores) on 1 thread, misaligned on 2
              const std::vector<Buffers> got = run(level, threads, g, s, with_out, o, adamw, misaligned);
              const std::vector<Buffers>& expected = misaligned ? reference_shifted : reference;
              for (size_t i = 0; i < got.size(); ++i) {
                if (!(got[i] == expected[i]))
                  std::fprintf(stderr, "mismatch: %s grad %s state %s out %d adamw %d threads %d size %lld\n",
                               zerocore::simd_name(level), elem_type_name(g), elem_type_name(s), out, adamw, threads,
                               static_cast<long long>(kSizes[i]));
                CHECK(got[i] == expected[i]);
              }
              ++compared;
            }
          }
        }
  std::printf("compared %d SIMD runs against scalar (cpu supports %s)\n", compared,
              zerocore::simd_name(zerocore::cpu_simd_support()));
}

ZC_TEST(scalar_path_is_adam_math) {
  const int64_t n = 37;
  Buffers b(n, ElemType::kFloat32, ElemType::kFloat32, ElemType::kBFloat16, 5);
  Buffers expected = b;
  const AdamConstants k = constants(true);
  for (int64_t i = 0; i < n; ++i) {
    float m, v, g;
    std::memcpy(&m, expected.exp_avg.data() + 4 * i, 4);
    std::memcpy(&v, expected.exp_avg_sq.data() + 4 * i, 4);
    std::memcpy(&g, expected.grad.data() + 4 * i, 4);
    adam_update(expected.param[i], m, v, unscale_grad(g, 0.25f), k);
    std::memcpy(expected.exp_avg.data() + 4 * i, &m, 4);
    std::memcpy(expected.exp_avg_sq.data() + 4 * i, &v, 4);
    const uint16_t h = zerocore::float_to_bf16(expected.param[i]);
    std::memcpy(expected.param_out.data() + 2 * i, &h, 2);
  }
  AdamBatch batch;
  batch.has_param_out = true;
  batch.tensors.push_back(b.tensor(n, true));
  AdamKernelOptions opts;
  CHECK(fused_adam_step({batch}, k, 0.25f, opts));
  CHECK(b == expected);
  // And the update moved every param (the step is not a no-op).
  Buffers untouched(n, ElemType::kFloat32, ElemType::kFloat32, ElemType::kBFloat16, 5);
  for (int64_t i = 0; i < n; ++i) CHECK(b.param[i] != untouched.param[i]);
}

ZC_TEST(nonfinite_gradient_is_found_and_nothing_changes) {
  const float bad_values[] = {INFINITY, -INFINITY, NAN};
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (!cpu_has(level)) continue;
    for (ElemType g : kGradTypes)
      for (float bad : bad_values)
        for (int64_t where : {int64_t{0}, kTile + 2, 3 * kTile + 20}) {  // first, mid, last element (a tail)
          const int64_t n = 3 * kTile + 21;
          Buffers b(n, g, ElemType::kFloat32, ElemType::kBFloat16, 3);
          store_as(g, b.grad, static_cast<size_t>(where), bad);
          const Buffers before = b;
          AdamBatch batch;
          batch.grad_type = g;
          batch.has_param_out = true;
          batch.tensors.push_back(b.tensor(n, true));
          AdamKernelOptions opts;
          opts.simd = level;
          opts.num_threads = 2;
          CHECK(!grads_all_finite({batch}, opts));
          CHECK(!fused_adam_step({batch}, constants(true), 1.0f, opts));
          CHECK(b == before);
        }
  }
}

ZC_TEST(finite_gradients_pass_the_scan_including_extremes) {
  const int64_t n = 45;
  for (ElemType g : kGradTypes) {
    Buffers b(n, g, ElemType::kFloat32, ElemType::kBFloat16, 8);
    // The largest finite value of each type must not count as overflow.
    const float largest = g == ElemType::kFloat16 ? 65504.0f : 3.3895314e38f;  // fp16 max; bf16 max fits fp32
    store_as(g, b.grad, 44, largest);
    store_as(g, b.grad, 3, -largest);
    AdamBatch batch;
    batch.grad_type = g;
    batch.tensors.push_back(b.tensor(n, false));
    for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
      AdamKernelOptions opts;
      opts.simd = level;
      CHECK(grads_all_finite({batch}, opts));
    }
  }
}

ZC_TEST(empty_calls_and_zero_sized_tensors_are_fine) {
  AdamKernelOptions opts;
  opts.num_threads = 2;
  CHECK(fused_adam_step({}, constants(true), 1.0f, opts));
  AdamBatch batch;
  AdamTensor empty;  // null pointers are fine when numel is 0
  batch.tensors.push_back(empty);
  CHECK(fused_adam_step({batch}, constants(true), 1.0f, opts));
}

ZC_TEST(bad_input_throws_before_writing) {
  const int64_t n = 10;
  Buffers b(n, ElemType::kFloat32, ElemType::kFloat32, ElemType::kBFloat16, 2);
  const Buffers before = b;
  AdamKernelOptions opts;

  AdamBatch fp16_state;
  fp16_state.state_type = ElemType::kFloat16;
  fp16_state.tensors.push_back(b.tensor(n, false));
  CHECK_THROWS(fused_adam_step({fp16_state}, constants(true), 1.0f, opts), "must be float32 or bfloat16");

  AdamBatch fp32_out;
  fp32_out.has_param_out = true;
  fp32_out.param_out_type = ElemType::kFloat32;
  fp32_out.tensors.push_back(b.tensor(n, true));
  CHECK_THROWS(fused_adam_step({fp32_out}, constants(true), 1.0f, opts), "params_out must be bfloat16 or float16");

  AdamBatch null_out;
  null_out.has_param_out = true;
  null_out.tensors.push_back(b.tensor(n, false));
  CHECK_THROWS(fused_adam_step({null_out}, constants(true), 1.0f, opts), "null param_out");

  AdamBatch null_grad;
  null_grad.tensors.push_back(b.tensor(n, false));
  null_grad.tensors.push_back(b.tensor(n, false));
  null_grad.tensors[1].grad = nullptr;
  CHECK_THROWS(fused_adam_step({null_grad}, constants(true), 1.0f, opts), "tensor 1 of batch 0 has a null");
  CHECK(b == before);  // the valid first tensor of that batch was not updated either
}

ZC_TEST_MAIN()
