"""Per-unit collectives with a per-backend strategy and timeouts that name the operation.

[Note: collective strategy]
A unit's reduction and gather can be done two ways:
  "scatter_gather": reduce_scatter into this rank's shard, all_gather of the shards (the bytes ZeRO promises;
      what NCCL is fast at).
  "all_reduce": all_reduce the whole unit and keep this rank's slice; gather by one broadcast per rank of its
      slice, straight into the unit's flat buffer.
On gloo the second is about twice as fast (bench/results/zero.md, 8 units of 8.4M fp32 on 2 ranks: all_reduce
~230 ms vs reduce_scatter ~510 ms; broadcasts ~105-160 ms vs all_gather ~490-850 ms and a zero-padded all_reduce
~220-340 ms), so gloo defaults to it and every other backend to the first.

Every collective is launched with async_op=True and waited with a timeout; a timeout raises CollectiveTimeout
naming the operation, the unit and its size instead of hanging.

[Note: teardown]
A gloo worker thread drops its reference to a finished collective (and so to the tensors, whose Python objects
it must release under the GIL) a moment *after* wait() returns. If that moment falls after the interpreter has
started finalizing, the thread cannot take the GIL, is unwound by pthread_exit inside a noexcept destructor,
and the process dies with "terminate called without an active exception" (SIGABRT) - seen under CPU load when a
process group outlived destroy_process_group() because something still referenced it. destroy_process_group()
is safe: the group's destructor joins its worker threads with the GIL released. So the engine never keeps the
default group alive (it stores None and lets torch resolve the current default group on each call), and
ZeroOptimizer.close() drops an explicitly passed group together with its hooks.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveTimeout(RuntimeError):
    """A collective did not finish within the configured timeout (usually: ranks diverged or one died)."""


def default_strategy(backend: str) -> str:
    return "all_reduce" if backend == "gloo" else "scatter_gather"


class Pending:
    """An in-flight collective: wait() returns its result tensor (or raises CollectiveTimeout)."""

    def __init__(self, work, result: Optional[torch.Tensor], what: str, timeout_s: float):
        self.works = [] if work is None else (list(work) if isinstance(work, (list, tuple)) else [work])
        self.result, self.what, self.timeout_s = result, what, timeout_s

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> Optional[torch.Tensor]:
        while self.works:
            try:
                self.works[0].wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                raise CollectiveTimeout(
                    f"zerocore: {self.what} did not finish within {self.timeout_s:g} s ({e}). Another rank probably "
                    "stopped calling collectives (diverged control flow, an exception, or a crash); check the "
                    "other ranks' logs. Raise comm_timeout_s if the operation is just slow.") from e
            self.works.pop(0)
        return self.result


class Collectives:
    """The collectives a ZeRO engine needs, over one process group."""

    def __init__(self, group=None, timeout_s: float = 1800.0, strategy: Optional[str] = None):
        self.group = group                 # None = the default group, never held here (see [Note: teardown])
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.strategy = strategy or default_strategy(self.backend)
        self.timeout_s = timeout_s
        self.closed = False

    def reduce(self, flat: torch.Tensor, shard_numel: int, what: str,
               out: Optional[torch.Tensor] = None) -> Pending:
        """Start summing `flat` (a unit, padded) over ranks; wait() gives this rank's reduced shard.

        With strategy all_reduce (or out=None under scatter_gather and an in-place capable backend) the shard
        is a view of `flat`; otherwise it is `out` (or a new tensor).
        """
        self._check_open()
        lo = self.rank * shard_numel
        if self.world_size == 1 or self.strategy == "all_reduce":
            pending = self.all_reduce(flat, what)
            pending.result = flat[lo:lo + shard_numel]
            return pending
        if out is None:
            out = torch.empty(shard_numel, dtype=flat.dtype, device=flat.device)
        work = _reduce_scatter(out, flat, group=self.group, async_op=True)
        return Pending(work, out, f"reduce_scatter of {what}", self.timeout_s)

    def all_reduce(self, t: torch.Tensor, what: str) -> Pending:
        """Start summing `t` over ranks in place; wait() gives `t`."""
        self._check_open()
        if self.world_size == 1:
            return Pending(None, t, what, self.timeout_s)
        work = dist.all_reduce(t, group=self.group, async_op=True)
        return Pending(work, t, f"all_reduce (reduction) of {what}", self.timeout_s)

    def gather(self, flat: torch.Tensor, shard_numel: int, what: str) -> Pending:
        """Start filling every rank's part of `flat` from its owner (this rank's part is already current)."""
        self._check_open()
        if self.world_size == 1:
            return Pending(None, flat, what, self.timeout_s)
        lo, hi = self.rank * shard_numel, (self.rank + 1) * shard_numel
        if self.strategy == "all_reduce":
            ranks = (list(range(self.world_size)) if self.group is None
                     else dist.get_process_group_ranks(self.group))
            works = [dist.broadcast(flat[r * shard_numel:(r + 1) * shard_numel], src=ranks[r], group=self.group,
                                    async_op=True) for r in range(self.world_size)]
            return Pending(works, flat, f"broadcast (gather) of {what}", self.timeout_s)
        # NCCL gathers in place when the input is this rank's chunk of the output; gloo wants its own input.
        src = flat[lo:hi] if self.backend == "nccl" else flat[lo:hi].clone()
        work = _all_gather(flat, src, group=self.group, async_op=True)
        return Pending(work, flat, f"all_gather of {what}", self.timeout_s)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("zerocore: this ZeroOptimizer was closed (close() drops its process group); "
                               "create a new one to keep training")

    def close(self) -> None:
        """Forget the process group (the engine issues no collective afterwards)."""
        self.group = None
        self.closed = True

    def all_reduce_small(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum a small tensor over ranks in place, synchronously, with the timeout."""
        self._check_open()
        if self.world_size > 1:
            Pending(dist.all_reduce(t, group=self.group, async_op=True), t, what, self.timeout_s).wait()
        return t
