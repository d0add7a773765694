"""DeepSpeed's learning-rate schedules as torch LR schedulers: WarmupLR, WarmupDecayLR, WarmupCosineLR.

A DeepSpeed config's `scheduler` section ({"type": ..., "params": {...}}) becomes one of these with
`build_lr_scheduler(optimizer, spec)`. They are `torch.optim.lr_scheduler.LRScheduler`s (state_dict,
get_last_lr, any torch optimizer) that follow DeepSpeed's formulas (deepspeed/runtime/lr_schedules.py), with
W = max(2, warmup_num_steps), T = total_num_steps and i = DeepSpeed's `last_batch_iteration`:

- warmup fraction f(i) for i < W: log(i + 1) / log(W) ("log", the default) or i / W ("linear").
- WarmupLR: lr = min_lr + (max_lr - min_lr) * g, g = f(i) during warmup and 1 after. Absolute lrs:
  `warmup_max_lr` replaces the optimizer's lr (default: the lr of the optimizer's first param group).
- WarmupDecayLR: the same warmup, then g = max(0, (T - i) / max(1, T - W)): a linear decay that reaches
  `warmup_min_lr` (0 by default) at step T. Its `warmup_max_lr` default is 0.001, as in DeepSpeed.
- WarmupCosineLR: a ratio of each group's own lr (the optimizer's lr is scaled, not replaced):
  warmup_min_ratio + (1 - warmup_min_ratio) * f(i) during warmup, then, with p = min(1, (i - W + 1) / max(1, T - W)),
  max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2).
- Before the first step (i = -1) WarmupLR/WarmupDecayLR give min_lr and WarmupCosineLR gives 0, as DeepSpeed does.

[Note: step counting] DeepSpeed's schedulers start at last_batch_iteration = -1 and its engine calls
`scheduler.step()` after every optimizer step, so optimizer step k (from 0) runs at DeepSpeed's lr for
iteration k - 1. A torch scheduler steps once when it is built (last_epoch = 0). Here DeepSpeed's iteration is
`last_epoch - 1`: after n calls of step() the lr is DeepSpeed's at iteration n - 1, so every optimizer step runs
at the lr it would run at under DeepSpeed, and `last_epoch` counts scheduler steps like any torch scheduler.

>>> import torch
>>> opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
>>> sched = build_lr_scheduler(opt, {"type": "WarmupLR", "params": {"warmup_max_lr": 0.1,
...                                  "warmup_num_steps": 4, "warmup_type": "linear"}})
>>> lrs = []
>>> for _ in range(6):
...     lrs.append(round(opt.param_groups[0]["lr"], 6))
...     opt.step(); sched.step()
>>> lrs
[0.0, 0.0, 0.025, 0.05, 0.075, 0.1]
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Mapping, Sequence, Union

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "SCHEDULERS", "build_lr_scheduler", "schedule_params",
           "scheduler_class"]

_WARMUP_TYPES = ("log", "linear")
Number = Union[int, float]


def _check_steps(cls: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{cls}: {name}={value!r} must be a positive integer")
    return int(value)


def _check_ratio(cls: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value:
        raise ValueError(f"{cls}: {name}={value!r} must be a non-negative number")
    return float(value)


def _per_group(cls: str, name: str, value, optimizer) -> List[float]:
    """One value per param group: a number for all of them, or a list with one per group (as DeepSpeed)."""
    n = len(optimizer.param_groups)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{cls}: {name} has {len(values)} values for {n} param groups")
    return [_check_ratio(cls, name, v) for v in values]


class _Warmup(LRScheduler):
    """The warmup part shared by the three schedules; subclasses give `_lrs(i)` for DeepSpeed's iteration i."""

    def __init__(self, optimizer, warmup_num_steps: int, warmup_type: str, last_epoch: int):
        cls = type(self).__name__
        # DeepSpeed rejects a non-positive count and then uses at least 2 (log(1) = 0 would divide by zero).
        self.warmup_num_steps = max(2, _check_steps(cls, "warmup_num_steps", warmup_num_steps))
        if warmup_type not in _WARMUP_TYPES:
            # DeepSpeed falls back to "log" with a log line; a typo here should not change the schedule silently.
            raise ValueError(f"{cls}: warmup_type={warmup_type!r}: use 'log' or 'linear'")
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        super().__init__(optimizer, last_epoch)

    def _warmup_fraction(self, i: int) -> float:
        if self.warmup_type == "log":
            return self.inverse_log_warm_up * math.log(i + 1)     # the same operations, in DeepSpeed's order
        return i / self.warmup_num_steps

    def get_lr(self) -> List[float]:
        return self._lrs(self.last_epoch - 1)    # DeepSpeed's iteration: see [Note: step counting]

    def _lrs(self, i: int) -> List[float]:
        raise NotImplementedError


class WarmupLR(_Warmup):
    """Warm up from warmup_min_lr to warmup_max_lr over warmup_num_steps steps, then stay at warmup_max_lr.

    warmup_max_lr=None takes the lr of the optimizer's first param group (DeepSpeed's default).
    """

    def __init__(self, optimizer, warmup_min_lr: Union[Number, Sequence[Number]] = 0.0,
                 warmup_max_lr: Union[None, Number, Sequence[Number]] = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1):
        cls = type(self).__name__
        if warmup_max_lr is None:
            warmup_max_lr = float(optimizer.param_groups[0]["lr"])
        self.min_lrs = _per_group(cls, "warmup_min_lr", warmup_min_lr, optimizer)
        self.max_lrs = _per_group(cls, "warmup_max_lr", warmup_max_lr, optimizer)
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_epoch)

    def _gamma(self, i: int) -> float:
        return self._warmup_fraction(i) if i < self.warmup_num_steps else 1.0

    def _lrs(self, i: int) -> List[float]:
        if i < 0:
            return list(self.min_lrs)
        gamma = self._gamma(i)
        return [low + delta * gamma for low, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay from warmup_max_lr at step warmup_num_steps to warmup_min_lr at total_num_steps."""

    def __init__(self, optimizer, total_num_steps: int, warmup_min_lr: Union[Number, Sequence[Number]] = 0.0,
                 warmup_max_lr: Union[Number, Sequence[Number]] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1):
        self.total_num_steps = _check_steps(type(self).__name__, "total_num_steps", total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_epoch)

    def _gamma(self, i: int) -> float:
        if i < self.warmup_num_steps:
            return self._warmup_fraction(i)
        return max(0.0, float(self.total_num_steps - i) / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Warmup):
    """Scale each group's lr by a ratio: warm up from warmup_min_ratio to 1, then a cosine down to cos_min_ratio."""

    def __init__(self, optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 0.0001, warmup_type: str = "log", last_epoch: int = -1):
        cls = type(self).__name__
        self.total_num_steps = _check_steps(cls, "total_num_steps", total_num_steps)
        self.warmup_min_ratio = _check_ratio(cls, "warmup_min_ratio", warmup_min_ratio)
        self.cos_min_ratio = _check_ratio(cls, "cos_min_ratio", cos_min_ratio)
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_epoch)

    def lr_ratio(self, i: int) -> float:
        """The factor on each group's lr at DeepSpeed's iteration i."""
        if i < 0:
            return 0.0
        if i < self.warmup_num_steps:
            return self.warmup_min_ratio + self._warmup_fraction(i) * (1.0 - self.warmup_min_ratio)
        # Clamped, so the ratio stays at cos_min_ratio past total_num_steps instead of rising again (DeepSpeed does
        # the same since it fixed exactly that).
        progress = min(1.0, (i - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)

    def _lrs(self, i: int) -> List[float]:
        ratio = self.lr_ratio(i)
        return [base * ratio for base in self.base_lrs]     # base_lrs: each group's lr when the schedule began


SCHEDULERS: Dict[str, type] = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR,
                               "WarmupCosineLR": WarmupCosineLR}


def schedule_params(type_name: str) -> Dict[str, Any]:
    """The params a schedule type takes (name -> default; inspect.Parameter.empty when required), as in a
    DeepSpeed config: DeepSpeed's `last_batch_iteration` included, torch's `last_epoch` not.

    >>> sorted(schedule_params("WarmupDecayLR"))
    ['last_batch_iteration', 'total_num_steps', 'warmup_max_lr', 'warmup_min_lr', 'warmup_num_steps', 'warmup_type']
    """
    cls = scheduler_class(type_name)
    params = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
              if name not in ("self", "optimizer", "last_epoch")}
    params["last_batch_iteration"] = -1
    return params


def scheduler_class(type_name) -> type:
    """The schedule class a DeepSpeed scheduler type names (any case); other types are refused, named."""
    by_lower = {name.lower(): cls for name, cls in SCHEDULERS.items()}
    if not isinstance(type_name, str) or type_name.lower() not in by_lower:
        raise ValueError(f"scheduler type {type_name!r} is not supported: use one of {sorted(SCHEDULERS)} "
                         "(or build any torch LR scheduler on the optimizer yourself)")
    return by_lower[type_name.lower()]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any]) -> LRScheduler:
    """The torch LR scheduler a DeepSpeed `scheduler` section describes: {"type": name, "params": {...}}.

    The type is matched without regard to case. It sets the optimizer's lrs at once (to DeepSpeed's values before
    the first step); call its step() after each optimizer step. `last_batch_iteration` may only be -1: to resume,
    load the scheduler's state_dict instead.

    >>> import torch
    >>> opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.5)
    >>> type(build_lr_scheduler(opt, {"type": "warmupcosinelr", "params": {"total_num_steps": 10}})).__name__
    'WarmupCosineLR'
    >>> opt.param_groups[0]["lr"]      # DeepSpeed's WarmupCosineLR gives 0 before the first step
    0.0
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a scheduler spec is {{'type': ..., 'params': {{...}}}}, got {spec!r}")
    cls = scheduler_class(spec["type"])
    params = dict(spec.get("params") or {})
    known = schedule_params(cls.__name__)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {unknown}; its params: {sorted(known)}")
    missing = sorted(name for name, default in known.items()
                     if default is inspect.Parameter.empty and name not in params)
    if missing:
        raise ValueError(f"{cls.__name__} needs {missing}")
    start = params.pop("last_batch_iteration", -1)
    if start != -1:
        raise ValueError(f"{cls.__name__}: last_batch_iteration={start!r}: only -1 (a new schedule) is taken; "
                         "to resume, build the scheduler and load its state_dict")
    return cls(optimizer, **params)
