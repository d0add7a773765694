"""NVMe as the home of this rank's fp32 masters and Adam state (offload_optimizer="nvme").

[Note: NVMe optimizer state]
The state (master, exp_avg, exp_avg_sq: 12 bytes per element of this rank's shards) is cut into sub-groups of
`sub_group_size` elements (rounded up to 1024; small enough that the buffers hold at most a quarter of the
state, so that even DeepSpeed's default of 1e9 leaves the pipeline something to overlap, and at most 2^24). Each sub-group has two extents in
one preallocated file (swap_files.py), slot 0 and slot 1, each holding master, m and v back to back; one of them
is the committed copy. An update (the step, a load) walks its sub-groups through `buffer_count` aligned host
buffers: it reads sub-group i+1 (and further, as buffers allow) while the body works on i, and writes i-1
back meanwhile. A sub-group is always written to its *other* slot, so a write that fails (disk full, I/O
error, the process killed) never touches the committed copy. The crc32c of every tensor written is kept in
memory (the state never outlives the process, so no checksum file is needed, and no file but the reserved one
is ever written) and checked after every read, so damage that cannot be prevented is caught rather than
trained on.

When the walk has ended, every rank says whether its reads and writes all succeeded (one small all_reduce).
If all did, the written sub-groups switch slots: that is the commit. If any rank failed, no rank switches:
each restores the parameter shards the body changed from the committed masters, the ranks exchange what
failed, and every rank raises the same NVMeStateError naming the failed ranks, their paths and errors. The state is then exactly the last completed step's on every rank, the reduced
gradients are still held, and calling step() again once the disk is fixed redoes the step. The price is
twice the state's size on disk (24 bytes per element of this rank's shards); host memory for the state is
the buffers only (buffer_count x 12 x sub-group bytes, pinned when CUDA is there).

An fp32 model keeps its master here too (in memory its parameters are their own masters): that copy is what
the rollback restores the parameters from.
"""
from __future__ import annotations

import contextlib
import errno
import time
from collections import deque
from typing import List, Optional, Sequence, Tuple

import torch

from zerocore.io import AIOError, AsyncIO, ChecksumError, aligned_empty
from zerocore.io._native import lib as _io_lib

from .memory import storage_bytes
from .state_store import StateStore, Window, units_in
from .swap_files import SwapFolder, SwapFolderError

STATE_TENSORS = 3          # master, exp_avg, exp_avg_sq


def _crc32c(t: torch.Tensor) -> int:
    return int(_io_lib().crc32c(t))
ELEMENT_ALIGN = 1024       # elements: keeps every extent a multiple of 4096 bytes (O_DIRECT)


class NVMeStateError(RuntimeError):
    """Reading or writing the NVMe optimizer state failed on some rank; `ranks` lists them. The update was
    rolled back on every rank (see [Note: NVMe optimizer state])."""

    def __init__(self, message: str, ranks: List[int]):
        super().__init__(message)
        self.ranks = ranks


# The buffers hold at most this share of the state, whatever sub_group_size allows: with DeepSpeed's default
# of 1e9 a state of fewer elements would otherwise be one sub-group (nothing to overlap, all of it in memory).
MAX_BUFFERED_SHARE = 4
# ... and a sub-group is never larger than this (201 MB of host buffer).
MAX_SUB_GROUP = 1 << 24


def sub_group_elements(total: int, sub_group_size: int, buffer_count: int = 4) -> int:
    """Elements per sub-group (and per host buffer tensor) for `total` elements of state: sub_group_size, but
    at most total / (MAX_BUFFERED_SHARE x buffer_count) and MAX_SUB_GROUP, rounded up to ELEMENT_ALIGN."""
    n = min(-(-max(total, 1) // (MAX_BUFFERED_SHARE * buffer_count)), sub_group_size, MAX_SUB_GROUP)
    return -(-n // ELEMENT_ALIGN) * ELEMENT_ALIGN


def pack_windows(shard_numels: Sequence[int], sub: int) -> List[Tuple[int, int]]:
    """Sub-group ranges of the state, each at most `sub` elements, in as few sub-groups as the rule allows: a
    unit that fits in one sub-group starts a new one rather than straddle two (so its parameters are read from
    one, param_swap.py); a larger unit continues the current one and is cut every `sub` elements."""
    ranges, start, at = [], 0, 0
    for n in shard_numels:
        if n <= sub and at > start and at + n - start > sub:
            ranges.append((start, at))
            start = at
        at += n
        while at - start > sub:
            ranges.append((start, start + sub))
            start += sub
    if at > start:
        ranges.append((start, at))
    return ranges


class NVMeStateStore(StateStore):
    """StateStore whose masters and Adam state live in a file under nvme_path ([Note: NVMe optimizer state])."""

    home = "nvme"

    def __init__(self, units, *, comm, nvme_path: str, buffer_count: int, sub_group_size: int,
                 unit_sized: bool = False, **kwargs):
        """unit_sized (offload_param="nvme"): sub-groups no larger than the largest unit's shard, so reading
        one unit's parameters reads little else."""
        total = sum(u.shard_numel for u in units)
        if unit_sized:
            sub_group_size = min(sub_group_size, max([u.shard_numel for u in units if not u.persistent], default=total))
        self._sub = sub_group_elements(total, sub_group_size, buffer_count)
        super().__init__(units, offload=True, **kwargs)
        self.comm = comm
        self._ranges = pack_windows([u.shard_numel for u in units], self._sub)
        self.num_windows = len(self._ranges)
        self._extent_bytes = STATE_TENSORS * self._sub * 4
        self.generation = 0                        # commits so far: a copy read before one is stale
        self.param_reader = None                   # offload_param="nvme": its NVMeParamShards (param_swap.py)
        self.folder = self._open_folder(nvme_path)
        self.slot = [0] * self.num_windows         # the committed slot of every sub-group
        self._aio = AsyncIO(block_size=1 << 20, queue_depth=16)
        count = max(1, min(buffer_count, self.num_windows))
        self.buffers = [aligned_empty((STATE_TENSORS * self._sub,), torch.float32) for _ in range(count)]
        # Bytes moved and wall time of every walk (step, load, state dict) since construction.
        # walk_bytes: what the walks moved (read_bytes also counts parameter reads, param_swap.py).
        self.io_stats = {"read_bytes": 0, "written_bytes": 0, "walk_bytes": 0, "walks": 0, "walk_s": 0.0}
        self._crc: dict = {}                       # (sub-group, slot) -> crc32c of master, m, v as written
        self._init_error: Optional[AIOError] = None
        self._init_open: dict = {}                 # sub-group -> buffer being filled by init_masters
        self._initialized: set = set()             # sub-groups written by init_masters / finish_init

    def _problems(self, mine, what: str, agree: bool = True) -> list:
        """(rank, problem) of every rank that has one (one all_gather_object of any picklable value; with
        agree=False this rank's only): a rank that raised alone would leave the others waiting in their next
        collective."""
        if not agree or self.comm.world_size == 1:
            return [(self.comm.rank, mine)] if mine is not None else []
        return [(r, p) for r, p in enumerate(self.comm.all_gather_object(mine, what)) if p is not None]

    @staticmethod
    def _lines(problems) -> str:
        return "\n  ".join(f"rank {r}: {p}" for r, p in problems)

    def _open_folder(self, nvme_path: str) -> SwapFolder:
        """This rank's swap folder, or the same SwapFolderError (errno of the first failed rank) on every rank
        naming each rank's problem."""
        folder, mine = None, None
        try:
            folder = SwapFolder(nvme_path, self.comm.rank, self.comm.uid, self.num_windows * 2 * self._extent_bytes)
        except OSError as e:
            mine = (e.errno, str(e).removeprefix("zerocore: "))
        failed = self._problems(mine, "the NVMe swap folder checks")
        if failed:
            if folder is not None:
                folder.remove()
            raise SwapFolderError(failed[0][1][0], "zerocore: offload_optimizer='nvme' cannot start:\n  " +
                                  self._lines((r, text) for r, (_, text) in failed))
        return folder

    def _allocate_state(self, separate_master: bool) -> None:
        self.exp_avg = self.exp_avg_sq = self.master = None

    separate_masters = True                    # always, in the file (the rollback restores parameters from them)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _offset(self, i: int, slot: int) -> int:
        return (2 * i + slot) * self._extent_bytes

    def _requests(self, op: str, i: int, slot: int, buf: torch.Tensor, tensors: int = STATE_TENSORS) -> list:
        """AsyncIO requests moving sub-group i's first `tensors` state tensors (master, m, v) in `buf` to or
        from its extent in `slot`, one per tensor, so a master can be read and checked alone (param_swap.py).
        A write records the crc32c of what it writes (see the note)."""
        n = self._sub * 4
        parts = [buf[k * self._sub:(k + 1) * self._sub] for k in range(tensors)]
        if op == "write":
            self._crc[(i, slot)] = [_crc32c(t) for t in parts]
        return [(op, t, self.folder.path, self._offset(i, slot) + k * n) for k, t in enumerate(parts)]

    def check(self, i: int, slot: int, buf: torch.Tensor, tensors: int = STATE_TENSORS) -> None:
        """After a read of sub-group i's slot into buf: raise ChecksumError unless it is what was written."""
        for k in range(tensors):
            if _crc32c(buf[k * self._sub:(k + 1) * self._sub]) != self._crc[(i, slot)][k]:
                offset = self._offset(i, slot) + k * self._sub * 4
                raise ChecksumError(errno.EBADMSG, f"the {('master', 'exp_avg', 'exp_avg_sq')[k]} of sub-group {i} "
                                    f"read from {self.folder.path!r} at offset {offset} fails its checksum: the file "
                                    "changed since zerocore wrote it (disk or file-system damage, or another process "
                                    "wrote to it)", self.folder.path, offset)

    def window_ranges(self) -> List[Tuple[int, int]]:
        return list(self._ranges)

    def _window(self, i: int, buf: torch.Tensor) -> Window:
        start, end = self._ranges[i]
        n, s = end - start, self._sub
        return Window(i, start, end, buf[:n], buf[s:s + n], buf[2 * s:2 * s + n])

    @property
    def param_units(self) -> set:
        """Units whose parameter shards are their masters here (offload_param="nvme")."""
        return set(self.param_reader.windows_of) if self.param_reader is not None else set()

    def param_shard(self, u) -> Optional[torch.Tensor]:
        if self.param_reader is not None and u.index in self.param_reader.windows_of:
            return None
        return super().param_shard(u)

    # ------------------------------------------------------------------------------------ initial state
    @torch.no_grad()
    def init_masters(self, units=None) -> None:
        """Masters from the parameters' original values, m = v = 0; units come in order, and each sub-group
        is written (to slot 0, the committed one) as soon as every unit it holds has been seen."""
        for u in (self.units if units is None else units):
            off = self.offsets[u.index]
            end = off + u.shard_numel
            for s in u.owned_slots():
                lo = off + s.shard_pos
                values = s.param.detach().reshape(-1)[s.own_start:s.own_end]
                for i in self.windows_meeting([(lo, lo + s.owned_numel)]):
                    w = self._window(i, self._init_buffer(i))
                    a, b = w.clip(lo, lo + s.owned_numel)
                    w.master[a - w.start:b - w.start].copy_(values[a - lo:b - lo])
            for i in [i for i in self._init_open if self._ranges[i][1] <= end]:
                self._init_write(i)

    def finish_init(self) -> None:
        for i in range(self.num_windows):
            if i not in self._initialized:     # (padding only, or still open)
                self._init_buffer(i)
                self._init_write(i)
        failed = self._problems(None if self._init_error is None else str(self._init_error),
                                "the NVMe state's first write")
        if failed:
            self.close()
            raise NVMeStateError("zerocore: the NVMe optimizer state could not be written at construction:\n  " +
                                 self._lines(failed), [r for r, _ in failed])

    def _init_buffer(self, i: int) -> torch.Tensor:
        if i not in self._init_open:
            if len(self._init_open) >= len(self.buffers):
                self._init_write(min(self._init_open))
            used = {id(b) for b in self._init_open.values()}
            buf = next(b for b in self.buffers if id(b) not in used)
            self._init_open[i] = buf.zero_()
        return self._init_open[i]

    def _init_write(self, i: int) -> None:
        buf = self._init_open.pop(i)
        if self._init_error is None:
            try:
                self._aio.submit(self._requests("write", i, 0, buf)).wait()
            except AIOError as e:              # raised by finish_init() on every rank (the loop has collectives)
                self._init_error = e
        self._initialized.add(i)

    # ---------------------------------------------------------------------------------------- windows
    @contextlib.contextmanager
    def read(self, indices: Optional[Sequence[int]] = None):
        walk = _Walk(self, range(self.num_windows) if indices is None else indices, write_back=False)
        error: Optional[AIOError] = None
        try:
            yield walk.windows()
        except AIOError as e:
            error = e
        except BaseException:
            walk.drain()                   # no read may land in a buffer the next walk hands out
            raise
        error = walk.drain() or error
        if error is not None:
            raise NVMeStateError(f"zerocore: rank {self.comm.rank} could not read its NVMe optimizer state "
                                 f"({error}); nothing was changed", [self.comm.rank]) from error

    @contextlib.contextmanager
    def update(self, indices: Optional[Sequence[int]] = None, agree: bool = True):
        walk = _Walk(self, range(self.num_windows) if indices is None else indices, write_back=True)
        body_error: Optional[BaseException] = None
        try:
            yield walk.windows()
        except BaseException as e:  # noqa: BLE001 - the other ranks still wait in the agreement below
            body_error = e
        io_error = walk.drain()
        if isinstance(body_error, AIOError):      # a read or write the walk waited for inside the body
            io_error, body_error = io_error or body_error, None
        failed = body_error is not None or io_error is not None
        if agree and self.comm.world_size > 1:
            flags = torch.zeros(self.comm.world_size, dtype=torch.float32, device=self.comm.device)
            flags[self.comm.rank] = float(failed)
            self.comm.all_reduce(flags, "the NVMe optimizer state commit (did every rank write its state?)",
                                 kind="other").wait()
            bad = [r for r, f in enumerate(flags.cpu().tolist()) if f]
        else:
            bad = [self.comm.rank] if failed else []
        if not bad:
            for i in walk.written:
                self.slot[i] ^= 1
            self.generation += 1
            return
        restore_error = None
        try:
            self._restore_params(walk.visited)
        except NVMeStateError as e:          # reported below, after every rank said what failed
            restore_error = e
        error = io_error or body_error
        mine = None if error is None else f"{type(error).__name__}: {error} (nvme_path folder {self.folder.rank_dir!r})"
        reports = self._problems(mine, "what failed in the NVMe optimizer state update", agree)
        if restore_error is not None:
            raise restore_error
        if body_error is not None:
            raise body_error
        raise NVMeStateError(
            f"zerocore: the NVMe optimizer state could not be read or written on rank(s) {bad}:\n  "
            f"{self._lines(reports)}\n"
            "Nothing was committed on any rank: the parameters and the optimizer state are those of the last "
            "completed step, and the gradients are kept. Free space or fix the disk, then call step() again (or "
            "opt.zero_grad() to drop this step, or load the last checkpoint).", bad) from io_error

    @torch.no_grad()
    def _restore_params(self, visited: Sequence[int]) -> None:
        """Parameter shards of the visited sub-groups from their committed masters (the update's rollback)."""
        buf = self.buffers[0]
        for i in visited:
            try:
                self._aio.submit(self._requests("read", i, self.slot[i], buf, tensors=1)).wait()
                self.check(i, self.slot[i], buf, tensors=1)
            except AIOError as e:
                raise NVMeStateError(
                    f"zerocore: rank {self.comm.rank} could not restore its parameters from the committed NVMe "
                    f"optimizer state after a failed update ({e}): parameters of sub-group {i} may hold the failed "
                    "step's values. Load the last checkpoint.", [self.comm.rank]) from e
            w = self._window(i, buf)
            for u, lo, hi in units_in(self.units, self.offsets, w.start, w.end):
                shard, off = self.param_shard(u), self.offsets[u.index]
                if shard is not None:
                    shard[lo:hi].copy_(w.master[off + lo - w.start:off + hi - w.start])

    # ------------------------------------------------------------------------------------- accounting
    def host_state_tensors(self) -> List[Optional[torch.Tensor]]:
        return []

    def swap_buffers(self) -> List[torch.Tensor]:
        return list(self.buffers) + self._param_buffers()

    def _param_buffers(self) -> List[torch.Tensor]:
        return list(self.param_reader.buffers) if self.param_reader is not None else []

    def swap_report(self) -> dict:
        return {"nvme_path": self.folder.dir, "nvme_bytes": self.folder.file_bytes, "nvme_io": dict(self.io_stats),
                "nvme_buffer_bytes": storage_bytes(self.buffers),
                "nvme_buffers": len(self.buffers), "sub_group_elements": self._sub,
                "nvme_param_buffer_bytes": storage_bytes(self._param_buffers()),
                "nvme_param_reads": dict(self.param_reader.stats) if self.param_reader is not None else None}

    def close(self) -> None:
        if getattr(self, "_aio", None) is not None:
            self._aio.close()
            self._aio = None
        if getattr(self, "folder", None) is not None:
            self.folder.remove()

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown: the files are found and removed by the next run
            pass


class _Walk:
    """One pass over some sub-groups through the host buffers: read ahead, hand out, write back behind."""

    def __init__(self, store: NVMeStateStore, indices: Sequence[int], write_back: bool):
        self.store, self.indices, self.write_back = store, list(indices), write_back
        self.started = time.perf_counter()
        self.free = list(store.buffers)
        self.reads: deque = deque()      # (sub-group, buffer, handle)
        self.writes: deque = deque()
        self.next = 0
        self.visited: List[int] = []     # handed to the body
        self.written: List[int] = []     # written back (to the other slot) and waited for
        self.depth = max(1, len(store.buffers) - 2)

    def _buffer(self) -> Optional[torch.Tensor]:
        if self.free:
            return self.free.pop()
        if self.writes:
            i, buf, handle = self.writes.popleft()
            handle.wait()
            self.written.append(i)
            return buf
        return None

    def _read_ahead(self) -> None:
        s = self.store
        while self.next < len(self.indices) and len(self.reads) < self.depth:
            buf = self._buffer()
            if buf is None:
                return
            i = self.indices[self.next]
            self.next += 1
            self.reads.append((i, buf, s._aio.submit(s._requests("read", i, s.slot[i], buf))))
            s.io_stats["read_bytes"] += s._extent_bytes
            s.io_stats["walk_bytes"] += s._extent_bytes

    def windows(self):
        s = self.store
        for _ in range(len(self.indices)):
            self._read_ahead()
            i, buf, handle = self.reads.popleft()
            handle.wait()
            s.check(i, s.slot[i], buf)
            self._read_ahead()           # the next reads run while the body works on this one
            self.visited.append(i)
            yield s._window(i, buf)
            if self.write_back:
                self.writes.append((i, buf, s._aio.submit(s._requests("write", i, s.slot[i] ^ 1, buf))))
                s.io_stats["written_bytes"] += s._extent_bytes
                s.io_stats["walk_bytes"] += s._extent_bytes
            else:
                self.free.append(buf)

    def drain(self) -> Optional[AIOError]:
        """Wait for every read and write in flight; the first I/O error, if any."""
        first = None
        for queue, done in ((self.reads, None), (self.writes, self.written)):
            while queue:
                i, buf, handle = queue.popleft()
                try:
                    handle.wait()
                    if done is not None:
                        done.append(i)
                except AIOError as e:
                    first = first or e
                self.free.append(buf)
        stats = self.store.io_stats
        stats["walks"] += 1
        stats["walk_s"] += time.perf_counter() - self.started
        return first
