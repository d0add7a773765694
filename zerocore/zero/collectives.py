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

[Note: exit]
A finished gloo work is destroyed by whichever thread drops it last, often gloo's worker thread a moment after
wait() returned. Two things in it can need the GIL, which a thread cannot take once the interpreter is
finalizing (it is unwound by pthread_exit inside a noexcept destructor: SIGABRT, "terminate called without an
active exception"):
  - the thread-local state the work captured when it was launched: autograd's backward stashes a Python object
    (a contextvars.Context) in the thread's TLS for the whole backward pass, so every reduction launched from a
    gradient hook carried it. `_launching()` takes it out of the TLS while a collective is launched.
  - the tensors it holds: when Python drops a tensor that C++ still references, torch keeps the Python object
    alive and hands it to C++, whose last reference must then decref it under the GIL. So every tensor given to
    a collective stays referenced by Python until the backend has let go of it (its `_use_count()` is back to
    what it was before the launch): `Pending.wait()` hands its tensors to `_releasing`, which is swept at every
    launch, and `settle()` (close(), the exit hook) waits for in-flight collectives and then for the backend.
So the process exits cleanly whether or not the script calls close() or destroy_process_group(). As a last
line of defence (an abort was still seen about once in a few hundred CI jobs under load, cause not pinned down),
an exit hook registered when zerocore is imported (so it runs after every optimizer's and the script's own)
calls destroy_process_group() when the script did not, so gloo's worker threads are joined while the
interpreter still runs rather than meeting its finalization.

[Note: peer failure]
A collective that fails before its timeout was not a timeout: usually a peer closed its connection (it raised
and exited, or died). To name it, every surviving rank writes a key under this engine's prefix into the group's
store and waits a few seconds for the others' keys; the ranks whose key never comes are named. The store lives
in rank 0 (init_method tcp://) or in torchrun's agent; if it is unreachable too, the error says so.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import pickle
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .liveness import DEAD_AFTER_S, WAIT_SLICE_S, Liveness, StoreGone

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# How long surviving ranks wait for each other's key in the store when a peer failed ([Note: peer failure]).
PEER_POLL_S = 3.0
# The TLS key autograd's backward stores its contextvars.Context under ([Note: exit]).
_BACKWARD_TLS_KEY = "context"
# A finished collective's tensors are kept until the backend let go of them, or at most this many later
# launches: a tensor whose use count stays up for another reason (a view made after the launch) is not the
# backend's doing, and keeping it longer would only hold memory.
RELEASE_MAX_AGE = 64
# settle() gives the backend this long; gloo's worker drops a finished work microseconds after completing it.
SETTLE_S = 5.0
SETTLE_IDLE_S = 1.0
# What settle() could not see released outlives the engine: dropped with it, a tensor the backend still held
# would hand its Python object to a worker thread that may only get to it during finalization.
_UNSETTLED: List[tuple] = []
# Whether any engine of this process saw a collective fail (the exit hook then leaves the group alone).
_ANY_FAILED = False


class CollectiveError(RuntimeError):
    """A collective of the ZeRO engine failed: a timeout, or a peer that failed or left."""


class CollectiveTimeout(CollectiveError):
    """A collective did not finish within the configured timeout (usually: ranks diverged or one hangs)."""


class PeerFailure(CollectiveError):
    """Another rank closed its connection (it raised and exited, or died) while this rank waited on it.
    `ranks` lists the ranks (of the engine's group) that did not answer, or None when they cannot be told."""

    def __init__(self, message: str, ranks: Optional[List[int]] = None):
        super().__init__(message)
        self.ranks = ranks


def default_strategy(backend: str) -> str:
    return "all_reduce" if backend == "gloo" else "scatter_gather"


@contextlib.contextmanager
def _launching():
    """Launch a collective without the Python object backward keeps in the TLS (see [Note: exit])."""
    C = torch._C
    api = ("_is_key_in_tls", "_get_obj_in_tls", "_remove_obj_from_tls", "_stash_obj_in_tls")
    # Older torch has no way to remove a TLS object (nor does its backward stash one): launch as it is.
    if not all(hasattr(C, f) for f in api) or not C._is_key_in_tls(_BACKWARD_TLS_KEY):
        yield
        return
    saved = C._get_obj_in_tls(_BACKWARD_TLS_KEY)
    C._remove_obj_from_tls(_BACKWARD_TLS_KEY)
    try:
        yield
    finally:
        C._stash_obj_in_tls(_BACKWARD_TLS_KEY, saved)


class Pending:
    """An in-flight collective: wait() returns its result tensor (or raises a CollectiveError)."""

    def __init__(self, comm: "Collectives", work, result: Optional[torch.Tensor], what: str,
                 held: Sequence[tuple] = ()):
        self.comm = comm
        self.works = [] if work is None else (list(work) if isinstance(work, (list, tuple)) else [work])
        self.result, self.what = result, what
        self.tensors = list(held)     # (tensor, its use count before the launch) the backend holds ([Note: exit])
        self.kind = "other"           # "reduction" / "gather": where Collectives.waited counts the wait

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> Optional[torch.Tensor]:
        started = time.monotonic()
        while self.works:
            # In slices while the ranks' heartbeats are watched ([Note: liveness]), else in one wait.
            watch = self.comm.liveness is not None
            left = self.comm.timeout_s - (time.monotonic() - started)
            try:
                if left <= 0:
                    raise RuntimeError("timed out (the engine's comm_timeout_s)")
                # (never a zero timedelta: gloo takes a zero timeout for none at all)
                wait_s = max(min(WAIT_SLICE_S, left) if watch else left, 0.01)
                self.works[0].wait(timeout=datetime.timedelta(seconds=wait_s))
            except RuntimeError as e:
                elapsed = time.monotonic() - started
                if watch and _is_timeout(e) and elapsed < self.comm.timeout_s:
                    self.comm.check_peers_alive(self.what, elapsed)
                    continue                  # every rank is alive: the collective is just slow so far
                raise self.comm.explain_failure(self.what, e, elapsed) from e
            self.works.pop(0)
        self.comm.waited[self.kind] += time.monotonic() - started
        self.comm.retire(self.tensors)
        self.tensors = []
        return self.result


def _is_timeout(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


class Chained:
    """Two collectives where the second reads the first's result (hierarchical reduction: the shard group's
    reduction, then the replicas' all-reduce of the shard). The second starts as soon as the first is seen
    complete, by is_completed() or wait(), so callers that poll their oldest work in order (the reducer) start
    the second collectives in that order on every rank."""

    def __init__(self, first: Pending, then):
        self.first, self.then, self.second = first, then, None

    def _advance(self) -> None:
        if self.second is None:
            self.second = self.then(self.first.wait())

    wait_first = _advance

    def is_completed(self) -> bool:
        if self.second is None:
            if not self.first.is_completed():
                return False
            self._advance()
        return self.second.is_completed()

    def wait(self) -> Optional[torch.Tensor]:
        self._advance()
        return self.second.wait()


class Collectives:
    """The collectives a ZeRO engine needs, over one process group.

    [Note: shard groups]
    With shard_group_size=k (< the group's N ranks, dividing it) the ranks form N/k shard groups of k
    consecutive ranks (on one node under torchrun) and k replica groups (the ranks at the same place of every
    shard group). A unit is sharded over its shard group only: `reduce` sums a unit within the shard group and
    then all-reduces this rank's shard across its replica group (so every replica holds the same, fully
    reduced shard), and `gather` stays inside the shard group: the slow links between nodes carry one shard
    per unit and step instead of the whole unit. Everything else (the phase agreement, broadcasts, objects,
    ZeroInit's pieces) spans all N ranks. Without it, the shard group is the whole group and there are no
    replicas.
    """

    def __init__(self, group=None, timeout_s: float = 1800.0, strategy: Optional[str] = None,
                 shard_group_size: Optional[int] = None):
        self.group = group                 # None = the default group, never held here (see [Note: teardown])
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.strategy = strategy or default_strategy(self.backend)
        self.timeout_s = timeout_s
        self.liveness: Optional[Liveness] = None          # start_liveness(), once the engine has its uid
        self.failed: Optional[CollectiveError] = None     # the first failure this engine raised
        # Seconds spent blocked in wait() by kind of collective (the step-time breakdown of stats.py).
        self.waited = {"reduction": 0.0, "gather": 0.0, "other": 0.0}
        self.closed = False
        self.uid = "unset"                 # same on every rank once the engine agreed on it (store keys)
        self._incidents = 0
        self._timeouts = 0
        self._releasing: List[tuple] = []  # (tensor, use count before launch, launch) the backend may hold
        self._launches = 0
        self._own_groups: list = []
        self._make_shard_groups(shard_group_size or self.world_size)

    def start_liveness(self) -> None:
        """Start this rank's heartbeat and watch the others' while waiting ([Note: liveness]); on gloo, with
        more than one rank (NCCL's own watchdog covers its collectives)."""
        if self.world_size > 1 and self.backend == "gloo" and self.liveness is None:
            try:
                self.liveness = Liveness(self._store(), self.uid, self.rank, self.world_size)
            except (RuntimeError, OSError):      # no usable store: waits are not watched (as before)
                self.liveness = None

    def check_peers_alive(self, what: str, elapsed_s: float) -> None:
        """Between the slices of a wait: raise PeerFailure naming the ranks whose heartbeat stopped."""
        try:
            dead = self.liveness.published_dead() or self.liveness.dead()
        except StoreGone:
            raise self._fail(PeerFailure(
                f"zerocore: {what} has waited {elapsed_s:.3g} s and the rendezvous store cannot be reached, so "
                f"the rank that hosts it (rank 0 under init_method tcp://, or torchrun's agent) is gone. Fix the "
                "failing rank and restart the job.", None)) from None
        if dead:
            self.liveness.publish_dead(dead)
            raise self._fail(PeerFailure(
                f"zerocore: {what} has waited {elapsed_s:.3g} s and rank{'s' if len(dead) > 1 else ''} "
                f"{', '.join(map(str, dead))} of {self.world_size} stopped beating ({DEAD_AFTER_S:g} s without a "
                "heartbeat): exited, crashed or was killed (see its log). Fix the failing rank and restart the "
                "job.", dead))

    def _fail(self, error: CollectiveError) -> CollectiveError:
        """Remember this engine's first failure (close() and the exit hook wait for nothing after it)."""
        global _ANY_FAILED
        if self.failed is None:
            self.failed = error
        _ANY_FAILED = True
        return error

    def _make_shard_groups(self, k: int) -> None:
        """This rank's shard group and replica group ([Note: shard groups]); every rank creates every group,
        in the same order, as torch.distributed.new_group requires. The ranks first agree on k: a rank that
        asked for another one would otherwise create different groups and hang in new_group."""
        n = self.world_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or n % k:
            raise ValueError(f"shard_group_size={k!r} must divide the number of ranks ({n}): e.g. the GPUs of one "
                             f"node, {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}")
        if n > 1:
            sizes = self.all_gather_object(k, "the cross-rank check of shard_group_size")
            if len(set(sizes)) > 1:
                raise ValueError(f"zerocore: the ranks asked for different shard_group_size values (per rank, None "
                                 f"= all ranks: {[s if s != n else None for s in sizes]}): pass the same to "
                                 "every rank")
        self.shard_size, self.shard_rank, self.replicas = k, self.rank % k, n // k
        self.replica_index = self.rank // k            # which shard group this rank is in
        self.shard_group, self.replica_group, self._own_groups = self.group, None, []
        if k == n:
            return
        if self.group is not None:
            raise ValueError("shard_group_size works with the default process group only (it creates the shard "
                             "and replica groups from it); leave process_group out")
        for g in range(n // k):
            pg = dist.new_group(list(range(g * k, (g + 1) * k)))
            if g == self.replica_index:
                self.shard_group = pg
        for j in range(k):
            pg = dist.new_group(list(range(j, n, k)))
            if j == self.shard_rank:
                self.replica_group = pg
        self._own_groups = [self.shard_group, self.replica_group]

    # ------------------------------------------------------------------------------------ launch helpers
    def _pending(self, launch, result, what: str, tensors: Sequence[torch.Tensor]) -> Pending:
        self._check_open()
        self._launches += 1
        self._sweep()
        held = [(t, t._use_count(), self._launches) for t in tensors]
        with _launching():
            work = launch()
        return Pending(self, work, result, what, held)

    def reduce(self, flat: torch.Tensor, shard_numel: int, what: str,
               out: Optional[torch.Tensor] = None):
        """Start summing `flat` (a unit, padded) over every rank; wait() gives this rank's reduced shard (of its
        shard group's layout, [Note: shard groups]).

        With strategy all_reduce (or out=None under scatter_gather and an in-place capable backend) the shard
        is a view of `flat`; otherwise it is `out` (or a new tensor).
        """
        self._check_open()
        lo = self.shard_rank * shard_numel
        if self.shard_size == 1 or self.strategy == "all_reduce":
            first = self._all_reduce_over(self.shard_group, self.shard_size, flat, what)
            first.result = flat[lo:lo + shard_numel]
        else:
            if out is None:
                out = torch.empty(shard_numel, dtype=flat.dtype, device=flat.device)
            first = self._pending(lambda: _reduce_scatter(out, flat, group=self.shard_group, async_op=True), out,
                                  f"reduce_scatter of {what}", (out, flat))
        first.kind = "reduction"
        if self.replicas == 1:
            return first

        def across_replicas(shard):
            second = self._all_reduce_over(self.replica_group, self.replicas, shard,
                                           f"{what}, this rank's shard across the replicas")
            second.kind = "reduction"
            return second
        chained = Chained(first, across_replicas)
        if self.backend == "nccl":
            # NCCL wants the collectives of its communicators issued in one order on every rank: launch the
            # second now (waiting on the first only orders the streams), not whenever a poll sees the first done.
            chained.wait_first()
        return chained

    def all_reduce(self, t: torch.Tensor, what: str, kind: str = "reduction") -> Pending:
        """Start summing `t` over every rank in place (by default a gradient reduction: `kind` says where
        `waited` counts its wait); wait() gives `t`."""
        pending = self._all_reduce_over(self.group, self.world_size, t, what)
        pending.kind = kind
        return pending

    def _all_reduce_over(self, group, size: int, t: torch.Tensor, what: str) -> Pending:
        self._check_open()
        if size == 1:
            return Pending(self, None, t, what)
        return self._pending(lambda: dist.all_reduce(t, group=group, async_op=True), t,
                             f"all_reduce (reduction) of {what}", (t,))

    def gather(self, flat: torch.Tensor, shard_numel: int, what: str,
               src: Optional[torch.Tensor] = None) -> Pending:
        """Start filling every part of the unit `flat` from its owner in this rank's shard group (this rank's
        part is already current; `src`, if given, is a separate tensor equal to it, which the all_gather can
        read instead of a copy)."""
        pending = self._gather_over(self.shard_group, self.shard_size, self.shard_rank, flat, shard_numel, what, src)
        pending.kind = "gather"
        return pending

    def gather_all(self, flat: torch.Tensor, shard_numel: int, what: str,
                   src: Optional[torch.Tensor] = None) -> Pending:
        """gather() over every rank of the group (flat in world_size parts; ZeroInit's pieces)."""
        return self._gather_over(self.group, self.world_size, self.rank, flat, shard_numel, what, src)

    def _gather_over(self, group, size: int, rank: int, flat: torch.Tensor, shard_numel: int, what: str,
                     src: Optional[torch.Tensor]) -> Pending:
        self._check_open()
        if size == 1:
            return Pending(self, None, flat, what)
        lo, hi = rank * shard_numel, (rank + 1) * shard_numel
        if self.strategy == "all_reduce":
            ranks = list(range(size)) if group is None else dist.get_process_group_ranks(group)
            parts = [flat[r * shard_numel:(r + 1) * shard_numel] for r in range(size)]
            return self._pending(
                lambda: [dist.broadcast(parts[r], src=ranks[r], group=group, async_op=True)
                         for r in range(size)], flat, f"broadcast (gather) of {what}", parts)
        # NCCL gathers in place when the input is this rank's chunk of the output; gloo wants its own input.
        if self.backend == "nccl":
            src = flat[lo:hi]
        elif src is None or src.data_ptr() == flat[lo:hi].data_ptr():
            src = flat[lo:hi].clone()
        return self._pending(lambda: _all_gather(flat, src, group=group, async_op=True), flat,
                             f"all_gather of {what}", (flat, src))

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> Pending:
        """Start copying group rank `src`'s `t` to every rank."""
        self._check_open()
        if self.world_size == 1:
            return Pending(self, None, t, what)
        global_src = src if self.group is None else dist.get_global_rank(self.group, src)
        return self._pending(lambda: dist.broadcast(t, src=global_src, group=self.group, async_op=True), t,
                             f"broadcast of {what}", (t,))

    def all_gather_rows(self, row: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's `row` (same shape on all ranks) stacked in rank order, synchronously, with the timeout."""
        self._check_open()
        if self.world_size == 1:
            return row.reshape(1, -1).clone()
        out = torch.empty(self.world_size * row.numel(), dtype=row.dtype, device=row.device)
        src = row.reshape(-1).contiguous()
        self._pending(lambda: _all_gather(out, src, group=self.group, async_op=True), out,
                      f"all_gather of {what}", (out, src)).wait()
        return out.view(self.world_size, -1)

    def all_gather_object(self, obj, what: str) -> list:
        """Every rank's picklable `obj`, in rank order, with the timeout (unlike dist.all_gather_object)."""
        if self.world_size == 1:
            return [obj]
        device = self.device
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        sizes = self.all_gather_rows(size, f"sizes for {what}").reshape(-1).tolist()
        row = torch.zeros(max(sizes), dtype=torch.uint8)
        row[:data.numel()] = data
        rows = self.all_gather_rows(row.to(device), what).cpu()
        return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]

    @property
    def device(self) -> torch.device:
        """Where this group's collectives want their tensors."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --------------------------------------------------------------------------------- release and exit
    def retire(self, tensors: list) -> None:
        """Keep the tensors of a finished collective until the backend has let go of them ([Note: exit])."""
        if tensors:
            self._releasing.extend(tensors)

    def _sweep(self) -> None:
        if self._releasing:
            oldest = self._launches - RELEASE_MAX_AGE
            self._releasing = [e for e in self._releasing if e[0]._use_count() > e[1] and e[2] > oldest]

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Return once the backend holds none of the tensors of finished collectives: bounded by timeout_s, and
        by SETTLE_IDLE_S without progress (what is still referenced then is held by someone else, e.g. a view
        made afterwards, not by the backend, which lets go microseconds after a collective completes)."""
        deadline = time.monotonic() + timeout_s
        self._sweep()
        left, progress_at = len(self._releasing), time.monotonic()
        while self._releasing and time.monotonic() < min(deadline, progress_at + SETTLE_IDLE_S):
            time.sleep(0.0005)
            self._sweep()
            if len(self._releasing) < left:
                left, progress_at = len(self._releasing), time.monotonic()

    # ------------------------------------------------------------------------------------------ failures
    def explain_failure(self, what: str, error: RuntimeError, elapsed_s: float) -> CollectiveError:
        """The error to raise for a collective that failed after `elapsed_s` seconds."""
        return self._fail(self._explain(what, error, elapsed_s))

    def _explain(self, what: str, error: RuntimeError, elapsed_s: float) -> CollectiveError:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if elapsed_s >= 0.95 * self.timeout_s or "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeout(
                f"zerocore: {what} did not finish within {elapsed_s:.3g} s (comm_timeout_s={self.timeout_s:g}; "
                f"{text}). Another rank stopped calling collectives (diverged control flow, an exception, or a "
                f"hang){self._what_others_wait_in(what)}. Raise comm_timeout_s if the operation is just slow.")
        missing = self._unresponsive_ranks()
        if missing is None:
            who = ("the rendezvous store cannot be reached either, so the rank that hosts it (rank 0 under "
                   "init_method tcp://, or torchrun's agent) is gone too")
        elif missing:
            who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {self.world_size} "
                   f"did not answer within {PEER_POLL_S:g} s: exited, crashed or raised an error (see its log), "
                   "or still blocked waiting on another rank")
        else:
            who = "every rank answered afterwards, so the connection itself failed"
        return PeerFailure(f"zerocore: {what} failed after {elapsed_s:.3g} s because a peer closed its "
                           f"connection ({text}); {who}. Every rank must run the same training loop; fix the "
                           "failing rank and restart the job.", missing)

    def _what_others_wait_in(self, what: str) -> str:
        """After a timeout: every rank that timed out too says (through the store) which collective it waits
        in, so the error names the ranks and the operations that failed to pair ([Note: peer failure])."""
        self._timeouts += 1
        prefix = f"zerocore/{self.uid}/timeout{self._timeouts}/"
        # An entry is only believed if it was written around now: keys of engines that never agreed on a uid
        # ("unset") or of an older timeout could otherwise be read as this one.
        fresh = self.timeout_s + 2 * PEER_POLL_S

        def current(r):
            if not store.check([prefix + str(r)]):
                return None
            stamp, _, text = store.get(prefix + str(r)).decode().partition("|")
            return text if abs(time.time() - float(stamp)) <= fresh else None
        try:
            store = self._store()
            store.set(prefix + str(self.rank), f"{time.time()}|{what}")
            deadline = time.monotonic() + PEER_POLL_S
            while True:
                seen = {r: current(r) for r in range(self.world_size)}
                if all(v is not None for v in seen.values()) or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            parts = [f"rank {r} waits in {v}" if v is not None else
                     f"rank {r} did not time out within {PEER_POLL_S:g} s more (busy outside collectives, or gone)"
                     for r, v in seen.items()]
        except (RuntimeError, OSError, ValueError):   # the store's host is gone too (or holds a foreign value)
            return "; the other ranks cannot be asked (the rendezvous store is gone)"
        return "; " + "; ".join(parts)

    def _store(self):
        group = self.group if self.group is not None else dist.distributed_c10d._get_default_group()
        return group.get_group_store() if hasattr(group, "get_group_store") else \
            dist.distributed_c10d._get_default_store()

    def _unresponsive_ranks(self) -> Optional[List[int]]:
        """Ranks that are gone ([Note: peer failure]): whose heartbeat does not move within PEER_POLL_S
        ([Note: liveness]), or without heartbeats, that do not check in through the store within it."""
        if self.liveness is not None:
            try:
                dead = self.liveness.published_dead() or self.liveness.quiet(PEER_POLL_S)
            except StoreGone:
                return None
            if dead:
                self.liveness.publish_dead(dead)
            return dead
        self._incidents += 1
        prefix = f"zerocore/{self.uid}/incident{self._incidents}/"
        try:
            store = self._store()
            store.set(prefix + str(self.rank), "alive")
            others = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + PEER_POLL_S
            while True:
                missing = [r for r in others if not store.check([prefix + str(r)])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(0.05)
        except (RuntimeError, OSError):   # the store's host is gone (DistStoreError is a RuntimeError)
            return None

    # -------------------------------------------------------------------------------------------- state
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("zerocore: this ZeroOptimizer was closed (close() drops its process group); "
                               "create a new one to keep training")

    def close(self) -> None:
        """Forget the process group and destroy the shard and replica groups this engine made (it issues no
        collective afterwards)."""
        for pg in self._own_groups:
            try:
                dist.destroy_process_group(pg)
            except (RuntimeError, ValueError):    # already gone with the default group
                pass
        self._own_groups = []
        self.group = self.shard_group = self.replica_group = None
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None
        self.closed = True
        _UNSETTLED.extend(self._releasing)
        self._releasing = []

    def __del__(self):
        try:
            if self.liveness is not None:
                self.liveness.stop()
            _UNSETTLED.extend(self._releasing)     # an engine dropped without close() (see _UNSETTLED)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _destroy_default_group_at_exit() -> None:
    """Runs after every optimizer's exit hook ([Note: exit]): a script that never called
    destroy_process_group() gets it here, while the interpreter still runs, so the backend's worker threads are
    joined (with the GIL released) before finalization instead of meeting it. Not after a collective failed:
    destroying a gloo group with an operation still pending blocks until gloo's own timeout."""
    if _ANY_FAILED:
        return
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit: a group that cannot be destroyed is left to the process's end
        pass


# Registered when the engine is imported, so it runs after the exit hooks of everything registered later (atexit
# runs hooks in reverse): every optimizer's, and a script's own (e.g. atexit.register(dist.destroy_process_group)).
atexit.register(_destroy_default_group_at_exit)
