"""Training statistics: what a step cost and where, samples/s and memory, for opt.stats() and the log.

[Note: training log]
Every `log_interval` optimizer steps (DeepSpeed's steps_per_print; off by default) every rank contributes one
row to a small all_gather (its memory, its samples, its timings) and rank 0 logs one line through Python's
`logging` (logger "zerocore"): step, loss scale, gradient norm, the mean step time since the last line with its
breakdown, samples/s over all ranks, and per-rank memory. The breakdown splits the wall time between two
updates into: reduction wait (blocked on gradient reductions), gather wait (blocked on parameter gathers),
step (step() itself: the agreement, Adam, starting the gathers) and forward+backward (the rest: the model's
compute, and the data loading and anything else the loop does). Samples are counted from the batch dimension of
the first tensor argument of every forward of the model under autograd (training forwards, not evaluation).
Waits inside step() count as step time. Memory is read without waiting for the gathers in flight.
`opt.stats()` returns the same figures for this rank alone, with no communication, for users' own loggers.
When the first line is due, "zerocore" is set to INFO unless its level was set, and if logging is not
configured at all (no handler on "zerocore" nor on the root logger) it gets a stderr handler, as DeepSpeed's
logger has one: a log_interval is a request to see the lines.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import torch

LOG = logging.getLogger("zerocore")
GiB = float(1 << 30)

# The row each rank contributes at a log step (float64): samples, the timings, then memory (bytes).
_FIELDS = ("samples", "step_s", "forward_backward_s", "reduction_wait_s", "step_only_s", "gather_wait_s",
           "device_allocated", "device_peak", "host_rss", "host_peak", "pinned", "nvme")


def _host_memory() -> Dict[str, float]:
    """VmRSS / VmHWM of this process in bytes (0 where /proc is not there)."""
    out = {"host_rss": 0.0, "host_peak": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["host_rss"] = float(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["host_peak"] = float(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class TrainingStats:
    """Counts samples, times every step window and logs every `log_interval` updates (see the note)."""

    def __init__(self, comm, device: torch.device, log_interval: Optional[int], memory_report):
        self.comm, self.device, self.log_interval = comm, device, log_interval
        self.memory_report = memory_report           # () -> ZeroOptimizer.memory_report()
        self.samples = 0                             # this rank's, since the last log line
        self.window_start = time.perf_counter()      # the end of the previous update (or construction)
        self.totals = dict.fromkeys(("step_s", "step_only_s", "reduction_wait_s", "gather_wait_s"), 0.0)
        self.steps = 0                                # updates (and skipped steps) since the last log line
        self.last: Dict[str, float] = {}             # the last step's figures
        self.logged_at = -1                          # global step of the last log line (a skipped step repeats it)
        self._waited = dict(comm.waited)

    def count_forward(self, args) -> None:
        """A forward of the model: under autograd its batch is training samples."""
        if torch.is_grad_enabled():
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and first.dim() > 0:
                self.samples += int(first.shape[0])

    def step_started(self) -> None:
        """step() begins its update: waits from here on are part of the step, not of the waits before it."""
        self._in_step = dict(self.comm.waited)

    def step_done(self, step_only_s: float, *, global_steps: int, loss_scale: float,
                  grad_norm: Optional[float]) -> None:
        """An optimizer step (updated or skipped) ended; log if this is a log step (every rank calls it)."""
        now = time.perf_counter()
        before = getattr(self, "_in_step", self.comm.waited)
        waited = {k: before[k] - self._waited[k] for k in ("reduction", "gather")}
        self._waited = dict(self.comm.waited)
        step_s = now - self.window_start
        self.window_start = now
        self.last = {"step_s": step_s, "step_only_s": step_only_s, "reduction_wait_s": waited["reduction"],
                     "gather_wait_s": waited["gather"],
                     "forward_backward_s": max(0.0, step_s - step_only_s - waited["reduction"] - waited["gather"]),
                     "global_steps": global_steps, "loss_scale": loss_scale, "grad_norm": grad_norm}
        for k in self.totals:
            self.totals[k] += self.last[k]
        self.steps += 1
        if self.log_interval and global_steps > 0 and global_steps % self.log_interval == 0 and \
                self.logged_at != global_steps:
            self.logged_at = global_steps
            self._log(global_steps, loss_scale, grad_norm)

    def local(self) -> Dict[str, float]:
        """This rank's figures: the last step, its means since the last log line, memory now."""
        out = dict(self.last)
        n = max(self.steps, 1)
        out.update({f"mean_{k}": v / n for k, v in self.totals.items()})
        out["samples_since_log"] = self.samples
        out.update(self._memory())
        return out

    def _memory(self) -> Dict[str, float]:
        mem = _host_memory()
        if self.device.type == "cuda":
            mem["device_allocated"] = float(torch.cuda.memory_allocated(self.device))
            mem["device_peak"] = float(torch.cuda.max_memory_allocated(self.device))
        else:
            mem["device_allocated"] = mem["device_peak"] = 0.0
        rep = self.memory_report()
        mem["pinned"] = float(rep["by_location"]["pinned"])
        mem["nvme"] = float(rep["by_location"]["nvme"])
        return mem

    def _log(self, global_steps: int, loss_scale: float, grad_norm: Optional[float]) -> None:
        n = max(self.steps, 1)
        mine = dict(self._memory(), samples=float(self.samples),
                    **{k: v / n for k, v in self.totals.items()})
        mine["forward_backward_s"] = max(0.0, mine["step_s"] - mine["step_only_s"] - mine["reduction_wait_s"]
                                         - mine["gather_wait_s"])
        row = torch.tensor([mine[k] for k in _FIELDS], dtype=torch.float64, device=self.comm.device)
        rows = self.comm.all_gather_rows(row, "the training log's per-rank figures").cpu()
        self.samples, self.steps = 0, 0
        self.totals = dict.fromkeys(self.totals, 0.0)
        if self.comm.rank != 0:
            return
        per_rank = [dict(zip(_FIELDS, r.tolist())) for r in rows]
        record = self.record(global_steps, loss_scale, grad_norm, per_rank, n)
        _ensure_visible()
        LOG.info(format_line(record))

    @staticmethod
    def record(global_steps, loss_scale, grad_norm, per_rank, steps) -> dict:
        """The log line's figures: timings are rank 0's means (ranks step together), samples summed."""
        first = per_rank[0]
        step_s = first["step_s"]
        samples = sum(r["samples"] for r in per_rank)
        return {"step": global_steps, "loss_scale": loss_scale, "grad_norm": grad_norm, "step_s": step_s,
                "forward_backward_s": first["forward_backward_s"], "reduction_wait_s": first["reduction_wait_s"],
                "step_only_s": first["step_only_s"], "gather_wait_s": first["gather_wait_s"],
                "samples_per_s": samples / (steps * step_s) if step_s > 0 else 0.0, "per_rank": per_rank}


def format_line(r: dict) -> str:
    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    rss = [p["host_rss"] / GiB for p in r["per_rank"]]
    peak = max(p["host_peak"] for p in r["per_rank"]) / GiB
    dev = max(p["device_allocated"] for p in r["per_rank"]) / GiB
    dev_peak = max(p["device_peak"] for p in r["per_rank"]) / GiB
    pinned = max(p["pinned"] for p in r["per_rank"]) / GiB
    nvme = max(p["nvme"] for p in r["per_rank"]) / GiB
    norm = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.4g}"
    return (f"zerocore step {r['step']} | loss scale {r['loss_scale']:g} | grad norm {norm} | "
            f"step {ms(r['step_s'])} ms (forward+backward {ms(r['forward_backward_s'])}, reduction wait "
            f"{ms(r['reduction_wait_s'])}, step {ms(r['step_only_s'])}, gather wait {ms(r['gather_wait_s'])}) | "
            f"{r['samples_per_s']:.1f} samples/s | memory per rank (GiB): host rss "
            f"{' '.join(f'{x:.2f}' for x in rss)} (peak {peak:.2f}), device {dev:.2f} (peak {dev_peak:.2f}), "
            f"pinned {pinned:.2f}, nvme {nvme:.2f}")


def _ensure_visible() -> None:
    if LOG.level == logging.NOTSET:       # (a root logger at WARNING, as basicConfig() leaves it, would drop INFO)
        LOG.setLevel(logging.INFO)
    if not LOG.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
