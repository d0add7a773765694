"""The optimizer step over this rank's shards: global norm and overflow from the phase agreement, clipping,
and one fused Adam call per (param group, step count) over the runs of owned slots that got a gradient.

[Note: step]
step() waits for the window's reductions, then the step's phase agreement (phases.py) carries this rank's
squared gradient norm (its shards only, so the sum over ranks is the global norm) and a has-gradient flag per
parameter. A non-finite sum means some rank overflowed: every rank skips the step and backs the loss scale off.
Otherwise the fused Adam op runs over all of this rank's shards of a parameter group in one call per step count
(masters, m, v, the reduced gradient shard and, in mixed precision, the low-precision parameter shard it writes
in the same pass), with the averaging, loss-scale and clipping factors folded into its grad_scale. Parameters no
rank produced a gradient for are left untouched and keep their own step count, as torch.optim does.
On the CPU with the state in memory the update goes one unit at a time, in the order the schedule will gather
the units (schedule.update_order(): the next forward's order), and each unit's gather starts as soon as its own
update is done, overlapping the updates of the units after it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, List, Optional, Tuple

import torch

from zerocore.ops import adam as adam_ops

from .phases import Phase
from .state_store import StateStore
from .units import Unit


# Low-precision gradients are normed in pieces of this many elements: vector_norm(dtype=float32) converts its
# whole input to fp32 first, which for a bf16 gradient store is a temporary twice its size.
NORM_CHUNK = 1 << 22


def squared_norm(store: StateStore, shards: List[torch.Tensor]) -> torch.Tensor:
    """This rank's squared gradient norm over its reduced shards (fp32 accumulation)."""
    if store.grad_store is not None:
        g = store.grad_store
        if g.dtype == torch.float32:
            return torch.linalg.vector_norm(g).square()
        shards = list(g.split(NORM_CHUNK))
    return torch.stack([torch.linalg.vector_norm(s, dtype=torch.float32) for s in shards]).square().sum()


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor (1.0 when clipping is off)."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def is_overflow(total_sq: float) -> bool:
    return not math.isfinite(total_sq)


def global_norm(total_sq: float, divisor: float) -> float:
    """The unscaled global gradient norm from the summed squares of the scaled, pre-divided gradients."""
    return math.sqrt(total_sq) / divisor


def segments(u: Unit, got: List[bool], param_steps: List[int]) -> Iterator[Tuple[int, int, int]]:
    """Runs [lo, hi) of this rank's shard of unit u whose parameters all got a gradient and share a step."""
    run = None
    for s in u.owned_slots():
        if not got[s.index]:
            if run:
                yield run
            run = None
            continue
        step = param_steps[s.index]
        if run and run[2] == step and run[1] == s.shard_pos:
            run = (run[0], s.shard_pos + s.owned_numel, step)
        else:
            if run:
                yield run
            run = (s.shard_pos, s.shard_pos + s.owned_numel, step)
    if run:
        yield run


def adam_update(units: List[Unit], store: StateStore, param_groups: List[dict], shards: List[torch.Tensor],
                got: List[bool], param_steps: List[int], grad_scale: float, *, adamw: bool, mixed: bool,
                unit_order: Optional[List[int]] = None, on_unit_done=None) -> None:
    """Fused Adam over every owned run that got a gradient, one state window at a time ([Note: state windows]
    in state_store.py: one window in memory, sub-groups on NVMe); updated values end up in the parameters'
    shards. On NVMe the update commits on every rank or raises on all (swapper.py).

    With `unit_order` (one window in memory only) the units are updated one at a time in that order and
    on_unit_done(i) is called as soon as unit i's shard holds its new values, so its gather can start while
    the next units are updated ([Note: step])."""
    runs = [(u, lo, hi, step) for u in units for lo, hi, step in segments(u, got, param_steps)]
    spans = [(store.offsets[u.index] + lo, store.offsets[u.index] + hi) for u, lo, hi, _ in runs]
    scale_t = torch.tensor([grad_scale], dtype=torch.float32, device=store.device)
    found_inf = torch.zeros(1, dtype=torch.float32, device=store.device)
    with store.update(store.windows_meeting(spans)) as windows:
        if unit_order is None:
            for w in windows:
                _adam_window(w, runs, spans, store, param_groups, shards, scale_t, found_inf, adamw=adamw,
                             mixed=mixed)
            return
        (w,) = list(windows) or [None]
        by_unit = defaultdict(list)
        for k, run in enumerate(runs):
            by_unit[run[0].index].append(k)
        for i in unit_order:
            mine = by_unit.get(i)
            if mine and w is not None:
                _adam_window(w, [runs[k] for k in mine], [spans[k] for k in mine], store, param_groups, shards,
                             scale_t, found_inf, adamw=adamw, mixed=mixed)
            on_unit_done(i)


def _adam_window(w, runs, spans, store: StateStore, param_groups, shards, scale_t, found_inf, *, adamw: bool,
                 mixed: bool) -> None:
    """The Adam calls for the parts of `runs` inside window w: one per (param group, step count, whether the
    low-precision parameters are written in the same pass)."""
    calls = defaultdict(lambda: ([], [], [], [], [], []))    # key -> lists; last: (unit, lo, hi)
    for (u, ulo, _, step), (lo, hi) in zip(runs, spans):
        cut = w.clip(lo, hi)
        if cut is None:
            continue
        a, b = cut[0] - lo + ulo, cut[1] - lo + ulo              # the cut in unit-shard coordinates
        wa, wb = cut[0] - w.start, cut[1] - w.start              # ... and in window coordinates
        shard = store.param_shard(u)                             # None: the master is the parameter shard
        writes_params = mixed and shard is not None
        lst = calls[(u.group, step, writes_params)]
        lst[0].append(store.master_values(w, u, a, b))
        lst[1].append(w.exp_avg[wa:wb])
        lst[2].append(w.exp_avg_sq[wa:wb])
        lst[3].append(shards[u.index][a:b])
        if writes_params:
            lst[4].append(store.staging[cut[0]:cut[1]] if store.staging is not None else shard[a:b])
        lst[5].append((shard, a, b))
    for (gi, step, writes_params), (ps, ms, vs, gs, outs, where) in sorted(calls.items(), key=lambda kv: kv[0]):
        group = param_groups[gi]
        beta1, beta2 = group["betas"]
        adam_ops.adam_step(ps, ms, vs, gs, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], step=step + 1, adamw=adamw,
                           params_out=outs, grad_scale=scale_t, found_inf=found_inf, check_finite=False)
        # Where the updated values do not land in the parameters directly, copy them there.
        if w.master is not None and not mixed:
            for (shard, a, b), p in zip(where, ps):
                if shard is not None:
                    shard[a:b].copy_(p)
        elif writes_params and store.staging is not None:
            for (shard, a, b), o in zip(where, outs):
                shard[a:b].copy_(o, non_blocking=True)


class Stepper:
    """Runs the optimizer step at the end of an accumulation window and keeps the training counters
    (global_steps, skipped_steps, each parameter's Adam step count, the last global gradient norm)."""

    def __init__(self, *, units: List[Unit], store: StateStore, reducer, schedule, phases, loss_scaler,
                 param_groups: List[dict], config, mixed: bool, num_params: int, device: torch.device,
                 replicas: int = 1):
        self.units, self.store, self.reducer, self.schedule = units, store, reducer, schedule
        self.device = device                 # the model's
        self.replicas = replicas             # ranks holding each shard (shard groups): each norm counted that often
        self.phases, self.loss_scaler, self.param_groups = phases, loss_scaler, param_groups
        self.config, self.mixed, self.num_params = config, mixed, num_params
        self.param_steps = [0] * num_params
        self.global_grad_norm: Optional[float] = None
        self.skipped_steps = 0
        self.global_steps = 0

    def run(self) -> bool:
        """The step over this rank's shards ([Note: step]); False when an overflow skipped it."""
        r, cfg, sched = self.reducer, self.config, self.schedule
        if not sched.recorded:
            sched.finish_recording()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # async copies of reduced shards to the host are done
        shards = r.reduced_shards()
        n = 1 + self.num_params
        payload = torch.zeros(self.phases.payload_numel, dtype=torch.float64,
                              device=shards[0].device if shards else None)
        payload[0] = squared_norm(self.store, shards)
        payload[1:n] = torch.frombuffer(bytearray(r.has_grad), dtype=torch.uint8).to(payload.device, torch.float64)
        payload[n:] = sched.agreement_payload(self.phases.payload_numel - n).to(payload.device)
        rows = self.phases.exchange(Phase.STEP, payload, micro_step=r.micro_steps)
        sched.agree(rows[:, n:].cpu())
        # Summed in rank order, so every rank gets bit-identical totals (see [Note: phase agreement]).
        total = rows[:, :n].sum(0)
        total_sq = float(total[0]) / self.replicas
        got = (total[1:] > 0).tolist()
        sched.check_used(got)
        sched.before_update()
        divisor = r.grad_divisor * self.loss_scaler.scale
        if is_overflow(total_sq):
            self.loss_scaler.update(overflow=True)
            self.skipped_steps += 1
            self.global_grad_norm = float("inf")
            r.clear_window()
            sched.after_update(updated=False)
            return False
        norm = global_norm(total_sq, divisor)
        self.global_grad_norm = norm
        coef = clip_coefficient(norm, cfg.gradient_clipping)
        # Gathers start per unit as its update ends, where that is safe: one state window in memory (on NVMe the
        # update commits on all ranks or none, so nothing may be gathered before it), on the CPU (a GPU gather
        # would first need the update's stream synchronized per unit).
        pipelined = self.store.home == "memory" and self.device.type == "cpu"
        adam_update(self.units, self.store, self.param_groups, shards, got, self.param_steps, coef / divisor,
                    adamw=cfg.adamw, mixed=self.mixed, unit_order=sched.update_order() if pipelined else None,
                    on_unit_done=sched.unit_updated)
        for i, g in enumerate(got):
            if g:
                self.param_steps[i] += 1
        self.loss_scaler.update(overflow=False)
        self.global_steps += 1
        r.clear_window()
        sched.after_update(updated=True)
        return True

    def state(self) -> dict:
        """The counters a checkpoint keeps."""
        return {"loss_scaler": self.loss_scaler.state_dict(), "global_steps": self.global_steps,
                "skipped_steps": self.skipped_steps}

    def load(self, source: dict, param_steps: List[int]) -> None:
        self.param_steps[:] = param_steps
        self.loss_scaler.load_state_dict(source["loss_scaler"])
        self.global_steps = int(source["global_steps"])
        self.skipped_steps = int(source["skipped_steps"])
