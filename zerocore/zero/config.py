"""ZeroConfig: every option of the ZeRO engine, validated once, frozen afterwards.

Options are checked at construction so a typo fails before any memory is touched or any rank waits on
another. `ZeroConfig.from_deepspeed(dict_or_path)` reads a DeepSpeed JSON config (zerocore/zero/ds_config.py).

>>> cfg = ZeroConfig(stage=2, lr=1e-3, gradient_accumulation_steps=4)
>>> cfg.stage, cfg.gradient_accumulation_steps
(2, 4)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Tuple, Union

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_dtype(value, what: str) -> Optional[torch.dtype]:
    """torch.float32 / bfloat16 / float16, or one of their names ("bf16", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{what}={value} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"{what}={value!r} is not a dtype: use torch.float32, torch.bfloat16, torch.float16 "
                     f"or one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class ZeroConfig:
    """Options of `ZeroOptimizer` (see its docstring for what each one does).

    stage: 1 (partition optimizer state), 2 (also gradients) or 3 (also parameters).
    dtype: compute dtype the model's parameters are cast to; None keeps the model's dtype. fp32 master
        weights are kept (sharded) whenever it is lower precision.
    reduce_dtype: dtype gradients are reduced in; None means the compute dtype.
    bucket_size: target number of elements per unit (one flat buffer, one collective). Stage 3: a module
        becomes its own unit once the parameters it holds (not held by a unit below it) reach this size.
    unit_modules: stage 3: module classes (or class names) each instance of which is one unit, like FSDP's
        wrap policy (e.g. {LlamaDecoderLayer}); None: units by size (bucket_size).
    param_persistence_threshold: stage 3: parameters of at most this many elements stay gathered on every
        rank (DeepSpeed's stage3_param_persistence_threshold): gathering them costs more than it saves.
    reshard_after_forward: stage 3: free a unit's gathered parameters after its forward (gather again for
        backward); False keeps them from forward until their gradients are reduced (FSDP2's option).
    prefetch_bucket_size: stage 3: elements of parameters gathered ahead of use, in the recorded order
        (DeepSpeed's stage3_prefetch_bucket_size).
    max_live_parameters: stage 3: at most this many elements gathered at once beyond the persistent ones
        (DeepSpeed's stage3_max_live_parameters); prefetch stops at it.
    offload_param: stage 3: None, "cpu" (parameter shards in host memory; on a model that lives on the host
        this is where they already are) or "nvme" (with offload_optimizer="nvme": shards read from the NVMe fp32
        masters before each gather, through param_buffer_count host buffers of one sub-group each).
    offload_optimizer: None, "cpu" (fp32 masters and Adam state in host memory, the step on the CPU) or "nvme"
        (the same, but they live in files under nvme_path and pass through buffer_count host buffers of
        sub_group_size elements each; see [Note: NVMe optimizer state] in swapper.py).
    nvme_path: offload_optimizer="nvme": an existing, writable folder on a fast disk (may differ per rank).
    buffer_count: offload_optimizer="nvme": host buffers the step's pipeline reads, updates and writes back
        (DeepSpeed's offload_optimizer.buffer_count, 4); host memory for the state is at most
        buffer_count x sub_group_size x 12 bytes.
    sub_group_size: offload_optimizer="nvme": elements of optimizer state per buffer (DeepSpeed's
        sub_group_size, 1e9; never so large that the buffers would hold more than a quarter of this rank's
        state, so reads, the update and writes overlap; nor more than 2^24).
    loss_scale: fp16 only. None = dynamic (initial 2**initial_scale_power, doubled after loss_scale_window
        clean steps, halved after `hysteresis` consecutive overflows, never below min_loss_scale);
        a number = static scale.
    comm_timeout_s: seconds any collective may take before it raises an error naming the operation.
    sync_module_states: at construction, broadcast rank 0's parameters and buffers to every rank (as DDP does
        and FSDP's option of this name); False instead checks that every rank holds the same values and
        raises naming the first parameter that differs.
    max_inflight_reductions: units whose reduction may be in flight at once while backward runs (each holds a
        unit-sized bucket, or on gloo the unit's big gradient). None: 2 for stages 1 and 2, 1 for stage 3
        (measured on the bench MLP, bench/results/zero.md: stage 3 is as fast with one, whose backward also
        waits for each unit's gather, and 32 MiB per rank lighter; stage 2 is 5-8% slower with one).
    shard_group_size: hierarchical sharding (FSDP2's HSDP, DeepSpeed's MiCS): shard over groups of this many
        consecutive ranks (e.g. the GPUs of one node) and replicate across the groups; each unit is reduced
        within its group and its shard then all-reduced across the groups, gathers stay inside the group, and
        per-rank memory follows the ZeRO formula with this size in place of N. None: shard over all ranks.
    log_interval: every this many optimizer steps rank 0 logs step, loss scale, gradient norm, step time and its
        breakdown, samples/s and per-rank memory through the "zerocore" logger (DeepSpeed's steps_per_print;
        [Note: training log] in stats.py). None: no log (opt.stats() still has the figures).
    host_block_cache: models on the host (CPU training): while this optimizer is open, serve CPU tensors of
        1 MiB and more from zerocore's block cache (zerocore/zero/host_memory.py), which reuses freed blocks by
        size, like torch's CUDA caching allocator does on the GPU. Measured on the bench MLP
        (bench/results/zero.md): 100-140 MiB less peak RSS per rank and no slower (glibc's heap keeps
        autograd's freed gradients resident; fresh mmaps fault them in every step). False leaves torch's allocator alone.
    """
    stage: int = 2
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adamw: bool = True
    dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = None
    bucket_size: int = 5_000_000
    overlap_comm: bool = True
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    loss_scale: Optional[float] = None
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    offload_optimizer: Optional[str] = None
    nvme_path: Optional[str] = None
    buffer_count: int = 4
    param_buffer_count: int = 5
    sub_group_size: int = 1_000_000_000
    comm_timeout_s: float = 1800.0
    max_inflight_reductions: Optional[int] = None
    collective_strategy: Optional[str] = None
    host_block_cache: bool = True
    sync_module_states: bool = True
    unit_modules: Optional[Tuple[str, ...]] = None
    param_persistence_threshold: int = 100_000
    reshard_after_forward: bool = True
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    offload_param: Optional[str] = None
    shard_group_size: Optional[int] = None
    log_interval: Optional[int] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        set_("dtype", parse_dtype(self.dtype, "dtype"))
        set_("reduce_dtype", parse_dtype(self.reduce_dtype, "reduce_dtype"))
        set_("betas", tuple(float(b) for b in self.betas))
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage={self.stage!r} is not supported: use 1 (optimizer state partitioned), 2 "
                             "(also gradients) or 3 (also parameters)")
        if self.unit_modules is not None:
            mods = [self.unit_modules] if isinstance(self.unit_modules, (str, type)) else list(self.unit_modules)
            names = []
            for m in mods:
                if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, torch.nn.Module))):
                    raise ValueError(f"unit_modules holds {m!r}: give torch.nn.Module subclasses or their class "
                                     "names, e.g. unit_modules={LlamaDecoderLayer}")
                names.append(m if isinstance(m, str) else m.__name__)
            set_("unit_modules", tuple(sorted(set(names))))
        for name in ("param_persistence_threshold", "prefetch_bucket_size", "max_live_parameters"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative number of elements")
            set_(name, int(v))
        if self.offload_param not in (None, "none", "cpu", "nvme"):
            raise ValueError(f"offload_param={self.offload_param!r}: use None, 'cpu' or 'nvme'")
        if self.offload_param == "none":
            set_("offload_param", None)
        if self.offload_param == "nvme" and self.offload_optimizer != "nvme":
            raise ValueError("offload_param='nvme' needs offload_optimizer='nvme' too: the parameter shards are read "
                             "from the fp32 masters the NVMe optimizer state keeps (param_swap.py)")
        if self.offload_param is not None and self.stage != 3:
            raise ValueError(f"offload_param={self.offload_param!r} needs stage=3 (only stage 3 partitions "
                             "parameters); use offload_optimizer='cpu' with stages 1 and 2")
        _positive("lr", self.lr, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
        _positive("eps", self.eps)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if int(self.bucket_size) != self.bucket_size or self.bucket_size < 1:
            raise ValueError(f"bucket_size={self.bucket_size!r} must be a positive number of elements, e.g. 10_000_000")
        set_("bucket_size", int(self.bucket_size))
        if int(self.gradient_accumulation_steps) != self.gradient_accumulation_steps or \
                self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps!r} must be an integer >= 1")
        set_("gradient_accumulation_steps", int(self.gradient_accumulation_steps))
        _positive("gradient_clipping", self.gradient_clipping, allow_zero=True)
        if self.loss_scale is not None:
            _positive("loss_scale", self.loss_scale)
        if self.hysteresis < 1 or self.loss_scale_window < 1:
            raise ValueError(f"hysteresis={self.hysteresis} and loss_scale_window={self.loss_scale_window} "
                             "must be >= 1")
        _positive("min_loss_scale", self.min_loss_scale)
        if self.offload_optimizer not in (None, "none", "cpu", "nvme"):
            raise ValueError(f"offload_optimizer={self.offload_optimizer!r}: use None, 'cpu' or 'nvme'")
        if self.offload_optimizer == "none":
            set_("offload_optimizer", None)
        if self.offload_optimizer == "nvme" and not self.nvme_path:
            raise ValueError("offload_optimizer='nvme' needs nvme_path=... (an existing, writable folder on a fast "
                             "disk; DeepSpeed's offload_optimizer.nvme_path)")
        for name in ("buffer_count", "sub_group_size", "param_buffer_count"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
            set_(name, int(v))
        _positive("comm_timeout_s", self.comm_timeout_s)
        if self.log_interval is not None and (isinstance(self.log_interval, bool) or
                                              not isinstance(self.log_interval, int) or self.log_interval < 1):
            raise ValueError(f"log_interval={self.log_interval!r} must be a positive number of steps (or None)")
        k = self.shard_group_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"shard_group_size={k!r} must be a positive integer that divides the number of ranks "
                             "(or None: shard over all ranks)")
        inflight = self.max_inflight_reductions
        if inflight is not None and (isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 1):
            raise ValueError(f"max_inflight_reductions={inflight!r} must be an integer >= 1 (or None: the stage's "
                             "default)")
        for flag in ("host_block_cache", "sync_module_states", "overlap_comm", "adamw", "reshard_after_forward"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.collective_strategy not in (None, "all_reduce", "scatter_gather"):
            raise ValueError(f"collective_strategy={self.collective_strategy!r}: use None (choose per backend), "
                             "'all_reduce' or 'scatter_gather'")

    @property
    def inflight_reductions(self) -> int:
        """max_inflight_reductions, or its default for this stage."""
        return self.max_inflight_reductions or (1 if self.stage == 3 else 2)

    @property
    def is_fp16(self) -> bool:
        return self.dtype == torch.float16

    def updated(self, **changes) -> "ZeroConfig":
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_kwargs(cls, base: Optional["ZeroConfig"] = None, **kwargs) -> "ZeroConfig":
        """Build from keyword options, rejecting unknown names with the list of valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown ZeroOptimizer option(s) {unknown}; valid options: {sorted(known)}")
        return replace(base, **kwargs) if base is not None else cls(**kwargs)

    @classmethod
    def from_deepspeed(cls, config: Union[str, os.PathLike, Mapping[str, Any]], *, world_size: Optional[int] = None,
                       model: Optional[torch.nn.Module] = None,
                       resolved: Optional[Mapping[str, Any]] = None) -> "ZeroConfig":
        """The engine options of a DeepSpeed config (dict or JSON path), read strictly: unknown keys are errors,
        "auto"s are resolved or named, keys zerocore does not implement are warned about. See
        `zerocore.zero.ds_config.parse_deepspeed`, which also returns the scheduler and batch sizes.

        >>> ZeroConfig.from_deepspeed({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}).dtype
        torch.bfloat16
        """
        from .ds_config import parse_deepspeed     # ds_config builds on this module
        return parse_deepspeed(config, world_size=world_size, model=model, resolved=resolved).zero


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")
