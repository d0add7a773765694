"""One rank of a training job written the way README shows it, with nothing caught: run by
tests/test_zero_rank_failure.py, either as N plain processes (env:// rendezvous, no agent: what srun, mpirun or a
hand-written launcher do) or under torchrun.

    python rank_failure_worker.py STAGE VICTIM HOW WHERE [STEP]

On optimizer step STEP (default 2) the rank VICTIM fails:
    HOW    sigkill: os.kill(getpid(), SIGKILL) (the OOM killer, a node lost, `kill -9`)
           raise:   an uncaught RuntimeError (the process exits with code 1 through its exit hooks)
    WHERE  backward: inside backward, after this rank launched the reductions of the later layers' units
                     (a gradient hook of the first layer's weight): the others wait in those reductions
           step:     at the start of opt.step() (an optimizer step pre-hook): the others wait in the step
           gathers:  right after opt.step() returned, its parameter gathers still in flight: the others wait
                     in the gathers at the next forward
It prints `INJECT <time.time()>` to stderr just before failing, so the test measures how long the survivors take
to exit from that moment; every rank prints `DONE` if it finished (none must).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import record

from zerocore import ZeroOptimizer

STEPS = 6


@record          # under torchrun, the exception goes into the failure summary (as in examples/train_gpt.py)
def main() -> None:
    stage, victim, how, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    fail_at = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # the test dumps a hung rank's stacks
    torch.set_num_threads(1)
    dist.init_process_group("gloo")            # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64),
                          nn.GELU(), nn.Linear(64, 8))
    # bucket_size: about one unit per Linear, so a backward pass launches several reductions. The default
    # comm_timeout_s (1800 s): a failure must be noticed by the peer check, not by a timeout.
    opt = ZeroOptimizer(model, stage=stage, lr=1e-3, bucket_size=3000, gradient_clipping=1.0,
                        param_persistence_threshold=0)
    step = 0

    def fail(point: str) -> None:
        if rank != victim or step != fail_at:
            return
        print(f"INJECT {time.time():.6f} rank {rank} {how} in {point} of step {step}", file=sys.stderr, flush=True)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure of rank {rank} in {point} of step {step}")

    if where == "backward":
        model[0].weight.register_hook(lambda g: fail("backward"))
    elif where == "step":
        opt.register_step_pre_hook(lambda *a: fail("step"))
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        x = torch.randn(16, 32, generator=gen)
        loss = model(x).square().mean()
        opt.backward(loss)
        opt.step()
        if where == "gathers":
            fail("the gathers after step()")
        opt.zero_grad()
    print(f"DONE rank {rank}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
