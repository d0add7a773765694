"""When each unit's updated parameters are gathered after a step, and where forward waits for them.

[Note: gather schedule]
Until the first step, a forward pre-hook on every module records which modules run and in which order. At the
first step this becomes (a) the wait map: a unit is waited for by the nearest module (itself or an ancestor)
that actually ran and uses it (MultiheadAttention reads out_proj.weight without calling out_proj), else by the
model's own forward; and (b) a proposed gather order, the units by first use. Ranks that ran different branches
propose different orders, and gathers issued in different orders on different ranks would exchange the wrong
units, so the step's phase agreement carries the proposal and every rank adopts rank 0's. After each step all
units' gathers are launched asynchronously in that order; a unit's waiting module blocks only on its own.

[Note: torch.compile]
torch.compile's dynamo traces a compiled module's forward hooks together with its forward. The engine's hooks
issue and wait for collectives, resize storage and swap `param.data`: none of that belongs in a graph (traced,
dynamo fails on them part-way, at data_ptr arithmetic, gloo work handles or timers, and runs whole frames
eagerly, so little of the model is compiled). So each hook entry point checks torch.compiler.is_compiling()
(true only while dynamo traces) and there calls itself through `run_eagerly`: dynamo ends the graph at that
call, runs the hook eagerly and compiles what follows as a new graph. The disabled wrapper is made at that call,
not at registration, because torch.compiler.disable imports torch._dynamo (~150 MB per rank), which eager
training never needs. Graphs therefore break at every hook: in
stage 3 at each unit-owning module's forward start and end; in stages 1 and 2 only at the start of the compiled
forward, which waits for every unit's gather at once (the per-module waits traced after it are no-ops:
GatherSchedule.forward_waited). So a compiled forward does not overlap the gathers of stages 1 and 2, and a
model that never runs eagerly records no module order: every unit is then waited for at the forward's start.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch

from .units import Unit


EAGER_HOOKS = ("zerocore: ZeroOptimizer's module hooks wait for and issue collectives and change parameter storage, "
               "so they run eagerly between compiled graphs; torch.compile(fullgraph=True) cannot include them: "
               "compile without fullgraph=True (README, torch.compile)")


def run_eagerly(hook, *args):
    """Call `hook(*args)` outside the graph torch.compile is tracing ([Note: torch.compile]). Only called when
    torch.compiler.is_compiling(); the hook then runs eagerly, where is_compiling() is False."""
    # An explicit break first, so that fullgraph=True fails with this message (a bare disable() call inside a
    # traced function fails with dynamo's own, which names neither zerocore nor the fix).
    torch._dynamo.graph_break(msg=EAGER_HOOKS)
    return torch.compiler.disable(hook, reason=EAGER_HOOKS)(*args)


def sync_device(units: List[Unit]) -> None:
    """Before gathers of updated shards on a GPU: the updates (and staging copies) are complete."""
    if units and units[0].flat.device.type == "cuda":
        torch.cuda.current_stream(units[0].flat.device).synchronize()


class GatherSchedule:
    """Records forward order, launches the per-unit gathers after a step and waits for them in forward."""

    def __init__(self, model: torch.nn.Module, units: List[Unit], comm, overlap: bool):
        self.model, self.units, self.comm, self.overlap = model, units, comm, overlap
        self.pending: Dict[int, object] = {}          # unit index -> in-flight gather
        self._fire_pos: Dict[torch.nn.Module, int] = {}
        self.wait_map: Optional[Dict[torch.nn.Module, List[int]]] = None
        self.order: List[int] = []                    # agreed once the first step adopted rank 0's proposal
        self.order_agreed = False
        # True from a compiled forward's start, which waited for every gather, to the next gather's launch; the
        # per-module waits traced into a compiled forward are no-ops then ([Note: torch.compile]).
        self.forward_waited = False
        self._hooks = [m.register_forward_pre_hook(self._pre_forward) for m in model.modules()]

    @property
    def recorded(self) -> bool:
        return self.wait_map is not None

    def wait_for_compiled_forward(self) -> None:
        """A compiled forward of the model starts: wait for every unit now (see [Note: torch.compile])."""
        self.wait_all()
        self.forward_waited = True

    def _pre_forward(self, module, args) -> None:
        if torch.compiler.is_compiling():
            # Traced into a compiled forward (dynamo guards on the flag, so each value has its own graph): the
            # first such hook waits for every unit (here only if the model's own hook did not, e.g. a compiled
            # submodule or forward method), and from then on the forward reads gathered parameters.
            if not self.forward_waited:
                run_eagerly(self.wait_for_compiled_forward)
            return None
        if self.wait_map is None:
            self._fire_pos.setdefault(module, len(self._fire_pos))
        elif self.pending:
            for u in self.wait_map.get(module, ()):
                pending = self.pending.pop(u, None)
                if pending is not None:
                    pending.wait()

    def finish_recording(self) -> None:
        """Build the wait map and this rank's proposed order from what forward ran (see the note)."""
        parent = {}
        for _, m in self.model.named_modules():
            for _, c in m.named_children():
                parent.setdefault(c, m)
        owners = defaultdict(list)
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)].append(m)
        wait_map: Dict[torch.nn.Module, set] = defaultdict(set)
        first_use: Dict[int, int] = {}
        for u in self.units:
            for s in u.slots:
                for m in owners[id(s.param)]:
                    w = m
                    while w not in self._fire_pos and w in parent:
                        w = parent[w]
                    if w not in self._fire_pos:
                        w = self.model           # never saw it run: wait at the start of the model's forward
                    wait_map[w].add(u.index)
                    pos = self._fire_pos.get(w, -1)
                    first_use[u.index] = min(first_use.get(u.index, pos), pos)
        self.wait_map = {m: sorted(us) for m, us in wait_map.items()}
        self.order = sorted(range(len(self.units)), key=lambda i: (first_use.get(i, -1), -i))
        self.remove_hooks()
        self._hooks = [m.register_forward_pre_hook(self._pre_forward) for m in self.wait_map]

    def agreement_payload(self, numel: int) -> torch.Tensor:
        """What the step's phase agreement carries for the schedule: this rank's proposed order."""
        out = torch.zeros(numel, dtype=torch.float64)
        out[:len(self.order)] = torch.tensor(self.order, dtype=torch.float64)
        return out

    def agree(self, rows: torch.Tensor) -> None:
        """Take rank 0's proposal (from the step's phase agreement) the first time."""
        if not self.order_agreed:
            self.order = [int(i) for i in rows[0, :len(self.units)].tolist()]
            self.order_agreed = True

    # -------------------------------------------------------------- around an update (step, load, adopt)
    def check_used(self, got) -> None:
        """Stages 1 and 2 hold every parameter: any module may read any of them."""

    def before_update(self) -> None:
        """The shards are about to change: no gather may still be writing the buffers."""
        self.wait_all()

    def update_order(self) -> List[int]:
        """The order the units are gathered in: forward order, else reversed units (before the first step's
        agreement every rank uses the same fallback)."""
        return list(self.order) if self.order_agreed else list(range(len(self.units) - 1, -1, -1))

    def unit_updated(self, i: int) -> None:
        """Unit i's shard holds its new values (the update goes on with the next units): start its gather."""
        u = self.units[i]
        self.forward_waited = False
        self.pending[i] = self.comm.gather(u.flat, u.shard_numel,
                                           f"unit {i} parameters ({u.numel} elements, {u.flat.dtype})")

    def after_update(self, updated: bool) -> None:
        if updated:
            self.launch()

    def launch(self) -> None:
        """Start the gather of every unit whose gather was not started during the update."""
        sync_device(self.units)
        for i in self.update_order():
            if i not in self.pending:
                self.unit_updated(i)
        if not self.overlap:
            self.wait_all()

    def wait_all(self) -> None:
        while self.pending:
            _, pending = self.pending.popitem()
            pending.wait()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
