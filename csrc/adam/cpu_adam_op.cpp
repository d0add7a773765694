// Torch glue of the fused Adam op: defines the schema of zerocore::adam_step (the CUDA library adds its kernel
// under the same name) and the CPU kernel, which validates the tensors, groups them by element types and hands
// raw pointers to the torch-free kernels in cpu_adam_kernels.cpp. Semantics: zerocore/ops/adam.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "adam_checks.h"
#include "cpu_adam_kernels.h"

namespace {

using zerocore::adam::AdamBatch;
using zerocore::adam::AdamKernelOptions;
using zerocore::adam::AdamTensor;
using zerocore::adam::ElemType;

constexpr const char* kOp = "zerocore.adam_step: ";

void check_cpu_dense_contiguous(const at::Tensor& t, const char* list, size_t i) {
  TORCH_CHECK(t.defined(), kOp, list, "[", i, "] is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, kOp, list, "[", i, "] is a ", t.layout(),
              " tensor; the fused Adam kernel needs dense tensors (sparse gradients are not supported: "
              "use torch.optim.SparseAdam, or densify with .to_dense())");
  TORCH_CHECK(t.device().is_cpu(), kOp, list, "[", i, "] is on ", t.device(),
              " but another tensor of the call is on the CPU; pass every tensor on one device (CUDA "
              "tensors go to the cuda_adam kernel when all of them are on the GPU)");
  TORCH_CHECK(t.is_contiguous(), kOp, list, "[", i, "] (shape ", t.sizes(), ", strides ", t.strides(),
              ") is not contiguous; the update runs in place over flat memory, so keep the optimizer's "
              "tensors contiguous (e.g. create them with .contiguous() and update that buffer)");
}

void check_flag_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, kOp, name,
              " must be a dense CPU tensor like the others, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, kOp, name,
              " must be a 1-element float32 tensor, got dtype ", t.scalar_type(), " with ", t.numel(),
              " elements");
}

// Batch index for a combination of element types: grad (3) x state (2) x params_out (none, bf16, fp16).
int batch_slot(ElemType grad, ElemType state, bool has_out, ElemType out) {
  const int out_code = has_out ? (out == ElemType::kBFloat16 ? 1 : 2) : 0;
  return (static_cast<int>(grad) * 2 + (state == ElemType::kBFloat16 ? 1 : 0)) * 3 + out_code;
}

void adam_step_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList grads, at::TensorList params_out, const std::optional<at::Tensor>& grad_scale,
                   const at::Tensor& found_inf, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, bool adamw, bool check_finite) {
  const size_t n = params.size();
  zerocore::adam_checks::check_list_lengths(kOp, params, exp_avgs, exp_avg_sqs, grads, params_out);
  check_flag_tensor(found_inf, "found_inf");
  zerocore::adam_checks::check_hyperparameters(kOp, lr, beta1, beta2, eps, weight_decay, step);
  const bool has_grad_scale = grad_scale.has_value() && grad_scale->defined();
  if (has_grad_scale) check_flag_tensor(*grad_scale, "grad_scale");

  std::array<AdamBatch, 18> slots;
  for (size_t i = 0; i < n; ++i) {
    check_cpu_dense_contiguous(params[i], "params", i);
    check_cpu_dense_contiguous(exp_avgs[i], "exp_avgs", i);
    check_cpu_dense_contiguous(exp_avg_sqs[i], "exp_avg_sqs", i);
    check_cpu_dense_contiguous(grads[i], "grads", i);
    zerocore::adam_checks::check_tensor_group(kOp, params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], i);
    const int64_t numel = params[i].numel();
    const ElemType grad_type = zerocore::adam_checks::grad_type_code(kOp, grads[i], i, ElemType::kFloat32,
                                                                     ElemType::kBFloat16, ElemType::kFloat16);
    const ElemType state_type = zerocore::adam_checks::state_type_code(kOp, exp_avgs[i], exp_avg_sqs[i], i,
                                                                       ElemType::kFloat32, ElemType::kBFloat16);
    const bool has_out = !params_out.empty();
    ElemType out_type = ElemType::kBFloat16;
    AdamTensor t;
    if (has_out) {
      check_cpu_dense_contiguous(params_out[i], "params_out", i);
      out_type = zerocore::adam_checks::out_type_code(kOp, params_out[i], i, ElemType::kBFloat16, ElemType::kFloat16);
      zerocore::adam_checks::check_param_out_numel(kOp, params_out[i], numel, i);
      t.param_out = params_out[i].data_ptr();
    }
    t.param = params[i].data_ptr<float>();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.numel = numel;
    AdamBatch& batch = slots[batch_slot(grad_type, state_type, has_out, out_type)];
    batch.grad_type = grad_type;
    batch.state_type = state_type;
    batch.has_param_out = has_out;
    batch.param_out_type = out_type;
    if (numel > 0) batch.tensors.push_back(t);
  }

  float* flag = found_inf.data_ptr<float>();
  if (*flag != 0.0f) return;  // an earlier step of this iteration already found inf/nan: change nothing
  const float scale = has_grad_scale ? grad_scale->data_ptr<float>()[0] : 1.0f;
  if (!std::isfinite(scale)) {
    TORCH_CHECK(check_finite, kOp, "grad_scale is ", scale, "; with check_finite=False the step would write ",
                "inf/nan into every param. Pass a finite multiplier (1 / (loss_scale * clip_coef))");
    *flag = 1.0f;
    return;
  }

  std::vector<AdamBatch> batches;
  for (AdamBatch& b : slots)
    if (!b.tensors.empty()) batches.push_back(std::move(b));
  if (batches.empty()) return;

  AdamKernelOptions opts;
  opts.num_threads = at::get_num_threads();  // honours torch.set_num_threads
  opts.simd = zerocore::selected_simd();      // honours ZEROCORE_SIMD
  opts.check_finite = check_finite;
  const auto constants = zerocore::adam::make_adam_constants(lr, beta1, beta2, eps, weight_decay, step, adamw);
  if (!zerocore::adam::fused_adam_step(batches, constants, scale, opts)) *flag = 1.0f;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zerocore, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] grads, "
      "Tensor(d!)[] params_out, Tensor? grad_scale, Tensor(e!) found_inf, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step, bool adamw, bool check_finite) -> ()");
  // Which SIMD path adam_step runs now ("avx512", "avx2" or "scalar"): ZEROCORE_SIMD and the CPU decide.
  m.def("adam_simd_level() -> str", []() -> std::string {
    return zerocore::simd_name(zerocore::adam::effective_simd(zerocore::selected_simd()));
  });
}

TORCH_LIBRARY_IMPL(zerocore, CPU, m) { m.impl("adam_step", &adam_step_cpu); }
