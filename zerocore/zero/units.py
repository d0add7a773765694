"""Units: the layout every ZeRO stage shares.

[Note: units]
Trainable parameters are grouped into *units*: the parameters of a module, or a run of modules of about
`bucket_size` elements, walked in backward order (reverse registration order). Each unit owns one flat buffer
padded to a multiple of the world size N; its parameters become views into it. Rank r owns slice r of every
unit, so a unit's flat gradient is exactly the input of one reduce-scatter and its updated slice exactly the
input of one all-gather. A unit never mixes parameter groups (each group keeps its own open unit while the
walk goes on), so one optimizer call per group can cover all of a group's slices.

Stages 1 and 2 build units by size (build_units). Stage 3 builds them by module (build_module_units): the
gather of a unit is then triggered by its owner module's hooks (hooks.py), and small parameters go to
*persistent* units that stay gathered, like every unit of stages 1 and 2. A partitioned (non-persistent) unit
keeps this rank's shard in its own tensor (`shard`) and its flat buffer only while gathered (residency.py).

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
    persistent: bool = True               # always gathered (stages 1/2; stage 3: small parameters)
    owner: Optional[str] = None           # stage 3: the module whose hooks gather it ("" = the model)
    shard: Optional[torch.Tensor] = None  # stage 3, partitioned: this rank's shard, in storage of its own

    def local_shard(self) -> torch.Tensor:
        """This rank's current shard of the parameters: its own tensor (stage 3) or a view of `flat`."""
        return self.shard if self.shard is not None else self.shard_of(self.flat)

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


_READS_CHILDREN = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)


def _is_called(module: torch.nn.Module) -> bool:
    """Whether the module has a forward of its own: containers (ModuleList, ModuleDict) never run, so their
    hooks would never gather a unit they owned; their parameters go up to the module that calls them."""
    return type(module).forward is not torch.nn.Module.forward


def build_module_units(model: torch.nn.Module, named_params: Sequence[Tuple[str, torch.nn.Parameter]],
                       groups: Sequence[int], *, bucket_size: int, unit_modules: Optional[Sequence[str]],
                       persistence_threshold: int, world_size: int, rank: int) -> List[Unit]:
    """Stage 3's units: one per (owner module, param group), plus persistent units for small parameters.

    A parameter belongs to the deepest module that registers it, or, if several modules register it (a head
    tied to the embedding), to their deepest common ancestor, so it is gathered for every use. Walking the
    modules bottom-up, a module owns the parameters below it not owned deeper down when its class is named in
    `unit_modules`, or (without unit_modules) when they reach `bucket_size` elements; the model owns the rest.
    Modules below a MultiheadAttention or TransformerEncoderLayer (which read their children's parameters
    without calling them) and containers without a forward (ModuleList, ModuleDict) never own units.
    Parameters of at most `persistence_threshold` elements go to persistent units instead. Units are numbered
    in expected backward order (the unit whose parameters were registered last comes first), as in build_units.

    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> us = build_module_units(m, list(m.named_parameters()), [0] * 4, bucket_size=16, unit_modules=None,
    ...                         persistence_threshold=8, world_size=2, rank=0)
    >>> [(u.owner, u.persistent, [s.name for s in u.slots]) for u in us]
    [('1', False, ['1.weight']), (None, True, ['1.bias', '0.bias']), ('0', False, ['0.weight'])]
    """
    index_of = {id(p): i for i, (_, p) in enumerate(named_params)}
    registered: Dict[int, List[str]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for mname, m in modules.items():
        for p in m._parameters.values():
            if p is not None and id(p) in index_of:
                registered.setdefault(index_of[id(p)], [])
                if mname not in registered[index_of[id(p)]]:
                    registered[index_of[id(p)]].append(mname)
    pending: Dict[str, List[int]] = {}
    persistent: List[int] = []
    for i, (_, p) in enumerate(named_params):
        if p.numel() <= persistence_threshold:
            persistent.append(i)
            continue
        paths = [n.split(".") if n else [] for n in registered[i]]
        home = []
        for parts in zip(*paths):
            if len(set(parts)) > 1:
                break
            home.append(parts[0])
        pending.setdefault(".".join(home), []).append(i)
    names = set(dict(model.named_modules()))     # a module shared under two names counts once
    # Modules below one that reads its children's parameters without calling them (MultiheadAttention and
    # out_proj; TransformerEncoderLayer's inference fast path) cannot own a unit: nothing would gather it.
    readers = [r for r in names if isinstance(modules[r], _READS_CHILDREN)]
    inside_reader = {n for n in names for r in readers if n != r and (r == "" or n.startswith(r + "."))}
    owned: List[Tuple[str, List[int]]] = []
    wanted = set(unit_modules) if unit_modules is not None else None
    containers = sorted({type(modules[n]).__name__ for n in names if not _is_called(modules[n])} & (wanted or set()))
    if containers:
        import warnings
        warnings.warn(f"zerocore: unit_modules names {containers}, which have no forward (containers are never "
                      "called, so nothing would gather them): their parameters go to the modules that call them. "
                      "Name the classes of the modules inside them instead.", UserWarning, stacklevel=3)
    for mname in sorted(names, key=lambda n: -(n.count(".") + 1 if n else 0)):
        items = pending.pop(mname, [])
        if not items:
            continue
        size = sum(named_params[i][1].numel() for i in items)
        is_owner = mname == "" or (mname not in inside_reader and _is_called(modules[mname]) and (
            type(modules[mname]).__name__ in wanted if wanted is not None else size >= bucket_size))
        if is_owner:
            owned.append((mname, sorted(items)))
        else:
            parent = mname.rpartition(".")[0]
            pending.setdefault(parent, []).extend(items)
    units: List[Unit] = []
    for mname, items in owned:
        for g in sorted({groups[i] for i in items}):
            unit = Unit(index=0, group=g, world_size=world_size, rank=rank, persistent=False, owner=mname)
            for i in items:
                if groups[i] == g:
                    unit.add(named_params[i][0], named_params[i][1], i)
            units.append(unit)
    # Persistent parameters: runs of at most bucket_size elements per group, in backward order.
    open_units: Dict[int, Unit] = {}
    for i in reversed(persistent):
        g, p = groups[i], named_params[i][1]
        unit = open_units.get(g)
        if unit is not None and unit.numel + p.numel() > bucket_size:
            units.append(unit)
            unit = None
        if unit is None:
            unit = open_units[g] = Unit(index=0, group=g, world_size=world_size, rank=rank)
        unit.add(named_params[i][0], p, i)
    units.extend(u for u in open_units.values() if u.slots)
    units.sort(key=lambda u: (-min(s.index for s in u.slots), u.group))
    for k, u in enumerate(units):
        u.index = k
        u.assign_ownership()
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
