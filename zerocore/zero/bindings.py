"""Do the model's parameters still live in the engine's buffers?

[Note: parameter bindings]
The engine turns every trainable parameter into a view of its unit's flat buffer and from then on updates
only that buffer. Code that replaces a parameter's storage afterwards (`model.to(torch.device("cpu", 0))`,
which transformers' Trainer does under torchrun, copies every tensor; `p.data = ...`) would silently end
training: the model would read tensors nobody updates. Code that replaces the Parameter object
(`load_state_dict(..., assign=True)`, `module.weight = nn.Parameter(...)`) would silently stop its gradients
reaching the engine. So before every forward of the model and every step the engine compares each parameter
with where it should be (one pointer comparison per parameter). A parameter whose storage moved but whose
shape, dtype and device are unchanged is handled by what it now holds:
  - the same values as the engine's buffer (a copy: `.to()`, `clone()`): it becomes a view of the buffer again,
    at once (the fp32 master is left alone: it is more precise than any copy of a low-precision parameter);
  - other values: before a forward it is left alone, since code may swap weights for a while (an EMA for
    evaluation) and put them back; if it still holds them at step(), the gradient was computed at those values,
    so they are *adopted*: copied into the buffer (and, where they differ, the master) before the update.
Code that copies parameters while the gathers after a step are in flight must call wait_for_params() first
(README), or its copy may hold some old values. A Parameter object replaced by another, or a parameter whose
dtype, device or shape changed, raises at step(), naming the parameter and the fix (a forward only checks
storage: torch.func.functional_call swaps parameters for one call).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .units import Slot, Unit


class ParameterReplacedError(RuntimeError):
    """A parameter was replaced or cast after ZeroOptimizer was constructed in a way the engine cannot adopt."""


def _locations(model: torch.nn.Module, names: List[str]) -> Dict[str, Tuple[torch.nn.Module, str]]:
    out = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        out[name] = (model.get_submodule(prefix) if prefix else model, leaf)
    return out


class Bindings:
    """Checks that each slot's parameter is still registered and still a view of its unit's buffer, and
    rebinds, adopts or refuses what moved (see the note above)."""

    def __init__(self, model: torch.nn.Module, units: List[Unit], store, reducer, wait_for_params,
                 stage3_data_ptr=None):
        """stage3_data_ptr(unit, slot position): where a stage-3 parameter's data points now (residency.py)."""
        self.units, self.store, self.reducer, self.wait_for_params = units, store, reducer, wait_for_params
        self.stage3_data_ptr = stage3_data_ptr
        slots = sorted(((u, s) for u in units for s in u.slots), key=lambda us: us[1].index)   # model order
        locs = _locations(model, [s.name for _, s in slots])
        self.entries = [(u, s) + locs[s.name] for u, s in slots]
        self.position = {id(s): k for u in units for k, s in enumerate(u.slots)}

    @staticmethod
    def expected_ptr(u: Unit, s: Slot) -> int:
        return u.flat.data_ptr() + s.offset * u.flat.element_size()

    @torch.no_grad()
    def check(self, at_step: bool = False) -> None:
        """Before a forward (at_step=False) or a step: rebind, adopt or refuse parameters whose storage was
        replaced; gradient views someone replaced are restored too."""
        moved = self.moved(check_registration=at_step)
        partitioned = [s.name for u, s in moved if not u.persistent]
        if partitioned:
            raise ParameterReplacedError(
                f"zerocore: stage 3 parameter(s) {partitioned[:3]} were given new storage after ZeroOptimizer "
                "was constructed (p.data = ..., module.to(...)); a partitioned parameter's values live in its "
                "shards, so nothing can be adopted. Move or cast the model before constructing ZeroOptimizer, "
                "and change values with zerocore.gathered_parameters(..., modifier_rank=...).")
        if moved:
            self.wait_for_params()          # the buffers are complete before they are compared or written
            for u, s in moved:
                if not self.store.separate_masters or not s.owned_numel:
                    self.rebind(u, s, adopt_values=at_step)
                    continue
                before = u.flat[s.offset + s.own_start:s.offset + s.own_end].clone()
                if self.rebind(u, s, adopt_values=at_step):
                    now = s.param.detach().reshape(-1)[s.own_start:s.own_end]
                    # only adopted values reach the fp32 master
                    self.store.set_masters([(u, s.shard_pos, now, now != before)])
        self.reducer.rebind_grads()

    def moved(self, check_registration: bool) -> List[Tuple[Unit, Slot]]:
        """Slots whose parameter no longer views its buffer (raises for what cannot be adopted)."""
        out = []
        for u, s, module, leaf in self.entries:
            p = s.param
            if check_registration and module._parameters.get(leaf) is not p:
                raise ParameterReplacedError(
                    f"zerocore: parameter {s.name!r} was replaced by another object after ZeroOptimizer was "
                    "constructed (load_state_dict(..., assign=True), or assigning a new nn.Parameter), so the "
                    "optimizer no longer sees its gradients. Load weights with model.load_state_dict(sd) "
                    "(without assign=True) or copy into the parameter under torch.no_grad(); or construct "
                    "ZeroOptimizer after replacing the parameters.")
            if not u.persistent and self.stage3_data_ptr is not None:
                if p.data_ptr() != self.stage3_data_ptr(u, self.position[id(s)]):
                    out.append((u, s))
                continue
            if s.numel == 0 or p.data_ptr() == self.expected_ptr(u, s):
                continue
            data = p.data
            if data.device != u.flat.device:
                raise ParameterReplacedError(
                    f"zerocore: parameter {s.name!r} was moved to {data.device} after ZeroOptimizer was "
                    f"constructed on {u.flat.device}. Move the model first, then construct ZeroOptimizer.")
            if data.dtype != u.flat.dtype:
                raise ParameterReplacedError(
                    f"zerocore: parameter {s.name!r} was cast to {data.dtype} after ZeroOptimizer was constructed "
                    f"(the engine computes in {u.flat.dtype}). Pass dtype=... to ZeroOptimizer instead of casting "
                    "the model afterwards.")
            if tuple(data.shape) != tuple(s.shape):
                raise ParameterReplacedError(
                    f"zerocore: parameter {s.name!r} changed shape from {tuple(s.shape)} to {tuple(data.shape)} "
                    "after ZeroOptimizer was constructed; construct it after the model has its final shapes.")
            out.append((u, s))
        return out

    @staticmethod
    @torch.no_grad()
    def rebind(u: Unit, s: Slot, adopt_values: bool) -> bool:
        """Make the parameter a view of the unit's buffer again if it holds the buffer's values, or (with
        adopt_values) after copying its values in. Returns True when it was rebound."""
        view = u.flat[s.offset:s.offset + s.numel].view(s.shape)
        if not torch.equal(s.param.data, view):
            if not adopt_values:
                return False
            view.copy_(s.param.data)
        s.param.data = view
        return True
