"""A rank that dies (SIGKILL) or raises mid-step, with real processes running a README-shaped training loop that
catches nothing (tests/rank_failure_worker.py): every other rank must exit non-zero within DEADLINE_S, its
traceback ending in zerocore's PeerFailure naming the failed rank, instead of hanging until a 30-minute timeout.

Two launchers:
  - plain: one process per rank with env:// (what srun, mpirun or a hand-written launcher do). Nobody kills the
    survivors, so this is where zerocore's own detection shows: each case records how long every survivor took to
    exit after the victim failed (the worker prints `INJECT <time>` just before failing).
  - torchrun: the agent notices the dead worker within its monitor interval (0.1 s) and SIGTERMs the others, so
    they exit before zerocore names anyone; what reaches the log is torchrun's failure summary, whose "Root Cause"
    names the rank and its signal (and, with @record, the exception).

tests/test_zero_reliability.py (test_a_dead_rank_is_named_by_the_survivors) and tests/test_zero_collectives.py
(test_a_dead_rank_is_reported_not_hung) check the same within the test harness (a scenario that catches the
PeerFailure, 2 ranks, stage 2, os._exit / os.abort at a step boundary); these add SIGKILL and raise inside
backward's reductions, inside step() and in the gathers after it, stage 3, 3 and 4 ranks, the process exits
(exit hooks included) and torchrun.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from dist_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "rank_failure_worker.py")
DEADLINE_S = 60.0          # every survivor must have exited this long after the victim failed
INJECT = re.compile(r"^INJECT ([0-9.]+) ", re.M)
MEASURED: List[str] = []   # one line per case, printed at the end of the module (pytest -s)


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


class _Reader:
    """Collects a process's output in a thread (so a chatty process never blocks on a full pipe)."""

    def __init__(self, stream):
        self.text = ""
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        for line in stream:
            self.text += line

    def join(self) -> str:
        self.thread.join(timeout=10)
        return self.text


@dataclass
class Outcome:
    world: int
    victim: int
    returncodes: Dict[int, Optional[int]] = field(default_factory=dict)   # None: still running at the deadline
    exit_after_s: Dict[int, float] = field(default_factory=dict)          # seconds after INJECT
    stderr: Dict[int, str] = field(default_factory=dict)
    injected_at: Optional[float] = None

    def survivors(self) -> List[int]:
        return [r for r in range(self.world) if r != self.victim]

    def report(self) -> str:
        return "\n".join(f"--- rank {r}: exit code {self.returncodes.get(r)}, "
                         f"{self.exit_after_s.get(r, float('nan')):.2f} s after the failure\n"
                         f"{self.stderr.get(r, '')[-3000:]}" for r in range(self.world))


def run_plain(world: int, stage: int, victim: int, how: str, where: str) -> Outcome:
    """`world` worker processes with env:// rendezvous and no agent; waits until every rank exited or until
    DEADLINE_S after the failure, then dumps the stacks of the ranks still running (SIGUSR1) and kills them."""
    port = free_port()
    procs, readers = [], []
    for r in range(world):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
        p = subprocess.Popen([sys.executable, WORKER, str(stage), str(victim), how, where], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        readers.append(_Reader(p.stderr))
    out = Outcome(world, victim)
    ended: Dict[int, float] = {}
    start = time.time()
    try:
        while len(ended) < world:
            now = time.time()
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = now
            if out.injected_at is None:
                m = INJECT.search(readers[victim].text)
                out.injected_at = float(m.group(1)) if m else None
            if now - (out.injected_at or start) > DEADLINE_S + (0 if out.injected_at else 120):
                break
            time.sleep(0.02)
    finally:
        stuck = [p for p in procs if p.poll() is None]
        for p in stuck:
            p.send_signal(signal.SIGUSR1)          # the worker dumps every thread's stack (faulthandler)
        if stuck:
            time.sleep(1.0)
        for p in stuck:
            p.kill()
        for p in procs:
            p.wait()
    for r, p in enumerate(procs):
        out.returncodes[r] = p.returncode if r in ended else None
        out.stderr[r] = readers[r].join()
        if r in ended and out.injected_at is not None:
            out.exit_after_s[r] = ended[r] - out.injected_at
    return out


def _check_plain(out: Outcome, how: str, names: str, label: str) -> None:
    assert out.injected_at is not None, f"the victim never reached the failure point:\n{out.report()}"
    # The victim died as intended: by the signal, or through its uncaught exception.
    if how == "sigkill":
        assert out.returncodes[out.victim] == -signal.SIGKILL, out.report()
    else:
        assert out.returncodes[out.victim] == 1, out.report()
        assert f"RuntimeError: injected failure of rank {out.victim}" in out.stderr[out.victim], out.report()
    times = ", ".join(f"rank {r} {out.exit_after_s[r]:.1f} s" if r in out.exit_after_s else f"rank {r} hung"
                      for r in out.survivors())
    MEASURED.append(f"{label}: survivors exited {times} after the failure")
    for r in out.survivors():
        assert out.returncodes[r] is not None, \
            f"rank {r} was still running {DEADLINE_S:.0f} s after rank {out.victim} failed ({times}):\n{out.report()}"
        assert out.returncodes[r] == 1, f"rank {r} exited {out.returncodes[r]}:\n{out.report()}"
        assert out.exit_after_s[r] <= DEADLINE_S, out.report()
        err = out.stderr[r]
        assert "DONE" not in err, out.report()
        # The traceback the user sees ends in PeerFailure naming the rank that failed, and only that rank.
        failures = [line for line in err.splitlines() if "zerocore.zero.collectives.PeerFailure: " in line]
        assert failures, f"rank {r} did not raise PeerFailure:\n{out.report()}"
        assert names in failures[0], f"rank {r}'s PeerFailure does not say {names!r}:\n{failures[0]}\n{out.report()}"
        assert "ranks " not in failures[0].split(" because ")[-1], f"more than the failed rank named:\n{failures[0]}"


# (world, stage, victim, how, where)
TWO_RANKS = [(2, 2, 1, "sigkill", "backward"), (2, 2, 1, "sigkill", "gathers"), (2, 3, 1, "sigkill", "step"),
             (2, 2, 1, "raise", "backward"), (2, 3, 1, "raise", "step")]


@pytest.mark.slow
@pytest.mark.parametrize("world,stage,victim,how,where", [pytest.param(*c, id="-".join(map(str, c)))
                                                          for c in TWO_RANKS])
def test_the_survivor_exits_naming_the_failed_rank(world, stage, victim, how, where):
    out = run_plain(world, stage, victim, how, where)
    _check_plain(out, how, f"rank {victim} of {world} ", f"plain {world} ranks, stage {stage}, "
                 f"rank {victim} {how} in {where}")


@pytest.mark.slow
def test_when_the_store_host_dies_the_survivors_say_so():
    """Without torchrun the rendezvous store lives in rank 0: when rank 0 dies, the others cannot check in, and
    say that rank 0 (the store's host) is gone."""
    out = run_plain(3, 3, 0, "sigkill", "step")
    _check_plain(out, "sigkill", "the rank that hosts it (rank 0 under init_method tcp://",
                 "plain 3 ranks, stage 3, rank 0 sigkill in step")


# Four ranks: rank 1 dies; ranks 0 and 2 share a connection with it in the collective they wait in, rank 3 may wait
# in one that does not involve rank 1 (gloo's algorithms), and after step() the survivors can be left in different
# broadcasts of the gathers that no closed connection ever ends: the heartbeats name rank 1, and only it, to every
# survivor ([Note: liveness] in zerocore/zero/liveness.py).
@pytest.mark.slow
@pytest.mark.parametrize("stage,where", [(2, "gathers"), (3, "backward")])
def test_every_survivor_of_four_names_the_dead_rank(stage, where):
    out = run_plain(4, stage, 1, "sigkill", where)
    _check_plain(out, "sigkill", "rank 1 of 4 ", f"plain 4 ranks, stage {stage}, rank 1 sigkill in {where}")


# ------------------------------------------------------------------------------------------------------ torchrun
def run_torchrun(nproc: int, stage: int, victim: int, how: str, where: str):
    """(returncode, output, seconds from the failure to torchrun's exit)."""
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", str(nproc), "--master_port", str(free_port()), WORKER, str(stage), str(victim), how,
        where]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = _Reader(proc.stdout)
    try:
        proc.wait(timeout=DEADLINE_S + 120)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail(f"torchrun did not end:\n{reader.join()[-5000:]}")
    ended = time.time()
    text = reader.join()
    m = INJECT.search(text)
    assert m, f"the victim never reached the failure point:\n{text[-5000:]}"
    return proc.returncode, text, ended - float(m.group(1))


def _summary(text: str) -> Dict[str, str]:
    """torchrun's failure summary: 'root' (the Root Cause entry) and 'failures' (the other workers)."""
    m = re.search(r"Failures:\n(.*?)\n-+\nRoot Cause \(first observed failure\):\n(.*?)\n=+", text, re.S)
    assert m, f"no torchrun failure summary in:\n{text[-5000:]}"
    return {"failures": m.group(1), "root": m.group(2)}


@pytest.mark.slow
def test_torchrun_names_the_killed_rank_and_stops_the_others():
    rc, text, seconds = run_torchrun(4, 3, 1, "sigkill", "backward")
    MEASURED.append(f"torchrun 4 ranks, stage 3, rank 1 sigkill in backward: torchrun exited {seconds:.1f} s after")
    assert rc == 1, text[-5000:]
    assert seconds <= DEADLINE_S, text[-5000:]
    s = _summary(text)
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9 .*\(SIGKILL\)", s["root"]), s["root"]
    assert "Signal 9 (SIGKILL) received by PID" in s["root"], s["root"]
    # The agent stopped every other worker (SIGTERM) instead of leaving them to hang.
    for r in (0, 2, 3):
        assert re.search(rf"rank\s+: {r} \(local_rank: {r}\)\s+exitcode\s+: -15 ", s["failures"]), s["failures"]
    assert "DONE" not in text, text[-5000:]


@pytest.mark.slow
def test_torchrun_shows_the_exception_of_the_rank_that_raised():
    rc, text, seconds = run_torchrun(2, 2, 1, "raise", "step")
    MEASURED.append(f"torchrun 2 ranks, stage 2, rank 1 raise in step: torchrun exited {seconds:.1f} s after")
    assert rc == 1, text[-5000:]
    assert seconds <= DEADLINE_S, text[-5000:]
    # The worker's own traceback (on its stderr, which torchrun passes through) and, thanks to @record, the root
    # cause in the summary name the rank and the exception.
    assert "[rank1]: RuntimeError: injected failure of rank 1 in step of step 2" in text, text[-5000:]
    s = _summary(text)
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 1 ", s["root"]), s["root"]
    assert "RuntimeError: injected failure of rank 1 in step of step 2" in s["root"], s["root"]
    assert "DONE" not in text, text[-5000:]


def teardown_module(module):
    if MEASURED:
        print("\nrank failure detection times:\n  " + "\n  ".join(MEASURED))


def _stop(proc) -> None:
    """Stop torchrun and its workers: SIGTERM lets the agent stop them (SIGKILL would orphan them)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
