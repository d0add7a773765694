"""Full parameter values on demand: `opt.gathered()`, `zerocore.gathered_parameters`, `opt.full_state_dict()`
and what `model.state_dict()` holds under stage 3.

[Note: full parameters]
Stage 3 keeps only shards between uses; a partitioned parameter is a NaN placeholder of its full shape there
(residency.py). Code that needs full values gets them through this file, one unit at a time where it can:
  - gathered(params=None, modifier_rank=None): the units holding `params` (default all) stay gathered on every
    rank for the body of a `with`; with modifier_rank=r, rank r's changes become every rank's values (and the
    fp32 masters') at its end. Stages 1 and 2 hold full parameters anyway: there it only applies the changes.
  - full_state_dict(): model.state_dict() with full values (host copies), gathered one unit at a time; with
    master_weights=True the fp32 masters of mixed-precision training instead of the 16-bit parameters.
  - model.state_dict() under stage 3: entries of gathered units are copies (the unit's buffer is freed after
    use); entries of sharded ones stay the placeholders, with one warning pointing here.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import List, Optional

import torch

from .residency import ParamState


# Open optimizers, so gathered_parameters can find the one that holds a parameter (weak: keeps none alive).
_OPEN: "weakref.WeakSet" = weakref.WeakSet()


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


class FullParameters:
    """Full values of partitioned (stage 3) or replicated (stages 1, 2) parameters (see the note above)."""

    def __init__(self, model: torch.nn.Module, units, comm, store, schedule, residency=None):
        self.model, self.units, self.comm, self.store = model, units, comm, store
        self.schedule = schedule             # the stage's gather schedule: wait_all(), launch(), held (stage 3)
        self.residency = residency           # stage 3 only
        self.where = {id(s.param): u.index for u in units for s in u.slots}
        self._warned_placeholders = False
        self.partitioned_keys = {}           # stage 3: model.state_dict() key -> (unit, parameter)
        if residency is not None:
            unit_of = {id(s.param): u.index for u in units if not u.persistent for s in u.slots}
            self.partitioned_keys = {n: (unit_of[id(p)], p) for n, p in model.named_parameters(remove_duplicate=False)
                                     if id(p) in unit_of}

    def _is_sharded(self, i: int) -> bool:
        return self.residency is not None and self.residency.state[i] is ParamState.SHARDED

    # ------------------------------------------------------------------------------------------ gathered()
    @contextlib.contextmanager
    def gathered(self, params=None, modifier_rank: Optional[int] = None):
        chosen = self.units_holding(params)
        self.schedule.wait_all()
        if self.residency is None:
            yield
            if modifier_rank is not None:
                self.adopt_from(modifier_rank, chosen)
            return
        held = self.schedule.held
        were_sharded = [i for i in chosen if self._is_sharded(i)]
        for i in chosen:                          # unit order: the same gathers on every rank
            self.residency.ensure(i)
        held.append(chosen)
        try:
            yield
            if modifier_rank is not None:
                self.adopt_from(modifier_rank, chosen)
        finally:
            held.remove(chosen)
            still_held = {i for h in held for i in h}
            for i in were_sharded:                # what was gathered before the context stays so
                if i not in still_held:
                    self.residency.free(i)

    def units_holding(self, params) -> List[int]:
        if params is None:
            return list(range(len(self.units)))
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        unknown = [tuple(p.shape) for p in params if id(p) not in self.where]
        if unknown:
            raise ValueError(f"zerocore: {len(unknown)} of the given tensors (shapes {unknown[:3]}) are not "
                             "trainable parameters of this optimizer's model")
        return sorted({self.where[id(p)] for p in params})

    @torch.no_grad()
    def adopt_from(self, src: int, chosen: List[int]) -> None:
        """Broadcast rank src's values of the chosen units and make them the shards (and masters)."""
        self.schedule.wait_all()
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
        if self.residency is not None:            # the persistent units: every rank's slice again
            self.residency.refresh_persistent()
        else:
            self.schedule.launch()
        self.schedule.wait_all()

    # ------------------------------------------------------------------------------------- state dicts
    def full_state_dict(self, rank0_only: bool = True, master_weights: bool = False) -> dict:
        self.schedule.wait_all()
        keep = not rank0_only or self.comm.rank == 0
        values = {}
        masters = master_weights and self.store.separate_masters
        for u in self.units:
            if masters:
                flat = self._gather_masters(u)
                if keep:
                    for s in u.slots:
                        values[id(s.param)] = flat[s.offset:s.offset + s.numel].view(s.shape).to("cpu", copy=True)
                continue
            was_sharded = not u.persistent and self._is_sharded(u.index)
            if self.residency is not None:
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

    def _gather_masters(self, u) -> torch.Tensor:
        """Unit u's fp32 masters, whole: this rank's shard read from the store (memory or NVMe), the others'
        gathered in the shard group, on the device the unit's collectives use."""
        off, n = self.store.offsets[u.index], u.shard_numel
        flat = torch.empty(u.padded_numel, dtype=torch.float32, device=u.flat.device)
        own = u.shard_of(flat)
        problem = None
        try:
            with self.store.read(self.store.windows_meeting([(off, off + n)])) as windows:
                for w in windows:
                    cut = w.clip(off, off + n)
                    if cut is not None:
                        own[cut[0] - off:cut[1] - off].copy_(w.master[cut[0] - w.start:cut[1] - w.start])
        except Exception as e:  # noqa: BLE001 - e.g. an NVMe read: every rank must hear of it before the gather
            problem = e
        flags = self.comm.all_gather_rows(torch.tensor([float(problem is not None)], device=self.comm.device),
                                          f"whether every rank read unit {u.index}'s fp32 masters")
        if flags.any():
            bad = [r for r, f in enumerate(flags[:, 0].tolist()) if f]
            raise RuntimeError(f"zerocore: full_state_dict: rank(s) {bad} could not read the fp32 masters of unit "
                               f"{u.index}{f' ({problem})' if problem is not None else ''}") from problem
        self.comm.gather(flat, n, f"unit {u.index} fp32 masters ({u.numel} elements)").wait()
        return flat

    def model_state_dict_post(self, module, state_dict, prefix, local_metadata) -> None:
        """Stage 3, model.state_dict(): a gathered parameter's entry would be a view of its unit's buffer,
        which is freed after use (reading it then reads freed memory), so it becomes a copy; a sharded one is
        its NaN placeholder, with one warning pointing at full_state_dict()."""
        sharded = []
        for key, v in state_dict.items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            found = self.partitioned_keys.get(name)
            if found is None or v is found[1]:       # not partitioned, or keep_vars=True (the Parameter)
                continue
            if self._is_sharded(found[0]):
                sharded.append(key)
            else:
                state_dict[key] = v.clone()
        if sharded and not self._warned_placeholders:
            warnings.warn(f"zerocore: under stage 3 model.state_dict() holds placeholders (NaN) for the "
                          f"partitioned parameters ({sharded[:3]}...): use opt.full_state_dict() (every rank "
                          "calls it), or call model.state_dict() inside `with opt.gathered():`.", RuntimeWarning)
            self._warned_placeholders = True
