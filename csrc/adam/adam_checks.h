// Argument checks shared by the CPU (cpu_adam_op.cpp) and CUDA (cuda_adam.cu) kernels of zerocore::adam_step, so
// both devices reject the same bad input with the same message (each passes its own op prefix). Device and layout
// checks stay with each kernel, since they name the device. Header-only torch glue.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace zerocore {
namespace adam_checks {

inline void check_list_lengths(const char* op, at::TensorList params, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList grads, at::TensorList params_out) {
  const std::size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && grads.size() == n, op,
              "params, exp_avgs, exp_avg_sqs and grads must have one entry per tensor, got lengths ", n, ", ",
              exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", grads.size());
  TORCH_CHECK(params_out.empty() || params_out.size() == n, op, "params_out must be empty or have ", n,
              " entries (one per param), got ", params_out.size());
}

inline void check_hyperparameters(const char* op, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, std::int64_t step) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, op, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, "eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, op,
              "weight_decay must be a finite number >= 0, got ", weight_decay);
  TORCH_CHECK(step >= 1, op, "step must be >= 1 (the first update is step 1, as in torch.optim), got ", step);
}

// params[i] is an fp32 master weight and exp_avgs[i], exp_avg_sqs[i], grads[i] have its element count.
inline void check_tensor_group(const char* op, const at::Tensor& param, const at::Tensor& exp_avg,
                               const at::Tensor& exp_avg_sq, const at::Tensor& grad, std::size_t i) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, op, "params[", i, "] has dtype ", param.scalar_type(),
              "; params are the fp32 master weights and must be float32 (write a low-precision copy through "
              "params_out)");
  const std::int64_t numel = param.numel();
  const at::Tensor* others[] = {&exp_avg, &exp_avg_sq, &grad};
  const char* names[] = {"exp_avgs", "exp_avg_sqs", "grads"};
  for (int j = 0; j < 3; ++j) {
    TORCH_CHECK(others[j]->numel() == numel, op, names[j], "[", i, "] has ", others[j]->numel(),
                " elements but params[", i, "] has ", numel, " (shapes ", others[j]->sizes(), " vs ",
                param.sizes(), ")");
  }
}

inline void check_param_out_numel(const char* op, const at::Tensor& param_out, std::int64_t numel, std::size_t i) {
  TORCH_CHECK(param_out.numel() == numel, op, "params_out[", i, "] has ", param_out.numel(),
              " elements but params[", i, "] has ", numel);
}

// The dtype checks return the caller's own code for the dtype (the CPU and CUDA kernels encode types differently).
template <class Code>
Code grad_type_code(const char* op, const at::Tensor& grad, std::size_t i, Code f32, Code bf16, Code f16) {
  switch (grad.scalar_type()) {
    case at::kFloat: return f32;
    case at::kBFloat16: return bf16;
    case at::kHalf: return f16;
    default: break;
  }
  TORCH_CHECK(false, op, "grads[", i, "] has dtype ", grad.scalar_type(),
              "; gradients must be float32, bfloat16 or float16");
}

template <class Code>
Code state_type_code(const char* op, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, std::size_t i,
                     Code f32, Code bf16) {
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), op, "exp_avgs[", i, "] is ",
              exp_avg.scalar_type(), " but exp_avg_sqs[", i, "] is ", exp_avg_sq.scalar_type(),
              "; the two optimizer states of a tensor must share a dtype");
  if (exp_avg.scalar_type() == at::kFloat) return f32;
  TORCH_CHECK(exp_avg.scalar_type() == at::kBFloat16, op, "exp_avgs[", i, "] has dtype ", exp_avg.scalar_type(),
              "; optimizer state must be float32 or bfloat16 (the opt-in lower-precision state)");
  return bf16;
}

template <class Code>
Code out_type_code(const char* op, const at::Tensor& param_out, std::size_t i, Code bf16, Code f16) {
  if (param_out.scalar_type() == at::kBFloat16) return bf16;
  TORCH_CHECK(param_out.scalar_type() == at::kHalf, op, "params_out[", i, "] has dtype ", param_out.scalar_type(),
              "; params_out holds the low-precision copy and must be bfloat16 or float16");
  return f16;
}

}  // namespace adam_checks
}  // namespace zerocore
