"""Constructor arguments shared by zerocore's Adam optimizers (CPUAdam, FusedAdam): the same checks with the same
messages (naming the optimizer), and torch.optim.AdamW's param-group keys, so state dicts load into either
optimizer and into torch's unchanged.

>>> import torch
>>> check_adam_args("CPUAdam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
...                 maximize=False, state_dtype=torch.float32)
>>> adam_defaults(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adamw_mode=True)["decoupled_weight_decay"]
True
"""
from __future__ import annotations

from typing import Tuple

import torch

STATE_DTYPES = (torch.float32, torch.bfloat16)  # dtypes of exp_avg / exp_avg_sq the kernels take


def check_adam_args(optimizer_name: str, lr, betas: Tuple[float, float], eps: float, weight_decay: float,
                    amsgrad: bool, maximize: bool, state_dtype: torch.dtype) -> None:
    """Raises ValueError for a hyperparameter out of range or an option the fused kernels do not implement."""
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    if amsgrad:
        raise ValueError(f"{optimizer_name} does not implement amsgrad; use torch.optim.AdamW(amsgrad=True)")
    if maximize:
        raise ValueError(f"{optimizer_name} does not implement maximize; negate the loss instead")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")


def adam_defaults(lr, betas: Tuple[float, float], eps: float, weight_decay: float, adamw_mode: bool) -> dict:
    """The param-group defaults under torch.optim.AdamW's keys (adamw_mode is its `decoupled_weight_decay`)."""
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                foreach=None, capturable=False, differentiable=False, fused=None,
                decoupled_weight_decay=bool(adamw_mode))


def fill_group_defaults(optimizer: torch.optim.Optimizer) -> None:
    """After __setstate__: param groups saved by torch or older versions lack some keys; take the defaults."""
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)
