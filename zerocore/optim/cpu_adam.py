"""CPUAdam: a drop-in replacement for torch.optim.AdamW / Adam whose step is zerocore's SIMD CPU kernel.

All parameters of a param group go through one call of the fused kernel (`zerocore.ops.adam.adam_step`), which
spreads them over torch's intra-op threads in cache-sized tiles. The state is stored under torch's keys
(`step`, `exp_avg`, `exp_avg_sq`) and the param groups carry torch's hyperparameter keys, so a checkpoint moves
between CPUAdam and torch.optim.AdamW in both directions, and lr schedulers work unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..ops import adam as _adam_ops  # looked up at call time, so tests can count the kernel calls
from ._adam_args import adam_defaults, check_adam_args, fill_group_defaults


class CPUAdam(torch.optim.Optimizer):
    """Adam / AdamW on CPU tensors, with torch.optim.AdamW's arguments plus `adamw_mode`.

    Args:
        params: iterable of parameters or param-group dicts (fp32, CPU, contiguous).
        lr, betas, eps, weight_decay: as in torch.optim.AdamW (same defaults).
        adamw_mode: True (default) applies decoupled weight decay like torch.optim.AdamW; False adds
            `weight_decay * param` to the gradient like torch.optim.Adam. Stored in the param group as
            torch's `decoupled_weight_decay` key.
        state_dtype: torch.float32 (default), or torch.bfloat16 to keep exp_avg / exp_avg_sq in bf16 and halve
            their memory and traffic; the update still runs in fp32, only the stored state is rounded (see
            tests/test_optim_cpu_adam.py for the error this adds).

    Example:
        >>> import torch
        >>> from zerocore.optim import CPUAdam
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = CPUAdam(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, adamw_mode: bool = True, *, amsgrad: bool = False,
                 maximize: bool = False, state_dtype: torch.dtype = torch.float32):
        check_adam_args("CPUAdam", lr, betas, eps, weight_decay, amsgrad, maximize, state_dtype)
        self.state_dtype = state_dtype
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, adamw_mode))

    def __setstate__(self, state):
        super().__setstate__(state)
        fill_group_defaults(self)

    def _check_param(self, p: torch.Tensor) -> None:
        if p.device.type != "cpu":
            raise RuntimeError(f"CPUAdam updates CPU tensors; got a parameter on {p.device}. Use "
                               "torch.optim.AdamW(fused=True) on the GPU, or zerocore.ZeroOptimizer with "
                               "optimizer offload to run the step on the CPU")
        if p.dtype != torch.float32:
            raise RuntimeError(f"CPUAdam needs float32 parameters (the master weights); got {p.dtype}. Keep an "
                               "fp32 copy for the optimizer (zerocore.ZeroOptimizer does this for you)")
        if p.grad.is_sparse:
            raise RuntimeError("CPUAdam does not support sparse gradients; use torch.optim.SparseAdam")
        if p.grad.dtype != p.dtype:
            raise RuntimeError(f"gradient dtype {p.grad.dtype} differs from the parameter's {p.dtype}")

    def _state_for(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype,
                                                   memory_format=torch.contiguous_format)
        else:
            # A loaded checkpoint comes in the param's dtype (torch casts it so); the kernel wants state_dtype.
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].dtype != self.state_dtype or not state[key].is_contiguous():
                    state[key] = state[key].to(self.state_dtype).contiguous()
            if not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step (one fused kernel call per param group and step count)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Params that skipped earlier steps (no grad) have a smaller step count, hence their own call.
            by_step: Dict[int, Tuple[List[torch.Tensor], ...]] = {}
            step_counters = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_param(p)
                state = self._state_for(p)
                step_counters.append(state["step"])
                lists = by_step.setdefault(int(state["step"].item()) + 1, ([], [], [], []))
                for lst, t in zip(lists, (p, state["exp_avg"], state["exp_avg_sq"], p.grad)):
                    lst.append(t)
            if not step_counters:
                continue
            torch._foreach_add_(step_counters, 1.0)
            beta1, beta2 = group["betas"]
            for step, (params, exp_avgs, exp_avg_sqs, grads) in by_step.items():
                _adam_ops.adam_step(params, exp_avgs, exp_avg_sqs, grads, lr=float(group["lr"]), beta1=float(beta1),
                                    beta2=float(beta2), eps=float(group["eps"]),
                                    weight_decay=float(group["weight_decay"]), step=step,
                                    adamw=bool(group["decoupled_weight_decay"]), check_finite=False)
        return loss
