"""DeepSpeed JSON config -> validated zerocore settings, read strictly.

Users bring their ds_config.json unchanged: `ZeroOptimizer(model, config="ds_config.json")`. Every key is read
or known:

- An unknown key, at the top level or inside a section zerocore reads, is a ValueError naming its full path and
  the closest known key: `unknown DeepSpeed key 'gradient_cliping' (did you mean 'gradient_clipping'?)`.
  (DeepSpeed's own pydantic sections reject unknown keys too; its top level ignores them.)
- A key zerocore reads is checked and mapped (table below). Unset keys take DeepSpeed's defaults, except where
  the table says why not.
- A key DeepSpeed has that zerocore understands but does not implement is accepted when its value asks for what
  zerocore does anyway, and otherwise listed, with what zerocore does instead, in ONE UserWarning per parse.
  Sections zerocore does not implement (tensorboard, aio, ...) are not read key by key: they are "off" when
  absent, empty, `enabled: false`, or all of their values are false/0/null.
- A few optimizer settings would change the update's math (amsgrad, bias_correction false, maximize,
  max_grad_norm): those are errors, as zerocore's CPUAdam/FusedAdam refuse amsgrad, not warnings.
- `"auto"` (Hugging Face's Trainer writes these) is resolved, in this order: from `resolved` (Trainer arguments
  by dotted path; like the Trainer, a value for a key the file sets differently is an error and one for a key
  the file lacks is not added), from `options` (ZeroOptimizer keyword options; they override the file), from
  `model` (HF's rules: reduce_bucket_size = h*h, stage3_prefetch_bucket_size = int(0.9*h*h),
  stage3_param_persistence_threshold = 10*h, h = model.config.hidden_size or max(model.config.hidden_sizes);
  fp16.enabled / bf16.enabled from the dtype of the model's parameters: all float16 -> fp16, all bfloat16 ->
  bf16, anything else -> off, so "auto" never turns fp16 on for an fp32 model), scheduler.params.warmup_min_lr
  -> 0 and warmup_max_lr -> the optimizer's lr (as the Trainer fills them), and a batch size from the other two
  (DeepSpeed's rule below). Any other "auto" is an error that names every such key path.
- Batch sizes follow DeepSpeed: train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
  * world_size; any two determine the third (one alone: gradient_accumulation_steps = 1); a mismatch is an error
  showing the three numbers and the world size. zerocore loads no data, so a config without batch sizes is fine
  (gradient_accumulation_steps defaults to 1). world_size: the argument, else torch.distributed's when it is
  initialized; without either the check waits (the optimizer passes it) and a derivation that needs it fails.

Keys zerocore reads (unset: DeepSpeed's default unless said):

| DeepSpeed key | zerocore |
|---|---|
| zero_optimization.stage | stage; unset: 2 (DeepSpeed's 0 is plain DDP, not a zerocore stage) |
| zero_optimization.reduce_bucket_size | bucket_size (elements); unset: 5e6, not DeepSpeed's 5e8: a unit is the |
| | grain of overlap and of stage-3 gathering, and 5e8 makes most models one unit |
| zero_optimization.overlap_comm | overlap_comm; unset: true at every stage (DeepSpeed: below stage 3 false, |
| | as its overlap costs 4.5x the bucket memory; zerocore's does not) |
| zero_optimization.sub_group_size | sub_group_size |
| zero_optimization.mics_shard_size | shard_group_size when > 0 (MiCS: shard within groups, replicate across) |
| zero_optimization.stage3_prefetch_bucket_size | prefetch_bucket_size |
| zero_optimization.stage3_param_persistence_threshold | param_persistence_threshold |
| zero_optimization.stage3_max_live_parameters | max_live_parameters |
| zero_optimization.stage3_gather_16bit_weights_on_model_save | DeepSpeedSettings.gather_16bit_weights_on_model_save |
| (stage3_ keys without the prefix: DeepSpeed's aliases) | the same |
| zero_optimization.cpu_offload, cpu_offload_param | deprecated: offload_optimizer / offload_param = "cpu" |
| zero_optimization.stage3_gather_fp16_weights_on_model_save | deprecated: gather_16bit_weights_on_model_save |
| offload_optimizer.{device, nvme_path, buffer_count} | offload_optimizer ("none" -> None), nvme_path, buffer_count |
| offload_param.{device, nvme_path, buffer_count} | offload_param, nvme_path, param_buffer_count; the two nvme_paths |
| | must be equal when both are given (zerocore keeps both in one folder) |
| optimizer.type | Adam or AdamW, any case; other types are refused, named |
| optimizer.params.{lr, betas, eps, weight_decay} | lr, betas, eps, weight_decay; unset weight_decay: 0 (FusedAdam's |
| | and DeepSpeedCPUAdam's), 0.01 with torch_adam and AdamW (torch.optim.AdamW's) |
| optimizer.params.adam_w_mode, torch_adam | adamw = type is AdamW or adam_w_mode (default true): as in DeepSpeed, |
| | "Adam" runs AdamW unless adam_w_mode is false |
| scheduler.{type, params} | DeepSpeedSettings.scheduler: WarmupLR, WarmupDecayLR, WarmupCosineLR (lr_schedules.py) |
| fp16.enabled | dtype = float16; the other fp16 keys apply only then: |
| fp16.loss_scale | loss_scale (0 = dynamic -> None) |
| fp16.{initial_scale_power, loss_scale_window, hysteresis, min_loss_scale} | the fields of these names |
| bf16.enabled (or the older bfloat16.enabled) | dtype = bfloat16; neither: None (the model keeps its dtype) |
| communication_data_type | reduce_dtype |
| gradient_clipping | gradient_clipping; unset: 0, no clipping |
| gradient_accumulation_steps | gradient_accumulation_steps (batch rule above) |
| train_micro_batch_size_per_gpu, train_batch_size | DeepSpeedSettings.micro_batch_size, train_batch_size |
| steps_per_print | log_interval (the training log, stats.py) |
| wall_clock_breakdown | DeepSpeedSettings.wall_clock_breakdown (the log always shows the breakdown) |

Keys zerocore understands but does not implement. "silent when": the values that ask for what zerocore does
(other values go into the warning); "any": always silent, the key changes nothing zerocore does; "never": always
in the warning; "error": other values are refused. `zero.` stands for zero_optimization.

| DeepSpeed key | silent when | what zerocore does instead |
|---|---|---|
| zero.allgather_bucket_size | = bucket size | all-gathers per unit, of bucket_size elements |
| zero.contiguous_gradients | true | always packs a unit's gradients contiguously |
| zero.reduce_scatter | true | reduces per unit (reduce-scatter, or all-reduce where faster) |
| zero.allgather_partitions | true | always all-gathers updated shards |
| zero.round_robin_gradients | false | a unit's gradient shard goes to the host as it is reduced |
| zero.stage3_max_reuse_distance | never | reshard_after_forward decides what stays gathered until backward |
| zero.stage3_model_persistence_threshold | >= sys.maxsize | no model-wide cap on persistent parameters |
| zero.stage3_module_granularity_threshold | 0 | units by bucket_size or unit_modules |
| zero.stage3_use_all_reduce_for_fetch_params | false | one all-gather per unit |
| zero.stage3_allgather_sequential | false | one all-gather per unit |
| zero.stage3_partition_stream_chunk_size | 0 | parameters are partitioned whole |
| zero.load_from_fp32_weights | true | checkpoints restore the fp32 masters |
| zero.ignore_unused_parameters | true | unused parameters are skipped, never an error |
| zero.legacy_stage1, pipeline_loading_checkpoint | false | one implementation |
| zero.zero_hpz_partition_size | 1 | one partition group (no ZeRO++ hpZ) |
| zero.zero_quantized_weights, zero_quantized_gradients | false | communicates in full precision (reduce_dtype) |
| zero.zero_quantized_nontrainable_weights, zeropp_loco_param | false / off | communicates in full precision |
| zero.mics_hierarchical_params_gather | false | gathers inside the shard group in one step |
| zero.leaf_module | off | give unit_modules= to ZeroOptimizer |
| zero.zenflow | off | no ZenFlow |
| zero.use_multi_rank_bucket_allreduce, log_trace_cache_warnings | any | DeepSpeed internals |
| zero.memory_efficient_linear, override_module_apply | any | zerocore patches and replaces no modules |
| zero.elastic_checkpoint | any | checkpoints load at any world size |
| zero.enable_sanity_checks | any | residency transitions are always asserted |
| zero.save_muon_momentum_buffer_in_memory | any | Muon is not an optimizer zerocore runs |
| zero.cpu_offload_use_pin_memory, offload_*.pin_memory | any | host buffers are pinned whenever CUDA is available |
| zero.offload_optimizer.pipeline_read, pipeline_write | true | the NVMe step always overlaps reads and writes |
| zero.offload_optimizer.ratio | 1.0 | offloads all optimizer state |
| zero.offload_optimizer.super_offload | false | no SuperOffload |
| zero.offload_optimizer.fast_init, convert_grad_on_cpu, cpuadam_cores_perc | any | DeepSpeed internals |
| zero.offload_param.buffer_size | never | parameter buffers hold one sub-group (sub_group_size) each |
| zero.offload_param.max_in_cpu | never | no host cache of NVMe parameters beyond the buffers |
| fp16.auto_cast | false | inputs are not cast; the model's parameters are fp16 |
| fp16.consecutive_hysteresis | false | hysteresis is restored when the scale grows |
| fp16.fp16_master_weights_and_grads | false | fp32 master weights and optimizer state |
| bf16.bf16_master_weights_and_grads, bf16_optimizer_states | false | fp32 master weights and optimizer state |
| fp16.fused_mode, bf16.immediate_grad_update | any | DeepSpeed internals |
| bf16.check_grad_overflow | true | a non-finite gradient norm always skips the step |
| optimizer.legacy_fusion, optimizer.params.set_grad_none | any | zerocore's own fused Adam; zero_grad() decides |
| optimizer.params.foreach, fused, capturable, differentiable | any | torch.optim choices; zerocore's own fused Adam |
| optimizer.params.fp32_optimizer_states | true | optimizer state is fp32 |
| optimizer.params.amsgrad, maximize | false, else error | Adam without amsgrad, minimizing the loss |
| optimizer.params.bias_correction | true, else error | Adam with bias correction |
| optimizer.params.max_grad_norm | error | the top-level gradient_clipping (DeepSpeed refuses it too) |
| scheduler.params.last_batch_iteration | -1, else error | resume a schedule from its state_dict |
| prescale_gradients, gradient_predivide_factor | false / 1.0 | gradients summed by the reduction, averaged once |
| gradient_allreduce_op | "mean" | gradients are averaged over ranks |
| sparse_gradients | false | dense gradients |
| managed_gradient_accumulation | true | opt.step() steps at the accumulation boundary |
| sequence_parallel_size | 1 | no sequence parallelism |
| amp, torch_autocast | off | fp16 / bf16 cast the model (no apex, no autocast) |
| activation_checkpointing | off | use torch.utils.checkpoint in the model |
| aio | off | the NVMe swapper's own I/O settings (zerocore.io.AsyncIO) |
| tensorboard, wandb, csv_monitor, comet, comms_logger | off | zerocore logs nothing: read opt.global_grad_norm, |
| flops_profiler, memory_breakdown, timers, dump_state | off | opt.memory_report(), get_last_lr() yourself |
| data_types | off | gradients accumulate in the compute dtype |
| zero_allow_untested_optimizer, zero_force_ds_cpu_optimizer | any | ZeroOptimizer is the optimizer (own CPU Adam) |
| checkpoint, dataloader_drop_last, log_level, vocabulary_size | any | zerocore's checkpoints and logs are its own; it |
| seq_parallel_communication_data_type | any | builds no data loader and no sequence parallelism |
| elasticity, autotuning, sparse_attention, pipeline, hybrid_engine | off | not part of zerocore |
| compile, tensor_parallel, expert_parallel, use_data_before_expert_parallelism | off | not part of zerocore |
| weight_quantization, compression_training, data_efficiency, curriculum_learning | off | not part of zerocore |
| progressive_layer_drop, eigenvalue, quantize_training, disable_allgather | off | not part of zerocore |
| graph_harvesting, nebula, datastates | off | not part of zerocore |

>>> s = parse_deepspeed({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
...                      "zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
...                      "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, world_size=2)
>>> s.zero.stage, s.zero.lr, s.zero.adamw, s.train_batch_size, s.scheduler["type"]
(3, 0.0001, True, 16, 'WarmupLR')
>>> parse_deepspeed({"gradient_cliping": 1.0})
Traceback (most recent call last):
    ...
ValueError: unknown DeepSpeed key 'gradient_cliping' (did you mean 'gradient_clipping'?)
"""
from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .config import ZeroConfig, parse_dtype
from .lr_schedules import SCHEDULERS, build_lr_scheduler, schedule_params, scheduler_class

__all__ = ["DeepSpeedSettings", "parse_deepspeed", "load_deepspeed_json"]


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed config asks of zerocore.

    zero: the engine's options. scheduler: {"type", "params"} (params as given, "auto"s resolved) or None;
    `build_lr_scheduler(opt)` makes it. micro_batch_size / train_batch_size: DeepSpeed's
    train_micro_batch_size_per_gpu / train_batch_size (None when neither the file nor the rule gives them).
    world_size: the one the batch sizes were checked against (None: not checked). not_implemented: the key paths
    of the warning (DeepSpeed keys zerocore does not implement that asked for something it does not do).
    """
    zero: ZeroConfig
    scheduler: Optional[Dict[str, Any]] = None
    micro_batch_size: Optional[int] = None
    train_batch_size: Optional[int] = None
    world_size: Optional[int] = None
    steps_per_print: Optional[int] = None
    wall_clock_breakdown: bool = False
    gather_16bit_weights_on_model_save: bool = False
    not_implemented: Tuple[str, ...] = ()

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer):
        """The scheduler section as a torch LR scheduler on `optimizer`, or None without one."""
        return None if self.scheduler is None else build_lr_scheduler(optimizer, self.scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Readers: check a value and convert it; errors name the key path.

def _int(v, path):
    # JSON writes 1e9 as a float: integral floats are integers here, as in DeepSpeed's pydantic models.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"DeepSpeed key {path}={v!r} must be an integer")
    return int(v)


def _pos_int(v, path):
    v = _int(v, path)
    if v < 1:
        raise ValueError(f"DeepSpeed key {path}={v!r} must be a positive integer")
    return v


def _num(v, path):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"DeepSpeed key {path}={v!r} must be a number")
    return float(v)


def _bool(v, path):
    if not isinstance(v, bool):
        raise ValueError(f"DeepSpeed key {path}={v!r} must be true or false")
    return v


def _opt_bool(v, path):
    return None if v is None else _bool(v, path)


def _opt_pos_int(v, path):
    return None if v is None else _pos_int(v, path)


def _str(v, path):
    if not isinstance(v, str):
        raise ValueError(f"DeepSpeed key {path}={v!r} must be a string")
    return v


def _device(v, path):
    if v is None:
        return None
    if v not in ("none", "cpu", "nvme"):
        raise ValueError(f"DeepSpeed key {path}={v!r}: use 'none', 'cpu' or 'nvme'")
    return None if v == "none" else v


def _betas(v, path):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"DeepSpeed key {path}={v!r} must be two numbers, e.g. [0.9, 0.999]")
    return tuple(_num(b, path) for b in v)


def _dtype(v, path):
    if v is None:
        return None
    try:
        return parse_dtype(v, path)
    except ValueError:
        raise ValueError(f"DeepSpeed key {path}={v!r}: use 'fp32', 'fp16' or 'bf16'") from None


def _any(v, path):
    return v


def _is_off(v) -> bool:
    """A section or flag that asks for nothing: absent, false, 0, empty, `enabled: false`, or all of that."""
    if isinstance(v, Mapping):
        if "enabled" in v:
            return not v["enabled"]
        return all(_is_off(x) for x in v.values())
    return not v


# ---------------------------------------------------------------------------------------------------------------
# The table of keys. A row says where a value goes and how it is read; a row of a key zerocore does not implement
# says which values ask for what zerocore does anyway (silent) and what zerocore does instead (the warning), or
# refuses the others. A nested dict is a section read key by key.

class _Row(NamedTuple):
    dest: Optional[str] = None                   # name in the parsed values; None: not implemented
    read: Callable[[Any, str], Any] = _any
    ok: Optional[Callable[[Any], bool]] = None   # not implemented: the values that ask for what zerocore does
    instead: str = ""                            # not implemented: what zerocore does instead
    refuse: bool = False                         # a value outside `ok` is an error, not a warning


def _to(dest, read=_any) -> _Row:
    return _Row(dest, read)


def _same(ok_value, instead, refuse=False) -> _Row:
    """Not implemented; silent when the value is `ok_value` (what zerocore does)."""
    return _Row(ok=lambda v: _same_value(v, ok_value), instead=instead, refuse=refuse)


def _off(instead) -> _Row:
    """Not implemented; silent when the section or flag is off."""
    return _Row(ok=_is_off, instead=instead)


def _never(instead, refuse=False) -> _Row:
    return _Row(ok=lambda v: False, instead=instead, refuse=refuse)


def _inert(why) -> _Row:
    """Not implemented and changes nothing in zerocore: always silent (`why` is for the reader)."""
    return _Row(ok=lambda v: True, instead=why)


_ONE_ALLGATHER = "one all-gather per unit"
_FULL_PRECISION = "communicates in full precision (reduce_dtype)"
_NO_LOGS = "zerocore logs nothing: read opt.global_grad_norm, opt.memory_report(), get_last_lr()"
_NOT_PART = "not part of zerocore"
_FP32_STATE = "fp32 master weights and optimizer state"
_PIN = "host buffers are pinned whenever CUDA is available"

_OFFLOAD_OPTIMIZER = {
    "device": _to("offload_optimizer.device", _device),
    "nvme_path": _to("offload_optimizer.nvme_path", _str),
    "buffer_count": _to("buffer_count", _pos_int),
    "pipeline_read": _same(True, "the NVMe step always overlaps reads and writes with the update"),
    "pipeline_write": _same(True, "the NVMe step always overlaps reads and writes with the update"),
    "fast_init": _inert("DeepSpeed internal"),
    "ratio": _same(1.0, "offloads all optimizer state"),
    "super_offload": _same(False, "no SuperOffload"),
    "convert_grad_on_cpu": _inert("DeepSpeed internal"),
    "cpuadam_cores_perc": _inert("DeepSpeed internal (SuperOffload)"),
    "pin_memory": _inert(_PIN),
}
_OFFLOAD_PARAM = {
    "device": _to("offload_param.device", _device),
    "nvme_path": _to("offload_param.nvme_path", _str),
    "buffer_count": _to("param_buffer_count", _pos_int),
    "buffer_size": _never("parameter buffers hold one sub-group (sub_group_size elements) each"),
    "max_in_cpu": _never("no host cache of NVMe parameters beyond the buffers"),
    "pin_memory": _inert(_PIN),
}


def _stage3(name: str, row: _Row) -> Dict[str, _Row]:
    """DeepSpeed's stage-3 keys take their `stage3_` prefix or not (pydantic aliases)."""
    return {f"stage3_{name}": row, name: row}


_ZERO = {
    "stage": _to("stage", _int),
    "reduce_bucket_size": _to("bucket_size", _int),
    "overlap_comm": _to("overlap_comm", _opt_bool),
    "sub_group_size": _to("sub_group_size", _int),
    "offload_optimizer": _OFFLOAD_OPTIMIZER,
    "offload_param": _OFFLOAD_PARAM,
    **_stage3("prefetch_bucket_size", _to("prefetch_bucket_size", _int)),
    **_stage3("param_persistence_threshold", _to("param_persistence_threshold", _int)),
    **_stage3("max_live_parameters", _to("max_live_parameters", _int)),
    **_stage3("gather_16bit_weights_on_model_save", _to("gather_16bit", _bool)),
    "stage3_gather_fp16_weights_on_model_save": _to("gather_16bit", _bool),    # deprecated spelling
    "cpu_offload": _to("cpu_offload", _opt_bool),                              # deprecated: offload_optimizer
    "cpu_offload_param": _to("cpu_offload_param", _opt_bool),                  # deprecated: offload_param
    "cpu_offload_use_pin_memory": _inert(_PIN),
    # allgather_bucket_size: silent when it equals the bucket size (checked with the other values, below).
    "allgather_bucket_size": _to("allgather_bucket_size", _int),
    "contiguous_gradients": _same(True, "always packs a unit's gradients contiguously"),
    "reduce_scatter": _same(True, "always reduces per unit (reduce-scatter, or all-reduce where measured faster: "
                                  "collective_strategy)"),
    "allgather_partitions": _same(True, "always all-gathers updated shards"),
    "round_robin_gradients": _same(False, "each unit's gradient shard goes to the host as it is reduced"),
    **_stage3("max_reuse_distance", _never("reshard_after_forward decides whether a unit stays gathered from "
                                            "forward to backward")),
    **_stage3("model_persistence_threshold", _Row(ok=lambda v: isinstance(v, (int, float)) and v >= sys.maxsize,
                                                  instead="no model-wide cap on persistent parameters")),
    **_stage3("module_granularity_threshold", _same(0, "units by bucket_size or unit_modules")),
    **_stage3("use_all_reduce_for_fetch_params", _same(False, _ONE_ALLGATHER)),
    **_stage3("allgather_sequential", _same(False, _ONE_ALLGATHER)),
    **_stage3("partition_stream_chunk_size", _same(0, "parameters are partitioned whole")),
    "load_from_fp32_weights": _same(True, "checkpoints restore the fp32 masters"),
    "ignore_unused_parameters": _same(True, "unused parameters are skipped, never an error"),
    "legacy_stage1": _same(False, "one implementation"),
    "pipeline_loading_checkpoint": _same(False, "one implementation"),
    "zero_hpz_partition_size": _same(1, "one partition group (no ZeRO++ hpZ)"),
    "zero_quantized_weights": _same(False, _FULL_PRECISION),
    "zero_quantized_nontrainable_weights": _same(False, _FULL_PRECISION),
    "zero_quantized_gradients": _same(False, _FULL_PRECISION),
    "zeropp_loco_param": _off(_FULL_PRECISION),
    "mics_shard_size": _to("mics_shard_size", _int),
    "mics_hierarchical_params_gather": _same(False, "gathers inside the shard group in one step"),
    "leaf_module": _off("give unit_modules= to ZeroOptimizer"),
    "zenflow": _off("no ZenFlow"),
    "use_multi_rank_bucket_allreduce": _inert("DeepSpeed internal"),
    "elastic_checkpoint": _inert("checkpoints load at any world size"),
    "memory_efficient_linear": _inert("zerocore replaces no modules"),
    "override_module_apply": _inert("zerocore patches no nn.Module methods"),
    "log_trace_cache_warnings": _inert("DeepSpeed internal"),
    "enable_sanity_checks": _inert("residency transitions are always asserted"),
    "save_muon_momentum_buffer_in_memory": _inert("Muon is not an optimizer zerocore runs"),
}

_OPTIMIZER_PARAMS = {
    "lr": _to("lr", _num),
    "betas": _to("betas", _betas),
    "eps": _to("eps", _num),
    "weight_decay": _to("weight_decay", _num),
    "adam_w_mode": _to("adam_w_mode", _bool),
    "torch_adam": _to("torch_adam", _bool),
    "bias_correction": _same(True, "Adam with bias correction", refuse=True),
    "amsgrad": _same(False, "Adam without amsgrad (zerocore's CPUAdam and FusedAdam refuse it too)", refuse=True),
    "maximize": _same(False, "Adam minimizes the loss", refuse=True),
    "max_grad_norm": _never("use the top-level gradient_clipping (DeepSpeed refuses max_grad_norm too)",
                            refuse=True),
    "fp32_optimizer_states": _same(True, "optimizer state is fp32"),
    "set_grad_none": _inert("zero_grad(set_to_none=...) decides"),
    **{k: _inert("torch.optim implementation choice; zerocore runs its own fused Adam")
       for k in ("foreach", "fused", "capturable", "differentiable")},
}

_FP16 = {
    "enabled": _to("fp16.enabled", _bool),
    "loss_scale": _to("loss_scale", _num),
    "initial_scale_power": _to("initial_scale_power", _int),
    "loss_scale_window": _to("loss_scale_window", _int),
    "hysteresis": _to("hysteresis", _int),
    "min_loss_scale": _to("min_loss_scale", _num),
    "auto_cast": _same(False, "inputs are not cast; the model's parameters are fp16"),
    "consecutive_hysteresis": _same(False, "hysteresis is restored when the scale grows (DeepSpeed's false)"),
    "fp16_master_weights_and_grads": _same(False, _FP32_STATE),
    "fused_mode": _inert("DeepSpeed internal"),
}

_BF16 = {
    "enabled": _to("bf16.enabled", _bool),
    "immediate_grad_update": _inert("DeepSpeed internal"),
    "check_grad_overflow": _same(True, "a non-finite gradient norm always skips the step"),
    "bf16_master_weights_and_grads": _same(False, _FP32_STATE),
    "bf16_optimizer_states": _same(False, _FP32_STATE),
}

_SCHEDULER_PARAMS = object()    # marker: scheduler.params are read per schedule type (lr_schedules.py)

_TOP = {
    "train_batch_size": _to("train_batch_size", _pos_int),
    "train_micro_batch_size_per_gpu": _to("micro_batch_size", _pos_int),
    "gradient_accumulation_steps": _to("gradient_accumulation_steps", _pos_int),
    "gradient_clipping": _to("gradient_clipping", _num),
    "steps_per_print": _to("steps_per_print", _opt_pos_int),
    "wall_clock_breakdown": _to("wall_clock_breakdown", _bool),
    "communication_data_type": _to("reduce_dtype", _dtype),
    "zero_optimization": _ZERO,
    "optimizer": {"type": _to("optimizer.type", _str), "params": _OPTIMIZER_PARAMS,
                  "legacy_fusion": _inert("DeepSpeed internal")},
    "scheduler": {"type": _to("scheduler.type", _str), "params": _SCHEDULER_PARAMS},
    "fp16": _FP16,
    "bf16": _BF16,
    "bfloat16": _BF16,      # DeepSpeed's older name of the bf16 section
    "prescale_gradients": _same(False, "gradients are summed by the reduction and averaged once, in the step"),
    "gradient_predivide_factor": _same(1.0, "gradients are summed by the reduction and averaged once, in the step"),
    "gradient_allreduce_op": _same("mean", "gradients are averaged over ranks"),
    "sparse_gradients": _same(False, "dense gradients"),
    "managed_gradient_accumulation": _same(True, "opt.step() counts micro-steps and steps at the accumulation "
                                                 "boundary"),
    "sequence_parallel_size": _same(1, "no sequence parallelism"),
    "amp": _off("fp16 / bf16 cast the model (no apex)"),
    "torch_autocast": _off("fp16 / bf16 cast the model (no autocast)"),
    "activation_checkpointing": _off("use torch.utils.checkpoint in the model"),
    "aio": _off("the NVMe swapper's own I/O settings (zerocore.io.AsyncIO)"),
    **{k: _off(_NO_LOGS) for k in ("tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
                                   "flops_profiler", "memory_breakdown", "timers", "dump_state")},
    "data_types": _off("gradients accumulate in the compute dtype"),
    "zero_allow_untested_optimizer": _inert("ZeroOptimizer is the optimizer (Adam/AdamW)"),
    "zero_force_ds_cpu_optimizer": _inert("offloaded state is updated by zerocore's own CPU Adam"),
    **{k: _inert("zerocore's checkpoints and logging are its own; it builds no data loader")
       for k in ("checkpoint", "dataloader_drop_last", "log_level", "vocabulary_size",
                 "seq_parallel_communication_data_type")},
    **{k: _off(_NOT_PART) for k in (
        "elasticity", "autotuning", "sparse_attention", "pipeline", "hybrid_engine", "compile", "tensor_parallel",
        "expert_parallel", "use_data_before_expert_parallelism", "weight_quantization", "compression_training",
        "data_efficiency", "curriculum_learning", "progressive_layer_drop", "eigenvalue", "quantize_training",
        "disable_allgather", "graph_harvesting", "nebula", "datastates")},
}

_BATCH = {"train_batch_size": "train_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
          "gradient_accumulation_steps": "gradient_accumulation_steps"}     # key -> dest

# ZeroOptimizer keyword options that fill a DeepSpeed key's "auto" (and override its value).
_OPTION_PATHS = {
    "lr": "optimizer.params.lr", "betas": "optimizer.params.betas", "eps": "optimizer.params.eps",
    "weight_decay": "optimizer.params.weight_decay", "gradient_clipping": "gradient_clipping",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "bucket_size": "zero_optimization.reduce_bucket_size",
    "prefetch_bucket_size": "zero_optimization.stage3_prefetch_bucket_size",
    "param_persistence_threshold": "zero_optimization.stage3_param_persistence_threshold",
    "max_live_parameters": "zero_optimization.stage3_max_live_parameters",
}


# ---------------------------------------------------------------------------------------------------------------

def load_deepspeed_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A DeepSpeed JSON file as a dict; a key given twice in one object is an error (as DeepSpeed's loader)."""
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"{os.fspath(path)}: DeepSpeed key {k!r} is given twice")
            seen[k] = v
        return seen
    with open(path) as f:
        return json.load(f, object_pairs_hook=no_duplicates)


def parse_deepspeed(config: Union[str, os.PathLike, Mapping[str, Any]], *, world_size: Optional[int] = None,
                    model: Optional[torch.nn.Module] = None, resolved: Optional[Mapping[str, Any]] = None,
                    options: Optional[Mapping[str, Any]] = None) -> DeepSpeedSettings:
    """Read a DeepSpeed config (dict or JSON path) strictly; see the module docstring for the rules.

    world_size: data-parallel ranks, for DeepSpeed's batch-size rule (default: torch.distributed's, if initialized).
    model: fills model-derived "auto"s (hidden size, dtype). resolved: Trainer-style values by dotted path
    (e.g. {"optimizer.params.lr": 5e-5, "fp16.enabled": False}). options: ZeroOptimizer keyword options; they
    fill the matching "auto"s and then override the file (ZeroConfig.from_kwargs).
    """
    cfg = copy.deepcopy(dict(config)) if isinstance(config, Mapping) else load_deepspeed_json(config)
    if not isinstance(cfg, dict):
        raise ValueError(f"a DeepSpeed config is a JSON object ({{...}}), got {cfg!r}")
    if "bf16" in cfg and "bfloat16" in cfg:
        raise ValueError("DeepSpeed config has both 'bf16' and 'bfloat16' (its older name): keep one")
    options = dict(options or {})
    _apply_resolved(cfg, dict(resolved or {}))
    _apply_options(cfg, options)
    _fill_autos(cfg, model)

    r = _Reading()
    _walk(cfg, _TOP, "", r)
    if r.unknown:
        raise ValueError("; ".join(r.unknown))
    batch = {path: r.values.get(dest) for path, dest in _BATCH.items()}
    r.autos += _underivable_batch_autos(batch)
    if r.autos:
        raise ValueError(_auto_message(r.autos))
    if r.refused:
        raise ValueError("DeepSpeed config asks for what zerocore refuses to change silently: " + "; ".join(r.refused))
    ws = _world_size(world_size)
    tb, mb, gas = _batch_sizes(batch, ws)

    kw, scheduler = _assemble(r, cfg)
    kw["gradient_accumulation_steps"] = gas
    try:
        zero = ZeroConfig(**kw)
    except ValueError as e:
        raise ValueError(_with_origin(str(e), r.origins)) from None
    zero = ZeroConfig.from_kwargs(zero, **options)

    if r.warned:
        lines = "\n".join(f"  {path}={value!r}: {instead}" for path, value, instead in r.warned)
        warnings.warn("DeepSpeed config keys zerocore understands but does not implement (training goes on without "
                      f"them):\n{lines}", UserWarning, stacklevel=2)
    return DeepSpeedSettings(
        zero=zero, scheduler=scheduler, micro_batch_size=mb, train_batch_size=tb, world_size=ws,
        steps_per_print=r.values.get("steps_per_print"),
        wall_clock_breakdown=r.values.get("wall_clock_breakdown", False),
        gather_16bit_weights_on_model_save=r.values.get("gather_16bit", False),
        not_implemented=tuple(path for path, _, _ in r.warned))


# ---------------------------------------------------------------------------------------------------------------
# "auto" resolution (before the walk, on a copy of the config).

def _parent(cfg: dict, path: str):
    """(dict holding the last segment, last segment), or (None, key) when a section on the way is absent."""
    *sections, key = path.split(".")
    node = cfg
    for s in sections:
        if not isinstance(node.get(s), dict):
            return None, key
        node = node[s]
    return node, key


def _known_path(path: str) -> bool:
    node: Any = _TOP
    for i, seg in enumerate(path.split(".")):
        if node is _SCHEDULER_PARAMS:
            return i == len(path.split(".")) - 1 and any(seg in schedule_params(t) for t in SCHEDULERS)
        if not isinstance(node, dict) or seg not in node:
            return False
        node = node[seg]
        if isinstance(node, _Row) and node.dest is None:
            return True          # a section zerocore does not read key by key: its insides are its own
    return not isinstance(node, dict)


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _apply_resolved(cfg: dict, resolved: Dict[str, Any]) -> None:
    """Trainer-style values: fill "auto"s; a value for a key the file sets differently is an error (as HF's
    Trainer); a value for a key the file does not have is not added (as HF's Trainer)."""
    bad = [p for p in resolved if not _known_path(p)]
    if bad:
        raise ValueError(f"resolved names keys DeepSpeed does not have: {bad}")
    mismatches = []
    for path, value in resolved.items():
        node, key = _parent(cfg, path)
        if node is None or key not in node:
            continue
        if node[key] == "auto":
            node[key] = value
        elif not _same_value(node[key], value):
            mismatches.append(f"{path}={node[key]!r} in the config vs {value!r} resolved")
    if mismatches:
        raise ValueError("DeepSpeed config values differ from the resolved ones: " + "; ".join(mismatches) +
                         ' (set them to "auto" in the config to take the resolved values)')


def _apply_options(cfg: dict, options: Dict[str, Any]) -> None:
    """ZeroOptimizer keyword options override the file. Written over the keys the file has ("auto" or not), they
    fill "auto"s and take part in the batch-size rule; ZeroConfig.from_kwargs applies them all at the end."""
    paths = {_OPTION_PATHS[k]: v for k, v in options.items() if k in _OPTION_PATHS}
    if "betas" in options:
        paths["optimizer.params.betas"] = list(options["betas"])
    if options.get("dtype") is not None:
        dt = parse_dtype(options["dtype"], "dtype")
        paths.update({"fp16.enabled": dt == torch.float16, "bf16.enabled": dt == torch.bfloat16,
                      "bfloat16.enabled": dt == torch.bfloat16})
    for path, value in paths.items():
        for p in dict.fromkeys((path, path.replace("stage3_", ""))):     # DeepSpeed's aliases of stage3_ keys
            node, key = _parent(cfg, p)
            if node is not None and (key in node or p == "gradient_accumulation_steps"):
                node[key] = value


def _hidden_size(model) -> Optional[int]:
    conf = getattr(model, "config", None)
    if getattr(conf, "hidden_size", None) is not None:
        return int(conf.hidden_size)
    if getattr(conf, "hidden_sizes", None):
        return int(max(conf.hidden_sizes))      # HF: with several hidden sizes, the largest
    return None


def _model_dtype(model) -> Optional[torch.dtype]:
    """The one floating dtype of the model's parameters; None when there are none or several."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


_HIDDEN_RULES = {   # key path -> value from the hidden size h, as HF's Trainer fills them
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
    "zero_optimization.param_persistence_threshold": lambda h: 10 * h,
}


def _fill_autos(cfg: dict, model) -> None:
    """The "auto"s that follow from the model or from other values of the config (see the module docstring)."""
    def fill(path, make):
        node, key = _parent(cfg, path)
        if node is not None and node.get(key) == "auto":
            value = make()
            if value is not None:
                node[key] = value

    h = _hidden_size(model) if model is not None else None
    if h is not None:
        for path, rule in _HIDDEN_RULES.items():
            fill(path, lambda rule=rule: rule(h))
    if model is not None and getattr(model, "parameters", None) is not None:
        # Without a Trainer, precision follows the model's own dtype: never fp16 for an fp32 model.
        dt = _model_dtype(model)
        fill("fp16.enabled", lambda: dt == torch.float16)
        fill("bf16.enabled", lambda: dt == torch.bfloat16)
        fill("bfloat16.enabled", lambda: dt == torch.bfloat16)
    fill("scheduler.params.warmup_min_lr", lambda: 0)         # not a Trainer argument: HF fills 0
    lr_node, _ = _parent(cfg, "optimizer.params.lr")
    lr = lr_node.get("lr") if lr_node is not None else None
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        fill("scheduler.params.warmup_max_lr", lambda: lr)    # HF fills it with the learning rate


def _underivable_batch_autos(batch: Dict[str, Any]) -> List[str]:
    """The "auto" batch sizes DeepSpeed's rule cannot derive from the other two (an absent
    gradient_accumulation_steps counts as 1)."""
    def known(k):
        return batch[k] not in (None, "auto") or (k == "gradient_accumulation_steps" and batch[k] is None)
    return [k for k in _BATCH if batch[k] == "auto" and not all(known(o) for o in _BATCH if o != k)]


def _auto_message(paths: List[str]) -> str:
    hints = []
    if any(p in _HIDDEN_RULES for p in paths):
        hints.append("model= (a model with config.hidden_size) fills the bucket sizes")
    if any(p.endswith(".enabled") for p in paths):
        hints.append("model= fills fp16/bf16.enabled from the model's dtype")
    hints.append(f"resolved={{{paths[0]!r}: ...}} or a value in the config fills any of them")
    return (f'DeepSpeed config has "auto" values nothing resolves: {", ".join(paths)} ({"; ".join(hints)})')


# ---------------------------------------------------------------------------------------------------------------
# The walk over the table.

@dataclass
class _Reading:
    """What the walk over the table found."""
    values: Dict[str, Any] = field(default_factory=dict)     # dest -> value (batch sizes may be "auto")
    origins: Dict[str, str] = field(default_factory=dict)    # dest -> its key path, for ZeroConfig's errors
    unknown: List[str] = field(default_factory=list)
    autos: List[str] = field(default_factory=list)           # key paths of unresolved "auto"s
    warned: List[Tuple[str, Any, str]] = field(default_factory=list)   # (path, value, what zerocore does)
    refused: List[str] = field(default_factory=list)


def _unknown(path: str, key: str, prefix: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown DeepSpeed key '{path}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else "")


def _section(value, path: str) -> Optional[Mapping]:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"DeepSpeed key {path} must be a section ({{...}}), got {value!r}")
    return value


def _walk(node: Mapping, schema: dict, prefix: str, r: _Reading) -> None:
    for key, value in node.items():
        path, row = prefix + key, schema.get(key)
        if row is None:
            r.unknown.append(_unknown(path, key, prefix, schema))
        elif row is _SCHEDULER_PARAMS:
            _walk_scheduler_params(node.get("type"), _section(value, path) or {}, path, r)
        elif isinstance(row, dict):                      # a section read key by key; null = absent
            _walk(_section(value, path) or {}, row, path + ".", r)
        elif value == "auto" and path in _BATCH:         # DeepSpeed's rule derives it, after the walk
            r.values[row.dest] = "auto"
        elif value == "auto":
            r.autos.append(path)
        elif row.dest is not None:
            r.values[row.dest], r.origins[row.dest] = row.read(value, path), path
        elif not row.ok(value):
            if row.refuse:
                r.refused.append(f"{path}={value!r}: {row.instead}")
            else:
                r.warned.append((path, value, row.instead))


def _walk_scheduler_params(type_name, params: Mapping, path: str, r: _Reading) -> None:
    if type_name is None:
        raise ValueError("DeepSpeed key scheduler.type is missing: name WarmupLR, WarmupDecayLR or WarmupCosineLR")
    known = schedule_params(type_name)       # refuses other types, naming them
    for key, value in params.items():
        if key not in known:
            r.unknown.append(_unknown(f"{path}.{key}", key, path + ".", known))
        elif value == "auto":
            r.autos.append(f"{path}.{key}")
    r.values["scheduler.params"] = dict(params)


# ---------------------------------------------------------------------------------------------------------------
# From the read values to ZeroConfig's keywords.

def _world_size(world_size: Optional[int]) -> Optional[int]:
    if world_size is not None:
        return _pos_int(world_size, "world_size")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return None


def _batch_sizes(batch: Dict[str, Any], ws: Optional[int]) -> Tuple[Optional[int], Optional[int], int]:
    """DeepSpeed's rule (runtime/config.py _set_batch_related_parameters, then its check); "auto" = not given."""
    tb, mb, gas = (None if batch[k] == "auto" else batch[k] for k in _BATCH)
    derived = ""
    if tb is not None and mb is not None and gas is not None:
        pass
    elif ws is None and (tb is not None or batch["train_batch_size"] == "auto"):
        # Every derivation that involves train_batch_size needs the world size.
        raise ValueError(f"DeepSpeed's batch sizes (train_batch_size={tb}, train_micro_batch_size_per_gpu={mb}, "
                         f"gradient_accumulation_steps={gas}) need the world size to derive the rest: pass "
                         "world_size= or parse after torch.distributed.init_process_group")
    elif tb is not None and mb is not None:
        gas, derived = tb // mb // ws, f" (gradient_accumulation_steps derived as {tb} // {mb} // {ws})"
    elif tb is not None and gas is not None:
        mb, derived = tb // ws // gas, f" (train_micro_batch_size_per_gpu derived as {tb} // {ws} // {gas})"
    elif mb is not None and gas is not None:
        tb = mb * gas * ws if ws is not None else None
    elif tb is not None:
        gas, mb = 1, tb // ws
        derived = f" (gradient_accumulation_steps 1, train_micro_batch_size_per_gpu derived as {tb} // {ws})"
    elif mb is not None:
        gas, tb = 1, mb * ws if ws is not None else None
    else:
        gas = gas or 1          # zerocore loads no data: no batch size is needed
    if ws is not None and tb is not None and (mb * gas * ws != tb or min(tb, mb, gas) < 1):
        raise ValueError(f"DeepSpeed batch sizes do not agree: train_batch_size={tb} != "
                         f"train_micro_batch_size_per_gpu={mb} * gradient_accumulation_steps={gas} * "
                         f"world_size={ws}{derived}")
    return tb, mb, gas


def _assemble(r: _Reading, cfg: Mapping) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """ZeroConfig's keywords and the scheduler spec, from what the walk read."""
    values, origins = r.values, r.origins
    kw = {f: values[f] for f in ("stage", "bucket_size", "sub_group_size", "prefetch_bucket_size",
                                 "param_persistence_threshold", "max_live_parameters", "buffer_count",
                                 "param_buffer_count", "gradient_clipping", "reduce_dtype", "lr", "betas", "eps",
                                 "weight_decay")
          if values.get(f) is not None}
    if values.get("overlap_comm") is not None:
        kw["overlap_comm"] = values["overlap_comm"]
    if values.get("steps_per_print") is not None:
        kw["log_interval"] = values["steps_per_print"]
    if values.get("mics_shard_size", -1) > 0:           # DeepSpeed's -1 (or 0): no MiCS
        kw["shard_group_size"] = values["mics_shard_size"]
    if values.get("stage") == 0:
        raise ValueError("DeepSpeed key zero_optimization.stage=0 (no ZeRO: plain data parallelism) is not a "
                         "zerocore stage: use 1, 2 or 3, or torch DDP")

    # allgather_bucket_size: zerocore all-gathers whole units, so only a value equal to the unit size is what it does.
    bucket = kw.get("bucket_size", ZeroConfig.bucket_size)
    if values.get("allgather_bucket_size") not in (None, bucket):
        r.warned.append(("zero_optimization.allgather_bucket_size", values["allgather_bucket_size"],
                       f"all-gathers per unit, of bucket_size={bucket} elements (reduce_bucket_size)"))

    # Precision: fp16 settings apply only to fp16 (a loss_scale would otherwise scale bf16 training too).
    fp16, bf16 = values.get("fp16.enabled", False), values.get("bf16.enabled", False)
    if fp16 and bf16:
        raise ValueError("DeepSpeed keys fp16.enabled and bf16.enabled are both true: choose one")
    if fp16:
        kw["dtype"] = torch.float16
        for f in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
            if f in values:
                kw[f] = values[f]
        if values.get("loss_scale"):                 # 0 (DeepSpeed's default) = dynamic
            kw["loss_scale"] = values["loss_scale"]
        elif values.get("loss_scale", 0) < 0:
            raise ValueError(f"DeepSpeed key fp16.loss_scale={values['loss_scale']} must be >= 0 (0 = dynamic)")
    elif bf16:
        kw["dtype"] = torch.bfloat16

    # Offload: the deprecated booleans stand for device "cpu"; one NVMe folder serves both.
    oo = values.get("offload_optimizer.device") or ("cpu" if values.get("cpu_offload") else None)
    op = values.get("offload_param.device") or ("cpu" if values.get("cpu_offload_param") else None)
    kw["offload_optimizer"], kw["offload_param"] = oo, op
    po, pp = values.get("offload_optimizer.nvme_path"), values.get("offload_param.nvme_path")
    if po and pp and os.path.normpath(po) != os.path.normpath(pp):
        raise ValueError(f"DeepSpeed keys zero_optimization.offload_optimizer.nvme_path={po!r} and "
                         f"zero_optimization.offload_param.nvme_path={pp!r} differ: zerocore keeps parameters and "
                         "optimizer state in one NVMe folder, give the same path")
    if "nvme" in (oo, op):
        kw["nvme_path"] = po or pp
        origins["nvme_path"] = origins.get("offload_optimizer.nvme_path", "zero_optimization.offload_optimizer."
                                                                            "nvme_path")
    origins["offload_optimizer"] = "zero_optimization.offload_optimizer.device"
    origins["offload_param"] = "zero_optimization.offload_param.device"

    # Optimizer: DeepSpeed runs AdamW for type "AdamW", and for "Adam" unless adam_w_mode is false.
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        otype = values.get("optimizer.type")
        if otype is None:
            raise ValueError("DeepSpeed key optimizer.type is missing: name Adam or AdamW")
        if otype.lower() not in ("adam", "adamw"):
            raise ValueError(f"optimizer type {otype!r} (DeepSpeed key optimizer.type) is not supported: "
                             "ZeroOptimizer runs Adam/AdamW")
        kw["adamw"] = otype.lower() == "adamw" or values.get("adam_w_mode", True)
        if "weight_decay" not in kw and values.get("torch_adam") and kw["adamw"]:
            kw["weight_decay"] = 0.01          # torch.optim.AdamW's default, which DeepSpeed's torch_adam path gets

    scheduler = None
    if cfg.get("scheduler") is not None:
        type_name = values.get("scheduler.type")
        if type_name is None:
            raise ValueError("DeepSpeed key scheduler.type is missing: name WarmupLR, WarmupDecayLR or "
                             "WarmupCosineLR")
        cls = scheduler_class(type_name)         # refuses other types, naming them
        scheduler = {"type": cls.__name__, "params": dict(values.get("scheduler.params", {}))}
        _check_scheduler(scheduler, kw.get("lr", ZeroConfig.lr))
    return kw, scheduler


def _check_scheduler(spec: Dict[str, Any], lr: float) -> None:
    """Build the schedule once on a throwaway optimizer, so a bad value fails at parse time, named."""
    missing = [f"scheduler.params.{n}" for n, d in schedule_params(spec["type"]).items()
               if d is inspect.Parameter.empty and n not in spec["params"]]
    if missing:
        raise ValueError(f"DeepSpeed {spec['type']} needs {', '.join(missing)}")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    try:
        build_lr_scheduler(probe, spec)
    except ValueError as e:
        raise ValueError(f"DeepSpeed key scheduler.params: {e}") from None


def _with_origin(message: str, origins: Dict[str, str]) -> str:
    """ZeroConfig's errors name its fields; add the DeepSpeed key each named field came from."""
    named = [path for f, path in origins.items() if message.startswith(f"{f}=") or f" {f}=" in message]
    return f"{message} (DeepSpeed key {', '.join(dict.fromkeys(named))})" if named else message
