"""Stage 3: where each unit's parameters are, as an explicit state machine per unit.

[Note: residency]
A partitioned unit is in one of three states, and every transition asserts the state it starts from:

    SHARDED --start()--> GATHERING --wait()--> GATHERED --free()--> SHARDED

SHARDED: only this rank's shard exists (`Unit.shard`, storage of its own); the unit's flat buffer has no
storage (`untyped_storage().resize_(0)`), and each parameter's data is a *placeholder*: its full shape and
dtype on its device, every element one NaN (a zero-stride view of a 1-element cell of its own). So `p.shape`
stays true, and code that reads a parameter outside forward, backward or `gathered()` gets NaN, never memory it
does not own (a view of the freed buffer would read out of bounds). A write to a placeholder (`p.zero_()`
outside `gathered()`) would be lost: start() finds it (the cell is no longer NaN) and raises. start() gives the flat buffer its storage
back, points the parameters at their views of it, copies this rank's shard into its slice and launches one
gather of the others' slices (collectives.py picks the faster collective per backend). Because the buffer's
storage is resized rather than replaced, the views autograd saved in forward (e.g. `weight.t()`) see the
gathered values again, and a parameter autograd saved itself is the same tensor object whose data is swapped
back: that is what lets backward re-gather a unit freed after forward.

With offload_param="nvme" a partitioned unit has no shard in memory: start() reads it from its NVMe masters
([Note: NVMe parameters] in param_swap.py).

Persistent units (small parameters in stage 3; every unit of stages 1 and 2) are never freed: their shard is
a view of the flat buffer, which is updated in place by the step and refreshed by a gather after it.

The gathers a rank issues between two steps are logged (unit indices in order): a gather pairs with whatever
gather its peers issue at the same position, so the step compares the logs of all ranks (see hooks.py).
"""
from __future__ import annotations

import enum
import zlib
from typing import Dict, List, Optional

import torch

from .units import Unit


def placeholder(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` backed by one element of its own, NaN: a zero-stride view of a 1-element cell (see
    the note). Each parameter gets its own cell, so an in-place write to one (`zero_()`, `fill_()`) changes
    only that cell, and is_untouched() can tell it happened."""
    cell = torch.full((1,), float("nan"), dtype=dtype, device=device)
    return cell.view([1] * len(shape)).expand(shape) if len(shape) else cell[0]


def is_untouched(t: torch.Tensor) -> bool:
    """Whether a placeholder still holds its NaN (nothing wrote to the parameter while it was one)."""
    return bool(torch.isnan(t.reshape(-1)[:1]).all()) if t.numel() else True


class ParamState(enum.Enum):
    SHARDED = "sharded"        # this rank's shard only; the flat buffer holds no storage
    GATHERING = "gathering"    # the flat buffer has storage and a gather into it is in flight
    GATHERED = "gathered"      # the flat buffer holds every rank's values


class Residency:
    """The per-unit parameter state machine of stage 3 (see [Note: residency])."""

    def __init__(self, units: List[Unit], comm, shard_device: Optional[torch.device] = None, nvme_shards=None):
        self.units, self.comm, self.shard_device = units, comm, shard_device
        # offload_param="nvme": partitioned units keep no shard here; it is read from NVMe (param_swap.py).
        self.nvme_shards = nvme_shards
        self.state = [ParamState.GATHERED] * len(units)
        self.pending: Dict[int, object] = {}
        self.log: List[int] = []           # gathers issued since the last step, in order
        self.nbytes = [0] * len(units)
        self.views: List[List[torch.Tensor]] = [[] for _ in units]
        self.placeholders: List[List[torch.Tensor]] = [[] for _ in units]     # per slot, made at the first free
        # Partitioned units holding storage now (gathering or gathered), kept at every transition: the
        # prefetch checks it per candidate, and a sum over all units there would cost O(units) each time.
        self.live_numel = 0
        self.live_bytes = 0
        self.peak_live_bytes = 0           # most bytes of partitioned units gathered at once (memory_report)

    def partition(self, i: int) -> None:
        """Take over unit i right after it was materialized (its parameters view its full flat buffer): a
        non-persistent unit's shard moves to a tensor of its own (on shard_device, e.g. the host for
        parameter offload), the buffer's storage is freed and the parameters point at placeholders."""
        u = self.units[i]
        self.nbytes[i] = u.padded_numel * u.flat.element_size()
        self.views[i] = [u.flat[s.offset:s.offset + s.numel].view(s.shape) for s in u.slots]
        if u.persistent:
            return
        if self.nvme_shards is not None:       # its values are its NVMe masters' ([Note: NVMe parameters])
            self._count_live(i, +1)
            self.free(i)
            return
        src = u.shard_of(u.flat)
        device = self.shard_device or u.flat.device
        pin = device.type == "cpu" and u.flat.device.type == "cuda"
        u.shard = torch.empty(src.numel(), dtype=src.dtype, device=device, pin_memory=pin)
        u.shard.copy_(src)
        self._count_live(i, +1)            # materialized: it holds its full buffer until freed here
        self.free(i)

    def _point_at(self, i: int, tensors) -> None:
        for s, t in zip(self.units[i].slots, tensors):
            s.param.data = t

    # --------------------------------------------------------------------------------------- transitions
    def _expect(self, i: int, *allowed: ParamState) -> None:
        if self.state[i] not in allowed:
            raise RuntimeError(f"zerocore internal error: unit {i} is {self.state[i].value}, expected "
                               f"{' or '.join(s.value for s in allowed)}")

    def start(self, i: int) -> None:
        """SHARDED -> GATHERING (partitioned units), or GATHERED -> GATHERING (refresh of a persistent one)."""
        u = self.units[i]
        if u.persistent:
            self._expect(i, ParamState.GATHERED)
            src = None                      # its shard is a view of the flat buffer, already current
        else:
            self._expect(i, ParamState.SHARDED)
            written = [s.name for s, ph in zip(u.slots, self.placeholders[i]) if not is_untouched(ph)]
            if written:
                raise RuntimeError(
                    f"zerocore: stage 3 parameter(s) {written[:3]} were written while partitioned (outside a forward "
                    "pass or opt.gathered()), so the write would be lost: change parameters inside "
                    "`with zerocore.gathered_parameters(params, modifier_rank=0):`.")
            if self.nvme_shards is not None:   # read (and checked) first: a failed read changes nothing here
                self.nvme_shards.ready(i)
            u.flat.untyped_storage().resize_(self.nbytes[i])
            self._count_live(i, +1)
            self._point_at(i, self.views[i])
            if self.nvme_shards is not None:
                self.nvme_shards.copy_into(i, u.shard_of(u.flat))
                src = None
            else:
                # (offload_param on a GPU: a pinned host shard, copied asynchronously on the current stream)
                u.shard_of(u.flat).copy_(u.shard, non_blocking=u.shard.device != u.flat.device)
                src = u.shard if u.shard.device == u.flat.device else None
        self.state[i] = ParamState.GATHERING
        self.log.append(i)
        self.pending[i] = self.comm.gather(u.flat, u.shard_numel,
                                           f"unit {i} parameters ({u.numel} elements, {u.flat.dtype}, "
                                           f"owner {u.owner!r})", src=src)

    def wait(self, i: int) -> None:
        """GATHERING -> GATHERED."""
        self._expect(i, ParamState.GATHERING)
        self.pending.pop(i).wait()
        self.state[i] = ParamState.GATHERED

    def ensure(self, i: int) -> None:
        """Whatever the state, end GATHERED."""
        if self.state[i] is ParamState.SHARDED:
            self.start(i)
        if self.state[i] is ParamState.GATHERING:
            self.wait(i)

    def free(self, i: int) -> None:
        """GATHERED (or GATHERING, waited for first) -> SHARDED; persistent units stay as they are."""
        u = self.units[i]
        if u.persistent or self.state[i] is ParamState.SHARDED:
            return
        if self.state[i] is ParamState.GATHERING:
            self.wait(i)
        self._expect(i, ParamState.GATHERED)
        if not self.placeholders[i]:
            self.placeholders[i] = [placeholder(s.shape, u.flat.dtype, u.flat.device) for s in u.slots]
        self._point_at(i, self.placeholders[i])
        u.flat.untyped_storage().resize_(0)
        self._count_live(i, -1)
        self.state[i] = ParamState.SHARDED

    def stage_in(self, i: int) -> bool:
        """Start reading a sharded unit's shard from NVMe ahead of its gather; False when nothing more can be
        read ahead now (no buffer free, or the shards are in memory anyway)."""
        if self.nvme_shards is None or self.units[i].persistent:
            return False
        return self.state[i] is not ParamState.SHARDED or self.nvme_shards.stage_in(i)

    def expected_data_ptr(self, u: Unit, k: int) -> int:
        """Where slot k's parameter data should point now (bindings.py checks it)."""
        if self.state[u.index] is ParamState.SHARDED:
            return self.placeholders[u.index][k].data_ptr()
        return self.views[u.index][k].data_ptr()

    # ------------------------------------------------------------------------------------------- groups
    def free_all(self) -> None:
        for i in range(len(self.units)):
            self.free(i)

    def wait_all(self) -> None:
        for i in list(self.pending):
            self.wait(i)

    def refresh_persistent(self) -> None:
        """After a step: gather the persistent units' updated shards."""
        for i, u in enumerate(self.units):
            if u.persistent:
                self.start(i)

    def _count_live(self, i: int, sign: int) -> None:
        self.live_numel += sign * self.units[i].numel
        self.live_bytes += sign * self.nbytes[i]
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)

    def log_digest(self) -> List[float]:
        """(number of gathers, crc32 of their order) since the last step, exact in float64."""
        data = torch.tensor(self.log, dtype=torch.int64).numpy().tobytes()
        return [float(len(self.log)), float(zlib.crc32(data))]
