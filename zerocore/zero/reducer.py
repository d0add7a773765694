"""From autograd gradients to one reduced gradient shard per unit: when each unit is reduced.

[Note: gradient flow]
A post-accumulate-grad hook on every trainable parameter hands its gradient to the unit's strategy
(reductions.py: in place, packed at the boundary, packed on arrival, or direct). When a unit's last gradient of
the pass has arrived its reduction is launched asynchronously and overlaps the rest of backward; when it
completes the strategy leaves this rank's reduced shard where the step reads it. Strategies that reduce every
pass (stages 2 and 3) write the shard store on the first micro-step and add to it on later ones; the others
(stage 1) reduce once, on the last micro-step of the accumulation window.

Reductions are launched strictly in unit order (a unit waits for the units before it), so every rank issues
the same collectives in the same order even when gradients arrive in different orders; at most
max_inflight are in flight (each may hold a unit-sized bucket). At the end of each backward pass (an autograd
engine callback, or ZeroOptimizer.backward) the remaining units are launched, gradients that never arrived
counting as zeros, and all reductions are waited for. Which parameters received a gradient during the window
is recorded so the step can skip (like torch.optim) those that got none on any rank.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, List, Optional

import torch
from torch.autograd import Variable

from . import reductions
from .collectives import Collectives
from .phases import Phase
from .units import Unit


class GradReducer:
    """Owns gradient hooks and the order and number of unit reductions in flight (see the note above)."""

    def __init__(self, units: List[Unit], comm: Collectives, *, stage: int, grad_dtype: torch.dtype,
                 reduce_dtype: torch.dtype, accumulation_steps: int, overlap: bool, max_inflight: int,
                 shard_store: Optional[torch.Tensor], shard_offsets: List[int], num_params: int,
                 phases=None):
        self.units = units
        self.phases = phases            # PhaseAgreement: a reducing backward first checks every rank is in one
        self.accumulation_steps, self.overlap, self.max_inflight = accumulation_steps, overlap, max_inflight
        self.shard_store = shard_store
        shard_views = [None if shard_store is None else shard_store[o:o + u.shard_numel]
                       for u, o in zip(units, shard_offsets)]
        self.strategies = reductions.choose(units, comm, shard_views, stage=stage, grad_dtype=grad_dtype,
                                            reduce_dtype=reduce_dtype, shard_store=shard_store,
                                            max_inflight=max_inflight)
        kinds = set(self.strategies)
        if len({s.reduces_every_pass for s in kinds}) != 1 or len({s.prescaled for s in kinds}) != 1:
            raise RuntimeError("zerocore internal error: one engine mixes reduction strategies of different kinds")
        self.reduces_every_pass = self.strategies[0].reduces_every_pass
        self.pool = self.strategies[0].pool
        # What the step divides the reduced sums by: the micro-steps, and N unless the buckets were pre-divided.
        self.grad_divisor = accumulation_steps * (1 if self.strategies[0].prescaled else comm.world_size)
        self.where = {id(s.param): (u.index, k) for u in units for k, s in enumerate(u.slots)}
        self.has_grad = bytearray(num_params)          # per parameter index, this accumulation window
        self.micro_steps = 0                            # completed backward passes in this window
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

    def close(self) -> None:
        """Drop hooks, in-flight handles and pooled buckets without waiting for anything."""
        self.detach()
        self.inflight.clear()
        self.pool.clear()

    def drain(self) -> None:
        """Wait for every reduction still in flight (only non-empty if a backward was interrupted)."""
        while self.inflight:
            _, pendings = self.inflight.popleft()
            for p in pendings:
                p.wait()

    def rebind_grads(self) -> None:
        """Before a forward or a step: gradient views someone replaced are restored (reductions.InPlace)."""
        for u, strategy in enumerate(self.strategies):
            strategy.rebind(u)

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
        for u, strategy in enumerate(self.strategies):
            strategy.discard(u)
        self.in_backward = False
        self.failed = False
        self._reset_backward_state()
        if self.on_backward_end is not None:
            self.on_backward_end()
        self.clear_window()

    def _reset_backward_state(self) -> None:
        n = len(self.units)
        self.arrived: List[set] = [set() for _ in range(n)]
        self.ready = [False] * n
        self.next_launch = 0
        self.inflight = deque()
        self.reducing = False

    # ------------------------------------------------------------------------------------------- per grad
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
        reducing = self.reduces_every_pass or self.micro_steps == self.accumulation_steps - 1
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
        self.strategies[u].take(u, k, p, again=k in self.arrived[u])
        if not self.reducing:
            return
        self.arrived[u].add(k)
        if len(self.arrived[u]) == len(unit.slots):
            if self.on_unit_complete is not None:
                self.on_unit_complete(u)
            if self.overlap:
                self.ready[u] = True
                self._launch_ready()
        self._poll()

    # --------------------------------------------------------------------------------------- reductions
    def _first_into_store(self) -> bool:
        # Reducing every pass accumulates into the store after its first; otherwise it is written once.
        return not self.reduces_every_pass or self.micro_steps == 0

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.units) and self.ready[self.next_launch]:
            self._launch(self.next_launch)
            self.next_launch += 1

    def _launch(self, u: int) -> None:
        while len(self.inflight) >= self.max_inflight:
            self._finalize(*self.inflight.popleft())
        missing = [k for k in range(len(self.units[u].slots)) if k not in self.arrived[u]]
        self.inflight.append((u, self.strategies[u].launch(u, missing, self._first_into_store())))

    def _poll(self) -> None:
        while self.inflight and all(p.is_completed() for p in self.inflight[0][1]):
            self._finalize(*self.inflight.popleft())

    def _finalize(self, u: int, pendings: list) -> None:
        results = [p.wait() for p in pendings]
        self.strategies[u].finalize(u, results, self._first_into_store())

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
        return [strategy.shard(u) for u, strategy in enumerate(self.strategies)]

    def clear_window(self) -> None:
        """Forget this accumulation window's gradients (after a step, or to discard them)."""
        self.micro_steps = 0
        self.has_grad = bytearray(len(self.has_grad))
        for u, strategy in enumerate(self.strategies):
            strategy.clear_window(u)

    def held_gradient_tensors(self) -> List[torch.Tensor]:
        """Every gradient buffer this rank holds outside the pool (for memory accounting)."""
        out = [] if self.shard_store is None else [self.shard_store]
        for u, strategy in enumerate(self.strategies):
            out.extend(s.param.grad for s in self.units[u].slots if s.param.grad is not None)
            out.extend(strategy.held_tensors(u))
        return out
