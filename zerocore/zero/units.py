"""Units: the layout every ZeRO stage shares.

[Note: units]
Trainable parameters are grouped into *units*: the parameters of a module, or a run of modules of about
`bucket_size` elements, walked in backward order (reverse registration order). Each unit owns one flat buffer
padded to a multiple of the world size N; its parameters become views into it. Rank r owns slice r of every
unit, so a unit's flat gradient is exactly the input of one reduce-scatter and its updated slice exactly the
input of one all-gather. A unit never mixes parameter groups (each group keeps its own open unit while the
walk goes on), so one optimizer call per group can cover all of a group's slices.

This file knows nothing about stages: stage 1, 2 and (later) 3 differ only in which buffers they keep.

>>> import torch
>>> m = torch.nn.Linear(3, 2)
>>> units = build_units([("weight", m.weight), ("bias", m.bias)], [0, 0], bucket_size=100, world_size=4, rank=1)
>>> len(units), units[0].numel, units[0].padded_numel, units[0].shard_numel
(1, 8, 8, 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class Slot:
    """One parameter's place in its unit, and which part of it this rank owns.

    offset/numel: the parameter's elements in the unit's flat buffer.
    own_start/own_end: the [start, end) of the flattened parameter that this rank owns (may be empty).
    shard_pos: where own_start lands inside this rank's shard of the unit.
    index: position among all trainable parameters (same on every rank).
    """
    name: str
    param: torch.nn.Parameter
    index: int
    shape: torch.Size
    offset: int
    numel: int
    own_start: int = 0
    own_end: int = 0
    shard_pos: int = 0

    @property
    def owned_numel(self) -> int:
        return self.own_end - self.own_start


@dataclass
class Unit:
    """A group of parameters sharing one flat buffer padded to a multiple of world_size."""
    index: int
    group: int
    world_size: int
    rank: int
    slots: List[Slot] = field(default_factory=list)
    numel: int = 0
    flat: Optional[torch.Tensor] = None   # the parameters' storage once materialize() ran

    @property
    def padded_numel(self) -> int:
        return -(-self.numel // self.world_size) * self.world_size

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_range(self, rank: Optional[int] = None) -> Tuple[int, int]:
        r = self.rank if rank is None else rank
        return r * self.shard_numel, (r + 1) * self.shard_numel

    def shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a unit-sized flat tensor."""
        lo, hi = self.shard_range()
        return flat[lo:hi]

    def owned_slots(self) -> List[Slot]:
        return [s for s in self.slots if s.owned_numel > 0]

    def add(self, name: str, param: torch.nn.Parameter, index: int) -> None:
        self.slots.append(Slot(name, param, index, param.shape, self.numel, param.numel()))
        self.numel += param.numel()

    def assign_ownership(self) -> None:
        lo, hi = self.shard_range()
        for s in self.slots:
            a, b = max(s.offset, lo), min(s.offset + s.numel, hi)
            if a < b:
                s.own_start, s.own_end, s.shard_pos = a - s.offset, b - s.offset, a - lo
            else:
                s.own_start = s.own_end = s.shard_pos = 0


def ownership(numel_before: int, numel: int, padded_numel: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of a parameter (at `numel_before` in a unit of `padded_numel`) owned by `rank`."""
    shard = padded_numel // world_size
    a, b = max(numel_before, rank * shard), min(numel_before + numel, (rank + 1) * shard)
    return (a - numel_before, b - numel_before) if a < b else (0, 0)


def build_units(named_params: Sequence[Tuple[str, torch.nn.Parameter]], groups: Sequence[int], *,
                bucket_size: int, world_size: int, rank: int,
                module_of: Optional[Sequence[int]] = None) -> List[Unit]:
    """Group parameters (given in registration order, each once) into units in backward order.

    groups[i] is the param-group index of named_params[i]; module_of[i] (optional) identifies the module that
    registered it, so a module's parameters stay in one unit unless it alone exceeds bucket_size. Units are
    numbered by when their last parameter is expected to receive its gradient (reverse registration order).
    """
    if len(groups) != len(named_params):
        raise ValueError("build_units: one group index per parameter is needed")
    module_of = list(module_of) if module_of is not None else list(range(len(named_params)))
    order = list(range(len(named_params)))[::-1]          # backward order: last registered first
    # Atoms: consecutive (in backward order) params of the same module and group are placed together.
    atoms: List[List[int]] = []
    for i in order:
        if atoms and module_of[atoms[-1][-1]] == module_of[i] and groups[atoms[-1][-1]] == groups[i]:
            atoms[-1].append(i)
        else:
            atoms.append([i])
    open_units: Dict[int, List[int]] = {}
    open_size: Dict[int, int] = {}
    closed: List[Tuple[int, List[int]]] = []               # (position of last param in backward order, params)
    position = {i: k for k, i in enumerate(order)}
    for atom in atoms:
        g = groups[atom[0]]
        size = sum(named_params[i][1].numel() for i in atom)
        if open_units.get(g) and open_size[g] + size > bucket_size:
            members = open_units.pop(g)
            closed.append((position[members[-1]], members))
        open_units.setdefault(g, [])
        open_size[g] = (open_size[g] if open_units[g] else 0) + size
        open_units[g].extend(atom)
    for g, members in open_units.items():
        if members:
            closed.append((position[members[-1]], members))
    closed.sort(key=lambda c: c[0])
    units = []
    for k, (_, members) in enumerate(closed):
        unit = Unit(index=k, group=groups[members[0]], world_size=world_size, rank=rank)
        for i in members:
            name, p = named_params[i]
            unit.add(name, p, i)
        unit.assign_ownership()
        units.append(unit)
    return units


def materialize(unit: Unit, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Give the unit its flat buffer (zero padding) and turn its parameters into views of it."""
    flat = torch.empty(unit.padded_numel, dtype=dtype, device=device)
    flat[unit.numel:].zero_()
    for s in unit.slots:
        view = flat[s.offset:s.offset + s.numel].view(s.shape)
        with torch.no_grad():
            view.copy_(s.param.detach())
        s.param.data = view
    unit.flat = flat
    return flat


def unit_views(unit: Unit, flat: torch.Tensor) -> List[torch.Tensor]:
    """Views of a unit-sized flat tensor shaped like the unit's parameters (e.g. stage-1 gradient views)."""
    return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in unit.slots]
