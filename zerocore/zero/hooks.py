"""Stage 3's module hooks: gather each unit before its module runs forward and backward, free it after,
prefetch along the recorded order.

[Note: stage 3 hooks]
Every module that owns units (units.build_module_units; the model owns what no module below it does) gets:
  - a forward pre-hook: gather its units (waiting for a prefetch in flight), then prefetch the units of the
    modules that ran next in the recorded order, while fewer than prefetch_bucket_size elements are in
    flight (at least one unit, so a model of big units still overlaps) and fewer than max_live_parameters
    are gathered;
  - a forward hook: free its units (reshard_after_forward=True; never the model's own, which backward needs
    at once) unless the forward runs inside backward (activation checkpointing's recomputation) or inside
    `gathered()`; and, when autograd records the forward, a hook on its outputs that fires just before the
    module's backward: gather its units again and prefetch along the recorded backward order.
A unit is freed in backward as soon as every one of its parameters has its gradient (the reducer's callback:
by then every node that reads them has run), and all are freed when the pass ends. The first forward and
backward (until the first step) gather on demand and record the orders; prefetch starts afterwards.

A gather pairs with whatever gather its peers issue at the same position. If ranks run different modules
(data-dependent branches) or different numbers of forward calls, they would exchange the wrong units, so:
each forward of the model starts with the phase agreement (phases.py, one small all_gather: different numbers
of forward calls raise RankMismatchError before any gather), each backward's agreement comes before its first
gather, and the step compares every rank's gather log (count and crc32) and raises, naming the first unit
where the ranks differ, before anything is updated. That catches ranks whose differing units have the same
size and whose gathers still pair up; differently sized ones, or a gather that meets a peer's reduction, fail
in the collective itself (gloo: a CollectiveTimeout naming the unit, or an abort). The prefetch budget counts
units prefetched and not yet used, never in-flight gathers: a wait_for_params() on one rank (e.g. a rank-0
memory_report()) must not change what the next forward gathers.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from .consistency import RankMismatchError
from .phases import Phase
from .residency import ParamState, Residency
from .schedule import run_eagerly, sync_device
from .units import Unit


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ParamHooks:
    """Stage 3's gather / free / prefetch driver (see the note above); the step-time schedule interface of
    schedule.GatherSchedule (launch, wait_all, agreement payload) for the engine."""

    def __init__(self, model: torch.nn.Module, units: List[Unit], residency: Residency, reducer, phases, *,
                 reshard_after_forward: bool, prefetch_numel: int, max_live_numel: int):
        self.model, self.units, self.res, self.reducer, self.phases = model, units, residency, reducer, phases
        self.reshard_after_forward = reshard_after_forward
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        modules = dict(model.named_modules())
        self.units_of: Dict[torch.nn.Module, List[int]] = {}
        for u in units:
            if not u.persistent:
                self.units_of.setdefault(modules[u.owner], []).append(u.index)
        if model not in self.units_of:
            self.units_of[model] = []             # the model's pre-hook also starts each forward
        self.forward_order: List[torch.nn.Module] = []
        self.backward_order: List[torch.nn.Module] = []
        self.recorded = False
        self._cursor = {"forward": 0, "backward": 0}
        self.held: List[List[int]] = []            # the units each open gathered() context holds
        self.forward_calls = 0                     # forward calls of the model since the last step
        # Prefetched units not yet used: the prefetch budget. Not the in-flight gathers, which a rank-local
        # wait_for_params() would empty on one rank only, making ranks prefetch (and so gather) differently.
        self.prefetched: Dict[int, int] = {}       # unit index -> numel
        self.used: set = set()                     # units a hook gathered since the last step (checked there)
        self._hooks = []
        for m in self.units_of:
            self._hooks.append(m.register_forward_pre_hook(self._pre_forward))
            self._hooks.append(m.register_forward_hook(self._post_forward))
        self._backward_recorded = False
        self._early: set = set()                   # units whose gathers start during the step's update
        reducer.on_unit_complete = self._unit_complete
        reducer.on_backward_end = self._backward_end

    @property
    def keep_gathered(self) -> bool:
        """Inside a gathered() context nothing is freed."""
        return bool(self.held)

    # ----------------------------------------------------------------------------------------- forward
    def _pre_forward(self, module, args) -> None:
        if torch.compiler.is_compiling():          # gathers run eagerly: [Note: torch.compile] in schedule.py
            return run_eagerly(self._pre_forward, module, args)
        if _in_backward():                 # activation checkpointing's recomputation: gather, nothing else
            self._gather(module)
            return
        if module is self.model:
            self._start_forward()
        self._use(module, "forward")

    def _start_forward(self) -> None:
        if not self.keep_gathered:
            self.phases.exchange(Phase.FORWARD, micro_step=self.forward_calls)
        self.forward_calls += 1
        self._cursor["forward"] = 0

    def _post_forward(self, module, args, output) -> None:
        if torch.compiler.is_compiling():          # frees run eagerly: [Note: torch.compile] in schedule.py
            return run_eagerly(self._post_forward, module, args, output)
        if self.keep_gathered or _in_backward():
            return
        hooked = False
        if torch.is_grad_enabled():
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads, m=module: self._use(m, "backward"), mode="any")
                hooked = True
        # Without a hook on its outputs (none requires grad, or they are hidden in an object the pytree cannot
        # open) nothing would gather the unit for backward: keep it until its gradients are reduced.
        if not torch.is_grad_enabled() or (self.reshard_after_forward and hooked and module is not self.model):
            for i in self.units_of[module]:
                self._free(i)

    # ---------------------------------------------------------------------------------------- backward
    def _unit_complete(self, i: int) -> None:
        if not self.keep_gathered:
            self._free(i)

    def _free(self, i: int) -> None:
        self.prefetched.pop(i, None)
        self.res.free(i)

    def _backward_end(self) -> None:
        self._cursor["backward"] = 0
        self._backward_recorded = self._backward_recorded or bool(self.backward_order)
        if not self.keep_gathered:
            self.free_all()

    def free_all(self) -> None:
        self.prefetched.clear()
        self.res.free_all()

    # ---------------------------------------------------------------------------------------- the core
    def _gather(self, module) -> None:
        for i in self.units_of[module]:
            self.prefetched.pop(i, None)
            self.used.add(i)
            self.res.ensure(i)

    def _accumulates(self, module) -> bool:
        """Whether this backward pass accumulates into the module's parameters (a loss.backward(), not a
        torch.autograd.grad(..., inputs) of a gradient penalty, which must not count as a micro-step)."""
        try:
            for i in self.units_of[module]:
                for s in self.units[i].slots:
                    node = torch.autograd.graph.get_gradient_edge(s.param).node
                    if torch._C._will_engine_execute_node(node):
                        return True
            return not self.units_of[module]
        except (RuntimeError, AttributeError):   # no such API here: count it, as stages 1/2 would
            return True

    def _use(self, module, direction: str) -> None:
        if direction == "backward" and self._accumulates(module):
            self.reducer.begin_backward_if_needed()       # its agreement comes before this pass's gathers
        self._gather(module)
        order = self.forward_order if direction == "forward" else self.backward_order
        if not self.recorded:      # record the window's first forward and first backward
            if (self.forward_calls == 1) if direction == "forward" else not self._backward_recorded:
                order.append(module)
            return
        pos = self._find(order, module, self._cursor[direction])
        if pos is None:
            return                                        # off the recorded path: no prefetch this time
        self._cursor[direction] = pos + 1
        self._prefetch(order, pos + 1)

    @staticmethod
    def _find(order, module, start: int) -> Optional[int]:
        for k in range(start, len(order)):
            if order[k] is module:
                return k
        return None

    def _plan_prefetch(self, order, start: int):
        """The sharded units to gather next along `order` within the budgets (counted as prefetched from now
        on), the first one past them (None: none), and the candidates after it."""
        candidates = (i for k in range(start, len(order)) for i in self.units_of[order[k]]
                      if self.res.state[i] is ParamState.SHARDED)
        gathers, planned, rest = [], 0, None
        for i in candidates:
            if i in gathers:
                continue
            numel = self.units[i].numel
            ahead = sum(self.prefetched.values())
            if (ahead and ahead + numel > self.prefetch_numel) or \
                    self.res.live_numel + planned + numel > self.max_live_numel:
                rest = i
                break
            self.prefetched[i] = numel
            planned += numel
            gathers.append(i)
        return gathers, rest, candidates

    def _prefetch(self, order, start: int) -> None:
        """Gather the next units within the budgets; past them, read ahead the shards of the units after
        that from NVMe (offload_param="nvme") while buffers last. Every NVMe read (the gathers' own first)
        is issued before the first gather starts, so the reads overlap each other."""
        gathers, rest, candidates = self._plan_prefetch(order, start)
        for i in gathers:
            self.res.stage_in(i)
        if rest is not None and self.res.stage_in(rest):
            for i in candidates:
                if i not in gathers and not self.res.stage_in(i):
                    break
        for i in gathers:
            self.res.start(i)

    # -------------------------------------------------------------------- the engine's schedule interface
    @property
    def pending(self) -> Dict[int, object]:
        return self.res.pending

    def finish_recording(self) -> None:
        self.recorded = True

    def agreement_payload(self, numel: int) -> torch.Tensor:
        out = torch.zeros(numel, dtype=torch.float64)
        out[:2] = torch.tensor(self.res.log_digest(), dtype=torch.float64)
        return out

    def agree(self, rows: torch.Tensor) -> None:
        """Every rank's (gather count, crc32) must be equal; else name the first unit where they differ."""
        digests = [tuple(r) for r in rows[:, :2].tolist()]
        if all(d == digests[0] for d in digests):
            return
        logs = self.res.comm.all_gather_object(self.res.log, "every rank's gather log")
        first = next(k for k in range(max(map(len, logs)))
                     if len({tuple(lg[k:k + 1]) for lg in logs}) > 1)
        at = "; ".join(f"rank {r}: " + (f"unit {lg[first]} (module {self.units[lg[first]].owner!r})"
                                         if first < len(lg) else f"no gather (it issued {len(lg)})")
                       for r, lg in enumerate(logs))
        self.res.log.clear()
        raise RankMismatchError(
            f"zerocore: stage 3 ranks gathered different parameters since the last step (at gather #{first}: "
            f"{at}), so they exchanged the wrong units and this step's gradients are wrong on every rank; "
            "nothing was updated. Every rank must run the same modules in the same order (no data-dependent "
            "skipping of layers or experts in stage 3).")

    def check_used(self, got) -> None:
        """At a step: a partitioned unit whose parameters got gradients was gathered by a hook, else its
        parameters were read (as NaN placeholders) by some other module (see units.build_module_units)."""
        for u in self.units:
            if not u.persistent and u.index not in self.used and any(got[s.index] for s in u.slots):
                raise RuntimeError(
                    f"zerocore: stage 3 parameters {[s.name for s in u.slots][:3]} (unit {u.index}, owned by module "
                    f"{u.owner!r}) got gradients although that module never ran: another module read them "
                    "directly (as nn.MultiheadAttention reads out_proj.weight), while they were not gathered. Make "
                    "the module that reads them a unit (unit_modules={...}) or raise bucket_size so it owns them.")

    def new_window(self) -> None:
        """A step happened (or was skipped): start a new gather log."""
        self.res.log.clear()
        self.used.clear()
        self.forward_calls = 0

    def before_update(self) -> None:
        """The shards are about to change (step, load): every partitioned unit is freed first, and a new
        window starts whether or not the step updates (gather log, units used)."""
        self.res.wait_all()
        self.free_all()
        self.new_window()

    def update_order(self) -> List[int]:
        """Persistent units first (refreshed at once after a step), then the units the next forward will
        prefetch first (their gathers start as their updates end), then the rest."""
        persistent = [u.index for u in self.units if u.persistent]
        self._early = set()
        early = []
        if self.recorded and self.res.nvme_shards is None and not self.held:
            early, _, _ = self._plan_prefetch(self.forward_order, 0)
            self._early = set(early)
        rest = [u.index for u in self.units if not u.persistent and u.index not in self._early]
        return persistent + early + rest

    def unit_updated(self, i: int) -> None:
        """Unit i's shard holds its new values: refresh it now if it is persistent or prefetched first."""
        if self.units[i].persistent or i in self._early:
            self.res.start(i)

    def after_update(self, updated: bool) -> None:
        self.launch()
        self._early = set()

    def launch(self) -> None:
        """After a step: refresh the persistent units not refreshed during the update (small: waited for at
        once, so a submodule called directly or code reading them sees current values), then prefetch the next
        forward's first units."""
        sync_device(self.units)
        for u in self.units:
            if u.persistent and u.index not in self.res.pending:
                self.res.start(u.index)
        for u in self.units:
            if u.persistent:
                self.res.ensure(u.index)
        for held in self.held:                     # units open gathered() contexts hold
            for i in held:
                self.res.ensure(i)
        if self.recorded:
            self._prefetch(self.forward_order, 0)

    def wait_all(self) -> None:
        self.res.wait_all()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.reducer.on_unit_complete == self._unit_complete:
            self.reducer.on_unit_complete = self.reducer.on_backward_end = None
