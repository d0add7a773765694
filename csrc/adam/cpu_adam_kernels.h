// Torch-free CPU kernels of the fused Adam / AdamW step (raw pointers and std types only, so the standalone
// CMake build can run them under sanitizers). csrc/adam/cpu_adam_op.cpp turns torch tensors into these
// structs; the math itself lives in adam_math.h.
//
// One call updates many tensors. Tensors that share element types form an AdamBatch; each batch runs one
// instantiation of the SIMD tile loop (AVX-512, AVX2 or scalar, chosen at run time), and all tiles of all
// batches are spread over the threads together.
#pragma once

#include <cstdint>
#include <vector>

#include "adam_math.h"
#include "cpu_features.h"

namespace zerocore {
namespace adam {

// Element types the kernel reads and writes. Params (the fp32 master) are always float32.
enum class ElemType : uint8_t { kFloat32, kBFloat16, kFloat16 };

const char* elem_type_name(ElemType type);

// One tensor's buffers, all of `numel` elements (a flat ZeRO shard is just one of these).
struct AdamTensor {
  float* param = nullptr;            // fp32 master, updated in place
  void* exp_avg = nullptr;           // AdamBatch::state_type, updated in place
  void* exp_avg_sq = nullptr;        // AdamBatch::state_type, updated in place
  const void* grad = nullptr;        // AdamBatch::grad_type
  void* param_out = nullptr;         // AdamBatch::param_out_type; only read when the batch has_param_out
  int64_t numel = 0;
};

// Tensors that share element types.
struct AdamBatch {
  ElemType grad_type = ElemType::kFloat32;        // float32, bfloat16 or float16
  ElemType state_type = ElemType::kFloat32;       // float32, or bfloat16 (opt-in lower-precision m and v)
  bool has_param_out = false;                     // also write the updated param, cast, to param_out
  ElemType param_out_type = ElemType::kBFloat16;  // bfloat16 or float16
  std::vector<AdamTensor> tensors;
};

struct AdamKernelOptions {
  int num_threads = 1;                  // OpenMP threads; the op passes at::get_num_threads()
  SimdLevel simd = SimdLevel::kScalar;  // usually selected_simd(); levels this build lacks fall back
  bool check_finite = true;             // scan gradients for inf/nan before touching anything
};

// The step: when opts.check_finite and any gradient element is inf or nan, returns false and writes nothing;
// otherwise updates every tensor (see adam_math.h) with g = grad * grad_scale and returns true.
// Throws std::runtime_error (before writing anything) for unsupported element types or null buffers.
bool fused_adam_step(const std::vector<AdamBatch>& batches, const AdamConstants& constants, float grad_scale,
                     const AdamKernelOptions& opts);

// Parts of the step, public for tests and benchmarks.
bool grads_all_finite(const std::vector<AdamBatch>& batches, const AdamKernelOptions& opts);
void adam_update(const std::vector<AdamBatch>& batches, const AdamConstants& constants, float grad_scale,
                 const AdamKernelOptions& opts);

// The SIMD level the kernels really use for `requested` (a build without x86 SIMD runs scalar).
SimdLevel effective_simd(SimdLevel requested);

}  // namespace adam
}  // namespace zerocore
