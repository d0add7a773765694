"""Where this rank's optimizer state lives: fp32 masters, Adam's m and v, the reduced gradient shards and the
staging copy of updated low-precision shards, on the device or (offload) in aligned host memory; swapper.py
adds NVMe files as a third home for masters and Adam state.

Every buffer holds this rank's shards of all units back to back (unit u's shard at `shard_offsets[u]`), so a
run of a unit's shard is one slice of each.

[Note: state windows]
Code that reads or changes masters and Adam state (the step, state dicts, adopted parameter values) goes
through windows: `with store.update(indices) as windows: for w in windows: ...` hands out Window objects, each
a resident range [start, end) of the state with its master / exp_avg / exp_avg_sq as tensors of that length.
In memory there is one window, views of the whole buffers, and nothing else happens; on NVMe a window is one
sub-group read into a host buffer, written back after the body moved on, and the update commits on every rank
or on none (swapper.py). So one loop serves every home.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .memory import host_empty
from .units import Unit


def shard_offsets(units: List[Unit]) -> List[int]:
    """Where each unit's shard starts in the per-rank state buffers."""
    out, total = [], 0
    for u in units:
        out.append(total)
        total += u.shard_numel
    return out


@dataclass
class Window:
    """Masters and Adam state of this rank's state range [start, end), resident ([Note: state windows]).
    master is None where fp32 parameters are their own masters (read those from the parameters' shards)."""
    index: int
    start: int
    end: int
    master: Optional[torch.Tensor]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def clip(self, lo: int, hi: int) -> Optional[Tuple[int, int]]:
        """[lo, hi) (state coordinates) cut to this window, or None when they do not meet."""
        a, b = max(lo, self.start), min(hi, self.end)
        return (a, b) if a < b else None


def units_in(units: List[Unit], offsets: List[int], lo: int, hi: int) -> Iterator[Tuple[Unit, int, int]]:
    """(unit, unit-shard lo, unit-shard hi) for every unit whose shard meets state range [lo, hi)."""
    for u, off in zip(units, offsets):
        a, b = max(lo, off), min(hi, off + u.shard_numel)
        if a < b:
            yield u, a - off, b - off


def make_store(units: List[Unit], comm, cfg, *, device: torch.device, compute_dtype: torch.dtype,
               reduce_dtype: torch.dtype) -> "StateStore":
    """The store a configuration asks for: in memory (on the device, or on the host with
    offload_optimizer="cpu"), or in files under nvme_path (offload_optimizer="nvme", swapper.py)."""
    options = dict(device=device, compute_dtype=compute_dtype, stage=cfg.stage, reduce_dtype=reduce_dtype,
                   accumulation_steps=cfg.gradient_accumulation_steps)
    if cfg.offload_optimizer == "nvme":
        from .swapper import NVMeStateStore
        return NVMeStateStore(units, comm=comm, nvme_path=cfg.nvme_path, buffer_count=cfg.buffer_count,
                              sub_group_size=cfg.sub_group_size, unit_sized=cfg.offload_param == "nvme", **options)
    return StateStore(units, offload=cfg.offload_optimizer == "cpu", **options)


class StateStore:
    """Allocates and owns this rank's sharded optimizer state in memory (see the module docstring)."""

    home = "memory"

    def __init__(self, units: List[Unit], *, device: torch.device, compute_dtype: torch.dtype, offload: bool,
                 stage: int, reduce_dtype: torch.dtype, accumulation_steps: int):
        self.units = units
        self.offsets = shard_offsets(units)
        self.total = sum(u.shard_numel for u in units)
        self.offload = offload
        host_model_offload = offload and device.type != "cpu"
        state_device = torch.device("cpu") if offload else device
        self._alloc = (lambda n, dt: host_empty(n, dt)) if offload else \
            (lambda n, dt: torch.empty(n, dtype=dt, device=state_device))
        mixed = compute_dtype != torch.float32
        self._allocate_state(mixed or host_model_offload)
        # Host-side copy of the updated low-precision shard, only when Adam runs on the host for a GPU model.
        self.staging: Optional[torch.Tensor] = \
            self._alloc(self.total, compute_dtype) if (host_model_offload and mixed) else None
        # Stage 2 keeps the reduced gradient shards; so does stage 1 when it reduces in another dtype, or when
        # the shards must reach the host (offload of a GPU model). Accumulation over micro-steps is in fp32.
        self._needs_grad_store = stage >= 2 or reduce_dtype != compute_dtype or host_model_offload
        self._grad_store_dtype = torch.float32 if accumulation_steps > 1 else reduce_dtype
        self.grad_store: Optional[torch.Tensor] = None

    def _allocate_state(self, separate_master: bool) -> None:
        self.exp_avg = self._alloc(self.total, torch.float32).zero_()
        self.exp_avg_sq = self._alloc(self.total, torch.float32).zero_()
        # fp32 params are their own masters; lower precision keeps a separate fp32 shard, and so does offload of
        # a GPU model (the master must live on the host). Offload of an fp32 model already on the host updates
        # its parameter shards in place like the non-offload path: a second fp32 copy would only cost 4Ψ/N.
        self.master: Optional[torch.Tensor] = \
            self._alloc(self.total, torch.float32).zero_() if separate_master else None

    def allocate_grad_store(self) -> None:
        """Allocate the reduced-gradient store where this configuration keeps one (see the constructor)."""
        if self._needs_grad_store and self.grad_store is None:
            self.grad_store = self._alloc(self.total, self._grad_store_dtype).zero_()

    @torch.no_grad()
    def init_masters(self, units: Optional[List[Unit]] = None) -> None:
        """Fill the fp32 masters of `units` (default: all) from the parameters' original values (before any
        cast to the compute dtype)."""
        if self.master is None:
            return
        for u in (self.units if units is None else units):
            off = self.offsets[u.index]
            for s in u.owned_slots():
                self.master[off + s.shard_pos:off + s.shard_pos + s.owned_numel].copy_(
                    s.param.detach().reshape(-1)[s.own_start:s.own_end])

    def finish_init(self) -> None:
        """Called once every unit's masters were initialized (NVMe writes its last sub-groups)."""

    @property
    def device(self) -> torch.device:
        """Where the Adam step runs (where masters and Adam state are resident)."""
        return self.exp_avg.device

    # -------------------------------------------------------------------------------- windows (see [Note])
    def window_ranges(self) -> List[Tuple[int, int]]:
        return [(0, self.total)]

    def windows_meeting(self, spans: Sequence[Tuple[int, int]]) -> List[int]:
        """Indices of the windows that meet any of the state ranges `spans`, in order."""
        out = []
        for i, (a, b) in enumerate(self.window_ranges()):
            if any(lo < b and a < hi for lo, hi in spans):
                out.append(i)
        return out

    def _whole(self) -> Window:
        return Window(0, 0, self.total, self.master, self.exp_avg, self.exp_avg_sq)

    @contextlib.contextmanager
    def read(self, indices: Optional[Sequence[int]] = None):
        """Windows to read (changes are not kept on NVMe)."""
        yield iter([self._whole()] if indices is None or len(indices) else [])

    @contextlib.contextmanager
    def update(self, indices: Optional[Sequence[int]] = None, agree: bool = True):
        """Windows to change: what the body writes into them (and into the parameters' shards) is kept, on
        every rank or, if any rank fails, on none (NVMe, with agree=True: every rank must call it; in memory
        nothing can fail)."""
        yield iter([self._whole()] if indices is None or len(indices) else [])

    @property
    def separate_masters(self) -> bool:
        """Whether fp32 masters are kept apart from the parameters (else fp32 parameters are their masters)."""
        return self.master is not None

    def param_shard(self, u: Unit) -> Optional[torch.Tensor]:
        """This rank's shard of unit u's parameters in memory, which the step and a load write; None where the
        shard is its master (stage 3 parameters on NVMe, swapper.py)."""
        return u.local_shard()

    def master_values(self, w: Window, u: Unit, lo: int, hi: int) -> torch.Tensor:
        """The fp32 values [lo, hi) of unit u's shard inside window w: the master, or the fp32 parameters."""
        if w.master is None:
            return self.param_shard(u)[lo:hi]
        off = self.offsets[u.index]
        return w.master[off + lo - w.start:off + hi - w.start]

    def set_masters(self, changes: Sequence[Tuple[Unit, int, torch.Tensor, Optional[torch.Tensor]]],
                    agree: bool = False) -> None:
        """Write new fp32 values into unit shards' masters: (unit, shard position, values, mask or None: only
        where the mask is True) each. agree=False: a rank-local change (no cross-rank commit on NVMe);
        agree=True: every rank calls it and it commits on all or none."""
        spans = [(self.offsets[u.index] + pos, self.offsets[u.index] + pos + v.numel()) for u, pos, v, _ in changes]
        with self.update(self.windows_meeting(spans), agree=agree) as windows:
            for w in windows:
                if w.master is None:
                    continue
                for (u, pos, v, mask), (lo, hi) in zip(changes, spans):
                    cut = w.clip(lo, hi)
                    if cut is None:
                        continue
                    dst, src = w.master[cut[0] - w.start:cut[1] - w.start], v[cut[0] - lo:cut[1] - lo].float()
                    if mask is None:
                        dst.copy_(src)
                    else:
                        m = mask[cut[0] - lo:cut[1] - lo]
                        dst[m] = src[m]

    # ------------------------------------------------------------------------------------------ accounting
    def host_state_tensors(self) -> List[Optional[torch.Tensor]]:
        return [self.exp_avg, self.exp_avg_sq]

    def swap_buffers(self) -> List[torch.Tensor]:
        """Host buffers the state passes through (NVMe)."""
        return []

    def swap_report(self) -> dict:
        return {}

    def close(self) -> None:
        """Release what outlives the process (NVMe files)."""
