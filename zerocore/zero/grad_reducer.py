"""From autograd gradients to one reduced gradient shard per unit.

[Note: gradient flow]
Stage 2: a post-accumulate-grad hook on every trainable parameter packs its gradient (cast and pre-divided by
N, with the C++ pack op) into its unit's bucket and frees the full gradient at once. When the unit's last
gradient has arrived the unit's reduction is launched asynchronously and overlaps the rest of backward; when it
completes, this rank's reduced shard is copied (first micro-step) or added (later micro-steps) into the
persistent shard store and the bucket goes back to a pool of same-sized slabs (on the host: each on its own
mmap, see _host_buffer) that keeps as many as backward can have live, so steady-state steps allocate none.
Stage 2 on the "all_reduce" strategy (gloo, host tensors): a parameter that makes up at least half of its unit
and 1 MiB or more is reduced *directly*: its hook keeps autograd's gradient tensor instead of packing it, the
unit's reduction is one in-place all_reduce of that tensor plus one of a compact bucket holding the unit's other
gradients, and this rank's slices are copied (scaled by 1/N) into the shard store. That saves the copy into the
bucket and one unit-sized block per unit in flight (~16 MiB per rank at the bench MLP's peak, where every
unit is one 16 MiB weight and its bias); each collective moves the same bytes as before.
Stage 1: parameters' .grad are views of one persistent flat gradient buffer per unit, so autograd accumulates
in place across micro-steps; on the last micro-step of an accumulation window each unit is reduced in place
as soon as its gradients are complete (same hooks, no pack). If reduce_dtype differs from the gradients'
dtype, stage 1 instead packs the full gradients into a bucket at that point, like stage 2.

Reductions are launched strictly in unit order (a unit waits for the units before it), so every rank issues
the same collectives in the same order even when gradients arrive in different orders. At the end of each
backward pass (an autograd engine callback) the remaining units are launched, gradients that never arrived
counting as zeros, and all reductions are waited for. Which parameters received a gradient during the window
is recorded so the step can skip (like torch.optim) those that got none on any rank.
"""
from __future__ import annotations

import mmap
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch.autograd import Variable

from zerocore.ops import buckets as bucket_ops

from .collectives import Collectives
from .phases import Phase
from .units import Unit, unit_views


def _host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on its own anonymous mmap, outside glibc's heap.

    Why: a multi-MB torch.empty is mmapped by glibc, and freeing it raises glibc's *dynamic* mmap threshold to
    its size; from then on every gradient and bucket of that size comes from the heap, where gradients (e.g.
    16 MiB) and buckets (e.g. 16.8 MiB) of different sizes fragment it and the freed holes stay resident
    (~90 MiB per rank in bench/results/zero.md). Buffers of our own never touch that threshold, and are
    returned to the OS as soon as they are dropped.
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=numel)


# A parameter is reduced directly (see the note) if it is at least this big and half of its unit.
DIRECT_MIN_BYTES = 1 << 20


@dataclass
class DirectPlan:
    """How a unit with directly reduced parameters is reduced: `direct` slot indices each get their own
    all_reduce; the `rest` are packed into a compact bucket at `rest_offsets` (rest_numel elements)."""
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


class BucketPool:
    """Reuses freed unit buckets so steady-state steps neither allocate nor fault pages.

    With `slab_numel` every request of up to that many elements is served by a view of one same-sized slab
    (the biggest unit), so units of different sizes share slabs and the pool never holds more than
    max_free_bytes // slab bytes of them. Host slabs of 1 MiB and more live on their own mmap (_host_buffer).
    Without `slab_numel`, buffers are kept per exact (numel, dtype, device).
    """

    def __init__(self, max_free_bytes: int, slab_numel: Optional[int] = None):
        self.max_free_bytes = max_free_bytes
        self.slab_numel = slab_numel
        self.free: Dict[tuple, List[torch.Tensor]] = {}
        self.free_bytes = 0
        self.base_of: Dict[int, torch.Tensor] = {}    # data_ptr of a handed-out view -> its slab

    def _alloc(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type == "cpu" and numel * torch.empty((), dtype=dtype).element_size() >= (1 << 20):
            return _host_buffer(numel, dtype)
        return torch.empty(numel, dtype=dtype, device=device)

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = self.slab_numel if self.slab_numel is not None and numel <= self.slab_numel else numel
        lst = self.free.get((size, dtype, device))
        if lst:
            t = lst.pop()
            self.free_bytes -= t.numel() * t.element_size()
        else:
            t = self._alloc(size, dtype, device)
        if size == numel:
            return t
        view = t[:numel]
        self.base_of[view.data_ptr()] = t
        return view

    def put(self, t: torch.Tensor) -> None:
        t = self.base_of.pop(t.data_ptr(), t)
        nbytes = t.numel() * t.element_size()
        if self.free_bytes + nbytes <= self.max_free_bytes:
            self.free.setdefault((t.numel(), t.dtype, t.device), []).append(t)
            self.free_bytes += nbytes

    def clear(self) -> None:
        self.free.clear()
        self.base_of.clear()
        self.free_bytes = 0


class GradReducer:
    """Owns gradient hooks, buckets and reductions for a list of units (see the note above)."""

    def __init__(self, units: List[Unit], comm: Collectives, *, stage: int, grad_dtype: torch.dtype,
                 reduce_dtype: torch.dtype, accumulation_steps: int, overlap: bool, max_inflight: int,
                 shard_store: Optional[torch.Tensor], shard_offsets: List[int], num_params: int,
                 phases=None):
        self.units, self.comm, self.stage = units, comm, stage
        self.phases = phases            # PhaseAgreement: a reducing backward first checks every rank is in one
        self.reduce_dtype, self.accumulation_steps = reduce_dtype, accumulation_steps
        self.overlap, self.max_inflight = overlap, max_inflight
        self.world_size = comm.world_size
        # Stage 1 reduces the persistent gradient buffers in place unless a dtype change forces a bucket, or the
        # reduced shards must land in a store elsewhere (offload of a GPU model: the store is on the host).
        self.in_place = stage == 1 and reduce_dtype == grad_dtype and (
            shard_store is None or shard_store.device == units[0].flat.device)
        self.shard_store = shard_store
        self.shard_views = [None if shard_store is None else shard_store[o:o + u.shard_numel]
                            for u, o in zip(units, shard_offsets)]
        # Buckets are pre-divided by N (keeps fp16 sums in range); the rest of the averaging is done by the step.
        self.pack_scale = 1.0 if self.in_place else 1.0 / self.world_size
        self.grad_divisor = accumulation_steps * (self.world_size if self.in_place else 1)
        itemsize = torch.empty((), dtype=grad_dtype).element_size()
        can_direct = (stage >= 2 and comm.strategy == "all_reduce" and reduce_dtype == grad_dtype
                      and all(u.flat.device.type == "cpu" for u in units))
        self.plans: List[Optional[DirectPlan]] = [plan_direct(u, itemsize) if can_direct else None for u in units]
        # fp16 gradients are pre-divided by N before they are summed (range); others are scaled when copied out.
        self.direct_prescale = grad_dtype == torch.float16
        self.direct_copies = 0          # directly reduced gradients that had to be copied first (shared memory)
        # Keep as many slabs as can be live at once (max_inflight reducing + one filling), so a steady-state
        # backward allocates and frees no bucket at all (see _host_buffer for why that matters on the host).
        slab = max((u.padded_numel if plan is None else plan.rest_numel for u, plan in zip(units, self.plans)),
                   default=0)
        self.pool = BucketPool(max_free_bytes=(max_inflight + 1) * slab * torch.finfo(reduce_dtype).bits // 8,
                               slab_numel=slab)
        self.where = {}
        for u in units:
            for k, s in enumerate(u.slots):
                self.where[id(s.param)] = (u.index, k)
        self.has_grad = bytearray(num_params)          # per parameter index, this accumulation window
        self.micro_steps = 0                            # completed backward passes in this window
        self.grad_flats: List[Optional[torch.Tensor]] = [None] * len(units)
        self.grad_views: List[List[torch.Tensor]] = [[] for _ in units]
        if self.in_place:
            for u in units:
                self.grad_flats[u.index] = torch.zeros(u.padded_numel, dtype=grad_dtype, device=u.flat.device)
                self._bind_grad_views(u)
        self._reset_backward_state()
        self.handles = []
        self.in_backward = False
        self.failed = False             # a gradient hook or the end of a backward raised: see discard()
        # True while ZeroOptimizer.backward() drives the pass: it calls end_backward() itself once
        # loss.backward() returned. (An autograd callback is queued on the graph task that runs the first hook,
        # which under reentrant checkpointing can be a nested one that ends before the outer pass.)
        self.ended_by_caller = False
        # Stage 3 (hooks.py): called when unit u has every gradient of this pass, and when a pass ends.
        self.on_unit_complete: Optional[Callable[[int], None]] = None
        self.on_backward_end: Optional[Callable[[], None]] = None

    # ----------------------------------------------------------------------------------------------- setup
    def attach(self) -> None:
        for u in self.units:
            for s in u.slots:
                self.handles.append(s.param.register_post_accumulate_grad_hook(self._on_grad))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def drain(self) -> None:
        """Wait for every reduction still in flight (only non-empty if a backward was interrupted)."""
        while self.inflight:
            _, pendings = self.inflight.popleft()
            for p in pendings:
                p.wait()

    def _bind_grad_views(self, u: Unit) -> None:
        self.grad_views[u.index] = unit_views(u, self.grad_flats[u.index])
        for s, v in zip(u.slots, self.grad_views[u.index]):
            s.param.grad = v

    def rebind_grads(self, keep_values: bool = True) -> None:
        """Stage 1 in place: if something replaced a parameter's .grad view or its storage (module.to() applies
        to gradients too), copy its values back into the unit's gradient buffer (unless discarding) and
        restore the views."""
        if not self.in_place:
            return
        for u in self.units:
            flat, moved = self.grad_flats[u.index], False
            base, itemsize = flat.data_ptr(), flat.element_size()    # runs before every forward: no slicing
            for s, v in zip(u.slots, self.grad_views[u.index]):
                g = s.param.grad
                if g is v and (s.numel == 0 or v.data_ptr() == base + s.offset * itemsize):
                    continue
                moved = True
                if keep_values and g is not None and g.shape == s.shape:
                    flat[s.offset:s.offset + s.numel].copy_(g.detach().reshape(-1))
            if moved:
                self._bind_grad_views(u)

    def discard(self) -> None:
        """Forget everything since the last step, including what a backward pass that raised left behind:
        reductions still in flight are waited for, buckets go back to the pool, every gradient is dropped.

        A pass that raised part-way on this rank only has launched some of its units' reductions, and its peers
        (whose pass went on) launched all of theirs: the rest are launched here as zeros, so that every rank
        issued the same collectives and the next phase agreement tells the ranks apart (phases.py) instead of
        a reduction waiting for its peer until the timeout."""
        if self.in_backward and self.reducing:
            for u in range(self.next_launch, len(self.units)):
                self._launch(u)
            self.next_launch = len(self.units)
        self.drain()
        for b in self.buckets:
            if b is not None:
                self.pool.put(b)
        self.in_backward = False
        self.failed = False
        self._reset_backward_state()
        if self.on_backward_end is not None:
            self.on_backward_end()
        self.rebind_grads(keep_values=False)
        self.clear_window()
        if not self.in_place:
            for u in self.units:
                for s in u.slots:
                    s.param.grad = None

    def _reset_backward_state(self) -> None:
        n = len(self.units)
        self.arrived: List[set] = [set() for _ in range(n)]
        self.buckets: List[Optional[torch.Tensor]] = [None] * n
        self.held: List[Dict[int, torch.Tensor]] = [{} for _ in range(n)]   # directly reduced gradients
        self.ready = [False] * n
        self.next_launch = 0
        self.inflight = deque()
        self.reducing = False

    # ------------------------------------------------------------------------------------------- per grad
    def _is_boundary_pass(self) -> bool:
        return self.micro_steps == self.accumulation_steps - 1

    def _check_window(self) -> None:
        if self.micro_steps >= self.accumulation_steps:
            raise RuntimeError(
                f"zerocore: backward ran {self.micro_steps + 1} times since the last optimizer step but "
                f"gradient_accumulation_steps={self.accumulation_steps}. Call opt.step() after every backward "
                "(it updates on every k-th call) or after exactly k backward passes.")

    def begin_backward_if_needed(self) -> None:
        """Start this pass's bookkeeping (and its agreement) now, before stage 3 gathers for it."""
        if not self.in_backward:
            self._begin_backward()

    def _begin_backward(self) -> None:
        self._begin_pass()
        if not self.ended_by_caller:
            Variable._execution_engine.queue_callback(self.end_backward)

    def _begin_pass(self) -> None:
        self._check_window()
        reducing = self.stage >= 2 or self._is_boundary_pass()
        if reducing and self.phases is not None:
            # before any reduction: see [Note: phase agreement]
            self.phases.exchange(Phase.BACKWARD, micro_step=self.micro_steps)
        self.in_backward = True
        self.reducing = reducing

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        try:
            self._take_grad(p)
        except BaseException:
            self.failed = True
            raise

    def _take_grad(self, p: torch.nn.Parameter) -> None:
        if not self.in_backward:
            self._begin_backward()
        u, k = self.where[id(p)]
        unit, slot = self.units[u], self.units[u].slots[k]
        self.has_grad[slot.index] = 1
        if self.reducing and self.ready[u] and u < self.next_launch:
            raise RuntimeError(
                f"zerocore: parameter {slot.name!r} received a second gradient after its unit's reduction "
                "started (reentrant activation checkpointing?). Construct ZeroOptimizer with "
                "overlap_comm=False for such models.")
        if self.in_place:
            view = self.grad_views[u][k]
            if p.grad is not view:       # someone replaced .grad (e.g. module.zero_grad(set_to_none=True))
                view.copy_(p.grad)
                p.grad = view
        elif self.stage >= 2:
            grad = p.grad
            p.grad = None                # the full gradient lives only until it is packed (or reduced directly)
            plan = self.plans[u]
            if plan is not None and k in plan.direct:
                # 2 = this variable and getrefcount's argument: no hook before ours kept the tensor. (Its own
                # statement: inside the call below the positional `grad` would already count once more.)
                kept_elsewhere = sys.getrefcount(grad) > 2
                self._hold(u, k, grad, kept_elsewhere)
            else:
                bucket_ops.pack([grad.contiguous()], self._bucket(unit), [self._bucket_offset(u, k)],
                                scale=self.pack_scale, accumulate=k in self.arrived[u])
        if not self.reducing:
            return
        self.arrived[u].add(k)
        if self.on_unit_complete is not None and len(self.arrived[u]) == len(unit.slots):
            self.on_unit_complete(u)
        if self.overlap and len(self.arrived[u]) == len(unit.slots):
            self.ready[u] = True
            self._launch_ready()
        self._poll()

    def _hold(self, u: int, k: int, grad: torch.Tensor, kept_elsewhere: bool) -> None:
        scale = self.pack_scale if self.direct_prescale else 1.0
        held = self.held[u].get(k)
        if held is not None:             # a second gradient in this pass (e.g. reentrant checkpointing)
            held.add_(grad.reshape(-1), alpha=scale)
            return
        # Reduced in place and freed afterwards, so it must be ours alone: usually autograd's fresh tensor, but a
        # parameter reached through a view gets a view of a gradient other backward nodes still read, and a hook
        # may have kept the tensor; those are copied.
        if kept_elsewhere or not bucket_ops.is_sole_owner(grad):
            grad = grad.clone(memory_format=torch.contiguous_format)
            self.direct_copies += 1
        g = grad.view(-1)
        if scale != 1.0:
            g.mul_(scale)
        self.held[u][k] = g

    def _bucket_offset(self, u: int, k: int) -> int:
        """Where slot k of unit u lies in the unit's bucket (the unit's layout, or the compact rest layout)."""
        plan = self.plans[u]
        return self.units[u].slots[k].offset if plan is None else plan.rest_offsets[k]

    def _zero_missing(self, u: int, bucket: torch.Tensor, missing) -> None:
        # A parameter with no gradient on this rank in this pass counts as zero.
        for k in missing:
            at = self._bucket_offset(u, k)
            bucket[at:at + self.units[u].slots[k].numel].zero_()

    def _bucket(self, unit: Unit) -> torch.Tensor:
        b = self.buckets[unit.index]
        if b is None:
            plan = self.plans[unit.index]
            if plan is None:
                b = self.pool.get(unit.padded_numel, self.reduce_dtype, unit.flat.device)
                b[unit.numel:].zero_()
            else:
                b = self.pool.get(plan.rest_numel, self.reduce_dtype, unit.flat.device)
            self.buckets[unit.index] = b
        return b

    # --------------------------------------------------------------------------------------- reductions
    def _launch_ready(self) -> None:
        while self.next_launch < len(self.units) and self.ready[self.next_launch]:
            self._launch(self.next_launch)
            self.next_launch += 1

    def _launch(self, u: int) -> None:
        if self.plans[u] is not None:
            self._make_room()
            self.inflight.append((u, self._launch_direct(u, self.plans[u])))
            return
        unit = self.units[u]
        if self.in_place:
            flat = self.grad_flats[u]
        else:
            flat = self._bucket(unit)
            if self.stage == 1:          # stage 1 with a dtype change: pack the kept gradients now
                present = {k for k, s in enumerate(unit.slots) if s.param.grad is not None}
                if present:
                    kept = sorted(present)
                    bucket_ops.pack([unit.slots[k].param.grad.contiguous() for k in kept], flat,
                                    [unit.slots[k].offset for k in kept], scale=self.pack_scale)
                missing = [k for k in range(len(unit.slots)) if k not in present]
            else:
                missing = [k for k in range(len(unit.slots)) if k not in self.arrived[u]]
            self._zero_missing(u, flat, missing)
        self._make_room()
        what = f"unit {u} gradients ({unit.numel} elements, {flat.dtype})"
        store = self.shard_views[u]
        out = store if (store is not None and self._first_into_store() and store.dtype == flat.dtype
                        and store.device == flat.device) else None
        self.inflight.append((u, [self.comm.reduce(flat, unit.shard_numel, what, out=out)]))

    def _make_room(self) -> None:
        while len(self.inflight) >= self.max_inflight:
            self._finalize(*self.inflight.popleft())

    def _launch_direct(self, u: int, plan: DirectPlan) -> list:
        unit, pendings = self.units[u], []
        for k in plan.direct:
            s = unit.slots[k]
            g = self.held[u].get(k)
            if g is None:                # no gradient on this rank in this pass counts as zero
                g = self.held[u][k] = torch.zeros(s.numel, dtype=self.reduce_dtype, device=unit.flat.device)
            pendings.append(self.comm.all_reduce(g, f"unit {u} gradient of {s.name} ({s.numel} elements, {g.dtype})"))
        if plan.rest:
            b = self._bucket(unit)
            self._zero_missing(u, b, [k for k in plan.rest if k not in self.arrived[u]])
            pendings.append(self.comm.all_reduce(b, f"unit {u} other gradients ({plan.rest_numel} elements, {b.dtype})"))
        return pendings

    def _first_into_store(self) -> bool:
        # Stage 2 reduces every micro-step and accumulates; stage 1 writes the store once, at the boundary.
        return self.stage == 1 or self.micro_steps == 0

    def _poll(self) -> None:
        while self.inflight and all(p.is_completed() for p in self.inflight[0][1]):
            self._finalize(*self.inflight.popleft())

    def _finalize(self, u: int, pendings: list) -> None:
        results = [p.wait() for p in pendings]
        unit = self.units[u]
        if self.plans[u] is not None:
            self._finalize_direct(u, self.plans[u])
            return
        shard = results[0]
        if self.in_place:
            own = unit.shard_of(self.grad_flats[u])
            if shard.data_ptr() != own.data_ptr():
                own.copy_(shard)
            return
        dst = self.shard_views[u]
        if shard.data_ptr() != dst.data_ptr():
            if self._first_into_store():
                # Offload of a GPU model: an async device-to-host copy into the pinned store (step() syncs).
                dst.copy_(shard, non_blocking=shard.device != dst.device)
            else:
                dst.add_(shard if shard.device == dst.device else shard.to(dst.device))
        self.pool.put(self.buckets[u])
        self.buckets[u] = None
        if self.stage == 1:
            for s in unit.slots:
                s.param.grad = None

    def _finalize_direct(self, u: int, plan: DirectPlan) -> None:
        # Copy (first micro-step) or add this rank's slices of the reduced gradients into the shard store.
        unit, store, first = self.units[u], self.shard_views[u], self._first_into_store()
        direct_scale = 1.0 if self.direct_prescale else self.pack_scale
        direct = [(k, self.held[u].pop(k), 0, direct_scale) for k in plan.direct]
        rest = [(k, self.buckets[u], plan.rest_offsets[k], 1.0) for k in plan.rest]
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
        if self.buckets[u] is not None:
            self.pool.put(self.buckets[u])
            self.buckets[u] = None

    def end_backward(self) -> None:
        """End of a backward pass: launch what is left (in unit order), wait for everything."""
        try:
            self._end_backward()
        except BaseException:
            self.failed = True
            raise

    def _end_backward(self) -> None:
        if not self.in_backward:           # a backward that reached no trainable parameter still takes part
            self._begin_pass()
        if self.reducing:
            for u in range(self.next_launch, len(self.units)):
                self._launch(u)
            self.next_launch = len(self.units)
            while self.inflight:
                self._finalize(*self.inflight.popleft())
        self.micro_steps += 1
        self.in_backward = False
        self._reset_backward_state()
        if self.on_backward_end is not None:
            self.on_backward_end()

    # ------------------------------------------------------------------------------------------- window
    def reduced_shards(self) -> List[torch.Tensor]:
        """This rank's reduced gradient shard of every unit (valid after the window's last backward)."""
        if self.in_place:
            return [u.shard_of(f) for u, f in zip(self.units, self.grad_flats)]
        return self.shard_views

    def clear_window(self) -> None:
        """Forget this accumulation window's gradients (after a step, or to discard them)."""
        self.micro_steps = 0
        self.has_grad = bytearray(len(self.has_grad))
        if self.in_place:
            for f in self.grad_flats:
                f.zero_()
        elif self.stage == 1:
            for u in self.units:
                for s in u.slots:
                    s.param.grad = None

    def held_gradient_tensors(self) -> List[torch.Tensor]:
        """Every gradient buffer this rank holds outside the pool (for memory accounting)."""
        out = [f for f in self.grad_flats if f is not None]
        if self.shard_store is not None:
            out.append(self.shard_store)
        for u in self.units:
            for s in u.slots:
                if s.param.grad is not None:
                    out.append(s.param.grad)
        out.extend(g for held in self.held for g in held.values())
        return out
