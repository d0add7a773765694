"""Checkpoint save / load of ZeroOptimizer vs torch.save / torch.load of the same state, 2 gloo ranks (CPU).

Model: the 67.2M-param MLP of bench_zero.py (fp32, stage 2, one step taken). Each rank saves its shard with
`opt.save_checkpoint` (safetensors, manifest with crc32s, fsync, rename) and, beside it in the same run,
`torch.save(opt.state_dict(), ...)` of the same state (no fsync: torch.save's plain behaviour); then loads with
`opt.load_checkpoint` and `opt.load_state_dict(torch.load(..., weights_only=True))`; and an async save (the
call, then the wait for its background write). The implementations run
interleaved for several rounds; medians are reported, with the peak RSS above the rank's RSS before the call
(VmHWM is reset through /proc/self/clear_refs before each call). `consolidate` is timed once at the end.

    python bench/bench_checkpoint.py --rounds 3 --dir /tmp/zc-bench-ckpt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _measured(fn):
    with open("/proc/self/clear_refs", "w") as f:     # resets VmHWM to the current RSS
        f.write("5")
    before = _rss("VmRSS:")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, _rss("VmHWM:") - before


def _worker(rank, world, port, rounds, folder, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    from zerocore import ZeroOptimizer, consolidate
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
              for _ in range(8)]
    model = torch.nn.Sequential(*blocks)
    opt = ZeroOptimizer(model, stage=2, lr=1e-4)
    opt.backward(model(torch.randn(8, 1024)).square().mean())
    opt.step()
    opt.wait_for_params()
    torch_file = os.path.join(folder, f"torch_rank{rank}.pt")

    def torch_save_fsync():
        torch.save(opt.state_dict(), torch_file)
        fd = os.open(torch_file, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    ops = {"zerocore save": lambda r: opt.save_checkpoint(folder, tag=f"round{r}"),
           "torch.save": lambda r: torch.save(opt.state_dict(), torch_file),
           "torch.save + fsync": lambda r: torch_save_fsync(),
           "zerocore load": lambda r: opt.load_checkpoint(folder, tag=f"round{r}"),
           # async_save: the call returns once the shards are host copies; the files are written in a thread
           # and committed at the next call (here wait_for_checkpoint() right away, timed on its own).
           "zerocore save, async_save=True: the call": lambda r: opt.save_checkpoint(folder, tag=f"async{r}",
                                                                                     async_save=True),
           "zerocore save, async_save=True: wait_for_checkpoint() after it": lambda r: opt.wait_for_checkpoint(),
           "torch.load": lambda r: opt.load_state_dict(torch.load(torch_file, weights_only=True))}
    results = {name: [] for name in ops}
    saves, loads, async_pair = list(ops)[:3], list(ops)[3:5], list(ops)[5:]
    for r in range(rounds):
        # Saves before loads (a load needs its files); within each, the order flips every round so that the
        # memory one leaves mapped (the host block cache keeps freed blocks) does not always favour the same one.
        for name in (saves if r % 2 == 0 else saves[::-1]) + (loads if r % 2 == 0 else loads[::-1]) + async_pair:
            dist.barrier()
            results[name].append(_measured(lambda: ops[name](r)))
    dist.barrier()
    if rank == 0:
        results["consolidate (rank 0, to safetensors)"] = [_measured(
            lambda: consolidate(folder, out=os.path.join(folder, "consolidated")))]
    opt.close()
    out.put((rank, results))
    dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp
    from socket import socket
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/zerocore-bench-ckpt")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args.rounds, args.dir, q)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    print("| operation (67.2M fp32 params, stage 2, 2 ranks) | seconds (median, slower rank) | peak RSS above "
          "start MiB (max of ranks) |")
    print("|---|---|---|")
    for name in per_rank[0]:
        rows = [per_rank[r][name] for r in per_rank if name in per_rank[r]]
        secs = max(statistics.median(t for t, _ in rs) for rs in rows)
        peak = max(m for rs in rows for _, m in rs) / 2 ** 20
        print(f"| {name} | {secs:.3f} | {peak:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(per_rank, f, indent=1)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
