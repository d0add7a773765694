"""FusedAdam: a drop-in torch.optim.AdamW / Adam whose step is zerocore's multi-tensor fused kernel.

fp32, bf16 and fp16 parameters may share one optimizer. fp32 params are updated in place. bf16 / fp16 params get
an fp32 master copy in their state (`master_param`); the kernel updates the master, m and v in fp32 and writes the
rounded result into the low-precision param in the same pass, so a mixed-precision step reads and writes each byte
once (28 bytes per bf16 param). The state uses torch's keys (`step`, `exp_avg`, `exp_avg_sq`, plus
`master_param`) and the param groups torch's hyperparameter keys, so checkpoints move between FusedAdam and
torch.optim.AdamW in both directions (loading keeps the fp32 state fp32 instead of casting it to the param dtype,
as torch would).

[Note: skipped steps without a host sync]
With check_finite (the default), a step whose gradients hold an inf or nan changes nothing: the kernel finds it and
skips on the GPU, without the host waiting for the answer. torch.amp.GradScaler works the same way (FusedAdam sets
`_step_supports_amp_scaling`, so the scaler hands over its scale and inf flag instead of unscaling the grads
itself). Like torch's fused AdamW, a skipped step must not count: the per-param `step` counters are corrected
lazily, from a copy of the flag that is read at the next `step()` or `state_dict()`, when the GPU has long finished.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from ..ops import adam as _adam_ops  # looked up at call time, so tests can count the kernel calls
from ._adam_args import adam_defaults, check_adam_args, fill_group_defaults

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class FusedAdam(torch.optim.Optimizer):
    """Adam / AdamW for CUDA parameters (CPU parameters work too, through the CPU kernel), with
    torch.optim.AdamW's arguments plus `adamw_mode`, `state_dtype` and `check_finite`.

    Args:
        params: iterable of parameters or param-group dicts; fp32, bf16 or fp16, contiguous, any mix.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW (same defaults).
        adamw_mode: True (default) applies decoupled weight decay like torch.optim.AdamW; False adds
            `weight_decay * param` to the gradient like torch.optim.Adam (torch's `decoupled_weight_decay` key).
        state_dtype: torch.float32 (default) or torch.bfloat16 for exp_avg / exp_avg_sq.
        check_finite: skip the whole step (on the GPU, no host sync) when any gradient holds inf or nan; see
            `skipped_steps`. With a torch.amp.GradScaler the scaler's own inf check is used instead.

    Example (needs a GPU):
        >>> import torch
        >>> from zerocore.optim import FusedAdam
        >>> model = torch.nn.Linear(4, 2).cuda().bfloat16()          # doctest: +SKIP
        >>> opt = FusedAdam(model.parameters(), lr=1e-3)             # doctest: +SKIP
        >>> model(torch.randn(8, 4, device="cuda", dtype=torch.bfloat16)).sum().backward()  # doctest: +SKIP
        >>> opt.step()                                               # doctest: +SKIP
        >>> sorted(opt.state[model.weight])                          # doctest: +SKIP
        ['exp_avg', 'exp_avg_sq', 'master_param', 'step']
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale / found_inf instead of unscaling

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, adamw_mode: bool = True, *, amsgrad: bool = False,
                 maximize: bool = False, state_dtype: torch.dtype = torch.float32, check_finite: bool = True):
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
            raise ValueError("FusedAdam takes lr as a float or a CPU tensor (a GPU tensor would make every step "
                             "wait for the GPU to read it)")
        check_adam_args("FusedAdam", lr, betas, eps, weight_decay, amsgrad, maximize, state_dtype)
        self.state_dtype = state_dtype
        self.check_finite = bool(check_finite)
        self._pending_flags: List[Tuple[torch.Tensor, Optional[torch.cuda.Event], List[torch.Tensor]]] = []
        self._skipped_steps = 0
        self._incoming_state: Dict[torch.Tensor, dict] = {}
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, adamw_mode))
        self.register_load_state_dict_pre_hook(FusedAdam._keep_incoming_state)
        self.register_load_state_dict_post_hook(FusedAdam._restore_state_dtypes)
        self.register_state_dict_pre_hook(FusedAdam._resolve_skipped_steps)

    def __setstate__(self, state):
        super().__setstate__(state)
        fill_group_defaults(self)

    # ------------------------------------------------------------------------------------------------ the step
    @property
    def skipped_steps(self) -> int:
        """How many step() calls were skipped for inf/nan gradients so far (waits for the GPU to tell)."""
        self._resolve_skipped_steps()
        return self._skipped_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._resolve_skipped_steps()
        calls = self._collect_calls()
        if not calls:
            return loss
        devices = {device for (device, *_), _ in calls.items()}
        scale_of = self._grad_multipliers(devices)
        flags, check_finite = self._found_inf_flags(devices, calls)
        stepped: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
        for (device, _, low_precision, step), entries in calls.items():
            group = entries[0][0]
            beta1, beta2 = group["betas"]
            _adam_ops.adam_step(
                [e[1] for e in entries], [e[2] for e in entries], [e[3] for e in entries], [e[4] for e in entries],
                params_out=[e[5] for e in entries] if low_precision else (),
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step=step, adamw=group["decoupled_weight_decay"],
                grad_scale=scale_of.get(device), found_inf=flags[device], check_finite=check_finite[device])
            stepped[device] += [e[6] for e in entries]
        self._remember_flags(flags, stepped)
        return loss

    def _collect_calls(self) -> Dict[tuple, list]:
        """Advances the step counters and groups the tensors into kernel calls: one per (device, param group,
        fp32 or low-precision params, step count). Entries: (group, master, exp_avg, exp_avg_sq, grad, param,
        step tensor)."""
        calls: Dict[tuple, list] = defaultdict(list)
        for index, group in enumerate(self.param_groups):
            if group.get("amsgrad") or group.get("maximize"):
                raise RuntimeError("FusedAdam does not implement amsgrad or maximize (set by a loaded state dict?); "
                                   "use torch.optim.AdamW for them")
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_param(p)
                self._init_state(p)
            steps = [self.state[p]["step"] for p in params]
            if not steps:
                continue
            torch._foreach_add_(steps, 1)
            for p, step in zip(params, torch.stack(steps).tolist()):
                state = self.state[p]
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                low = p.dtype in _LOW_PRECISION
                master = state["master_param"] if low else p
                calls[(p.device, index, low, int(step))].append(
                    (group, master, state["exp_avg"], state["exp_avg_sq"], grad, p, state["step"]))
        return calls

    def _check_param(self, p: torch.Tensor) -> None:
        if p.dtype not in (torch.float32,) + _LOW_PRECISION:
            raise RuntimeError(f"FusedAdam updates float32, bfloat16 or float16 parameters; got {p.dtype}")
        if not p.is_contiguous():
            raise RuntimeError(f"FusedAdam needs contiguous parameters (the kernel updates flat memory); got one "
                               f"of shape {tuple(p.shape)} with strides {p.stride()}")
        if p.grad.is_sparse:
            raise RuntimeError("FusedAdam does not support sparse gradients; use torch.optim.SparseAdam")
        if p.grad.device != p.device:
            raise RuntimeError(f"a gradient is on {p.grad.device} but its parameter on {p.device}")
        if p.grad.shape != p.shape:
            raise RuntimeError(f"a gradient has shape {tuple(p.grad.shape)} but its parameter {tuple(p.shape)}")

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch's non-fused layout: a CPU scalar
        elif not torch.is_tensor(state["step"]) or state["step"].device.type != "cpu":
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)  # old or fused layouts
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
        if p.dtype in _LOW_PRECISION and "master_param" not in state:
            # The first step (or a checkpoint from torch, which has no master) starts from the param itself.
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    def _grad_multipliers(self, devices) -> Dict[torch.device, torch.Tensor]:
        """GradScaler's `grad_scale` is the loss scale; the kernel multiplies by its reciprocal (computed on the
        device, as GradScaler.unscale_ does, so nothing waits)."""
        loss_scale = getattr(self, "grad_scale", None)
        if loss_scale is None:
            return {}
        inverse = loss_scale.double().reciprocal().float().reshape(1)
        return {d: inverse.to(d, non_blocking=True) for d in devices}

    def _found_inf_flags(self, devices, calls) -> Tuple[Dict[torch.device, torch.Tensor], Dict[torch.device, bool]]:
        """One flag per device. GradScaler's flag has checked every gradient already; otherwise each device gets a
        fresh flag, and a device with several kernel calls checks all its gradients first (a call only scans its
        own, and a later call's inf must stop the earlier calls too)."""
        scaler_flag = getattr(self, "found_inf", None)
        if scaler_flag is not None:
            flags = {d: scaler_flag.to(d, torch.float32, non_blocking=True).reshape(1).clone() for d in devices}
            return flags, {d: False for d in devices}
        flags = {d: torch.zeros(1, dtype=torch.float32, device=d) for d in devices}
        check = {d: self.check_finite for d in devices}
        if self.check_finite:
            per_device = defaultdict(list)
            for (device, *_), entries in calls.items():
                per_device[device].append(entries)
            for device, groups_of_entries in per_device.items():
                if len(groups_of_entries) > 1:
                    _flag_non_finite([e[4] for entries in groups_of_entries for e in entries], flags[device])
                    check[device] = False  # the kernel still skips when the flag is set
        return flags, check

    # -------------------------------------------------------------------------------------- skipped-step counts
    def _remember_flags(self, flags, stepped) -> None:
        for device, flag in flags.items():
            if device.type == "cuda":
                host = torch.empty(1, dtype=torch.float32, pin_memory=True)
                host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self._pending_flags.append((host, event, stepped[device]))
            else:
                self._pending_flags.append((flag, None, stepped[device]))

    def _resolve_skipped_steps(self, *_args) -> None:
        """Takes back the step count of a skipped step; see [Note: skipped steps without a host sync]. The pending
        flags all come from the last step() (one per device)."""
        skipped = False
        for host, event, steps in self._pending_flags:
            if event is not None:
                event.synchronize()  # long done by now in a training loop: the next forward ran after it
            if host.item() != 0.0:
                torch._foreach_sub_(steps, 1)
                skipped = True
        self._skipped_steps += int(skipped)
        self._pending_flags.clear()

    # --------------------------------------------------------------------------------------- state dict dtypes
    @staticmethod
    def _keep_incoming_state(optimizer: "FusedAdam", state_dict: dict):
        """torch's load_state_dict casts every state tensor to its param's dtype, which would round the fp32
        master and moments of a bf16 param to bf16. Keep the originals, keyed by param, to restore after."""
        optimizer._resolve_skipped_steps()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer._incoming_state = {
            p: dict(state_dict["state"][i]) for i, p in zip(saved_ids, params) if i in state_dict["state"]}
        return None

    @staticmethod
    def _restore_state_dtypes(optimizer: "FusedAdam") -> None:
        for p, saved in optimizer._incoming_state.items():
            state = optimizer.state[p]
            for key, value in saved.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":  # our layout: a CPU float32 scalar (torch's fused AdamW keeps it on the GPU)
                    state[key] = value.detach().to("cpu", torch.float32, copy=True).reshape(())
                elif key in ("exp_avg", "exp_avg_sq", "master_param"):
                    dtype = torch.float32 if key == "master_param" else optimizer.state_dtype
                    state[key] = value.detach().to(p.device, dtype, copy=True).contiguous()
        optimizer._incoming_state = {}


def _flag_non_finite(grads: List[torch.Tensor], flag: torch.Tensor) -> None:
    """flag = 1 if any grad holds inf or nan, computed on the device (reads each grad once, writes nothing else)."""
    by_dtype = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for same_dtype in by_dtype.values():
        # max |g| per tensor is inf or nan exactly when the tensor holds one (nan propagates through max)
        norms = torch._foreach_norm(same_dtype, float("inf"))
        finite = torch.stack(norms).float().isfinite().all()
        flag.copy_(torch.where(finite, flag, torch.ones_like(flag)))
