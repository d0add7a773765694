"""Run many multi-rank scenarios inside one gloo process group per world size.

Spawning a rank costs a torch import (2-3 s here), so tests do not spawn per scenario: `run_scenarios`
starts `world_size` processes once, each runs the given scenario functions in order, and every rank reports
per-scenario results (the scenario's return value, or its error text) to the parent, which the tests then
assert on. If a scenario fails on any rank, the ranks agree on it (one all_gather_object after each scenario)
and skip the rest instead of hanging in mismatched collectives; a hard hang is cut by the parent's timeout.

A scenario is `fn(rank, world_size) -> dict | None`; raising marks it failed on that rank.

Workers end through a real interpreter exit (after destroy_process_group), and the parent checks that every rank
that reported exited with code 0: an abort at exit (e.g. a gloo thread that needs the GIL during finalization)
fails the run. Runs that kill a rank on purpose pass `clean_exit=False`.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import signal
import socket
import time
import traceback
from typing import Dict, List, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, module: str, names: Sequence[str], out) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    results: Dict[str, dict] = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        # Scenarios that need it can tell which rank and world they run in (e.g. to kill one rank on purpose).
        mod = importlib.import_module(module)
        failed_before = None
        for name in names:
            if failed_before:
                results[name] = {"ok": False, "error": f"not run: scenario {failed_before!r} failed first"}
                continue
            try:
                value = getattr(mod, name)(rank, world_size)
                results[name] = {"ok": True, "value": value}
            except Exception:
                results[name] = {"ok": False, "error": f"rank {rank}: " + traceback.format_exc()}
            status: List[bool] = [None] * world_size
            dist.all_gather_object(status, results[name]["ok"])
            if not all(status) and not getattr(getattr(mod, name), "expect_rank_errors", False):
                failed_before = name
    except Exception:
        results["__setup__"] = {"ok": False, "error": f"rank {rank}: " + traceback.format_exc()}
    out.put((rank, results))
    out.close()
    out.join_thread()
    # A real interpreter exit: what a user's script goes through (see the module docstring).
    if dist.is_initialized():
        dist.destroy_process_group()


def _signal_name(exitcode) -> str:
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f", {signal.Signals(-exitcode).name}"
    except ValueError:
        return ""


def run_scenarios(world_size: int, module: str, names: Sequence[str], timeout_s: float = 600,
                  clean_exit: bool = True, grace_s: float = 5.0) -> Dict[str, List[dict]]:
    """Run scenarios `names` of `module` on `world_size` gloo ranks; returns name -> [per-rank result].

    grace_s: how long the surviving ranks get to report once a rank died without reporting."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, module, list(names), out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    per_rank: Dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    died_at = None            # when a rank was first seen dead without having reported
    why = {}
    try:
        while len(per_rank) < world_size and time.monotonic() < deadline:
            try:
                rank, res = out.get(timeout=0.5)
                per_rank[rank] = res
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in per_rank and not p.is_alive()]
                if dead and died_at is None:
                    died_at = time.monotonic()
                # A dead rank leaves its peers blocked in a collective until gloo's timeout: give them a few
                # seconds to report (they usually fail fast with "connection closed"), then stop waiting.
                if died_at is not None and time.monotonic() - died_at > grace_s:
                    break
        for r, p in enumerate(procs):
            if r not in per_rank:
                why[r] = (f"rank {r} died (exit code {p.exitcode}{_signal_name(p.exitcode)}) without reporting"
                          if not p.is_alive() else
                          f"rank {r} did not report (killed after "
                          f"{'a peer died' if died_at is not None else f'the {timeout_s:.0f} s timeout'})")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    results: Dict[str, List[dict]] = {}
    for name in names:
        results[name] = [per_rank.get(r, {}).get(name, {"ok": False, "error": why.get(r, f"rank {r}: no result")})
                         for r in range(world_size)]
    setup_errors = [res["__setup__"] for res in per_rank.values() if "__setup__" in res]
    if clean_exit:
        setup_errors += [{"ok": False, "error": f"rank {r} reported, then exited with code {p.exitcode}"
                                                  f"{_signal_name(p.exitcode)} (it must exit cleanly)"}
                         for r, p in enumerate(procs) if r in per_rank and p.exitcode != 0]
    if setup_errors:
        results["__setup__"] = setup_errors
    return results


def check_all_ranks(results: Dict[str, List[dict]], name: str) -> List[dict]:
    """Raise AssertionError with every failing rank's error; return the per-rank values."""
    if "__setup__" in results:
        raise AssertionError("process group setup failed:\n" + "\n".join(
            r.get("error", "") for r in results["__setup__"]))
    errors = [r["error"] for r in results[name] if not r.get("ok")]
    if errors:
        raise AssertionError(f"scenario {name} failed:\n" + "\n".join(errors))
    return [r["value"] for r in results[name]]
