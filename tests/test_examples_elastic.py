"""Elastic restart of the README's first command: `torchrun --max-restarts 1 examples/train_gpt.py --save DIR
--auto-resume` with one rank killed (SIGKILL, by pid, from this test) after a checkpoint was written. torchrun
restarts both workers, the same command line resumes from the latest checkpoint, and the job ends exactly where an
uninterrupted run of the same command ends: the same loss at every step after the resume and bit-identical final
parameters (the example's resume is step-exact: masters, Adam state and step counts, the lr schedule, and batches
drawn from (seed, rank, step))."""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_examples import LOG, ROOT, SCRIPT, SMALL, _free_port

STEPS, SAVE_EVERY, KILL_AFTER = 16, 4, 8      # kill rank 1 once rank 0 reported the checkpoint of step KILL_AFTER
TIMEOUT_S = 240
FLAGS = [*SMALL, "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--log-every", "1", "--auto-resume"]


def _torchrun(ckpt: str, kill_rank=None):
    """torchrun --max-restarts 1 the example; if kill_rank is set, SIGKILL that rank's worker (first attempt)
    as soon as rank 0 printed `saved .../global_step{KILL_AFTER}`. Returns (returncode, output, killed pid)."""
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--max-restarts", "1", "--master_port", str(_free_port()), SCRIPT, *FLAGS,
        "--save", ckpt]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out, killed = [], []

    def read():
        for line in proc.stdout:
            out.append(line)
            if kill_rank is not None and not killed and line.strip().endswith(f"global_step{KILL_AFTER}"):
                pid = _worker_pid(proc.pid, kill_rank)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)
        reader.join(timeout=10)
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{''.join(out)[-4000:]}")
    reader.join(timeout=10)
    return proc.returncode, "".join(out), killed[0] if killed else None


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of global rank `rank` (a child of the agent with RANK=rank)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(entry)
    raise AssertionError(f"torchrun (pid {agent_pid}) has no worker with RANK={rank}")


def _steps(output: str):
    """{step: (train loss, val loss)} from the log lines; a step logged twice keeps its last line."""
    return {int(s): (loss, val) for s, loss, val, _ in LOG.findall(output)}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker's pid in /proc")
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    import zerocore
    t0 = time.monotonic()
    rc, ref_out, _ = _torchrun(str(tmp_path / "ref"))
    ref_s = time.monotonic() - t0
    assert rc == 0, ref_out[-4000:]
    assert "resumed at step" not in ref_out, ref_out[-4000:]          # the first start found no checkpoint
    ref = _steps(ref_out)
    assert sorted(ref) == list(range(1, STEPS + 1)), ref_out[-4000:]

    t0 = time.monotonic()
    rc, out, killed = _torchrun(str(tmp_path / "ckpt"), kill_rank=1)
    run_s = time.monotonic() - t0
    assert killed is not None, f"rank 0 never reported the checkpoint of step {KILL_AFTER}:\n{out[-4000:]}"
    assert rc == 0, f"the restarted job failed:\n{out[-4000:]}"
    # torchrun saw the worker die and restarted the group once; the same command resumed from the checkpoint.
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {killed})" in out, out[-4000:]
    m = re.search(r"resumed at step (\d+) \(torchrun restart 1\)", out)
    assert m, out[-4000:]
    resumed_at = int(m.group(1))
    assert resumed_at % SAVE_EVERY == 0 and KILL_AFTER <= resumed_at < STEPS, out[-4000:]
    got = _steps(out)
    # Every step after the resume logs the same training and validation loss as the uninterrupted run (the
    # values are averaged over both ranks, printed to 4 decimals), the last step included.
    after = range(resumed_at + 1, STEPS + 1)
    assert {s: got.get(s) for s in after} == {s: ref[s] for s in after}, (got, ref)
    # The final checkpoints (written at step STEPS by both jobs) hold bit-identical fp32 parameters.
    final = f"global_step{STEPS}"
    a = zerocore.consolidate(str(tmp_path / "ref"), tag=final)
    b = zerocore.consolidate(str(tmp_path / "ckpt"), tag=final)
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters differ after the restart: {differ}"
    print(f"uninterrupted run {ref_s:.1f} s; killed at step >= {KILL_AFTER}, resumed at {resumed_at}: {run_s:.1f} s")


def _stop(proc) -> None:
    """Stop torchrun and its workers: SIGTERM lets the agent stop them (SIGKILL would orphan them)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
