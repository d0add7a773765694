"""Train a model whose training state does not fit in host memory: ZeRO stage 3 with parameters and optimizer
state on NVMe (ZeRO-Infinity), the model built partitioned under ZeroInit.

    torchrun --nproc_per_node 2 examples/train_beyond_memory.py --nvme-path /local_nvme --params 4e8

The model is an MLP of `--params` parameters (blocks of Linear(2048, 7680) - GELU - Linear(7680, 2048)) in bf16
with fp32 masters: 16 bytes of model state per parameter (bf16 params and grads, fp32 master, m and v), of which
each rank keeps in memory only its bf16 gradient shard and the units it has gathered at the time. It trains on
one fixed batch, so the loss falls step by step. `--no-offload` runs the same model with everything in memory
(for comparison under a memory limit). Rank 0 prints one line per step and a final JSON line with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zerocore import ZeroInit, ZeroOptimizer  # noqa: E402

WIDTH, HIDDEN = 2048, 7680
PER_BLOCK = 2 * WIDTH * HIDDEN + WIDTH + HIDDEN


def build(num_params: float) -> torch.nn.Module:
    blocks = max(1, round(num_params / PER_BLOCK))
    nn = torch.nn
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
                           for _ in range(blocks)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=4e8, help="model size in parameters (default 4e8)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nvme-path", default=None, help="folder on a fast local disk (required with offload)")
    ap.add_argument("--no-offload", action="store_true", help="keep everything in memory instead")
    ap.add_argument("--sub-group-size", type=float, default=2e6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)      # parameters are created in bf16 (the masters start from them)
    started = time.perf_counter()
    with ZeroInit():
        model = build(args.params)
    torch.set_default_dtype(torch.float32)
    offload = {} if args.no_offload else dict(offload_optimizer="nvme", offload_param="nvme", nvme_path=args.nvme_path,
                                               sub_group_size=int(args.sub_group_size))
    opt = ZeroOptimizer(model, stage=3, lr=1e-4, bucket_size=WIDTH * HIDDEN, **offload)   # a unit per Linear
    built_s = time.perf_counter() - started
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(4, WIDTH, generator=g, dtype=torch.bfloat16)
    y = torch.randn(4, WIDTH, generator=g, dtype=torch.bfloat16)
    losses, times = [], []
    stats = getattr(opt.store, "io_stats", None)
    moved_before = 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        moved = (stats["read_bytes"] + stats["written_bytes"]) if stats else 0
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.5f}, {times[-1]:.2f} s, swapped {(moved - moved_before) / 1e9:.2f} GB "
                  "(rank 0)", flush=True)
        moved_before = moved
    report = opt.memory_report()
    psi = sum(u.numel for u in opt.units)
    result = {"params": psi, "model_state_bytes": 16 * psi, "losses": losses, "step_s": times, "build_s": built_s,
              "swapped_bytes_per_step_rank0": (moved_before / args.steps) if stats else 0,
              "nvme_bytes_rank0": report.get("nvme_bytes", 0), "host_bytes_rank0": report["by_location"]["host"]}
    opt.close()
    dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
