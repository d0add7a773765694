"""How one unit's gradients become this rank's reduced gradient shard: the reduction strategies.

[Note: reduction strategies]
The reducer (reducer.py) decides *when* a unit is reduced (unit order, in flight at most max_inflight); a
strategy decides *how*. Each strategy takes a gradient as autograd delivers it, launches the unit's
collective(s), and once they complete leaves the unit's reduced shard where the step reads it:

  InPlace          stage 1, reduce dtype = gradient dtype: parameters' .grad are views of one persistent
                   flat buffer per unit, so autograd accumulates in place across micro-steps; at the
                   accumulation boundary the flat buffer is reduced in place (no bucket). The shard is this
                   rank's slice of it; the step divides by N (fp16: the buffer is divided by N first).
  PackAtBoundary   stage 1 otherwise (a dtype change, or a GPU model whose shards live on the host): .grad
                   accumulates as autograd makes it; at the boundary the gradients are packed into a bucket
                   (cast, pre-divided by N) and reduce-scattered into the shard store.
  PackOnArrival    stages 2 and 3: each gradient is packed into its unit's bucket the moment it arrives and
                   the full gradient is freed; the bucket is reduce-scattered every backward pass and this
                   rank's shard copied (first micro-step) or added (later ones) into the shard store.
  Direct           stages 2 and 3 on the "all_reduce" strategy (gloo, host tensors), for units where one
                   parameter makes up at least half of the unit and 1 MiB or more: that gradient is kept as
                   autograd made it and all-reduced in place, the unit's other gradients are packed into a
                   compact bucket and all-reduced; this rank's slices are copied (scaled by 1/N) into the
                   store. It saves the copy into the bucket and a unit-sized block per unit in flight (~16 MiB
                   per rank at the bench MLP's peak); each collective moves the same bytes.

A strategy that `reduces_every_pass` writes the store each backward (first pass: copy, later: add); one that
does not reduces once per accumulation window. Gradients are `prescaled` (divided by N before summing, which
keeps fp16 sums in range) by every strategy but InPlace, which does so for fp16 only. choose() picks the strategy of every unit (one instance
per kind serves all of its units, keyed by unit index); the stage only enters there.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from zerocore.ops import buckets as bucket_ops

from .buckets import BucketPool
from .units import Unit, unit_views


# A parameter is reduced directly (Direct) if it is at least this big and half of its unit.
DIRECT_MIN_BYTES = 1 << 20


class Reduction:
    """What every strategy shares: the units, the collectives, the bucket pool and the shard store views."""

    reduces_every_pass = True
    prescaled = True

    def __init__(self, units: List[Unit], comm, shard_views: Sequence[Optional[torch.Tensor]],
                 reduce_dtype: torch.dtype):
        self.units, self.comm, self.shard_views = units, comm, shard_views
        self.pool: Optional[BucketPool] = None        # shared by every strategy of an engine: choose() sets it
        self.reduce_dtype = reduce_dtype
        self.pack_scale = 1.0 / comm.world_size if self.prescaled else 1.0
        self.buckets: Dict[int, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------- the interface
    def bucket_numel(self, u: int) -> int:
        """Elements of the bucket unit u needs while it is reduced (0: none); sizes the pool's slabs."""
        return self.units[u].padded_numel

    def take(self, u: int, k: int, p: torch.nn.Parameter, again: bool) -> None:
        """Parameter p (slot k of unit u) received a gradient; `again`: it already had one in this pass."""

    def launch(self, u: int, missing: List[int], first: bool) -> list:
        """Start unit u's collective(s); `missing`: slots that got no gradient in this pass (they count as zero;
        strategies that reduce once per window look at the accumulated .grad instead); `first`: the result
        replaces the store's shard (else it adds to it). Returns the pending works."""
        raise NotImplementedError

    def finalize(self, u: int, results: list, first: bool) -> None:
        """The collectives completed: put this rank's shard where the step reads it, release the bucket."""
        raise NotImplementedError

    def shard(self, u: int) -> torch.Tensor:
        """Unit u's reduced gradient shard (valid after the window's last backward)."""
        return self.shard_views[u]

    def discard(self, u: int) -> None:
        """Forget unit u's partial work of an interrupted pass (its collectives were waited for)."""
        self._release_bucket(u)

    def clear_window(self, u: int) -> None:
        """The accumulation window ended (a step, or gradients discarded)."""

    def rebind(self, u: int, keep_values: bool = True) -> None:
        """Before a forward or a step: restore gradient views someone replaced (InPlace only)."""

    def held_tensors(self, u: int) -> List[torch.Tensor]:
        """Gradient storage this strategy holds for unit u beyond the parameters' .grad and the pool."""
        return []

    # ------------------------------------------------------------------------------------------- helpers
    def _bucket(self, u: int) -> torch.Tensor:
        b = self.buckets.get(u)
        if b is None:
            unit, numel = self.units[u], self.bucket_numel(u)
            b = self.buckets[u] = self.pool.get(numel, self.reduce_dtype, unit.flat.device)
            if numel == unit.padded_numel:
                b[unit.numel:].zero_()                  # the padding reduces to zeros
        return b

    def _release_bucket(self, u: int) -> None:
        b = self.buckets.pop(u, None)
        if b is not None:
            self.pool.put(b)

    def _offset(self, u: int, k: int) -> int:
        """Where slot k of unit u lies in the unit's bucket."""
        return self.units[u].slots[k].offset

    def _zero(self, u: int, bucket: torch.Tensor, slots) -> None:
        for k in slots:
            at = self._offset(u, k)
            bucket[at:at + self.units[u].slots[k].numel].zero_()

    def _reduce_bucket(self, u: int, first: bool) -> list:
        """One reduce-scatter of unit u's full bucket, straight into the store's shard where it can."""
        unit, flat, store = self.units[u], self._bucket(u), self.shard_views[u]
        out = store if (store is not None and first and store.dtype == flat.dtype
                        and store.device == flat.device) else None
        return [self.comm.reduce(flat, unit.shard_numel, f"unit {u} gradients ({unit.numel} elements, "
                                                          f"{flat.dtype})", out=out)]

    def _store_bucket_shard(self, u: int, shard: torch.Tensor, first: bool) -> None:
        dst = self.shard_views[u]
        if shard.data_ptr() != dst.data_ptr():
            if first:
                # Offload of a GPU model: an async device-to-host copy into the pinned store (step() syncs).
                dst.copy_(shard, non_blocking=shard.device != dst.device)
            else:
                dst.add_(shard if shard.device == dst.device else shard.to(dst.device))
        self._release_bucket(u)


class InPlace(Reduction):
    """Stage 1: reduce each unit's persistent flat gradient buffer in place (see the note)."""

    reduces_every_pass = False
    prescaled = False

    def __init__(self, *args, grad_dtype: torch.dtype):
        # fp16 sums of N ranks' loss-scaled gradients overflow where their mean would not: divide first.
        self.prescaled = grad_dtype == torch.float16
        super().__init__(*args)
        self.grad_flats = [torch.zeros(u.padded_numel, dtype=grad_dtype, device=u.flat.device) for u in self.units]
        self.grad_views: List[List[torch.Tensor]] = [[] for _ in self.units]
        for u in self.units:
            self._bind(u)

    def bucket_numel(self, u: int) -> int:
        return 0

    def _bind(self, u: Unit) -> None:
        self.grad_views[u.index] = unit_views(u, self.grad_flats[u.index])
        for s, v in zip(u.slots, self.grad_views[u.index]):
            s.param.grad = v

    def take(self, u, k, p, again) -> None:
        view = self.grad_views[u][k]
        if p.grad is not view:           # someone replaced .grad (e.g. module.zero_grad(set_to_none=True))
            view.copy_(p.grad)
            p.grad = view

    def launch(self, u, missing, first) -> list:
        unit, flat = self.units[u], self.grad_flats[u]    # a missing gradient is already zeros in the buffer
        if self.prescaled:
            flat.mul_(self.pack_scale)
        return [self.comm.reduce(flat, unit.shard_numel, f"unit {u} gradients ({unit.numel} elements, {flat.dtype})")]

    def finalize(self, u, results, first) -> None:
        own = self.shard(u)
        if results[0].data_ptr() != own.data_ptr():
            own.copy_(results[0])

    def shard(self, u: int) -> torch.Tensor:
        return self.units[u].shard_of(self.grad_flats[u])

    def clear_window(self, u: int) -> None:
        self.grad_flats[u].zero_()

    def discard(self, u: int) -> None:
        self.rebind(u, keep_values=False)        # (the reducer clears the window next)

    def rebind(self, u: int, keep_values: bool = True) -> None:
        """If something replaced a parameter's .grad view or its storage (module.to() applies to gradients too),
        copy its values back into the unit's buffer (unless discarding) and restore the views."""
        unit, flat, moved = self.units[u], self.grad_flats[u], False
        base, itemsize = flat.data_ptr(), flat.element_size()    # runs before every forward: no slicing
        for s, v in zip(unit.slots, self.grad_views[u]):
            g = s.param.grad
            if g is v and (s.numel == 0 or v.data_ptr() == base + s.offset * itemsize):
                continue
            moved = True
            if keep_values and g is not None and g.shape == s.shape:
                flat[s.offset:s.offset + s.numel].copy_(g.detach().reshape(-1))
        if moved:
            self._bind(unit)

    def held_tensors(self, u: int) -> List[torch.Tensor]:
        return [self.grad_flats[u]]


class PackAtBoundary(Reduction):
    """Stage 1 with a dtype change or a host shard store: pack the accumulated .grad at the boundary."""

    reduces_every_pass = False

    def launch(self, u, missing, first) -> list:
        unit, bucket = self.units[u], self._bucket(u)
        present = [k for k, s in enumerate(unit.slots) if s.param.grad is not None]
        if present:
            bucket_ops.pack([unit.slots[k].param.grad.contiguous() for k in present], bucket,
                            [unit.slots[k].offset for k in present], scale=self.pack_scale)
        self._zero(u, bucket, [k for k in range(len(unit.slots)) if k not in present])
        return self._reduce_bucket(u, first)

    def finalize(self, u, results, first) -> None:
        self._store_bucket_shard(u, results[0], first)
        self.clear_window(u)

    def clear_window(self, u: int) -> None:
        for s in self.units[u].slots:            # the accumulated .grad was packed (or is discarded)
            s.param.grad = None


class PackOnArrival(Reduction):
    """Stages 2 and 3: pack each gradient into the unit's bucket as it arrives and free it (see the note)."""

    def take(self, u, k, p, again) -> None:
        grad = p.grad
        p.grad = None                    # the full gradient lives only until it is packed
        bucket_ops.pack([grad.contiguous()], self._bucket(u), [self._offset(u, k)], scale=self.pack_scale,
                        accumulate=again)

    def launch(self, u, missing, first) -> list:
        self._zero(u, self._bucket(u), missing)
        return self._reduce_bucket(u, first)

    def finalize(self, u, results, first) -> None:
        self._store_bucket_shard(u, results[0], first)

    def discard(self, u: int) -> None:
        super().discard(u)
        for s in self.units[u].slots:            # a gradient that arrived after its hook raised
            s.param.grad = None


@dataclass
class DirectPlan:
    """A unit reduced by Direct: `direct` slot indices each get their own all_reduce; the `rest` are packed
    into a compact bucket at `rest_offsets` (rest_numel elements)."""
    direct: List[int]
    rest: List[int]
    rest_offsets: Dict[int, int]
    rest_numel: int


def plan_direct(unit: Unit, itemsize: int) -> Optional[DirectPlan]:
    direct = [k for k, s in enumerate(unit.slots)
              if s.numel * itemsize >= DIRECT_MIN_BYTES and 2 * s.numel >= unit.numel]
    if not direct:
        return None
    rest = [k for k in range(len(unit.slots)) if k not in direct]
    offsets, at = {}, 0
    for k in rest:
        offsets[k] = at
        at += unit.slots[k].numel
    return DirectPlan(direct, rest, offsets, at)


class Direct(PackOnArrival):
    """Stages 2 and 3 on gloo: all-reduce a unit's big gradients where autograd made them (see the note)."""

    def __init__(self, *args, plans: Dict[int, DirectPlan], fp16: bool):
        super().__init__(*args)
        self.plans = plans
        self.held: Dict[int, Dict[int, torch.Tensor]] = {u: {} for u in plans}
        # fp16 gradients are pre-divided by N before they are summed (range); others are scaled when copied out.
        self.held_prescale = fp16
        self.copies = 0                  # directly reduced gradients that had to be copied first (shared memory)

    def bucket_numel(self, u: int) -> int:
        return self.plans[u].rest_numel

    def _offset(self, u: int, k: int) -> int:
        return self.plans[u].rest_offsets[k]

    def take(self, u, k, p, again) -> None:
        if k not in self.plans[u].direct:
            super().take(u, k, p, again)
            return
        grad = p.grad
        p.grad = None
        # 2 = this variable and getrefcount's argument: no hook before ours kept the tensor. (Its own statement:
        # inside the call below the positional `grad` would already count once more.)
        kept_elsewhere = sys.getrefcount(grad) > 2
        self._hold(u, k, grad, kept_elsewhere)

    def _hold(self, u: int, k: int, grad: torch.Tensor, kept_elsewhere: bool) -> None:
        scale = self.pack_scale if self.held_prescale else 1.0
        held = self.held[u].get(k)
        if held is not None:             # a second gradient in this pass (e.g. reentrant checkpointing)
            held.add_(grad.reshape(-1), alpha=scale)
            return
        # Reduced in place and freed afterwards, so it must be ours alone: usually autograd's fresh tensor, but a
        # parameter reached through a view gets a view of a gradient other backward nodes still read, and a hook
        # may have kept the tensor; those are copied.
        if kept_elsewhere or not bucket_ops.is_sole_owner(grad):
            grad = grad.clone(memory_format=torch.contiguous_format)
            self.copies += 1
        g = grad.view(-1)
        if scale != 1.0:
            g.mul_(scale)
        self.held[u][k] = g

    def launch(self, u, missing, first) -> list:
        unit, plan, pendings = self.units[u], self.plans[u], []
        for k in plan.direct:
            s = unit.slots[k]
            g = self.held[u].get(k)
            if g is None:                # no gradient on this rank in this pass counts as zero
                g = self.held[u][k] = torch.zeros(s.numel, dtype=self.reduce_dtype, device=unit.flat.device)
            pendings.append(self.comm.all_reduce(g, f"unit {u} gradient of {s.name} ({s.numel} elements, {g.dtype})"))
        if plan.rest:
            b = self._bucket(u)
            self._zero(u, b, [k for k in plan.rest if k in missing])
            pendings.append(self.comm.all_reduce(b, f"unit {u} other gradients ({plan.rest_numel} elements, {b.dtype})"))
        return pendings

    def finalize(self, u, results, first) -> None:
        # Copy (first micro-step) or add this rank's slices of the reduced gradients into the shard store.
        unit, plan, store = self.units[u], self.plans[u], self.shard_views[u]
        direct_scale = 1.0 if self.held_prescale else self.pack_scale
        direct = [(k, self.held[u].pop(k), 0, direct_scale) for k in plan.direct]
        rest = [(k, self.buckets.get(u), plan.rest_offsets[k], 1.0) for k in plan.rest]
        for k, src, base, scale in direct + rest:
            s = unit.slots[k]
            if s.owned_numel == 0:
                continue
            part = src[base + s.own_start:base + s.own_end]
            dst = store[s.shard_pos:s.shard_pos + s.owned_numel]
            if first:
                torch.mul(part, scale, out=dst) if scale != 1.0 else dst.copy_(part)
            else:
                dst.add_(part, alpha=scale)
        for _, g, _, _ in direct:
            # gloo's worker thread drops its reference to a reduced tensor only a moment after wait() returns, so
            # free the memory now: otherwise, now and then, the next gradient cannot take this block and one more
            # gradient-sized block is live at backward's peak (measured: +16 MiB per rank on the bench MLP).
            g.untyped_storage().resize_(0)
        self._release_bucket(u)

    def discard(self, u: int) -> None:
        self.held[u].clear()
        super().discard(u)

    def held_tensors(self, u: int) -> List[torch.Tensor]:
        return list(self.held[u].values())


def choose(units: List[Unit], comm, shard_views: Sequence[Optional[torch.Tensor]], *, stage: int,
           grad_dtype: torch.dtype, reduce_dtype: torch.dtype, shard_store: Optional[torch.Tensor],
           max_inflight: int) -> List[Reduction]:
    """The strategy of every unit (see the note), all sharing one bucket pool that keeps as many slabs of the biggest
    bucket as can be live at once (max_inflight reducing + one filling), so a steady-state backward allocates
    and frees no bucket (see buckets.host_buffer for why that matters on the host)."""
    shared = [units, comm, shard_views, reduce_dtype]
    if stage == 1:
        # In place unless a dtype change forces a bucket, or the reduced shards must land in a store elsewhere
        # (offload of a GPU model: the store is on the host).
        if reduce_dtype == grad_dtype and (shard_store is None or shard_store.device == units[0].flat.device):
            chosen: Reduction = InPlace(*shared, grad_dtype=grad_dtype)
        else:
            chosen = PackAtBoundary(*shared)
        per_unit = [chosen] * len(units)
    else:
        itemsize = torch.empty((), dtype=grad_dtype).element_size()
        # (Not with shard groups: a gradient all-reduced whole over every rank would cross the slow links whole.)
        can_direct = (comm.strategy == "all_reduce" and reduce_dtype == grad_dtype and comm.replicas == 1
                      and all(u.flat.device.type == "cpu" for u in units))
        plans = {u.index: plan for u in units
                 for plan in [plan_direct(u, itemsize) if can_direct else None] if plan is not None}
        packed = PackOnArrival(*shared)
        direct = Direct(*shared, plans=plans, fp16=grad_dtype == torch.float16) if plans else None
        per_unit = [direct if u.index in plans else packed for u in units]
    slab = max((s.bucket_numel(u.index) for u, s in zip(units, per_unit)), default=0)
    pool = BucketPool(max_free_bytes=(max_inflight + 1) * slab * torch.finfo(reduce_dtype).bits // 8,
                      slab_numel=slab)
    for strategy in set(per_unit):
        strategy.pool = pool
    return per_unit
