"""Where this rank's optimizer state lives: fp32 masters, Adam's m and v, the reduced gradient shards and the
staging copy of updated low-precision shards, on the device or (offload) in aligned host memory.

Every buffer holds this rank's shards of all units back to back (unit u's shard at `shard_offsets[u]`), so a
run of a unit's shard is one slice of each. NVMe offload will add a third home here.
"""
from __future__ import annotations

from typing import List, Optional

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


class StateStore:
    """Allocates and owns this rank's sharded optimizer state (see the module docstring)."""

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
        self.exp_avg = self._alloc(self.total, torch.float32).zero_()
        self.exp_avg_sq = self._alloc(self.total, torch.float32).zero_()
        # fp32 params are their own masters; lower precision keeps a separate fp32 shard, and so does offload of
        # a GPU model (the master must live on the host). Offload of an fp32 model already on the host updates
        # its parameter shards in place like the non-offload path: a second fp32 copy would only cost 4Ψ/N.
        self.master: Optional[torch.Tensor] = \
            self._alloc(self.total, torch.float32).zero_() if (mixed or host_model_offload) else None
        # Host-side copy of the updated low-precision shard, only when Adam runs on the host for a GPU model.
        self.staging: Optional[torch.Tensor] = \
            self._alloc(self.total, compute_dtype) if (host_model_offload and mixed) else None
        # Stage 2 keeps the reduced gradient shards; so does stage 1 when it reduces in another dtype, or when
        # the shards must reach the host (offload of a GPU model). Accumulation over micro-steps is in fp32.
        self._needs_grad_store = stage >= 2 or reduce_dtype != compute_dtype or host_model_offload
        self._grad_store_dtype = torch.float32 if accumulation_steps > 1 else reduce_dtype
        self.grad_store: Optional[torch.Tensor] = None

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

    def master_of(self, u: Unit, lo: int, hi: int) -> torch.Tensor:
        """The fp32 values [lo, hi) of this rank's shard of unit u: the master, or the fp32 parameters."""
        off = self.offsets[u.index]
        return self.master[off + lo:off + hi] if self.master is not None else u.local_shard()[lo:hi]
