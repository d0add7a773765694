"""A short ZeRO training run: `python -m zerocore demo` (2 ranks through torchrun) or
`torchrun --nproc_per_node 2 -m zerocore.demo`.

Trains a small MLP to imitate a fixed random "teacher" network with ZeroOptimizer (stage 2 by default) on
gloo (CPU) - or NCCL when CUDA is available - and prints the loss, the step time and what each rank holds.
It ships inside the package so an installed zerocore can check itself without a checkout; the fuller example
is examples/train_gpt.py.

    python -m zerocore demo --nproc 2 --stage 3 --steps 40
    torchrun --nproc_per_node 2 -m zerocore.demo --offload --dtype bf16
    python -m zerocore.demo            # one process, no torchrun needed
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from zerocore import ZeroOptimizer


def make_model(width: int, depth: int) -> nn.Module:
    blocks = [nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(width, 16))


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--offload", action="store_true", help="optimizer state and step on the host (CPU Adam)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="per-rank micro-batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)                                   # same initial weights on every rank
    model = make_model(args.width, args.depth).to(device)
    teacher = make_model(args.width, 1).to(device).requires_grad_(False)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    opt = ZeroOptimizer(model, stage=args.stage, lr=args.lr, weight_decay=0.01, dtype=dtype,
                        offload_optimizer="cpu" if args.offload else None, gradient_clipping=1.0)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"zerocore demo: {world} rank(s) on {device.type} ({dist.get_backend()}), stage {args.stage}, "
              f"{args.dtype}, offload={'cpu' if args.offload else 'none'}, {n_params / 1e6:.1f}M params")

    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank sees its own data
    times = []
    for step in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=gen).to(device)
        with torch.no_grad():
            y = teacher.float()(x)
        t0 = time.perf_counter()
        out = model(x.to(dtype) if dtype else x)
        loss = nn.functional.mse_loss(out.float(), y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world:.5f}  step time {times[-1] * 1e3:7.1f} ms  "
                  f"grad norm {opt.global_grad_norm:.3f}")

    rep = opt.memory_report()
    mine = {"rank": rank, "held_mb": rep["model_states"] / 2 ** 20, "formula_mb": rep["formula"] / 2 ** 20,
            "params_mb": rep["params"] / 2 ** 20, "grads_mb": rep["gradients"] / 2 ** 20,
            "master_mb": rep["master"] / 2 ** 20, "state_mb": rep["optimizer_state"] / 2 ** 20,
            "peak_rss_mb": peak_rss_mb(),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        steady = times[2:] or times
        print(f"median step time {statistics.median(steady) * 1e3:.1f} ms over {len(steady)} steps")
        print("rank | params MB | grads MB | fp32 master MB | Adam state MB | held MB | ZeRO formula MB | peak RSS MB")
        for m in everyone:
            print(f"{m['rank']:4d} | {m['params_mb']:9.1f} | {m['grads_mb']:8.1f} | {m['master_mb']:14.1f} | "
                  f"{m['state_mb']:13.1f} | {m['held_mb']:7.1f} | {m['formula_mb']:15.1f} | {m['peak_rss_mb']:.0f}"
                  + (f" | GPU peak {m['gpu_peak_mb']:.0f} MB" if m["gpu_peak_mb"] is not None else ""))
    # Teardown order matters on gloo: finish the engine's collectives and drop its hooks and group first, then
    # agree that every rank is done, then destroy the group (its destructor joins gloo's worker threads while
    # Python can still run them; see [Note: teardown] in zerocore/zero/collectives.py).
    opt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
