"""ZeroOptimizer: ZeRO stage 1, 2 and 3 data parallelism for any PyTorch model (Adam / AdamW).

This file wires the engine's parts and holds the public API; each part has one job:
    config.py        the options, validated once
    param_groups.py  torch-style parameter groups resolved to names
    consistency.py   every rank builds the same model with the same options, from rank 0's values
    units.py         layout: units of parameters, their flat buffers, which slice each rank owns
    state_store.py   where this rank's masters, Adam state and reduced gradient shards live (device or host);
                     swapper.py / param_swap.py: the same on NVMe
    reducer.py       when each unit's gradients are reduced; reductions.py: how (the strategies); buckets.py
    phases.py        the cross-rank agreement each backward, step and load begins with
    step.py          norm, overflow, clipping and the fused Adam update over owned runs ([Note: step])
    schedule.py      stages 1/2: forward order, the per-unit gathers after a step and where forward waits
    residency.py     stage 3: each unit's parameters sharded / gathering / gathered, as a state machine
    hooks.py         stage 3: module hooks that gather, free and prefetch units in forward and backward
    full_params.py   full values on demand: gathered(), full_state_dict(), model.state_dict() under stage 3
    bindings.py      parameters replaced after construction: rebind, adopt or refuse
    state_dict.py    the per-parameter state dict: build, validate, load all or nothing; checkpoint.py: files
    collectives.py   the collectives with timeouts, peer-failure naming and clean exits
"""
from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import time
import weakref
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import host_memory, init as zero_init, state_dict as sd_format
from .bindings import Bindings
from .collectives import Collectives
from .config import ZeroConfig
from .consistency import broadcast_module_states, check_ranks_agree, describe, value_digest
from .ds_config import DeepSpeedSettings, parse_deepspeed
from .full_params import _OPEN, FullParameters, gathered_parameters  # noqa: F401 (re-exported)
from .hooks import ParamHooks
from .loss_scaler import make_loss_scaler
from .memory import memory_report
from .param_groups import registering_module, resolve_groups
from .phases import PhaseAgreement
from .reducer import GradReducer
from .residency import Residency
from .schedule import GatherSchedule, run_eagerly
from .state_store import make_store
from .stats import TrainingStats
from .step import Stepper
from .units import Unit, build_module_units, build_units, materialize

# Options every rank must agree on are all of ZeroConfig's but these (local to a rank by nature).
_LOCAL_OPTIONS = ("comm_timeout_s", "host_block_cache", "nvme_path", "buffer_count", "param_buffer_count")

# How long the exit hook waits for collectives still in flight (the gathers of the last step) before it lets
# the interpreter finalize; a peer that is gone fails them at once.
EXIT_WAIT_S = 60.0
# After a failure rank 0 (the store's host without an agent) waits this long before it exits.
STORE_LINGER_S = 5.0


def _read_config(config, options: dict, model, world_size: int):
    """(ZeroConfig, DeepSpeedSettings or None): keyword options over a ZeroConfig, or over a DeepSpeed config
    (dict, JSON path or parsed settings) read strictly, its "auto"s resolved from the model (ds_config.py)."""
    if config is None or isinstance(config, ZeroConfig):
        return ZeroConfig.from_kwargs(config, **options), None
    settings = config if isinstance(config, DeepSpeedSettings) else \
        parse_deepspeed(config, world_size=world_size, model=model, options=options)
    return ZeroConfig.from_kwargs(settings.zero, **options), settings


def _release_at_exit(ref) -> None:
    opt = ref()
    if opt is not None and not getattr(opt, "_closed", False):
        opt._finish(raise_errors=False)


def _counter(name: str, doc: str) -> property:
    """A training counter kept by the Stepper, readable and settable on the optimizer."""
    return property(lambda self: getattr(self.stepper, name), lambda self, v: setattr(self.stepper, name, v), doc=doc)


class ZeroOptimizer(torch.optim.Optimizer):
    """ZeRO Adam(W): optimizer state (stage 1), gradients (stage 2) and parameters (stage 3) partitioned.

    Launch with torchrun (NCCL on GPUs, gloo on CPU) after `torch.distributed.init_process_group`. Parameters of
    `model` become views of per-unit flat buffers; in stages 1 and 2 every rank keeps the full parameters and
    only its own slice of fp32 masters, Adam state and (stage 2) gradients. In stage 3 it keeps only its slice
    of the parameters too: a unit (a module's parameters) is gathered for its module's forward and backward and
    freed after; outside them, and outside `with opt.gathered():`, a parameter is a placeholder of its full
    shape whose every element is NaN (README, "Stage 3").

    Options (keyword, see ZeroConfig): stage=2, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    adamw=True, dtype=None (compute dtype, e.g. torch.bfloat16; fp32 masters are kept), reduce_dtype=None,
    bucket_size=5_000_000 (elements per unit), overlap_comm=True, gradient_accumulation_steps=1,
    gradient_clipping=0.0, loss_scale=None (fp16: dynamic), offload_optimizer=None | "cpu" | "nvme",
    comm_timeout_s=1800, sync_module_states=True (every rank starts from rank 0's parameters and buffers);
    stage 3: unit_modules=None, param_persistence_threshold=100_000, reshard_after_forward=True,
    prefetch_bucket_size=50_000_000, max_live_parameters=1_000_000_000, offload_param=None | "cpu" | "nvme".
    `config` may be a ZeroConfig, or a DeepSpeed config dict / JSON path, read strictly (ds_config.py: unknown
    keys are errors, "auto"s are resolved from the model, keys not implemented are warned about once); keyword
    options override it. Its `scheduler` section becomes `opt.lr_scheduler`, stepped by every step() that
    updates; its batch sizes are `opt.train_micro_batch_size_per_gpu` and `opt.train_batch_size`.
    `param_groups` takes torch-style groups (tensors or parameter names).

    Gradient accumulation: call step() after every backward (it updates on every k-th call) or after k
    backward passes; gradients are averaged over ranks and micro-steps. step() consumes the gradients.

    Example (one process; with torchrun every rank runs the same code):
    >>> import os, torch, torch.distributed as dist
    >>> os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29512")
    ... # doctest: +ELLIPSIS
    '...'
    >>> dist.init_process_group("gloo", rank=0, world_size=1)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ZeroOptimizer(model, stage=2, lr=1e-2)
    >>> opt.backward(model(torch.randn(8, 4)).square().mean()); opt.step(); opt.zero_grad()
    >>> opt.global_steps
    1
    >>> dist.destroy_process_group()
    """

    def __init__(self, model: torch.nn.Module, *, param_groups: Optional[Sequence[dict]] = None,
                 process_group=None, config: Union[None, ZeroConfig, dict, str] = None, **options):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ZeroOptimizer takes the model (a torch.nn.Module), not {type(model).__name__}: "
                            "write ZeroOptimizer(model, ...), not ZeroOptimizer(model.parameters(), ...); give "
                            "parameters their own hyperparameters with param_groups=[{'params': [...], 'lr': ...}]")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs torch.distributed: call torch.distributed.init_process_group "
                               "first (launch with `torchrun --nproc_per_node N script.py`; a single process "
                               "can use init_process_group('gloo', init_method='tcp://127.0.0.1:29500', rank=0, "
                               "world_size=1)).")
        cfg, self.ds_settings = _read_config(config, options, model, dist.get_world_size(process_group))
        self.config, self.model = cfg, model
        self.comm = Collectives(process_group, cfg.comm_timeout_s, cfg.collective_strategy, cfg.shard_group_size)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self._fixed_hooks = []
        try:
            self._build(model, named_all=list(model.named_parameters()), param_groups=param_groups)
        except BaseException:
            self._release()                    # a half-built optimizer leaves no hook, group, files or cache share
            raise
        self._constructed = True
        self._closed = False
        _OPEN.add(self)

    def _build(self, model, named_all, param_groups) -> None:
        """Every part, in order: the ranks' agreement, units, state store, shards, then the training parts."""
        cfg = self.config
        trainable = [(n, p) for n, p in named_all if p.requires_grad]
        if not trainable:
            raise ValueError("ZeroOptimizer: the model has no parameter with requires_grad=True")
        groups, group_of = resolve_groups(param_groups, trainable)
        self._check_peers(named_all, trainable, groups, group_of)
        self._choose_dtypes(trainable)
        if cfg.sync_module_states:
            broadcast_module_states(model, self.comm, skip=zero_init.is_partitioned)

        self.units: List[Unit] = self._build_units(trainable, group_of)
        self.num_trainable = len(trainable)
        self.param_names = [n for n, _ in trainable]
        self.psi = sum(p.numel() for _, p in trainable)
        # One agreement row carries the step's squared norm, a has-gradient flag per parameter and (first step)
        # the unit order this rank saw forward use.
        self.phases = PhaseAgreement(self.comm, 1 + len(trainable) + max(len(self.units), 2),
                                     self.device if self.comm.device.type == "cuda" else self.comm.device)
        self.store = make_store(self.units, self.comm, cfg, device=self.device, compute_dtype=self.compute_dtype,
                                reduce_dtype=self.reduce_dtype)
        self.shard_offsets = self.store.offsets
        self.residency = self._make_residency() if cfg.stage == 3 else None
        # From here on the engine's and autograd's large host tensors come from the block cache (host_memory.py):
        # the unit buffers made below, and the full values a ZeroInit model's units are rebuilt into one at a
        # time, which glibc's heap would keep as holes (~0.7 GB per rank for a 380M-param bf16 model).
        self._uses_host_cache = cfg.host_block_cache and self.device.type == "cpu" and host_memory.acquire()
        self._materialize(named_all)
        if self._uses_host_cache:
            host_memory.trim()                 # construction's temporaries are gone: do not keep their blocks
        self._wire(model, trainable, groups)

    # ---------------------------------------------------------------------------------------- construction
    def _check_peers(self, named_all, trainable, groups, group_of) -> None:
        """Every rank builds the same model with the same options (consistency.py); names this engine."""
        cfg = self.config
        names_group = {n: g for (n, _), g in zip(trainable, group_of)}
        agreed = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(cfg).items()
                  if k not in _LOCAL_OPTIONS}
        agreed.update(collective_strategy=self.comm.strategy,
                      param_groups=[sorted((k, v) for k, v in g.items() if k != "param_names") for g in groups])
        description = describe(named_all, [names_group.get(n, -1) for n, _ in named_all], agreed,
                               digests=None if cfg.sync_module_states else [
                                   0 if zero_init.is_partitioned(p) else value_digest(p) for _, p in named_all])
        description["uid"] = secrets.token_hex(8)
        everyone = check_ranks_agree(description, self.comm)
        self.comm.uid = everyone[0]["uid"]      # names this engine's keys in the store (collectives.py)
        self.comm.start_liveness()

    def _choose_dtypes(self, trainable) -> None:
        cfg = self.config
        devices = {p.device for _, p in trainable}
        dtypes = {p.dtype for _, p in trainable}
        if len(devices) != 1:
            raise ValueError(f"ZeroOptimizer: trainable parameters live on several devices {sorted(map(str, devices))}; "
                             "move the model to one device (e.g. model.to('cuda')) first")
        if cfg.dtype is None and len(dtypes) != 1:
            raise ValueError(f"ZeroOptimizer: trainable parameters have several dtypes {sorted(map(str, dtypes))}; "
                             "pass dtype=... to cast them to one compute dtype")
        self.device = devices.pop()
        if cfg.offload_param == "cpu" and self.device.type != "cpu" and cfg.offload_optimizer is None:
            raise ValueError("offload_param='cpu' on a GPU model needs offload_optimizer='cpu' too: the step "
                             "updates the parameter shards where the optimizer state lives")
        self.compute_dtype = cfg.dtype or dtypes.pop()
        self.mixed = self.compute_dtype != torch.float32
        self.offload = cfg.offload_optimizer in ("cpu", "nvme")
        self.reduce_dtype = cfg.reduce_dtype or self.compute_dtype

    def _build_units(self, trainable, group_of) -> List[Unit]:
        cfg = self.config
        # Units are sharded over the shard group ([Note: shard groups] in collectives.py; all ranks by default).
        k, r = self.comm.shard_size, self.comm.shard_rank
        if cfg.stage == 3:
            return build_module_units(self.model, trainable, group_of, bucket_size=cfg.bucket_size,
                                      unit_modules=cfg.unit_modules,
                                      persistence_threshold=cfg.param_persistence_threshold, world_size=k, rank=r)
        return build_units(trainable, group_of, bucket_size=cfg.bucket_size, world_size=k, rank=r,
                           module_of=registering_module(self.model, trainable))

    def _make_residency(self) -> Residency:
        """Stage 3: each rank keeps only its shards (on the host with offload_param="cpu", read from the NVMe
        masters with offload_param="nvme")."""
        nvme_shards = None
        if self.config.offload_param == "nvme":
            from .param_swap import NVMeParamShards
            nvme_shards = NVMeParamShards(self.store, self.units, self.config.param_buffer_count)
        return Residency(self.units, self.comm,
                         torch.device("cpu") if self.config.offload_param == "cpu" else None, nvme_shards)

    @torch.no_grad()
    def _materialize(self, named_all) -> None:
        """Move every unit's parameters into its flat buffer, one unit at a time (the peak is the model, or its
        ZeroInit pieces, plus one unit); masters from the original values, before any cast."""
        in_unit = {id(s.param) for u in self.units for s in u.slots}
        for _, p in named_all:                 # ZeroInit's pieces of parameters no unit takes (frozen ones)
            if id(p) not in in_unit:
                self._take_zero_init_piece(p)
        for u in self.units:
            for s in u.slots:
                self._take_zero_init_piece(s.param)
            self.store.init_masters([u])
            materialize(u, self.compute_dtype, self.device)
            if self.residency is not None:
                self.residency.partition(u.index)
        self.store.finish_init()
        if self.config.dtype is not None:
            for _, p in named_all:
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.config.dtype)

    def _take_zero_init_piece(self, p: torch.nn.Parameter) -> None:
        """A parameter built under ZeroInit gets its full values back (gathered from every rank's piece)."""
        full = zero_init.gather_full(p, self.comm)
        if full is not None:
            p.data = full

    def _wire(self, model, trainable, groups) -> None:
        """The parts that act during training: reducer, schedule or stage-3 hooks, step, bindings."""
        cfg = self.config
        self.store.allocate_grad_store()   # after the block cache took over: it serves this buffer too
        self.reducer = GradReducer(self.units, self.comm, stage=cfg.stage, grad_dtype=self.compute_dtype,
                                   reduce_dtype=self.reduce_dtype, accumulation_steps=cfg.gradient_accumulation_steps,
                                   overlap=cfg.overlap_comm, max_inflight=cfg.inflight_reductions,
                                   shard_store=self.store.grad_store, shard_offsets=self.shard_offsets,
                                   num_params=len(trainable), phases=self.phases)
        self.reducer.attach()
        by_name = dict(trainable)
        torch_groups = [dict(g, params=[by_name[n] for n in g["param_names"]]) for g in groups]
        super().__init__(torch_groups, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.loss_scaler = make_loss_scaler(cfg)
        self._deferred_step = False       # step() was called before the window's last micro-step
        if cfg.stage == 3:
            self.schedule = ParamHooks(model, self.units, self.residency, self.reducer, self.phases,
                                       reshard_after_forward=cfg.reshard_after_forward,
                                       prefetch_numel=cfg.prefetch_bucket_size, max_live_numel=cfg.max_live_parameters)
        else:
            self.schedule = GatherSchedule(model, self.units, self.comm, cfg.overlap_comm)
        self.stepper = Stepper(units=self.units, store=self.store, reducer=self.reducer, schedule=self.schedule,
                               phases=self.phases, loss_scaler=self.loss_scaler, param_groups=self.param_groups,
                               config=cfg, mixed=self.mixed, num_params=len(trainable), device=self.device,
                               replicas=self.comm.replicas)
        # A DeepSpeed config's scheduler section: stepped by step() after every update, like DeepSpeed's engine.
        self.lr_scheduler = self.ds_settings.build_lr_scheduler(self) if self.ds_settings is not None else None
        self.full_params = FullParameters(model, self.units, self.comm, self.store, self.schedule, self.residency)
        self._bindings = Bindings(model, self.units, self.store, self.reducer, self.wait_for_params,
                                  self.residency.expected_data_ptr if self.residency is not None else None)
        self.training_stats = TrainingStats(self.comm, self.device, cfg.log_interval,
                                            lambda: self._memory_report(wait=False))
        self._fixed_hooks = [
            model.register_forward_pre_hook(lambda *a: self._before_forward(), prepend=True),
            model.register_forward_pre_hook(lambda m, args: self.training_stats.count_forward(args)),
            model.register_state_dict_pre_hook(lambda *a, **k: self.wait_for_params())]
        if cfg.stage == 3:
            self._fixed_hooks.append(model.register_state_dict_post_hook(
                lambda *a: self.full_params.model_state_dict_post(*a)))   # (torch tags the hook: not a bound method)
        # If the program ends without close(), drop the hooks and the group before interpreter shutdown
        # starts (see [Note: teardown] in collectives.py); a weak reference, so this keeps nothing alive.
        atexit.register(_release_at_exit, weakref.ref(self))

    def add_param_group(self, param_group: dict) -> None:
        """Used by torch.optim.Optimizer.__init__ only: units are fixed once built.

        Overridden (without torch's dynamo-disabling decorator, whose first use imports torch._dynamo and
        costs ~150 MB of RSS per rank) because the groups were already validated by resolve_groups."""
        if getattr(self, "_constructed", False):
            raise NotImplementedError("ZeroOptimizer cannot add parameter groups after construction: pass every "
                                      "group through param_groups=... when creating it")
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self.param_groups.append(param_group)

    # ------------------------------------------------------------------------------ state (views of the parts)
    master = property(lambda self: self.store.master, doc="fp32 masters of this rank's shards (None: fp32 params)")
    exp_avg = property(lambda self: self.store.exp_avg, doc="Adam's first moment over this rank's shards")
    exp_avg_sq = property(lambda self: self.store.exp_avg_sq, doc="Adam's second moment over this rank's shards")
    grad_store = property(lambda self: self.store.grad_store, doc="reduced gradient shards kept between steps")
    global_steps = _counter("global_steps", "optimizer steps taken (not skipped)")
    skipped_steps = _counter("skipped_steps", "steps skipped for an fp16 overflow")
    global_grad_norm = _counter("global_grad_norm", "the last step's global gradient norm, before clipping (inf: "
                                "overflow)")
    param_steps = _counter("param_steps", "Adam's step count per trainable parameter")
    _param_staging = property(lambda self: self.store.staging)
    _pending = property(lambda self: self.schedule.pending)

    @property
    def train_micro_batch_size_per_gpu(self) -> Optional[int]:
        """The DeepSpeed config's micro-batch size per rank (None without one): size your data loader by it."""
        return self.ds_settings.micro_batch_size if self.ds_settings is not None else None

    @property
    def train_batch_size(self) -> Optional[int]:
        """The DeepSpeed config's global batch size: micro-batch x accumulation steps x world size."""
        return self.ds_settings.train_batch_size if self.ds_settings is not None else None

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    @property
    def micro_steps(self) -> int:
        """Backward passes accumulated since the last optimizer step."""
        return self.reducer.micro_steps

    # ------------------------------------------------------------------------------------------ training
    def _before_forward(self, compiled: bool = False) -> None:
        """Every forward of the model: it is not run by DDP, and its parameters still live in the engine. A
        forward torch.compile traces calls this eagerly (compiled=True): see [Note: torch.compile] in schedule.py."""
        if torch.compiler.is_compiling():
            return run_eagerly(self._before_forward, True)
        ddp = DistributedDataParallel._get_active_ddp_module()
        if ddp is not None and any(m is self.model for m in ddp.module.modules()):
            raise RuntimeError(
                "zerocore: the model given to ZeroOptimizer runs inside DistributedDataParallel (wrapped by you, or "
                "by transformers' Trainer / accelerate): ZeroOptimizer is the data parallelism, so DDP would "
                "all-reduce every gradient a second time and clip gradients the ranks no longer hold. Call the "
                "model itself; with transformers' Trainer use zerocore.integrations.transformers.ZeroTrainer.")
        self._bindings.check()
        if compiled and self.config.stage != 3:
            self.schedule.wait_for_compiled_forward()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() with the loss scale applied (fp16) and the engine's bookkeeping."""
        self.comm._check_open()
        self._check_unfinished_backward()
        self.wait_for_params()
        r = self.reducer
        before = r.micro_steps
        scale = self.loss_scaler.scale
        r.ended_by_caller = True
        try:
            (loss * scale if scale != 1.0 else loss).backward()
        finally:
            r.ended_by_caller = False
        if r.micro_steps == before:      # end the pass (or, if no trainable parameter got a gradient, take part)
            r.end_backward()

    def _check_unfinished_backward(self) -> None:
        if self.reducer.in_backward or self.reducer.failed:
            raise RuntimeError("zerocore: the last backward pass did not finish (it raised an error), so its "
                               "gradients are incomplete. Call opt.zero_grad() to discard them, then run the "
                               "micro-step again.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard gradients accumulated since the last step (a no-op right after a deferred step() call,
        so DeepSpeed-style loops that call step() and zero_grad() every micro-step keep accumulating).
        What a backward pass that raised left behind is always discarded."""
        r = self.reducer
        if r.in_backward and self.config.stage == 3:
            raise RuntimeError(
                "zerocore: under stage 3 a backward pass that raised part-way cannot be discarded: the peers' "
                "backward went on gathering units and reducing gradients, and the collectives this rank would "
                "issue no longer pair with theirs. Restart the job from the last checkpoint.")
        if r.failed or r.in_backward:
            r.discard()                   # a backward that raised: reductions, buckets, partial gradients
            self._deferred_step = False
            return
        if self._deferred_step:
            return
        if r.micro_steps > 0:
            r.discard()

    @torch.no_grad()
    def step(self, closure=None):
        """Update on the last micro-step of an accumulation window; before that, just return."""
        if closure is not None:
            raise NotImplementedError("ZeroOptimizer.step does not take a closure: run forward/backward first")
        self.comm._check_open()
        self._check_unfinished_backward()
        self._bindings.check(at_step=True)
        self.wait_for_params()
        r = self.reducer
        if r.micro_steps < self.config.gradient_accumulation_steps:
            self._deferred_step = r.micro_steps > 0
            return None
        self._deferred_step = False
        if self._uses_host_cache:
            host_memory.end_step()
        started = time.perf_counter()
        self.training_stats.step_started()
        if self.stepper.run() and self.lr_scheduler is not None:
            self.lr_scheduler.step()      # not after a skipped (overflow) step, as DeepSpeed
        self.training_stats.step_done(time.perf_counter() - started, global_steps=self.global_steps,
                                      loss_scale=self.loss_scale, grad_norm=self.global_grad_norm)
        return None

    def stats(self) -> dict:
        """This rank's training figures, without communication ([Note: training log] in stats.py): the last
        step's time and its breakdown (forward_backward_s, reduction_wait_s, step_only_s, gather_wait_s), their
        means since the last log line, global_steps, loss_scale, grad_norm, samples counted since the last log
        line, and memory now (host_rss, host_peak, device_allocated, device_peak, pinned, nvme; bytes).

        >>> # print(opt.stats()["step_s"], opt.stats()["host_peak"] / 2**30)
        """
        return self.training_stats.local()

    def wait_for_params(self) -> None:
        """Wait for every in-flight parameter all-gather (forward does this per unit by itself)."""
        self.schedule.wait_all()

    # ------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Finish in-flight collectives, remove the engine's hooks from the model and drop the process group.

        Call it before torch.distributed.destroy_process_group() (or let the optimizer go out of scope first):
        the hooks make the model reference the optimizer, so without close() an explicitly passed process group
        would live on until interpreter shutdown, where gloo's worker threads can abort the process (see
        [Note: teardown] in collectives.py). Stages 1 and 2: parameters keep their current (gathered) values
        and stay usable. Stage 3: partitioned parameters stay placeholders (their values are in the shards,
        which are dropped): take opt.full_state_dict() or save a checkpoint before closing. The optimizer itself
        cannot step again. Idempotent.

        >>> # ... training ...; opt.close(); dist.destroy_process_group()
        """
        if getattr(self, "_closed", False):
            return
        self._finish(raise_errors=True)

    def _finish(self, raise_errors: bool) -> None:
        """Wait for in-flight collectives and for the backend to let go of their tensors ([Note: exit] in
        collectives.py), then release everything; errors are raised (close()) or reported (exit hook)."""
        if self.comm.failed is not None:      # the job is already failing: wait for nothing (it would fail again)
            if self.rank == 0 and "TORCHELASTIC_RUN_ID" not in os.environ:
                # Without torchrun's agent the rendezvous store lives in this process: keep it up a moment so
                # the other ranks can read which rank failed ([Note: liveness] in liveness.py).
                time.sleep(STORE_LINGER_S)
            self._release()
            return
        if not raise_errors:
            self.comm.timeout_s = min(self.comm.timeout_s, EXIT_WAIT_S)
        try:
            self.wait_for_params()
            self.reducer.drain()
            self.wait_for_checkpoint()
        except Exception as e:  # noqa: BLE001 - the exit hook must not raise; close() re-raises below
            if raise_errors:
                self._release()
                raise
            import sys
            print(f"zerocore: at exit, in-flight collectives failed: {e}", file=sys.stderr)
        self.comm.settle()
        self._release()

    def __del__(self):
        # An optimizer dropped without close() (its hooks gone with the model) still gives back its share of the
        # process-wide host block cache.
        try:
            self._leave_host_cache()
        except Exception:     # interpreter shutdown: modules may already be gone; nothing left to give back
            pass

    def _leave_host_cache(self) -> None:
        """Give back this optimizer's share of the host block cache, once."""
        if getattr(self, "_uses_host_cache", False):
            self._uses_host_cache = False
            host_memory.release()

    def _release(self) -> None:
        """Drop hooks, pooled buckets and the process group without waiting for anything (what exists: this
        also undoes a construction that failed part-way)."""
        if hasattr(self, "reducer"):
            self.reducer.close()
        for h in getattr(self, "_fixed_hooks", []):
            h.remove()
        self._fixed_hooks = []
        if hasattr(self, "schedule"):
            self.schedule.remove_hooks()
            self.schedule.pending.clear()
        self.comm.close()
        if hasattr(self, "store"):
            self.store.close()
        self._leave_host_cache()
        self._closed = True

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard, stored per parameter: name, full shape, the [start, end) of the flattened
        parameter this rank owns, its fp32 master / exp_avg / exp_avg_sq for that range, and its step count.
        Any set of ranks' dicts that covers every range can be loaded at any world size."""
        self.wait_for_params()
        return sd_format.build(self.units, self.store, self.param_steps, self.param_groups, dict(
            self.stepper.state(), world_size=self.world_size, rank=self.rank, stage=self.config.stage))

    @torch.no_grad()
    def load_state_dict(self, state_dict: Union[dict, Sequence[dict]]) -> None:
        """Load a state_dict() of this rank, or a list of several ranks' dicts (any world size): each owned
        range is assembled from whichever dicts hold it. Parameters are refreshed from the loaded masters.

        Every rank must call it. All or nothing on every rank (see [Note: atomic load] in state_dict.py): a
        bad entry raises the same error on every rank, naming the rank and the parameter, and changes nothing."""
        self._load(state_dict, [])

    def _load(self, state_dict, problems: List[str]) -> None:
        """load_state_dict, with `problems` this rank already found (e.g. reading a checkpoint) joining the
        cross-rank agreement."""
        self.comm._check_open()
        sources = [state_dict] if isinstance(state_dict, dict) else list(state_dict)
        sd_format.agree_to_load(sources, problems, self.units, len(self.param_groups), self.phases, self.comm)
        self.wait_for_params()
        self.schedule.before_update()
        self.stepper.load(sources[0], sd_format.write(sources, self.units, self.store))
        sd_format.load_groups(self.param_groups, sources[0])
        self.schedule.after_update(updated=True)
        self.wait_for_params()

    def save_checkpoint(self, ckpt_dir, tag: Optional[str] = None, client_state=None, lr_scheduler=None,
                        async_save: bool = False):
        """Write this rank's shards, one manifest and `latest` under ckpt_dir/tag (default
        "global_step{N}"), crash-safe: a crash or full disk midway leaves the previous checkpoints loadable
        ([Note: checkpoint layout] in checkpoint.py). Every rank must call it. client_state: tensors and plain
        Python data (loaded with weights_only=True); lr_scheduler (default: the config's, opt.lr_scheduler): its
        state_dict() is saved too. Returns the checkpoint's folder.

        async_save=True returns once the shards are copied to host memory; the files are written in the
        background and the checkpoint is committed (manifest, `latest`) at the next save_checkpoint,
        load_checkpoint, wait_for_checkpoint() or close(), which raise if the background write failed
        ([Note: async save] in checkpoint.py).

        >>> # opt.save_checkpoint("ckpt", client_state={"epoch": 3}, lr_scheduler=sched, async_save=True)
        """
        from .checkpoint import save
        return save(self, ckpt_dir, tag, client_state=client_state, lr_scheduler=lr_scheduler or self.lr_scheduler,
                    async_save=async_save)

    def wait_for_checkpoint(self) -> None:
        """Finish and commit an async save_checkpoint (every rank calls it); raises if it failed."""
        if getattr(self, "_pending_save", None) is None:
            return                        # (nothing to import at exit, where close() and the hook call this)
        from .checkpoint import finish_pending
        finish_pending(self)

    def load_checkpoint(self, ckpt_dir, tag: Optional[str] = None, lr_scheduler=None):
        """Load a checkpoint written by save_checkpoint at any world size and stage 1, 2 or 3 (`latest` unless
        a tag is given); returns its client_state. Each rank reads only the files that hold its ranges and
        checks every tensor against the manifest's crc32; a missing, truncated, corrupt or mismatched checkpoint
        raises the same error on every rank, naming the file or parameter, and nothing is loaded."""
        from .checkpoint import load
        return load(self, ckpt_dir, tag, lr_scheduler=lr_scheduler or self.lr_scheduler)

    # ------------------------------------------------------------------------------------- full parameters
    @contextlib.contextmanager
    def gathered(self, params=None, modifier_rank: Optional[int] = None):
        """Keep the full parameters of every unit (or of the units holding `params`) on every rank for a while.

        Stage 3 gathers each unit before its module runs and frees it after; inside this context nothing is
        freed, so a generation loop or an evaluation pass gathers once instead of per call (DeepSpeed users
        report ~10x slow token-by-token ZeRO-3 generation for want of this). With modifier_rank=r, changes rank
        r makes to the parameters inside the context are sent to every rank and become the parameters' (and
        the fp32 masters') new values at its end. Every rank must enter it together. Stages 1 and 2 hold full
        parameters anyway: the context then only applies modifier_rank's changes ([Note: full parameters]).

        >>> # with opt.gathered():
        >>> #     for _ in range(max_new_tokens): logits = model(ids); ids = torch.cat([ids, pick(logits)], 1)
        """
        self.comm._check_open()
        with self.full_params.gathered(params, modifier_rank):
            yield

    def full_state_dict(self, rank0_only: bool = True, master_weights: bool = False) -> dict:
        """The model's state dict with full parameters (host tensors, keys as `model.state_dict()`'s),
        gathered one unit at a time so no rank holds more than one unit beyond its shards. Every rank must
        call it; with rank0_only (default) the other ranks get {}. master_weights=True: in mixed precision the
        trainable parameters' fp32 masters instead of their bf16/fp16 values (what a save in fp32 wants).

        Under stage 3, `model.parameters()` outside a forward pass or `opt.gathered()` are placeholders: full
        shapes, every element NaN (residency.py), and so are `model.state_dict()`'s entries for them. Use this
        (or zerocore.consolidate of a checkpoint) to save a model."""
        return self.full_params.full_state_dict(rank0_only, master_weights)

    # ------------------------------------------------------------------------------------------- accounting
    def memory_report(self) -> dict:
        """Bytes this rank holds in parameters, gradients, fp32 masters, Adam state and pooled buckets,
        measured from the live tensors, beside the ZeRO formula for this stage and precision."""
        return self._memory_report(wait=True)

    def _memory_report(self, wait: bool) -> dict:
        if wait:                                # (the training log reads sizes only: it need not wait)
            self.wait_for_params()
        return memory_report(self.units, self.store, self.reducer, stage=self.config.stage, mixed=self.mixed,
                             offload=self.offload, psi=self.psi, world_size=self.world_size,
                             shard_group_size=self.comm.shard_size,
                             host_cache=host_memory.report() if self._uses_host_cache else None,
                             peak_gathered=self.residency.peak_live_bytes if self.residency is not None else 0)
