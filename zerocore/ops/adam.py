"""Python face of the fused Adam op (`torch.ops.zerocore.adam_step`): one call updates many tensors.

The CPU library (`cpu_adam`) defines the op and its CPU kernel; the CUDA library (`cuda_adam`) adds the CUDA
kernel under the same name, so the dispatcher picks by the tensors' device.

Schema (defined in csrc/adam/cpu_adam_op.cpp):
    adam_step(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] grads,
              Tensor(d!)[] params_out, Tensor? grad_scale, Tensor(e!) found_inf,
              float lr, float beta1, float beta2, float eps, float weight_decay, int step,
              bool adamw, bool check_finite) -> ()

Semantics, per tensor i (all contiguous, same device, params[i] fp32, numel equal across the four lists):
    g = float(grads[i]) * grad_scale            # grads fp32 / bf16 / fp16; grad_scale a 1-element fp32 tensor
    if not adamw: g += weight_decay * p          # Adam: L2 penalty into the gradient
    else:         p *= 1 - lr * weight_decay     # AdamW: decoupled decay
    m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
    p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    params_out[i] = cast(p)                      # when params_out is non-empty: bf16 (round-to-nearest-even) / fp16
exp_avgs / exp_avg_sqs are fp32, or bf16 (opt-in lower-precision state). If found_inf is non-zero on entry the
call changes nothing. If check_finite, any inf/nan in grads sets found_inf to 1 and the call changes nothing;
a non-finite grad_scale counts as inf/nan too (and is an error when check_finite is False; on CUDA, where raising
would need a host sync, it sets found_inf and the call changes nothing instead).
Bad input (tensors on another device, sparse or non-contiguous tensors, wrong dtypes, mismatched numel or
list lengths, out-of-range hyperparameters) raises before anything is written.

CPU kernel: AVX-512 / AVX2 / scalar chosen at run time (env ZEROCORE_SIMD=avx512|avx2|scalar forces one, see
`simd_level()`), over torch's intra-op threads (torch.set_num_threads); all paths give bit-identical results.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .builder import load


def _ensure_loaded(device: torch.device) -> None:
    load("cuda_adam" if device.type == "cuda" else "cpu_adam")


def simd_level() -> str:
    """The SIMD path the CPU kernel runs now: "avx512", "avx2" or "scalar" (honours ZEROCORE_SIMD).

    >>> import zerocore.ops.adam as A
    >>> A.simd_level() in ("avx512", "avx2", "scalar")   # doctest: +SKIP
    True
    """
    load("cpu_adam")
    return torch.ops.zerocore.adam_simd_level()


def _check_same_device_dense(device: torch.device, named_lists) -> None:
    # The dispatcher would pick a kernel by the "highest" device among all tensors and fail with a message
    # that names no tensor; checking here names the culprit.
    for list_name, tensors in named_lists:
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"adam_step: {list_name}[{i}] is on {t.device} but params[0] is on {device}; "
                                 "all tensors of one call must be on the same device")
            if t.layout != torch.strided:
                raise ValueError(f"adam_step: {list_name}[{i}] is a {t.layout} tensor; the fused Adam kernel needs "
                                 "dense tensors (sparse gradients: use torch.optim.SparseAdam or .to_dense())")


def adam_step(params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
              exp_avg_sqs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int, adamw: bool = True,
              params_out: Sequence[torch.Tensor] = (), grad_scale: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None, check_finite: bool = True) -> torch.Tensor:
    """Run one fused Adam/AdamW step over all given tensors; returns found_inf (1-element fp32 tensor).

    >>> import torch, zerocore.ops.adam as A
    >>> p, g = torch.randn(10), torch.randn(10)
    >>> m, v = torch.zeros(10), torch.zeros(10)
    >>> flag = A.adam_step([p], [m], [v], [g], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
    ...                    weight_decay=0.01, step=1)   # doctest: +SKIP
    >>> bool(flag)                                      # doctest: +SKIP
    False
    """
    if len(params) == 0:
        return found_inf if found_inf is not None else torch.zeros(1)
    device = params[0].device
    extra = [("grad_scale", [grad_scale])] if grad_scale is not None else []
    extra += [("found_inf", [found_inf])] if found_inf is not None else []
    _check_same_device_dense(device, [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                                      ("grads", grads), ("params_out", params_out)] + extra)
    _ensure_loaded(device)
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    torch.ops.zerocore.adam_step(list(params), list(exp_avgs), list(exp_avg_sqs), list(grads), list(params_out),
                                 grad_scale, found_inf, float(lr), float(beta1), float(beta2), float(eps),
                                 float(weight_decay), int(step), bool(adamw), bool(check_finite))
    return found_inf
