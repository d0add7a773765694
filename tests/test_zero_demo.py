"""The README's main command runs: a short 2-rank torchrun of examples/train_demo.py on gloo."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--stage", "2"], ["--stage", "1", "--offload", "--dtype", "bf16"]])
def test_demo_trains_on_two_ranks(extra):
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_port", "29641",
        os.path.join(ROOT, "examples", "train_demo.py"), "--steps", "6", "--width", "64", *extra]
    # PYTHONPATH: the demo must import this checkout's zerocore, not whichever copy is pip-installed.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-rank demo did not finish in 120 s (a rank hung?); output so far:\n"
                    f"{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    # torchrun stops the other rank when one dies and exits non-zero, naming the rank and its signal.
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "terminate called" not in out.stderr, out.stderr[-3000:]
    assert "step   5  loss" in out.stdout and "median step time" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("0 |", "1 |"))]
    assert len(rows) == 2, out.stdout
