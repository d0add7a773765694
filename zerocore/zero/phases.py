"""Phase agreement: every rank checks that the others are at the same point of the training loop.

[Note: phase agreement]
A rank that skips or adds a step() or a backward pass issues different collectives than its peers. On gloo
two collectives of different sizes that meet make the process abort inside gloo (SIGABRT on
`op.preamble.length <= op.nbytes`); on NCCL they hang or corrupt data. So every phase that starts collectives
(a backward pass that reduces, a step, a state-dict load) begins with one small all_gather of the same size on
every rank: (phase kind, phase sequence number, micro-step within the accumulation window, payload). Because the size never differs, mismatched phases
meet harmlessly; every rank reads everyone's (kind, number) and raises RankMismatchError naming the ranks and
what each was doing before any differently sized collective is issued. The step's payload is what it needed to
all-reduce anyway (this rank's squared gradient norm and has-gradient flags), summed here in rank order, so
the check costs the step nothing; a backward pays one small extra collective before its first reduction.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch

from .consistency import RankMismatchError


class Phase(enum.IntEnum):
    BACKWARD = 1
    STEP = 2
    LOAD = 3
    FORWARD = 4          # stage 3: each forward of the model gathers, so it agrees first (hooks.py)


_HEAD = 3          # kind, sequence number, micro-step
_DOING = {Phase.BACKWARD: "a backward pass", Phase.STEP: "step()", Phase.LOAD: "load_state_dict()",
          Phase.FORWARD: "a forward pass"}


def _doing(kind: int) -> str:
    try:
        return _DOING[Phase(kind)]
    except ValueError:
        return f"an unknown phase {kind}"


class PhaseAgreement:
    """Numbers the phases of one engine and checks them across ranks (see the note above)."""

    def __init__(self, comm, payload_numel: int, device: torch.device):
        self.comm, self.payload_numel, self.device = comm, payload_numel, device
        self.seq = 0

    def exchange(self, phase: Phase, payload: Optional[torch.Tensor] = None, micro_step: int = 0) -> torch.Tensor:
        """All ranks' payloads (rows in rank order, float64) once every rank is in the same phase."""
        row = torch.zeros(_HEAD + self.payload_numel, dtype=torch.float64, device=self.device)
        row[0], row[1], row[2] = float(phase), float(self.seq), float(micro_step)
        if payload is not None:
            row[_HEAD:_HEAD + payload.numel()] = payload.reshape(-1)
        rows = self.comm.all_gather_rows(row, f"the agreement on {_DOING[phase]} #{self.seq}")
        heads = [tuple(int(v) for v in h) for h in rows[:, :_HEAD].cpu().tolist()]
        self.seq += 1
        mine = heads[self.comm.rank]
        if any(h != mine for h in heads):
            doing = "; ".join(f"rank {r} is in {_doing(k)} #{s} (micro-step {m})"
                              for r, (k, s, m) in enumerate(heads))
            raise RankMismatchError(
                f"zerocore: the ranks are at different points of the training loop ({doing}). A rank skipped or "
                "added a step() or a backward pass (e.g. a data-dependent `continue`, or a different number of "
                "batches per rank): every rank must call backward() and step() the same number of times.")
        return rows[:, _HEAD:]
