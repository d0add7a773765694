// CUDA kernel of zerocore::adam_step (schema and CPU kernel: cpu_adam_op.cpp; semantics: zerocore/ops/adam.py).
// A multi-tensor fused Adam / AdamW: fp32 master params, fp32 or bf16 m and v, fp32 / bf16 / fp16 gradients times
// a multiplier read from device memory, optional bf16 / fp16 copy of the updated params, all in one pass over
// memory (28 bytes per param for bf16 grads, fp32 state and a bf16 param copy). The update itself is
// adam_math.h's, shared with the CPU kernel, so both devices round identically.
//
// [Note: no host sync]
// Neither the gradient multiplier nor the inf/nan flag is ever read on the host. With check_finite, a scan
// kernel first reads every gradient and sets found_inf = 1 if any is inf or nan (or the multiplier is); the update
// kernel then reads found_inf on the device and returns at once when it is set, so a non-finite step writes
// nothing. found_inf already set on entry makes both kernels return. All scan launches go before the first
// update launch, so a bad gradient in a late batch also stops the early batches.
// A non-finite multiplier with check_finite=False cannot raise here as the CPU kernel does (that would read it on
// the host), so the update kernel treats it as found inf/nan instead: it sets found_inf and writes nothing.
//
// [Note: tensor batches]
// Multi-tensor apply: each tensor is cut into chunks of kChunk elements, one thread block per chunk. The kernel's
// argument block lists the tensors and each tensor's first chunk; a block finds its tensor by binary search in
// that list. CUDA >= 12.1 allows a 32 KB argument block (Volta and newer), which holds ~560 tensors per launch;
// older toolkits get the classic 4 KB (~64 tensors). Longer lists make several launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "adam_checks.h"
#include "adam_math.h"
#include "cuda_elementwise.cuh"

namespace zerocore {
namespace cuda_adam {
namespace {

using adam::AdamConstants;
using cuda_elementwise::aligned;
using cuda_elementwise::ChunkRange;
using cuda_elementwise::kArgumentLimit;
using cuda_elementwise::kBF16;
using cuda_elementwise::kF16;
using cuda_elementwise::kF32;
using cuda_elementwise::kLargeKernelParams;
using cuda_elementwise::kMaxChunksPerLaunch;
using cuda_elementwise::load_one;
using cuda_elementwise::store_one;

enum OutCode : std::uint8_t { kNoOut = 0, kOutBF16 = 1, kOutF16 = 2 };

constexpr int kMaxTensors = kLargeKernelParams ? 560 : 64;
constexpr int kThreads = 256;
constexpr std::int64_t kChunk = 32768;  // elements per thread block
constexpr int kVec = 4;                 // elements per thread per step on the vector path
constexpr int kUnroll = 4;              // elements per thread per step on the unaligned path
constexpr const char* kOp = "zerocore.adam_step (CUDA): ";

struct TensorBatch {
  float* param[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  const void* grad[kMaxTensors];
  void* param_out[kMaxTensors];
  std::int64_t numel[kMaxTensors];
  std::int32_t first_chunk[kMaxTensors + 1];  // first_chunk[count] = chunks in this launch
  std::uint8_t grad_type[kMaxTensors];
  std::uint8_t state_type[kMaxTensors];  // kF32 or kBF16
  std::uint8_t out_type[kMaxTensors];    // OutCode
  std::uint8_t vectorized[kMaxTensors];  // every buffer aligned for kVec-element vector access
  std::int32_t count;
};
static_assert(sizeof(TensorBatch) + sizeof(AdamConstants) + 2 * sizeof(void*) + 8 <= kArgumentLimit,
              "kernel argument block too large");

// ------------------------------------------------------------------------------------------ element conversions
// Four elements from element i: one 16-byte access for fp32, one 8-byte access for 16-bit types.
template <int T>
__device__ __forceinline__ void load_vec(const void* base, std::int64_t i, float (&x)[kVec]) {
  if constexpr (T == kF32) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const std::uint16_t*>(base) + i);
    float2 lo, hi;
    if constexpr (T == kBF16) {
      lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    } else {
      lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    }
    x[0] = lo.x; x[1] = lo.y; x[2] = hi.x; x[3] = hi.y;
  }
}

template <int T>
__device__ __forceinline__ std::uint32_t pack_pair(float a, float b) {
  if constexpr (T == kBF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
}

template <int T>
__device__ __forceinline__ void store_vec(void* base, std::int64_t i, const float (&x)[kVec]) {
  if constexpr (T == kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    *reinterpret_cast<uint2*>(static_cast<std::uint16_t*>(base) + i) =
        make_uint2(pack_pair<T>(x[0], x[1]), pack_pair<T>(x[2], x[3]));
  }
}

// Finds this block's tensor (ChunkRange::entry) and element range; see [Note: tensor batches].
__device__ __forceinline__ ChunkRange find_chunk(const TensorBatch& b) {
  return cuda_elementwise::find_chunk<kChunk>(b);
}

// ------------------------------------------------------------------------------------------------- finite scan
template <int T>
__device__ __forceinline__ bool word_not_finite(std::uint32_t w) {
  if constexpr (T == kF32) {
    return (w & 0x7f800000u) == 0x7f800000u;
  } else {
    constexpr std::uint32_t e = T == kBF16 ? 0x7f80u : 0x7c00u;  // exponent all ones: inf or nan
    return (w & e) == e || ((w >> 16) & e) == e;
  }
}

template <int T>
__device__ bool chunk_not_finite(const void* grad, std::int64_t begin, std::int64_t end, bool vectorized) {
  bool bad = false;
  if (vectorized) {  // 16 bytes per thread per step: 4 fp32 or 8 16-bit values
    constexpr int per_step = T == kF32 ? 4 : 8;
    const std::int64_t steps = (end - begin) / per_step;
    const char* bytes = static_cast<const char*>(grad) + begin * (T == kF32 ? 4 : 2);
    for (std::int64_t s = threadIdx.x; s < steps; s += blockDim.x) {
      const uint4 w = reinterpret_cast<const uint4*>(bytes)[s];
      bad |= word_not_finite<T>(w.x) | word_not_finite<T>(w.y) | word_not_finite<T>(w.z) |
             word_not_finite<T>(w.w);
    }
    begin += steps * per_step;
  }
  for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    bad |= !adam::is_finite_bits(load_one<T>(grad, i));
  }
  return bad;
}

__global__ void __launch_bounds__(kThreads)
    finite_scan_kernel(const ZC_GRID_CONSTANT TensorBatch batch, const float* grad_scale, float* found_inf) {
  // Already flagged: the update will not run, nothing to learn here. Decided once per block (another block may
  // set the flag meanwhile, and every thread must reach the barrier below or none).
  if (__syncthreads_or(threadIdx.x == 0 && *found_inf != 0.0f)) return;
  const ChunkRange r = find_chunk(batch);
  const void* grad = batch.grad[r.entry];
  const bool vec = batch.vectorized[r.entry] != 0;
  bool bad;
  switch (batch.grad_type[r.entry]) {
    case kF32: bad = chunk_not_finite<kF32>(grad, r.begin, r.end, vec); break;
    case kBF16: bad = chunk_not_finite<kBF16>(grad, r.begin, r.end, vec); break;
    default: bad = chunk_not_finite<kF16>(grad, r.begin, r.end, vec); break;
  }
  if (grad_scale != nullptr && blockIdx.x == 0 && threadIdx.x == 0) bad |= !adam::is_finite_bits(*grad_scale);
  // Every writer stores the same 1.0f, so concurrent stores from several blocks are harmless.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

// ------------------------------------------------------------------------------------------------------ update
template <int G, int S, int O>
__device__ void adam_chunk(const TensorBatch& b, const ChunkRange& r, float scale, const AdamConstants& k) {
  float* param = b.param[r.entry];
  void* exp_avg = b.exp_avg[r.entry];
  void* exp_avg_sq = b.exp_avg_sq[r.entry];
  const void* grad = b.grad[r.entry];
  void* param_out = b.param_out[r.entry];
  std::int64_t begin = r.begin;
  if (b.vectorized[r.entry]) {
    const std::int64_t steps = (r.end - begin) / kVec;
    for (std::int64_t s = threadIdx.x; s < steps; s += blockDim.x) {
      const std::int64_t i = begin + s * kVec;
      float p[kVec], m[kVec], v[kVec], g[kVec];
      load_vec<kF32>(param, i, p);
      load_vec<S>(exp_avg, i, m);
      load_vec<S>(exp_avg_sq, i, v);
      load_vec<G>(grad, i, g);
#pragma unroll
      for (int j = 0; j < kVec; ++j) adam::adam_update(p[j], m[j], v[j], adam::unscale_grad(g[j], scale), k);
      store_vec<kF32>(param, i, p);
      store_vec<S>(exp_avg, i, m);
      store_vec<S>(exp_avg_sq, i, v);
      if constexpr (O == kOutBF16) store_vec<kBF16>(param_out, i, p);
      if constexpr (O == kOutF16) store_vec<kF16>(param_out, i, p);
    }
    begin += steps * kVec;
  }
  // Unaligned tensors and tails: one element per lane (coalesced), kUnroll elements per thread in flight.
  const std::int64_t stride = blockDim.x;
  auto update_one = [&](std::int64_t i, float p, float m, float v, float g) {
    adam::adam_update(p, m, v, adam::unscale_grad(g, scale), k);
    param[i] = p;
    store_one<S>(exp_avg, i, m);
    store_one<S>(exp_avg_sq, i, v);
    if constexpr (O == kOutBF16) store_one<kBF16>(param_out, i, p);
    if constexpr (O == kOutF16) store_one<kF16>(param_out, i, p);
  };
  std::int64_t i = begin + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < r.end; i += kUnroll * stride) {
    float p[kUnroll], m[kUnroll], v[kUnroll], g[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const std::int64_t e = i + j * stride;
      p[j] = param[e];
      m[j] = load_one<S>(exp_avg, e);
      v[j] = load_one<S>(exp_avg_sq, e);
      g[j] = load_one<G>(grad, e);
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) update_one(i + j * stride, p[j], m[j], v[j], g[j]);
  }
  for (; i < r.end; i += stride) {
    update_one(i, param[i], load_one<S>(exp_avg, i), load_one<S>(exp_avg_sq, i), load_one<G>(grad, i));
  }
}

template <int G, int S>
__device__ void dispatch_out(const TensorBatch& b, const ChunkRange& r, float scale, const AdamConstants& k) {
  switch (b.out_type[r.entry]) {
    case kNoOut: adam_chunk<G, S, kNoOut>(b, r, scale, k); break;
    case kOutBF16: adam_chunk<G, S, kOutBF16>(b, r, scale, k); break;
    default: adam_chunk<G, S, kOutF16>(b, r, scale, k); break;
  }
}

template <int G>
__device__ void dispatch_state(const TensorBatch& b, const ChunkRange& r, float scale, const AdamConstants& k) {
  if (b.state_type[r.entry] == kBF16) dispatch_out<G, kBF16>(b, r, scale, k);
  else dispatch_out<G, kF32>(b, r, scale, k);
}

__global__ void __launch_bounds__(kThreads)
    adam_kernel(const ZC_GRID_CONSTANT TensorBatch batch, const ZC_GRID_CONSTANT AdamConstants k,
                const float* grad_scale, float* found_inf) {
  if (*found_inf != 0.0f) return;  // see [Note: no host sync]
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  if (!adam::is_finite_bits(scale)) {  // only without check_finite (the scan flags it first): skip the step
    if (threadIdx.x == 0) *found_inf = 1.0f;  // every block decides alone and stores the same value
    return;
  }
  const ChunkRange r = find_chunk(batch);
  switch (batch.grad_type[r.entry]) {
    case kF32: dispatch_state<kF32>(batch, r, scale, k); break;
    case kBF16: dispatch_state<kBF16>(batch, r, scale, k); break;
    default: dispatch_state<kF16>(batch, r, scale, k); break;
  }
}

// Every tensor empty, so no batch to scan: the multiplier alone decides the flag, as on the CPU.
__global__ void scale_check_kernel(const float* grad_scale, float* found_inf) {
  if (*found_inf == 0.0f && !adam::is_finite_bits(*grad_scale)) *found_inf = 1.0f;
}

// -------------------------------------------------------------------------------------------------------- host
void check_tensor(const at::Tensor& t, const at::Device& device, const char* list, std::size_t i) {
  TORCH_CHECK(t.defined(), kOp, list, "[", i, "] is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, kOp, list, "[", i, "] is a ", t.layout(),
              " tensor; the fused Adam kernel needs dense tensors (densify sparse gradients with .to_dense())");
  TORCH_CHECK(t.device() == device, kOp, list, "[", i, "] is on ", t.device(), " but found_inf is on ", device,
              "; pass every tensor of one call on one GPU");
  TORCH_CHECK(t.is_contiguous(), kOp, list, "[", i, "] (shape ", t.sizes(), ", strides ", t.strides(),
              ") is not contiguous; the update runs in place over flat memory, so keep optimizer tensors "
              "contiguous");
}

void check_flag(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.defined() && t.device() == device && t.layout() == at::kStrided, kOp, name,
              " must be a dense tensor on ", device, " like the params, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, kOp, name,
              " must be a 1-element float32 tensor, got dtype ", t.scalar_type(), " with ", t.numel(),
              " elements");
}

struct Entry {
  float* param;
  void* exp_avg;
  void* exp_avg_sq;
  const void* grad;
  void* param_out;
  std::int64_t numel;
  std::uint8_t grad_type, state_type, out_type;
};

bool vector_friendly(const Entry& e) {
  const std::size_t state_bytes = e.state_type == kF32 ? 4 : 2, grad_bytes = e.grad_type == kF32 ? 4 : 2;
  return aligned(e.param, 16) && aligned(e.exp_avg, kVec * state_bytes) && aligned(e.exp_avg_sq, kVec * state_bytes) &&
         aligned(e.grad, 16) && aligned(e.grad, kVec * grad_bytes) &&  // 16: the scan reads 16 bytes per step
         (e.out_type == kNoOut || aligned(e.param_out, kVec * 2));
}

// Cuts the entries into argument blocks; see [Note: tensor batches].
std::vector<std::pair<TensorBatch, std::int64_t>> make_batches(const std::vector<Entry>& entries) {
  std::vector<std::pair<TensorBatch, std::int64_t>> out;
  for (const Entry& e : entries) {
    const std::int64_t need = (e.numel + kChunk - 1) / kChunk;
    TORCH_CHECK(need <= kMaxChunksPerLaunch, kOp, "a tensor of ", e.numel,
                " elements is larger than one CUDA launch covers; split it");
    if (out.empty() || out.back().first.count == kMaxTensors || out.back().second + need > kMaxChunksPerLaunch) {
      out.emplace_back();
      out.back().first.count = 0;
      out.back().second = 0;
    }
    TensorBatch& b = out.back().first;
    std::int64_t& chunks = out.back().second;
    const int k = b.count++;
    b.param[k] = e.param;
    b.exp_avg[k] = e.exp_avg;
    b.exp_avg_sq[k] = e.exp_avg_sq;
    b.grad[k] = e.grad;
    b.param_out[k] = e.param_out;
    b.numel[k] = e.numel;
    b.first_chunk[k] = static_cast<std::int32_t>(chunks);
    b.grad_type[k] = e.grad_type;
    b.state_type[k] = e.state_type;
    b.out_type[k] = e.out_type;
    b.vectorized[k] = vector_friendly(e);
    chunks += need;
    b.first_chunk[b.count] = static_cast<std::int32_t>(chunks);
  }
  return out;
}

void adam_step_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList grads, at::TensorList params_out, const std::optional<at::Tensor>& grad_scale,
                    const at::Tensor& found_inf, double lr, double beta1, double beta2, double eps,
                    double weight_decay, std::int64_t step, bool adamw, bool check_finite) {
  const std::size_t n = params.size();
  adam_checks::check_list_lengths(kOp, params, exp_avgs, exp_avg_sqs, grads, params_out);
  TORCH_CHECK(found_inf.defined() && found_inf.is_cuda(), kOp, "found_inf must be a CUDA tensor (the flag lives ",
              "on the GPU so the step never syncs with the host), got one on ", found_inf.device());
  const at::Device device = found_inf.device();
  check_flag(found_inf, device, "found_inf");
  const bool has_grad_scale = grad_scale.has_value() && grad_scale->defined();
  if (has_grad_scale) check_flag(*grad_scale, device, "grad_scale");
  adam_checks::check_hyperparameters(kOp, lr, beta1, beta2, eps, weight_decay, step);

  std::vector<Entry> entries;
  entries.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    check_tensor(params[i], device, "params", i);
    check_tensor(exp_avgs[i], device, "exp_avgs", i);
    check_tensor(exp_avg_sqs[i], device, "exp_avg_sqs", i);
    check_tensor(grads[i], device, "grads", i);
    adam_checks::check_tensor_group(kOp, params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], i);
    const std::int64_t numel = params[i].numel();
    const std::uint8_t grad_type = adam_checks::grad_type_code<std::uint8_t>(kOp, grads[i], i, kF32, kBF16, kF16);
    const std::uint8_t state_type =
        adam_checks::state_type_code<std::uint8_t>(kOp, exp_avgs[i], exp_avg_sqs[i], i, kF32, kBF16);
    Entry e{params[i].data_ptr<float>(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), grads[i].data_ptr(),
            nullptr, numel, grad_type, state_type, kNoOut};
    if (!params_out.empty()) {
      check_tensor(params_out[i], device, "params_out", i);
      adam_checks::check_param_out_numel(kOp, params_out[i], numel, i);
      e.out_type = adam_checks::out_type_code<std::uint8_t>(kOp, params_out[i], i, kOutBF16, kOutF16);
      e.param_out = params_out[i].data_ptr();
    }
    if (numel > 0) entries.push_back(e);
  }

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* scale_ptr = has_grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  float* flag = found_inf.data_ptr<float>();
  if (entries.empty()) {
    if (scale_ptr != nullptr) {
      scale_check_kernel<<<1, 1, 0, stream>>>(scale_ptr, flag);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  const auto batches = make_batches(entries);
  if (check_finite) {  // every scan before any update: see [Note: no host sync]
    for (std::size_t b = 0; b < batches.size(); ++b) {
      finite_scan_kernel<<<static_cast<unsigned>(batches[b].second), kThreads, 0, stream>>>(
          batches[b].first, b == 0 ? scale_ptr : nullptr, flag);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const AdamConstants k = adam::make_adam_constants(lr, beta1, beta2, eps, weight_decay, step, adamw);
  for (const auto& [batch, chunks] : batches) {
    adam_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(batch, k, scale_ptr, flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda_adam
}  // namespace zerocore

TORCH_LIBRARY_IMPL(zerocore, CUDA, m) { m.impl("adam_step", &zerocore::cuda_adam::adam_step_cuda); }
