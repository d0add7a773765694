"""Stage 3 with offload_param="nvme": partitioned units' parameter shards read from the NVMe masters.

[Note: NVMe parameters]
With the optimizer state on NVMe (swapper.py), a unit's fp32 master *is* its parameter shard (cast to the compute
dtype), so parameters need no file of their own and never a write-back: the step updates the masters, and the
commit that makes a step's state valid makes its parameters valid too. This rank keeps no shard of a
partitioned unit in memory. Before a gather, residency.py asks for the unit's shard: its masters are read (the
master section of each sub-group holding the unit, checked against its crc32c) into one of `param_buffer_count`
host buffers and copied, cast, into the unit's slot of the flat buffer; the buffers go back at once. hooks.py
calls stage_in() for the units after those it prefetches (the recorded order), so the reads run ahead of the
gathers while buffers last. A read made before a commit (a step, a load) is stale afterwards and is read again.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from zerocore.io import AIOError, aligned_empty


class NVMeParamShards:
    """Reads partitioned units' parameter shards from the NVMe state's masters (see the note)."""

    def __init__(self, store, units, buffer_count: int):
        self.store = store
        self.windows_of: Dict[int, List[int]] = {
            u.index: store.windows_meeting([(store.offsets[u.index], store.offsets[u.index] + u.shard_numel)])
            for u in units if not u.persistent}
        need = max((len(w) for w in self.windows_of.values()), default=0)
        count = max(buffer_count, need) if need else 0
        self.buffers = [aligned_empty((store._sub,), torch.float32) for _ in range(count)]
        self.free = list(self.buffers)
        self.staged: Dict[int, Tuple[int, List[Tuple[int, torch.Tensor]], object]] = {}  # unit -> (gen, parts, io)
        # Shards found read ahead at their gather, read on demand, and read ahead but stale by then.
        self.stats = {"ahead": 0, "on_demand": 0, "stale": 0}
        store.param_reader = self

    def stage_in(self, i: int) -> bool:
        """Start reading unit i's shard if a buffer is free for each of its sub-groups; False if none is."""
        if i in self.staged:
            return True
        windows = self.windows_of[i]
        if len(self.free) < len(windows):
            return False
        s = self.store
        parts = [(w, self.free.pop()) for w in windows]
        requests = [r for w, buf in parts for r in s._requests("read", w, s.slot[w], buf, tensors=1)]
        self.staged[i] = (s.generation, parts, s._aio.submit(requests))
        s.io_stats["read_bytes"] += len(parts) * s._sub * 4
        return True

    def ready(self, i: int) -> None:
        """Make unit i's shard present and checked in the buffers (reading it now if it was not read ahead,
        or only before the last commit); raises NVMeStateError, changing nothing, if it cannot be read."""
        entry = self.staged.get(i)
        if entry is not None and entry[0] != self.store.generation:
            self._release(i)                   # read before a commit: stale
            self.stats["stale"] += 1
            entry = None
        self.stats["ahead" if entry is not None else "on_demand"] += 1
        if entry is None:
            if not self.stage_in(i):
                self.drop_all()                # the buffers went to units further ahead: this one comes first
                self.stage_in(i)
            entry = self.staged[i]
        gen, parts, handle = entry
        s = self.store
        if handle is None:
            return                             # read and checked already (a start() that failed after ready())
        try:
            handle.wait()
            for w, buf in parts:
                s.check(w, s.slot[w], buf, tensors=1)
        except AIOError as e:
            self._release(i)
            from .swapper import NVMeStateError
            raise NVMeStateError(f"zerocore: rank {s.comm.rank} could not read the parameters of unit {i} from "
                                 f"its NVMe state ({e}). The disk under nvme_path failed or the file was damaged: "
                                 "fix it and load the last checkpoint.", [s.comm.rank]) from e
        self.staged[i] = (gen, parts, None)    # read and checked

    @torch.no_grad()
    def copy_into(self, i: int, dst: torch.Tensor) -> None:
        """Fill `dst` (unit i's slot of its flat buffer) with this rank's shard of unit i (after ready(i))."""
        _, parts, _ = self.staged[i]
        s = self.store
        off, n = s.offsets[i], dst.numel()
        for w, buf in parts:
            start, end = s._ranges[w]
            a, b = max(start, off), min(end, off + n)
            dst[a - off:b - off].copy_(buf[a - start:b - start])
        self._release(i)

    def _release(self, i: int) -> None:
        _, parts, handle = self.staged.pop(i)
        try:
            if handle is not None:
                handle.wait()                  # the buffers are reused only once their reads ended
        except AIOError:
            pass
        self.free.extend(buf for _, buf in parts)

    def drop_all(self) -> None:
        for i in list(self.staged):
            self._release(i)
