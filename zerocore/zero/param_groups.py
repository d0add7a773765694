"""Parameter groups: torch-style `param_groups=[{"params": [...], "lr": ...}]` resolved to parameter names.

Groups are resolved once, at construction, to lists of trainable parameter *names* (the same on every rank,
so the cross-rank check can compare them) and the group index of every trainable parameter (units never mix
groups: units.py).

>>> import torch
>>> m = torch.nn.Linear(2, 2)
>>> trainable = list(m.named_parameters())
>>> groups, group_of = resolve_groups([{"params": [m.weight]}, {"params": ["bias"], "weight_decay": 0.0}], trainable)
>>> [g["param_names"] for g in groups], group_of
([['weight'], ['bias']], [0, 1])
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

# What a group may set; the engine's Adam reads these per group.
GROUP_OPTIONS = ("lr", "betas", "eps", "weight_decay")


def resolve_groups(param_groups: Optional[Sequence[dict]], trainable: Sequence[Tuple[str, torch.nn.Parameter]]):
    """(group hyperparameter dicts with 'param_names', group index of every trainable parameter)."""
    names = {id(p): n for n, p in trainable}
    trainable_names = {n for n, _ in trainable}
    if param_groups is None:
        return [{"param_names": [n for n, _ in trainable]}], [0] * len(trainable)
    groups, group_of_name = [], {}
    for gi, g in enumerate(param_groups):
        if "params" not in g:
            raise ValueError(f"param_groups[{gi}] has no 'params' entry")
        params = g["params"]
        params = [params] if isinstance(params, (torch.Tensor, str)) else list(params)
        member = []
        for p in params:
            n = p if isinstance(p, str) else names.get(id(p))
            if n is None:
                if isinstance(p, torch.Tensor) and not p.requires_grad:
                    continue             # frozen: torch.optim ignores it too
                raise ValueError(f"param_groups[{gi}] holds a tensor that is not a trainable parameter of the model")
            if n not in trainable_names:
                raise ValueError(f"param_groups[{gi}] names {n!r}, which is not a trainable parameter of the model")
            if n in group_of_name:
                raise ValueError(f"parameter {n!r} appears in param_groups {group_of_name[n]} and {gi}")
            group_of_name[n] = gi
            member.append(n)
        hyper = {k: v for k, v in g.items() if k != "params"}
        unknown = set(hyper) - set(GROUP_OPTIONS)
        if unknown:
            raise ValueError(f"param_groups[{gi}] has unsupported option(s) {sorted(unknown)}; "
                             f"supported: {', '.join(GROUP_OPTIONS)}")
        groups.append(dict(hyper, param_names=member))
    missing = [n for n, _ in trainable if n not in group_of_name]
    if missing:
        raise ValueError(f"trainable parameter(s) {missing[:3]} are in no param group: add them to one, or set "
                         "requires_grad=False on them")
    return groups, [group_of_name[n] for n, _ in trainable]


def registering_module(model: torch.nn.Module, trainable) -> List[int]:
    """For each trainable parameter, the index (in model.modules()) of the first module that registers it:
    stage 1/2 units keep a module's parameters together (units.build_units)."""
    first_owner = {}
    for mi, m in enumerate(model.modules()):
        for p in m._parameters.values():
            if p is not None:
                first_owner.setdefault(id(p), mi)
    return [first_owner[id(p)] for _, p in trainable]
