// Scalar Adam / AdamW math shared by the CPU kernels (csrc/adam/cpu_adam_kernels.cpp) and the CUDA kernel
// (csrc/adam/cuda_adam.cu). It is the single definition of the update: the SIMD paths repeat exactly these
// operations lane by lane, so scalar and SIMD results agree bit for bit, and the CUDA kernel gets the same
// rounding as the CPU.
//
// [Note: explicit fma]
// Every multiply-add is written as zc_fma(...) and every other product stands alone, so no compiler is free
// to contract a*b+c differently on different paths (GCC contracts under -ffp-contract=fast, nvcc by default).
// Division and square root use the correctly rounded CUDA intrinsics so --use_fast_math does not change them.
//
// Usage (host or device):
//   zerocore::adam::AdamConstants k = zerocore::adam::make_adam_constants(lr, beta1, beta2, eps, wd, step, adamw);
//   float g = zerocore::adam::unscale_grad(grad_as_float, grad_scale);
//   zerocore::adam::adam_update(param, exp_avg, exp_avg_sq, g, k);   // updates the three in place
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ZC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZC_HOST_DEVICE inline
#endif

namespace zerocore {
namespace adam {

ZC_HOST_DEVICE float zc_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

ZC_HOST_DEVICE float zc_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ZC_HOST_DEVICE float zc_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// Per-step constants, derived once per call in double precision (as torch's fused Adam does) and then
// rounded to float, the precision the update runs in.
struct AdamConstants {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float weight_decay;            // Adam: L2 coefficient added into the gradient; unused by AdamW
  float decay;                   // AdamW: 1 - lr * weight_decay multiplies the param; 1 for Adam
  float neg_step_size;           // -lr / (1 - beta1^step)
  float inv_sqrt_bias_correction2;  // 1 / sqrt(1 - beta2^step)
  bool adamw;
};

// Host-side: step counts from 1 (the first update is step 1). Validation of the arguments' ranges is the
// caller's job (the op checks them and names the bad one); this only does arithmetic.
inline AdamConstants make_adam_constants(double lr, double beta1, double beta2, double eps, double weight_decay,
                                         int64_t step, bool adamw) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamConstants k;
  k.beta1 = static_cast<float>(beta1);
  k.beta2 = static_cast<float>(beta2);
  k.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  k.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  k.eps = static_cast<float>(eps);
  k.weight_decay = static_cast<float>(weight_decay);
  k.decay = adamw ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  k.neg_step_size = static_cast<float>(-lr / bias_correction1);
  k.inv_sqrt_bias_correction2 = static_cast<float>(1.0 / std::sqrt(bias_correction2));
  k.adamw = adamw;
  return k;
}

// The gradient multiplier is 1 / (loss_scale * clip_coef); 1 when there is neither.
ZC_HOST_DEVICE float unscale_grad(float grad, float grad_scale) { return grad * grad_scale; }

// One element of Adam (L2 into the gradient) or AdamW (decoupled decay), with bias correction:
//   Adam:  g += wd * p             AdamW: p *= 1 - lr * wd
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g * g
//   p += -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
// The SIMD paths in cpu_adam_kernels.cpp perform these same operations in this same order.
ZC_HOST_DEVICE void adam_update(float& param, float& exp_avg, float& exp_avg_sq, float grad,
                                const AdamConstants& k) {
  float p = param;
  float g = grad;
  if (k.adamw) {
    p = p * k.decay;
  } else {
    g = zc_fma(k.weight_decay, p, g);
  }
  const float m = zc_fma(k.beta1, exp_avg, k.one_minus_beta1 * g);
  const float v = zc_fma(k.beta2, exp_avg_sq, k.one_minus_beta2 * (g * g));
  const float denom = zc_fma(zc_sqrt(v), k.inv_sqrt_bias_correction2, k.eps);
  p = zc_fma(k.neg_step_size, zc_div(m, denom), p);
  param = p;
  exp_avg = m;
  exp_avg_sq = v;
}

// True when x is neither inf nor nan (works under -ffast-math too, unlike std::isfinite).
ZC_HOST_DEVICE bool is_finite_bits(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
#endif
  return (bits & 0x7f800000u) != 0x7f800000u;
}

}  // namespace adam
}  // namespace zerocore
