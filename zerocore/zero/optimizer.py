"""ZeroOptimizer: ZeRO stage 1, 2 and 3 data parallelism for any PyTorch model (Adam / AdamW).

This file wires the engine's parts and holds the public API; each part has one job:
    units.py         layout: units of parameters, their flat buffers, which slice each rank owns
    state_store.py   where this rank's masters, Adam state and reduced gradient shards live (device or host)
    grad_reducer.py  gradient hooks, buckets and per-unit reductions during backward
    phases.py        the cross-rank agreement each backward, step and load begins with
    step.py          norm, overflow, clipping and the fused Adam update over owned runs ([Note: step])
    schedule.py      stages 1/2: forward order, the per-unit gathers after a step and where forward waits
    residency.py     stage 3: each unit's parameters sharded / gathering / gathered, as a state machine
    hooks.py         stage 3: module hooks that gather, free and prefetch units in forward and backward
    bindings.py      parameters replaced after construction: rebind, adopt or refuse
    state_dict.py    the per-parameter state dict: build, validate, load all or nothing
    collectives.py   the collectives with timeouts, peer-failure naming and clean exits
    consistency.py   the construction-time check that all ranks build the same model with the same options
"""
from __future__ import annotations

import atexit
import contextlib
import secrets
import weakref
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import host_memory, init as zero_init, state_dict as sd_format, step as step_ops
from .bindings import Bindings, ParameterReplacedError
from .collectives import Collectives
from .config import ZeroConfig
from .consistency import check_ranks_agree, describe, value_digest
from .grad_reducer import GradReducer
from .loss_scaler import make_loss_scaler
from .memory import memory_report
from .phases import Phase, PhaseAgreement
from .hooks import ParamHooks
from .residency import ParamState, Residency
from .schedule import GatherSchedule
from .state_store import StateStore
from .units import Unit, build_module_units, build_units, materialize

# Options every rank must agree on are all of ZeroConfig's but these (local to a rank by nature).
_LOCAL_OPTIONS = ("comm_timeout_s", "host_block_cache", "nvme_path", "buffer_count", "param_buffer_count")


# How long the exit hook waits for collectives still in flight (the gathers of the last step) before it lets
# the interpreter finalize; a peer that is gone fails them at once.
EXIT_WAIT_S = 60.0


# Open optimizers, so zerocore.gathered_parameters can find the one that holds a parameter (weak: keeps none alive).
_OPEN: "weakref.WeakSet[ZeroOptimizer]" = weakref.WeakSet()


def gathered_parameters(params, modifier_rank: Optional[int] = None):
    """`opt.gathered(params, modifier_rank)` of the ZeroOptimizer that holds `params` (DeepSpeed's
    zero.GatheredParameters): read full parameters, or change them on one rank and re-partition.

    >>> # with zerocore.gathered_parameters(model.head.weight, modifier_rank=0):
    >>> #     if dist.get_rank() == 0: model.head.weight.zero_()
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)    # a generator is read once
    first = params[0] if params else None
    for opt in list(_OPEN):
        if not getattr(opt, "_closed", True) and any(s.param is first for u in opt.units for s in u.slots):
            return opt.gathered(params, modifier_rank)
    raise ValueError("zerocore.gathered_parameters: no open ZeroOptimizer holds the given parameter")


def _release_at_exit(ref) -> None:
    opt = ref()
    if opt is not None and not getattr(opt, "_closed", False):
        opt._finish(raise_errors=False)


def _destroy_default_group_at_exit() -> None:
    """Runs after every optimizer's exit hook ([Note: exit] in collectives.py): a script that never called
    destroy_process_group() gets it here, while the interpreter still runs, so the backend's worker threads are
    joined (with the GIL released) before finalization instead of meeting it."""
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit: a group that cannot be destroyed is left to the process's end
        pass


# Registered when zerocore is imported, so it runs after the exit hooks of everything registered later (atexit
# runs hooks in reverse): every optimizer's, and a script's own (e.g. atexit.register(dist.destroy_process_group)).
atexit.register(_destroy_default_group_at_exit)



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
    gradient_clipping=0.0, loss_scale=None (fp16: dynamic), offload_optimizer=None | "cpu",
    comm_timeout_s=1800, sync_module_states=True (every rank starts from rank 0's parameters and buffers);
    stage 3: unit_modules=None, param_persistence_threshold=100_000, reshard_after_forward=True,
    prefetch_bucket_size=50_000_000, max_live_parameters=1_000_000_000, offload_param=None | "cpu".
    `config` may be a ZeroConfig, or a DeepSpeed config dict / JSON path; keyword options override it. `param_groups` takes torch-style groups (tensors or parameter names).

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
        cfg = config if isinstance(config, ZeroConfig) else (
            ZeroConfig.from_deepspeed(config) if config is not None else None)
        cfg = ZeroConfig.from_kwargs(cfg, **options)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ZeroOptimizer takes the model (a torch.nn.Module), not {type(model).__name__}: "
                            "write ZeroOptimizer(model, ...), not ZeroOptimizer(model.parameters(), ...); give "
                            "parameters their own hyperparameters with param_groups=[{'params': [...], 'lr': ...}]")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs torch.distributed: call torch.distributed.init_process_group "
                               "first (launch with `torchrun --nproc_per_node N script.py`; a single process "
                               "can use init_process_group('gloo', init_method='tcp://127.0.0.1:29500', rank=0, "
                               "world_size=1)).")
        self.config, self.model = cfg, model
        self.comm = Collectives(process_group, cfg.comm_timeout_s, cfg.collective_strategy)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size

        named_all = list(model.named_parameters())
        trainable = [(n, p) for n, p in named_all if p.requires_grad]
        if not trainable:
            raise ValueError("ZeroOptimizer: the model has no parameter with requires_grad=True")
        groups, group_of = self._resolve_groups(param_groups, trainable)
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
        if cfg.sync_module_states:
            self._broadcast_module_states(model)

        if cfg.stage == 3:
            self.units: List[Unit] = build_module_units(
                model, trainable, group_of, bucket_size=cfg.bucket_size, unit_modules=cfg.unit_modules,
                persistence_threshold=cfg.param_persistence_threshold, world_size=self.world_size,
                rank=self.rank)
        else:
            self.units = build_units(trainable, group_of, bucket_size=cfg.bucket_size, world_size=self.world_size,
                                     rank=self.rank, module_of=self._registering_module(model, trainable))
        self.num_trainable = len(trainable)
        self.param_names = [n for n, _ in trainable]
        # One agreement row carries the step's squared norm, a has-gradient flag per parameter and (first step)
        # the unit order this rank saw forward use.
        self.phases = PhaseAgreement(self.comm, 1 + len(trainable) + max(len(self.units), 2),
                                     self.device if self.comm.device.type == "cuda" else self.comm.device)
        self.psi = sum(p.numel() for _, p in trainable)

        store_options = dict(device=self.device, compute_dtype=self.compute_dtype, stage=cfg.stage,
                             reduce_dtype=self.reduce_dtype, accumulation_steps=cfg.gradient_accumulation_steps)
        if cfg.offload_optimizer == "nvme":
            from .swapper import NVMeStateStore
            self.store: StateStore = NVMeStateStore(self.units, comm=self.comm, nvme_path=cfg.nvme_path,
                                                    buffer_count=cfg.buffer_count,
                                                    sub_group_size=cfg.sub_group_size,
                                                    unit_sized=cfg.offload_param == "nvme", **store_options)
        else:
            self.store = StateStore(self.units, offload=self.offload, **store_options)
        self.shard_offsets = self.store.offsets
        if cfg.stage == 3:                     # each rank keeps only its shards
            nvme_shards = None
            if cfg.offload_param == "nvme":
                from .param_swap import NVMeParamShards
                nvme_shards = NVMeParamShards(self.store, self.units, cfg.param_buffer_count)
            self.residency = Residency(self.units, self.comm,
                                       torch.device("cpu") if cfg.offload_param == "cpu" else None, nvme_shards)
        # From here on the engine's and autograd's large host tensors come from the block cache (host_memory.py):
        # the unit buffers made below, and the full values a ZeroInit model's units are rebuilt into one at a
        # time, which glibc's heap would keep as holes (~0.7 GB per rank for a 380M-param bf16 model).
        self._uses_host_cache = cfg.host_block_cache and self.device.type == "cpu" and host_memory.acquire()
        in_unit = {id(s.param) for u in self.units for s in u.slots}
        for _, p in named_all:                 # ZeroInit's pieces of parameters no unit takes (frozen ones)
            if id(p) not in in_unit:
                self._take_zero_init_piece(p)
        for u in self.units:                   # one unit at a time: the peak is the model (or its pieces) + a unit
            for s in u.slots:
                self._take_zero_init_piece(s.param)
            self.store.init_masters([u])       # from the original values, before any cast to the compute dtype
            materialize(u, self.compute_dtype, self.device)
            if cfg.stage == 3:
                self.residency.partition(u.index)
        self.store.finish_init()
        if cfg.dtype is not None:
            for _, p in named_all:
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(cfg.dtype)


        if self._uses_host_cache:
            host_memory.trim()                 # construction's temporaries are gone: do not keep their blocks
        try:
            self.store.allocate_grad_store()   # after the block cache took over: it serves this buffer too
            self.reducer = GradReducer(self.units, self.comm, stage=cfg.stage, grad_dtype=self.compute_dtype,
                                       reduce_dtype=self.reduce_dtype,
                                       accumulation_steps=cfg.gradient_accumulation_steps,
                                       overlap=cfg.overlap_comm, max_inflight=cfg.max_inflight_reductions,
                                       shard_store=self.grad_store, shard_offsets=self.shard_offsets,
                                       num_params=len(trainable), phases=self.phases)
            self.reducer.attach()

            by_name = dict(trainable)
            torch_groups = [dict(g, params=[by_name[n] for n in g["param_names"]]) for g in groups]
            super().__init__(torch_groups, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                weight_decay=cfg.weight_decay))
            self.loss_scaler = make_loss_scaler(cfg)
            self.param_steps = [0] * len(trainable)
            self.global_grad_norm: Optional[float] = None
            self.skipped_steps = 0
            self.global_steps = 0
            self._deferred_step = False
            self._bindings = Bindings(model, self.units,
                                      self.residency.expected_data_ptr if cfg.stage == 3 else None)
            self._fixed_hooks = [
                model.register_forward_pre_hook(lambda *a: self._check_bindings(), prepend=True),
                model.register_state_dict_pre_hook(lambda *a, **k: self.wait_for_params())]
            if cfg.stage == 3:
                unit_of = {id(s.param): u.index for u in self.units if not u.persistent for s in u.slots}
                self._partitioned_keys = {n: (unit_of[id(p)], p)
                                          for n, p in model.named_parameters(remove_duplicate=False)
                                          if id(p) in unit_of}
                self._fixed_hooks.append(model.register_state_dict_post_hook(
                    lambda *a: self._model_state_dict_post(*a)))   # (torch tags the hook: not a bound method)
            if cfg.stage == 3:
                self.schedule = ParamHooks(model, self.units, self.residency, self.reducer, self.phases,
                                           reshard_after_forward=cfg.reshard_after_forward,
                                           prefetch_numel=cfg.prefetch_bucket_size,
                                           max_live_numel=cfg.max_live_parameters)
            else:
                self.schedule = GatherSchedule(model, self.units, self.comm, cfg.overlap_comm)
            # If the program ends without close(), drop the hooks and the group before interpreter shutdown
            # starts (see [Note: teardown] in collectives.py); a weak reference, so this keeps nothing alive.
            atexit.register(_release_at_exit, weakref.ref(self))
        except BaseException:
            # A half-built optimizer must not leave hooks on the model or hold the process-wide cache.
            if hasattr(self, "reducer"):
                self.reducer.detach()
            for h in getattr(self, "_fixed_hooks", []):
                h.remove()
            if hasattr(self, "schedule"):
                self.schedule.remove_hooks()
            self._leave_host_cache()
            self.store.close()
            raise
        self._constructed = True
        self._closed = False
        _OPEN.add(self)

    # ---------------------------------------------------------------------------------------- construction
    def _take_zero_init_piece(self, p: torch.nn.Parameter) -> None:
        """A parameter built under ZeroInit gets its full values back (gathered from every rank's piece)."""
        full = zero_init.gather_full(p, self.comm)
        if full is not None:
            p.data = full

    @torch.no_grad()
    def _broadcast_module_states(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (sync_module_states, as DDP and FSDP do).
        Parameters built under ZeroInit were synchronized there (and hold no values here)."""
        tensors = [p for p in model.parameters() if not zero_init.is_partitioned(p)] + list(model.buffers())
        pending = []
        for t in tensors:
            data = t.detach()
            if data.numel() == 0 or data.device.type != self.comm.device.type:
                continue              # (NCCL cannot broadcast a GPU model's host buffers; they stay per rank)
            target = data if data.is_contiguous() else data.contiguous()
            pending.append((data, target, self.comm.broadcast(target, 0, f"rank 0's {tuple(data.shape)} "
                                                                            "parameter or buffer")))
        for data, target, p in pending:
            p.wait()
            if target is not data:
                data.copy_(target)
        # Let go of the references kept for the backend ([Note: exit]) now: they would keep the parameters'
        # original storage alive after materialize() moved them into the unit buffers.
        del pending, tensors
        self.comm.settle()

    def add_param_group(self, param_group: dict) -> None:
        """Used by torch.optim.Optimizer.__init__ only: units are fixed once built.

        Overridden (without torch's dynamo-disabling decorator, whose first use imports torch._dynamo and
        costs ~150 MB of RSS per rank) because the groups were already validated by _resolve_groups."""
        if getattr(self, "_constructed", False):
            raise NotImplementedError("ZeroOptimizer cannot add parameter groups after construction: pass every "
                                      "group through param_groups=... when creating it")
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self.param_groups.append(param_group)

    @staticmethod
    def _resolve_groups(param_groups, trainable):
        """(group hyperparameter dicts with 'param_names', group index of every trainable parameter)."""
        names = {id(p): n for n, p in trainable}
        if param_groups is None:
            return [{"param_names": [n for n, _ in trainable]}], [0] * len(trainable)
        groups, group_of_name = [], {}
        for gi, g in enumerate(param_groups):
            if "params" not in g:
                raise ValueError(f"param_groups[{gi}] has no 'params' entry")
            params = g["params"]
            params = [params] if isinstance(params, (torch.Tensor, str)) else list(params)
            member = []
            for p in params:
                n = p if isinstance(p, str) else names.get(id(p))
                if n is None:
                    if isinstance(p, torch.Tensor) and not p.requires_grad:
                        continue             # frozen: torch.optim ignores it too
                    raise ValueError(f"param_groups[{gi}] holds a tensor that is not a trainable parameter of the model")
                if n not in {m for m, _ in trainable}:
                    raise ValueError(f"param_groups[{gi}] names {n!r}, which is not a trainable parameter of the model")
                if n in group_of_name:
                    raise ValueError(f"parameter {n!r} appears in param_groups {group_of_name[n]} and {gi}")
                group_of_name[n] = gi
                member.append(n)
            hyper = {k: v for k, v in g.items() if k != "params"}
            unknown = set(hyper) - {"lr", "betas", "eps", "weight_decay"}
            if unknown:
                raise ValueError(f"param_groups[{gi}] has unsupported option(s) {sorted(unknown)}; "
                                 "supported: lr, betas, eps, weight_decay")
            groups.append(dict(hyper, param_names=member))
        missing = [n for n, _ in trainable if n not in group_of_name]
        if missing:
            raise ValueError(f"trainable parameter(s) {missing[:3]} are in no param group: add them to one, or set "
                             "requires_grad=False on them")
        return groups, [group_of_name[n] for n, _ in trainable]

    @staticmethod
    def _registering_module(model, trainable) -> List[int]:
        first_owner = {}
        for mi, m in enumerate(model.modules()):
            for p in m._parameters.values():
                if p is not None:
                    first_owner.setdefault(id(p), mi)
        return [first_owner[id(p)] for _, p in trainable]

    @torch.no_grad()
    def _check_bindings(self, at_step: bool = False) -> None:
        """Rebind, adopt or refuse parameters whose storage was replaced (see [Note: parameter bindings])."""
        moved = self._bindings.moved(check_registration=at_step)
        partitioned = [s.name for u, s in moved if not u.persistent]
        if partitioned:
            raise ParameterReplacedError(
                f"zerocore: stage 3 parameter(s) {partitioned[:3]} were given new storage after ZeroOptimizer "
                "was constructed (p.data = ..., module.to(...)); a partitioned parameter's values live in its "
                "shards, so nothing can be adopted. Move or cast the model before constructing ZeroOptimizer, "
                "and change values with zerocore.gathered_parameters(..., modifier_rank=...).")
        if moved:
            self.wait_for_params()          # the buffers are complete before they are compared or written
            for u, s in moved:
                if not self.store.separate_masters or not s.owned_numel:
                    Bindings.rebind(u, s, adopt_values=at_step)
                    continue
                before = u.flat[s.offset + s.own_start:s.offset + s.own_end].clone()
                if Bindings.rebind(u, s, adopt_values=at_step):
                    now = s.param.detach().reshape(-1)[s.own_start:s.own_end]
                    # only adopted values reach the fp32 master
                    self.store.set_masters([(u, s.shard_pos, now, now != before)])
        self.reducer.rebind_grads()

    # ------------------------------------------------------------------------------ state (views of the parts)
    master = property(lambda self: self.store.master, doc="fp32 masters of this rank's shards (None: fp32 params)")
    exp_avg = property(lambda self: self.store.exp_avg, doc="Adam's first moment over this rank's shards")
    exp_avg_sq = property(lambda self: self.store.exp_avg_sq, doc="Adam's second moment over this rank's shards")
    grad_store = property(lambda self: self.store.grad_store, doc="reduced gradient shards kept between steps")
    _param_staging = property(lambda self: self.store.staging)
    _pending = property(lambda self: self.schedule.pending)

    # ------------------------------------------------------------------------------------------ public API
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    @property
    def micro_steps(self) -> int:
        """Backward passes accumulated since the last optimizer step."""
        return self.reducer.micro_steps

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
        """Drop hooks, pooled buckets and the process group without waiting for anything."""
        self.reducer.detach()
        for h in self._fixed_hooks:
            h.remove()
        self._fixed_hooks = []
        self.schedule.remove_hooks()
        self.schedule.pending.clear()
        self.reducer.inflight.clear()
        self.reducer.pool.clear()
        self.comm.close()
        self.store.close()
        self._leave_host_cache()
        self._closed = True

    def wait_for_params(self) -> None:
        """Wait for every in-flight parameter all-gather (forward does this per unit by itself)."""
        self.schedule.wait_all()

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
        self._check_bindings(at_step=True)
        self.wait_for_params()
        r, cfg = self.reducer, self.config
        if r.micro_steps < cfg.gradient_accumulation_steps:
            self._deferred_step = r.micro_steps > 0
            return None
        self._deferred_step = False
        if self._uses_host_cache:
            host_memory.end_step()
        if not self.schedule.recorded:
            self.schedule.finish_recording()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()     # async copies of reduced shards to the host are done
        shards = r.reduced_shards()
        n = 1 + self.num_trainable
        payload = torch.zeros(self.phases.payload_numel, dtype=torch.float64,
                              device=shards[0].device if shards else None)
        payload[0] = step_ops.squared_norm(self.store, shards)
        payload[1:n] = torch.frombuffer(bytearray(r.has_grad), dtype=torch.uint8).to(payload.device, torch.float64)
        payload[n:] = self.schedule.agreement_payload(self.phases.payload_numel - n).to(payload.device)
        rows = self.phases.exchange(Phase.STEP, payload, micro_step=r.micro_steps)
        self.schedule.agree(rows[:, n:].cpu())
        # Summed in rank order, so every rank gets bit-identical totals (see [Note: phase agreement]).
        total = rows[:, :n].sum(0)
        total_sq = float(total[0])
        got = (total[1:] > 0).tolist()
        if cfg.stage == 3:
            self.schedule.check_used(got)
        self._drop_gathered()
        divisor = r.grad_divisor * self.loss_scaler.scale
        if step_ops.is_overflow(total_sq):
            self.loss_scaler.update(overflow=True)
            self.skipped_steps += 1
            self.global_grad_norm = float("inf")
            r.clear_window()
            if cfg.stage == 3:            # a new window all the same (gather log, held gathered() units)
                self._launch_gathers()
            return None
        norm = step_ops.global_norm(total_sq, divisor)
        self.global_grad_norm = norm
        coef = step_ops.clip_coefficient(norm, cfg.gradient_clipping)
        step_ops.adam_update(self.units, self.store, self.param_groups, shards, got, self.param_steps,
                             coef / divisor, adamw=cfg.adamw, mixed=self.mixed)
        for i, g in enumerate(got):
            if g:
                self.param_steps[i] += 1
        self.loss_scaler.update(overflow=False)
        self.global_steps += 1
        r.clear_window()
        self._launch_gathers()
        return None

    def _drop_gathered(self) -> None:
        """Stage 3: free every gathered partitioned unit before its shard changes (step, load)."""
        if self.config.stage == 3:
            self.wait_for_params()
            self.schedule.free_all()

    def _launch_gathers(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # updated shards (and staging copies) are complete
        self.schedule.launch()

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard, stored per parameter: name, full shape, the [start, end) of the flattened
        parameter this rank owns, its fp32 master / exp_avg / exp_avg_sq for that range, and its step count.
        Any set of ranks' dicts that covers every range can be loaded at any world size."""
        self.wait_for_params()
        return sd_format.build(self.units, self.store, self.param_steps, self.param_groups, {
            "world_size": self.world_size, "rank": self.rank, "stage": self.config.stage,
            "loss_scaler": self.loss_scaler.state_dict(), "global_steps": self.global_steps,
            "skipped_steps": self.skipped_steps})

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
        if not problems:
            try:
                problems = sd_format.validate(sources, self.units, len(self.param_groups)) if sources else \
                    ["no state dict was given"]
            except Exception as e:  # noqa: BLE001 - a malformed dict must still reach the agreement below
                problems = [f"the state dict is malformed ({type(e).__name__}: {e})"]
        where = [float(len(problems)), 0.0, 0.0]
        if not problems:                     # which checkpoint: the same on every rank, or a mix of runs
            where[1:] = [float(sources[0]["global_steps"]), float(sources[0]["loss_scaler"]["scale"])]
        rows = self.phases.exchange(Phase.LOAD, torch.tensor(where)).cpu()
        if not rows[:, 0].any() and not (rows[:, 1:3] == rows[0, 1:3]).all():
            problems = ["the ranks were given checkpoints of different steps: (global_steps, loss scale) per "
                        f"rank {[tuple(r) for r in rows[:, 1:3].tolist()]}"]
            rows[:, 0] = 1.0
        if rows[:, 0].any():
            everyone = self.comm.all_gather_object(problems[:3], "the load_state_dict problems of every rank")
            lines = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
            raise ValueError("zerocore: the checkpoint was refused on every rank and nothing was loaded "
                             "(load_state_dict changed nothing):\n  " + "\n  ".join(lines))
        self.wait_for_params()
        self._drop_gathered()
        self.param_steps[:] = sd_format.write(sources, self.units, self.store)
        for g, sg in zip(self.param_groups, sources[0]["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in sg.items()
                      if k not in ("param_names", "params")})
        self.loss_scaler.load_state_dict(sources[0]["loss_scaler"])
        self.global_steps = int(sources[0]["global_steps"])
        self.skipped_steps = int(sources[0]["skipped_steps"])
        self._launch_gathers()
        self.wait_for_params()

    def save_checkpoint(self, ckpt_dir, tag: Optional[str] = None, client_state=None, lr_scheduler=None,
                        async_save: bool = False):
        """Write this rank's shards, one manifest and `latest` under ckpt_dir/tag (default
        "global_step{N}"), crash-safe: a crash or full disk midway leaves the previous checkpoints loadable
        ([Note: checkpoint layout] in checkpoint.py). Every rank must call it. client_state: tensors and plain
        Python data (loaded with weights_only=True); lr_scheduler: its state_dict() is saved too. Returns the
        checkpoint's folder.

        async_save=True returns once the shards are copied to host memory; the files are written in the
        background and the checkpoint is committed (manifest, `latest`) at the next save_checkpoint,
        load_checkpoint, wait_for_checkpoint() or close(), which raise if the background write failed
        ([Note: async save] in checkpoint.py).

        >>> # opt.save_checkpoint("ckpt", client_state={"epoch": 3}, lr_scheduler=sched, async_save=True)
        """
        from .checkpoint import save
        return save(self, ckpt_dir, tag, client_state=client_state, lr_scheduler=lr_scheduler,
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
        import copy
        from .checkpoint import extra_state, finish_pending, read_for_rank
        finish_pending(self)
        sources, extra, client, problems = read_for_rank(self, ckpt_dir, tag)
        saved_sched = client.get("lr_scheduler") if isinstance(client, dict) else None
        if lr_scheduler is not None and not problems:
            if saved_sched is None:
                problems.append("an lr_scheduler was given but the checkpoint holds no scheduler state")
            else:
                try:                         # on a copy: the load below must stay all or nothing. Shallow:
                    # a deep copy would copy the optimizer, its state and the model it references.
                    copy.copy(lr_scheduler).load_state_dict(saved_sched)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"the checkpoint's lr_scheduler state does not fit the given scheduler "
                                    f"({type(e).__name__}: {e})")
        self._load(sources, problems)
        if extra:
            ours = extra_state(self.model)
            with torch.no_grad():
                for k, v in extra.items():
                    ours[k].copy_(v)
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(saved_sched)
        return client.get("client_state") if isinstance(client, dict) else None

    # ------------------------------------------------------------------------------------- full parameters
    _warned_placeholders = False

    def _model_state_dict_post(self, module, state_dict, prefix, local_metadata) -> None:
        """Stage 3, model.state_dict(): a gathered parameter's entry would be a view of its unit's buffer,
        which is freed after use (reading it then reads freed memory), so it becomes a copy; a sharded one is
        its NaN placeholder, with one warning pointing at full_state_dict()."""
        sharded = []
        for key, v in state_dict.items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            found = self._partitioned_keys.get(name)
            if found is None or v is found[1]:       # not partitioned, or keep_vars=True (the Parameter)
                continue
            if self.residency.state[found[0]] is ParamState.SHARDED:
                sharded.append(key)
            else:
                state_dict[key] = v.clone()
        if sharded and not self._warned_placeholders:
            import warnings
            warnings.warn(f"zerocore: under stage 3 model.state_dict() holds placeholders (NaN) for the "
                          f"partitioned parameters ({sharded[:3]}...): use opt.full_state_dict() (every rank "
                          "calls it), or call model.state_dict() inside `with opt.gathered():`.", RuntimeWarning)
            self._warned_placeholders = True
    @contextlib.contextmanager
    def gathered(self, params=None, modifier_rank: Optional[int] = None):
        """Keep the full parameters of every unit (or of the units holding `params`) on every rank for a while.

        Stage 3 gathers each unit before its module runs and frees it after; inside this context nothing is
        freed, so a generation loop or an evaluation pass gathers once instead of per call (DeepSpeed users
        report ~10x slow token-by-token ZeRO-3 generation for want of this). With modifier_rank=r, changes rank
        r makes to the parameters inside the context are sent to every rank and become the parameters' (and
        the fp32 masters') new values at its end. Every rank must enter it together. Stages 1 and 2 hold full
        parameters anyway: the context then only applies modifier_rank's changes.

        >>> # with opt.gathered():
        >>> #     for _ in range(max_new_tokens): logits = model(ids); ids = torch.cat([ids, pick(logits)], 1)
        """
        self.comm._check_open()
        chosen = self._units_holding(params)
        self.wait_for_params()
        stage3 = self.config.stage == 3
        if not stage3:
            yield
            if modifier_rank is not None:
                self._adopt_from(modifier_rank, chosen)
            return
        sched = self.schedule
        were_sharded = [i for i in chosen if self.residency.state[i] is ParamState.SHARDED]
        for i in chosen:                          # unit order: the same gathers on every rank
            self.residency.ensure(i)
        sched.held.append(chosen)
        try:
            yield
            if modifier_rank is not None:
                self._adopt_from(modifier_rank, chosen)
        finally:
            sched.held.remove(chosen)
            still_held = {i for held in sched.held for i in held}
            for i in were_sharded:                # what was gathered before the context stays so
                if i not in still_held:
                    self.residency.free(i)

    def _units_holding(self, params) -> List[int]:
        if params is None:
            return list(range(len(self.units)))
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        where = {id(s.param): u.index for u in self.units for s in u.slots}
        unknown = [tuple(p.shape) for p in params if id(p) not in where]
        if unknown:
            raise ValueError(f"zerocore: {len(unknown)} of the given tensors (shapes {unknown[:3]}) are not "
                             "trainable parameters of this optimizer's model")
        return sorted({where[id(p)] for p in params})

    @torch.no_grad()
    def _adopt_from(self, src: int, chosen: List[int]) -> None:
        """Broadcast rank src's values of the chosen units and make them the shards (and masters)."""
        self.wait_for_params()
        pending = [self.comm.broadcast(self.units[i].flat, src, f"unit {i} parameters from rank {src}")
                   for i in chosen]
        for p in pending:
            p.wait()
        # One commit for all of them (every rank adopts the same units), then the in-memory shards.
        self.store.set_masters([(self.units[i], 0, self.units[i].shard_of(self.units[i].flat), None)
                                for i in chosen], agree=True)
        for i in chosen:
            u = self.units[i]
            if u.shard is not None:
                u.shard.copy_(u.shard_of(u.flat))
        if self.config.stage == 3:                 # the persistent units: every rank's slice again
            self.residency.refresh_persistent()
        else:
            self._launch_gathers()
        self.wait_for_params()

    def full_state_dict(self, rank0_only: bool = True) -> dict:
        """The model's state dict with full parameters (host tensors, keys as `model.state_dict()`'s),
        gathered one unit at a time so no rank holds more than one unit beyond its shards. Every rank must
        call it; with rank0_only (default) the other ranks get {}.

        Under stage 3, `model.parameters()` outside a forward pass or `opt.gathered()` are placeholders: full
        shapes, every element NaN (residency.py), and so are `model.state_dict()`'s entries for them. Use this
        (or zerocore.consolidate of a checkpoint) to save a model."""
        self.wait_for_params()
        keep = not rank0_only or self.rank == 0
        values = {}
        for u in self.units:
            was_sharded = self.config.stage == 3 and not u.persistent and \
                self.residency.state[u.index] is ParamState.SHARDED
            if self.config.stage == 3:
                self.residency.ensure(u.index)
            if keep:
                for s in u.slots:
                    values[id(s.param)] = s.param.detach().to("cpu", copy=True)
            if was_sharded:
                self.residency.free(u.index)
        if not keep:
            return {}
        return {k: values[id(v)] if id(v) in values else v.detach().to("cpu", copy=True)
                for k, v in self.model.state_dict(keep_vars=True).items()}

    # ------------------------------------------------------------------------------------------- accounting
    def memory_report(self) -> dict:
        """Bytes this rank holds in parameters, gradients, fp32 masters, Adam state and pooled buckets,
        measured from the live tensors, beside the ZeRO formula for this stage and precision."""
        self.wait_for_params()
        return memory_report(self.units, self.store, self.reducer, stage=self.config.stage, mixed=self.mixed,
                             offload=self.offload, psi=self.psi, world_size=self.world_size,
                             host_cache=host_memory.report() if self._uses_host_cache else None,
                             peak_gathered=self.residency.peak_live_bytes if self.config.stage == 3 else 0)
